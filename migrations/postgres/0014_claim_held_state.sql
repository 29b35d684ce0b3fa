-- A live team's claim does not read the state back (README "Team state", "Benchmarks": bench/long.py). The
-- claim call may carry "held": {session_id: SHA-256 hex of a state head}, the heads this instance last wrote
-- with states its live teams still hold (state_pieces.WrittenHeads). When the session it claims still has that
-- head, the answer has "held": true and no pieces: the head holds every list's count and digest and was written
-- in one transaction with its pieces, so the stored state is the one the caller holds. Otherwise, as in 0009.

CREATE OR REPLACE FUNCTION svc_claim(p json, p_now timestamptz) RETURNS json LANGUAGE plpgsql AS $$
DECLARE
  v_sid text;
  v_in record;
  v_s record;
  v_found boolean := false;
  v_held text;
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
  v_held := p->'held'->>v_sid;  -- the digest of the head the claimer holds for this session, if any
  v_found := v_held IS NOT NULL AND v_s.team_state IS NOT NULL
             AND v_held = encode(sha256(convert_to(v_s.team_state::text, 'UTF8')), 'hex');
  RETURN json_build_object(
    'input', v_in.id, 'session', v_sid, 'owner', v_s.owner, 'team', v_s.team, 'input_seq', v_in.input_seq,
    'content', v_in.content, 'attempt', v_in.attempt, 'failures', v_in.failures, 'seq', v_s.last_seq,
    'at', svc_us(p_now), 'state', v_s.team_state, 'held', v_found,
    'pieces', CASE WHEN v_found THEN NULL ELSE svc_pieces(v_sid) END, 'trace', v_in.trace_context);
END $$;
