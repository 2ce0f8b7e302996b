-- Per-project settings (privacy, schema mode) as JSON; '{}' means defaults.
ALTER TABLE projects ADD COLUMN settings JSONB NOT NULL DEFAULT '{}';

CREATE TABLE event_schemas (
    project_id UUID        NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    event      TEXT        NOT NULL,
    version    INTEGER     NOT NULL,
    required   JSONB       NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (project_id, event)
);

CREATE TABLE schema_violations (
    project_id  UUID        NOT NULL,
    event_id    UUID        NOT NULL,
    event       TEXT        NOT NULL,
    problems    JSONB       NOT NULL,
    recorded_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (project_id, event_id)
);

CREATE TABLE suppressed_ids (
    project_id    UUID        NOT NULL,
    distinct_id   TEXT        NOT NULL,
    suppressed_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (project_id, distinct_id)
);
