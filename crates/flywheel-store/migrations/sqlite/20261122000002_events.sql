-- Accepted events, deduplicated on (project_id, event_id), numbered per
-- project by seq in commit order. `body` is the whole normalised envelope.
CREATE TABLE events (
    project_id   TEXT    NOT NULL,
    event_id     TEXT    NOT NULL,
    seq          INTEGER NOT NULL,
    type         TEXT    NOT NULL,
    event        TEXT    NOT NULL,
    distinct_id  TEXT    NOT NULL,
    timestamp    INTEGER NOT NULL,
    received_at  INTEGER NOT NULL,
    body         TEXT    NOT NULL,
    PRIMARY KEY (project_id, event_id)
) STRICT, WITHOUT ROWID;

CREATE UNIQUE INDEX events_by_seq ON events (project_id, seq);

-- The last sequence number handed out per project.
CREATE TABLE event_sequences (
    project_id TEXT    PRIMARY KEY,
    last_seq   INTEGER NOT NULL
) STRICT;

-- Identity merges: `alias` (an anonymous or previous id) resolves to
-- `user_id`. The first link of an alias wins; events are never rewritten.
CREATE TABLE identity_links (
    project_id TEXT    NOT NULL,
    alias      TEXT    NOT NULL,
    user_id    TEXT    NOT NULL,
    linked_at  INTEGER NOT NULL,
    PRIMARY KEY (project_id, alias)
) STRICT;

CREATE INDEX identity_links_by_user ON identity_links (project_id, user_id);

-- Which orgs a person (by distinct id) belongs to, from group calls.
CREATE TABLE org_members (
    project_id  TEXT    NOT NULL,
    org_id      TEXT    NOT NULL,
    distinct_id TEXT    NOT NULL,
    joined_at   INTEGER NOT NULL,
    PRIMARY KEY (project_id, org_id, distinct_id)
) STRICT;
