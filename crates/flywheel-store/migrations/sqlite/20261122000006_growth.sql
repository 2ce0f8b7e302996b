-- The growth graph: users and their attribution, org profiles, memberships,
-- invitations, invite links, share links, referrals; the outbox (webhooks
-- and email). Times are microseconds since the epoch, as elsewhere.

CREATE TABLE users (
    project_id         TEXT    NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    user_id            TEXT    NOT NULL,
    email              TEXT    NOT NULL,  -- normalised
    email_identity     TEXT    NOT NULL,  -- mailbox identity, for self-referral checks
    email_verified     INTEGER NOT NULL,
    name               TEXT,
    acquisition_source TEXT    NOT NULL,
    invited_by_user_id TEXT,
    attribution        TEXT    NOT NULL,  -- JSON
    referral_code      TEXT,
    created_at         INTEGER NOT NULL,
    PRIMARY KEY (project_id, user_id)
) STRICT;
CREATE UNIQUE INDEX users_by_email ON users (project_id, email);
CREATE UNIQUE INDEX users_by_referral_code ON users (project_id, referral_code);
CREATE INDEX users_by_inviter ON users (project_id, invited_by_user_id);

CREATE TABLE org_profiles (
    project_id       TEXT    NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    org_id           TEXT    NOT NULL,
    name             TEXT,
    owner_user_id    TEXT,
    template_version INTEGER,
    created_at       INTEGER NOT NULL,
    PRIMARY KEY (project_id, org_id)
) STRICT;

CREATE TABLE memberships (
    project_id TEXT    NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    org_id     TEXT    NOT NULL,
    user_id    TEXT    NOT NULL,
    role       TEXT    NOT NULL,
    joined_via TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (project_id, org_id, user_id)
) STRICT;
CREATE INDEX memberships_by_user ON memberships (project_id, user_id);

-- Tokens are stored only as a keyed hash plus a short display prefix.
CREATE TABLE invitations (
    project_id          TEXT    NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    id                  TEXT    NOT NULL,
    org_id              TEXT    NOT NULL,
    email               TEXT    NOT NULL,
    role                TEXT    NOT NULL,
    inviter_user_id     TEXT    NOT NULL,
    token_hash          TEXT    NOT NULL,
    token_prefix        TEXT    NOT NULL,
    status              TEXT    NOT NULL,
    created_at          INTEGER NOT NULL,
    expires_at          INTEGER NOT NULL,
    sends               INTEGER NOT NULL,
    accepted_by_user_id TEXT,
    responded_at        INTEGER,
    PRIMARY KEY (project_id, id)
) STRICT;
CREATE UNIQUE INDEX invitations_by_token ON invitations (token_hash);
CREATE INDEX invitations_by_org ON invitations (project_id, org_id, created_at);
CREATE INDEX invitations_by_inviter ON invitations (project_id, inviter_user_id, status);

CREATE TABLE invite_links (
    project_id         TEXT    NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    id                 TEXT    NOT NULL,
    org_id             TEXT    NOT NULL,
    role               TEXT    NOT NULL,
    created_by_user_id TEXT    NOT NULL,
    token_hash         TEXT    NOT NULL,
    token_prefix       TEXT    NOT NULL,
    created_at         INTEGER NOT NULL,
    expires_at         INTEGER,
    max_uses           INTEGER,
    uses               INTEGER NOT NULL,
    revoked_at         INTEGER,
    PRIMARY KEY (project_id, id)
) STRICT;
CREATE UNIQUE INDEX invite_links_by_token ON invite_links (token_hash);
CREATE INDEX invite_links_by_org ON invite_links (project_id, org_id);

CREATE TABLE share_links (
    project_id         TEXT    NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    id                 TEXT    NOT NULL,
    resource_type      TEXT    NOT NULL,
    resource_id        TEXT    NOT NULL,
    org_id             TEXT,
    created_by_user_id TEXT    NOT NULL,
    permission         TEXT    NOT NULL,
    audience           TEXT    NOT NULL,
    allow_list         TEXT    NOT NULL,  -- JSON array of normalised emails
    expires_at         INTEGER,
    password_hash      TEXT,               -- argon2id PHC string
    token_hash         TEXT    NOT NULL,
    token_prefix       TEXT    NOT NULL,
    created_at         INTEGER NOT NULL,
    revoked_at         INTEGER,
    accesses           INTEGER NOT NULL,
    unique_guests      INTEGER NOT NULL,
    first_access_at    INTEGER,
    last_access_at     INTEGER,
    PRIMARY KEY (project_id, id)
) STRICT;
CREATE UNIQUE INDEX share_links_by_token ON share_links (token_hash);
CREATE INDEX share_links_by_resource ON share_links (project_id, resource_type, resource_id);

-- Which guests opened a share link (for the unique count).
CREATE TABLE share_guests (
    project_id TEXT    NOT NULL,
    link_id    TEXT    NOT NULL,
    guest_key  TEXT    NOT NULL,
    first_at   INTEGER NOT NULL,
    PRIMARY KEY (project_id, link_id, guest_key)
) STRICT;

CREATE TABLE referral_clicks (
    project_id       TEXT    NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    click_id         TEXT    NOT NULL,
    code             TEXT    NOT NULL,
    referrer_user_id TEXT    NOT NULL,
    anonymous_id     TEXT,
    created_at       INTEGER NOT NULL,
    PRIMARY KEY (project_id, click_id)
) STRICT;
CREATE INDEX referral_clicks_by_visitor ON referral_clicks (project_id, anonymous_id, created_at);

CREATE TABLE referral_events (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    project_id     TEXT    NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    kind           TEXT    NOT NULL,
    actor_user_id  TEXT,
    resource_type  TEXT    NOT NULL,
    resource_id    TEXT    NOT NULL,
    via_id         TEXT,
    signup_user_id TEXT,
    org_id         TEXT,
    created_at     INTEGER NOT NULL
) STRICT;
CREATE INDEX referral_events_by_kind ON referral_events (project_id, kind, id);
CREATE INDEX referral_events_by_actor ON referral_events (project_id, actor_user_id, id);

-- The first reply of each idempotent growth request (signup).
CREATE TABLE growth_requests (
    project_id      TEXT    NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    idempotency_key TEXT    NOT NULL,
    fingerprint     TEXT    NOT NULL,
    reply           TEXT    NOT NULL,
    created_at      INTEGER NOT NULL,
    PRIMARY KEY (project_id, idempotency_key)
) STRICT;

-- What a new org starts with, versioned; delivered with `org.provisioned`.
CREATE TABLE org_templates (
    project_id TEXT    NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    version    INTEGER NOT NULL,
    document   TEXT    NOT NULL,
    actor      TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (project_id, version)
) STRICT;

CREATE TABLE webhook_endpoints (
    project_id      TEXT    NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    id              TEXT    NOT NULL,
    url             TEXT    NOT NULL,
    secret          TEXT    NOT NULL,
    event_types     TEXT    NOT NULL,  -- JSON array; empty: every type
    description     TEXT,
    enabled         INTEGER NOT NULL,
    disabled_reason TEXT,
    failing_since   INTEGER,
    created_at      INTEGER NOT NULL,
    PRIMARY KEY (project_id, id)
) STRICT;

-- Every effect worth telling the product about, written in the transaction
-- that caused it.
CREATE TABLE outbox (
    id         TEXT    PRIMARY KEY,
    project_id TEXT    NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    event_type TEXT    NOT NULL,
    payload    TEXT    NOT NULL,
    created_at INTEGER NOT NULL
) STRICT;

-- One row per (message, endpoint); `next_attempt_at` doubles as the lease
-- of a claimed delivery, so a crash mid-delivery only delays it.
CREATE TABLE webhook_deliveries (
    id               TEXT    PRIMARY KEY,
    project_id       TEXT    NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    message_id       TEXT    NOT NULL REFERENCES outbox (id) ON DELETE CASCADE,
    endpoint_id      TEXT    NOT NULL,
    status           TEXT    NOT NULL,  -- pending | succeeded | failed
    attempts         INTEGER NOT NULL,
    next_attempt_at  INTEGER NOT NULL,
    last_attempt_at  INTEGER,
    last_status_code INTEGER,
    last_error       TEXT,
    created_at       INTEGER NOT NULL
) STRICT;
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (status, next_attempt_at);
CREATE INDEX webhook_deliveries_by_endpoint ON webhook_deliveries (project_id, endpoint_id, created_at);

CREATE TABLE email_templates (
    project_id TEXT    NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    kind       TEXT    NOT NULL,
    subject    TEXT    NOT NULL,
    text_body  TEXT    NOT NULL,
    html_body  TEXT,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (project_id, kind)
) STRICT;

-- The email outbox: rendered in the transaction that caused it; the bodies
-- are cleared once sent (they may hold a token link).
CREATE TABLE emails (
    id              TEXT    PRIMARY KEY,
    project_id      TEXT    NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    kind            TEXT    NOT NULL,
    recipient       TEXT    NOT NULL,
    subject         TEXT    NOT NULL,
    text_body       TEXT,
    html_body       TEXT,
    status          TEXT    NOT NULL,  -- pending | sent | failed
    attempts        INTEGER NOT NULL,
    next_attempt_at INTEGER NOT NULL,
    last_error      TEXT,
    created_at      INTEGER NOT NULL,
    sent_at         INTEGER
) STRICT;
CREATE INDEX emails_due ON emails (status, next_attempt_at);

-- Keys this installation generated for itself (the token-hashing key, the
-- guest-token signing key): shared by every node on the same database.
CREATE TABLE instance_secrets (
    name  TEXT NOT NULL PRIMARY KEY,
    value TEXT NOT NULL
) STRICT;
