//! The real `flywheel` binary: CLI commands, a served process, keys made by
//! the CLI reaching a running server, graceful shutdown on SIGTERM, and a
//! hard usage limit held across two server processes on one store.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use flywheel_client::Client;
use flywheel_store::testing::TestDatabase;
use flywheel_store::Backend;
use serde_json::Value;

/// `flywheel` with the store options of `db` and no stray configuration.
fn flywheel(db: &TestDatabase) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_flywheel"));
    let options = db.options();
    command.arg("--data-dir").arg(&options.data_dir);
    if let Some(url) = db.database_url() {
        command.arg("--database-url").arg(url);
    }
    for (name, _) in std::env::vars() {
        if name.starts_with("FLYWHEEL_") && name != "FLYWHEEL_TEST_POSTGRES_URL" {
            command.env_remove(name);
        }
    }
    // A working directory without a stray flywheel.toml.
    let cwd = match options.data_dir.parent() {
        Some(parent) if parent.is_dir() => parent.to_path_buf(),
        _ => std::env::temp_dir(),
    };
    command.env("RUST_LOG", "info").current_dir(cwd);
    command
}

fn run_ok(command: &mut Command) -> String {
    let output = command.output().expect("run flywheel");
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn run_err(command: &mut Command) -> Output {
    let output = command.output().expect("run flywheel");
    assert!(!output.status.success(), "{command:?} should fail");
    output
}

/// A served `flywheel` child process and what it printed at start.
struct Served {
    child: Child,
    base_url: String,
    banner: String,
    stderr: mpsc::Receiver<String>,
}

impl Served {
    fn start(db: &TestDatabase) -> Self {
        Self::start_with(db, &[])
    }

    fn start_with(db: &TestDatabase, env: &[(&str, &str)]) -> Self {
        let mut command = flywheel(db);
        command.envs(env.iter().copied());
        let mut child = command
            .args(["serve", "--bind", "127.0.0.1:0"])
            .env("FLYWHEEL_SNAPSHOT__POLL_INTERVAL_MS", "50")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn flywheel serve");
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (line_tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                if line_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let (err_tx, err_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                if err_tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Plain start: one line "Flywheel is listening on URL". First start on
        // an empty store: an indented banner that ends with a curl example.
        let mut banner = String::new();
        let mut base_url = None;
        loop {
            let line = lines
                .recv_timeout(Duration::from_secs(60))
                .expect("the server starts and prints its address");
            banner.push_str(&line);
            banner.push('\n');
            if let Some(at) = line
                .find("http://")
                .filter(|_| line.contains("listening on"))
            {
                base_url = Some(line[at..].trim().to_string());
                if !line.starts_with("  ") {
                    break;
                }
            }
            if base_url.is_some() && line.contains("curl -H") {
                break;
            }
        }
        let base_url = base_url.unwrap();
        Served {
            child,
            base_url,
            banner,
            stderr: err_rx,
        }
    }

    fn client(&self) -> Client {
        Client::new(&self.base_url)
    }

    fn key_from_banner(&self, label: &str) -> String {
        let line = self
            .banner
            .lines()
            .find(|l| l.contains(label))
            .unwrap_or_else(|| panic!("no {label} in {}", self.banner));
        line.split_whitespace().last().unwrap().to_string()
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for a stderr line containing `needle` (bounded).
    fn wait_for_log(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.stderr.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        panic!("the server never logged {needle:?}");
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Retries `check` until it holds or `limit` passes: for effects that travel
/// between processes asynchronously by design.
async fn within<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

flywheel_store::for_each_backend!(
    project_commands_are_scriptable,
    cli_keys_reach_a_running_server_without_restart,
    first_start_prints_keys_once,
    two_processes_never_overrun_a_hard_limit,
);

async fn project_commands_are_scriptable(backend: Backend) {
    let db = TestDatabase::create(backend).await;
    let created: Value = serde_json::from_str(&run_ok(
        flywheel(&db).args(["project", "create", "acme", "--json"]),
    ))
    .unwrap();
    let project_id = created["project_id"].as_str().unwrap();
    assert!(created["publishable_key"]
        .as_str()
        .unwrap()
        .starts_with("pk_"));
    assert!(created["secret_key"].as_str().unwrap().starts_with("sk_"));

    let listed: Value =
        serde_json::from_str(&run_ok(flywheel(&db).args(["project", "list", "--json"]))).unwrap();
    assert_eq!(listed[0]["project_id"], project_id);
    assert_eq!(listed[0]["name"], "acme");
    assert!(run_ok(flywheel(&db).args(["project", "list"])).contains("acme"));

    let duplicate = run_err(flywheel(&db).args(["project", "create", "acme"]));
    assert!(String::from_utf8_lossy(&duplicate.stderr).contains("already exists"));

    // Keys by project name or id.
    let key: Value = serde_json::from_str(&run_ok(flywheel(&db).args([
        "key",
        "create",
        "--project",
        project_id,
        "--kind",
        "publishable",
        "--label",
        "web",
        "--json",
    ])))
    .unwrap();
    assert!(key["key"].as_str().unwrap().starts_with("pk_"));
    let keys: Value = serde_json::from_str(&run_ok(flywheel(&db).args([
        "key",
        "list",
        "--project",
        "acme",
        "--json",
    ])))
    .unwrap();
    assert_eq!(keys.as_array().unwrap().len(), 3);
    assert!(
        !keys.to_string().contains(key["key"].as_str().unwrap()),
        "listings never show a key"
    );

    let prefix = key["prefix"].as_str().unwrap();
    assert!(
        run_ok(flywheel(&db).args(["key", "revoke", "--project", "acme", prefix]))
            .contains("Revoked")
    );
    let table = run_ok(flywheel(&db).args(["key", "list", "--project", "acme"]));
    assert!(
        table
            .lines()
            .any(|l| l.contains(prefix) && l.contains("revoked")),
        "{table}"
    );

    let missing = run_err(flywheel(&db).args(["key", "list", "--project", "nope"]));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no project named"));
}

async fn cli_keys_reach_a_running_server_without_restart(backend: Backend) {
    let db = TestDatabase::create(backend).await;
    let served = Served::start(&db);
    let key: Value = serde_json::from_str(&run_ok(flywheel(&db).args([
        "key",
        "create",
        "--project",
        "default",
        "--kind",
        "secret",
        "--json",
    ])))
    .unwrap();
    let client = served.client().with_key(key["key"].as_str().unwrap());
    let works = within(Duration::from_secs(1), || async {
        client.list_keys().await.is_ok()
    })
    .await;
    assert!(
        works,
        "a key created by the CLI works on the running server within a second"
    );

    run_ok(flywheel(&db).args([
        "key",
        "revoke",
        "--project",
        "default",
        key["id"].as_str().unwrap(),
    ]));
    let refused = within(Duration::from_secs(1), || async {
        client.current_project().await.is_err()
    })
    .await;
    assert!(
        refused,
        "a key revoked by the CLI is refused within a second"
    );
}

async fn first_start_prints_keys_once(backend: Backend) {
    let db = TestDatabase::create(backend).await;
    let first = Served::start(&db);
    let secret = first.key_from_banner("secret key:");
    let publishable = first.key_from_banner("publishable key:");
    let project = first
        .client()
        .with_key(&secret)
        .current_project()
        .await
        .unwrap();
    assert_eq!(project.name, "default");
    assert!(first
        .client()
        .with_key(&publishable)
        .current_project()
        .await
        .is_ok());
    drop(first);

    let second = Served::start(&db);
    assert!(
        !second.banner.contains("secret key"),
        "keys are printed only when they are created"
    );
    assert!(second
        .client()
        .with_key(&secret)
        .current_project()
        .await
        .is_ok());
}

/// A request whose body is still arriving when SIGTERM lands is answered,
/// then the process exits successfully.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_requests() {
    let db = TestDatabase::create(Backend::Sqlite).await;
    let mut served = Served::start(&db);
    let secret = served.key_from_banner("secret key:");
    let address = served.base_url.trim_start_matches("http://").to_string();

    let body = br#"{"kind":"publishable","label":"in flight"}"#;
    let mut stream = TcpStream::connect(&address).unwrap();
    write!(
        stream,
        "POST /v1/keys HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {secret}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    stream.write_all(&body[..10]).unwrap();
    stream.flush().unwrap();
    // Make sure the server has the request before the signal.
    let started = within(Duration::from_secs(5), || async {
        served
            .client()
            .metrics()
            .await
            .map(|m| m.contains("flywheel_http_requests_total"))
            .unwrap_or(false)
    })
    .await;
    assert!(started);

    served.signal("TERM");
    served.wait_for_log("shutdown signal received");
    stream.write_all(&body[10..]).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 201"), "{response}");

    let status = served.child.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");
    // And the key it created is durable.
    let keys = run_ok(flywheel(&db).args(["key", "list", "--project", "default"]));
    assert!(keys.contains("in flight"), "{keys}");
}

#[test]
fn help_shows_examples_everywhere() {
    let db_dir = tempfile::tempdir().unwrap();
    for args in [
        vec!["--help"],
        vec!["serve", "--help"],
        vec!["project", "create", "--help"],
        vec!["key", "create", "--help"],
        vec!["key", "revoke", "--help"],
        vec!["key", "list", "--help"],
        vec!["project", "list", "--help"],
        vec!["print-config", "--help"],
        vec!["openapi", "--help"],
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_flywheel"))
            .args(&args)
            .current_dir(db_dir.path())
            .output()
            .unwrap();
        assert!(output.status.success(), "{args:?}");
        let text = String::from_utf8(output.stdout).unwrap();
        assert!(text.contains("Example"), "{args:?}: {text}");
    }
}

#[test]
fn print_config_prints_the_commented_example() {
    let output = Command::new(env!("CARGO_BIN_EXE_flywheel"))
        .arg("print-config")
        .output()
        .unwrap();
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.starts_with("# Flywheel configuration"));
    assert!(text.contains("bind = \"127.0.0.1:7878\""));
}

#[tokio::test]
async fn configuration_mistakes_are_named() {
    let db = TestDatabase::create(Backend::Sqlite).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("flywheel.toml");
    std::fs::write(&config, "[http]\nbody_limt_bytes = 10\n").unwrap();
    let output = run_err(
        flywheel(&db)
            .arg("--config")
            .arg(&config)
            .args(["project", "list"]),
    );
    assert!(String::from_utf8_lossy(&output.stderr).contains("body_limt_bytes"));

    let output = run_err(flywheel(&db).args([
        "--database-url",
        "mysql://root@localhost/x",
        "project",
        "list",
    ]));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("unsupported database URL scheme `mysql`")
    );

    let output = flywheel(&db)
        .env("FLYWHEEL_COLOUR", "blue")
        .args(["project", "list"])
        .output()
        .unwrap();
    assert!(output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("FLYWHEEL_COLOUR"),
        "unknown variables are warned about"
    );
}

/// `kill -9` right after 2xx answers loses none of the acknowledged events:
/// a 2xx is sent only after the commit is on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_after_acks_loses_nothing() {
    let db = TestDatabase::create(Backend::Sqlite).await;
    let mut served = Served::start(&db);
    let secret = served.key_from_banner("secret key:");
    let publishable = served.key_from_banner("publishable key:");
    let http = reqwest::Client::new();
    let url = format!("{}/v1/events", served.base_url);
    // Concurrent senders, so acknowledgements come from shared group commits.
    let senders: Vec<_> = (0..8)
        .map(|sender| {
            let (http, url, key) = (http.clone(), url.clone(), publishable.clone());
            tokio::spawn(async move {
                let mut acked = 0;
                for round in 0..10 {
                    let batch: Vec<Value> = (0..20)
                        .map(|i| serde_json::json!({"event": "durable", "user_id": format!("u{sender}"), "properties": {"round": round, "i": i}}))
                        .collect();
                    let response = http.post(&url).bearer_auth(&key).json(&serde_json::json!({"batch": batch})).send().await.unwrap();
                    assert!(response.status().is_success());
                    let body: Value = response.json().await.unwrap();
                    acked += body["accepted"].as_u64().unwrap();
                }
                acked
            })
        })
        .collect();
    let mut acked = 0;
    for sender in senders {
        acked += sender.await.unwrap();
    }
    assert_eq!(acked, 1600);
    served.signal("KILL");
    let _ = served.child.wait();
    drop(served);

    let restarted = Served::start(&db);
    let client = restarted.client().with_key(&secret);
    let list: Value = client
        .send(client.request(reqwest::Method::GET, "/v1/events?event=durable&limit=1000"))
        .await
        .unwrap();
    let newest_seq = list["events"][0]["seq"].as_u64().unwrap();
    assert_eq!(
        newest_seq, acked,
        "every acknowledged event survived kill -9, numbered without gaps"
    );
}

/// The official Segment and PostHog libraries (Python and Node), pointed at Flywheel
/// with nothing changed but the host, deliver events that read back with
/// the right ids, timestamps and identity. (`.ci/run` installs them from
/// `tests/clients/requirements.txt` and `tests/clients/node/package.json`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_client_libraries_deliver_events() {
    let check = Command::new("python3")
        .args(["-c", "import segment.analytics, posthog"])
        .output();
    assert!(
        check.map(|o| o.status.success()).unwrap_or(false),
        "the Segment and PostHog Python libraries are missing: \
         pip install -r crates/flywheel/tests/clients/requirements.txt"
    );
    let db = TestDatabase::create(Backend::Sqlite).await;
    let served = Served::start(&db);
    let secret = served.key_from_banner("secret key:");
    let publishable = served.key_from_banner("publishable key:");
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients");
    for script in ["segment_client.py", "posthog_client.py"] {
        let output = Command::new("python3")
            .arg(scripts.join(script))
            .args([&served.base_url, &publishable])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let node_dir = scripts.join("node");
    assert!(
        node_dir
            .join("node_modules/@segment/analytics-node")
            .is_dir()
            && node_dir.join("node_modules/posthog-node").is_dir(),
        "the Segment and PostHog Node libraries are missing: \
         npm install --no-package-lock --prefix crates/flywheel/tests/clients/node"
    );
    let output = Command::new("node")
        .arg(node_dir.join("clients.mjs"))
        .args([&served.base_url, &publishable])
        .output()
        .expect("node is installed");
    assert!(
        output.status.success(),
        "clients.mjs: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let client = served.client().with_key(&secret);
    let list = |user: &'static str| {
        let client = client.clone();
        async move {
            let list: Value = client
                .send(client.request(reqwest::Method::GET, &format!("/v1/events?user_id={user}")))
                .await
                .unwrap();
            list["events"].as_array().unwrap().clone()
        }
    };
    let segment = list("seg-user").await;
    let kinds: Vec<&str> = segment
        .iter()
        .rev()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["track", "identify", "alias", "group", "page", "screen"]
    );
    assert!(segment
        .iter()
        .all(|e| e["source"] == "segment" && e["person_id"] == "seg-user"));
    assert!(
        segment.iter().all(|e| e["event_id_generated"] == false),
        "messageId is the event id"
    );
    assert!(segment
        .iter()
        .all(|e| e["sent_at"].is_string() && e["timestamp"].is_string()));
    assert_eq!(
        segment.iter().find(|e| e["type"] == "group").unwrap()["org_id"],
        "seg-org"
    );
    assert_eq!(
        list("seg-old").await.len(),
        6,
        "the aliased id resolves to the same person"
    );

    let posthog = list("ph-user").await;
    assert_eq!(posthog.len(), 3, "{posthog:?}");
    assert!(posthog
        .iter()
        .all(|e| e["source"] == "posthog" && e["person_id"] == "ph-user"));
    let anonymous = posthog
        .iter()
        .find(|e| e["event"] == "ph anonymous view")
        .unwrap();
    assert_eq!(
        anonymous["user_id"], "ph-anon",
        "history is kept as sent; identity resolves at read"
    );
    let grouped = posthog
        .iter()
        .find(|e| e["event"] == "ph project created")
        .unwrap();
    assert_eq!(grouped["org_id"], "ph-org");
}

/// Real OpenFeature clients (the Node server SDK and the Python SDK, each
/// with its OFREP provider) evaluate Flywheel's flags with nothing changed
/// but the base URL and the key header: values, variants, reasons, and the
/// caller's default for a missing or disabled flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_openfeature_clients_evaluate_flags() {
    let db = TestDatabase::create(Backend::Sqlite).await;
    let served = Served::start(&db);
    let secret = served.key_from_banner("secret key:");
    let publishable = served.key_from_banner("publishable key:");
    let client = served.client().with_key(&secret);
    let document = serde_json::json!({"flags": {
        "pro-feature": {"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "off",
                        "targeting": {"if": [{"in": [{"var": "plan"}, ["pro", "team"]]}, "on", null]}},
        "banner": {"state": "ENABLED", "variants": {"hello": "hello", "bye": "bye"}, "defaultVariant": "hello"},
        "killed": {"state": "DISABLED", "variants": {"on": false}, "defaultVariant": "on"}
    }});
    let imported: Value = client
        .send(
            client
                .request(reqwest::Method::PUT, "/v1/flags/document")
                .json(&document),
        )
        .await
        .unwrap();
    assert_eq!(imported["created"].as_array().unwrap().len(), 3);

    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients");
    let node_dir = scripts.join("node");
    assert!(
        node_dir
            .join("node_modules/@openfeature/ofrep-provider")
            .is_dir(),
        "the OpenFeature Node libraries are missing: \
         npm install --no-package-lock --prefix crates/flywheel/tests/clients/node"
    );
    let runs = [
        ("node", node_dir.join("openfeature.mjs")),
        ("python3", scripts.join("openfeature_client.py")),
    ];
    for (program, script) in runs {
        let output = Command::new(program)
            .arg(&script)
            .args([&served.base_url, &publishable])
            .output()
            .unwrap_or_else(|error| panic!("{program} runs: {error}"));
        assert!(
            output.status.success(),
            "{}: {}",
            script.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        let details: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
            panic!(
                "{}: {error}: {}",
                script.display(),
                String::from_utf8_lossy(&output.stdout)
            )
        });
        let at = |index: usize, field: &str| details[index][field].clone();
        let context = script.display().to_string();
        // A pro user is targeted; a free one gets the default variant.
        assert_eq!(
            (at(0, "value"), at(0, "variant"), at(0, "reason")),
            (true.into(), "on".into(), "TARGETING_MATCH".into()),
            "{context}"
        );
        assert_eq!(
            (at(1, "value"), at(1, "variant"), at(1, "reason")),
            (false.into(), "off".into(), "DEFAULT".into()),
            "{context}"
        );
        assert_eq!(
            (at(2, "value"), at(2, "reason")),
            ("hello".into(), "STATIC".into()),
            "{context}"
        );
        // A missing flag: the caller's default, FLAG_NOT_FOUND.
        assert_eq!(
            (at(3, "value"), at(3, "errorCode")),
            (true.into(), "FLAG_NOT_FOUND".into()),
            "{context}"
        );
        // A disabled flag: the caller's default.
        assert_eq!(at(4, "value"), Value::from(true), "{context}");
        // A boolean flag asked for as a string: the client's type check.
        assert_eq!(
            (at(5, "value"), at(5, "errorCode")),
            ("wrong type".into(), "TYPE_MISMATCH".into()),
            "{context}"
        );
    }
}

async fn post_json(
    client: &Client,
    method: reqwest::Method,
    path: &str,
    body: Value,
) -> (reqwest::StatusCode, Value) {
    let response = client
        .request(method, path)
        .json(&body)
        .send()
        .await
        .unwrap();
    (
        response.status(),
        response.json().await.unwrap_or(Value::Null),
    )
}

/// Hundreds of concurrent `consume` calls at a hard limit of 10, split over
/// two `flywheel` processes on one store, grant exactly 10.
async fn two_processes_never_overrun_a_hard_limit(backend: Backend) {
    let db = TestDatabase::create(backend).await;
    let first = Served::start(&db);
    let secret = first.key_from_banner("secret key:");
    let second = Served::start(&db);
    let (a, b) = (
        first.client().with_key(&secret),
        second.client().with_key(&secret),
    );
    let catalog = serde_json::json!({
        "features": [{"key": "exports", "kind": "metered"}],
        "plans": [{"key": "free", "default": true, "features": {"exports": {"limit": 10}}}]
    });
    let (status, body) = post_json(&a, reqwest::Method::PUT, "/v1/catalog", catalog).await;
    assert_eq!(status, 200, "{body}");
    let check = serde_json::json!({"org_id": "acme", "feature": "exports"});
    let b_sees_it = within(Duration::from_secs(5), || async {
        post_json(&b, reqwest::Method::POST, "/v1/check", check.clone())
            .await
            .1["kind"]
            == "metered"
    })
    .await;
    assert!(b_sees_it, "the second process picks up the catalog");
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let client = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move {
                let body = serde_json::json!({"org_id": "acme", "feature": "exports", "amount": 1,
                                              "idempotency_key": format!("export-{i}")});
                let (status, answer) =
                    post_json(&client, reqwest::Method::POST, "/v1/consume", body).await;
                assert_eq!(status, 200, "{answer}");
                answer["allowed"].as_bool().unwrap()
            })
        })
        .collect();
    let mut granted = 0;
    for task in tasks {
        if task.await.unwrap() {
            granted += 1;
        }
    }
    assert_eq!(granted, 10, "exactly the hard limit, across processes");
    // What is stored, through a third process with an empty cache.
    let third = Served::start(&db);
    let c = third.client().with_key(&secret);
    let (_, answer) = post_json(&c, reqwest::Method::POST, "/v1/check", check).await;
    assert_eq!(answer["used"], 10);
}

/// A webhook receiver that answers nothing while `hold` is set (so the
/// sender is mid-delivery), and 204 otherwise. Records `webhook-id`s.
#[derive(Default)]
struct Receiver {
    hold: std::sync::atomic::AtomicBool,
    held: std::sync::Mutex<Vec<String>>,
    delivered: std::sync::Mutex<Vec<String>>,
}

async fn serve_receiver(receiver: std::sync::Arc<Receiver>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let receiver = receiver.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buffer = [0u8; 4096];
                // Headers, then a body of Content-Length bytes.
                let (head_end, length) = loop {
                    let Ok(n) = socket.read(&mut buffer).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    request.extend_from_slice(&buffer[..n]);
                    if let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&request[..end]).to_lowercase();
                        let length = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        break (end + 4, length);
                    }
                };
                while request.len() < head_end + length {
                    let Ok(n) = socket.read(&mut buffer).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    request.extend_from_slice(&buffer[..n]);
                }
                let head = String::from_utf8_lossy(&request[..head_end]).to_lowercase();
                let id = head
                    .lines()
                    .find_map(|l| l.strip_prefix("webhook-id:"))
                    .map(|v| v.trim().to_owned())
                    .unwrap_or_default();
                if receiver.hold.load(std::sync::atomic::Ordering::SeqCst) {
                    receiver.held.lock().unwrap().push(id.clone());
                    // Never answer: the sender stays mid-delivery.
                    std::future::pending::<()>().await;
                }
                receiver.delivered.lock().unwrap().push(id);
                let _ = socket
                    .write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await;
            });
        }
    });
    url
}

/// `kill -9` while webhook deliveries are in flight loses none: every
/// message committed with its signup is delivered after a restart (at
/// least once; the interrupted ones again, with the same `webhook-id`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_delivery_loses_no_outbox_row() {
    let db = TestDatabase::create(Backend::Sqlite).await;
    let receiver = std::sync::Arc::new(Receiver::default());
    receiver
        .hold
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let url = serve_receiver(receiver.clone()).await;
    // A 1 s attempt timeout makes the lease 3 s, so the restarted server
    // retries the interrupted deliveries quickly.
    let env = [
        ("FLYWHEEL_WEBHOOKS__REQUEST_TIMEOUT_SECS", "1"),
        ("FLYWHEEL_WEBHOOKS__POLL_INTERVAL_MS", "100"),
    ];
    let mut served = Served::start_with(&db, &env);
    let secret = served.key_from_banner("secret key:");
    let client = served.client().with_key(&secret);
    let (status, endpoint) = post_json(
        &client,
        reqwest::Method::POST,
        "/v1/webhook-endpoints",
        serde_json::json!({"url": url, "event_types": ["user.signed_up"]}),
    )
    .await;
    assert_eq!(status, 201, "{endpoint}");
    for i in 0..20 {
        let (status, body) = post_json(
            &client,
            reqwest::Method::POST,
            "/v1/signup",
            serde_json::json!({"email": format!("user{i}@example.com"), "idempotency_key": format!("k{i}")}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    let in_flight = within(Duration::from_secs(10), || async {
        !receiver.held.lock().unwrap().is_empty()
    })
    .await;
    assert!(in_flight, "deliveries reached the receiver");
    served.signal("KILL");
    let _ = served.child.wait();
    drop(served);
    let interrupted = receiver.held.lock().unwrap().clone();
    assert!(receiver.delivered.lock().unwrap().is_empty());

    receiver
        .hold
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let restarted = Served::start_with(&db, &env);
    let all_delivered = within(Duration::from_secs(30), || async {
        let mut ids = receiver.delivered.lock().unwrap().clone();
        ids.sort();
        ids.dedup();
        ids.len() == 20
    })
    .await;
    assert!(
        all_delivered,
        "all 20 messages delivered after the restart: {:?}",
        receiver.delivered.lock().unwrap()
    );
    let delivered = receiver.delivered.lock().unwrap().clone();
    for id in &interrupted {
        assert!(delivered.contains(id), "interrupted {id} was sent again");
    }
    let client = restarted.client().with_key(&secret);
    let list = || async {
        let listed: Value = client
            .send(client.request(reqwest::Method::GET, "/v1/webhook-deliveries?limit=100"))
            .await
            .unwrap();
        listed
    };
    // The receiver has the last body a moment before the sender records
    // its success: wait (bounded) for the records to catch up.
    let recorded = within(Duration::from_secs(30), || async {
        let listed = list().await;
        let deliveries = listed["deliveries"].as_array().unwrap();
        deliveries.len() == 20 && deliveries.iter().all(|d| d["status"] == "succeeded")
    })
    .await;
    assert!(
        recorded,
        "every delivery recorded as succeeded: {}",
        list().await
    );
}
