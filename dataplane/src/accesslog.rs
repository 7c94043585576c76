//! The access log: one JSON line per request, on stderr, written in batches.
//!
//! Formatting a line through `tracing`'s JSON layer and writing it with its own syscall cost
//! more than the rest of the request path together (measured: 8–20 µs per request). Here a
//! request writes its line straight into the shared buffer under a short lock (by hand: no
//! serializer, no allocation); a
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

use crate::request::write_json_str;

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

/// One request, as logged (fields in this order, the optional ones only when set).
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
    pub ttft_ms: Option<f64>,
    pub overhead_us: Option<u64>,
    /// Prompt tokens neither read from nor written to a cache.
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Written only when the backend reported them.
    pub cache_read_tokens: Option<u64>,
    pub cache_write_tokens: Option<u64>,
    /// Part of `output_tokens`.
    pub reasoning_tokens: Option<u64>,
    /// `reported` (the upstream's numbers), `estimated` (it reported none: the prompt
    /// estimate and the streamed text) or `none` (no model was reached).
    pub usage: &'a str,
    /// How the (last) choice of a stream ended, when the upstream said.
    pub finish_reason: Option<&'a str>,
    pub cost_usd: f64,
    pub error: Option<&'a str>,
    /// What the route's response cache did (hit, miss, bypass); absent without a cache.
    pub cache: Option<&'a str>,
    /// The request's trace (tracing on and the request sampled).
    pub trace_id: Option<&'a str>,
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
    let now = SystemTime::now();
    let full = {
        let mut buf = sink.buf.lock().unwrap_or_else(|e| e.into_inner());
        write_line(&mut buf, now, entry);
        (buf.len() >= FLUSH_AT).then(|| std::mem::replace(&mut *buf, Vec::with_capacity(FLUSH_AT)))
    };
    if let Some(batch) = full {
        hand_over(&sink.queue, batch);
    }
}

/// One JSON line with the fields every log line has (`timestamp`, `level`, `message`,
/// `target`) around the entry's.
fn write_line(out: &mut Vec<u8>, now: SystemTime, e: &Entry<'_>) {
    let mut n = itoa::Buffer::new();
    out.extend_from_slice(b"{\"timestamp\":\"");
    let _ = write!(out, "{}", humantime::format_rfc3339_micros(now));
    out.extend_from_slice(b"\",\"level\":\"INFO\",\"message\":\"request\"");
    for (name, value) in [
        ("request_id", e.request_id),
        ("endpoint", e.endpoint),
        ("model", e.model),
        ("route", e.route),
        ("backend", e.backend),
        ("key", e.key),
    ] {
        field(out, name);
        write_json_str(out, value);
    }
    field(out, "status");
    out.extend_from_slice(n.format(e.status).as_bytes());
    field(out, "outcome");
    write_json_str(out, e.outcome);
    field(out, "stream");
    out.extend_from_slice(if e.stream { b"true" } else { b"false" });
    field(out, "attempts");
    out.extend_from_slice(n.format(e.attempts).as_bytes());
    field(out, "duration_ms");
    millis(out, e.duration_ms);
    if let Some(t) = e.ttft_ms {
        field(out, "ttft_ms");
        millis(out, t);
    }
    if let Some(o) = e.overhead_us {
        field(out, "overhead_us");
        out.extend_from_slice(n.format(o).as_bytes());
    }
    field(out, "input_tokens");
    out.extend_from_slice(n.format(e.input_tokens).as_bytes());
    field(out, "output_tokens");
    out.extend_from_slice(n.format(e.output_tokens).as_bytes());
    for (name, v) in [
        ("cache_read_tokens", e.cache_read_tokens),
        ("cache_write_tokens", e.cache_write_tokens),
        ("reasoning_tokens", e.reasoning_tokens),
    ] {
        if let Some(v) = v {
            field(out, name);
            out.extend_from_slice(n.format(v).as_bytes());
        }
    }
    field(out, "usage");
    write_json_str(out, e.usage);
    if let Some(f) = e.finish_reason {
        field(out, "finish_reason");
        write_json_str(out, f);
    }
    field(out, "cost_usd");
    if e.cost_usd.is_finite() && e.cost_usd != 0.0 {
        let _ = write!(out, "{}", e.cost_usd);
    } else {
        out.push(b'0');
    }
    if let Some(err) = e.error {
        field(out, "error");
        write_json_str(out, err);
    }
    if let Some(c) = e.cache {
        field(out, "cache");
        write_json_str(out, c);
    }
    if let Some(t) = e.trace_id {
        field(out, "trace_id");
        write_json_str(out, t);
    }
    out.extend_from_slice(b",\"target\":\"modelgate::access\"}\n");
}

/// `,"name":` (names are fixed words, written as they are).
fn field(out: &mut Vec<u8>, name: &str) {
    out.extend_from_slice(b",\"");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":");
}

/// Milliseconds with three decimals (microseconds), as a JSON number.
fn millis(out: &mut Vec<u8>, ms: f64) {
    let us = if ms.is_finite() && ms > 0.0 {
        (ms * 1e3).round().min(u64::MAX as f64) as u64
    } else {
        0
    };
    let mut n = itoa::Buffer::new();
    out.extend_from_slice(n.format(us / 1000).as_bytes());
    let frac = us % 1000;
    out.extend_from_slice(&[
        b'.',
        b'0' + (frac / 100) as u8,
        b'0' + (frac / 10 % 10) as u8,
        b'0' + (frac % 10) as u8,
    ]);
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
    fn a_line_is_one_json_object_with_every_field() {
        let mut entry = Entry {
            request_id: "id\\with\"quotes",
            endpoint: "chat",
            model: "m\u{1}\n\u{e9}\u{1F600}",
            route: "default/r",
            backend: "b",
            key: "default/k",
            status: 200,
            outcome: "complete",
            stream: true,
            attempts: 2,
            duration_ms: 1234.5678,
            ttft_ms: Some(0.0004),
            overhead_us: Some(31),
            input_tokens: 27,
            output_tokens: 16,
            cache_read_tokens: Some(5),
            cache_write_tokens: None,
            reasoning_tokens: Some(4),
            usage: "reported",
            finish_reason: Some("stop"),
            cost_usd: 0.0000123,
            error: Some("upstream_timeout"),
            trace_id: Some("0af7651916cd43dd8448eb211c80319c"),
            cache: Some("hit"),
        };
        let at = SystemTime::UNIX_EPOCH + Duration::from_micros(1_764_624_000_123_456);
        let mut out = Vec::new();
        write_line(&mut out, at, &entry);
        assert_eq!(out.iter().filter(|b| **b == b'\n').count(), 1);
        assert_eq!(out.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let text = std::str::from_utf8(&out).unwrap();
        assert!(text.contains("\"duration_ms\":1234.568,"), "{text}");
        assert!(text.contains("\"ttft_ms\":0.000,"), "{text}");
        assert_eq!(v["timestamp"], "2025-12-01T21:20:00.123456Z");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["message"], "request");
        assert_eq!(v["target"], "modelgate::access");
        assert_eq!(v["request_id"], entry.request_id);
        assert_eq!(v["model"], entry.model);
        assert_eq!(v["status"], 200);
        assert_eq!(v["stream"], true);
        assert_eq!(v["attempts"], 2);
        assert_eq!(v["overhead_us"], 31);
        assert_eq!(v["input_tokens"], 27);
        assert_eq!(v["output_tokens"], 16);
        assert_eq!(v["cache_read_tokens"], 5);
        assert_eq!(v["reasoning_tokens"], 4);
        assert!(
            v.get("cache_write_tokens").is_none(),
            "not reported: not written"
        );
        assert_eq!(v["finish_reason"], "stop");
        assert_eq!(v["cost_usd"], 0.0000123);
        assert_eq!(v["error"], "upstream_timeout");
        assert_eq!(v["trace_id"], "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(v["cache"], "hit");
        // Unset fields are left out; a zero cost is 0.
        entry.ttft_ms = None;
        entry.overhead_us = None;
        entry.finish_reason = None;
        entry.error = None;
        entry.trace_id = None;
        entry.cache = None;
        entry.cost_usd = 0.0;
        out.clear();
        write_line(&mut out, at, &entry);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let o = v.as_object().unwrap();
        for absent in [
            "ttft_ms",
            "overhead_us",
            "finish_reason",
            "error",
            "trace_id",
            "cache",
        ] {
            assert!(!o.contains_key(absent), "{absent}");
        }
        assert_eq!(v["cost_usd"], 0);
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
            cache_read_tokens: None,
            cache_write_tokens: None,
            reasoning_tokens: None,
            usage: "reported",
            finish_reason: None,
            cost_usd: 0.0,
            error: None,
            trace_id: None,
            cache: None,
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
