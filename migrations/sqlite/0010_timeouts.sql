-- Timeouts and heartbeats.
-- When the invocation fails with ScheduleToCloseTimeout if it has not ended (created +
-- schedule_to_close; a workflow run's execution timeout); NULL without one.
ALTER TABLE invocations ADD COLUMN deadline_ms INTEGER;
-- When the current attempt was due (its dispatch is late by now - scheduled_at_ms).
ALTER TABLE invocations ADD COLUMN scheduled_at_ms INTEGER;
-- The last heartbeat of an attempt and its details (JSON), handed to the next attempt.
ALTER TABLE invocations ADD COLUMN heartbeat_at_ms INTEGER;
ALTER TABLE invocations ADD COLUMN heartbeat_details BLOB;
CREATE INDEX invocations_deadlines ON invocations (deadline_ms)
    WHERE deadline_ms IS NOT NULL AND completed_at_ms IS NULL;
