-- Activation rules (versioned; the newest is loaded into the project's
-- configuration), the event counts they follow per subject, and the
-- milestones they record (first time only: the primary key).
CREATE TABLE activation_rule_versions (
    project_id TEXT    NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    version    INTEGER NOT NULL,
    document   TEXT    NOT NULL,
    actor      TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (project_id, version)
) STRICT;

CREATE TABLE activation_counts (
    project_id TEXT    NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    scope      TEXT    NOT NULL,  -- user | org
    subject_id TEXT    NOT NULL,
    event      TEXT    NOT NULL,
    count      INTEGER NOT NULL,
    first_at   INTEGER NOT NULL,
    PRIMARY KEY (project_id, scope, subject_id, event)
) STRICT;

CREATE TABLE milestones (
    project_id       TEXT    NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    rule             TEXT    NOT NULL,
    scope            TEXT    NOT NULL,
    subject_id       TEXT    NOT NULL,
    reached_at       INTEGER NOT NULL,
    signed_up_at     INTEGER NOT NULL,
    seconds_to_value INTEGER NOT NULL,
    event_id         TEXT    NOT NULL,  -- the event that crossed the threshold
    event            TEXT    NOT NULL,
    count            INTEGER NOT NULL,
    activation       INTEGER NOT NULL,
    PRIMARY KEY (project_id, scope, subject_id, rule)
) STRICT;
