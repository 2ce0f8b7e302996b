-- Feature flags, append-only: every change is a new version of one entry
-- (a flag, a shared evaluator, or the flag set's metadata). The current
-- state of an entry is its highest version; a NULL definition is a deletion.
CREATE TABLE flag_versions (
    project_id UUID        NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    kind       TEXT        NOT NULL CHECK (kind IN ('flag', 'evaluator', 'set')),
    key        TEXT        NOT NULL,
    version    BIGINT      NOT NULL,
    definition JSONB,
    action     TEXT        NOT NULL,
    actor      TEXT        NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (project_id, kind, key, version)
);
