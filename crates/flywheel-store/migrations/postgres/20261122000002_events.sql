-- Accepted events, deduplicated on (project_id, event_id), numbered per
-- project by seq in commit order (writers of a project serialise on its
-- event_sequences row). `body` is the whole normalised envelope.
CREATE TABLE events (
    project_id   UUID        NOT NULL,
    event_id     UUID        NOT NULL,
    seq          BIGINT      NOT NULL,
    type         TEXT        NOT NULL,
    event        TEXT        NOT NULL,
    distinct_id  TEXT        NOT NULL,
    timestamp    TIMESTAMPTZ NOT NULL,
    received_at  TIMESTAMPTZ NOT NULL,
    body         JSONB       NOT NULL,
    PRIMARY KEY (project_id, event_id)
);

CREATE UNIQUE INDEX events_by_seq ON events (project_id, seq);

CREATE TABLE event_sequences (
    project_id UUID   PRIMARY KEY,
    last_seq   BIGINT NOT NULL
);

CREATE TABLE identity_links (
    project_id UUID        NOT NULL,
    alias      TEXT        NOT NULL,
    user_id    TEXT        NOT NULL,
    linked_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (project_id, alias)
);

CREATE INDEX identity_links_by_user ON identity_links (project_id, user_id);

CREATE TABLE org_members (
    project_id  UUID        NOT NULL,
    org_id      TEXT        NOT NULL,
    distinct_id TEXT        NOT NULL,
    joined_at   TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (project_id, org_id, distinct_id)
);
