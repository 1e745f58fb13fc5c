-- Child invocations, started by a parent's `call` or `send` entry in the same transaction.
-- `parent_index` is the parent's `call` entry, which the child's end completes; NULL for a
-- `send` (nobody waits for it).
ALTER TABLE invocations ADD COLUMN parent_invocation_id TEXT;
ALTER TABLE invocations ADD COLUMN parent_index INTEGER;
CREATE INDEX invocations_children ON invocations (parent_invocation_id)
    WHERE parent_invocation_id IS NOT NULL;
