-- When the current attempt started: an update sent after it (which the attempt could not
-- know of) makes its suspension due at once; one it was given does not.
ALTER TABLE invocations ADD COLUMN attempt_started_at_ms INTEGER;
