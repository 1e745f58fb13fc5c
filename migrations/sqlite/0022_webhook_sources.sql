-- Webhook sources set through the admin API or the config file (`origin`), each its
-- whole declaration as JSON (its secrets included: the admin API never shows them), and
-- the recent deliveries of each source, as operators see them (JSON), the latest few
-- hundred per source.
CREATE TABLE webhook_sources (
    name          TEXT PRIMARY KEY,
    origin        TEXT NOT NULL,
    config        TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL
);

CREATE TABLE webhook_deliveries (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    source   TEXT NOT NULL,
    delivery TEXT NOT NULL
);
CREATE INDEX webhook_deliveries_by_source ON webhook_deliveries (source, id);
