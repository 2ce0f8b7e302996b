-- Plans, entitlements and usage metering.

-- The billing catalog (features, meters, plans) as one JSON document,
-- append-only: the newest version is current.
CREATE TABLE catalog_versions (
    project_id TEXT    NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    version    INTEGER NOT NULL,
    document   TEXT    NOT NULL,
    actor      TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (project_id, version)
) STRICT;

-- One row per org Flywheel has written billing state for; `version` is
-- bumped by every write (in-memory caches keep the newest they saw).
CREATE TABLE orgs (
    project_id   TEXT    NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    org_id       TEXT    NOT NULL,
    created_at   INTEGER NOT NULL,
    subscription TEXT,
    overrides    TEXT    NOT NULL DEFAULT '{}',
    stripe_customer_id TEXT,
    version      INTEGER NOT NULL,
    PRIMARY KEY (project_id, org_id)
) STRICT;

-- Stripe webhooks name the customer: find its org.
CREATE INDEX orgs_by_stripe_customer ON orgs (project_id, stripe_customer_id);

-- Usage of a metered feature in one period (period_start 0: a total that
-- never resets). A new period is a new row: resets are lazy and idempotent.
CREATE TABLE usage_counters (
    project_id   TEXT    NOT NULL,
    org_id       TEXT    NOT NULL,
    feature      TEXT    NOT NULL,
    period_start INTEGER NOT NULL,
    plan_used    INTEGER NOT NULL,
    grant_used   INTEGER NOT NULL,
    PRIMARY KEY (project_id, org_id, feature, period_start)
) STRICT;

-- One-off units of a metered feature.
CREATE TABLE usage_grants (
    project_id TEXT    NOT NULL,
    org_id     TEXT    NOT NULL,
    grant_id   TEXT    NOT NULL,
    feature    TEXT    NOT NULL,
    amount     INTEGER NOT NULL,
    remaining  INTEGER NOT NULL,
    expires_at INTEGER,
    created_at INTEGER NOT NULL,
    reason     TEXT,
    PRIMARY KEY (project_id, org_id, grant_id)
) STRICT;

-- Values already counted by a UNIQUE_COUNT meter, per period.
CREATE TABLE meter_unique_values (
    project_id   TEXT    NOT NULL,
    org_id       TEXT    NOT NULL,
    meter        TEXT    NOT NULL,
    period_start INTEGER NOT NULL,
    value        TEXT    NOT NULL,
    PRIMARY KEY (project_id, org_id, meter, period_start, value)
) STRICT;

-- The first reply of each idempotent org request (consume, release, grant,
-- and each Stripe event, keyed `stripe:<event id>`).
CREATE TABLE org_requests (
    project_id      TEXT    NOT NULL,
    idempotency_key TEXT    NOT NULL,
    fingerprint     TEXT    NOT NULL,
    reply           TEXT    NOT NULL,
    created_at      INTEGER NOT NULL,
    PRIMARY KEY (project_id, idempotency_key)
) STRICT;
