-- The text streamed so far of a message not yet in the log (README "Streaming"): at most one per session, written
-- at most every draft_interval_s while the message streams. It lets readers of other instances resume mid-message
-- and, after a crash, becomes a durable partial entry. Appending the message itself (same id) deletes it.
CREATE TABLE drafts (
    session_id TEXT PRIMARY KEY REFERENCES sessions (session_id) ON DELETE CASCADE,
    run_id     TEXT NOT NULL,
    message_id TEXT NOT NULL,
    source     TEXT NOT NULL,
    content    TEXT NOT NULL,
    updated_at TEXT NOT NULL
) WITHOUT ROWID;
