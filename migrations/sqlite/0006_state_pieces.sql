-- Team state in pieces (service/queue/state_pieces.py): team_states.state keeps a small head (the state with its
-- growing lists emptied, plus a manifest of them); each item of a growing list (an agent's llm_context message, a
-- manager's message_thread message) is a row here, written once. A turn then writes what it added, not the whole
-- state again. States saved before this migration stay whole in team_states (no manifest): they load as they
-- are and the next save splits them.
CREATE TABLE state_pieces (
    session_id TEXT NOT NULL REFERENCES sessions (session_id) ON DELETE CASCADE,
    path       TEXT NOT NULL,    -- JSON array of the keys leading to the list
    idx        INTEGER NOT NULL, -- position in the list, from 0
    body       TEXT NOT NULL,    -- the item's JSON text
    PRIMARY KEY (session_id, path, idx)
) WITHOUT ROWID;
