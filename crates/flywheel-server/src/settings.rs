//! One `Settings` struct, layered: built-in defaults → `flywheel.toml` →
//! `FLYWHEEL_*` environment variables → command-line flags.
//!
//! The environment is passed in rather than read here, so loading is a pure
//! function of its inputs and tests need not touch the process environment.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Format, Serialized, Toml};
use figment::value::Value;
use figment::Figment;
use serde::{Deserialize, Serialize};

/// The commented example configuration printed by `flywheel print-config`.
pub const EXAMPLE_CONFIG: &str = include_str!("../flywheel.example.toml");

const ENV_PREFIX: &str = "FLYWHEEL_";
/// Variables with the prefix that are not settings but are understood elsewhere.
const NON_SETTING_VARS: &[&str] = &["FLYWHEEL_CONFIG", "FLYWHEEL_TEST_POSTGRES_URL"];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub data_dir: PathBuf,
    pub database_url: Option<String>,
    pub bind: SocketAddr,
    pub log: LogSettings,
    pub http: HttpSettings,
    pub store: StoreSettings,
    pub snapshot: SnapshotSettings,
    pub ingest: IngestSettings,
    pub flags: FlagSettings,
    pub billing: BillingSettings,
    pub stripe: StripeSettings,
    pub growth: GrowthSettings,
    pub webhooks: WebhookSettings,
    pub smtp: SmtpSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./flywheel-data"),
            database_url: None,
            bind: SocketAddr::from(([127, 0, 0, 1], 7878)),
            log: LogSettings::default(),
            http: HttpSettings::default(),
            store: StoreSettings::default(),
            snapshot: SnapshotSettings::default(),
            ingest: IngestSettings::default(),
            flags: FlagSettings::default(),
            billing: BillingSettings::default(),
            stripe: StripeSettings::default(),
            growth: GrowthSettings::default(),
            webhooks: WebhookSettings::default(),
            smtp: SmtpSettings::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    pub format: LogFormat,
    pub filter: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Human,
            filter: "info".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    pub body_limit_bytes: usize,
    pub request_timeout_secs: u64,
    pub shutdown_grace_secs: u64,
    pub shutdown_drain_ms: u64,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            body_limit_bytes: 1024 * 1024,
            request_timeout_secs: 30,
            shutdown_grace_secs: 30,
            shutdown_drain_ms: 500,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSettings {
    pub max_connections: u32,
    pub busy_timeout_ms: u64,
    pub acquire_timeout_ms: u64,
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            max_connections: 16,
            busy_timeout_ms: 5000,
            acquire_timeout_ms: 5000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotSettings {
    pub poll_interval_ms: u64,
}

impl Default for SnapshotSettings {
    fn default() -> Self {
        Self {
            poll_interval_ms: 50,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestSettings {
    /// Largest single event, in bytes of JSON.
    pub max_event_bytes: usize,
    /// Largest request, in bytes after decompression.
    pub max_batch_bytes: usize,
    /// Requests per second one key may make to the event endpoints.
    pub rate_limit_per_key: u32,
    /// Most events one group commit writes in one transaction.
    pub group_commit_max_events: usize,
}

impl Default for IngestSettings {
    fn default() -> Self {
        Self {
            max_event_bytes: 32 * 1024,
            max_batch_bytes: 500 * 1024,
            rate_limit_per_key: 1000,
            group_commit_max_events: 10_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlagSettings {
    /// OFREP evaluation requests per second one key may make.
    pub rate_limit_per_key: u32,
    /// Add what Flywheel knows of the `targetingKey`'s user (org, plan,
    /// entitlements, signup, acquisition source, traits) to OFREP contexts.
    pub enrichment: bool,
    /// How long a node reuses a user's profile before reading it again
    /// (bounds how late another node's writes are seen; this node's own
    /// writes are seen at once).
    pub enrichment_ttl_ms: u64,
}

impl Default for FlagSettings {
    fn default() -> Self {
        Self {
            rate_limit_per_key: 100_000,
            enrichment: true,
            enrichment_ttl_ms: 5000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BillingSettings {
    /// Days a `past_due` subscription keeps its plan before the default
    /// plan applies.
    pub past_due_grace_days: u32,
    /// Most org writes (`consume`, `release`, plan changes) committed in one
    /// transaction.
    pub write_batch_max: usize,
}

impl Default for BillingSettings {
    fn default() -> Self {
        Self {
            past_due_grace_days: flywheel_domain::billing::org::DEFAULT_PAST_DUE_GRACE.num_days()
                as u32,
            write_batch_max: 512,
        }
    }
}

impl BillingSettings {
    pub fn grace(&self) -> chrono::Duration {
        chrono::Duration::days(i64::from(self.past_due_grace_days))
    }
}

/// The Stripe account billing is synced from. Secrets are best given as
/// `FLYWHEEL_STRIPE__API_KEY_FILE` / `FLYWHEEL_STRIPE__WEBHOOK_SECRETS`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StripeSettings {
    /// Webhook endpoint signing secrets (`whsec_…`); several while rotating.
    /// Empty: `POST /v1/webhooks/stripe` answers 404 `stripe_not_configured`.
    pub webhook_secrets: Vec<String>,
    /// The secret API key (`sk_…`) for Checkout and the billing portal.
    pub api_key: Option<String>,
    /// Stripe's API base URL (a test server's in tests).
    pub api_base: String,
    /// The Flywheel project (by name) whose orgs Stripe bills.
    pub project: String,
    /// How old (or far in the future) a signed webhook may be, in seconds.
    pub tolerance_secs: u32,
}

impl Default for StripeSettings {
    fn default() -> Self {
        Self {
            webhook_secrets: Vec::new(),
            api_key: None,
            api_base: "https://api.stripe.com".into(),
            project: "default".into(),
            tolerance_secs: flywheel_domain::billing::stripe::DEFAULT_TOLERANCE.num_seconds()
                as u32,
        }
    }
}

/// Provisioning, invitations, share links and referrals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrowthSettings {
    /// Days an invitation stays valid unless the request says otherwise (1-30).
    pub invitation_expiry_days: i64,
    /// Invitations one org may create per rolling hour.
    pub invitations_per_org_per_hour: i64,
    /// Pending (unexpired) invitations one inviter may have.
    pub pending_invitations_per_inviter: i64,
    /// Times one invitation may be resent.
    pub resends_per_invitation: i64,
    /// Days after a referral click in which a signup is attributed to it.
    pub referral_window_days: i64,
    /// `last_click` or `first_click`.
    pub referral_click_model: flywheel_domain::growth::model::ClickModel,
    /// The metered catalog feature that memberships count against.
    pub seats_feature: String,
    /// The product's page that accepts an invitation; `{token}` is replaced
    /// by the token. Shown in emails and returned when no SMTP is set.
    pub accept_url: String,
    /// The product's page that opens a share link (`{token}` as above).
    pub share_url: String,
    /// Lifetime of a guest token from resolving a share link, in seconds.
    pub guest_token_ttl_secs: i64,
    /// Share-link resolves one client IP may make per minute.
    pub share_resolves_per_minute_per_ip: u32,
}

impl Default for GrowthSettings {
    fn default() -> Self {
        let policy = flywheel_domain::growth::model::InvitationPolicy::default();
        Self {
            invitation_expiry_days: policy.expiry_days,
            invitations_per_org_per_hour: policy.per_org_per_hour,
            pending_invitations_per_inviter: policy.pending_per_inviter,
            resends_per_invitation: policy.resends_per_invitation,
            referral_window_days: flywheel_domain::growth::model::DEFAULT_REFERRAL_WINDOW_DAYS,
            referral_click_model: flywheel_domain::growth::model::ClickModel::LastClick,
            seats_feature: "seats".into(),
            accept_url: "http://localhost:3000/invitations/accept?token={token}".into(),
            share_url: "http://localhost:3000/shared?token={token}".into(),
            guest_token_ttl_secs: 3600,
            share_resolves_per_minute_per_ip: 60,
        }
    }
}

impl GrowthSettings {
    pub fn invitation_policy(&self) -> flywheel_domain::growth::model::InvitationPolicy {
        flywheel_domain::growth::model::InvitationPolicy {
            expiry_days: self.invitation_expiry_days,
            per_org_per_hour: self.invitations_per_org_per_hour,
            pending_per_inviter: self.pending_invitations_per_inviter,
            resends_per_invitation: self.resends_per_invitation,
        }
    }
}

/// Outbound webhooks (Standard Webhooks).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookSettings {
    /// How often the dispatcher looks for due deliveries when nothing woke it.
    pub poll_interval_ms: u64,
    /// Timeout of one delivery attempt.
    pub request_timeout_secs: u64,
    /// An endpoint whose every attempt has failed for this long is disabled.
    pub disable_after_hours: i64,
    /// Deliveries sent at once.
    pub concurrency: usize,
    /// Finished outbound work (delivered or failed webhooks, sent emails,
    /// signup idempotency keys) older than this is pruned, hourly.
    pub retention_days: i64,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        Self {
            poll_interval_ms: 1000,
            request_timeout_secs: 10,
            disable_after_hours: 5 * 24,
            concurrency: 16,
            retention_days: 30,
        }
    }
}

/// Email over SMTP. Without `url`, no email is sent: invitation replies carry
/// the accept URL for the product to send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpSettings {
    /// `smtp://host:port` (plain, or STARTTLS when offered),
    /// `smtps://user:pass@host:465` (TLS). Best given as `FLYWHEEL_SMTP__URL`.
    pub url: Option<String>,
    /// The From header.
    pub from: String,
    pub poll_interval_ms: u64,
}

impl Default for SmtpSettings {
    fn default() -> Self {
        Self {
            url: None,
            from: "Flywheel <no-reply@localhost>".into(),
            poll_interval_ms: 1000,
        }
    }
}

/// Values given on the command line; `None` leaves the lower layers' value.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CliOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bind: Option<SocketAddr>,
}

/// Where the configuration file comes from.
#[derive(Debug, Clone)]
pub enum ConfigFile {
    /// `flywheel.toml` in the working directory, if it exists.
    Default,
    /// A path that must exist.
    Explicit(PathBuf),
}

/// Settings plus what the operator should be told about them.
#[derive(Debug)]
pub struct Loaded {
    pub settings: Settings,
    /// Human-readable warnings (unknown `FLYWHEEL_` variables).
    pub warnings: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("configuration file {0} does not exist")]
    MissingFile(PathBuf),
    #[error("cannot read {var} from {path}: {source}")]
    SecretFile {
        var: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("both {0} and {0}_FILE are set; set only one")]
    Ambiguous(String),
    #[error("invalid configuration: {0}")]
    Invalid(#[from] Box<figment::Error>),
}

impl Settings {
    /// Builds the settings from all layers. `env` is the process environment
    /// (`std::env::vars()` in the binary).
    pub fn load(
        file: ConfigFile,
        env: impl IntoIterator<Item = (String, String)>,
        cli: &CliOverrides,
    ) -> Result<Loaded, SettingsError> {
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        match file {
            ConfigFile::Default => {
                let path = Path::new("flywheel.toml");
                if path.exists() {
                    figment = figment.merge(Toml::file_exact(path));
                }
            }
            ConfigFile::Explicit(path) => {
                if !path.exists() {
                    return Err(SettingsError::MissingFile(path));
                }
                figment = figment.merge(Toml::file_exact(path));
            }
        }
        let (env_values, warnings) = settings_from_env(env)?;
        for (key, value) in env_values {
            figment = figment.merge(Serialized::default(&key, value));
        }
        figment = figment.merge(Serialized::defaults(cli));
        let settings = figment
            .extract()
            .map_err(|e| SettingsError::Invalid(Box::new(e)))?;
        Ok(Loaded { settings, warnings })
    }

    /// Parses a TOML document on top of the defaults (no environment, no flags).
    pub fn from_toml(text: &str) -> Result<Settings, SettingsError> {
        Figment::from(Serialized::defaults(Settings::default()))
            .merge(Toml::string(text))
            .extract()
            .map_err(|e| SettingsError::Invalid(Box::new(e)))
    }

    pub fn store_options(&self) -> flywheel_store::StoreOptions {
        flywheel_store::StoreOptions {
            database_url: self.database_url.clone(),
            data_dir: self.data_dir.clone(),
            max_connections: self.store.max_connections,
            busy_timeout: Duration::from_millis(self.store.busy_timeout_ms),
            acquire_timeout: Duration::from_millis(self.store.acquire_timeout_ms),
        }
    }
}

/// Every dotted key the settings have (`http.body_limit_bytes`, …).
fn known_keys() -> BTreeSet<String> {
    fn walk(prefix: &str, value: &serde_json::Value, out: &mut BTreeSet<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, child) in map {
                    let path = if prefix.is_empty() {
                        key.clone()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    walk(&path, child, out);
                }
            }
            _ => {
                out.insert(prefix.to_string());
            }
        }
    }
    let mut keys = BTreeSet::new();
    let defaults = serde_json::to_value(Settings::default()).expect("settings serialize");
    walk("", &defaults, &mut keys);
    keys
}

type EnvValues = Vec<(String, Value)>;

/// Maps `FLYWHEEL_*` variables to setting keys; `_FILE` variables are read
/// from disk. Unknown variables become warnings, not errors, so that an old
/// variable left in an environment does not stop a deploy.
fn settings_from_env(
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(EnvValues, Vec<String>), SettingsError> {
    let known = known_keys();
    let key_of = |name: &str| name.to_ascii_lowercase().replace("__", ".");
    let mut plain = Vec::new();
    let mut from_files = Vec::new();
    let mut warnings = Vec::new();
    for (name, value) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if NON_SETTING_VARS.contains(&name.as_str()) {
            continue;
        }
        if known.contains(&key_of(rest)) {
            plain.push((name.clone(), key_of(rest), value));
        } else if let Some(base) = rest
            .strip_suffix("_FILE")
            .filter(|base| known.contains(&key_of(base)))
        {
            from_files.push((
                name.clone(),
                format!("{ENV_PREFIX}{base}"),
                key_of(base),
                PathBuf::from(value),
            ));
        } else {
            warnings.push(format!(
                "ignoring unknown environment variable {name}: it matches no setting (see `flywheel print-config`)"
            ));
        }
    }
    let mut values: EnvValues = plain
        .iter()
        .map(|(_, key, value)| {
            (
                key.clone(),
                value
                    .parse::<Value>()
                    .expect("parsing a value is infallible"),
            )
        })
        .collect();
    for (var, base_var, key, path) in from_files {
        if plain.iter().any(|(name, _, _)| *name == base_var) {
            return Err(SettingsError::Ambiguous(base_var));
        }
        let contents =
            std::fs::read_to_string(&path).map_err(|source| SettingsError::SecretFile {
                var: var.clone(),
                path: path.clone(),
                source,
            })?;
        // A secret file is taken verbatim but for the trailing newline editors add.
        let secret = contents.trim_end_matches(['\n', '\r']).to_string();
        values.push((key, Value::from(secret)));
    }
    warnings.sort();
    Ok((values, warnings))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn load(pairs: &[(&str, &str)], cli: &CliOverrides) -> Result<Loaded, SettingsError> {
        Settings::load(ConfigFile::Default, env(pairs), cli)
    }

    #[test]
    fn the_example_config_is_exactly_the_defaults() {
        assert_eq!(
            Settings::from_toml(EXAMPLE_CONFIG).unwrap(),
            Settings::default()
        );
    }

    #[test]
    fn defaults_bind_to_loopback_and_use_the_embedded_store() {
        let settings = load(&[], &CliOverrides::default()).unwrap().settings;
        assert!(settings.bind.ip().is_loopback());
        assert_eq!(settings.database_url, None);
        assert_eq!(settings.data_dir, PathBuf::from("./flywheel-data"));
    }

    #[test]
    fn layers_apply_in_order_file_env_cli() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f.toml");
        std::fs::write(
            &file,
            "bind = \"127.0.0.1:1000\"\ndata_dir = \"/from/file\"\n[http]\nbody_limit_bytes = 5\n",
        )
        .unwrap();
        let cli = CliOverrides {
            bind: Some("127.0.0.1:3000".parse().unwrap()),
            ..Default::default()
        };
        let loaded = Settings::load(
            ConfigFile::Explicit(file),
            env(&[
                ("FLYWHEEL_BIND", "127.0.0.1:2000"),
                ("FLYWHEEL_HTTP__BODY_LIMIT_BYTES", "7"),
                ("FLYWHEEL_LOG__FORMAT", "json"),
            ]),
            &cli,
        )
        .unwrap();
        let s = loaded.settings;
        assert_eq!(
            s.bind,
            "127.0.0.1:3000".parse().unwrap(),
            "flag beats env and file"
        );
        assert_eq!(s.http.body_limit_bytes, 7, "env beats file");
        assert_eq!(
            s.data_dir,
            PathBuf::from("/from/file"),
            "file beats defaults"
        );
        assert_eq!(s.log.format, LogFormat::Json);
        assert!(loaded.warnings.is_empty());
    }

    #[test]
    fn unknown_keys_in_the_file_are_errors_naming_the_key() {
        let err = Settings::from_toml("[http]\nbody_limit = 5\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("body_limit"), "{err}");
        let err = Settings::from_toml("colour = \"blue\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("colour"), "{err}");
    }

    #[test]
    fn bad_values_are_errors_naming_the_key() {
        let err = load(
            &[("FLYWHEEL_BIND", "not an address")],
            &CliOverrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("bind"), "{err}");
    }

    #[test]
    fn unknown_env_vars_are_warnings() {
        let loaded = load(
            &[
                ("FLYWHEEL_COLOUR", "blue"),
                ("FLYWHEEL_CONFIG", "x"),
                ("OTHER", "1"),
            ],
            &CliOverrides::default(),
        )
        .unwrap();
        assert_eq!(loaded.warnings.len(), 1);
        assert!(loaded.warnings[0].contains("FLYWHEEL_COLOUR"));
    }

    #[test]
    fn file_suffix_reads_secrets_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("db");
        std::fs::write(&secret, "postgres://u:p@h/db\n").unwrap();
        let loaded = load(
            &[("FLYWHEEL_DATABASE_URL_FILE", secret.to_str().unwrap())],
            &CliOverrides::default(),
        )
        .unwrap();
        assert_eq!(
            loaded.settings.database_url.as_deref(),
            Some("postgres://u:p@h/db")
        );

        let missing = load(
            &[("FLYWHEEL_DATABASE_URL_FILE", "/nonexistent/x")],
            &CliOverrides::default(),
        );
        assert!(matches!(missing, Err(SettingsError::SecretFile { .. })));

        let both = load(
            &[
                ("FLYWHEEL_DATABASE_URL_FILE", secret.to_str().unwrap()),
                ("FLYWHEEL_DATABASE_URL", "postgres://x@y/z"),
            ],
            &CliOverrides::default(),
        );
        assert!(matches!(both, Err(SettingsError::Ambiguous(_))));
    }

    #[test]
    fn a_missing_explicit_file_is_an_error() {
        let err = Settings::load(
            ConfigFile::Explicit("/nonexistent/flywheel.toml".into()),
            env(&[]),
            &CliOverrides::default(),
        )
        .unwrap_err();
        assert!(matches!(err, SettingsError::MissingFile(_)));
    }

    #[test]
    fn known_keys_cover_nested_tables() {
        let keys = known_keys();
        for key in [
            "bind",
            "data_dir",
            "database_url",
            "http.body_limit_bytes",
            "snapshot.poll_interval_ms",
        ] {
            assert!(keys.contains(key), "{key}");
        }
    }
}
