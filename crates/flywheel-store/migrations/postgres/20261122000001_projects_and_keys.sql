-- Projects, their API keys, and the change log that keeps every node's
-- decision snapshot fresh (with NOTIFY flywheel_config_changes).
CREATE TABLE projects (
    id         UUID        PRIMARY KEY,
    name       TEXT        NOT NULL UNIQUE,
    created_at TIMESTAMPTZ NOT NULL
);

CREATE TABLE api_keys (
    id         UUID        PRIMARY KEY,
    project_id UUID        NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    kind       TEXT        NOT NULL CHECK (kind IN ('publishable', 'secret')),
    prefix     TEXT        NOT NULL,
    key_hash   BYTEA       NOT NULL UNIQUE,
    label      TEXT,
    created_at TIMESTAMPTZ NOT NULL,
    revoked_at TIMESTAMPTZ
);

CREATE INDEX api_keys_by_project ON api_keys (project_id);

CREATE TABLE config_changes (
    seq        BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    project_id UUID        NOT NULL,
    entity     TEXT        NOT NULL,
    changed_at TIMESTAMPTZ NOT NULL
);
