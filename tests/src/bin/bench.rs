//! modelgate's benchmark: the proxy against a plain nginx reverse proxy and against going
//! direct, on 127.0.0.1, with established load generators. Every figure is printed beside the
//! baselines measured in the same run, as a ratio; runs are interleaved (direct, nginx,
//! modelgate, repeated) and the median is reported.
//!
//! Usage: bench [--quick] [--only SECTION[,SECTION...]] [--scale-only] [--swap-only]
//!              [--soak SECS] [--peers] [--peers-only]   (`make bench` builds and runs this)
//!              [--profile small|16k|slow|bedrock|bedrock-stream[,...] [--out DIR]]   (perf profiles, flame graphs)
//! Sections for `--only`: the workloads small, 16k, large, stream, embeddings; `latency`
//! (fixed rates); `c1` (added latency at concurrency 1); `slow` (an upstream that adds 20 ms,
//! at 1,000 connections); `translate` (OpenAI, Anthropic and Responses clients on backends of
//! another API, Bedrock included, against pass-through, CPU per request); `cache-hit` (a
//! route with the response cache on, warmed by one request, against nginx and against the
//! same route without it); `tracing` (OpenTelemetry spans off, on but sampled out, and on
//! for every request, exported to an OTLP/HTTP sink). SCALE_CPUS=0,1 gives the config-scale
//! proxy both cores (default: 1).
//!
//! Layout on a 2-core machine: the proxy under test (modelgate or nginx, one worker each,
//! both with their access log on unless a row says otherwise) alone on core 1; the load
//! generator and the upstreams on core 0:
//!
//! ```text
//!   core 0                                   core 1
//!   wrk (throughput) / oha (fixed rates, c1) ──► nginx :18002 (log on) / :18004 (log off)
//!        │                                      modelgate :18001
//!        └──── direct ────┐                          │
//!   fixed upstream :18010 (nginx, `return 200`) ◄────┤ chat and embeddings
//!   mock upstream  :18000 (tests/src/upstream.rs) ◄──┘ streams and knob paths (`/s/...`)
//! ```
//!
//! CPU per request (the proxy process's utime + stime over a run, per answer) is the
//! headline: it does not depend on core 0. Throughput counts only where going direct is at
//! least `HEADROOM` × the fastest proxy in the same run; otherwise the point is INVALID.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

const KEY: &str = "sk-bench-0123456789abcdef";

/// The mock upstream (`mock-upstream`): streams and the cases its path knobs drive.
const MOCK_UPSTREAM: &str = "127.0.0.1:18000";
/// nginx answering `return 200` with a fixed body: the cheap upstream of the non-streaming
/// rows, so that core 0 has room to spare for the proxy on core 1.
const FIXED_UPSTREAM: &str = "127.0.0.1:18010";
/// nginx as the reverse-proxy baseline, access log on and off (one worker, two servers).
const NGINX_PORT: u16 = 18002;
const NGINX_NO_LOG_PORT: u16 = 18004;
/// nginx keeps request bodies up to this size in memory; a larger one would go to a temp
/// file (its 8k default does that to a 16 KB body). Every measured body must fit.
const NGINX_BODY_BUFFER: usize = 256 * 1024;

/// The sections that share the throughput and fixed-rate report.
const MAIN_SECTIONS: [&str; 6] = ["small", "16k", "large", "stream", "embeddings", "latency"];
/// The `slow` section: what the mock upstream adds to every request, and the connections.
const SLOW_MS: u64 = 20;
const SLOW_CONNS: u32 = 1000;
/// wrk's threads in the `slow` section. One thread on its one core: a second thread on
/// the same core only adds switches (going direct measured lower with two).
const WRK_THREADS: u32 = 1;
/// A throughput ratio counts only when going direct is at least this much faster than the
/// fastest proxy: otherwise the load generator or the upstream, not the proxy, set the pace.
const HEADROOM: f64 = 1.5;
/// A proxy at saturation on a core of its own uses at least this much of it; less, and the
/// throughput row gets a note (on a shared machine other processes run on core 1 too).
const BUSY_CORE: f64 = 0.9;

/// `--peers-only`: the modelgate small-body runs and the peer, nothing else.
fn peers_only() -> bool {
    std::env::args().any(|a| a == "--peers-only")
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let peers = peers_only()
        || args.iter().any(|a| a == "--peers")
        || std::env::var("BENCH_PEERS").is_ok_and(|v| v == "1");
    let mut b = Bench::new(quick);
    // `--only NAMES`: some sections (comma-separated), with 1 key, for quick before/after
    // checks; no scale or memory-over-time section.
    b.only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1).cloned());
    if args.iter().any(|a| a == "--swap-only") {
        // In-process validate / swap / free times only (no servers, a few seconds).
        let (validate_ms, swap_us, free_ms) = scale::proxy_swap(5);
        println!("validate {validate_ms:.0} ms, swap {swap_us:.0} µs, free {free_ms:.0} ms");
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--soak") {
        let secs = args.get(i + 1).and_then(|v| v.parse().ok()).unwrap_or(600);
        let _up = (b.upstream(), b.fixed_upstream());
        b.soak(secs);
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--profile") {
        let what = args.get(i + 1).cloned().unwrap_or_else(|| "small".into());
        let out = args
            .iter()
            .position(|a| a == "--out")
            .and_then(|i| args.get(i + 1))
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| b.dir.join("profiles"));
        let _up = (b.upstream(), b.fixed_upstream());
        for w in what.split(',') {
            b.profile(w.trim(), &out);
        }
        return;
    }
    if args.iter().any(|a| a == "--scale-only") {
        let _up = b.upstream();
        b.scale();
        return;
    }
    b.run(peers);
}

/// The proxy's config for the throughput runs: chat and embeddings routes on the fixed
/// upstream, the stream and slow routes on the mock (through its path knobs), the bench key
/// (with generous limits when `limits`) and `keys_extra` more keys.
/// One route of the bench's config: `model` on one backend at `upstream`.
fn route(model: &str, provider: &str, upstream: &str) -> String {
    let (creds, url) = match provider {
        "anthropic" | "openai" => (
            ", credentials: {env: BENCH_ANTHROPIC_KEY}",
            format!("http://{upstream}/v1"),
        ),
        // The model id has no ':' so nginx finds the fixed answer as a file.
        "bedrock" => (
            ", model: anthropic.claude-bench, bedrock: {region: us-east-1}, credentials: {env: BENCH_AWS_KEYS}",
            format!("http://{upstream}"),
        ),
        _ => ("", format!("http://{upstream}/v1")),
    };
    format!(
        "  - name: {model}\n    model: {model}\n    backends:\n      - {{name: up, provider: {provider}, url: \"{url}\", pricing: {{inputPerMillion: 0.15, outputPerMillion: 0.6}}{creds}}}\n"
    )
}

/// The translation section's config: the bench's, and the fixed upstream in both APIs,
/// JSON and streams.
fn translate_config() -> String {
    let fixed_stream = format!("{FIXED_UPSTREAM}/stream");
    let extra: String = [
        ("bench-anthropic", "anthropic", FIXED_UPSTREAM),
        (
            "bench-fixed-stream",
            "openai-compatible",
            fixed_stream.as_str(),
        ),
        ("bench-anthropic-stream", "anthropic", fixed_stream.as_str()),
        ("bench-responses", "openai", FIXED_UPSTREAM),
        ("bench-responses-stream", "openai", fixed_stream.as_str()),
        ("bench-bedrock", "bedrock", FIXED_UPSTREAM),
        ("bench-bedrock-stream", "bedrock", fixed_stream.as_str()),
    ]
    .iter()
    .map(|(m, p, u)| route(m, p, u))
    .collect();
    bench_config(0, false).replacen("keys:\n", &format!("{extra}keys:\n"), 1)
}

fn bench_config(keys_extra: usize, limits: bool) -> String {
    let hash = modelgate_tests::harness::sha256_hex(KEY);
    let mut s =
        String::from("server: {listen: 127.0.0.1:18001, admin: 127.0.0.1:19001}\nroutes:\n");
    let slow = format!("{MOCK_UPSTREAM}/s/latency={SLOW_MS}");
    let stream = format!("{MOCK_UPSTREAM}/s/chunks=100");
    for (model, upstream) in [
        ("bench", FIXED_UPSTREAM),
        ("bench-stream", stream.as_str()),
        ("bench-embed", FIXED_UPSTREAM),
        ("bench-slow", slow.as_str()),
    ] {
        s.push_str(&route(model, "openai-compatible", upstream));
    }
    s.push_str("keys:\n");
    let lim = if limits {
        ", limits: {requestsPerMinute: 100000000, tokensPerMinute: 100000000000, maxConcurrent: 10000}"
    } else {
        ""
    };
    s.push_str(&format!("  - {{name: bench, sha256: {hash}{lim}}}\n"));
    for i in 0..keys_extra {
        s.push_str(&format!(
            "  - {{name: k{i}, sha256: {}}}\n",
            modelgate_tests::harness::sha256_hex(&format!("sk-extra-{i}"))
        ));
    }
    s
}

/// One modelgate setup of the throughput table, measured against nginx with its access
/// log in the same state.
struct Profile {
    label: &'static str,
    /// Names its config and log files in the temp folder.
    tag: &'static str,
    keys_extra: usize,
    limits: bool,
    access_log: bool,
}

/// "1 key" runs every workload and the fixed rates; the others the small body only. The
/// first two are the fair pair: both proxies with their access log on, then both off.
const PROFILES: [Profile; 4] = [
    Profile {
        label: "1 key",
        tag: "1-key",
        keys_extra: 0,
        limits: false,
        access_log: true,
    },
    Profile {
        label: "1 key, logs off",
        tag: "logs-off",
        keys_extra: 0,
        limits: false,
        access_log: false,
    },
    Profile {
        label: "100k keys",
        tag: "100k-keys",
        keys_extra: 100_000,
        limits: false,
        access_log: true,
    },
    Profile {
        label: "1 key + limits",
        tag: "limits",
        keys_extra: 0,
        limits: true,
        access_log: true,
    },
];

/// The mean size of an access log line in `path` (lines with `"message":"request"`, from
/// the first MiB of the file), to show that the two proxies' lines are comparable.
fn access_line_bytes(path: &std::path::Path) -> Option<f64> {
    use std::io::Read;
    let mut head = Vec::new();
    std::fs::File::open(path)
        .ok()?
        .take(1 << 20)
        .read_to_end(&mut head)
        .ok()?;
    // The last piece may be a line cut in two.
    let mut lines: Vec<&[u8]> = head.split(|b| *b == b'\n').collect();
    lines.pop();
    let lens: Vec<usize> = lines
        .iter()
        .filter(|l| l.windows(19).any(|w| w == br#""message":"request""#))
        .map(|l| l.len() + 1)
        .collect();
    (!lens.is_empty()).then(|| lens.iter().sum::<usize>() as f64 / lens.len() as f64)
}

/// Going direct over the fastest proxy, and which proxy that was (name, req/s).
fn headroom(direct: &Run, nginx: &Run, modelgate: &Run) -> (f64, &'static str, f64) {
    let (name, fastest) = if nginx.rps >= modelgate.rps {
        ("nginx", nginx.rps)
    } else {
        ("modelgate", modelgate.rps)
    };
    (direct.rps / fastest.max(1.0), name, fastest)
}

/// A target's outcome; INVALID when the figure it judges is a throughput ratio from a
/// point without headroom.
#[derive(Clone, Copy)]
enum Verdict {
    Pass,
    Miss,
    Invalid,
}

impl Verdict {
    fn of(pass: bool) -> Self {
        if pass { Self::Pass } else { Self::Miss }
    }

    fn word(self) -> &'static str {
        match self {
            Self::Pass => "PASS",
            Self::Miss => "MISS",
            Self::Invalid => "INVALID",
        }
    }
}

struct Bench {
    dir: PathBuf,
    bin: PathBuf,
    oha: String,
    wrk: String,
    reps: usize,
    duration: String,
    conns: u32,
    only: Option<String>,
}

struct Proc {
    child: Child,
    /// The process whose CPU time counts (nginx: its worker).
    cpu_pid: u32,
}

impl Proc {
    /// A process whose CPU time is its own (not a worker's, as with nginx).
    fn own(child: Child) -> Self {
        let cpu_pid = child.id();
        Self { child, cpu_pid }
    }

    fn cpu_ticks(&self) -> u64 {
        cpu_ticks(self.cpu_pid)
    }
    fn rss_kib(&self) -> (u64, u64) {
        let s =
            std::fs::read_to_string(format!("/proc/{}/status", self.cpu_pid)).unwrap_or_default();
        let field = |name: &str| {
            s.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name: utime is 14th, stime 15th overall.
    let rest = s.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

fn ticks_per_sec() -> u64 {
    let out = Command::new("getconf").arg("CLK_TCK").output().ok();
    out.and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100)
}

/// A plain HTTP/1.0 GET on loopback (the admin port), body as text.
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

fn wait_port(addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "{addr} did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[derive(Debug, Clone, Default)]
struct Run {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    ok: u64,
    errors: u64,
    cpu_us_per_req: f64,
    /// modelgate's own time per request as it reports it: the mean of its
    /// `gateway_overhead_seconds` histogram over the run (0 for other targets).
    overhead_us: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

/// The median of each figure over repeated runs; counts are summed.
fn median_run(runs: &[Run]) -> Run {
    let m = |f: fn(&Run) -> f64| median(runs.iter().map(f).collect());
    Run {
        rps: m(|r| r.rps),
        p50_ms: m(|r| r.p50_ms),
        p99_ms: m(|r| r.p99_ms),
        p999_ms: m(|r| r.p999_ms),
        ok: runs.iter().map(|r| r.ok).sum(),
        errors: runs.iter().map(|r| r.errors).sum(),
        cpu_us_per_req: m(|r| r.cpu_us_per_req),
        overhead_us: m(|r| r.overhead_us),
    }
}

/// The sum and count of modelgate's `gateway_overhead_seconds` histogram, when `url` is
/// modelgate's API.
fn overhead_totals(url: &str) -> Option<(f64, f64)> {
    if !url.starts_with("http://127.0.0.1:18001/") {
        return None;
    }
    let text = http_get("127.0.0.1:19001", "/metrics");
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    };
    Some((
        value("modelgate_gateway_overhead_seconds_sum")?,
        value("modelgate_gateway_overhead_seconds_count")?,
    ))
}

/// The histogram's mean in µs between two readings of `overhead_totals`.
fn overhead_mean_us(before: Option<(f64, f64)>, after: Option<(f64, f64)>) -> f64 {
    match (before, after) {
        (Some((s0, c0)), Some((s1, c1))) if c1 > c0 => (s1 - s0) / (c1 - c0) * 1e6,
        _ => 0.0,
    }
}

/// The soft limit on open files of this process (the servers it starts inherit it).
fn open_files_limit() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = s.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// What one oha run sends: over how many connections, until when, at what rate (None:
/// closed loop).
struct Load<'a> {
    conns: u32,
    until: Until<'a>,
    rate: Option<u32>,
}

enum Until<'a> {
    /// `-z`: a fixed time, e.g. "6s".
    Time(&'a str),
    /// `-n`: a fixed number of requests.
    Requests(u64),
}

/// The small chat body of the throughput, fixed-rate, `c1` and `slow` sections.
fn small_body(model: &str) -> String {
    json!({"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": "Write one short sentence about the sea, please, for a benchmark of gateways and proxies."}]}).to_string()
}

/// A chat request whose messages total about 16 KB: a system prompt and the turns of a
/// conversation so far, as a chat client resends them with every question.
fn body_16k() -> String {
    let passage = "A passage of the conversation so far, about the sea, its tides and the boats that wait for them. ";
    let mut messages = vec![
        json!({"role": "system", "content": "You are a helpful assistant. Answer briefly, from the conversation."}),
    ];
    for turn in 0..8 {
        let role = if turn % 2 == 0 { "user" } else { "assistant" };
        messages.push(json!({"role": role, "content": passage.repeat(21)}));
    }
    messages
        .push(json!({"role": "user", "content": "So, in one sentence: when do the boats leave?"}));
    json!({"model": "bench", "max_tokens": 16, "messages": messages}).to_string()
}

/// What the fixed upstream answers to every chat completion: a realistic non-streaming
/// answer with `usage`, 333 bytes. nginx quotes it in its config: no `'`, `\` or `$`.
const CHAT_ANSWER: &str = r#"{"id":"chatcmpl-bench7f3a9c1e5d2b0","object":"chat.completion","created":1700000000,"model":"bench","choices":[{"index":0,"message":{"role":"assistant","content":"The sea keeps its own time: each tide gives back what the last one took."},"finish_reason":"stop"}],"usage":{"prompt_tokens":27,"completion_tokens":16,"total_tokens":43}}"#;
/// ... and to every embeddings request: two short vectors, with `usage`.
const EMBEDDINGS_ANSWER: &str = r#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.0123,-0.0456,0.0789,-0.0112,0.0345,-0.0678,0.0901,-0.0234]},{"object":"embedding","index":1,"embedding":[-0.0321,0.0654,-0.0987,0.0211,-0.0543,0.0876,-0.0109,0.0432]}],"model":"bench-embed","usage":{"prompt_tokens":12,"total_tokens":12}}"#;

/// What the fixed upstream answers to every Anthropic Messages request: the same answer as
/// `CHAT_ANSWER`, in Anthropic's shape.
const ANTHROPIC_ANSWER: &str = r#"{"id":"msg_bench7f3a9c1e5d2b0","type":"message","role":"assistant","model":"bench","content":[{"type":"text","text":"The sea keeps its own time: each tide gives back what the last one took."}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":27,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":16}}"#;

/// The same answer streamed in 8 text pieces, as OpenAI writes streams (with the usage chunk
/// the gateway asks for) and as Anthropic does (named events, a `ping`).
const RESPONSES_ANSWER: &str = r#"{"id":"resp_bench7f3a9c1e5d2b0","object":"response","created_at":1700000000,"status":"completed","error":null,"incomplete_details":null,"model":"bench","output":[{"type":"message","id":"msg_bench0","status":"completed","role":"assistant","content":[{"type":"output_text","text":"The sea keeps its own time: each tide gives back what the last one took.","annotations":[]}]}],"parallel_tool_calls":true,"tool_choice":"auto","tools":[],"usage":{"input_tokens":27,"input_tokens_details":{"cached_tokens":0},"output_tokens":16,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":43}}"#;

const BEDROCK_ANSWER: &str = r#"{"output":{"message":{"role":"assistant","content":[{"text":"The sea keeps its own time: each tide gives back what the last one took."}]}},"stopReason":"end_turn","usage":{"inputTokens":27,"outputTokens":16,"totalTokens":43},"metrics":{"latencyMs":100}}"#;

/// The fixed upstream's streams in the Responses API (SSE) and Bedrock's ConverseStream
/// (binary event-stream frames): the same 8 pieces as `stream_answers`.
fn more_stream_answers() -> (String, Vec<u8>) {
    let mut seq = 0;
    let mut r = String::new();
    let mut event = |name: &str, mut data: serde_json::Value| {
        data["type"] = json!(name);
        data["sequence_number"] = json!(seq);
        seq += 1;
        r.push_str(&format!("event: {name}\ndata: {data}\n\n"));
    };
    let item = json!({"id": "msg_bench0", "type": "message", "status": "in_progress", "role": "assistant", "content": []});
    event(
        "response.created",
        json!({"response": {"id": "resp_bench", "object": "response", "created_at": 1700000000, "status": "in_progress", "model": "bench", "output": []}}),
    );
    event(
        "response.output_item.added",
        json!({"output_index": 0, "item": item}),
    );
    event(
        "response.content_part.added",
        json!({"item_id": "msg_bench0", "output_index": 0, "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}}),
    );
    for p in STREAM_PIECES {
        event(
            "response.output_text.delta",
            json!({"item_id": "msg_bench0", "output_index": 0, "content_index": 0, "delta": p, "logprobs": []}),
        );
    }
    let text: String = STREAM_PIECES.concat();
    event(
        "response.output_text.done",
        json!({"item_id": "msg_bench0", "output_index": 0, "content_index": 0, "text": text, "logprobs": []}),
    );
    let done = json!({"id": "msg_bench0", "type": "message", "status": "completed", "role": "assistant", "content": [{"type": "output_text", "text": text, "annotations": []}]});
    event(
        "response.output_item.done",
        json!({"output_index": 0, "item": done}),
    );
    event(
        "response.completed",
        json!({"response": {"id": "resp_bench", "object": "response", "created_at": 1700000000, "status": "completed", "model": "bench", "output": [done],
        "usage": {"input_tokens": 27, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 16, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 43}}}),
    );
    let frame = |kind: &str, payload: serde_json::Value| {
        modelgate_dataplane::translate::bedrock::encode_frame(
            "event",
            kind,
            payload.to_string().as_bytes(),
        )
    };
    let mut b = frame("messageStart", json!({"role": "assistant"}));
    for p in STREAM_PIECES {
        b.extend(frame(
            "contentBlockDelta",
            json!({"contentBlockIndex": 0, "delta": {"text": p}}),
        ));
    }
    b.extend(frame("contentBlockStop", json!({"contentBlockIndex": 0})));
    b.extend(frame("messageStop", json!({"stopReason": "end_turn"})));
    b.extend(frame("metadata", json!({"usage": {"inputTokens": 27, "outputTokens": 16, "totalTokens": 43}, "metrics": {"latencyMs": 100}})));
    (r, b)
}

const STREAM_PIECES: [&str; 8] = [
    "The sea ",
    "keeps its ",
    "own time: ",
    "each tide ",
    "gives back ",
    "what the ",
    "last one ",
    "took.",
];

fn stream_answers() -> (String, String) {
    const PIECES: [&str; 8] = [
        "The sea ",
        "keeps its ",
        "own time: ",
        "each tide ",
        "gives back ",
        "what the ",
        "last one ",
        "took.",
    ];
    let chunk = |delta: serde_json::Value, finish: serde_json::Value| {
        json!({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000,
            "model": "bench", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    let mut openai = vec![chunk(
        json!({"role": "assistant", "content": ""}),
        json!(null),
    )];
    openai.extend(
        PIECES
            .iter()
            .map(|p| chunk(json!({"content": p}), json!(null))),
    );
    openai.push(chunk(json!({}), json!("stop")));
    openai.push(json!({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000,
        "model": "bench", "choices": [], "usage": {"prompt_tokens": 27, "completion_tokens": 16, "total_tokens": 43}}));
    let mut o: String = openai.iter().map(|c| format!("data: {c}\n\n")).collect();
    o.push_str("data: [DONE]\n\n");
    let event = |name: &str, data: serde_json::Value| format!("event: {name}\ndata: {data}\n\n");
    let mut a = event(
        "message_start",
        json!({"type": "message_start", "message": {"id": "msg_bench",
        "type": "message", "role": "assistant", "model": "bench", "content": [], "stop_reason": null,
        "stop_sequence": null, "usage": {"input_tokens": 27, "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0, "output_tokens": 1}}}),
    );
    a.push_str(&event(
        "content_block_start",
        json!({"type": "content_block_start", "index": 0,
        "content_block": {"type": "text", "text": ""}}),
    ));
    a.push_str(&event("ping", json!({"type": "ping"})));
    for p in PIECES {
        a.push_str(&event(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0,
            "delta": {"type": "text_delta", "text": p}}),
        ));
    }
    a.push_str(&event(
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    ));
    a.push_str(&event(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason":
        "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 16}}),
    ));
    a.push_str(&event("message_stop", json!({"type": "message_stop"})));
    (o, a)
}

/// nginx's access log line for the fair pair: what nginx knows of the fields modelgate
/// logs (no model, key or tokens), as JSON, the same envelope (`timestamp`, `level`,
/// `message`, `target`).
const NGINX_LOG_FORMAT: &str = r#"'{"timestamp":"$time_iso8601","level":"INFO","message":"request","request_id":"$request_id","method":"$request_method","endpoint":"$uri","status":$status,"duration_s":$request_time,"upstream":"$upstream_addr","upstream_status":"$upstream_status","upstream_s":"$upstream_response_time","request_bytes":$request_length,"response_bytes":$bytes_sent,"target":"nginx::access"}'"#;

/// wrk's Lua script for a POST of `body` with the bench's headers.
fn wrk_script(body: &str, key: &str) -> String {
    format!(
        "wrk.method = \"POST\"\nwrk.body = {}\nwrk.headers[\"Content-Type\"] = \"application/json\"\nwrk.headers[\"Authorization\"] = {}\n",
        lua_string(body),
        lua_string(&format!("Bearer {key}"))
    )
}

/// A Lua string literal holding exactly `s`: quotes and backslashes escaped, every byte
/// outside printable ASCII as a three-digit `\ddd` (the form Lua 5.1 and LuaJIT read alike).
fn lua_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for b in s.bytes() {
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            0x20..0x7f => out.push(char::from(b)),
            _ => out.push_str(&format!("\\{b:03}")),
        }
    }
    out.push('"');
    out
}

/// The figures of one wrk run, from what wrk 4 prints with `--latency`.
#[derive(Debug, PartialEq)]
struct WrkOutput {
    requests: u64,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    non_2xx: u64,
    socket_errors: u64,
}

/// Reads wrk's report: "N requests in", "Requests/sec:", the "50%" and "99%" lines of the
/// latency distribution (wrk2's "50.000%" too), and the "Socket errors:" and "Non-2xx or
/// 3xx responses:" lines, which wrk prints only when not zero. None when a figure that must
/// be there is missing (a run that served requests always has its percentiles).
fn parse_wrk(text: &str) -> Option<WrkOutput> {
    let mut requests = None;
    let mut rps = None;
    let (mut p50_ms, mut p99_ms) = (None, None);
    let (mut non_2xx, mut socket_errors) = (0, 0);
    for line in text.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            rps = v.trim().parse::<f64>().ok();
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            non_2xx = v.trim().parse().ok()?;
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 12"
            for part in v.split(',') {
                socket_errors += part.split_whitespace().last()?.parse::<u64>().ok()?;
            }
        } else if let Some((n, _)) = line.split_once(" requests in ") {
            requests = n.trim().parse::<u64>().ok();
        } else if let Some((pct, value)) = line.split_once('%') {
            let ms = wrk_duration_ms(value.trim());
            match pct.parse::<f64>() {
                Ok(50.0) => p50_ms = ms,
                Ok(99.0) => p99_ms = ms,
                _ => {}
            }
        }
    }
    let requests = requests?;
    let served = requests > 0;
    Some(WrkOutput {
        requests,
        rps: rps?,
        p50_ms: if served { p50_ms? } else { 0.0 },
        p99_ms: if served { p99_ms? } else { 0.0 },
        non_2xx,
        socket_errors,
    })
}

/// A wrk duration ("980.00us", "38.57ms", "1.02s", "1.50m", "1.00h") in milliseconds.
fn wrk_duration_ms(v: &str) -> Option<f64> {
    let split = v.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = v.split_at(split);
    let n: f64 = n.parse().ok()?;
    match unit {
        "us" => Some(n / 1e3),
        "ms" => Some(n),
        "s" => Some(n * 1e3),
        "m" => Some(n * 60e3),
        "h" => Some(n * 3600e3),
        _ => None,
    }
}

#[derive(Clone)]
struct Workload {
    name: &'static str,
    path: &'static str,
    body: String,
    /// Knobs for the mock upstream (see tests/src/upstream.rs), e.g. "s/chunks=100/";
    /// empty: the workload goes to the fixed upstream.
    knobs: String,
}

impl Workload {
    fn chat(name: &'static str, body: String) -> Self {
        Self {
            name,
            path: "/v1/chat/completions",
            body,
            knobs: String::new(),
        }
    }

    /// Going direct: the mock when the workload has knobs, else the fixed upstream.
    fn direct_url(&self) -> String {
        if self.knobs.is_empty() {
            format!("http://{FIXED_UPSTREAM}{}", self.path)
        } else {
            format!("http://{MOCK_UPSTREAM}/{}{}", self.knobs, &self.path[1..])
        }
    }

    /// Through nginx on `port`, which sends knob paths (`/s/...`) to the mock and the rest
    /// to the fixed upstream, as modelgate's routes do by model.
    fn nginx_url(&self, port: u16) -> String {
        format!("http://127.0.0.1:{port}/{}{}", self.knobs, &self.path[1..])
    }

    fn modelgate_url(&self) -> String {
        format!("http://127.0.0.1:18001{}", self.path)
    }
}

/// The temp folder (configs, bodies, logs) goes with the bench; after a panic it stays, for
/// the logs the panic message names. The servers are gone by then: every `Proc` lives in a
/// scope inside the bench's.
impl Drop for Bench {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("bench: kept {} (logs)", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Bench {
    fn new(quick: bool) -> Self {
        let dir = std::env::temp_dir().join(format!("modelgate-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let exe = std::env::current_exe().unwrap();
        let bin = exe.parent().unwrap().to_path_buf();
        let oha = std::env::var("OHA").unwrap_or_else(|_| "oha".into());
        let wrk = std::env::var("WRK").unwrap_or_else(|_| "wrk".into());
        Self {
            dir,
            bin,
            oha,
            wrk,
            reps: if quick { 1 } else { 3 },
            duration: if quick { "3s".into() } else { "6s".into() },
            conns: 32,
            only: None,
        }
    }

    /// The mock upstream, one thread on core 0: streams and knob-driven paths.
    fn upstream(&self) -> Proc {
        let child = Command::new("taskset")
            .args(["-c", "0"])
            .arg(self.bin.join("mock-upstream"))
            .args([MOCK_UPSTREAM, "1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mock-upstream (cargo build --release -p modelgate-tests)");
        wait_port(MOCK_UPSTREAM);
        Proc::own(child)
    }

    /// The fixed upstream: nginx, one worker on core 0, answering every chat completion and
    /// embeddings request with the same body (`return 200`; nginx reads the request body
    /// and drops it). Keep-alive without a cap on requests per connection (nginx's default
    /// closes a connection after 1,000), as the mock has none.
    fn fixed_upstream(&self) -> Proc {
        let (openai_stream, anthropic_stream) = stream_answers();
        let (responses_stream, bedrock_stream) = more_stream_answers();
        // Binary: served as a file (nginx answers a POST to a file through its 405 page),
        // read and written with the headers in one segment as `return 200` answers are
        // (`sendfile off`), so no row pays an extra upstream read.
        let files = self.dir.join("upstream-files");
        let stream_file = files.join("stream/model/anthropic.claude-bench/converse-stream");
        std::fs::create_dir_all(stream_file.parent().unwrap()).unwrap();
        std::fs::write(&stream_file, &bedrock_stream).unwrap();
        for answer in [
            CHAT_ANSWER,
            EMBEDDINGS_ANSWER,
            ANTHROPIC_ANSWER,
            RESPONSES_ANSWER,
            BEDROCK_ANSWER,
            &openai_stream,
            &anthropic_stream,
            &responses_stream,
        ] {
            assert!(
                !answer.contains(['\'', '\\', '$']),
                "an answer nginx cannot quote as it is"
            );
        }
        let http = format!(
            r#"http {{
  access_log off;
  server_tokens off;
  default_type application/json;
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  client_body_temp_path {dir}/upstream-body;
  proxy_temp_path {dir}/upstream-proxy;
  server {{
    listen {FIXED_UPSTREAM} backlog=1024;
    location = /v1/chat/completions {{ return 200 '{CHAT_ANSWER}'; }}
    location = /v1/embeddings {{ return 200 '{EMBEDDINGS_ANSWER}'; }}
    location = /v1/messages {{ return 200 '{ANTHROPIC_ANSWER}'; }}
    location = /stream/v1/chat/completions {{ default_type text/event-stream; return 200 '{openai_stream}'; }}
    location = /stream/v1/messages {{ default_type text/event-stream; return 200 '{anthropic_stream}'; }}
    location = /v1/responses {{ return 200 '{RESPONSES_ANSWER}'; }}
    location = /v1/traces {{ default_type application/x-protobuf; return 200 ''; }}
    location = /stream/v1/responses {{ default_type text/event-stream; return 200 '{responses_stream}'; }}
    location = /model/anthropic.claude-bench/converse {{ return 200 '{BEDROCK_ANSWER}'; }}
    location = /stream/model/anthropic.claude-bench/converse-stream {{ root {files}; sendfile off; default_type application/vnd.amazon.eventstream; error_page 405 =200 $uri; }}
    location / {{ return 404 '{{"error":{{"message":"unknown path","type":"not_found"}}}}'; }}
  }}
}}
"#,
            dir = self.dir.display(),
            files = files.display()
        );
        self.start_nginx("upstream", "0", &http, FIXED_UPSTREAM)
    }

    /// nginx as the reverse proxy, one worker on core 1, two servers: :18002 with its access
    /// log on (JSON lines, `NGINX_LOG_FORMAT`, to a file in the temp folder, buffered like
    /// modelgate's: 256 KiB or 50 ms) and :18004 with it off. Knob paths (`/s/...`) go to
    /// the mock, the rest to the fixed upstream. Its idle upstream connections
    /// (`keepalive 1024`) match modelgate's pool (`pool_max_idle_per_host(1024)`): with
    /// fewer, the `slow` section's 1,000 connections would open and close an upstream
    /// connection on most requests. No cap on requests per connection on either side, as
    /// modelgate has none. The listen backlog is tokio's (modelgate and the mock): 1024.
    /// Request bodies are read whole into memory before they are sent on
    /// (`NGINX_BODY_BUFFER`), as modelgate reads them.
    fn nginx(&self) -> Proc {
        let server = |port: u16, log: &str| {
            format!(
                r#"  server {{
    listen 127.0.0.1:{port} backlog=1024;
    access_log {log};
    client_max_body_size 16m;
    client_body_buffer_size {buffer}k;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_buffering off;
    proxy_request_buffering on;
    location /s/ {{ proxy_pass http://mock; }}
    location / {{ proxy_pass http://fixed; }}
  }}
"#,
                buffer = NGINX_BODY_BUFFER / 1024
            )
        };
        let dir = self.dir.display();
        let http = format!(
            r#"http {{
  log_format bench escape=json {NGINX_LOG_FORMAT};
  keepalive_requests 1000000;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  upstream fixed {{ server {FIXED_UPSTREAM}; keepalive 1024; keepalive_requests 1000000; }}
  upstream mock {{ server {MOCK_UPSTREAM}; keepalive 1024; keepalive_requests 1000000; }}
{on}{off}}}
"#,
            on = server(
                NGINX_PORT,
                &format!("{dir}/nginx-access.log bench buffer=256k flush=50ms")
            ),
            off = server(NGINX_NO_LOG_PORT, "off"),
        );
        let nginx = self.start_nginx("nginx", "1", &http, &format!("127.0.0.1:{NGINX_PORT}"));
        wait_port(&format!("127.0.0.1:{NGINX_NO_LOG_PORT}"));
        nginx
    }

    /// Starts nginx on `cpus` with one worker, in the foreground, its pid file and error log
    /// named NAME in the temp folder, and the `http` block given (the whole written as
    /// NAME.conf); its CPU time is its worker's.
    fn start_nginx(&self, name: &str, cpus: &str, http: &str, addr: &str) -> Proc {
        let dir = self.dir.display();
        let conf = format!(
            r#"worker_processes 1;
worker_rlimit_nofile 8192;
daemon off;
pid {dir}/{name}.pid;
error_log {dir}/{name}-error.log warn;
events {{ worker_connections 4096; }}
{http}"#
        );
        let path = self.dir.join(format!("{name}.conf"));
        std::fs::write(&path, conf).unwrap();
        let child = Command::new("taskset")
            .args(["-c", cpus, "nginx", "-c"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx (apt-get install nginx-light)");
        wait_port(addr);
        // The worker is nginx's only child.
        let master = child.id();
        let worker = std::fs::read_to_string(format!("/proc/{master}/task/{master}/children"))
            .ok()
            .and_then(|c| c.split_whitespace().next().and_then(|p| p.parse().ok()))
            .unwrap_or(master);
        Proc {
            child,
            cpu_pid: worker,
        }
    }

    /// modelgate on core 1. Its access log (one JSON line per request, on stderr) goes to
    /// modelgate-TAG.log in the temp folder, with the operational log; `access_log: false`
    /// turns the access log off (`modelgate::access=off`) and leaves the rest.
    fn modelgate(&self, config: &str, tag: &str, access_log: bool) -> Proc {
        let path = self.dir.join(format!("modelgate-{tag}.yaml"));
        std::fs::write(&path, config).unwrap();
        let mut filter = std::env::var("BENCH_PROXY_LOG").unwrap_or_else(|_| "info".into());
        if !access_log {
            filter.push_str(",modelgate::access=off");
        }
        let child = Command::new("taskset")
            .args(["-c", "1"])
            .arg(self.bin.join("modelgate-dataplane"))
            .arg("--config")
            .arg(&path)
            .args(["--listen", "127.0.0.1:18001", "--admin", "127.0.0.1:19001"])
            .env("RUST_LOG", filter)
            .env("BENCH_ANTHROPIC_KEY", "sk-bench-anthropic")
            .env(
                "BENCH_AWS_KEYS",
                r#"{"AccessKeyId":"AKIDBENCH","SecretAccessKey":"bench-secret"}"#,
            )
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join(format!("modelgate-{tag}.log"))).unwrap())
            .spawn()
            .expect("modelgate-dataplane (cargo build --release)");
        wait_port("127.0.0.1:18001");
        Proc::own(child)
    }

    /// One oha run; `rate` = None for closed loop (max throughput).
    fn oha(&self, url: &str, w: &Workload, rate: Option<u32>, proc_: Option<&Proc>) -> Run {
        self.oha_as(KEY, url, w, rate, proc_)
    }

    fn oha_as(
        &self,
        key: &str,
        url: &str,
        w: &Workload,
        rate: Option<u32>,
        proc_: Option<&Proc>,
    ) -> Run {
        let load = Load {
            conns: self.conns,
            until: Until::Time(&self.duration),
            rate,
        };
        self.oha_load(key, url, w, &load, proc_)
    }

    fn oha_load(
        &self,
        key: &str,
        url: &str,
        w: &Workload,
        load: &Load,
        proc_: Option<&Proc>,
    ) -> Run {
        let body_file = self.dir.join(format!("body-{}.json", w.name));
        std::fs::write(&body_file, &w.body).unwrap();
        let mut cmd = Command::new("taskset");
        cmd.args(["-c", "0", &self.oha, "--no-tui", "--output-format", "json"]);
        match load.until {
            Until::Time(t) => cmd.args(["-z", t]),
            Until::Requests(n) => cmd.args(["-n", &n.to_string()]),
        };
        cmd.args(["-c", &load.conns.to_string(), "-m", "POST"])
            .args([
                "-H",
                "content-type: application/json",
                "-H",
                &format!("authorization: Bearer {key}"),
            ])
            .arg("-D")
            .arg(&body_file);
        if let Some(q) = load.rate {
            cmd.args(["-q", &q.to_string(), "--latency-correction"]);
        }
        cmd.arg(url);
        let own_before = overhead_totals(url);
        let before = proc_.map(Proc::cpu_ticks);
        let out = cmd.output().expect("oha (cargo install oha)");
        let after = proc_.map(Proc::cpu_ticks);
        let overhead_us = overhead_mean_us(own_before, overhead_totals(url));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "oha output ({e}): {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        let summary = &v["summary"];
        let pct = |p: &str| v["latencyPercentiles"][p].as_f64().unwrap_or(0.0) * 1e3;
        let codes = &v["statusCodeDistribution"];
        let ok = codes["200"].as_u64().unwrap_or(0);
        let total: u64 = codes
            .as_object()
            .map(|m| m.values().filter_map(|x| x.as_u64()).sum())
            .unwrap_or(0);
        // Requests cut off by the end of the run ("aborted due to deadline") are not errors.
        let errors = total - ok
            + v["errorDistribution"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .filter(|(k, _)| !k.contains("deadline"))
                        .filter_map(|(_, x)| x.as_u64())
                        .sum()
                })
                .unwrap_or(0);
        let cpu = match (before, after) {
            (Some(b), Some(a)) if ok > 0 => {
                (a - b) as f64 / ticks_per_sec() as f64 * 1e6 / ok as f64
            }
            _ => 0.0,
        };
        Run {
            rps: summary["requestsPerSec"].as_f64().unwrap_or(0.0),
            p50_ms: pct("p50"),
            p99_ms: pct("p99"),
            p999_ms: pct("p99.9"),
            ok,
            errors,
            cpu_us_per_req: cpu,
            overhead_us,
        }
    }

    /// One wrk run (closed loop, `conns` connections for `secs`, on core 0), for the `slow`
    /// section: at 1,000 connections wrk costs core 0 less per request than oha, which
    /// leaves more of it to the upstream. What wrk reports as "Non-2xx or 3xx responses"
    /// (status 400 and above) and its socket errors (connect, read, write, timeout) count
    /// as errors; requests cut off by the end of the run are not counted at all, as with
    /// oha.
    fn wrk_load(
        &self,
        url: &str,
        w: &Workload,
        conns: u32,
        secs: &str,
        proc_: Option<&Proc>,
    ) -> Run {
        let script = self.dir.join(format!("wrk-{}.lua", w.name));
        std::fs::write(&script, wrk_script(&w.body, KEY)).unwrap();
        let mut cmd = Command::new("taskset");
        cmd.args(["-c", "0", &self.wrk, "--latency"])
            .args(["-t", &WRK_THREADS.to_string(), "-c", &conns.to_string()])
            .args(["-d", secs, "-s"])
            .arg(&script)
            .arg(url);
        let own_before = overhead_totals(url);
        let before = proc_.map(Proc::cpu_ticks);
        let out = cmd.output().expect("wrk (apt-get install wrk)");
        let after = proc_.map(Proc::cpu_ticks);
        let overhead_us = overhead_mean_us(own_before, overhead_totals(url));
        let text = String::from_utf8_lossy(&out.stdout);
        let Some(r) = parse_wrk(&text).filter(|_| out.status.success()) else {
            panic!(
                "wrk ({}): {text}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ok = r.requests.saturating_sub(r.non_2xx);
        let cpu = match (before, after) {
            (Some(b), Some(a)) if ok > 0 => {
                (a - b) as f64 / ticks_per_sec() as f64 * 1e6 / ok as f64
            }
            _ => 0.0,
        };
        Run {
            rps: r.rps,
            p50_ms: r.p50_ms,
            p99_ms: r.p99_ms,
            p999_ms: 0.0,
            ok,
            errors: r.non_2xx + r.socket_errors,
            cpu_us_per_req: cpu,
            overhead_us,
        }
    }

    fn warmup(&self, url: &str, w: &Workload) {
        let body_file = self.dir.join("body-warmup.json");
        std::fs::write(&body_file, &w.body).unwrap();
        let _ = Command::new("taskset")
            .args([
                "-c",
                "0",
                &self.oha,
                "--no-tui",
                "--output-format",
                "quiet",
                "-z",
                "1s",
                "-c",
                &self.conns.to_string(),
                "-m",
                "POST",
            ])
            .args([
                "-H",
                "content-type: application/json",
                "-H",
                &format!("authorization: Bearer {KEY}"),
            ])
            .arg("-D")
            .arg(&body_file)
            .arg(url)
            .output();
    }

    /// `--only`: is this section one of those named (all are when none is)?
    fn selected(&self, section: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|o| o.split(',').any(|s| s.trim() == section))
    }

    fn run(&self, peers: bool) {
        let _up = (self.upstream(), self.fixed_upstream());
        let main_sections = peers_only() || MAIN_SECTIONS.iter().any(|s| self.selected(s));
        if main_sections {
            println!(
                "# modelgate benchmark ({} reps × {} per point, {} connections)\n",
                self.reps, self.duration, self.conns
            );
        } else {
            // `c1` and `slow` alone: each prints its own load in its heading.
            println!("# modelgate benchmark ({} reps per point)", self.reps);
        }
        let small = Workload::chat("small", small_body("bench"));
        let mut modelgate_small = None;
        if main_sections {
            modelgate_small = self.saturation_and_rates(&small);
        }
        if !peers_only() && self.selected("c1") {
            self.concurrency_one(&small);
        }
        if !peers_only() && self.selected("slow") {
            self.slow_upstream();
        }
        if !peers_only() && self.selected("translate") {
            self.translation();
        }
        if !peers_only() && self.selected("cache-hit") {
            self.cache_hit();
        }
        if !peers_only() && self.selected("tracing") {
            self.tracing();
        }
        if !peers_only() && self.only.is_none() {
            self.scale();
            // Memory over time (BENCH_SOAK=SECS, 0 to skip; 600 by default, 60 with --quick).
            let default = if self.reps == 1 { 60 } else { 600 };
            let secs = std::env::var("BENCH_SOAK")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default);
            if secs > 0 {
                self.soak(secs);
            }
        }
        if peers {
            self.litellm(&small, modelgate_small.as_ref());
        }
    }

    /// `--profile WORKLOAD`: modelgate (1 key, access log on) and nginx (access log on), each
    /// at saturation under wrk as in the throughput table (`slow`: 1,000 connections behind
    /// the mock's 20 ms), sampled with `perf record --call-graph dwarf` (`BENCH_CALL_GRAPH`
    /// to change it) for 5 s of a 9 s run.
    /// Writes `WORKLOAD-TARGET.folded` (stacks folded by `inferno-collapse-perf`) and `.svg`
    /// (`inferno-flamegraph`) into `out` when inferno is on PATH (`cargo install inferno`),
    /// else leaves `perf.data` files there; prints each target's CPU per request over the run
    /// (perf's sampling adds a few per cent to both).
    fn profile(&self, name: &str, out: &std::path::Path) {
        std::fs::create_dir_all(out).unwrap();
        let (w, conns) = match name {
            "small" => (Workload::chat("small", small_body("bench")), self.conns),
            "16k" => (Workload::chat("16k", body_16k()), self.conns),
            "slow" => (
                Workload {
                    name: "slow",
                    path: "/v1/chat/completions",
                    body: small_body("bench-slow"),
                    knobs: format!("s/latency={SLOW_MS}/"),
                },
                SLOW_CONNS,
            ),
            "bedrock" => (
                Workload::chat("bedrock", small_body("bench-bedrock")),
                self.conns,
            ),
            "bedrock-stream" => (
                Workload::chat(
                    "bedrock-stream",
                    json!({"model": "bench-bedrock-stream", "max_tokens": 16, "stream": true,
                        "messages": [{"role": "user", "content": "Write one short sentence about the sea."}]})
                    .to_string(),
                ),
                self.conns,
            ),
            other => panic!(
                "--profile: no workload {other} (small, 16k, slow, bedrock, bedrock-stream)"
            ),
        };
        let inferno = Command::new("inferno-collapse-perf")
            .arg("--help")
            .output()
            .is_ok_and(|o| o.status.success());
        for target in ["modelgate", "nginx"] {
            let (proc_, url) = if target == "modelgate" {
                (
                    self.modelgate(&translate_config(), "profile", true),
                    w.modelgate_url(),
                )
            } else {
                (self.nginx(), w.nginx_url(NGINX_PORT))
            };
            self.wrk_load(&url, &w, conns, "2s", None);
            let data = out.join(format!("{}-{target}.data", w.name));
            let pid = proc_.cpu_pid.to_string();
            let (run, perf) = std::thread::scope(|s| {
                let load = s.spawn(|| self.wrk_load(&url, &w, conns, "9s", Some(&proc_)));
                std::thread::sleep(Duration::from_secs(2));
                // `fp` for a build with frame pointers (RUSTFLAGS="-C force-frame-pointers=yes"),
                // which also unwinds through libc's functions.
                let graph =
                    std::env::var("BENCH_CALL_GRAPH").unwrap_or_else(|_| "dwarf,32768".into());
                let perf = Command::new("perf")
                    .args(["record", "-q", "-F", "997", "--call-graph", &graph])
                    .args(["-p", &pid, "-o"])
                    .arg(&data)
                    .args(["--", "sleep", "5"])
                    .output()
                    .expect("perf (apt-get install linux-perf)");
                (load.join().unwrap(), perf)
            });
            assert!(
                perf.status.success(),
                "perf record: {}",
                String::from_utf8_lossy(&perf.stderr)
            );
            println!(
                "{} {target}: {:.0} req/s, {:.1} CPU µs/req, {} errors over the run; samples in {}",
                w.name,
                run.rps,
                run.cpu_us_per_req,
                run.errors,
                data.display()
            );
            if inferno {
                let folded = out.join(format!("{}-{target}.folded", w.name));
                let svg = out.join(format!("{}-{target}.svg", w.name));
                let title = format!(
                    "{target}, {} body, {conns} connections, {:.1} CPU us/req",
                    w.name, run.cpu_us_per_req
                );
                let script = format!(
                    "perf script -i '{data}' 2>/dev/null | inferno-collapse-perf > '{folded}' && inferno-flamegraph --title '{title}' < '{folded}' > '{svg}' && rm '{data}'",
                    data = data.display(),
                    folded = folded.display(),
                    svg = svg.display(),
                );
                let status = Command::new("sh").args(["-c", &script]).status().unwrap();
                assert!(status.success(), "folding {}", data.display());
                println!("  flame graph {}", svg.display());
            }
        }
    }

    /// One closed-loop throughput run (wrk, `conns` connections, the run's duration).
    /// `translate`: modelgate's CPU per request when the client's API and the backend's
    /// differ, against the same-API (pass-through) row of the same client in the same run;
    /// the fixed upstream answers every row with the same answer in the backend's API
    /// (JSON, or 8 text pieces streamed). Target: at most `TRANSLATE_TARGET` × pass-through.
    fn translation(&self) {
        const TRANSLATE_TARGET: f64 = 1.5;
        let mg = self.modelgate(&translate_config(), "translate", true);
        let prompt = "Write one short sentence about the sea, please, for a benchmark of gateways and proxies.";
        let openai = |name, model, stream| Workload {
            name,
            path: "/v1/chat/completions",
            body: json!({"model": model, "max_tokens": 16, "stream": stream,
                "messages": [{"role": "user", "content": prompt}]})
            .to_string(),
            knobs: String::new(),
        };
        let anthropic = |name, model, stream| Workload {
            name,
            path: "/v1/messages",
            body: json!({"model": model, "max_tokens": 16, "stream": stream,
                "messages": [{"role": "user", "content": prompt}]})
            .to_string(),
            knobs: String::new(),
        };
        let responses = |name, model, stream| Workload {
            name,
            path: "/v1/responses",
            body: json!({"model": model, "max_output_tokens": 16, "stream": stream,
                "input": prompt})
            .to_string(),
            knobs: String::new(),
        };
        // (row, workload, the pass-through row it is compared with)
        let rows = [
            (
                "OpenAI → OpenAI (pass-through)",
                openai("t-oo", "bench", false),
                None,
            ),
            (
                "OpenAI → Anthropic",
                openai("t-oa", "bench-anthropic", false),
                Some(0),
            ),
            (
                "Anthropic → Anthropic (pass-through)",
                anthropic("t-aa", "bench-anthropic", false),
                None,
            ),
            (
                "Anthropic → OpenAI",
                anthropic("t-ao", "bench", false),
                Some(2),
            ),
            (
                "OpenAI → OpenAI stream (pass-through)",
                openai("t-oos", "bench-fixed-stream", true),
                None,
            ),
            (
                "OpenAI → Anthropic stream",
                openai("t-oas", "bench-anthropic-stream", true),
                Some(4),
            ),
            (
                "Anthropic → Anthropic stream (pass-through)",
                anthropic("t-aas", "bench-anthropic-stream", true),
                None,
            ),
            (
                "Anthropic → OpenAI stream",
                anthropic("t-aos", "bench-fixed-stream", true),
                Some(6),
            ),
            (
                "Responses → OpenAI Responses (pass-through)",
                responses("t-rr", "bench-responses", false),
                None,
            ),
            (
                "Responses → OpenAI chat",
                responses("t-ro", "bench", false),
                Some(8),
            ),
            (
                "Responses → OpenAI Responses stream (pass-through)",
                responses("t-rrs", "bench-responses-stream", true),
                None,
            ),
            (
                "Responses → OpenAI chat stream",
                responses("t-ros", "bench-fixed-stream", true),
                Some(10),
            ),
            (
                "OpenAI → Bedrock (SigV4 signed)",
                openai("t-ob", "bench-bedrock", false),
                Some(0),
            ),
            (
                "OpenAI → Bedrock stream (SigV4 signed)",
                openai("t-obs", "bench-bedrock-stream", true),
                Some(4),
            ),
        ];
        let mut runs: Vec<Vec<Run>> = rows.iter().map(|_| Vec::new()).collect();
        for (_, w, _) in &rows {
            self.warmup(&w.modelgate_url(), w);
        }
        // Interleaved repetitions, so drift on the machine hits every row alike.
        for _ in 0..self.reps {
            for (i, (_, w, _)) in rows.iter().enumerate() {
                runs[i].push(self.throughput(&w.modelgate_url(), w, Some(&mg)));
            }
        }
        let medians: Vec<Run> = runs.iter().map(|r| median_run(r)).collect();
        println!(
            "\n## Translation (modelgate only, {} connections, fixed upstream in the backend's API)\n",
            self.conns
        );
        println!(
            "| client → backend | req/s | CPU µs/req | vs pass-through | target ≤ {TRANSLATE_TARGET}× | errors |"
        );
        println!("|---|---:|---:|---:|---|---:|");
        for (i, (label, _, base)) in rows.iter().enumerate() {
            let m = &medians[i];
            let (ratio, verdict) = match base {
                Some(b) if medians[*b].cpu_us_per_req > 0.0 => {
                    let r = m.cpu_us_per_req / medians[*b].cpu_us_per_req;
                    (
                        format!("{r:.2}×"),
                        if r <= TRANSLATE_TARGET {
                            "PASS"
                        } else {
                            "FAIL"
                        },
                    )
                }
                Some(_) => ("n/a".to_owned(), "INVALID (no baseline)"),
                None => ("1.00×".to_owned(), "baseline"),
            };
            let verdict = if m.errors > 0 || m.ok == 0 {
                "INVALID (errors)"
            } else {
                verdict
            };
            println!(
                "| {label} | {:.0} | {:.1} | {ratio} | {verdict} | {} |",
                m.rps, m.cpu_us_per_req, m.errors
            );
        }
    }

    /// `cache-hit`: the small body on a route with the response cache on, warmed by one
    /// request (every request of the load is then a hit), against nginx proxying the same
    /// body to the fixed upstream (access log on, as modelgate's) and against the same
    /// modelgate route without a cache (every request goes to the fixed upstream); going
    /// direct to the fixed upstream is the headroom check. Closed loop, interleaved reps.
    fn cache_hit(&self) {
        let cached = route("bench-cached", "openai-compatible", FIXED_UPSTREAM).replacen(
            "    backends:",
            "    cache: {ttl: 1h}\n    backends:",
            1,
        );
        let config = bench_config(0, false).replacen("keys:\n", &format!("{cached}keys:\n"), 1);
        let mg = self.modelgate(&config, "cache", true);
        let nginx = self.nginx();
        let pass = Workload::chat("c-pass", small_body("bench"));
        let hit = Workload::chat("c-hit", small_body("bench-cached"));
        let targets = [
            ("direct (fixed upstream)", pass.direct_url(), None, &pass),
            (
                "nginx → fixed upstream",
                pass.nginx_url(NGINX_PORT),
                Some(&nginx),
                &pass,
            ),
            (
                "modelgate, no cache",
                pass.modelgate_url(),
                Some(&mg),
                &pass,
            ),
            ("modelgate, cache hit", hit.modelgate_url(), Some(&mg), &hit),
        ];
        for (_, url, _, w) in &targets {
            self.wrk_load(url, w, self.conns, "1s", None);
        }
        let mut runs: Vec<Vec<Run>> = targets.iter().map(|_| Vec::new()).collect();
        for _ in 0..self.reps {
            for (i, (_, url, proc_, w)) in targets.iter().enumerate() {
                runs[i].push(self.throughput(url, w, *proc_));
            }
        }
        let m: Vec<Run> = runs.iter().map(|r| median_run(r)).collect();
        let (headroom, fastest, _) = headroom(&m[0], &m[1], &m[3]);
        println!(
            "\n## Response cache (closed loop, {} connections, small body; hits against nginx)\n",
            self.conns
        );
        println!("| target | req/s | vs nginx (req/s) | CPU µs/req | errors |");
        println!("|---|---:|---:|---:|---:|");
        for (i, (label, ..)) in targets.iter().enumerate() {
            let cpu = if i == 0 {
                "—".to_owned()
            } else {
                format!("{:.1}", m[i].cpu_us_per_req)
            };
            println!(
                "| {label} | {:.0} | {:.2}× | {cpu} | {} |",
                m[i].rps,
                m[i].rps / m[1].rps.max(1.0),
                m[i].errors
            );
        }
        let verdict = if headroom >= HEADROOM {
            "count"
        } else {
            "do not count (the load generator and upstream had no headroom)"
        };
        println!(
            "\nGoing direct is {headroom:.2}× the fastest proxy ({fastest}): the ratios {verdict}."
        );
    }

    /// `tracing`: the small body with OpenTelemetry spans off (no endpoint), on with a
    /// sampling ratio of 0 (every request decides and records nothing), and on for every
    /// request (a span per request and one per upstream attempt, exported in batches by
    /// OTLP/HTTP to the fixed upstream's `/v1/traces`, nginx answering 200). One modelgate at
    /// a time on the bench's port, restarted per point; reps interleaved.
    fn tracing(&self) {
        let w = Workload::chat("small", small_body("bench"));
        let base = bench_config(0, false);
        let with = |ratio: &str| {
            base.replacen(
                "server: {listen: 127.0.0.1:18001, admin: 127.0.0.1:19001}",
                &format!(
                    "server: {{listen: 127.0.0.1:18001, admin: 127.0.0.1:19001, tracing: {{otlpEndpoint: 'http://{FIXED_UPSTREAM}', samplingRatio: {ratio}}}}}"
                ),
                1,
            )
        };
        let points = [
            ("off (no endpoint)", base.clone()),
            ("on, sampling ratio 0", with("0")),
            ("on, every request traced", with("1")),
        ];
        let mut runs: Vec<Vec<Run>> = points.iter().map(|_| Vec::new()).collect();
        for _ in 0..self.reps {
            for (i, (_, config)) in points.iter().enumerate() {
                let mg = self.modelgate(config, "tracing", true);
                self.warmup(&w.modelgate_url(), &w);
                runs[i].push(self.throughput(&w.modelgate_url(), &w, Some(&mg)));
            }
        }
        let m: Vec<Run> = runs.iter().map(|r| median_run(r)).collect();
        println!(
            "\n## Tracing (modelgate only, {} connections, small body)\n",
            self.conns
        );
        println!("| spans | req/s | CPU µs/req | vs off (CPU) | errors |");
        println!("|---|---:|---:|---:|---:|");
        for (i, (label, _)) in points.iter().enumerate() {
            println!(
                "| {label} | {:.0} | {:.1} | {:.2}× | {} |",
                m[i].rps,
                m[i].cpu_us_per_req,
                m[i].cpu_us_per_req / m[0].cpu_us_per_req.max(f64::MIN_POSITIVE),
                m[i].errors
            );
        }
    }

    fn throughput(&self, url: &str, w: &Workload, proc_: Option<&Proc>) -> Run {
        self.wrk_load(url, w, self.conns, &self.duration, proc_)
    }

    /// Throughput at saturation per workload and profile, latency at fixed rates, memory;
    /// returns the small-body modelgate runs (the peer comparison's reference).
    fn saturation_and_rates(&self, small: &Workload) -> Option<Vec<Run>> {
        let nginx = self.nginx();
        // Warm up: nginx's upstream connections, both servers.
        for port in [NGINX_PORT, NGINX_NO_LOG_PORT] {
            self.wrk_load(&small.nginx_url(port), small, self.conns, "1s", None);
        }
        let large_text: String = "Context passage about the sea and its tides. ".repeat(2300);
        let large = json!({"model": "bench", "max_tokens": 16, "messages": [{"role": "system", "content": "Answer from the context."}, {"role": "user", "content": large_text}]}).to_string();
        let stream = json!({"model": "bench-stream", "stream": true, "max_tokens": 128, "messages": [{"role": "user", "content": "Stream a long answer about the sea for a gateway benchmark run."}]}).to_string();
        let embed = json!({"model": "bench-embed", "input": ["The sea is large.", "Tides follow the moon."]}).to_string();
        let workloads = [
            small.clone(),
            Workload::chat("16k", body_16k()),
            Workload::chat("large", large),
            Workload {
                name: "stream",
                path: "/v1/chat/completions",
                body: stream,
                knobs: "s/chunks=100/".into(),
            },
            Workload {
                name: "embeddings",
                path: "/v1/embeddings",
                body: embed,
                knobs: String::new(),
            },
        ];
        for w in &workloads {
            assert!(
                w.body.len() <= NGINX_BODY_BUFFER,
                "the {} body ({} B) would spill out of nginx's body buffer: raise NGINX_BODY_BUFFER",
                w.name,
                w.body.len()
            );
        }
        println!(
            "body sizes: small {} B, 16k {} B, large {} B; the fixed upstream answers {} B (chat), {} B (embeddings)\n",
            small.body.len(),
            workloads[1].body.len(),
            workloads[2].body.len(),
            CHAT_ANSWER.len(),
            EMBEDDINGS_ANSWER.len()
        );

        let mut results: BTreeMap<(String, String), Vec<Run>> = BTreeMap::new();
        let mut rss: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for profile in &PROFILES {
            let full = profile.label == "1 key";
            // `--only`: the fair pair, not the key-table and limits profiles; `--peers-only`:
            // modelgate's small body with 1 key and its baselines.
            let more_state = profile.keys_extra > 0 || profile.limits;
            // `BENCH_ALL_PROFILES=1` keeps them with `--only` (a quick A/B of the small body).
            let all = std::env::var("BENCH_ALL_PROFILES").is_ok_and(|v| v == "1");
            if (peers_only() && !full) || (self.only.is_some() && more_state && !all) {
                continue;
            }
            // Profiles other than "1 key" measure the small body only.
            let runs: Vec<&Workload> = workloads
                .iter()
                .filter(|w| self.selected(w.name))
                .filter(|w| w.name == "small" || (full && !peers_only()))
                .collect();
            let latency = full && !peers_only() && self.selected("latency");
            if runs.is_empty() && !latency {
                continue;
            }
            let mg = self.modelgate(
                &bench_config(profile.keys_extra, profile.limits),
                profile.tag,
                profile.access_log,
            );
            // Warm up: upstream connection pool, allocator, caches.
            self.wrk_load(&small.modelgate_url(), small, self.conns, "1s", None);
            let (nginx_port, nginx_name) = if profile.access_log {
                (NGINX_PORT, "nginx")
            } else {
                (NGINX_NO_LOG_PORT, "nginx, logs off")
            };
            // Direct and nginx once per workload and log setting; modelgate per profile.
            let baselines = full || !profile.access_log;
            for w in runs {
                for _ in 0..self.reps {
                    let mut push = |row: String, target: &str, run: Run| {
                        results.entry((row, target.into())).or_default().push(run);
                    };
                    if full {
                        push(
                            w.name.into(),
                            "direct",
                            self.throughput(&w.direct_url(), w, None),
                        );
                    }
                    if baselines {
                        let run = self.throughput(&w.nginx_url(nginx_port), w, Some(&nginx));
                        push(w.name.into(), nginx_name, run);
                    }
                    let run = self.throughput(&w.modelgate_url(), w, Some(&mg));
                    push(format!("{} [{}]", w.name, profile.label), "modelgate", run);
                }
            }
            // Fixed rates, small body: latency added over going direct (oha: `-q` and its
            // correction for coordinated omission, which wrk does not have).
            if latency {
                let w = &workloads[0];
                for rate in [500u32, 1000, 5000] {
                    for _ in 0..self.reps {
                        let key = format!("small@{rate}/s");
                        let direct = self.oha(&w.direct_url(), w, Some(rate), None);
                        results
                            .entry((key.clone(), "direct".into()))
                            .or_default()
                            .push(direct);
                        let n = self.oha(&w.nginx_url(NGINX_PORT), w, Some(rate), Some(&nginx));
                        results
                            .entry((key.clone(), "nginx".into()))
                            .or_default()
                            .push(n);
                        let m = self.oha(&w.modelgate_url(), w, Some(rate), Some(&mg));
                        results
                            .entry((format!("{key} [1 key]"), "modelgate".into()))
                            .or_default()
                            .push(m);
                    }
                }
            }
            rss.insert(profile.label.into(), mg.rss_kib());
        }
        let lines = [
            ("nginx", self.dir.join("nginx-access.log")),
            ("modelgate", self.dir.join("modelgate-1-key.log")),
        ]
        .map(|(name, path)| (name, access_line_bytes(&path)));
        self.report(&results, &rss, lines);
        results.remove(&("small [1 key]".to_owned(), "modelgate".to_owned()))
    }

    /// `c1`: one connection, one request at a time, a fixed number of requests (closed
    /// loop): what a proxy adds to a request when nothing queues, as public gateway
    /// comparisons report it (p50 / p99 added over going direct). Runs interleave; medians.
    fn concurrency_one(&self, w: &Workload) {
        let requests: u64 = if self.reps == 1 { 2_000 } else { 20_000 };
        let nginx = self.nginx();
        let mg = self.modelgate(&bench_config(0, false), "c1", true);
        let urls = [w.direct_url(), w.nginx_url(NGINX_PORT), w.modelgate_url()];
        let targets = [
            ("direct", urls[0].as_str(), None),
            ("nginx", urls[1].as_str(), Some(&nginx)),
            ("modelgate", urls[2].as_str(), Some(&mg)),
        ];
        let one = |n| Load {
            conns: 1,
            until: Until::Requests(n),
            rate: None,
        };
        for (_, url, _) in targets {
            // Warm up: connections, allocator, caches.
            self.oha_load(KEY, url, w, &one(500), None);
        }
        let mut runs: BTreeMap<&str, Vec<Run>> = BTreeMap::new();
        for _ in 0..self.reps {
            for (name, url, p) in targets {
                let run = self.oha_load(KEY, url, w, &one(requests), p);
                runs.entry(name).or_default().push(run);
            }
        }
        let med = |name: &str| median_run(&runs[name]);
        let direct = med("direct");
        println!(
            "\n## Added latency at concurrency 1 ({} body, closed loop, 1 connection, {requests} requests × {} reps)\n",
            w.name, self.reps
        );
        println!("| target | p50 ms | p99 ms | added p50 | added p99 | req/s | errors |");
        println!("|---|---|---|---|---|---|---|");
        for name in ["direct", "nginx", "modelgate"] {
            let r = med(name);
            let added = |ms: f64| {
                if name == "direct" {
                    "—".to_owned()
                } else {
                    format!("{:.0} µs", ms * 1e3)
                }
            };
            println!(
                "| {name} | {:.3} | {:.3} | {} | {} | {:.0} | {} |",
                r.p50_ms,
                r.p99_ms,
                added(r.p50_ms - direct.p50_ms),
                added(r.p99_ms - direct.p99_ms),
                r.rps,
                r.errors
            );
        }
    }

    /// `slow`: sustained throughput against an upstream that adds `SLOW_MS` to every
    /// request, at `SLOW_CONNS` connections (closed loop, fixed time). The ceiling is
    /// connections / latency. A ratio between the proxies counts only when going direct is
    /// at least `HEADROOM` × the fastest proxy in the same run; otherwise the point is
    /// printed INVALID: the load generator or the upstream set the pace, not the proxy.
    fn slow_upstream(&self) {
        let conns = SLOW_CONNS;
        println!(
            "\n## Sustained throughput behind a slow upstream (+{SLOW_MS} ms per request, {conns} connections, closed loop)\n"
        );
        // The upstream holds wrk's connections and both proxies' idle pools at once; wrk
        // and the servers inherit this process's limit.
        let need = 4 * u64::from(conns);
        match open_files_limit() {
            Some(limit) if limit >= need => {}
            limit => {
                println!(
                    "SKIPPED: the open-file limit is {} and this section needs {need}: `ulimit -n 65536` first (scripts/bench.sh raises it)",
                    limit.map_or("unknown".to_owned(), |l| l.to_string())
                );
                return;
            }
        }
        // The mock adds the delay (its `latency` knob); modelgate's `bench-slow` route has
        // the same knob in its upstream URL.
        let w = Workload {
            name: "slow",
            path: "/v1/chat/completions",
            body: small_body("bench-slow"),
            knobs: format!("s/latency={SLOW_MS}/"),
        };
        let nginx = self.nginx();
        let mg = self.modelgate(&bench_config(0, false), "slow", true);
        let urls = [w.direct_url(), w.nginx_url(NGINX_PORT), w.modelgate_url()];
        let targets = [
            ("direct", urls[0].as_str(), None),
            ("nginx", urls[1].as_str(), Some(&nginx)),
            ("modelgate", urls[2].as_str(), Some(&mg)),
        ];
        let secs = if self.reps == 1 { "3s" } else { "10s" };
        for (_, url, _) in targets {
            // Warm up: opens the proxies' upstream connections (nginx's keepalive cache,
            // modelgate's pool), so the runs measure serving, not connecting.
            self.wrk_load(url, &w, conns, "2s", None);
        }
        let mut runs: BTreeMap<&str, Vec<Run>> = BTreeMap::new();
        for _ in 0..self.reps {
            for (name, url, p) in targets {
                let run = self.wrk_load(url, &w, conns, secs, p);
                runs.entry(name).or_default().push(run);
            }
        }
        let med = |name: &str| median_run(&runs[name]);
        let (d, n, m) = (med("direct"), med("nginx"), med("modelgate"));
        let ceiling = f64::from(conns) / (SLOW_MS as f64 / 1e3);
        let (headroom, fastest_name, fastest) = headroom(&d, &n, &m);
        let valid = headroom >= HEADROOM;
        println!(
            "{secs} × {} reps per target; ceiling {conns} connections / {SLOW_MS} ms = {ceiling:.0} req/s\n",
            self.reps
        );
        println!(
            "| point | direct req/s | nginx req/s | modelgate req/s | modelgate/nginx | direct / fastest proxy | errors (direct / nginx / modelgate) | valid |"
        );
        println!("|---|---|---|---|---|---|---|---|");
        let verdict = if valid {
            "yes".to_owned()
        } else {
            format!("INVALID: direct < {HEADROOM} × {fastest_name}")
        };
        println!(
            "| +{SLOW_MS} ms, {conns} connections | {:.0} | {:.0} | {:.0} | {:.2} | {headroom:.2} | {} / {} / {} | {verdict} |",
            d.rps,
            n.rps,
            m.rps,
            m.rps / n.rps.max(1.0),
            d.errors,
            n.errors,
            m.errors
        );
        println!();
        println!(
            "| target | req/s | share of the {ceiling:.0} req/s ceiling | p50 ms | p99 ms | CPU µs/req |"
        );
        println!("|---|---|---|---|---|---|");
        for (name, r) in [("direct", &d), ("nginx", &n), ("modelgate", &m)] {
            let cpu = if name == "direct" {
                "—".to_owned()
            } else {
                format!("{:.1}", r.cpu_us_per_req)
            };
            println!(
                "| {name} | {:.0} | {:.0}% | {:.2} | {:.2} | {cpu} |",
                r.rps,
                r.rps / ceiling * 100.0,
                r.p50_ms,
                r.p99_ms
            );
        }
        println!(
            "\n- {} headroom: going direct reached {:.0} req/s, {headroom:.2} × the fastest proxy ({fastest_name}, {fastest:.0} req/s); a ratio counts from {HEADROOM} ×",
            if valid { "PASS" } else { "INVALID" },
            d.rps
        );
    }

    /// `--soak SECS` (default 600): steady mixed traffic at fixed rates with 100k keys and a
    /// reload every 30 s, RSS sampled every 10 s; prints whether it stays flat.
    fn soak(&self, secs: u64) {
        println!(
            "\n## Memory over a {secs}-second run (100k keys, mixed traffic, reload every 30 s)\n"
        );
        let config = bench_config(100_000, true);
        let mg = self.modelgate(&config, "soak", true);
        let config_path = self.dir.join("modelgate-soak.yaml");
        let loads: [(&str, &str, String, u32); 5] = [
            ("small", "/v1/chat/completions", json!({"model": "bench", "max_tokens": 16, "messages": [{"role": "user", "content": "Write one short sentence about the sea."}]}).to_string(), 800),
            ("stream", "/v1/chat/completions", json!({"model": "bench-stream", "stream": true, "messages": [{"role": "user", "content": "Stream."}]}).to_string(), 50),
            ("embeddings", "/v1/embeddings", json!({"model": "bench-embed", "input": ["The sea is large."]}).to_string(), 200),
            ("unknown model", "/v1/chat/completions", json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]}).to_string(), 50),
            ("bad JSON", "/v1/chat/completions", "{\"model\": ".to_string(), 50),
        ];
        let mut children = Vec::new();
        for (i, (name, path, body, rate)) in loads.iter().enumerate() {
            let body_file = self.dir.join(format!("soak-{i}.json"));
            std::fs::write(&body_file, body).unwrap();
            let child = Command::new("taskset")
                .args(["-c", "0", &self.oha, "--no-tui", "--output-format", "json"])
                .args(["-z", &format!("{secs}s"), "-c", "8", "-m", "POST"])
                .args(["-q", &rate.to_string()])
                .args(["-H", "content-type: application/json"])
                .args(["-H", &format!("authorization: Bearer {KEY}")])
                .arg("-D")
                .arg(&body_file)
                .arg(format!("http://127.0.0.1:18001{path}"))
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("oha");
            children.push((*name, child));
        }
        let started = Instant::now();
        let mut samples: Vec<(u64, f64)> = Vec::new();
        let mut next_reload = 30;
        while started.elapsed().as_secs() < secs {
            std::thread::sleep(Duration::from_secs(10));
            let t = started.elapsed().as_secs();
            let (rss, _) = mg.rss_kib();
            samples.push((t, rss as f64 / 1024.0));
            if t >= next_reload {
                // Same keys, one route weight changed: a real swap of a 100k-key snapshot.
                let text =
                    config.replacen("openai-compatible,", "openai-compatible, weight: 2,", 1);
                let text = if (t / 30) % 2 == 0 {
                    text
                } else {
                    config.clone()
                };
                std::fs::write(&config_path, text).unwrap();
                next_reload += 30;
            }
        }
        let mut total = 0u64;
        for (name, child) in children {
            let out = child.wait_with_output().unwrap();
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            let n: u64 = v["statusCodeDistribution"]
                .as_object()
                .map(|m| m.values().filter_map(|x| x.as_u64()).sum())
                .unwrap_or(0);
            total += n;
            println!("- {name}: {n} responses {}", v["statusCodeDistribution"]);
        }
        println!("- requests in all: {total}\n");
        // Per minute: the lowest sample (what the proxy holds between reloads: a leak shows
        // as this rising) and the highest (a reload of the 100k-key file in progress).
        println!("| minute | lowest RSS MiB | highest RSS MiB |");
        println!("|---|---|---|");
        let minute = |m: u64| {
            let v: Vec<f64> = samples
                .iter()
                .filter(|(t, _)| *t > m * 60 && *t <= (m + 1) * 60)
                .map(|s| s.1)
                .collect();
            let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = v.iter().copied().fold(0.0, f64::max);
            (lo, hi)
        };
        let minutes = secs.div_ceil(60);
        for m in 0..minutes {
            let (lo, hi) = minute(m);
            println!("| {} | {lo:.1} | {hi:.1} |", m + 1);
        }
        let first = minute(1.min(minutes.saturating_sub(1))).0;
        let last = minute(minutes.saturating_sub(1)).0;
        let (_, peak) = mg.rss_kib();
        let growth = last - first;
        let peak = peak as f64 / 1024.0;
        let verdict = |ok: bool| if ok { "PASS" } else { "MISS" };
        println!();
        println!(
            "- {} RSS between reloads flat over the run (second minute {first:.1} MiB → last minute {last:.1} MiB, {growth:+.1} MiB)",
            verdict(growth < (first * 0.05).max(2.0)),
        );
        println!(
            "- {} peak RSS with 100k keys, reloads included, < 64 MiB: {peak:.1} MiB",
            verdict(peak < 64.0),
        );
    }

    /// Config scale: compile and swap times at 10k routes / 100k keys, and latency while the
    /// proxy swaps such a snapshot every second.
    fn scale(&self) {
        println!(
            "\n## Config scale ({} routes, {} keys)\n",
            scale::ROUTES,
            scale::KEYS
        );
        let (validate_ms, swap_us, free_ms) = scale::proxy_swap(3);
        let operator_ms = scale::operator_compile(3);
        println!("| step | time |");
        println!("|---|---|");
        println!("| operator: compile the index into a snapshot | {operator_ms:.0} ms |");
        println!(
            "| proxy: validate the snapshot (wire types → runtime tables) | {validate_ms:.0} ms |"
        );
        println!("| proxy: swap it in (arc-swap store) | {swap_us:.0} µs |");
        println!(
            "| proxy: free the previous snapshot (after the swap, on the applying thread) | {free_ms:.0} ms |"
        );
        let upstream = "http://127.0.0.1:18000/v1";
        let path = self.dir.join("scale.yaml");
        std::fs::write(&path, scale::file(upstream, 1)).unwrap();
        let started = Instant::now();
        let child = Command::new("taskset")
            .args([
                "-c",
                &std::env::var("SCALE_CPUS").unwrap_or_else(|_| "1".into()),
            ])
            .arg(self.bin.join("modelgate-dataplane"))
            .arg("--config")
            .arg(&path)
            .args(["--reload-interval", "200ms"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("scale.log")).unwrap())
            .spawn()
            .unwrap();
        wait_port("127.0.0.1:18001");
        let load_s = started.elapsed().as_secs_f64();
        let mg = Proc::own(child);
        let w = Workload {
            name: "scale",
            path: "/v1/chat/completions",
            body: json!({"model": "model-0", "max_tokens": 16, "messages": [{"role": "user", "content": "Write one short sentence about the sea, please, for a benchmark."}]}).to_string(),
            knobs: String::new(),
        };
        let url = "http://127.0.0.1:18001/v1/chat/completions";
        self.warmup(url, &w);
        let steady = self.oha_as("sk-scale-0", url, &w, Some(1000), Some(&mg));
        // Rewrite the file every second while the same load runs: the YAML file, then the
        // same snapshot as JSON (the operator's wire format; standalone files may be either).
        let yaml = [scale::file(upstream, 2), scale::file(upstream, 1)];
        let yaml_mb = yaml[0].len() as f64 / 1e6;
        let (swapping, writes) = self.swap_under_load(&path, yaml, url, &w, &mg);
        let json_files = [scale::json_file(upstream, 2), scale::json_file(upstream, 1)];
        let json_mb = json_files[0].len() as f64 / 1e6;
        let (swapping_json, json_writes) = self.swap_under_load(&path, json_files, url, &w, &mg);
        std::thread::sleep(Duration::from_millis(2500));
        let metrics = http_get("127.0.0.1:19001", "/metrics");
        let applied: f64 = metrics
            .lines()
            .filter(|l| l.starts_with("modelgate_config_reloads_total{result=\"applied\"}"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        let (rss, peak) = mg.rss_kib();
        println!("| proxy: start with the file (parse + validate + listen) | {load_s:.1} s |");
        println!(
            "\nTraffic at 1000 req/s (small body) while the file is rewritten every second: {yaml_mb:.0} MB of YAML ({writes} writes), then {json_mb:.0} MB of JSON ({json_writes} writes); {applied:.0} snapshots applied in all:\n"
        );
        println!("| phase | p50 ms | p99 ms | p99.9 ms | ok | errors |");
        println!("|---|---|---|---|---|---|");
        for (name, r) in [
            ("steady", &steady),
            ("swapping every second (YAML)", &swapping),
            ("swapping every second (JSON)", &swapping_json),
        ] {
            println!(
                "| {name} | {:.3} | {:.3} | {:.3} | {} | {} |",
                r.p50_ms, r.p99_ms, r.p999_ms, r.ok, r.errors
            );
        }
        println!(
            "\nproxy RSS with this snapshot: {:.1} MiB (peak {:.1} MiB)",
            rss as f64 / 1024.0,
            peak as f64 / 1024.0
        );
        let ratio = swapping.p99_ms / steady.p99_ms.max(0.001);
        let ratio_json = swapping_json.p99_ms / steady.p99_ms.max(0.001);
        let total_ms = validate_ms + swap_us / 1e3;
        println!();
        println!(
            "- {} snapshot validate + swap at {} routes / {} keys < 200 ms: {total_ms:.0} ms",
            if total_ms < 200.0 { "PASS" } else { "MISS" },
            scale::ROUTES,
            scale::KEYS
        );
        let errors = swapping.errors + swapping_json.errors;
        println!(
            "- {} no request failed while swapping: {errors} errors",
            if errors == 0 { "PASS" } else { "MISS" },
        );
        for (format, ratio) in [("YAML", ratio), ("JSON", ratio_json)] {
            println!(
                "- {} p99 while swapping ({format}) ≤ 2 × steady p99: {ratio:.2}",
                if ratio <= 2.0 { "PASS" } else { "MISS" }
            );
        }
    }

    /// Run fixed-rate traffic while `files` are written to `path` in turn, one a second.
    fn swap_under_load(
        &self,
        path: &std::path::Path,
        files: [String; 2],
        url: &str,
        w: &Workload,
        mg: &Proc,
    ) -> (Run, usize) {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (stop, path) = (stop.clone(), path.to_path_buf());
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let tmp = path.with_extension("tmp");
                    std::fs::write(&tmp, &files[n % 2]).unwrap();
                    std::fs::rename(&tmp, &path).unwrap();
                    n += 1;
                    std::thread::sleep(Duration::from_secs(1));
                }
                n
            })
        };
        let run = self.oha_as("sk-scale-0", url, w, Some(1000), Some(mg));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (run, writer.join().unwrap())
    }

    /// LiteLLM's proxy (PyPI `litellm[proxy]`, default settings, one worker) against the same
    /// upstream and workload; `scripts/bench.sh` installs it when BENCH_PEERS=1.
    fn litellm(&self, w: &Workload, modelgate: Option<&Vec<Run>>) {
        let bin = std::env::var("LITELLM_BIN").unwrap_or_else(|_| "litellm".into());
        let cfg = self.dir.join("litellm.yaml");
        std::fs::write(
            &cfg,
            format!(
                "model_list:\n  - model_name: bench\n    litellm_params:\n      model: openai/bench\n      api_base: http://{FIXED_UPSTREAM}/v1\n      api_key: sk-upstream\ngeneral_settings:\n  master_key: {KEY}\n"
            ),
        )
        .unwrap();
        let child = Command::new("taskset")
            .args(["-c", "1", &bin, "--config"])
            .arg(&cfg)
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                "18003",
                "--num_workers",
                "1",
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("litellm.log")).unwrap())
            .spawn()
            .expect("litellm (BENCH_PEERS=1 make bench installs it)");
        let deadline = Instant::now() + Duration::from_secs(180);
        while std::net::TcpStream::connect("127.0.0.1:18003").is_err() {
            assert!(
                Instant::now() < deadline,
                "litellm did not start; see {}",
                self.dir.join("litellm.log").display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let peer = Proc::own(child);
        let url = "http://127.0.0.1:18003/v1/chat/completions";
        self.warmup(url, w);
        let runs: Vec<Run> = (0..self.reps)
            .map(|_| self.oha(url, w, None, Some(&peer)))
            .collect();
        let (rss, peak) = peer.rss_kib();
        let rps = median(runs.iter().map(|r| r.rps).collect());
        let cpu = median(runs.iter().map(|r| r.cpu_us_per_req).collect());
        let errors: u64 = runs.iter().map(|r| r.errors).sum();
        println!(
            "\n## Peer gateway: LiteLLM proxy (small body, closed loop, {} connections)\n",
            self.conns
        );
        println!("| gateway | rps | CPU µs/req | RSS MiB (peak) | errors |");
        println!("|---|---|---|---|---|");
        println!(
            "| LiteLLM | {rps:.0} | {cpu:.0} | {:.0} ({:.0}) | {errors} |",
            rss as f64 / 1024.0,
            peak as f64 / 1024.0
        );
        if let Some(m) = modelgate {
            let mrps = median(m.iter().map(|r| r.rps).collect());
            let mcpu = median(m.iter().map(|r| r.cpu_us_per_req).collect());
            println!("| modelgate | {mrps:.0} | {mcpu:.1} | | |");
            let ratio = mrps / rps.max(0.001);
            println!(
                "\n- {} throughput ≥ 100 × LiteLLM: {ratio:.0}×",
                if ratio >= 100.0 { "PASS" } else { "MISS" }
            );
        }
        println!(
            "\n(LiteLLM's CPU counts its main process only; its workers may run in child processes.)"
        );
    }

    /// The throughput table (CPU per request first, then throughput per core beside req/s,
    /// and each point's headroom), the fixed rates, memory, and the targets.
    fn report(
        &self,
        results: &BTreeMap<(String, String), Vec<Run>>,
        rss: &BTreeMap<String, (u64, u64)>,
        log_lines: [(&str, Option<f64>); 2],
    ) {
        let med = |name: &str, target: &str| -> Option<Run> {
            let runs = results.get(&(name.to_owned(), target.to_owned()))?;
            Some(median_run(runs))
        };
        /// What the targets read from a row.
        struct Figures {
            cpu_ratio: f64,
            ratio: f64,
            headroom: f64,
        }
        let mut figures: BTreeMap<String, Figures> = BTreeMap::new();
        let (mut rows, mut points) = (Vec::new(), Vec::new());
        // modelgate's own time as it reports it, against its CPU per request.
        let mut own: Vec<(String, f64, f64)> = Vec::new();
        for w in ["small", "16k", "large", "stream", "embeddings"] {
            let Some(d) = med(w, "direct") else {
                continue;
            };
            for profile in &PROFILES {
                let row = format!("{w} [{}]", profile.label);
                let nginx = if profile.access_log {
                    "nginx"
                } else {
                    "nginx, logs off"
                };
                let (Some(n), Some(m)) = (med(w, nginx), med(&row, "modelgate")) else {
                    continue;
                };
                let ratio = m.rps / n.rps.max(1.0);
                let cpu_ratio = m.cpu_us_per_req / n.cpu_us_per_req.max(0.001);
                let per_core = |r: &Run| 1e6 / r.cpu_us_per_req.max(0.001);
                let (headroom, fastest_name, fastest) = headroom(&d, &n, &m);
                let valid = headroom >= HEADROOM;
                let verdict = if valid {
                    "yes".to_owned()
                } else {
                    format!("INVALID: direct < {HEADROOM} × {fastest_name}")
                };
                rows.push(format!(
                    "| {row} | {:.1} | {:.1} | {cpu_ratio:.2} | {:.0} | {:.0} | {:.0} | {:.0} | {ratio:.2} | {:.0} | {headroom:.2} | {} / {} / {} | {verdict} |",
                    n.cpu_us_per_req,
                    m.cpu_us_per_req,
                    n.rps,
                    per_core(&n),
                    m.rps,
                    per_core(&m),
                    d.rps,
                    d.errors,
                    n.errors,
                    m.errors
                ));
                // At saturation with core 0 to spare, a proxy alone on core 1 uses all of it;
                // one that used less was held back by something the headroom check does not
                // see (another process on core 1): its req/s understate it, its CPU per
                // request still counts.
                let cores = |r: &Run| r.rps * r.cpu_us_per_req / 1e6;
                let (cn, cm) = (cores(&n), cores(&m));
                let note = if cn.min(cm) < BUSY_CORE {
                    format!(
                        " (below {BUSY_CORE}: core 1 was not the proxies' alone, their req/s understate them)"
                    )
                } else {
                    String::new()
                };
                points.push(format!(
                    "- {} {row}: going direct reached {:.0} req/s, {headroom:.2} × the fastest proxy ({fastest_name}, {fastest:.0} req/s); cores used: nginx {cn:.2}, modelgate {cm:.2}{note}",
                    if valid { "PASS" } else { "INVALID" },
                    d.rps,
                ));
                own.push((row.clone(), m.overhead_us, m.cpu_us_per_req));
                figures.insert(
                    row,
                    Figures {
                        cpu_ratio,
                        ratio,
                        headroom,
                    },
                );
            }
        }
        if !rows.is_empty() {
            println!(
                "## Throughput at saturation (wrk, closed loop, {} connections)\n",
                self.conns
            );
            println!(
                "Both proxies with their access log on, except in the rows marked logs off. CPU µs/req: the proxy process's CPU time over the run per answer; req/s per core: answers per second of that CPU time (1e6 / CPU µs/req). A throughput ratio counts only where going direct reached {HEADROOM} × the fastest proxy.\n"
            );
            println!(
                "| workload | nginx CPU µs/req | modelgate CPU µs/req | CPU ratio | nginx req/s | nginx req/s per core | modelgate req/s | modelgate req/s per core | modelgate/nginx req/s | direct req/s | direct / fastest proxy | errors (direct / nginx / modelgate) | valid |"
            );
            println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
            for r in rows {
                println!("{r}");
            }
            println!("\nHeadroom per point (a throughput ratio counts from {HEADROOM} ×):\n");
            for p in points {
                println!("{p}");
            }
            if let [(_, Some(n)), (_, Some(m))] = log_lines {
                println!(
                    "\nAccess log lines, mean of the first MiB of each file: nginx {n:.0} B, modelgate {m:.0} B."
                );
            }
            println!(
                "\nmodelgate's own time per request as it reports it (`x-modelgate-overhead-us`; here the mean of its `gateway_overhead_seconds` histogram over each run) against its CPU time per request:\n"
            );
            println!("| workload | reported µs/req | CPU µs/req | reported / CPU |");
            println!("|---|---|---|---|");
            for (row, reported, cpu) in &own {
                println!(
                    "| {row} | {reported:.1} | {cpu:.1} | {:.2} |",
                    reported / cpu.max(0.001)
                );
            }
        }
        let mut verdicts: Vec<(String, Verdict, String)> = Vec::new();
        // Throughput targets hold only on a point with headroom.
        let throughput = |row: &str, floor: f64| {
            let f = figures.get(row)?;
            let (verdict, value) = if f.headroom >= HEADROOM {
                (Verdict::of(f.ratio >= floor), format!("{:.2}", f.ratio))
            } else {
                (
                    Verdict::Invalid,
                    format!(
                        "{:.2}, but going direct reached only {:.2} × the fastest proxy",
                        f.ratio, f.headroom
                    ),
                )
            };
            Some((
                format!("throughput {row} ≥ {floor} × nginx's"),
                verdict,
                value,
            ))
        };
        // Issue 15: small body, both access logs on, one core each.
        if let Some(f) = figures.get("small [1 key]") {
            verdicts.push((
                "CPU per request small [1 key], access logs on, ≤ 1.5 × nginx's".into(),
                Verdict::of(f.cpu_ratio <= 1.5),
                format!("{:.2}", f.cpu_ratio),
            ));
        }
        // Throughput per core: the same figures as CPU per request, inverted (three decimals:
        // 0.699 is a miss). It does not depend on core 0, so it holds where the req/s ratio
        // has no headroom to count.
        for row in ["small [1 key]", "16k [1 key]"] {
            if let Some(f) = figures.get(row) {
                let per_core = 1.0 / f.cpu_ratio.max(0.001);
                verdicts.push((
                    format!("throughput per core {row}, access logs on, ≥ 0.7 × nginx's"),
                    Verdict::of(per_core >= 0.7),
                    format!("{per_core:.3}"),
                ));
            }
        }
        verdicts.extend(throughput("16k [1 key]", 0.7));
        if let Some((row, reported, cpu)) = own.iter().find(|(r, ..)| r == "small [1 key]") {
            let ratio = reported / cpu.max(0.001);
            verdicts.push((
                format!("overhead reported {row} within 20 % of CPU per request"),
                Verdict::of((0.8..=1.2).contains(&ratio)),
                format!("{reported:.1} / {cpu:.1} µs = {ratio:.2}"),
            ));
        }
        // Earlier targets.
        for profile in ["1 key", "100k keys", "1 key + limits"] {
            let row = format!("small [{profile}]");
            verdicts.extend(throughput(&row, 0.8));
            if let Some(f) = figures.get(&row)
                && profile != "1 key"
            {
                verdicts.push((
                    format!("CPU per request {row} ≤ 2 × nginx's"),
                    Verdict::of(f.cpu_ratio <= 2.0),
                    format!("{:.2}", f.cpu_ratio),
                ));
            }
        }
        verdicts.extend(throughput("large [1 key]", 0.7));
        let mut heading = true;
        for rate in [500u32, 1000, 5000] {
            let key = format!("small@{rate}/s");
            let (Some(d), Some(n), Some(m)) = (
                med(&key, "direct"),
                med(&key, "nginx"),
                med(&format!("{key} [1 key]"), "modelgate"),
            ) else {
                continue;
            };
            if std::mem::take(&mut heading) {
                println!(
                    "\n## Latency at fixed rates (small body; oha, open loop with latency correction)\n"
                );
                println!(
                    "| rate | direct p50 / p99 / p99.9 ms | nginx p50 / p99 ms | modelgate p50 / p99 / p99.9 ms | nginx added p50 / p99 | modelgate added p50 | modelgate added p99 |"
                );
                println!("|---|---|---|---|---|---|---|");
            }
            let (a50, a99) = ((m.p50_ms - d.p50_ms) * 1e3, (m.p99_ms - d.p99_ms) * 1e3);
            println!(
                "| {rate}/s | {:.3} / {:.3} / {:.3} | {:.3} / {:.3} | {:.3} / {:.3} / {:.3} | {:.0} / {:.0} µs | {a50:.0} µs | {a99:.0} µs |",
                d.p50_ms,
                d.p99_ms,
                d.p999_ms,
                n.p50_ms,
                n.p99_ms,
                m.p50_ms,
                m.p99_ms,
                m.p999_ms,
                (n.p50_ms - d.p50_ms) * 1e3,
                (n.p99_ms - d.p99_ms) * 1e3
            );
            if rate == 500 || rate == 5000 {
                verdicts.push((
                    format!("added p50 at {rate}/s < 100 µs"),
                    Verdict::of(a50 < 100.0),
                    format!("{a50:.0} µs"),
                ));
                verdicts.push((
                    format!("added p99 at {rate}/s < 500 µs"),
                    Verdict::of(a99 < 500.0),
                    format!("{a99:.0} µs"),
                ));
            }
        }
        println!("\n## Memory (modelgate-dataplane after its runs)\n");
        println!("| profile | RSS MiB | peak RSS MiB |");
        println!("|---|---|---|");
        for (p, (now, peak)) in rss {
            println!(
                "| {p} | {:.1} | {:.1} |",
                *now as f64 / 1024.0,
                *peak as f64 / 1024.0
            );
            let limit = if p.contains("100k") { 64.0 } else { 32.0 };
            verdicts.push((
                format!("peak RSS [{p}] < {limit} MiB"),
                Verdict::of((*peak as f64 / 1024.0) < limit),
                format!("{:.1} MiB", *peak as f64 / 1024.0),
            ));
        }
        println!("\n## Targets\n");
        for (what, verdict, value) in verdicts {
            println!("- {} {what}: {value}", verdict.word());
        }
    }
}

/// Config scale: 10,000 routes and 100,000 keys.
mod scale {
    use std::sync::Arc;
    use std::time::Instant;

    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::Secret;
    use modelgate_crds::{
        ApiKey, ApiKeySpec, Limits, ModelRoute, ModelRouteSpec, Provider, RouteBackend,
        SecretKeyRef,
    };
    use modelgate_dataplane::config::{
        self, BackendSpec, KeySpec, LimitsSpec, ProviderKind, RouteSpec, SnapshotSpec, Source,
    };
    use modelgate_dataplane::snapshot::Live;
    use modelgate_operator::index::{Context, Index};

    pub const ROUTES: usize = 10_000;
    pub const KEYS: usize = 100_000;

    pub fn spec(upstream: &str, weight: u32) -> SnapshotSpec {
        let routes = (0..ROUTES)
            .map(|i| RouteSpec {
                name: format!("route-{i}"),
                namespace: format!("team-{}", i % 100),
                model: format!("model-{i}"),
                aliases: vec![],
                strategy: Default::default(),
                timeout: None,
                retries: None,
                outlier_detection: None,
                max_output_tokens: None,
                stream_idle_timeout: None,
                stream_timeout: None,
                max_cost_per_request: None,
                shadow: None,
                cache: None,
                masking: None,
                backends: vec![BackendSpec {
                    name: "up".into(),
                    provider: ProviderKind::OpenaiCompatible,
                    url: Some(upstream.into()),
                    model: None,
                    weight,
                    priority: 0,
                    credentials: None,
                    timeout: None,
                    pricing: None,
                    mock: None,
                    anthropic: None,
                    azure: None,
                    bedrock: None,
                    vertex: None,
                }],
            })
            .collect();
        let keys = (0..KEYS)
            .map(|i| KeySpec {
                name: format!("key-{i}"),
                namespace: format!("team-{}", i % 100),
                sha256: modelgate_tests::harness::sha256_hex(&format!("sk-scale-{i}")),
                models: vec![],
                limits: (i % 10 == 0).then_some(LimitsSpec {
                    requests_per_minute: Some(600),
                    tokens_per_minute: None,
                    max_concurrent: None,
                }),
                budget: None,
                expires_at: None,
                disabled: false,
                exhausted: false,
                max_cost_per_request: None,
            })
            .collect();
        SnapshotSpec {
            // The operator sends its content hash along; the proxy does not recompute it.
            version: Some(format!("scale-{weight}")),
            routes,
            keys,
        }
    }

    /// (validate ms, swap µs, free the old one ms) in the proxy, median of `reps`.
    pub fn proxy_swap(reps: usize) -> (f64, f64, f64) {
        let live = Live::default();
        let mut validate = Vec::new();
        let mut swap = Vec::new();
        let mut free = Vec::new();
        for r in 0..reps {
            let s = spec("http://127.0.0.1:18000/v1", 1 + r as u32);
            let t = Instant::now();
            let previous = live.load();
            let snap = config::compile(s, Source::Operator, &live.registry, previous.as_deref())
                .expect("valid");
            drop(previous);
            validate.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            let old = live.store(snap);
            swap.push(t.elapsed().as_secs_f64() * 1e6);
            let t = Instant::now();
            drop(old);
            free.push(t.elapsed().as_secs_f64() * 1e3);
        }
        (
            super::median(validate),
            super::median(swap),
            super::median(free),
        )
    }

    /// Operator compile time (ms) over an index of 10k routes, 100k keys and their Secrets.
    pub fn operator_compile(reps: usize) -> f64 {
        let mut index = Index::default();
        for i in 0..ROUTES {
            let mut r = ModelRoute::new(
                &format!("route-{i}"),
                ModelRouteSpec {
                    model: format!("model-{i}"),
                    aliases: vec![],
                    backends: vec![RouteBackend {
                        name: "up".into(),
                        provider: Provider::OpenaiCompatible,
                        url: Some("http://vllm:8000/v1".into()),
                        model: None,
                        weight: None,
                        priority: None,
                        credentials_ref: None,
                        timeout: None,
                        pricing: None,
                        mock: None,
                        anthropic: None,
                        azure: None,
                        bedrock: None,
                        vertex: None,
                    }],
                    strategy: None,
                    timeout: None,
                    retries: None,
                    outlier_detection: None,
                    max_output_tokens: None,
                    stream_idle_timeout: None,
                    stream_timeout: None,
                    max_cost_per_request: None,
                    shadow: None,
                    cache: None,
                    masking: None,
                },
            );
            r.metadata.namespace = Some(format!("team-{}", i % 100));
            r.metadata.generation = Some(1);
            index.apply_route(r);
        }
        for i in 0..KEYS {
            let ns = format!("team-{}", i % 100);
            let mut s = Secret::default();
            s.metadata.namespace = Some(ns.clone());
            s.metadata.name = Some(format!("key-{i}"));
            s.data = Some(
                [(
                    "key".to_owned(),
                    ByteString(format!("sk-scale-key-{i:08}").into_bytes()),
                )]
                .into(),
            );
            index.apply_secret(s);
            let mut k = ApiKey::new(
                &format!("key-{i}"),
                ApiKeySpec {
                    secret_ref: Some(SecretKeyRef {
                        name: format!("key-{i}"),
                        key: "key".into(),
                    }),
                    models: vec![],
                    limits: Some(Limits {
                        requests_per_minute: Some(600),
                        tokens_per_minute: None,
                        max_concurrent: None,
                    }),
                    budget: None,
                    expires_at: None,
                    disabled: None,
                    max_cost_per_request: None,
                },
            );
            k.metadata.namespace = Some(ns);
            k.metadata.generation = Some(1);
            index.apply_key(k);
        }
        let ctx = Context {
            serving: index
                .keys()
                .map(|k| (k.metadata.namespace.clone().unwrap_or_default(), 2))
                .collect(),
            ..Default::default()
        };
        let mut times = Vec::new();
        for _ in 0..reps {
            let t = Instant::now();
            let c = index.compile(&ctx);
            times.push(t.elapsed().as_secs_f64() * 1e3);
            assert_eq!(c.spec.routes.len(), ROUTES);
            assert_eq!(c.spec.keys.len(), KEYS);
        }
        let _ = Arc::new(());
        super::median(times)
    }

    /// The snapshot as the proxy's YAML file (keys use sk-scale-<i>).
    /// The same snapshot as a JSON config file.
    pub fn json_file(upstream: &str, weight: u32) -> String {
        let mut s = spec(upstream, weight);
        // As `file` writes it: no limits, every route with the same weight.
        for k in &mut s.keys {
            k.limits = None;
        }
        let file = modelgate_dataplane::config::ConfigFile {
            server: modelgate_dataplane::config::ServerSpec {
                listen: "127.0.0.1:18001".into(),
                admin: "127.0.0.1:19001".into(),
                ..Default::default()
            },
            version: None,
            routes: s.routes,
            keys: s.keys,
        };
        serde_json::to_string(&file).unwrap()
    }

    pub fn file(upstream: &str, weight: u32) -> String {
        let s = spec(upstream, weight);
        let mut out = String::with_capacity(16 * 1024 * 1024);
        out.push_str("server: {listen: 127.0.0.1:18001, admin: 127.0.0.1:19001}\nroutes:\n");
        for r in &s.routes {
            out.push_str(&format!(
                "  - {{name: {}, namespace: {}, model: {}, backends: [{{name: up, provider: openai-compatible, url: \"{upstream}\", weight: {weight}}}]}}\n",
                r.name, r.namespace, r.model
            ));
        }
        out.push_str("keys:\n");
        for k in &s.keys {
            out.push_str(&format!(
                "  - {{name: {}, namespace: {}, sha256: {}}}\n",
                k.name, k.namespace, k.sha256
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// wrk 4.1.0 (Debian), `--latency`, a run with errors.
    const WRK_ERRORS: &str =
        "Running 3s test @ http://127.0.0.1:18000/s/latency=20/v1/chat/completions
  1 threads and 1000 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    42.45ms   16.93ms   1.16s    77.19%
    Req/Sec    23.22k     4.11k   32.97k    73.33%
  Latency Distribution
     50%  980.00us
     75%   51.80ms
     90%   66.70ms
     99%    1.02s
  69497 requests in 3.09s, 25.38MB read
  Socket errors: connect 0, read 3, write 0, timeout 12
  Non-2xx or 3xx responses: 5
Requests/sec:  22495.12
Transfer/sec:      8.22MB
";

    #[test]
    fn wrk_report_with_errors() {
        assert_eq!(
            parse_wrk(WRK_ERRORS),
            Some(WrkOutput {
                requests: 69497,
                rps: 22495.12,
                p50_ms: 0.98,
                p99_ms: 1020.0,
                non_2xx: 5,
                socket_errors: 15,
            })
        );
    }

    #[test]
    fn wrk_report_clean_and_truncated() {
        // No error lines: none counted.
        let clean: String = WRK_ERRORS
            .lines()
            .filter(|l| !l.contains("errors") && !l.contains("Non-2xx"))
            .map(|l| format!("{l}\n"))
            .collect();
        let r = parse_wrk(&clean).unwrap();
        assert_eq!((r.non_2xx, r.socket_errors, r.requests), (0, 0, 69497));
        // Served requests but no percentiles (no `--latency`): not a report.
        let no_latency: String = clean
            .lines()
            .filter(|l| !l.trim_start().starts_with("99%"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(parse_wrk(&no_latency), None);
        assert_eq!(
            parse_wrk("unable to connect to 127.0.0.1:18000 Connection refused\n"),
            None
        );
    }

    #[test]
    fn fixed_answers_and_the_16k_body() {
        for answer in [CHAT_ANSWER, EMBEDDINGS_ANSWER] {
            let v: serde_json::Value = serde_json::from_str(answer).unwrap();
            assert!(v["usage"]["prompt_tokens"].is_u64(), "{answer}");
        }
        assert_eq!(CHAT_ANSWER.len(), 333);
        let v: serde_json::Value = serde_json::from_str(&body_16k()).unwrap();
        let text: usize = v["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["content"].as_str().unwrap().len())
            .sum();
        assert!((16_000..17_000).contains(&text), "{text} B of messages");
        assert!(body_16k().len() < NGINX_BODY_BUFFER);
    }

    /// nginx's log line is JSON once it fills in its variables (a bare one is a number).
    #[test]
    fn nginx_log_line_is_json() {
        let format = NGINX_LOG_FORMAT.trim_matches('\'');
        let mut line = String::new();
        let mut chars = format.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '$' {
                while chars
                    .next_if(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .is_some()
                {}
                line.push('0');
            } else {
                line.push(c);
            }
        }
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["message"], "request");
        assert!(v["status"].is_number() && v["duration_s"].is_number());
    }

    #[test]
    fn lua_literal_keeps_every_byte() {
        assert_eq!(
            lua_string("{\"a\": \"b\\\\c\"}\n\u{e9}"),
            "\"{\\\"a\\\": \\\"b\\\\\\\\c\\\"}\\010\\195\\169\""
        );
        let script = wrk_script("{}", "sk-1");
        assert!(script.contains("wrk.method = \"POST\""));
        assert!(script.contains("wrk.body = \"{}\""));
        assert!(script.contains("wrk.headers[\"Authorization\"] = \"Bearer sk-1\""));
    }
}
