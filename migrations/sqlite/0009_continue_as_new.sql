-- A run that continued as new has ended too: the index of unfinished work leaves it out.
DROP INDEX invocations_unfinished;
CREATE INDEX invocations_unfinished ON invocations (status)
    WHERE status NOT IN ('completed', 'failed', 'cancelled', 'terminated', 'continued');

-- The runs of a workflow id, in the order they started (ids are time-ordered).
CREATE INDEX invocations_runs ON invocations (service, workflow_id, id)
    WHERE workflow_id IS NOT NULL;
