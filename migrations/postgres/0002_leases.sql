-- Several nodes on one database: a running attempt is leased to the node that started it
-- (a claim, or the creation of an invocation with its first attempt running). The node
-- renews its leases while it lives; an attempt whose lease expired (its node died or
-- froze) is claimed by another node with the next attempt number, which fences the old
-- one. Times are the database's clock (clock_timestamp()), in milliseconds since the
-- epoch. Both columns mean something only while the status is 'running'; rows running
-- before this migration have neither (the next node to start recovers them).
ALTER TABLE invocations ADD COLUMN lease_owner TEXT;
ALTER TABLE invocations ADD COLUMN lease_expires_at_ms BIGINT;

-- Claims: running invocations whose lease expired.
CREATE INDEX invocations_lease_expiry ON invocations (lease_expires_at_ms)
    WHERE status = 'running';
-- Renewals and a restarted node's recovery: a node's running invocations.
CREATE INDEX invocations_lease_owner ON invocations (lease_owner)
    WHERE status = 'running';
