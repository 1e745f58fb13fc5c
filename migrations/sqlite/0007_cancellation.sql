-- Cancellation: when someone asked to cancel the invocation (a `cancel` entry is then in
-- its journal); NULL otherwise.
ALTER TABLE invocations ADD COLUMN cancel_requested_at_ms INTEGER;

-- A terminated invocation has ended too: the index of unfinished work leaves it out.
DROP INDEX invocations_unfinished;
CREATE INDEX invocations_unfinished ON invocations (status)
    WHERE status NOT IN ('completed', 'failed', 'cancelled', 'terminated');
