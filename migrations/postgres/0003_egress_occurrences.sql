-- The egress's occurrences, shared by the nodes: for each running attempt, how many calls
-- of each identity (method, URL, body digest; `identity` is a digest of the three) it made,
-- through any node's egress. A call takes `next` and increments it; a call that left
-- nothing in the journal gives its occurrence back (decrements `next`) if it is still the
-- latest. The SQLite store has no such table: one node counts in memory.
--
-- Rows of an attempt are deleted when a later attempt of the invocation takes its first
-- occurrence, and with the invocation when it is purged; only the last attempt that
-- called out keeps rows, as long as its journal is kept.
CREATE TABLE egress_occurrences (
    invocation_id TEXT NOT NULL,
    attempt       BIGINT NOT NULL,
    identity      TEXT NOT NULL,
    next          BIGINT NOT NULL,
    PRIMARY KEY (invocation_id, attempt, identity)
);
