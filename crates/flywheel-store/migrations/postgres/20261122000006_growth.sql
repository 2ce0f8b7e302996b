-- The growth graph: users and their attribution, org profiles, memberships,
-- invitations, invite links, share links, referrals; the outbox (webhooks
-- and email). 

CREATE TABLE users (
    project_id         UUID    NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    user_id            TEXT    NOT NULL,
    email              TEXT    NOT NULL,  -- normalised
    email_identity     TEXT    NOT NULL,  -- mailbox identity, for self-referral checks
    email_verified     BOOLEAN NOT NULL,
    name               TEXT,
    acquisition_source TEXT    NOT NULL,
    invited_by_user_id TEXT,
    attribution        JSONB    NOT NULL,  -- JSON
    referral_code      TEXT,
    created_at         TIMESTAMPTZ  NOT NULL,
    PRIMARY KEY (project_id, user_id)
);
CREATE UNIQUE INDEX users_by_email ON users (project_id, email);
CREATE UNIQUE INDEX users_by_referral_code ON users (project_id, referral_code);
CREATE INDEX users_by_inviter ON users (project_id, invited_by_user_id);

CREATE TABLE org_profiles (
    project_id       UUID    NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    org_id           TEXT    NOT NULL,
    name             TEXT,
    owner_user_id    TEXT,
    template_version BIGINT ,
    created_at       TIMESTAMPTZ  NOT NULL,
    PRIMARY KEY (project_id, org_id)
);

CREATE TABLE memberships (
    project_id UUID    NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    org_id     TEXT    NOT NULL,
    user_id    TEXT    NOT NULL,
    role       TEXT    NOT NULL,
    joined_via TEXT    NOT NULL,
    created_at TIMESTAMPTZ  NOT NULL,
    PRIMARY KEY (project_id, org_id, user_id)
);
CREATE INDEX memberships_by_user ON memberships (project_id, user_id);

-- Tokens are stored only as a keyed hash plus a short display prefix.
CREATE TABLE invitations (
    project_id          UUID    NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    id                  TEXT    NOT NULL,
    org_id              TEXT    NOT NULL,
    email               TEXT    NOT NULL,
    role                TEXT    NOT NULL,
    inviter_user_id     TEXT    NOT NULL,
    token_hash          TEXT    NOT NULL,
    token_prefix        TEXT    NOT NULL,
    status              TEXT    NOT NULL,
    created_at          TIMESTAMPTZ  NOT NULL,
    expires_at          TIMESTAMPTZ  NOT NULL,
    sends               BIGINT  NOT NULL,
    accepted_by_user_id TEXT,
    responded_at        TIMESTAMPTZ ,
    PRIMARY KEY (project_id, id)
);
CREATE UNIQUE INDEX invitations_by_token ON invitations (token_hash);
CREATE INDEX invitations_by_org ON invitations (project_id, org_id, created_at);
CREATE INDEX invitations_by_inviter ON invitations (project_id, inviter_user_id, status);

CREATE TABLE invite_links (
    project_id         UUID    NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    id                 TEXT    NOT NULL,
    org_id             TEXT    NOT NULL,
    role               TEXT    NOT NULL,
    created_by_user_id TEXT    NOT NULL,
    token_hash         TEXT    NOT NULL,
    token_prefix       TEXT    NOT NULL,
    created_at         TIMESTAMPTZ  NOT NULL,
    expires_at         TIMESTAMPTZ ,
    max_uses           BIGINT ,
    uses               BIGINT  NOT NULL,
    revoked_at         TIMESTAMPTZ ,
    PRIMARY KEY (project_id, id)
);
CREATE UNIQUE INDEX invite_links_by_token ON invite_links (token_hash);
CREATE INDEX invite_links_by_org ON invite_links (project_id, org_id);

CREATE TABLE share_links (
    project_id         UUID    NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    id                 TEXT    NOT NULL,
    resource_type      TEXT    NOT NULL,
    resource_id        TEXT    NOT NULL,
    org_id             TEXT,
    created_by_user_id TEXT    NOT NULL,
    permission         TEXT    NOT NULL,
    audience           TEXT    NOT NULL,
    allow_list         JSONB    NOT NULL,  -- JSON array of normalised emails
    expires_at         TIMESTAMPTZ ,
    password_hash      TEXT,               -- argon2id PHC string
    token_hash         TEXT    NOT NULL,
    token_prefix       TEXT    NOT NULL,
    created_at         TIMESTAMPTZ  NOT NULL,
    revoked_at         TIMESTAMPTZ ,
    accesses           BIGINT  NOT NULL,
    unique_guests      BIGINT  NOT NULL,
    first_access_at    TIMESTAMPTZ ,
    last_access_at     TIMESTAMPTZ ,
    PRIMARY KEY (project_id, id)
);
CREATE UNIQUE INDEX share_links_by_token ON share_links (token_hash);
CREATE INDEX share_links_by_resource ON share_links (project_id, resource_type, resource_id);

-- Which guests opened a share link (for the unique count).
CREATE TABLE share_guests (
    project_id UUID    NOT NULL,
    link_id    TEXT    NOT NULL,
    guest_key  TEXT    NOT NULL,
    first_at   TIMESTAMPTZ  NOT NULL,
    PRIMARY KEY (project_id, link_id, guest_key)
);

CREATE TABLE referral_clicks (
    project_id       UUID    NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    click_id         TEXT    NOT NULL,
    code             TEXT    NOT NULL,
    referrer_user_id TEXT    NOT NULL,
    anonymous_id     TEXT,
    created_at       TIMESTAMPTZ  NOT NULL,
    PRIMARY KEY (project_id, click_id)
);
CREATE INDEX referral_clicks_by_visitor ON referral_clicks (project_id, anonymous_id, created_at);

CREATE TABLE referral_events (
    id             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    project_id     UUID    NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    kind           TEXT    NOT NULL,
    actor_user_id  TEXT,
    resource_type  TEXT    NOT NULL,
    resource_id    TEXT    NOT NULL,
    via_id         TEXT,
    signup_user_id TEXT,
    org_id         TEXT,
    created_at     TIMESTAMPTZ  NOT NULL
);
CREATE INDEX referral_events_by_kind ON referral_events (project_id, kind, id);
CREATE INDEX referral_events_by_actor ON referral_events (project_id, actor_user_id, id);

-- The first reply of each idempotent growth request (signup).
CREATE TABLE growth_requests (
    project_id      UUID    NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    idempotency_key TEXT    NOT NULL,
    fingerprint     TEXT    NOT NULL,
    reply           JSONB    NOT NULL,
    created_at      TIMESTAMPTZ  NOT NULL,
    PRIMARY KEY (project_id, idempotency_key)
);

-- What a new org starts with, versioned; delivered with `org.provisioned`.
CREATE TABLE org_templates (
    project_id UUID    NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    version    BIGINT  NOT NULL,
    document   JSONB    NOT NULL,
    actor      TEXT    NOT NULL,
    created_at TIMESTAMPTZ  NOT NULL,
    PRIMARY KEY (project_id, version)
);

CREATE TABLE webhook_endpoints (
    project_id      UUID    NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    id              TEXT    NOT NULL,
    url             TEXT    NOT NULL,
    secret          TEXT    NOT NULL,
    event_types     JSONB    NOT NULL,  -- JSON array; empty: every type
    description     TEXT,
    enabled         BOOLEAN NOT NULL,
    disabled_reason TEXT,
    failing_since   TIMESTAMPTZ ,
    created_at      TIMESTAMPTZ  NOT NULL,
    PRIMARY KEY (project_id, id)
);

-- Every effect worth telling the product about, written in the transaction
-- that caused it.
CREATE TABLE outbox (
    id         TEXT    PRIMARY KEY,
    project_id UUID    NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    event_type TEXT    NOT NULL,
    payload    JSONB    NOT NULL,
    created_at TIMESTAMPTZ  NOT NULL
);

-- One row per (message, endpoint); `next_attempt_at` doubles as the lease
-- of a claimed delivery, so a crash mid-delivery only delays it.
CREATE TABLE webhook_deliveries (
    id               TEXT    PRIMARY KEY,
    project_id       UUID    NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    message_id       TEXT    NOT NULL REFERENCES outbox (id) ON DELETE CASCADE,
    endpoint_id      TEXT    NOT NULL,
    status           TEXT    NOT NULL,  -- pending | succeeded | failed
    attempts         BIGINT  NOT NULL,
    next_attempt_at  TIMESTAMPTZ  NOT NULL,
    last_attempt_at  TIMESTAMPTZ ,
    last_status_code BIGINT ,
    last_error       TEXT,
    created_at       TIMESTAMPTZ  NOT NULL
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (status, next_attempt_at);
CREATE INDEX webhook_deliveries_by_endpoint ON webhook_deliveries (project_id, endpoint_id, created_at);

CREATE TABLE email_templates (
    project_id UUID    NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    kind       TEXT    NOT NULL,
    subject    TEXT    NOT NULL,
    text_body  TEXT    NOT NULL,
    html_body  TEXT,
    updated_at TIMESTAMPTZ  NOT NULL,
    PRIMARY KEY (project_id, kind)
);

-- The email outbox: rendered in the transaction that caused it; the bodies
-- are cleared once sent (they may hold a token link).
CREATE TABLE emails (
    id              TEXT    PRIMARY KEY,
    project_id      UUID    NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    kind            TEXT    NOT NULL,
    recipient       TEXT    NOT NULL,
    subject         TEXT    NOT NULL,
    text_body       TEXT,
    html_body       TEXT,
    status          TEXT    NOT NULL,  -- pending | sent | failed
    attempts        BIGINT  NOT NULL,
    next_attempt_at TIMESTAMPTZ  NOT NULL,
    last_error      TEXT,
    created_at      TIMESTAMPTZ  NOT NULL,
    sent_at         TIMESTAMPTZ 
);
CREATE INDEX emails_due ON emails (status, next_attempt_at);

-- Keys this installation generated for itself (the token-hashing key, the
-- guest-token signing key): shared by every node on the same database.
CREATE TABLE instance_secrets (
    name  TEXT NOT NULL PRIMARY KEY,
    value TEXT NOT NULL
);
