-- What a child invocation undergoes when its parent closes: terminate, cancel or abandon
-- (NULL for an invocation that is nobody's child).
ALTER TABLE invocations ADD COLUMN parent_close TEXT;
