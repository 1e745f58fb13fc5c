-- Keyed handlers: an invocation's key (scoped by its service), how many of its key may
-- run at once, and its place in the key's queue (arrival order). A 'queued' invocation
-- waits for a holder of its key to end: no due time, never claimed. A shared (read-only)
-- handler's invocation has its key with key_limit 0: it neither holds nor waits.
ALTER TABLE invocations ADD COLUMN concurrency_key TEXT;
ALTER TABLE invocations ADD COLUMN key_limit BIGINT;
ALTER TABLE invocations ADD COLUMN key_seq BIGINT;
CREATE INDEX invocations_by_key ON invocations (service, concurrency_key, key_seq)
    WHERE concurrency_key IS NOT NULL
    AND status NOT IN ('completed', 'failed', 'cancelled', 'terminated', 'continued');

-- A key's durable state: what the invocations of the key that ended set last (their
-- `state` entries, applied in the transaction that ends each).
CREATE TABLE key_state (
    service TEXT NOT NULL,
    key     TEXT NOT NULL,
    name    TEXT NOT NULL,
    value   BYTEA NOT NULL,
    PRIMARY KEY (service, key, name)
);
