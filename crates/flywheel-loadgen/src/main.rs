//! `flywheel-loadgen`: load for Flywheel's SSE stream (`GET /v1/stream`).
//!
//! - `prompt-latency` opens N streams, then for M users sends three
//!   `project_created` events (the third crosses an activation milestone,
//!   which the server turns into an upgrade prompt) and measures from the
//!   third POST's 2xx to the `prompt` event on that user's stream.
//! - `idle-streams` opens N idle streams and reports the server's resident
//!   memory before and after.
//!
//! Exit status: 0 when everything measured was fine, 2 when it measured but
//! something failed (timeouts, errors, closed streams, missing connections;
//! the output says what), 1 when it could not measure at all.
//!
//! The open-file limit must be raised by the caller (`ulimit -n`): the
//! workspace forbids the unsafe code `setrlimit` would need; the limit is
//! checked at start.

mod procfs;
mod sse;
mod stats;
mod streams;

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use reqwest::header::{CONTENT_TYPE, RETRY_AFTER};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::streams::{OpenOptions, OpenStreams};

#[derive(Debug, Parser)]
#[command(
    name = "flywheel-loadgen",
    version,
    about = "Load generator for Flywheel's SSE streams"
)]
struct Cli {
    /// Worker threads of this load generator (it shares the machine with the server).
    #[arg(long, global = true, default_value_t = 1)]
    threads: usize,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Prompt delivery latency over open streams: from the 2xx of the event
    /// that crosses a milestone to the `prompt` event on the user's stream.
    PromptLatency(PromptLatency),
    /// The server's memory per idle stream.
    IdleStreams(IdleStreams),
}

#[derive(Debug, Args)]
struct Common {
    /// The server, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    base: String,
    /// The publishable key the streams authenticate with (`?key=`).
    #[arg(long)]
    publishable_key: String,
    /// The stream's path (another SSE endpoint can be compared, e.g.
    /// /v1/flags/stream; the user_id, org_id and key parameters are sent alike).
    #[arg(long, default_value = "/v1/stream")]
    stream_path: String,
    /// Streams being connected at once while opening.
    #[arg(long, default_value_t = 200)]
    open_concurrency: usize,
    /// Seconds one stream may take from connect to its first event.
    #[arg(long, default_value_t = 30)]
    open_timeout_secs: u64,
    /// Print one JSON line on stdout (the human summary goes to stderr).
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct PromptLatency {
    #[command(flatten)]
    common: Common,
    /// The secret key events are sent with.
    #[arg(long)]
    secret_key: String,
    /// Streams held open during the measurement.
    #[arg(long, default_value_t = 1000)]
    streams: usize,
    /// Users measured (the first `samples` of the streams' users).
    #[arg(long, default_value_t = 500)]
    samples: usize,
    /// Users being driven at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Milliseconds to wait for a prompt after the 2xx; longer is a timeout.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
}

#[derive(Debug, Args)]
struct IdleStreams {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 10_000)]
    streams: usize,
    /// The server's process id, to read its VmRSS from /proc.
    #[arg(long)]
    pid: Option<u32>,
    /// Seconds to hold the streams open before reading memory again.
    #[arg(long, default_value_t = 5)]
    hold_secs: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.threads.max(1))
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("flywheel-loadgen: starting the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let outcome = runtime.block_on(async {
        match cli.command {
            Command::PromptLatency(args) => prompt_latency(args).await,
            Command::IdleStreams(args) => idle_streams(args).await,
        }
    });
    // Streams still open are dropped with the runtime, without waiting.
    runtime.shutdown_background();
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(2),
        Err(e) => {
            eprintln!("flywheel-loadgen: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// A short random tag, so users of one run never meet those of another.
fn run_tag() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..6].to_string()
}

fn base_and_port(base: &str) -> Result<(String, u16)> {
    let base = base.trim_end_matches('/').to_string();
    let url = reqwest::Url::parse(&base).with_context(|| format!("--base {base:?}"))?;
    if url.scheme() != "http" {
        bail!("--base must be http:// (this build has no TLS)");
    }
    let port = url.port_or_known_default().context("--base has no port")?;
    Ok((base, port))
}

fn stream_url(base: &str, path: &str, pk: &str, user: &str, org: Option<&str>) -> Result<String> {
    let mut url = reqwest::Url::parse(&format!("{base}{path}"))?;
    {
        let mut query = url.query_pairs_mut();
        query.append_pair("user_id", user);
        if let Some(org) = org {
            query.append_pair("org_id", org);
        }
        query.append_pair("key", pk);
    }
    Ok(url.into())
}

/// Prints the human summary (stdout, or stderr with `--json`) and the JSON line.
fn report(json_mode: bool, lines: &[String], value: &Value) {
    for line in lines {
        if json_mode {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    }
    if json_mode {
        println!("{value}");
    }
}

async fn open_streams(
    common: &Common,
    urls: Vec<String>,
    port: u16,
) -> Result<(OpenStreams, Option<usize>)> {
    let client = streams::stream_client()?;
    let before = procfs::established_to_port(port).ok();
    let opened = streams::open(
        &client,
        urls,
        &OpenOptions {
            concurrency: common.open_concurrency,
            timeout: Duration::from_secs(common.open_timeout_secs),
        },
    )
    .await?;
    // Connections this process holds to the server beyond those it held before.
    let connections = procfs::established_to_port(port)
        .ok()
        .map(|now| now.saturating_sub(before.unwrap_or(0)));
    Ok((opened, connections))
}

#[derive(Default)]
struct SampleTally {
    latencies_us: Mutex<Vec<u64>>,
    timeouts: AtomicUsize,
    errors: AtomicUsize,
    arrived_before_ack: AtomicUsize,
    rate_limited: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl SampleTally {
    fn error(&self, message: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.first_error
            .lock()
            .expect("not poisoned")
            .get_or_insert(message);
    }
}

async fn prompt_latency(args: PromptLatency) -> Result<bool> {
    let common = &args.common;
    let (base, port) = base_and_port(&common.base)?;
    if args.streams == 0 || args.samples == 0 || args.samples > args.streams {
        bail!("need 0 < --samples <= --streams");
    }
    procfs::require_open_files(args.streams as u64 + args.concurrency as u64 + 64)?;
    let tag = run_tag();
    let users: Vec<(String, String)> = (0..args.streams)
        .map(|i| (format!("{tag}-u{i}"), format!("{tag}-o{i}")))
        .collect();
    let urls = users
        .iter()
        .map(|(user, org)| {
            stream_url(
                &base,
                &common.stream_path,
                &common.publishable_key,
                user,
                Some(org),
            )
        })
        .collect::<Result<Vec<_>>>()?;

    let (opened, connections) = open_streams(common, urls, port).await?;
    let open_ms = opened.open_time.as_secs_f64() * 1000.0;

    // One pooled client for the events, apart from the streams' connections.
    let poster = reqwest::Client::builder()
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(10))
        .build()?;
    let tally = Arc::new(SampleTally::default());
    let next = Arc::new(AtomicUsize::new(0));
    let users = Arc::new(users);
    let prompts = Arc::new(opened.prompts.clone());
    let events_url = Arc::new(format!("{base}/v1/events"));
    let sk = Arc::new(args.secret_key.clone());
    let wait = Duration::from_millis(args.timeout_ms);
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..args.concurrency.clamp(1, args.samples) {
        let (poster, tally, next, users, prompts, url, sk) = (
            poster.clone(),
            tally.clone(),
            next.clone(),
            users.clone(),
            prompts.clone(),
            events_url.clone(),
            sk.clone(),
        );
        let samples = args.samples;
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= samples {
                    return;
                }
                let (user, org) = &users[i];
                sample(
                    &poster,
                    &url,
                    &sk,
                    user,
                    org,
                    prompts[i].clone(),
                    wait,
                    &tally,
                )
                .await;
            }
        }));
    }
    for worker in workers {
        worker.await.context("a sampling task panicked")?;
    }
    let sampling_secs = started.elapsed().as_secs_f64();
    let stats = opened.stats.clone();
    opened.close();

    let latencies = tally.latencies_us.lock().expect("not poisoned").clone();
    let summary = stats::summarize(&latencies);
    let timeouts = tally.timeouts.load(Ordering::Relaxed);
    let errors = tally.errors.load(Ordering::Relaxed);
    let before_ack = tally.arrived_before_ack.load(Ordering::Relaxed);
    let rate_limited = tally.rate_limited.load(Ordering::Relaxed);
    let closed = stats.closed.load(Ordering::Relaxed);
    let unexpected_first = stats.unexpected_first.load(Ordering::Relaxed);
    let connections_ok = connections.is_none_or(|c| c == args.streams);
    let ok = timeouts == 0 && errors == 0 && closed == 0 && connections_ok;
    let first_error = tally.first_error.lock().expect("not poisoned").clone();
    let first_close = stats
        .first_close_reason
        .lock()
        .expect("not poisoned")
        .clone();

    let mut lines = vec![
        format!(
            "streams opened:     {} in {open_ms:.0} ms ({} connections to the server{})",
            args.streams,
            connections.map_or("?".into(), |c| c.to_string()),
            if connections_ok { "" } else { ": MISMATCH" }
        ),
        format!(
            "samples:            {} in {sampling_secs:.1} s (concurrency {}): {} measured, {timeouts} timeouts (> {} ms), {errors} errors, {before_ack} arrived before the ack",
            args.samples,
            args.concurrency,
            latencies.len(),
            args.timeout_ms
        ),
    ];
    match &summary {
        Some(s) => lines.push(format!(
            "prompt latency µs:  p50 {}  p90 {}  p99 {}  max {}  mean {}",
            s.p50, s.p90, s.p99, s.max, s.mean
        )),
        None => lines.push("prompt latency µs:  nothing measured".into()),
    }
    lines.push(format!(
        "stream events:      {} ({} prompts, {} heartbeats); {closed} streams closed early; {unexpected_first} first events not `flags`; {rate_limited} POSTs retried after 429",
        stats.events.load(Ordering::Relaxed),
        stats.prompts.load(Ordering::Relaxed),
        stats.heartbeats.load(Ordering::Relaxed),
    ));
    let without_id = stats.prompts_without_id.load(Ordering::Relaxed);
    let not_json = stats.prompts_not_json.load(Ordering::Relaxed);
    if without_id + not_json > 0 {
        lines.push(format!(
            "contract warnings:  {without_id} prompt events without `id:`, {not_json} whose data is not a JSON object"
        ));
    }
    let first_prompt = stats.first_prompt.lock().expect("not poisoned").clone();
    if let Some(prompt) = &first_prompt {
        lines.push(format!(
            "a prompt's data:    {}",
            prompt.chars().take(300).collect::<String>()
        ));
    }
    if let Some(e) = &first_error {
        lines.push(format!("first error:        {e}"));
    }
    if let Some(e) = &first_close {
        lines.push(format!("first early close:  {e}"));
    }
    let value = json!({
        "mode": "prompt-latency",
        "ok": ok,
        "streams": args.streams,
        "connections": connections,
        "open_ms": (open_ms * 10.0).round() / 10.0,
        "samples": args.samples,
        "measured": latencies.len(),
        "timeouts": timeouts,
        "errors": errors,
        "arrived_before_ack": before_ack,
        "p50_us": summary.map(|s| s.p50),
        "p90_us": summary.map(|s| s.p90),
        "p99_us": summary.map(|s| s.p99),
        "max_us": summary.map(|s| s.max),
        "mean_us": summary.map(|s| s.mean),
        "rate_limited_retries": rate_limited,
        "streams_closed": closed,
        "unexpected_first_events": unexpected_first,
        "stream_events": stats.events.load(Ordering::Relaxed),
        "stream_prompts": stats.prompts.load(Ordering::Relaxed),
        "heartbeats": stats.heartbeats.load(Ordering::Relaxed),
        "prompts_without_id": without_id,
        "prompts_not_json": not_json,
        "first_prompt": first_prompt,
        "first_error": first_error,
        "first_close": first_close,
    });
    report(common.json, &lines, &value);
    Ok(ok)
}

/// One user: two events, then the third (the crossing one), timed to the
/// prompt on the user's stream.
#[allow(clippy::too_many_arguments)]
async fn sample(
    client: &reqwest::Client,
    url: &str,
    sk: &str,
    user: &str,
    org: &str,
    mut prompt: tokio::sync::watch::Receiver<Option<Instant>>,
    wait: Duration,
    tally: &SampleTally,
) {
    for n in 1..=3 {
        if n == 3 && prompt.borrow().is_some() {
            tally.error(format!(
                "{user}: a prompt arrived before the third event was sent"
            ));
            return;
        }
        let acked = match post_event(client, url, sk, user, org, tally).await {
            Ok(acked) => acked,
            Err(e) => {
                tally.error(format!("{user}: event {n}: {e:#}"));
                return;
            }
        };
        if n < 3 {
            continue;
        }
        let arrived =
            tokio::time::timeout_at((acked + wait).into(), prompt.wait_for(Option::is_some)).await;
        match arrived {
            Ok(Ok(at)) => {
                let at = at.expect("waited for Some");
                let latency = match at.checked_duration_since(acked) {
                    Some(latency) if at > acked => latency,
                    _ => {
                        tally.arrived_before_ack.fetch_add(1, Ordering::Relaxed);
                        Duration::ZERO
                    }
                };
                tally
                    .latencies_us
                    .lock()
                    .expect("not poisoned")
                    .push(latency.as_micros() as u64);
            }
            Ok(Err(_)) => tally.error(format!("{user}: the stream closed before the prompt")),
            Err(_) => {
                tally.timeouts.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// POSTs one `project_created` event; returns the instant its 2xx answer
/// (status and body) was in. A 429 is retried after its `Retry-After`
/// (same event id, so nothing is counted twice).
async fn post_event(
    client: &reqwest::Client,
    url: &str,
    sk: &str,
    user: &str,
    org: &str,
    tally: &SampleTally,
) -> Result<Instant> {
    let body = json!({"batch": [{
        "type": "track",
        "event": "project_created",
        "user_id": user,
        "org_id": org,
        "event_id": uuid::Uuid::new_v4().to_string(),
    }]})
    .to_string();
    for _ in 0..50 {
        let response = client
            .post(url)
            .bearer_auth(sk)
            .header(CONTENT_TYPE, "application/json")
            .body(body.clone())
            .send()
            .await
            .context("POST /v1/events")?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok());
        let bytes = response.bytes().await.context("reading the answer")?;
        let acked = Instant::now();
        if status == StatusCode::TOO_MANY_REQUESTS {
            tally.rate_limited.fetch_add(1, Ordering::Relaxed);
            let secs = retry_after.unwrap_or(0.05).clamp(0.01, 2.0);
            tokio::time::sleep(Duration::from_secs_f64(secs)).await;
            continue;
        }
        let text = String::from_utf8_lossy(&bytes);
        if !status.is_success() {
            bail!(
                "answered {status}: {}",
                text.chars().take(500).collect::<String>()
            );
        }
        let outcome: Value = serde_json::from_slice(&bytes)
            .with_context(|| format!("the answer is not JSON: {text}"))?;
        if outcome["accepted"] != json!(1) {
            bail!("the event was not accepted: {text}");
        }
        return Ok(acked);
    }
    bail!("still rate limited after 50 tries")
}

async fn idle_streams(args: IdleStreams) -> Result<bool> {
    let common = &args.common;
    let (base, port) = base_and_port(&common.base)?;
    if args.streams == 0 {
        bail!("need --streams > 0");
    }
    procfs::require_open_files(args.streams as u64 + 64)?;
    let rss = |pid: Option<u32>| pid.map(procfs::rss_kb).transpose();
    let rss_before = rss(args.pid)?;
    let tag = run_tag();
    let urls = (0..args.streams)
        .map(|i| {
            stream_url(
                &base,
                &common.stream_path,
                &common.publishable_key,
                &format!("{tag}-idle{i}"),
                None,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let (opened, connections_at_open) = open_streams(common, urls, port).await?;
    let open_ms = opened.open_time.as_secs_f64() * 1000.0;
    tokio::time::sleep(Duration::from_secs(args.hold_secs)).await;
    // The server may have died meanwhile: report that with the streams.
    let (rss_after, rss_error) = match rss(args.pid) {
        Ok(rss) => (rss, None),
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    let connections = procfs::established_to_port(port).ok();
    let own_rss = procfs::rss_kb(std::process::id()).ok();
    let stats = opened.stats.clone();
    let closed = stats.closed.load(Ordering::Relaxed);
    let still_open = args.streams - closed.min(args.streams);
    let first_close = stats
        .first_close_reason
        .lock()
        .expect("not poisoned")
        .clone();
    opened.close();

    let delta_kb = match (rss_before, rss_after) {
        (Some(before), Some(after)) => Some(after as i64 - before as i64),
        _ => None,
    };
    let per_stream_bytes = delta_kb.map(|d| d * 1024 / args.streams as i64);
    // Decimal megabytes (10^6 bytes) for 10,000 streams, scaled from N.
    let mb_per_10000 = delta_kb.map(|d| {
        let mb = d as f64 * 1024.0 * 10_000.0 / args.streams as f64 / 1e6;
        (mb * 10.0).round() / 10.0
    });
    let connections_ok = connections.is_none_or(|c| c >= args.streams);
    let ok = closed == 0 && connections_ok && rss_error.is_none();

    let kb = |v: Option<u64>| v.map_or("?".to_string(), |v| v.to_string());
    let mut lines = vec![
        format!(
            "idle streams:       {} opened in {open_ms:.0} ms, {still_open} still open after {} s; this process holds {} connections to the server{}",
            args.streams,
            args.hold_secs,
            connections.map_or("?".into(), |c| c.to_string()),
            if connections_ok { "" } else { " (FEWER THAN STREAMS)" }
        ),
        format!(
            "server VmRSS:       {} kB before, {} kB after",
            kb(rss_before),
            kb(rss_after)
        ),
    ];
    if let (Some(per), Some(mb)) = (per_stream_bytes, mb_per_10000) {
        lines.push(format!(
            "per stream:         {per} bytes ({mb} MB per 10,000 streams)"
        ));
    }
    lines.push(format!(
        "this load generator: VmRSS {} kB, {} heartbeats seen",
        kb(own_rss),
        stats.heartbeats.load(Ordering::Relaxed)
    ));
    if let Some(e) = &rss_error {
        lines.push(format!("server memory:      {e}"));
    }
    if let Some(e) = &first_close {
        lines.push(format!("first early close:  {e}"));
    }
    let value = json!({
        "mode": "idle-streams",
        "ok": ok,
        "streams": args.streams,
        "still_open": still_open,
        "open_ms": (open_ms * 10.0).round() / 10.0,
        "hold_secs": args.hold_secs,
        "connections": connections,
        "connections_at_open": connections_at_open,
        "rss_before_kb": rss_before,
        "rss_after_kb": rss_after,
        "per_stream_bytes": per_stream_bytes,
        "mb_per_10000": mb_per_10000,
        "loadgen_rss_kb": own_rss,
        "heartbeats": stats.heartbeats.load(Ordering::Relaxed),
        "first_close": first_close,
        "rss_error": rss_error,
    });
    report(common.json, &lines, &value);
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_urls_carry_the_user_org_and_key() {
        assert_eq!(
            stream_url(
                "http://127.0.0.1:8080",
                "/v1/stream",
                "pk_1",
                "ab12cd-u0",
                Some("ab12cd-o0")
            )
            .unwrap(),
            "http://127.0.0.1:8080/v1/stream?user_id=ab12cd-u0&org_id=ab12cd-o0&key=pk_1"
        );
        assert_eq!(
            stream_url(
                "http://127.0.0.1:8080",
                "/v1/flags/stream",
                "pk_1",
                "a b",
                None
            )
            .unwrap(),
            "http://127.0.0.1:8080/v1/flags/stream?user_id=a+b&key=pk_1"
        );
    }

    #[test]
    fn the_base_gives_its_port() {
        assert_eq!(
            base_and_port("http://127.0.0.1:4000/").unwrap(),
            ("http://127.0.0.1:4000".to_string(), 4000)
        );
        assert_eq!(base_and_port("http://localhost").unwrap().1, 80);
        assert!(base_and_port("https://127.0.0.1:4000").is_err());
    }

    #[test]
    fn run_tags_are_six_hex_and_differ() {
        let (a, b) = (run_tag(), run_tag());
        assert_eq!(a.len(), 6);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
