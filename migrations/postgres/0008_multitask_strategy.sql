-- Double-texting (README "Double-texting"): a session's default multitask strategy, and the strategy each
-- message arrived with (an interrupting or rolling-back message is never taken as an answer). The verb
-- functions that read them are redefined here (rules.strategy, rules.rejects, rules.may_answer).
ALTER TABLE sessions ADD COLUMN multitask_strategy TEXT NOT NULL DEFAULT 'enqueue';
ALTER TABLE inputs ADD COLUMN strategy TEXT NOT NULL DEFAULT 'enqueue';

CREATE OR REPLACE FUNCTION svc_create_session(p json, p_now timestamptz) RETURNS json LANGUAGE sql AS $$
WITH made AS (
  INSERT INTO sessions (session_id, owner, team, title, status, last_seq, created_at, updated_at,
                        multitask_strategy)
  VALUES (p->>'session', p->>'owner', p->>'team', p->>'title', 'idle', 0, p_now, p_now,
          COALESCE(p->>'multitask_strategy', 'enqueue'))
  ON CONFLICT (session_id) DO NOTHING RETURNING session_id)
SELECT CASE WHEN EXISTS (SELECT 1 FROM made) THEN json_build_object('at', svc_us(p_now))
            ELSE json_build_object('err', 'conflict') END $$;

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
  INSERT INTO inputs (session_id, input_seq, content, status, attempt, not_before, created_at, strategy)
  VALUES (v_sid, v_seq, (p->>'content')::json, 'queued', 1, p_now, p_now, v_strategy);
  RETURN json_build_object('seq', v_seq, 'at', svc_us(p_now), 'strategy', v_strategy);
END $$;

-- Answers belong to their run (README "Guarantees"): the index-th answer bound to this input, else the
-- session's oldest queued input becomes it, unless it was sent to interrupt or roll back the run
-- (rules.may_answer): then it runs as its own input.
CREATE OR REPLACE FUNCTION svc_take_answer(p json, p_now timestamptz) RETURNS json LANGUAGE plpgsql AS $$
DECLARE
  v_input bigint := (p->>'input')::bigint;
  v_index bigint := (p->>'index')::bigint;
  v_row record;
BEGIN
  IF NOT svc_fenced(p) THEN
    RETURN json_build_object('err', 'lease_lost');
  END IF;
  SELECT input_seq, content INTO v_row FROM inputs WHERE answer_for = v_input ORDER BY id LIMIT 1 OFFSET v_index;
  IF NOT FOUND THEN
    IF (SELECT count(*) FROM inputs WHERE answer_for = v_input) <> v_index THEN
      RETURN json_build_object('answer', NULL);
    END IF;
    SELECT id, input_seq, content, strategy INTO v_row FROM inputs
    WHERE session_id = p->>'session' AND status = 'queued' ORDER BY id LIMIT 1;
    IF NOT FOUND OR v_row.strategy IN ('interrupt', 'rollback') THEN
      RETURN json_build_object('answer', NULL);
    END IF;
    UPDATE inputs SET status = 'done', answer_for = v_input WHERE id = v_row.id;
  END IF;
  UPDATE sessions SET status = 'running', updated_at = p_now WHERE session_id = p->>'session';
  RETURN json_build_object('answer', json_build_object('seq', v_row.input_seq, 'content', v_row.content));
END $$;
