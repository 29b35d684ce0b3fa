-- One lock order (README "Deploying on PostgreSQL"): every verb of a session takes the session row lock before
-- any other row of that session. svc_heartbeat (the run's input row) and svc_set_cursor (the cursor row) took
-- their row without it, so a batch holding [heartbeat, append] of one run and another batch cancelling that run
-- (session lock, then the input row) waited on each other: a deadlock PostgreSQL breaks after deadlock_timeout.
-- Same arguments and results as their definitions in 0005.

CREATE OR REPLACE FUNCTION svc_heartbeat(p json, p_now timestamptz) RETURNS json LANGUAGE plpgsql AS $$
BEGIN
  PERFORM 1 FROM sessions WHERE session_id = p->>'session' FOR NO KEY UPDATE;
  UPDATE inputs SET lease_expires_at = p_now + (p->>'lease_s')::float8 * interval '1 second'
  WHERE id = (p->>'input')::bigint AND lease_token = p->>'token' AND status = 'running';
  RETURN json_build_object('alive', FOUND);
END $$;

CREATE OR REPLACE FUNCTION svc_set_cursor(p json, p_now timestamptz) RETURNS json LANGUAGE plpgsql AS $$
DECLARE
  v_seq bigint;
BEGIN
  INSERT INTO cursors (session_id, client_id, seq)
  SELECT s.session_id, p->>'client', LEAST(GREATEST((p->>'seq')::bigint, 0), s.last_seq)
  FROM sessions s WHERE s.session_id = p->>'session'
  FOR NO KEY UPDATE OF s
  ON CONFLICT (session_id, client_id) DO UPDATE SET seq = GREATEST(cursors.seq, EXCLUDED.seq)
  RETURNING seq INTO v_seq;
  RETURN json_build_object('seq', COALESCE(v_seq, 0));
END $$;
