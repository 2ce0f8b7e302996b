//! Many SSE connections at once: each one its own task and its own TCP
//! connection, reading and parsing its stream. The task timestamps a chunk
//! as soon as `chunk()` hands it over, before parsing and before anything is
//! passed to another task, so the instant is the one a client sees.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use reqwest::header::{ACCEPT, CONTENT_TYPE};
use tokio::sync::{oneshot, watch, Semaphore};

use crate::sse::SseParser;

/// Counters shared by every stream task.
#[derive(Debug, Default)]
pub struct StreamStats {
    /// Streams that got their first event.
    pub ready: AtomicUsize,
    /// Streams that ended or failed after they were ready.
    pub closed: AtomicUsize,
    pub events: AtomicU64,
    pub prompts: AtomicU64,
    pub heartbeats: AtomicU64,
    /// Streams whose first event was not `flags`.
    pub unexpected_first: AtomicUsize,
    /// `prompt` events without an `id:` field, or whose data is not a JSON object.
    pub prompts_without_id: AtomicUsize,
    pub prompts_not_json: AtomicUsize,
    /// The data of the first `prompt` event seen, to show what was measured.
    pub first_prompt: Mutex<Option<String>>,
    pub first_close_reason: Mutex<Option<String>>,
}

impl StreamStats {
    fn record_close(&self, reason: String) {
        self.closed.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_close_reason.lock().expect("not poisoned");
        first.get_or_insert(reason);
    }
}

/// The open streams. Dropping it leaves the tasks running until the runtime
/// ends; `close` ends them.
pub struct OpenStreams {
    /// Per stream: the instant its first `prompt` event arrived.
    pub prompts: Vec<watch::Receiver<Option<Instant>>>,
    pub stats: Arc<StreamStats>,
    /// From the first connect to the last stream's first event.
    pub open_time: Duration,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl OpenStreams {
    pub fn close(self) {
        for task in self.tasks {
            task.abort();
        }
    }
}

pub struct OpenOptions {
    /// Connections being set up at once (the server's accept backlog is finite).
    pub concurrency: usize,
    /// For one stream, from the start of its connect to its first event.
    pub timeout: Duration,
}

/// A client for streams: HTTP/1.1 (the workspace's reqwest has no HTTP/2),
/// so each in-flight stream holds a connection of its own.
pub fn stream_client() -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(usize::MAX)
        .build()?)
}

/// Opens one stream per URL and waits until each has delivered its first
/// event. Fails, closing them all, if any stream fails to open.
pub async fn open(
    client: &reqwest::Client,
    urls: Vec<String>,
    options: &OpenOptions,
) -> Result<OpenStreams> {
    let stats = Arc::new(StreamStats::default());
    let gate = Arc::new(Semaphore::new(options.concurrency.max(1)));
    let mut prompts = Vec::with_capacity(urls.len());
    let mut readies = Vec::with_capacity(urls.len());
    let mut tasks = Vec::with_capacity(urls.len());
    let started = Instant::now();
    for url in urls {
        let (prompt_tx, prompt_rx) = watch::channel(None);
        let (ready_tx, ready_rx) = oneshot::channel();
        prompts.push(prompt_rx);
        readies.push(ready_rx);
        let task = Stream {
            client: client.clone(),
            url,
            stats: stats.clone(),
            prompt: prompt_tx,
            timeout: options.timeout,
        };
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            let Ok(permit) = gate.acquire_owned().await else {
                return;
            };
            task.run(permit, ready_tx).await;
        }));
    }
    let total = readies.len();
    let mut failed = 0usize;
    let mut first_failure = None;
    for ready in readies {
        let outcome = ready
            .await
            .unwrap_or_else(|_| Err("the stream task ended".into()));
        if let Err(reason) = outcome {
            failed += 1;
            first_failure.get_or_insert(reason);
        }
    }
    let open_time = started.elapsed();
    let streams = OpenStreams {
        prompts,
        stats,
        open_time,
        tasks,
    };
    if failed > 0 {
        streams.close();
        bail!(
            "{failed} of {total} streams did not open; the first: {}",
            first_failure.unwrap_or_default()
        );
    }
    Ok(streams)
}

struct Stream {
    client: reqwest::Client,
    url: String,
    stats: Arc<StreamStats>,
    prompt: watch::Sender<Option<Instant>>,
    timeout: Duration,
}

impl Stream {
    async fn run(
        self,
        permit: tokio::sync::OwnedSemaphorePermit,
        ready: oneshot::Sender<Result<(), String>>,
    ) {
        let mut parser = SseParser::new();
        let opening = tokio::time::timeout(self.timeout, async {
            let mut response = self.connect().await?;
            loop {
                match response.chunk().await {
                    Ok(Some(bytes)) => {
                        if self.take(&mut parser, &bytes, true) > 0 {
                            return Ok(response);
                        }
                    }
                    Ok(None) => return Err("the stream ended before its first event".to_string()),
                    Err(e) => return Err(format!("reading the stream: {e}")),
                }
            }
        })
        .await;
        let mut response = match opening {
            Ok(Ok(response)) => response,
            Ok(Err(reason)) => {
                let _ = ready.send(Err(reason));
                return;
            }
            Err(_) => {
                let _ = ready.send(Err(format!(
                    "no first event within {} s",
                    self.timeout.as_secs_f64()
                )));
                return;
            }
        };
        self.stats.ready.fetch_add(1, Ordering::Relaxed);
        let _ = ready.send(Ok(()));
        drop(permit);
        loop {
            match response.chunk().await {
                Ok(Some(bytes)) => {
                    self.take(&mut parser, &bytes, false);
                }
                Ok(None) => {
                    self.stats
                        .record_close(format!("{}: the server ended the stream", self.url));
                    return;
                }
                Err(e) => {
                    self.stats.record_close(format!("{}: {e}", self.url));
                    return;
                }
            }
        }
    }

    async fn connect(&self) -> Result<reqwest::Response, String> {
        let response = self
            .client
            .get(&self.url)
            .header(ACCEPT, "text/event-stream")
            .send()
            .await
            .map_err(|e| format!("GET {}: {e}", self.url))?;
        let status = response.status();
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        if !status.is_success() || !content_type.starts_with("text/event-stream") {
            let body = response.text().await.unwrap_or_default();
            return Err(format!(
                "GET {} answered {status} ({content_type}): {}",
                self.url,
                body.chars().take(500).collect::<String>()
            ));
        }
        Ok(response)
    }

    /// Parses a chunk; returns the number of events it completed.
    fn take(&self, parser: &mut SseParser, bytes: &[u8], first: bool) -> usize {
        // The arrival instant, before any parsing.
        let at = Instant::now();
        let comments_before = parser.comments();
        let mut events = 0usize;
        parser.feed(bytes, |event| {
            if first && events == 0 && event.event != "flags" {
                self.stats.unexpected_first.fetch_add(1, Ordering::Relaxed);
            }
            events += 1;
            if event.event == "prompt" {
                self.stats.prompts.fetch_add(1, Ordering::Relaxed);
                self.prompt.send_if_modified(|slot| {
                    if slot.is_none() {
                        *slot = Some(at);
                        true
                    } else {
                        false
                    }
                });
                // Checked after the instant is published.
                if event.id.is_none() {
                    self.stats
                        .prompts_without_id
                        .fetch_add(1, Ordering::Relaxed);
                }
                if !serde_json::from_str::<serde_json::Value>(&event.data)
                    .is_ok_and(|v| v.is_object())
                {
                    self.stats.prompts_not_json.fetch_add(1, Ordering::Relaxed);
                }
                let mut first = self.stats.first_prompt.lock().expect("not poisoned");
                first.get_or_insert(event.data);
            }
        });
        self.stats
            .events
            .fetch_add(events as u64, Ordering::Relaxed);
        self.stats
            .heartbeats
            .fetch_add(parser.comments() - comments_before, Ordering::Relaxed);
        events
    }
}
