-- The traits `identify` calls set, merged per person (latest value of each
-- trait), maintained in the events' transaction; read to enrich flag
-- evaluation contexts.
CREATE TABLE person_traits (
    project_id  TEXT    NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    distinct_id TEXT    NOT NULL,
    traits      TEXT    NOT NULL,  -- JSON object
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (project_id, distinct_id)
) STRICT;
