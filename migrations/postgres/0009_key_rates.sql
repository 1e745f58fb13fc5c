-- A keyed handler's rate (at most key_rate_limit starts of one key in any
-- key_rate_period_ms), as its invocation was created under it; and the latest time a
-- debounced invocation's burst may put its start off (the burst's first creation plus
-- the handler's debounce_max).
ALTER TABLE invocations ADD COLUMN key_rate_limit BIGINT;
ALTER TABLE invocations ADD COLUMN key_rate_period_ms BIGINT;
ALTER TABLE invocations ADD COLUMN debounce_until_ms BIGINT;

-- When the invocations of a rate-limited handler's key were let start, the latest ones
-- of each key only (those that still count against a start to come).
CREATE TABLE key_starts (
    service TEXT NOT NULL,
    handler TEXT NOT NULL,
    key     TEXT NOT NULL,
    at_ms   BIGINT NOT NULL
);
CREATE INDEX key_starts_by_key ON key_starts (service, handler, key, at_ms);
