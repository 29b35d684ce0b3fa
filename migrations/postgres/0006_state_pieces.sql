-- Team state in pieces (service/queue/state_pieces.py): sessions.team_state keeps a small head (the state with
-- its growing lists emptied, plus a manifest of them); each item of a growing list (an agent's llm_context
-- message, a manager's message_thread message) is a row of state_pieces, written once. A turn then writes what it
-- added, not the whole state again (and no TOASTed multi-megabyte value is rewritten per turn). States saved
-- before this migration stay whole in sessions.team_state (no manifest): they load as they are and the next save
-- splits them. The claim returns the head and the pieces in its one statement, as before.
CREATE TABLE state_pieces (
    session_id TEXT NOT NULL REFERENCES sessions (session_id) ON DELETE CASCADE,
    path       TEXT NOT NULL,  -- JSON array of the keys leading to the list
    idx        INTEGER NOT NULL,  -- position in the list, from 0
    body       JSON NOT NULL,  -- the item as written (JSON, not JSONB: key order and NUL survive)
    PRIMARY KEY (session_id, path, idx)
);

-- {path: [item, ...]} of a session (items in order; the head's manifest says how many count), or NULL.
CREATE FUNCTION svc_pieces(p_sid text) RETURNS json LANGUAGE sql STABLE AS $$
  SELECT json_object_agg(path, items) FROM (
    SELECT path, json_agg(body ORDER BY idx) AS items FROM state_pieces WHERE session_id = p_sid GROUP BY path
  ) AS lists $$;

-- A save's piece writes [{path, keep, items}]: keep the first `keep` items of the path, append `items` (JSON
-- text of an array) after them. `p_clear`: drop every piece of the session first (the saver knew none).
CREATE FUNCTION svc_save_pieces(p_sid text, p_writes json, p_clear boolean) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
  v_w json;
BEGIN
  IF p_clear THEN
    DELETE FROM state_pieces WHERE session_id = p_sid;
  END IF;
  FOR v_w IN SELECT value FROM json_array_elements(COALESCE(p_writes, '[]'::json)) LOOP
    IF NOT p_clear THEN
      DELETE FROM state_pieces WHERE session_id = p_sid AND path = v_w->>'path' AND idx >= (v_w->>'keep')::int;
    END IF;
    INSERT INTO state_pieces (session_id, path, idx, body)
    SELECT p_sid, v_w->>'path', (v_w->>'keep')::int + (t.ord - 1)::int, t.item
    FROM json_array_elements((v_w->>'items')::json) WITH ORDINALITY AS t(item, ord);
  END LOOP;
END $$;

CREATE OR REPLACE FUNCTION svc_finish(p json, p_now timestamptz) RETURNS json LANGUAGE plpgsql AS $$
BEGIN
  PERFORM 1 FROM sessions WHERE session_id = p->>'session' FOR NO KEY UPDATE;
  UPDATE inputs SET status = 'done', lease_token = NULL, lease_expires_at = NULL
  WHERE id = (p->>'input')::bigint AND lease_token = p->>'token' AND status = 'running';
  IF NOT FOUND THEN
    RETURN json_build_object('err', 'lease_lost');
  END IF;
  IF p->>'state' IS NOT NULL THEN
    PERFORM svc_save_pieces(p->>'session', p->'pieces', (p->>'clear')::boolean);
  END IF;
  RETURN svc_end(p->>'session', p->'entry', p->>'run', (p->>'state')::json, p_now);
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
    SELECT id, input_seq, content, attempt, failures, not_before INTO v_in FROM inputs
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
    'at', svc_us(p_now), 'state', v_s.team_state, 'pieces', svc_pieces(v_sid));
END $$;

CREATE OR REPLACE FUNCTION svc_reset(p json, p_now timestamptz) RETURNS json LANGUAGE plpgsql AS $$
DECLARE
  v_sid text := p->>'session';
  v_last bigint;
BEGIN
  PERFORM 1 FROM sessions WHERE session_id = v_sid AND owner = p->>'owner' FOR NO KEY UPDATE;
  IF NOT FOUND THEN
    RETURN json_build_object('err', 'not_found');
  END IF;
  IF EXISTS (SELECT 1 FROM inputs WHERE session_id = v_sid AND status = 'running') THEN
    RETURN json_build_object('err', 'conflict');
  END IF;
  UPDATE sessions SET team_state = NULL WHERE session_id = v_sid;
  DELETE FROM state_pieces WHERE session_id = v_sid;
  v_last := svc_allocate(v_sid, 1, p_now, NULL);
  PERFORM svc_insert_entries(v_sid, v_last, json_build_array(p->'entry'), NULL, p_now);
  RETURN json_build_object('seq', v_last, 'at', svc_us(p_now));
END $$;
