-- The schema of the PostgreSQL store: the tables of the SQLite store (migrations/sqlite/,
-- 0001 to 0015) in one step, with PostgreSQL's types. Times are milliseconds since the
-- epoch (BIGINT); JSON documents are TEXT, as in SQLite; values are BYTEA.

-- A deployment is immutable: registering a changed deployment adds a row; none is edited.
CREATE TABLE deployments (
    id            TEXT PRIMARY KEY,     -- dp_<uuidv7>, so ordering by id is ordering by age
    url           TEXT NOT NULL,
    protocol      TEXT NOT NULL,
    services      TEXT NOT NULL,        -- the declared services, as JSON
    created_at_ms BIGINT NOT NULL
);
CREATE INDEX deployments_by_url ON deployments (url, id);

-- One row per handler of a deployment, to find the newest deployment serving a handler.
CREATE TABLE handlers (
    deployment_id TEXT NOT NULL REFERENCES deployments (id),
    service       TEXT NOT NULL,
    handler       TEXT NOT NULL,
    spec          TEXT NOT NULL,        -- the handler's declaration, as JSON
    PRIMARY KEY (deployment_id, service, handler)
);
CREATE INDEX handlers_by_name ON handlers (service, handler, deployment_id);

CREATE TABLE invocations (
    id                     TEXT PRIMARY KEY, -- inv_<uuidv7>
    service                TEXT NOT NULL,
    handler                TEXT NOT NULL,
    deployment_id          TEXT NOT NULL REFERENCES deployments (id),
    status                 TEXT NOT NULL,
    attempt                BIGINT NOT NULL,  -- the fencing token: only this attempt may write
    failures               BIGINT NOT NULL,  -- handler-level failed attempts
    position_failures      BIGINT NOT NULL,  -- failed attempts since the journal last grew
    journal_len            BIGINT NOT NULL,  -- the next free journal index
    next_run_at_ms         BIGINT,           -- when the next attempt is due
    last_error             TEXT,
    failure                TEXT,             -- the final failure, as JSON
    idempotency_key        TEXT,
    created_at_ms          BIGINT NOT NULL,
    modified_at_ms         BIGINT NOT NULL,
    completed_at_ms        BIGINT,
    attempt_token          TEXT,             -- the running attempt's secret
    waiting_for            TEXT,             -- journal indexes a suspension waits for (JSON)
    workflow_id            TEXT,
    journal_bytes          BIGINT NOT NULL DEFAULT 0,
    cancel_requested_at_ms BIGINT,
    parent_invocation_id   TEXT,
    parent_index           BIGINT,
    deadline_ms            BIGINT,
    scheduled_at_ms        BIGINT,
    heartbeat_at_ms        BIGINT,
    heartbeat_details      BYTEA,
    parent_close           TEXT,
    attempt_started_at_ms  BIGINT,
    traceparent            TEXT,
    restart_key            TEXT
);
CREATE INDEX invocations_unfinished ON invocations (status)
    WHERE status NOT IN ('completed', 'failed', 'cancelled', 'terminated', 'continued');
CREATE INDEX invocations_due ON invocations (next_run_at_ms) WHERE next_run_at_ms IS NOT NULL;
CREATE INDEX invocations_ended ON invocations (completed_at_ms) WHERE completed_at_ms IS NOT NULL;
CREATE INDEX invocations_children ON invocations (parent_invocation_id)
    WHERE parent_invocation_id IS NOT NULL;
CREATE INDEX invocations_runs ON invocations (service, workflow_id, id)
    WHERE workflow_id IS NOT NULL;
CREATE INDEX invocations_deadlines ON invocations (deadline_ms)
    WHERE deadline_ms IS NOT NULL AND completed_at_ms IS NULL;

CREATE TABLE journal (
    invocation_id TEXT NOT NULL,
    idx           BIGINT NOT NULL,
    kind          TEXT NOT NULL,
    name          TEXT,
    value         BYTEA,
    content_type  TEXT,
    failure       TEXT,                 -- a step's or the invocation's failure, as JSON
    attempt       BIGINT NOT NULL,
    at_ms         BIGINT NOT NULL,
    PRIMARY KEY (invocation_id, idx)
);

-- (scope, key) names at most one invocation until the key expires.
CREATE TABLE idempotency_keys (
    scope          TEXT NOT NULL,       -- service/handler
    key            TEXT NOT NULL,
    request_digest TEXT NOT NULL,
    invocation_id  TEXT NOT NULL,
    expires_at_ms  BIGINT NOT NULL,
    retention_ms   BIGINT,
    PRIMARY KEY (scope, key)
);
CREATE INDEX idempotency_keys_by_expiry ON idempotency_keys (expires_at_ms);
CREATE INDEX idempotency_keys_by_invocation ON idempotency_keys (invocation_id);

-- The result of a command, keyed by the command's journal entry. Written once.
CREATE TABLE completions (
    invocation_id TEXT NOT NULL,
    idx           BIGINT NOT NULL,
    seq           BIGINT NOT NULL,      -- order of arrival within the invocation, from 1
    value         BYTEA,
    failure       TEXT,
    at_ms         BIGINT NOT NULL,
    PRIMARY KEY (invocation_id, idx)
);

-- Timers that have not fired.
CREATE TABLE timers (
    invocation_id TEXT NOT NULL,
    idx           BIGINT NOT NULL,
    wake_at_ms    BIGINT NOT NULL,
    PRIMARY KEY (invocation_id, idx)
);

-- Signals sent to an invocation, in order; buffered while consumed_by IS NULL.
CREATE TABLE signals (
    invocation_id   TEXT NOT NULL,
    seq             BIGINT NOT NULL,
    name            TEXT NOT NULL,
    value           BYTEA,
    idempotency_key TEXT,
    consumed_by     BIGINT,
    at_ms           BIGINT NOT NULL,
    PRIMARY KEY (invocation_id, seq)
);
CREATE INDEX signals_buffered ON signals (invocation_id, name, seq) WHERE consumed_by IS NULL;
CREATE UNIQUE INDEX signals_by_key ON signals (invocation_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- Durable state; a cleared key stays with a NULL value.
CREATE TABLE state (
    invocation_id TEXT NOT NULL,
    key           TEXT NOT NULL,
    value         BYTEA,
    PRIMARY KEY (invocation_id, key)
);

-- A workflow id names its latest run.
CREATE TABLE workflows (
    workflow      TEXT NOT NULL,
    workflow_id   TEXT NOT NULL,
    invocation_id TEXT NOT NULL,
    input_digest  TEXT NOT NULL,
    PRIMARY KEY (workflow, workflow_id)
);

-- Secrets of this gateway, made at first start and shared by every node.
CREATE TABLE gateway_secrets (
    name   TEXT PRIMARY KEY,
    secret BYTEA NOT NULL
);

-- Updates sent to a workflow's run.
CREATE TABLE updates (
    invocation_id   TEXT NOT NULL,
    id              TEXT NOT NULL,
    name            TEXT NOT NULL,
    input           BYTEA NOT NULL,
    idempotency_key TEXT,
    status          TEXT NOT NULL,
    result          BYTEA,
    failure         TEXT,
    created_at_ms   BIGINT NOT NULL,
    PRIMARY KEY (invocation_id, id)
);
CREATE UNIQUE INDEX updates_by_key ON updates (invocation_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX updates_pending ON updates (invocation_id, created_at_ms)
    WHERE status = 'pending';
