-- Per-project settings (privacy, schema mode) as JSON; '{}' means defaults.
ALTER TABLE projects ADD COLUMN settings TEXT NOT NULL DEFAULT '{}';

CREATE TABLE event_schemas (
    project_id TEXT    NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    event      TEXT    NOT NULL,
    version    INTEGER NOT NULL,
    required   TEXT    NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (project_id, event)
) STRICT;

-- Events stored in `warn` mode that broke their schema, for review.
CREATE TABLE schema_violations (
    project_id  TEXT    NOT NULL,
    event_id    TEXT    NOT NULL,
    event       TEXT    NOT NULL,
    problems    TEXT    NOT NULL,
    recorded_at INTEGER NOT NULL,
    PRIMARY KEY (project_id, event_id)
) STRICT;

-- Ids of deleted people: late retries carrying them are dropped.
CREATE TABLE suppressed_ids (
    project_id    TEXT    NOT NULL,
    distinct_id   TEXT    NOT NULL,
    suppressed_at INTEGER NOT NULL,
    PRIMARY KEY (project_id, distinct_id)
) STRICT;
