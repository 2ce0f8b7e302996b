-- Feature flags, append-only: every change is a new version of one entry
-- (a flag, a shared evaluator, or the flag set's metadata). The current
-- state of an entry is its highest version; a NULL definition is a deletion.
CREATE TABLE flag_versions (
    project_id TEXT    NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    kind       TEXT    NOT NULL CHECK (kind IN ('flag', 'evaluator', 'set')),
    key        TEXT    NOT NULL,
    version    INTEGER NOT NULL,
    definition TEXT,
    action     TEXT    NOT NULL,
    actor      TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (project_id, kind, key, version)
) STRICT;
