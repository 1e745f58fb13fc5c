-- A signal that came while an attempt ran and that no wait took: that attempt may not
-- complete without seeing it. Idempotency keys of signals and updates are unique per
-- workflow id across its runs, looked up by key.
ALTER TABLE signals ADD COLUMN during_attempt BIGINT;
CREATE INDEX signals_by_key_alone ON signals (idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX updates_by_key_alone ON updates (idempotency_key) WHERE idempotency_key IS NOT NULL;
