-- The durable log and the input queue (SQLite dialect; migrations/postgres/0001_initial.sql is its twin).
-- Times: created_at/updated_at are fixed-width ISO 8601 UTC strings with microseconds
-- ("2026-11-24T10:00:00.123456+00:00"), so they sort and compare as text; not_before and lease_expires_at are
-- unix seconds (REAL), compared with the store's clock in the claim and recovery queries.

CREATE TABLE sessions (
    session_id  TEXT PRIMARY KEY,
    owner       TEXT NOT NULL,
    team        TEXT NOT NULL,
    title       TEXT,
    status      TEXT NOT NULL DEFAULT 'idle'
                CHECK (status IN ('idle', 'queued', 'running', 'awaiting_input', 'failed')),
    last_seq    INTEGER NOT NULL DEFAULT 0,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
-- list_sessions: one owner's sessions (sorted by activity after the lookup). Not (owner, updated_at): every
-- append moves updated_at, and this index would then be rewritten on every message.
CREATE INDEX sessions_owner ON sessions (owner);

-- The team's state (AutoGen save_state, JSON), in its own table rather than a sessions column: SQLite rewrites a
-- whole row on UPDATE, and the session row is updated on every append while the state (the conversation so
-- far) grows to hundreds of KB. Measured with a 50 KB state: a session-row update went from ~10 us to ~75 us.
CREATE TABLE team_states (
    session_id TEXT PRIMARY KEY REFERENCES sessions (session_id) ON DELETE CASCADE,
    state      TEXT NOT NULL,
    updated_at TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE entries (
    session_id    TEXT NOT NULL REFERENCES sessions (session_id) ON DELETE CASCADE,
    seq           INTEGER NOT NULL,
    type          TEXT NOT NULL,
    source        TEXT NOT NULL,
    content       TEXT NOT NULL,           -- JSON
    run_id        TEXT,
    client_msg_id TEXT,
    metadata      TEXT NOT NULL DEFAULT '{}',  -- JSON object
    created_at    TEXT NOT NULL,
    PRIMARY KEY (session_id, seq)          -- paging (after/before) walks this key
) WITHOUT ROWID;
-- Enqueue idempotency: a client_msg_id is used once per session, and this holds across restarts.
CREATE UNIQUE INDEX entries_client_msg ON entries (session_id, client_msg_id) WHERE client_msg_id IS NOT NULL;

CREATE TABLE inputs (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,  -- queue order; AUTOINCREMENT: ids are never reused
    session_id       TEXT NOT NULL REFERENCES sessions (session_id) ON DELETE CASCADE,
    input_seq        INTEGER NOT NULL,    -- seq of the user's entry in the log
    content          TEXT NOT NULL,
    status           TEXT NOT NULL DEFAULT 'queued' CHECK (status IN ('queued', 'running', 'done')),
    attempt          INTEGER NOT NULL DEFAULT 1,
    not_before       REAL NOT NULL,       -- unix seconds: claimable from then (retry backoff)
    lease_token      TEXT,
    lease_expires_at REAL,                -- unix seconds
    worker_id        TEXT,
    run_id           TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    created_at       TEXT NOT NULL
);
-- The claim query walks queued inputs in id order (a partial index: done inputs, the vast majority over time,
-- are not in it) and checks each one's session for a running or older queued input (session_id, status, id).
-- That second index also serves the cascade from sessions (its leftmost column is the foreign key).
CREATE INDEX inputs_queued_order ON inputs (id, not_before) WHERE status = 'queued';
CREATE INDEX inputs_session_status ON inputs (session_id, status, id);
-- Lease recovery looks at running inputs only.
CREATE INDEX inputs_lease ON inputs (lease_expires_at) WHERE status = 'running';

CREATE TABLE cursors (
    session_id TEXT NOT NULL REFERENCES sessions (session_id) ON DELETE CASCADE,
    client_id  TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    PRIMARY KEY (session_id, client_id)
) WITHOUT ROWID;
