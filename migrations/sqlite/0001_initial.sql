-- The initial schema of the embedded store.

-- A deployment is immutable: registering a changed deployment adds a row; none is edited.
CREATE TABLE deployments (
    id            TEXT PRIMARY KEY,     -- dp_<uuidv7>, so ordering by id is ordering by age
    url           TEXT NOT NULL,
    protocol      TEXT NOT NULL,        -- 'sdk'
    services      TEXT NOT NULL,        -- the declared services, as JSON
    created_at_ms INTEGER NOT NULL
);
CREATE INDEX deployments_by_url ON deployments (url, id);

-- One row per handler of a deployment, to find the newest deployment serving a handler.
CREATE TABLE handlers (
    deployment_id TEXT NOT NULL REFERENCES deployments (id),
    service       TEXT NOT NULL,
    handler       TEXT NOT NULL,
    spec          TEXT NOT NULL,        -- the handler's declaration (path, retry policy, timeout), as JSON
    PRIMARY KEY (deployment_id, service, handler)
);
CREATE INDEX handlers_by_name ON handlers (service, handler, deployment_id);

CREATE TABLE invocations (
    id                TEXT PRIMARY KEY, -- inv_<uuidv7>
    service           TEXT NOT NULL,
    handler           TEXT NOT NULL,
    deployment_id     TEXT NOT NULL REFERENCES deployments (id),
    status            TEXT NOT NULL,
    attempt           INTEGER NOT NULL, -- the fencing token: only this attempt may write
    failures          INTEGER NOT NULL, -- handler-level failed attempts
    position_failures INTEGER NOT NULL, -- failed attempts since the journal last grew
    journal_len       INTEGER NOT NULL, -- the next free journal index
    next_run_at_ms    INTEGER,          -- when the next attempt is due, if one is scheduled
    last_error        TEXT,
    failure           TEXT,             -- the final failure, as JSON
    idempotency_key   TEXT,
    created_at_ms     INTEGER NOT NULL,
    modified_at_ms    INTEGER NOT NULL,
    completed_at_ms   INTEGER
);
-- Start-up recovery reads the invocations that are not final; keep that scan small.
CREATE INDEX invocations_unfinished ON invocations (status)
    WHERE status NOT IN ('completed', 'failed', 'cancelled');

CREATE TABLE journal (
    invocation_id TEXT NOT NULL,
    idx           INTEGER NOT NULL,
    kind          TEXT NOT NULL,
    name          TEXT,
    value         BLOB,
    content_type  TEXT,
    failure       TEXT,                 -- a step's or the invocation's failure, as JSON
    attempt       INTEGER NOT NULL,
    at_ms         INTEGER NOT NULL,
    PRIMARY KEY (invocation_id, idx)
) WITHOUT ROWID;

-- (scope, key) names at most one invocation until the key expires.
CREATE TABLE idempotency_keys (
    scope          TEXT NOT NULL,       -- service/handler
    key            TEXT NOT NULL,
    request_digest TEXT NOT NULL,
    invocation_id  TEXT NOT NULL,
    expires_at_ms  INTEGER NOT NULL,
    PRIMARY KEY (scope, key)
) WITHOUT ROWID;
CREATE INDEX idempotency_keys_by_expiry ON idempotency_keys (expires_at_ms);
