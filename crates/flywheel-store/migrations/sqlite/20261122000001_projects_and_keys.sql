-- Projects, their API keys, and the change log that keeps every node's
-- decision snapshot fresh. Times are Unix microseconds (UTC).
CREATE TABLE projects (
    id         TEXT    PRIMARY KEY,
    name       TEXT    NOT NULL UNIQUE,
    created_at INTEGER NOT NULL
) STRICT;

CREATE TABLE api_keys (
    id         TEXT    PRIMARY KEY,
    project_id TEXT    NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    kind       TEXT    NOT NULL CHECK (kind IN ('publishable', 'secret')),
    prefix     TEXT    NOT NULL,
    key_hash   BLOB    NOT NULL UNIQUE,
    label      TEXT,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
) STRICT;

CREATE INDEX api_keys_by_project ON api_keys (project_id);

-- One row per configuration change, written in the transaction that makes the
-- change. Servers poll max(seq) and reload the projects named after it.
CREATE TABLE config_changes (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    project_id TEXT    NOT NULL,
    entity     TEXT    NOT NULL,
    changed_at INTEGER NOT NULL
) STRICT;
