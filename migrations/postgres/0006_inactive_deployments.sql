-- A deployment registered inactive (its verification found runs it cannot replay, and the
-- operator chose to keep it): new invocations do not go to it until it is activated;
-- runs resumed onto it explicitly do.
ALTER TABLE deployments ADD COLUMN active BOOLEAN NOT NULL DEFAULT TRUE;
