-- Updates sent to a workflow's run: pending until the run's SDK refuses one (nothing is
-- journaled) or accepts it (an `update` entry), then done with its result (an
-- `update_result` entry); abandoned when the run ends first.
CREATE TABLE updates (
    invocation_id   TEXT NOT NULL,
    id              TEXT NOT NULL,      -- upd_ + 32 hex digits
    name            TEXT NOT NULL,
    input           BLOB NOT NULL,      -- JSON
    idempotency_key TEXT,
    status          TEXT NOT NULL,      -- pending, accepted, done, refused, abandoned
    result          BLOB,               -- JSON, when done
    failure         TEXT,               -- JSON, when refused or failed
    created_at_ms   INTEGER NOT NULL,
    PRIMARY KEY (invocation_id, id)
) WITHOUT ROWID;
CREATE UNIQUE INDEX updates_by_key ON updates (invocation_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX updates_pending ON updates (invocation_id, created_at_ms)
    WHERE status = 'pending';
