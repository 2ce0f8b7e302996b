-- Prompt rules (versioned; the newest is loaded into the project's
-- configuration), the prompt instances their triggers create (in the
-- trigger's transaction), and the live messages streamed to users' open
-- streams (kept an hour so a reconnecting stream resumes from its
-- Last-Event-ID).
CREATE TABLE prompt_rule_versions (
    project_id TEXT    NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    version    INTEGER NOT NULL,
    document   TEXT    NOT NULL,
    actor      TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (project_id, version)
) STRICT;

CREATE TABLE prompts (
    id             TEXT    NOT NULL PRIMARY KEY,  -- prm_…
    project_id     TEXT    NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    rule           TEXT    NOT NULL,
    user_id        TEXT    NOT NULL,
    org_id         TEXT,
    variant        TEXT,
    priority       INTEGER NOT NULL,
    body           TEXT    NOT NULL,  -- the prompt as rendered (JSON)
    created_at     INTEGER NOT NULL,
    expires_at     INTEGER NOT NULL,
    shown_at       INTEGER,
    clicked_at     INTEGER,
    dismissed_at   INTEGER,
    converted_at   INTEGER,
    converted_plan TEXT
) STRICT;
CREATE INDEX prompts_by_user ON prompts (project_id, user_id, created_at);
CREATE INDEX prompts_by_rule ON prompts (project_id, rule, user_id, created_at);
CREATE INDEX prompts_clicked ON prompts (project_id, org_id, clicked_at);

CREATE TABLE live_messages (
    seq        INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    project_id TEXT    NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    user_id    TEXT,  -- to this user's streams, or
    org_id     TEXT,  -- to the streams of this org's users
    kind       TEXT    NOT NULL,  -- prompt | entitlements
    payload    TEXT    NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX live_messages_by_user ON live_messages (project_id, user_id, seq);
CREATE INDEX live_messages_by_org ON live_messages (project_id, org_id, seq);
CREATE INDEX live_messages_by_time ON live_messages (created_at);
