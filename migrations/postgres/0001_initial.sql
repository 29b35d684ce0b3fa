-- The durable log and queue (PostgreSQL). Same tables, columns and meaning as migrations/sqlite/0001_initial.sql.
-- Times are timestamptz written from the service's clock (never now()), so tests on a fake clock behave alike.
-- Message bodies are JSON, not JSONB: JSONB (like TEXT) cannot hold a NUL character, which a user or a model may
-- well send, and it reorders object keys; JSON keeps the text as written (as SQLite does). Nothing queries into it.

CREATE TABLE sessions (
    session_id  TEXT PRIMARY KEY,
    owner       TEXT NOT NULL,
    team        TEXT NOT NULL,
    title       TEXT,
    status      TEXT NOT NULL DEFAULT 'idle'
                CHECK (status IN ('idle', 'queued', 'running', 'awaiting_input', 'failed')),
    -- Seq allocation: UPDATE ... SET last_seq = last_seq + n RETURNING last_seq; the row lock serialises the
    -- writers of one session, so seqs are contiguous whatever the concurrency.
    last_seq    BIGINT NOT NULL DEFAULT 0,
    team_state  JSON,
    created_at  TIMESTAMPTZ NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL
);
-- list_sessions: an owner's sessions, most recent activity first.
CREATE INDEX sessions_owner_recent ON sessions (owner, updated_at DESC, session_id);
-- After a lost LISTEN connection: the sessions written since it was lost.
CREATE INDEX sessions_recent ON sessions (updated_at);

CREATE TABLE entries (
    session_id     TEXT NOT NULL REFERENCES sessions (session_id) ON DELETE CASCADE,
    seq            BIGINT NOT NULL,
    type           TEXT NOT NULL,
    source         TEXT NOT NULL,
    content        JSON,
    run_id         TEXT,
    client_msg_id  TEXT,
    metadata       JSON NOT NULL DEFAULT '{}'::json,
    created_at     TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (session_id, seq)
);
-- Idempotent enqueue: a client_msg_id is used once per session.
CREATE UNIQUE INDEX entries_client_msg ON entries (session_id, client_msg_id) WHERE client_msg_id IS NOT NULL;

CREATE TABLE inputs (
    id                BIGSERIAL PRIMARY KEY,
    session_id        TEXT NOT NULL REFERENCES sessions (session_id) ON DELETE CASCADE,
    input_seq         BIGINT NOT NULL,
    content           JSON NOT NULL,  -- a JSON string: TEXT cannot hold NUL
    status            TEXT NOT NULL DEFAULT 'queued' CHECK (status IN ('queued', 'running', 'done')),
    attempt           INTEGER NOT NULL DEFAULT 1,
    not_before        TIMESTAMPTZ NOT NULL,
    lease_token       TEXT,
    lease_expires_at  TIMESTAMPTZ,
    worker_id         TEXT,
    run_id            TEXT,
    cancel_requested  BOOLEAN NOT NULL DEFAULT FALSE,
    created_at        TIMESTAMPTZ NOT NULL
);
-- claim: the oldest queued inputs (candidates), then per-session checks (an older queued one, a running one).
CREATE INDEX inputs_queued ON inputs (id) WHERE status = 'queued';
CREATE INDEX inputs_session_active ON inputs (session_id, id) WHERE status IN ('queued', 'running');
-- recover_expired: running inputs by lease expiry.
CREATE INDEX inputs_running_lease ON inputs (lease_expires_at) WHERE status = 'running';
-- Deleting a session cascades here; without an index on the foreign key each delete scans the table.
CREATE INDEX inputs_session ON inputs (session_id);

CREATE TABLE cursors (
    session_id  TEXT NOT NULL REFERENCES sessions (session_id) ON DELETE CASCADE,
    client_id   TEXT NOT NULL,
    seq         BIGINT NOT NULL,
    PRIMARY KEY (session_id, client_id)
);
