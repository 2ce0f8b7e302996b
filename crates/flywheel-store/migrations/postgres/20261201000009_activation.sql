-- Activation rules (versioned; the newest is loaded into the project's
-- configuration), the event counts they follow per subject, and the
-- milestones they record (first time only: the primary key).
CREATE TABLE activation_rule_versions (
    project_id UUID        NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    version    BIGINT      NOT NULL,
    document   JSONB       NOT NULL,
    actor      TEXT        NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (project_id, version)
);

CREATE TABLE activation_counts (
    project_id UUID        NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    scope      TEXT        NOT NULL,
    subject_id TEXT        NOT NULL,
    event      TEXT        NOT NULL,
    count      BIGINT      NOT NULL,
    first_at   TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (project_id, scope, subject_id, event)
);

CREATE TABLE milestones (
    project_id       UUID        NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    rule             TEXT        NOT NULL,
    scope            TEXT        NOT NULL,
    subject_id       TEXT        NOT NULL,
    reached_at       TIMESTAMPTZ NOT NULL,
    signed_up_at     TIMESTAMPTZ NOT NULL,
    seconds_to_value BIGINT      NOT NULL,
    event_id         TEXT        NOT NULL,
    event            TEXT        NOT NULL,
    count            BIGINT      NOT NULL,
    activation       BOOLEAN     NOT NULL,
    PRIMARY KEY (project_id, scope, subject_id, rule)
);
