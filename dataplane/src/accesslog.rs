//! The access log: one JSON line per request, on stderr, written in batches.
//!
//! Formatting a line through `tracing`'s JSON layer and writing it with its own syscall cost
//! more than the rest of the request path together (measured: 8–20 µs per request). Here a
//! request serializes one small struct into the shared buffer under a short lock; a
//! background task writes the buffer out every 50 ms (or sooner when it grows past 256 KiB),
//! so a busy proxy makes a handful of write calls per second. Lines carry the same fields
//! as other log lines (`timestamp`, `level`, `message`, `target`), never a secret.
//!
//! Writing happens on a thread of its own, fed by a bounded queue of batches: a slow or
//! stuck log reader (a full pipe) never blocks a request. When the queue is full the batch
//! is dropped and its lines counted (`modelgate_access_log_dropped_lines_total`).

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use serde::Serialize;

const FLUSH_EVERY: Duration = Duration::from_millis(50);
const FLUSH_AT: usize = 256 * 1024;
/// Batches waiting for the writer at most (16 × 256 KiB).
const QUEUE: usize = 16;

static SINK: OnceLock<Sink> = OnceLock::new();
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// What the writer thread gets: a batch, or a request to confirm everything before it is out.
enum Job {
    Batch(Vec<u8>),
    Barrier(SyncSender<()>),
}

struct Sink {
    buf: Mutex<Vec<u8>>,
    queue: SyncSender<Job>,
}

/// Access log lines dropped because the writer could not keep up.
pub fn dropped_lines() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

fn hand_over(queue: &SyncSender<Job>, batch: Vec<u8>) {
    if let Err(TrySendError::Full(Job::Batch(b)) | TrySendError::Disconnected(Job::Batch(b))) =
        queue.try_send(Job::Batch(batch))
    {
        DROPPED.fetch_add(
            memchr::memchr_iter(b'\n', &b).count() as u64,
            Ordering::Relaxed,
        );
    }
}

fn writer(jobs: Receiver<Job>, mut out: Box<dyn Write + Send>) {
    for job in jobs {
        match job {
            // A full or closed stderr must never fail anything: a failed write is dropped.
            Job::Batch(b) => {
                let _ = out.write_all(&b);
            }
            Job::Barrier(done) => {
                let _ = out.flush();
                let _ = done.send(());
            }
        }
    }
}

fn start(out: Box<dyn Write + Send>) -> Sink {
    let (queue, jobs) = std::sync::mpsc::sync_channel(QUEUE);
    let _ = std::thread::Builder::new()
        .name("access-log".into())
        .spawn(move || writer(jobs, out));
    Sink {
        buf: Mutex::new(Vec::with_capacity(FLUSH_AT)),
        queue,
    }
}

/// One request, as logged.
#[derive(Serialize)]
pub struct Entry<'a> {
    pub request_id: &'a str,
    pub endpoint: &'a str,
    pub model: &'a str,
    pub route: &'a str,
    pub backend: &'a str,
    pub key: &'a str,
    pub status: u16,
    pub outcome: &'a str,
    pub stream: bool,
    pub attempts: u32,
    pub duration_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttft_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overhead_us: Option<u64>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// `reported` (the upstream's numbers), `estimated` (it reported none: the prompt
    /// estimate and the streamed text) or `none` (no model was reached).
    pub usage: &'a str,
    /// How the (last) choice of a stream ended, when the upstream said.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<&'a str>,
    pub cost_usd: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
}

#[derive(Serialize)]
struct Line<'a> {
    timestamp: String,
    level: &'static str,
    message: &'static str,
    #[serde(flatten)]
    entry: &'a Entry<'a>,
    target: &'static str,
}

/// Turn the access log on (the proxy binary does; library users and tests may not).
pub fn enable() {
    let _ = SINK.get_or_init(|| start(Box::new(std::io::stderr())));
}

/// Record one request (a no-op unless enabled).
pub fn record(entry: &Entry<'_>) {
    let Some(sink) = SINK.get() else { return };
    record_into(sink, entry);
}

fn record_into(sink: &Sink, entry: &Entry<'_>) {
    let line = Line {
        timestamp: humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
        level: "INFO",
        message: "request",
        entry,
        target: "modelgate::access",
    };
    let full = {
        let mut buf = sink.buf.lock().unwrap_or_else(|e| e.into_inner());
        if serde_json::to_writer(&mut *buf, &line).is_ok() {
            buf.push(b'\n');
        }
        (buf.len() >= FLUSH_AT).then(|| std::mem::replace(&mut *buf, Vec::with_capacity(FLUSH_AT)))
    };
    if let Some(batch) = full {
        hand_over(&sink.queue, batch);
    }
}

fn take(sink: &Sink) -> Option<Vec<u8>> {
    let mut buf = sink.buf.lock().unwrap_or_else(|e| e.into_inner());
    (!buf.is_empty()).then(|| std::mem::replace(&mut *buf, Vec::with_capacity(FLUSH_AT)))
}

/// Hand whatever is buffered to the writer, and wait (at most 2 s) until it is written:
/// the last lines at shutdown.
pub fn flush() {
    let Some(sink) = SINK.get() else { return };
    if let Some(batch) = take(sink) {
        let _ = sink.queue.send(Job::Batch(batch));
    }
    let (done, wait) = std::sync::mpsc::sync_channel(1);
    if sink.queue.send(Job::Barrier(done)).is_ok() {
        let _ = wait.recv_timeout(Duration::from_secs(2));
    }
}

/// Hand the buffer to the writer every 50 ms until the process ends (never blocking).
pub async fn flusher() {
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    loop {
        tick.tick().await;
        if let Some(sink) = SINK.get()
            && let Some(batch) = take(sink)
        {
            hand_over(&sink.queue, batch);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log reader that never reads: every write blocks until the test ends.
    struct Stuck(std::sync::mpsc::Receiver<()>);

    impl Write for Stuck {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _ = self.0.recv();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stuck_log_reader_never_blocks_a_request() {
        let (_release, stuck) = std::sync::mpsc::channel();
        let sink = start(Box::new(Stuck(stuck)));
        let entry = Entry {
            request_id: "r",
            endpoint: "chat",
            model: "m",
            route: "default/r",
            backend: "b",
            key: "default/k",
            status: 200,
            outcome: "ok",
            stream: false,
            attempts: 1,
            duration_ms: 1.0,
            ttft_ms: None,
            overhead_us: None,
            input_tokens: 1,
            output_tokens: 1,
            usage: "reported",
            finish_reason: None,
            cost_usd: 0.0,
            error: None,
        };
        let before = dropped_lines();
        // Far more than the queue holds (16 batches of 256 KiB, about 5 MiB): recording
        // keeps returning, and once the queue is full lines are dropped and counted.
        let mut recorded = 0;
        while dropped_lines() == before && recorded < 1_000_000 {
            record_into(&sink, &entry);
            recorded += 1;
        }
        assert!(
            dropped_lines() > before,
            "lines were dropped and counted, not waited on"
        );
    }
}
