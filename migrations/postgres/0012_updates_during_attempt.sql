-- The attempt that was running when an update arrived (NULL when none was), as signals
-- have it: an attempt's end asks whether an update came while it ran by this number, not
-- by comparing the update's time with the attempt's start, which the nodes' clocks or the
-- order in which two writers commit can turn around. Rows stored before it, or by a node
-- not yet upgraded (NULL), are judged by their time, as before.
ALTER TABLE updates ADD COLUMN during_attempt BIGINT;
