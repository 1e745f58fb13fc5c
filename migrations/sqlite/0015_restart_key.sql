-- The Idempotency-Key of an invocation's last restart by an operator: the same restart
-- sent again (its answer was lost) changes nothing. NULL when the last restart had none.
ALTER TABLE invocations ADD COLUMN restart_key TEXT;
