-- Plans, entitlements and usage metering.

-- The billing catalog (features, meters, plans) as one JSON document,
-- append-only: the newest version is current.
CREATE TABLE catalog_versions (
    project_id UUID    NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    version    BIGINT NOT NULL,
    document   JSONB    NOT NULL,
    actor      TEXT    NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (project_id, version)
);

-- One row per org Flywheel has written billing state for; `version` is
-- bumped by every write (in-memory caches keep the newest they saw).
CREATE TABLE orgs (
    project_id   UUID    NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    org_id       TEXT    NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL,
    subscription JSONB,
    overrides    JSONB   NOT NULL DEFAULT '{}',
    stripe_customer_id TEXT,
    version      BIGINT NOT NULL,
    PRIMARY KEY (project_id, org_id)
);

-- Stripe webhooks name the customer: find its org.
CREATE INDEX orgs_by_stripe_customer ON orgs (project_id, stripe_customer_id);

-- Usage of a metered feature in one period (period_start 1970-01-01: a total
-- that never resets). A new period is a new row: resets are lazy and idempotent.
CREATE TABLE usage_counters (
    project_id   UUID    NOT NULL,
    org_id       TEXT    NOT NULL,
    feature      TEXT    NOT NULL,
    period_start TIMESTAMPTZ NOT NULL,
    plan_used    BIGINT NOT NULL,
    grant_used   BIGINT NOT NULL,
    PRIMARY KEY (project_id, org_id, feature, period_start)
);

-- One-off units of a metered feature.
CREATE TABLE usage_grants (
    project_id UUID    NOT NULL,
    org_id     TEXT    NOT NULL,
    grant_id   UUID    NOT NULL,
    feature    TEXT    NOT NULL,
    amount     BIGINT NOT NULL,
    remaining  BIGINT NOT NULL,
    expires_at TIMESTAMPTZ,
    created_at TIMESTAMPTZ NOT NULL,
    reason     TEXT,
    PRIMARY KEY (project_id, org_id, grant_id)
);

-- Values already counted by a UNIQUE_COUNT meter, per period.
CREATE TABLE meter_unique_values (
    project_id   UUID    NOT NULL,
    org_id       TEXT    NOT NULL,
    meter        TEXT    NOT NULL,
    period_start TIMESTAMPTZ NOT NULL,
    value        TEXT    NOT NULL,
    PRIMARY KEY (project_id, org_id, meter, period_start, value)
);

-- The first reply of each idempotent org request (consume, release, grant,
-- and each Stripe event, keyed `stripe:<event id>`).
CREATE TABLE org_requests (
    project_id      UUID    NOT NULL,
    idempotency_key TEXT    NOT NULL,
    fingerprint     TEXT    NOT NULL,
    reply           JSONB    NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (project_id, idempotency_key)
);
