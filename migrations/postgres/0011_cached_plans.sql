-- Speed (README "Deploying on PostgreSQL"): the helpers every verb calls become PL/pgSQL, whose statements are
-- planned once per connection and then reused. As LANGUAGE sql functions that cannot be inlined (they write, or
-- lock), PostgreSQL 15 parsed and planned them again at every call: measured on the queue benchmark,
-- svc_insert_entries went from 184 to 75 microseconds a call. svc_end also saves the team state in the same
-- UPDATE that allocates its seq (one UPDATE of the session row, not two). Same arguments, same results as the
-- definitions they replace (svc_allocate, svc_insert_entries, svc_pick from 0005; svc_end from 0005).

CREATE OR REPLACE FUNCTION svc_allocate(p_sid text, p_n bigint, p_now timestamptz, p_status text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
  v_last bigint;
BEGIN
  UPDATE sessions SET last_seq = last_seq + p_n, updated_at = p_now, status = COALESCE(p_status, status)
  WHERE session_id = p_sid RETURNING last_seq INTO v_last;
  RETURN v_last;
END $$;

CREATE OR REPLACE FUNCTION svc_insert_entries(p_sid text, p_last bigint, p_entries json, p_run text,
                                              p_now timestamptz) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO entries (session_id, seq, type, source, content, run_id, client_msg_id, metadata, created_at)
  SELECT p_sid, p_last - json_array_length(p_entries) + t.ord, t.e->>'type', t.e->>'source',
         (t.e->>'content')::json, p_run, NULL, COALESCE((t.e->>'metadata')::json, '{}'::json), p_now
  FROM json_array_elements(p_entries) WITH ORDINALITY AS t(e, ord);
END $$;

CREATE OR REPLACE FUNCTION svc_pick(p_now timestamptz) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
  v_sid text;
BEGIN
  SELECT s.session_id INTO v_sid FROM inputs i JOIN sessions s ON s.session_id = i.session_id
  WHERE i.status = 'queued' AND i.not_before <= p_now AND s.status NOT IN ('running', 'awaiting_input')
    AND NOT EXISTS (SELECT 1 FROM inputs r WHERE r.session_id = i.session_id AND r.status = 'running')
    AND NOT EXISTS (
      SELECT 1 FROM inputs o WHERE o.session_id = i.session_id AND o.status = 'queued' AND o.id < i.id)
  ORDER BY i.id LIMIT 1
  FOR NO KEY UPDATE OF s SKIP LOCKED;
  RETURN v_sid;
END $$;

CREATE OR REPLACE FUNCTION svc_end(p_sid text, p_entry json, p_run text, p_state json, p_now timestamptz)
RETURNS json LANGUAGE plpgsql AS $$
DECLARE
  v_more boolean := EXISTS (SELECT 1 FROM inputs WHERE session_id = p_sid AND status = 'queued');
  v_last bigint;
BEGIN
  DELETE FROM drafts WHERE session_id = p_sid;  -- the run ended: its draft (if any) is in the log or gone
  UPDATE sessions SET last_seq = last_seq + 1, updated_at = p_now,
         status = CASE WHEN v_more THEN 'queued' WHEN p_entry->>'type' = 'run_failed' THEN 'failed' ELSE 'idle' END,
         team_state = COALESCE(p_state, team_state)
  WHERE session_id = p_sid RETURNING last_seq INTO v_last;
  PERFORM svc_insert_entries(p_sid, v_last, json_build_array(p_entry), p_run, p_now);
  RETURN json_build_object('seq', v_last, 'at', svc_us(p_now), 'work', v_more);
END $$;
