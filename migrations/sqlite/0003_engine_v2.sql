-- Engine v2: one scheduler over due times, commands and their completions, signals,
-- durable state, workflows.

-- The scheduler claims invocations whose next_run_at_ms has passed. The column is set only
-- while an invocation waits to run (pending, backing-off, suspended on a timer or woken by
-- a completion) and cleared when an attempt starts, so this index holds only waiting work.
CREATE INDEX invocations_due ON invocations (next_run_at_ms) WHERE next_run_at_ms IS NOT NULL;

-- The journal indexes a suspended attempt waits for (a JSON array); a completion of one of
-- them makes the invocation due.
ALTER TABLE invocations ADD COLUMN waiting_for TEXT;
-- The workflow id of a run of a workflow service; NULL for a plain service call.
ALTER TABLE invocations ADD COLUMN workflow_id TEXT;

-- The result of a command (a timer fired, a signal received, an awakeable resolved),
-- keyed by the command's journal entry. Written once, never changed.
CREATE TABLE completions (
    invocation_id TEXT NOT NULL,
    idx           INTEGER NOT NULL,     -- the command's journal index
    seq           INTEGER NOT NULL,     -- order of arrival within the invocation, from 1
    value         BLOB,
    failure       TEXT,                 -- a rejection, as JSON
    at_ms         INTEGER NOT NULL,
    PRIMARY KEY (invocation_id, idx)
) WITHOUT ROWID;

-- Timers that have not fired. A row goes away when its completion is written.
CREATE TABLE timers (
    invocation_id TEXT NOT NULL,
    idx           INTEGER NOT NULL,
    wake_at_ms    INTEGER NOT NULL,
    PRIMARY KEY (invocation_id, idx)
) WITHOUT ROWID;

-- Signals sent to an invocation, in order. A signal no wait has taken yet is buffered
-- (consumed_by IS NULL); a wait takes the oldest one of its name.
CREATE TABLE signals (
    invocation_id   TEXT NOT NULL,
    seq             INTEGER NOT NULL,   -- order of arrival within the invocation, from 1
    name            TEXT NOT NULL,
    value           BLOB,
    idempotency_key TEXT,
    consumed_by     INTEGER,            -- the journal index of the wait that took it
    at_ms           INTEGER NOT NULL,
    PRIMARY KEY (invocation_id, seq)
) WITHOUT ROWID;
CREATE INDEX signals_buffered ON signals (invocation_id, name, seq) WHERE consumed_by IS NULL;
CREATE UNIQUE INDEX signals_by_key ON signals (invocation_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- Durable state of an invocation, as its `state` entries left it; queries read it. A
-- cleared key stays with a NULL value, so that queries still know its name.
CREATE TABLE state (
    invocation_id TEXT NOT NULL,
    key           TEXT NOT NULL,
    value         BLOB,
    PRIMARY KEY (invocation_id, key)
) WITHOUT ROWID;

-- A workflow id names its latest run.
CREATE TABLE workflows (
    workflow      TEXT NOT NULL,        -- the workflow service
    workflow_id   TEXT NOT NULL,
    invocation_id TEXT NOT NULL,
    input_digest  TEXT NOT NULL,
    PRIMARY KEY (workflow, workflow_id)
) WITHOUT ROWID;

-- Secrets of this gateway (the key that signs awakeable tokens), made at first start.
CREATE TABLE gateway_secrets (
    name   TEXT PRIMARY KEY,
    secret BLOB NOT NULL
);
