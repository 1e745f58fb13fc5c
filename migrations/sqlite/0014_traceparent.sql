-- The W3C `traceparent` an invocation's span continues: its caller's, or the attempt of the
-- parent that started it; NULL for the root of a trace (see src/traces.rs).
ALTER TABLE invocations ADD COLUMN traceparent TEXT;
