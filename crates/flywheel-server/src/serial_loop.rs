//! A single-writer loop polled on a thread of its own (the event
//! committer).
//!
//! The committer is the ingestion pipeline's critical path: one loop, one
//! store round trip after another. As a task among the request tasks, every
//! round trip's wake-up (from the store driver's thread) queued behind
//! requests decoding whole batches on the runtime's workers; on its own
//! thread, driven by the same runtime's I/O and timers through
//! `Handle::block_on`, it is polled as soon as it is woken. (The org writer
//! stays a task: its requests are small, and measured on its own thread it
//! was no faster.)

use std::future::Future;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Runs `serial_loop` to completion on a new thread named `name`; the
/// returned task ends when the loop does.
pub fn spawn(
    name: &str,
    serial_loop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<JoinHandle<()>> {
    let runtime = tokio::runtime::Handle::current();
    let (finished, done) = oneshot::channel::<()>();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            runtime.block_on(serial_loop);
            let _ = finished.send(());
        })?;
    Ok(tokio::spawn(async move {
        let _ = done.await;
    }))
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn the_loop_runs_on_its_named_thread_with_the_runtimes_timers() {
        let seen = Arc::new(Mutex::new(None));
        let record = seen.clone();
        let task = super::spawn("serial-loop-test", async move {
            // A timer of the calling runtime works from the loop's thread.
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            *record.lock().unwrap() = std::thread::current().name().map(str::to_string);
        })
        .unwrap();
        task.await.unwrap();
        assert_eq!(
            seen.lock().unwrap().as_deref(),
            Some("serial-loop-test"),
            "the returned task ends after the loop"
        );
    }
}
