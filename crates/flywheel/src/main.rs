//! The `flywheel` command: a thin CLI over `flywheel-server`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand, ValueEnum};
use flywheel_domain::clock::{SharedClock, SystemClock};
use flywheel_domain::keys::KeyKind;
use flywheel_domain::project::{ApiKeyRecord, Project};
use flywheel_server::projects::{self, CreatedProject};
use flywheel_server::settings::{CliOverrides, ConfigFile, Loaded, LogFormat, LogSettings};
use flywheel_server::{RunningServer, Settings};
use flywheel_store::Store;
use serde_json::json;

const EXAMPLES: &str = "\
Examples:
  flywheel serve                                  # embedded store in ./flywheel-data
  flywheel serve --database-url postgres://flywheel@127.0.0.1/flywheel
  flywheel project create acme --json
  flywheel key create --project acme --kind publishable
  flywheel print-config > flywheel.toml";

/// Flywheel: a self-hosted product-led-growth engine.
#[derive(Debug, Parser)]
#[command(name = "flywheel", version, after_help = EXAMPLES)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct CommonArgs {
    /// Configuration file [default: ./flywheel.toml if present] [env: FLYWHEEL_CONFIG]
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Directory of the embedded store [env: FLYWHEEL_DATA_DIR] [default: ./flywheel-data]
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// postgres://… to use PostgreSQL, sqlite://PATH for SQLite at PATH [env: FLYWHEEL_DATABASE_URL]
    #[arg(long, global = true, value_name = "URL")]
    database_url: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the HTTP server (applies migrations; creates a `default` project in an empty store)
    #[command(
        after_help = "Examples:\n  flywheel serve\n  flywheel serve --bind 0.0.0.0:7878\n  FLYWHEEL_LOG__FORMAT=json flywheel serve"
    )]
    Serve {
        /// Address to listen on [env: FLYWHEEL_BIND] [default: 127.0.0.1:7878]
        #[arg(long, value_name = "ADDR")]
        bind: Option<std::net::SocketAddr>,
    },
    /// Create and list projects
    #[command(subcommand)]
    Project(ProjectCommand),
    /// Create, list and revoke API keys
    #[command(subcommand)]
    Key(KeyCommand),
    /// Print a commented example configuration with every default
    #[command(
        after_help = "Example:\n  flywheel print-config > flywheel.toml   # then edit; unknown keys are errors"
    )]
    PrintConfig,
    /// Print the OpenAPI 3.1 document of the HTTP API
    #[command(
        after_help = "Example:\n  flywheel openapi > openapi.json   # what CI compares with the committed copy"
    )]
    Openapi,
}

#[derive(Debug, Subcommand)]
enum ProjectCommand {
    /// Create a project with one publishable and one secret key
    #[command(
        after_help = "Examples:\n  flywheel project create acme\n  flywheel project create acme --json | jq -r .secret_key"
    )]
    Create {
        name: String,
        /// Print {\"project_id\", \"publishable_key\", \"secret_key\"} as JSON
        #[arg(long)]
        json: bool,
    },
    /// List projects
    #[command(after_help = "Example:\n  flywheel project list --json")]
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum KindArg {
    Publishable,
    Secret,
}

impl From<KindArg> for KeyKind {
    fn from(kind: KindArg) -> Self {
        match kind {
            KindArg::Publishable => KeyKind::Publishable,
            KindArg::Secret => KeyKind::Secret,
        }
    }
}

#[derive(Debug, Subcommand)]
enum KeyCommand {
    /// Create a key; it works on running servers within a second, without a restart
    #[command(
        after_help = "Example:\n  flywheel key create --project acme --kind secret --label ci"
    )]
    Create {
        /// Project name or id
        #[arg(long)]
        project: String,
        #[arg(long, value_enum)]
        kind: KindArg,
        /// A note to recognise the key by
        #[arg(long)]
        label: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// List a project's keys (prefixes only; keys are stored hashed)
    #[command(after_help = "Example:\n  flywheel key list --project acme")]
    List {
        #[arg(long)]
        project: String,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by id or prefix; running servers refuse it within a second
    #[command(after_help = "Example:\n  flywheel key revoke --project acme sk_Ab3xYz")]
    Revoke {
        #[arg(long)]
        project: String,
        /// The key's id or its prefix (as shown by `key list`)
        key: String,
    },
}

/// mimalloc instead of glibc's malloc: allocation was ~20 % of an ingestion
/// profile and ~12 % of a `check` profile (BENCHMARKS.md has the before/after).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn load_settings(
    common: &CommonArgs,
    bind: Option<std::net::SocketAddr>,
) -> anyhow::Result<Loaded> {
    let file = match common
        .config
        .clone()
        .or_else(|| std::env::var_os("FLYWHEEL_CONFIG").map(PathBuf::from))
    {
        Some(path) => ConfigFile::Explicit(path),
        None => ConfigFile::Default,
    };
    let cli = CliOverrides {
        data_dir: common.data_dir.clone(),
        database_url: common.database_url.clone(),
        bind,
    };
    Ok(Settings::load(file, std::env::vars(), &cli)?)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::PrintConfig => {
            print!("{}", flywheel_server::settings::EXAMPLE_CONFIG);
            Ok(())
        }
        Command::Openapi => {
            print!("{}", flywheel_server::openapi::document_json());
            Ok(())
        }
        Command::Serve { bind } => {
            let loaded = load_settings(&cli.common, bind)?;
            flywheel_server::telemetry::init_tracing(&loaded.settings.log)?;
            for warning in &loaded.warnings {
                tracing::warn!("{warning}");
            }
            serve(loaded.settings).await
        }
        Command::Project(command) => {
            let loaded = load_settings(&cli.common, None)?;
            quiet_tracing(&loaded);
            let store = open_store(&loaded.settings).await?;
            project_command(store.as_ref(), command).await
        }
        Command::Key(command) => {
            let loaded = load_settings(&cli.common, None)?;
            quiet_tracing(&loaded);
            let store = open_store(&loaded.settings).await?;
            key_command(store.as_ref(), command).await
        }
    }
}

/// Administrative commands log warnings only, so their output stays scriptable.
fn quiet_tracing(loaded: &Loaded) {
    let settings = LogSettings {
        format: LogFormat::Human,
        filter: "warn".into(),
    };
    let _ = flywheel_server::telemetry::init_tracing(&settings);
    for warning in &loaded.warnings {
        tracing::warn!("{warning}");
    }
}

async fn open_store(settings: &Settings) -> anyhow::Result<Arc<dyn Store>> {
    flywheel_store::open(&settings.store_options())
        .await
        .context("cannot open the store")
}

fn clock() -> SharedClock {
    Arc::new(SystemClock)
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    let server = flywheel_server::start(settings, clock()).await?;
    if let Some(created) = &server.bootstrap {
        print_bootstrap(&server, created);
    } else {
        println!("Flywheel is listening on {}", server.base_url());
    }
    let token = server.shutdown_token();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutdown signal received; finishing in-flight requests");
        token.cancel();
    });
    wait(server).await
}

async fn wait(server: RunningServer) -> anyhow::Result<()> {
    server.wait().await
}

fn print_bootstrap(server: &RunningServer, created: &CreatedProject) {
    let base = server.base_url();
    println!(
        "\n  Flywheel is listening on {base}\n\n  \
         This store was empty, so a project named \"{name}\" was created (id {id}).\n  \
         Its keys are shown this once (only their hashes are stored). Keep them now:\n\n    \
         publishable key: {pk}\n    \
         secret key:      {sk}\n\n  \
         Try it:\n    \
         curl {base}/readyz\n    \
         curl -H 'Authorization: Bearer {sk}' {base}/v1/project\n",
        name = created.project.name,
        id = created.project.id,
        pk = created.publishable_key.plaintext,
        sk = created.secret_key.plaintext,
    );
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn project_command(store: &dyn Store, command: ProjectCommand) -> anyhow::Result<()> {
    match command {
        ProjectCommand::Create { name, json } => {
            let created = projects::create_project(store, &SystemClock, &name)
                .await
                .map_err(|e| match e {
                    projects::ProjectError::Store(flywheel_store::StoreError::Conflict(_)) => {
                        anyhow::anyhow!("a project named {:?} already exists", name.trim())
                    }
                    other => other.into(),
                })?;
            if json {
                let out = json!({
                    "project_id": created.project.id,
                    "name": created.project.name,
                    "publishable_key": created.publishable_key.plaintext,
                    "secret_key": created.secret_key.plaintext,
                });
                println!("{out}");
            } else {
                println!(
                    "Created project {:?} ({}).\nKeys are shown this once:\n  publishable key: {}\n  secret key:      {}",
                    created.project.name, created.project.id, created.publishable_key.plaintext, created.secret_key.plaintext
                );
            }
            Ok(())
        }
        ProjectCommand::List { json } => {
            let projects = store.list_projects().await?;
            if json {
                let out: Vec<_> = projects.iter().map(project_json).collect();
                println!("{}", serde_json::Value::Array(out));
            } else if projects.is_empty() {
                println!("No projects yet. Create one with `flywheel project create NAME`.");
            } else {
                println!("{:<36}  {:<20}  NAME", "ID", "CREATED");
                for project in &projects {
                    println!(
                        "{:<36}  {:<20}  {}",
                        project.id,
                        project.created_at.format("%Y-%m-%dT%H:%M:%SZ"),
                        project.name
                    );
                }
            }
            Ok(())
        }
    }
}

fn project_json(project: &Project) -> serde_json::Value {
    json!({"project_id": project.id, "name": project.name, "created_at": project.created_at})
}

fn key_json(key: &ApiKeyRecord) -> serde_json::Value {
    json!({
        "id": key.id, "kind": key.kind, "prefix": key.prefix, "label": key.label,
        "created_at": key.created_at, "revoked_at": key.revoked_at,
    })
}

async fn require_project(store: &dyn Store, id_or_name: &str) -> anyhow::Result<Project> {
    projects::find_project(store, id_or_name)
        .await?
        .with_context(|| {
            format!("no project named or with id {id_or_name:?} (see `flywheel project list`)")
        })
}

async fn key_command(store: &dyn Store, command: KeyCommand) -> anyhow::Result<()> {
    match command {
        KeyCommand::Create {
            project,
            kind,
            label,
            json,
        } => {
            let project = require_project(store, &project).await?;
            let (record, key) = projects::create_key(
                store,
                &SystemClock,
                project.id,
                kind.into(),
                label.as_deref(),
            )
            .await?;
            if json {
                let mut out = key_json(&record);
                out["key"] = json!(key.plaintext);
                out["project_id"] = json!(project.id);
                println!("{out}");
            } else {
                println!(
                    "Created {} key {} for project {:?}. Shown this once:\n  {}",
                    record.kind, record.id, project.name, key.plaintext
                );
            }
            Ok(())
        }
        KeyCommand::List { project, json } => {
            let project = require_project(store, &project).await?;
            let keys = store.list_keys(project.id).await?;
            if json {
                println!(
                    "{}",
                    serde_json::Value::Array(keys.iter().map(key_json).collect())
                );
            } else {
                println!(
                    "{:<36}  {:<11}  {:<9}  {:<8}  LABEL",
                    "ID", "KIND", "PREFIX", "STATUS"
                );
                for key in &keys {
                    let status = if key.is_active() { "active" } else { "revoked" };
                    println!(
                        "{:<36}  {:<11}  {:<9}  {:<8}  {}",
                        key.id,
                        key.kind,
                        key.prefix,
                        status,
                        key.label.as_deref().unwrap_or("")
                    );
                }
            }
            Ok(())
        }
        KeyCommand::Revoke { project, key } => {
            let project = require_project(store, &project).await?;
            let keys = store.list_keys(project.id).await?;
            let matches: Vec<_> = keys
                .iter()
                .filter(|k| {
                    k.id.to_string() == key
                        || (key.len() >= 4 && k.prefix.starts_with(&key))
                        || k.prefix == key
                })
                .collect();
            let target = match matches.as_slice() {
                [one] => *one,
                [] => bail!(
                    "project {:?} has no key with id or prefix {key:?}",
                    project.name
                ),
                _ => bail!(
                    "{} keys match {key:?}; use the key id (see `flywheel key list`)",
                    matches.len()
                ),
            };
            let revoked = projects::revoke_key(store, &SystemClock, project.id, target.id).await?;
            println!(
                "Revoked {} key {} ({}).",
                revoked.kind, revoked.id, revoked.prefix
            );
            Ok(())
        }
    }
}
