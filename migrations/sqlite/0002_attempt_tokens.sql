-- A random secret per attempt, handed to the handler with the invocation: appends through
-- the context API must present it, so that knowing an invocation id and guessing its
-- attempt number is not enough to write into a journal.
ALTER TABLE invocations ADD COLUMN attempt_token TEXT;
