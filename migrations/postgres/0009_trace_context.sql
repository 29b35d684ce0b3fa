-- Tracing (README "Tracing"): the trace context of the request that enqueued an input (W3C headers as JSON),
-- so its run, however often retried and wherever claimed, is a span of the same trace. svc_enqueue stores it
-- (as in 0008, plus the column), svc_claim returns it (as in 0006, plus the column).
ALTER TABLE inputs ADD COLUMN trace_context JSON;

CREATE OR REPLACE FUNCTION svc_enqueue(p json, p_now timestamptz) RETURNS json LANGUAGE plpgsql AS $$
DECLARE
  v_sid text := p->>'session';
  v_cmid text := p->>'client_msg_id';
  v_max bigint := (p->>'max_queued')::bigint;
  v_owner text;
  v_status text;
  v_default text;
  v_strategy text;
  v_seq bigint;
  v_queued bigint;
BEGIN
  SELECT owner, status, multitask_strategy INTO v_owner, v_status, v_default FROM sessions
  WHERE session_id = v_sid FOR NO KEY UPDATE;
  IF NOT FOUND THEN
    IF v_max IS NOT NULL AND v_max <= 0 THEN
      RETURN json_build_object('err', 'queue_full', 'queued', 0);
    END IF;
    INSERT INTO sessions (session_id, owner, team, title, status, last_seq, created_at, updated_at)
    VALUES (v_sid, p->>'owner', p->>'team', NULL, 'idle', 0, p_now, p_now) ON CONFLICT (session_id) DO NOTHING;
    SELECT owner, status, multitask_strategy INTO v_owner, v_status, v_default FROM sessions
    WHERE session_id = v_sid FOR NO KEY UPDATE;
  END IF;
  IF v_owner IS DISTINCT FROM p->>'owner' THEN
    RETURN json_build_object('err', 'not_found');
  END IF;
  v_strategy := COALESCE(p->>'strategy', v_default);  -- rules.strategy
  IF v_cmid IS NOT NULL THEN
    SELECT seq INTO v_seq FROM entries WHERE session_id = v_sid AND client_msg_id = v_cmid;
    IF FOUND THEN
      RETURN json_build_object('dup', v_seq, 'strategy', v_strategy);
    END IF;
  END IF;
  SELECT count(*) INTO v_queued FROM inputs WHERE session_id = v_sid AND status = 'queued';
  -- rules.rejects: a run working or messages waiting (awaiting_input with nothing queued takes the answer)
  IF v_strategy = 'reject' AND (v_status = 'running' OR v_queued > 0) THEN
    RETURN json_build_object('err', 'busy');
  END IF;
  IF v_max IS NOT NULL AND v_queued >= v_max THEN
    RETURN json_build_object('err', 'queue_full', 'queued', v_queued);
  END IF;
  -- STATUS_AFTER_ENQUEUE
  v_seq := svc_allocate(v_sid, 1, p_now,
                        CASE WHEN v_status IN ('running', 'awaiting_input') THEN NULL ELSE 'queued' END);
  INSERT INTO entries (session_id, seq, type, source, content, run_id, client_msg_id, metadata, created_at)
  VALUES (v_sid, v_seq, 'TextMessage', 'user', (p->>'content')::json, NULL, v_cmid, '{}'::json, p_now);
  INSERT INTO inputs (session_id, input_seq, content, status, attempt, not_before, created_at, strategy,
                      trace_context)
  VALUES (v_sid, v_seq, (p->>'content')::json, 'queued', 1, p_now, p_now, v_strategy, p->'trace');
  RETURN json_build_object('seq', v_seq, 'at', svc_us(p_now), 'strategy', v_strategy);
END $$;

CREATE OR REPLACE FUNCTION svc_claim(p json, p_now timestamptz) RETURNS json LANGUAGE plpgsql AS $$
DECLARE
  v_sid text;
  v_in record;
  v_s record;
  v_found boolean := false;
BEGIN
  FOR i IN 1..5 LOOP
    v_sid := svc_pick(p_now);
    IF v_sid IS NULL THEN
      RETURN NULL;
    END IF;
    SELECT id, input_seq, content, attempt, failures, not_before, trace_context INTO v_in FROM inputs
    WHERE session_id = v_sid AND status = 'queued' ORDER BY id LIMIT 1;
    IF FOUND AND v_in.not_before <= p_now
       AND NOT EXISTS (SELECT 1 FROM inputs r WHERE r.session_id = v_sid AND r.status = 'running') THEN
      v_found := true;
      EXIT;
    END IF;
  END LOOP;
  IF NOT v_found THEN
    RETURN NULL;
  END IF;
  UPDATE inputs SET status = 'running', lease_token = p->>'token',
         lease_expires_at = p_now + (p->>'lease_s')::float8 * interval '1 second',
         worker_id = p->>'worker', run_id = p->>'run', cancel_requested = FALSE
  WHERE id = v_in.id;
  UPDATE sessions SET last_seq = last_seq + 1, updated_at = p_now, status = 'running'
  WHERE session_id = v_sid RETURNING last_seq, owner, team, team_state INTO v_s;
  INSERT INTO entries (session_id, seq, type, source, content, run_id, client_msg_id, metadata, created_at)
  VALUES (v_sid, v_s.last_seq, 'run_started', 'system',
          to_json(CASE WHEN v_in.attempt = 1 THEN 'Run started.'
                       ELSE format('Run started (attempt %s).', v_in.attempt) END),
          p->>'run', NULL, json_build_object('input_seq', v_in.input_seq, 'attempt', v_in.attempt), p_now);
  RETURN json_build_object(
    'input', v_in.id, 'session', v_sid, 'owner', v_s.owner, 'team', v_s.team, 'input_seq', v_in.input_seq,
    'content', v_in.content, 'attempt', v_in.attempt, 'failures', v_in.failures, 'seq', v_s.last_seq,
    'at', svc_us(p_now), 'state', v_s.team_state, 'pieces', svc_pieces(v_sid), 'trace', v_in.trace_context);
END $$;

