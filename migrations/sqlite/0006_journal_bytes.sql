-- The bytes of an invocation's journal values, kept beside its length, so that an append
-- past the journal's limits is refused in the statement that would grow it.
ALTER TABLE invocations ADD COLUMN journal_bytes INTEGER NOT NULL DEFAULT 0;
