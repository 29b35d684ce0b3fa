-- Webhooks (README "Webhooks"): a session's own webhook URL and the durable outbox. The outbox row is written
-- by a trigger on entries, so it commits in the same transaction as the entry that makes the event, whichever
-- verb function appends it (rules.webhook_type is the same rule in Python). A session without its own URL uses
-- the server default of the instance that writes the entry: the connection setting svc.webhook_url, which every
-- connection of a PostgresStore gets from its constructor argument (empty or unset: none).
ALTER TABLE sessions ADD COLUMN webhook_url TEXT;

CREATE TABLE webhook_outbox (
    id               BIGSERIAL PRIMARY KEY,
    webhook_id       TEXT NOT NULL UNIQUE,
    session_id       TEXT NOT NULL REFERENCES sessions (session_id) ON DELETE CASCADE,
    url              TEXT NOT NULL,
    seq              BIGINT NOT NULL,
    type             TEXT NOT NULL,
    run_id           TEXT,
    input_seq        BIGINT,
    created_at       TIMESTAMPTZ NOT NULL,
    status           TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'failed')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_at          TIMESTAMPTZ NOT NULL DEFAULT '-infinity',
    lease_token      TEXT,
    lease_expires_at TIMESTAMPTZ
);
CREATE INDEX webhook_outbox_due ON webhook_outbox (next_at) WHERE status = 'pending';
CREATE INDEX webhook_outbox_session ON webhook_outbox (session_id);

CREATE FUNCTION svc_webhook_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE v_url text;
BEGIN
  IF NEW.type = 'run_failed' AND COALESCE(NEW.metadata->>'retrying', 'false') = 'true' THEN
    RETURN NULL;
  END IF;
  SELECT COALESCE(s.webhook_url, NULLIF(current_setting('svc.webhook_url', true), '')) INTO v_url
    FROM sessions s WHERE s.session_id = NEW.session_id;
  IF v_url IS NULL THEN
    RETURN NULL;
  END IF;
  INSERT INTO webhook_outbox (webhook_id, session_id, url, seq, type, run_id, input_seq, created_at)
  VALUES ('msg_' || md5(random()::text || clock_timestamp()::text || NEW.session_id || NEW.seq::text),
          NEW.session_id, v_url, NEW.seq,
          CASE NEW.type WHEN 'UserInputRequestedEvent' THEN 'awaiting_input' ELSE NEW.type END,
          NEW.run_id,
          COALESCE((NEW.metadata->>'input_seq')::bigint,
                   (SELECT input_seq FROM inputs WHERE session_id = NEW.session_id AND status = 'running'
                    ORDER BY id LIMIT 1),
                   (SELECT input_seq FROM inputs WHERE session_id = NEW.session_id AND run_id = NEW.run_id
                    ORDER BY id DESC LIMIT 1)),
          NEW.created_at);
  RETURN NULL;
END $$;

CREATE TRIGGER entries_webhook AFTER INSERT ON entries FOR EACH ROW
WHEN (NEW.type IN ('run_completed', 'run_cancelled', 'run_failed', 'UserInputRequestedEvent'))
EXECUTE FUNCTION svc_webhook_outbox();

-- Redefined from 0008 (its latest definition): the session's own webhook URL.
CREATE OR REPLACE FUNCTION svc_create_session(p json, p_now timestamptz) RETURNS json LANGUAGE sql AS $$
WITH made AS (
  INSERT INTO sessions (session_id, owner, team, title, status, last_seq, created_at, updated_at,
                        multitask_strategy, webhook_url)
  VALUES (p->>'session', p->>'owner', p->>'team', p->>'title', 'idle', 0, p_now, p_now,
          COALESCE(p->>'multitask_strategy', 'enqueue'), p->>'webhook_url')
  ON CONFLICT (session_id) DO NOTHING RETURNING session_id)
SELECT CASE WHEN EXISTS (SELECT 1 FROM made) THEN json_build_object('at', svc_us(p_now))
            ELSE json_build_object('err', 'conflict') END $$;
