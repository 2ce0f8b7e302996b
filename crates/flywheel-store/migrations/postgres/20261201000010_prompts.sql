-- Prompt rules (versioned; the newest is loaded into the project's
-- configuration), the prompt instances their triggers create (in the
-- trigger's transaction), and the live messages streamed to users' open
-- streams (kept an hour so a reconnecting stream resumes from its
-- Last-Event-ID).
CREATE TABLE prompt_rule_versions (
    project_id UUID        NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    version    BIGINT      NOT NULL,
    document   JSONB       NOT NULL,
    actor      TEXT        NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (project_id, version)
);

CREATE TABLE prompts (
    id             TEXT        NOT NULL PRIMARY KEY,
    project_id     UUID        NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    rule           TEXT        NOT NULL,
    user_id        TEXT        NOT NULL,
    org_id         TEXT,
    variant        TEXT,
    priority       INTEGER     NOT NULL,
    body           JSONB       NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL,
    expires_at     TIMESTAMPTZ NOT NULL,
    shown_at       TIMESTAMPTZ,
    clicked_at     TIMESTAMPTZ,
    dismissed_at   TIMESTAMPTZ,
    converted_at   TIMESTAMPTZ,
    converted_plan TEXT
);
CREATE INDEX prompts_by_user ON prompts (project_id, user_id, created_at);
CREATE INDEX prompts_by_rule ON prompts (project_id, rule, user_id, created_at);
CREATE INDEX prompts_clicked ON prompts (project_id, org_id, clicked_at);

-- Sequence numbers may commit out of order here; nodes learn the exact
-- numbers of each commit by NOTIFY (flywheel_live).
CREATE TABLE live_messages (
    seq        BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    project_id UUID        NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    user_id    TEXT,
    org_id     TEXT,
    kind       TEXT        NOT NULL,
    payload    JSONB       NOT NULL,
    created_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX live_messages_by_user ON live_messages (project_id, user_id, seq);
CREATE INDEX live_messages_by_org ON live_messages (project_id, org_id, seq);
CREATE INDEX live_messages_by_time ON live_messages (created_at);
