-- An idempotency key names its invocation until `retention_ms` after the invocation ended
-- (not after it was created): a workflow that sleeps or backs off for days keeps its key.
-- While the invocation runs, `expires_at_ms` is the largest integer; when it ends, the
-- store sets it to the end plus `retention_ms`. Keys written before this migration keep
-- the expiry they had (their `retention_ms` is NULL).
ALTER TABLE idempotency_keys ADD COLUMN retention_ms INTEGER;
CREATE INDEX idempotency_keys_by_invocation ON idempotency_keys (invocation_id);
