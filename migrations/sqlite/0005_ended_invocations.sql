-- Ended invocations are purged once their retention has passed, oldest first; this index
-- finds them without reading the rest.
CREATE INDEX invocations_ended ON invocations (completed_at_ms) WHERE completed_at_ms IS NOT NULL;
