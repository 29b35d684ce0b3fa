-- Speed (README "Deploying on PostgreSQL"): three costs every verb paid per statement, found by measuring the
-- database's own CPU per input on the queue benchmark (bench/queue.py: ~480 us before this migration).
--
-- 1. CHECK constraints on the status columns. PostgreSQL reads a CHECK's stored expression back from its text
--    form and compiles it for every INSERT or UPDATE statement it executes (once per statement, not per
--    plan), and a verb runs several: ~13% of the CPU. The statuses a row can take are written by the svc_
--    functions only (the engine is the only writer; service/queue/rules.py names them) and the contract suite
--    checks every transition on every backend, so the constraints go.
-- 2. Indexes on sessions.updated_at. Every verb moves updated_at, so every UPDATE of a session row (four per
--    input) had to insert into three indexes instead of being a heap-only (HOT) update. An owner's listing now
--    uses an index on owner alone and sorts that owner's sessions; the catch-up after a lost LISTEN connection
--    and the retention sweep read the sessions table (both rare). Half-full pages leave room for HOT updates.
--    ~8%.
-- 3. Foreign keys to sessions. Each inserted entry, input, cursor, draft, state piece and outbox row ran a
--    referential check (a query that locks the session row again) although every verb has locked that session
--    row first (migration 0012), so no row can be written for a session that is not there. ~9%. What the
--    foreign keys also did, deleting a session's rows with it, is now one statement trigger on sessions.
--
-- Together with 4-6 below: ~480 -> ~330 us of database CPU per input. Same tables, same answers.

ALTER TABLE sessions DROP CONSTRAINT IF EXISTS sessions_status_check;
ALTER TABLE inputs DROP CONSTRAINT IF EXISTS inputs_status_check;

DROP INDEX IF EXISTS sessions_owner_recent;
DROP INDEX IF EXISTS sessions_recent;
-- list_sessions: an owner's sessions (sorted by updated_at after the index finds them).
CREATE INDEX sessions_owner ON sessions (owner);
ALTER TABLE sessions SET (fillfactor = 50);

ALTER TABLE entries DROP CONSTRAINT IF EXISTS entries_session_id_fkey;
ALTER TABLE inputs DROP CONSTRAINT IF EXISTS inputs_session_id_fkey;
ALTER TABLE cursors DROP CONSTRAINT IF EXISTS cursors_session_id_fkey;
ALTER TABLE drafts DROP CONSTRAINT IF EXISTS drafts_session_id_fkey;
ALTER TABLE state_pieces DROP CONSTRAINT IF EXISTS state_pieces_session_id_fkey;
ALTER TABLE webhook_outbox DROP CONSTRAINT IF EXISTS webhook_outbox_session_id_fkey;

-- A deleted session's rows go with it (what ON DELETE CASCADE did): one statement per table for however many
-- sessions one DELETE removed (svc_delete_session, the retention sweep). Each table has an index led by
-- session_id. Inputs referring to a deleted input (answer_for) are among the session's own inputs. Unlike the
-- foreign keys, nothing stops a TRUNCATE of sessions alone (the service never truncates): truncate every table.
CREATE FUNCTION svc_forget_sessions() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  DELETE FROM entries e USING gone g WHERE e.session_id = g.session_id;
  DELETE FROM inputs i USING gone g WHERE i.session_id = g.session_id;
  DELETE FROM cursors c USING gone g WHERE c.session_id = g.session_id;
  DELETE FROM drafts d USING gone g WHERE d.session_id = g.session_id;
  DELETE FROM state_pieces p USING gone g WHERE p.session_id = g.session_id;
  DELETE FROM webhook_outbox o USING gone g WHERE o.session_id = g.session_id;
  RETURN NULL;
END $$;

CREATE TRIGGER sessions_forget AFTER DELETE ON sessions REFERENCING OLD TABLE AS gone
FOR EACH STATEMENT EXECUTE FUNCTION svc_forget_sessions();

-- 4. svc_us was declared IMMUTABLE over extract(), which is STABLE for timestamptz, so PostgreSQL could not
--    inline it and called it as a function in every verb's answer. STABLE, it is inlined (~3%).
CREATE OR REPLACE FUNCTION svc_us(ts timestamptz) RETURNS bigint LANGUAGE sql STABLE AS
$$ SELECT (extract(epoch FROM ts) * 1000000)::bigint $$;

-- 5. svc_end inserts its one terminal entry itself instead of building a one-item JSON array for
--    svc_insert_entries to take apart. Otherwise as in 0011.
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
  INSERT INTO entries (session_id, seq, type, source, content, run_id, client_msg_id, metadata, created_at)
  VALUES (p_sid, v_last, p_entry->>'type', p_entry->>'source', (p_entry->>'content')::json, p_run, NULL,
          COALESCE((p_entry->>'metadata')::json, '{}'::json), p_now);
  RETURN json_build_object('seq', v_last, 'at', svc_us(p_now), 'work', v_more);
END $$;

-- 6. The webhook trigger's WHEN clause (0010) is read back from its stored text and compiled for every INSERT
--    statement on entries (four per input), and its list of types made that the costliest part of an entry
--    insert: ~10% of the CPU per input. The same condition (rules.webhook_type's types) as a function call is a
--    short expression to read back; the function is PL/pgSQL, so it is called, not re-parsed. Same rows.
CREATE FUNCTION svc_webhook_type(p_type text) RETURNS boolean LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
  RETURN p_type IN ('run_completed', 'run_cancelled', 'run_failed', 'UserInputRequestedEvent');
END $$;

DROP TRIGGER entries_webhook ON entries;
CREATE TRIGGER entries_webhook AFTER INSERT ON entries FOR EACH ROW WHEN (svc_webhook_type(NEW.type))
EXECUTE FUNCTION svc_webhook_outbox();
