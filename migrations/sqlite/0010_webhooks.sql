-- Webhooks (README "Webhooks"): a session's own webhook URL, the server's default URL (one row, written by the
-- store at open from its constructor argument: SQLite has one service process per file), and the durable
-- outbox. The outbox row is written by a trigger on entries, so it commits in the same transaction as the
-- entry that makes the event, whichever verb appends it (rules.webhook_type is the same rule in Python).
ALTER TABLE sessions ADD COLUMN webhook_url TEXT;

CREATE TABLE webhook_default (
    id  INTEGER PRIMARY KEY CHECK (id = 1),
    url TEXT
);

CREATE TABLE webhook_outbox (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    webhook_id       TEXT NOT NULL UNIQUE,     -- the webhook-id header, the same on every attempt
    session_id       TEXT NOT NULL REFERENCES sessions (session_id) ON DELETE CASCADE,
    url              TEXT NOT NULL,
    seq              INTEGER NOT NULL,
    type             TEXT NOT NULL,
    run_id           TEXT,
    input_seq        INTEGER,
    created_at       TEXT NOT NULL,            -- the entry's
    status           TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'failed')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_at          REAL NOT NULL DEFAULT 0,  -- unix seconds: due from then (backoff)
    lease_token      TEXT,
    lease_expires_at REAL                      -- unix seconds
);
CREATE INDEX webhook_outbox_due ON webhook_outbox (next_at) WHERE status = 'pending';
CREATE INDEX webhook_outbox_session ON webhook_outbox (session_id);

CREATE TRIGGER entries_webhook AFTER INSERT ON entries
WHEN NEW.type IN ('run_completed', 'run_cancelled', 'run_failed', 'UserInputRequestedEvent')
 AND (NEW.type <> 'run_failed' OR COALESCE(json_extract(NEW.metadata, '$.retrying'), 0) <> 1)
BEGIN
  INSERT INTO webhook_outbox (webhook_id, session_id, url, seq, type, run_id, input_seq, created_at)
  SELECT 'msg_' || lower(hex(randomblob(16))), NEW.session_id, u.url, NEW.seq,
         CASE NEW.type WHEN 'UserInputRequestedEvent' THEN 'awaiting_input' ELSE NEW.type END,
         NEW.run_id,
         COALESCE(json_extract(NEW.metadata, '$.input_seq'),
                  (SELECT input_seq FROM inputs WHERE session_id = NEW.session_id AND status = 'running'
                   ORDER BY id LIMIT 1),
                  (SELECT input_seq FROM inputs WHERE session_id = NEW.session_id AND run_id = NEW.run_id
                   ORDER BY id DESC LIMIT 1)),
         NEW.created_at
  FROM (SELECT COALESCE((SELECT webhook_url FROM sessions WHERE session_id = NEW.session_id),
                        (SELECT url FROM webhook_default WHERE id = 1)) AS url) AS u
  WHERE u.url IS NOT NULL;
END;
