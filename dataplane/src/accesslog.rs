//! The access log: one JSON line per request, on stderr, written in batches.
//!
//! Formatting a line through `tracing`'s JSON layer and writing it with its own syscall cost
//! more than the rest of the request path together (measured: 8–20 µs per request). Here a
//! request serializes one small struct into the shared buffer under a short lock; a
//! background task writes the buffer out every 50 ms (or sooner when it grows past 256 KiB),
//! so a busy proxy makes a handful of write calls per second. Lines carry the same fields
//! as other log lines (`timestamp`, `level`, `message`, `target`), never a secret.

use std::io::Write;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use serde::Serialize;

const FLUSH_EVERY: Duration = Duration::from_millis(50);
const FLUSH_AT: usize = 256 * 1024;

static SINK: OnceLock<Sink> = OnceLock::new();

struct Sink {
    buf: Mutex<Vec<u8>>,
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
    let _ = SINK.set(Sink {
        buf: Mutex::new(Vec::with_capacity(FLUSH_AT)),
    });
}

/// Record one request (a no-op unless enabled).
pub fn record(entry: &Entry<'_>) {
    let Some(sink) = SINK.get() else { return };
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
        write_out(&batch);
    }
}

fn write_out(batch: &[u8]) {
    // A full or closed stderr must never fail a request: drop the batch instead.
    let _ = std::io::stderr().lock().write_all(batch);
}

/// Write out whatever is buffered.
pub fn flush() {
    let Some(sink) = SINK.get() else { return };
    let batch = {
        let mut buf = sink.buf.lock().unwrap_or_else(|e| e.into_inner());
        if buf.is_empty() {
            return;
        }
        std::mem::replace(&mut *buf, Vec::with_capacity(FLUSH_AT))
    };
    write_out(&batch);
}

/// Flush every 50 ms until the process ends.
pub async fn flusher() {
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    loop {
        tick.tick().await;
        flush();
    }
}
