-- Storage v2 (README "Deploying on PostgreSQL"): every write verb of the PostgreSQL store is one SQL function
-- here, and svc_batch runs a whole group of them in ONE statement: one round trip, one transaction, one WAL
-- flush for every verb that was waiting (group commit, as the SQLite writer does).
--
-- One clock: every time is the database's (now(), the start of the batch's transaction) plus p_offset seconds,
-- which is 0 in production (tests move it to drive leases and backoff); never an instance's clock.
--
-- A verb that breaks a rule (lease lost, queue full, not found, conflict) returns {"err": ...} and writes
-- nothing; only unexpected errors raise, and then the store replays the batch one verb per statement, so a
-- failing verb fails alone. Names mirror service/queue/rules.py and the SQLite statements.

-- A time as integer microseconds since the epoch: exact (extract() is numeric), whatever the session TimeZone.
CREATE FUNCTION svc_us(ts timestamptz) RETURNS bigint LANGUAGE sql IMMUTABLE AS
$$ SELECT (extract(epoch FROM ts) * 1000000)::bigint $$;

-- Seq allocation: the caller holds the session row lock, so the n new seqs are contiguous.
CREATE FUNCTION svc_allocate(p_sid text, p_n bigint, p_now timestamptz, p_status text) RETURNS bigint
LANGUAGE sql AS $$
UPDATE sessions SET last_seq = last_seq + p_n, updated_at = p_now, status = COALESCE(p_status, status)
WHERE session_id = p_sid RETURNING last_seq $$;

-- Entries [{type, source, content, metadata}] numbered up to p_last. Content, metadata (and team states) come
-- as JSON text inside the call: ->> on a json value de-escapes every string in it, and a \u0000 (NUL, which
-- content may hold) cannot become text; JSON text in a string de-escapes to JSON text, which casts back.
CREATE FUNCTION svc_insert_entries(p_sid text, p_last bigint, p_entries json, p_run text, p_now timestamptz)
RETURNS void LANGUAGE sql AS $$
INSERT INTO entries (session_id, seq, type, source, content, run_id, client_msg_id, metadata, created_at)
SELECT p_sid, p_last - json_array_length(p_entries) + t.ord, t.e->>'type', t.e->>'source',
       (t.e->>'content')::json, p_run, NULL, COALESCE((t.e->>'metadata')::json, '{}'::json), p_now
FROM json_array_elements(p_entries) WITH ORDINALITY AS t(e, ord) $$;

-- CLAIMABLE (rules: one running input per session, FIFO, due): the session of the oldest claimable input,
-- locked; sessions another transaction holds are skipped, not waited for.
CREATE FUNCTION svc_pick(p_now timestamptz) RETURNS text LANGUAGE sql AS $$
SELECT s.session_id FROM inputs i JOIN sessions s ON s.session_id = i.session_id
WHERE i.status = 'queued' AND i.not_before <= p_now AND s.status NOT IN ('running', 'awaiting_input')
  AND NOT EXISTS (SELECT 1 FROM inputs r WHERE r.session_id = i.session_id AND r.status = 'running')
  AND NOT EXISTS (
    SELECT 1 FROM inputs o WHERE o.session_id = i.session_id AND o.status = 'queued' AND o.id < i.id)
ORDER BY i.id LIMIT 1
FOR NO KEY UPDATE OF s SKIP LOCKED $$;

CREATE FUNCTION svc_claimable(p_now timestamptz) RETURNS boolean LANGUAGE sql AS $$
SELECT EXISTS (
  SELECT 1 FROM inputs i
  WHERE i.status = 'queued' AND i.not_before <= p_now
    AND NOT EXISTS (SELECT 1 FROM inputs r WHERE r.session_id = i.session_id AND r.status = 'running')
    AND NOT EXISTS (
      SELECT 1 FROM inputs o WHERE o.session_id = i.session_id AND o.status = 'queued' AND o.id < i.id)) $$;

-- The lease fence: lock the session (every writer of a session's inputs holds it), then check that the input
-- still runs under this token.
CREATE FUNCTION svc_fenced(p json) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
  PERFORM 1 FROM sessions WHERE session_id = p->>'session' FOR NO KEY UPDATE;
  RETURN EXISTS (SELECT 1 FROM inputs WHERE id = (p->>'input')::bigint AND lease_token = p->>'token'
                 AND status = 'running');
END $$;

-- STATUS_AFTER_END: an input was just marked done; append its terminal entry, save the state when given.
CREATE FUNCTION svc_end(p_sid text, p_entry json, p_run text, p_state json, p_now timestamptz) RETURNS json
LANGUAGE plpgsql AS $$
DECLARE
  v_more boolean := EXISTS (SELECT 1 FROM inputs WHERE session_id = p_sid AND status = 'queued');
  v_last bigint;
BEGIN
  DELETE FROM drafts WHERE session_id = p_sid;  -- the run ended: its draft (if any) is in the log or gone
  v_last := svc_allocate(p_sid, 1, p_now, CASE WHEN v_more THEN 'queued'
                                               WHEN p_entry->>'type' = 'run_failed' THEN 'failed'
                                               ELSE 'idle' END);
  PERFORM svc_insert_entries(p_sid, v_last, json_build_array(p_entry), p_run, p_now);
  IF p_state IS NOT NULL THEN
    UPDATE sessions SET team_state = p_state WHERE session_id = p_sid;
  END IF;
  RETURN json_build_object('seq', v_last, 'at', svc_us(p_now), 'work', v_more);
END $$;

CREATE FUNCTION svc_enqueue(p json, p_now timestamptz) RETURNS json LANGUAGE plpgsql AS $$
DECLARE
  v_sid text := p->>'session';
  v_cmid text := p->>'client_msg_id';
  v_max bigint := (p->>'max_queued')::bigint;
  v_owner text;
  v_status text;
  v_seq bigint;
  v_queued bigint;
BEGIN
  SELECT owner, status INTO v_owner, v_status FROM sessions WHERE session_id = v_sid FOR NO KEY UPDATE;
  IF NOT FOUND THEN
    IF v_max IS NOT NULL AND v_max <= 0 THEN
      RETURN json_build_object('err', 'queue_full', 'queued', 0);
    END IF;
    INSERT INTO sessions (session_id, owner, team, title, status, last_seq, created_at, updated_at)
    VALUES (v_sid, p->>'owner', p->>'team', NULL, 'idle', 0, p_now, p_now) ON CONFLICT (session_id) DO NOTHING;
    SELECT owner, status INTO v_owner, v_status FROM sessions WHERE session_id = v_sid FOR NO KEY UPDATE;
  END IF;
  IF v_owner IS DISTINCT FROM p->>'owner' THEN
    RETURN json_build_object('err', 'not_found');
  END IF;
  IF v_cmid IS NOT NULL THEN
    SELECT seq INTO v_seq FROM entries WHERE session_id = v_sid AND client_msg_id = v_cmid;
    IF FOUND THEN
      RETURN json_build_object('dup', v_seq);
    END IF;
  END IF;
  IF v_max IS NOT NULL THEN
    SELECT count(*) INTO v_queued FROM inputs WHERE session_id = v_sid AND status = 'queued';
    IF v_queued >= v_max THEN
      RETURN json_build_object('err', 'queue_full', 'queued', v_queued);
    END IF;
  END IF;
  -- STATUS_AFTER_ENQUEUE
  v_seq := svc_allocate(v_sid, 1, p_now,
                        CASE WHEN v_status IN ('running', 'awaiting_input') THEN NULL ELSE 'queued' END);
  INSERT INTO entries (session_id, seq, type, source, content, run_id, client_msg_id, metadata, created_at)
  VALUES (v_sid, v_seq, 'TextMessage', 'user', (p->>'content')::json, NULL, v_cmid, '{}'::json, p_now);
  INSERT INTO inputs (session_id, input_seq, content, status, attempt, not_before, created_at)
  VALUES (v_sid, v_seq, (p->>'content')::json, 'queued', 1, p_now, p_now);
  RETURN json_build_object('seq', v_seq, 'at', svc_us(p_now));
END $$;

-- claim: pick and lock a session, re-check its head under the lock (the pick saw the statement's snapshot),
-- take it, and append its run_started (models.started) in the same transaction.
CREATE FUNCTION svc_claim(p json, p_now timestamptz) RETURNS json LANGUAGE plpgsql AS $$
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
    'at', svc_us(p_now), 'state', v_s.team_state);
END $$;

CREATE FUNCTION svc_append(p json, p_now timestamptz) RETURNS json LANGUAGE plpgsql AS $$
DECLARE
  v_n int := json_array_length(p->'entries');
  v_last bigint;
BEGIN
  IF NOT svc_fenced(p) THEN
    RETURN json_build_object('err', 'lease_lost');
  END IF;
  IF v_n = 0 THEN
    RETURN json_build_object('seq', NULL);
  END IF;
  v_last := svc_allocate(p->>'session', v_n, p_now,
                         CASE WHEN (p->>'asks')::boolean THEN 'awaiting_input' END);
  PERFORM svc_insert_entries(p->>'session', v_last, p->'entries', p->>'run', p_now);
  -- Drafts: the message a draft was streaming is now in the log (models.message_ids).
  IF json_array_length(COALESCE(p->'ids', '[]'::json)) > 0 THEN
    DELETE FROM drafts WHERE session_id = p->>'session'
      AND message_id IN (SELECT json_array_elements_text(p->'ids'));
  END IF;
  RETURN json_build_object('seq', v_last, 'at', svc_us(p_now));
END $$;

-- The text streamed so far of the run's in-flight message (README "Streaming"): one draft per session.
CREATE FUNCTION svc_save_draft(p json, p_now timestamptz) RETURNS json LANGUAGE plpgsql AS $$
BEGIN
  IF NOT svc_fenced(p) THEN
    RETURN json_build_object('err', 'lease_lost');
  END IF;
  INSERT INTO drafts (session_id, run_id, message_id, source, content, updated_at)
  VALUES (p->>'session', p->>'run', p->>'message', p->>'source', (p->>'content')::json, p_now)
  ON CONFLICT (session_id) DO UPDATE SET run_id = EXCLUDED.run_id, message_id = EXCLUDED.message_id,
    source = EXCLUDED.source, content = EXCLUDED.content, updated_at = EXCLUDED.updated_at;
  RETURN json_build_object('saved', true);
END $$;

CREATE FUNCTION svc_heartbeat(p json, p_now timestamptz) RETURNS json LANGUAGE sql AS $$
WITH beat AS (
  UPDATE inputs SET lease_expires_at = p_now + (p->>'lease_s')::float8 * interval '1 second'
  WHERE id = (p->>'input')::bigint AND lease_token = p->>'token' AND status = 'running' RETURNING id)
SELECT json_build_object('alive', EXISTS (SELECT 1 FROM beat)) $$;

-- Answers belong to their run (README "Guarantees"): the index-th answer bound to this input, else the
-- session's oldest queued input becomes it.
CREATE FUNCTION svc_take_answer(p json, p_now timestamptz) RETURNS json LANGUAGE plpgsql AS $$
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
    SELECT id, input_seq, content INTO v_row FROM inputs
    WHERE session_id = p->>'session' AND status = 'queued' ORDER BY id LIMIT 1;
    IF NOT FOUND THEN
      RETURN json_build_object('answer', NULL);
    END IF;
    UPDATE inputs SET status = 'done', answer_for = v_input WHERE id = v_row.id;
  END IF;
  UPDATE sessions SET status = 'running', updated_at = p_now WHERE session_id = p->>'session';
  RETURN json_build_object('answer', json_build_object('seq', v_row.input_seq, 'content', v_row.content));
END $$;

CREATE FUNCTION svc_finish(p json, p_now timestamptz) RETURNS json LANGUAGE plpgsql AS $$
BEGIN
  PERFORM 1 FROM sessions WHERE session_id = p->>'session' FOR NO KEY UPDATE;
  UPDATE inputs SET status = 'done', lease_token = NULL, lease_expires_at = NULL
  WHERE id = (p->>'input')::bigint AND lease_token = p->>'token' AND status = 'running';
  IF NOT FOUND THEN
    RETURN json_build_object('err', 'lease_lost');
  END IF;
  RETURN svc_end(p->>'session', p->'entry', p->>'run', (p->>'state')::json, p_now);
END $$;

-- retry, release and lease recovery: back to the queue, keeping its place, attempt + 1. Recovery ('expired')
-- only takes a lease that expired by the database's clock; at the interruption cap it ends the input instead
-- ('final'; models.interruption decides). A dead run's draft becomes its partial entry first (models.partial,
-- reason "interrupted"). An input asked to stop is never queued again: it ends with p->'cancelled'
-- (README "Guarantees": a cancel is never undone).
CREATE FUNCTION svc_requeue(p json, p_now timestamptz) RETURNS json LANGUAGE plpgsql AS $$
DECLARE
  v_sid text := p->>'session';
  v_expired boolean := COALESCE((p->>'expired')::boolean, false);
  v_final boolean := COALESCE((p->>'final')::boolean, false);
  v_in record;
  v_draft record;
  v_partial json := NULL;
  v_last bigint;
  v_done json;
BEGIN
  PERFORM 1 FROM sessions WHERE session_id = v_sid FOR NO KEY UPDATE;
  SELECT id, cancel_requested INTO v_in FROM inputs
  WHERE id = (p->>'input')::bigint AND lease_token = p->>'token' AND status = 'running'
    AND (NOT v_expired OR lease_expires_at < p_now) FOR UPDATE;
  IF NOT FOUND THEN
    RETURN json_build_object('err', 'lease_lost');
  END IF;
  IF v_expired THEN
    SELECT message_id, source, content INTO v_draft FROM drafts WHERE session_id = v_sid AND run_id = p->>'run';
    IF FOUND THEN
      v_partial := json_build_object('message_id', v_draft.message_id, 'source', v_draft.source,
                                     'content', v_draft.content);
      v_last := svc_allocate(v_sid, 1, p_now, NULL);
      PERFORM svc_insert_entries(v_sid, v_last, json_build_array(json_build_object(
        'type', 'TextMessage', 'source', v_draft.source, 'content', v_draft.content::text,
        'metadata', json_build_object('id', v_draft.message_id, 'partial', true,
                                      'partial_reason', 'interrupted')::text)), p->>'run', p_now);
    END IF;
  END IF;
  DELETE FROM drafts WHERE session_id = v_sid;
  IF v_final OR v_in.cancel_requested THEN
    UPDATE inputs SET status = 'done', lease_token = NULL, lease_expires_at = NULL WHERE id = v_in.id;
    IF v_final THEN
      v_done := svc_end(v_sid, p->'entry', p->>'run', NULL, p_now);
    ELSE
      v_last := svc_allocate(v_sid, 1, p_now, NULL);
      PERFORM svc_insert_entries(v_sid, v_last, json_build_array(p->'entry'), p->>'run', p_now);
      v_done := svc_end(v_sid, p->'cancelled', p->>'run', NULL, p_now);
    END IF;
    RETURN json_build_object('seq', v_done->'seq', 'at', v_done->'at', 'work', v_done->'work',
                             'partial', v_partial, 'cancelled', NOT v_final);
  END IF;
  UPDATE inputs SET status = 'queued', attempt = attempt + 1,
         failures = failures + (p->>'failed')::int, interruptions = interruptions + (p->>'interrupted')::int,
         not_before = p_now + (p->>'delay_s')::float8 * interval '1 second',
         lease_token = NULL, lease_expires_at = NULL, worker_id = NULL, cancel_requested = FALSE
  WHERE id = v_in.id;
  v_last := svc_allocate(v_sid, 1, p_now, 'queued');
  PERFORM svc_insert_entries(v_sid, v_last, json_build_array(p->'entry'), p->>'run', p_now);
  RETURN json_build_object('seq', v_last, 'at', svc_us(p_now), 'work', true, 'partial', v_partial,
                           'cancelled', false);
END $$;

-- request_cancel, after the store read the session's current run: re-checked under the session lock.
-- A running input is flagged; a pending retry (rules.is_run) is ended with the given run_cancelled.
CREATE FUNCTION svc_cancel(p json, p_now timestamptz) RETURNS json LANGUAGE plpgsql AS $$
DECLARE
  v_sid text := p->>'session';
  v_input bigint := (p->>'input')::bigint;
BEGIN
  PERFORM 1 FROM sessions WHERE session_id = v_sid AND owner = p->>'owner' FOR NO KEY UPDATE;
  IF NOT FOUND THEN
    RETURN json_build_object('err', 'not_found');
  END IF;
  IF p->>'status' = 'running' THEN
    UPDATE inputs SET cancel_requested = TRUE WHERE id = v_input AND status = 'running';
    IF NOT FOUND THEN
      RETURN json_build_object('err', 'changed');
    END IF;
    RETURN json_build_object('running', true);
  END IF;
  UPDATE inputs SET status = 'done' WHERE id = v_input AND status = 'queued' AND attempt = (p->>'attempt')::int
    AND NOT EXISTS (SELECT 1 FROM inputs r WHERE r.session_id = v_sid AND r.status = 'running')
    AND NOT EXISTS (SELECT 1 FROM inputs o WHERE o.session_id = v_sid AND o.status = 'queued' AND o.id < v_input);
  IF NOT FOUND THEN
    RETURN json_build_object('err', 'changed');
  END IF;
  RETURN svc_end(v_sid, p->'entry', p->>'run', NULL, p_now);
END $$;

CREATE FUNCTION svc_reset(p json, p_now timestamptz) RETURNS json LANGUAGE plpgsql AS $$
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
  v_last := svc_allocate(v_sid, 1, p_now, NULL);
  PERFORM svc_insert_entries(v_sid, v_last, json_build_array(p->'entry'), NULL, p_now);
  RETURN json_build_object('seq', v_last, 'at', svc_us(p_now));
END $$;

CREATE FUNCTION svc_create_session(p json, p_now timestamptz) RETURNS json LANGUAGE sql AS $$
WITH made AS (
  INSERT INTO sessions (session_id, owner, team, title, status, last_seq, created_at, updated_at)
  VALUES (p->>'session', p->>'owner', p->>'team', p->>'title', 'idle', 0, p_now, p_now)
  ON CONFLICT (session_id) DO NOTHING RETURNING session_id)
SELECT CASE WHEN EXISTS (SELECT 1 FROM made) THEN json_build_object('at', svc_us(p_now))
            ELSE json_build_object('err', 'conflict') END $$;

CREATE FUNCTION svc_delete_session(p json, p_now timestamptz) RETURNS json LANGUAGE sql AS $$
WITH gone AS (DELETE FROM sessions WHERE session_id = p->>'session' AND owner = p->>'owner' RETURNING 1)
SELECT json_build_object('deleted', EXISTS (SELECT 1 FROM gone)) $$;

-- Never backwards, clamped to [0, last_seq]; an unknown session stores nothing (no row to join).
CREATE FUNCTION svc_set_cursor(p json, p_now timestamptz) RETURNS json LANGUAGE sql AS $$
WITH stored AS (
  INSERT INTO cursors (session_id, client_id, seq)
  SELECT s.session_id, p->>'client', LEAST(GREATEST((p->>'seq')::bigint, 0), s.last_seq)
  FROM sessions s WHERE s.session_id = p->>'session'
  ON CONFLICT (session_id, client_id) DO UPDATE SET seq = GREATEST(cursors.seq, EXCLUDED.seq)
  RETURNING seq)
SELECT json_build_object('seq', COALESCE((SELECT seq FROM stored), 0)) $$;

-- One call per verb: {"op": name, ...arguments}; the answers in the same order.
CREATE FUNCTION svc_batch(p_calls json, p_offset float8) RETURNS json LANGUAGE plpgsql AS $$
DECLARE
  v_now timestamptz := now() + p_offset * interval '1 second';
  v_out json[] := '{}';
  v_call json;
BEGIN
  FOR v_call IN SELECT value FROM json_array_elements(p_calls) LOOP
    v_out := array_append(v_out, CASE v_call->>'op'
      WHEN 'enqueue' THEN svc_enqueue(v_call, v_now)
      WHEN 'claim' THEN svc_claim(v_call, v_now)
      WHEN 'append' THEN svc_append(v_call, v_now)
      WHEN 'save_draft' THEN svc_save_draft(v_call, v_now)
      WHEN 'heartbeat' THEN svc_heartbeat(v_call, v_now)
      WHEN 'take_answer' THEN svc_take_answer(v_call, v_now)
      WHEN 'finish' THEN svc_finish(v_call, v_now)
      WHEN 'requeue' THEN svc_requeue(v_call, v_now)
      WHEN 'cancel' THEN svc_cancel(v_call, v_now)
      WHEN 'reset' THEN svc_reset(v_call, v_now)
      WHEN 'create_session' THEN svc_create_session(v_call, v_now)
      WHEN 'delete_session' THEN svc_delete_session(v_call, v_now)
      WHEN 'set_cursor' THEN svc_set_cursor(v_call, v_now)
      WHEN 'claimable' THEN json_build_object('claimable', svc_claimable(v_now))
      END);
  END LOOP;
  RETURN array_to_json(v_out);
END $$;
