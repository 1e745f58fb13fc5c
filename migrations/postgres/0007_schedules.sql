-- Schedules: each fires workflow runs by a cron expression or an interval. Its spec and
-- its state (where it is, what runs, its recent fires) are JSON that `schedules/` reads;
-- `due_ms` is when it is next looked at (NULL: nothing to do, such as paused).
CREATE TABLE schedules (
    id TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    due_ms BIGINT
);
CREATE INDEX schedules_due ON schedules (due_ms) WHERE due_ms IS NOT NULL;
