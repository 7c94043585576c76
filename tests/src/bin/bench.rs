//! modelgate's benchmark: the proxy against a plain nginx reverse proxy and against going
//! direct, on 127.0.0.1, with established load generators (oha; wrk for the `slow` section,
//! where oha's cost per request would set the pace). Every figure is printed beside the
//! baselines measured in the same run, as a ratio; runs are interleaved (direct, nginx,
//! modelgate, repeated) and the median is reported.
//!
//! Usage: bench [--quick] [--only SECTION[,SECTION...]] [--scale-only] [--swap-only]
//!              [--soak SECS] [--peers] [--peers-only]   (`make bench` builds and runs this)
//! Sections for `--only`: the workloads small, large, stream, embeddings; `latency` (fixed
//! rates); `c1` (added latency at concurrency 1); `slow` (an upstream that adds 20 ms, at
//! 1,000 connections). SCALE_CPUS=0,1 gives the config-scale proxy both cores (default: 1).
//!
//! Layout on a 2-core machine: the proxy under test (modelgate or nginx, one worker each)
//! on core 1; the load generator and the mock upstream on core 0.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

const KEY: &str = "sk-bench-0123456789abcdef";

/// The sections that share the throughput and fixed-rate report.
const MAIN_SECTIONS: [&str; 5] = ["small", "large", "stream", "embeddings", "latency"];
/// The `slow` section: what the mock upstream adds to every request, and the connections.
const SLOW_MS: u64 = 20;
const SLOW_CONNS: u32 = 1000;
/// wrk's threads in the `slow` section. One thread on its one core: a second thread on
/// the same core only adds switches (going direct measured lower with two).
const WRK_THREADS: u32 = 1;
/// A throughput ratio counts only when going direct is at least this much faster than the
/// fastest proxy: otherwise the load generator or the upstream, not the proxy, set the pace.
const HEADROOM: f64 = 1.5;

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
        let _up = b.upstream();
        b.soak(secs);
        return;
    }
    if args.iter().any(|a| a == "--scale-only") {
        let _up = b.upstream();
        b.scale();
        return;
    }
    b.run(peers);
}

/// The proxy's config for the throughput runs: three routes on the mock upstream, the bench
/// key (with generous limits when `limits`) and `keys_extra` more keys.
fn bench_config(keys_extra: usize, limits: bool) -> String {
    let hash = modelgate_tests::harness::sha256_hex(KEY);
    let mut s =
        String::from("server: {listen: 127.0.0.1:18001, admin: 127.0.0.1:19001}\nroutes:\n");
    let slow = format!("s/latency={SLOW_MS}/");
    for (model, knobs) in [
        ("bench", ""),
        ("bench-stream", "s/chunks=100/"),
        ("bench-embed", ""),
        ("bench-slow", slow.as_str()),
    ] {
        s.push_str(&format!(
            "  - name: {model}\n    model: {model}\n    backends:\n      - {{name: up, provider: openai-compatible, url: \"http://127.0.0.1:18000/{knobs}v1\", pricing: {{inputPerMillion: 0.15, outputPerMillion: 0.6}}}}\n"
        ));
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
    /// Knobs for the mock upstream (see tests/src/upstream.rs).
    knobs: &'static str,
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

    fn upstream(&self) -> Proc {
        let child = Command::new("taskset")
            .args(["-c", "0"])
            .arg(self.bin.join("mock-upstream"))
            .args(["127.0.0.1:18000", "1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mock-upstream (cargo build --release -p modelgate-tests)");
        wait_port("127.0.0.1:18000");
        Proc::own(child)
    }

    /// nginx with one worker. Its idle upstream connections (`keepalive 1024`) match
    /// modelgate's pool (`pool_max_idle_per_host(1024)`): with fewer, the `slow` section's
    /// 1,000 connections would open and close an upstream connection on most requests. The
    /// listen backlog is tokio's (modelgate and the mock upstream): 1024.
    fn nginx(&self) -> Proc {
        let conf = self.dir.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                r#"worker_processes 1;
worker_rlimit_nofile 8192;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  upstream up {{ server 127.0.0.1:18000; keepalive 1024; }}
  server {{
    listen 127.0.0.1:18002 backlog=1024;
    client_max_body_size 16m;
    client_body_buffer_size 1m;
    location / {{
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering on;
    }}
  }}
}}
"#,
                dir = self.dir.display()
            ),
        )
        .unwrap();
        let child = Command::new("taskset")
            .args(["-c", "1", "nginx", "-c"])
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx (apt-get install nginx-light)");
        wait_port("127.0.0.1:18002");
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

    fn modelgate(&self, config: &str, tag: &str) -> Proc {
        let path = self.dir.join(format!("modelgate-{tag}.yaml"));
        std::fs::write(&path, config).unwrap();
        let child = Command::new("taskset")
            .args(["-c", "1"])
            .arg(self.bin.join("modelgate-dataplane"))
            .arg("--config")
            .arg(&path)
            .args(["--listen", "127.0.0.1:18001", "--admin", "127.0.0.1:19001"])
            .env(
                "RUST_LOG",
                std::env::var("BENCH_PROXY_LOG").unwrap_or_else(|_| "info".into()),
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
        let before = proc_.map(Proc::cpu_ticks);
        let out = cmd.output().expect("oha (cargo install oha)");
        let after = proc_.map(Proc::cpu_ticks);
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
        let before = proc_.map(Proc::cpu_ticks);
        let out = cmd.output().expect("wrk (apt-get install wrk)");
        let after = proc_.map(Proc::cpu_ticks);
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
        let _up = self.upstream();
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
        let small = Workload {
            name: "small",
            path: "/v1/chat/completions",
            body: small_body("bench"),
            knobs: "",
        };
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

    /// Throughput at saturation per workload and profile, latency at fixed rates, memory;
    /// returns the small-body modelgate runs (the peer comparison's reference).
    fn saturation_and_rates(&self, small: &Workload) -> Option<Vec<Run>> {
        let nginx = self.nginx();
        self.warmup(
            "http://127.0.0.1:18002/v1/chat/completions",
            &Workload {
                name: "warmup",
                path: "/v1/chat/completions",
                body: json!({"model": "bench", "messages": [{"role": "user", "content": "hi"}]})
                    .to_string(),
                knobs: "",
            },
        );
        let large_text: String = "Context passage about the sea and its tides. ".repeat(2300);
        let large = json!({"model": "bench", "max_tokens": 16, "messages": [{"role": "system", "content": "Answer from the context."}, {"role": "user", "content": large_text}]}).to_string();
        let stream = json!({"model": "bench-stream", "stream": true, "max_tokens": 128, "messages": [{"role": "user", "content": "Stream a long answer about the sea for a gateway benchmark run."}]}).to_string();
        let embed = json!({"model": "bench-embed", "input": ["The sea is large.", "Tides follow the moon."]}).to_string();
        let workloads = [
            small.clone(),
            Workload {
                name: "large",
                path: "/v1/chat/completions",
                body: large,
                knobs: "",
            },
            Workload {
                name: "stream",
                path: "/v1/chat/completions",
                body: stream,
                knobs: "s/chunks=100/",
            },
            Workload {
                name: "embeddings",
                path: "/v1/embeddings",
                body: embed,
                knobs: "",
            },
        ];
        println!(
            "body sizes: small {} B, large {} B\n",
            small.body.len(),
            workloads[1].body.len()
        );

        let mut results: BTreeMap<(String, String), Vec<Run>> = BTreeMap::new();
        let mut rss: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        let profiles: [(&str, usize, bool); 3] = [
            ("1 key", 0, false),
            ("100k keys", 100_000, false),
            ("1 key + limits", 0, true),
        ];
        for (profile, extra, limits) in profiles {
            if (peers_only() || self.only.is_some()) && profile != "1 key" {
                continue;
            }
            let mg = self.modelgate(&bench_config(extra, limits), &profile.replace(' ', "-"));
            // Warm up: upstream connection pool, allocator, caches.
            self.warmup("http://127.0.0.1:18001/v1/chat/completions", &workloads[0]);
            for w in &workloads {
                if (profile != "1 key" || peers_only()) && w.name != "small" {
                    continue;
                }
                if !self.selected(w.name) {
                    continue;
                }
                for _ in 0..self.reps {
                    let direct_url = format!(
                        "http://127.0.0.1:18000/{}{}",
                        w.knobs,
                        w.path.trim_start_matches('/')
                    );
                    let nginx_url = format!(
                        "http://127.0.0.1:18002/{}{}",
                        w.knobs,
                        w.path.trim_start_matches('/')
                    );
                    let mg_url = format!("http://127.0.0.1:18001{}", w.path);
                    if profile == "1 key" {
                        results
                            .entry((w.name.into(), "direct".into()))
                            .or_default()
                            .push(self.oha(&direct_url, w, None, None));
                        results
                            .entry((w.name.into(), "nginx".into()))
                            .or_default()
                            .push(self.oha(&nginx_url, w, None, Some(&nginx)));
                    }
                    results
                        .entry((format!("{} [{profile}]", w.name), "modelgate".into()))
                        .or_default()
                        .push(self.oha(&mg_url, w, None, Some(&mg)));
                }
            }
            // Fixed rates, small body: latency added over going direct.
            if profile == "1 key" && !peers_only() && self.selected("latency") {
                let w = &workloads[0];
                for rate in [500u32, 1000, 5000] {
                    for _ in 0..self.reps {
                        let key = format!("small@{rate}/s");
                        results
                            .entry((key.clone(), "direct".into()))
                            .or_default()
                            .push(self.oha(
                                "http://127.0.0.1:18000/v1/chat/completions",
                                w,
                                Some(rate),
                                None,
                            ));
                        results
                            .entry((key.clone(), "nginx".into()))
                            .or_default()
                            .push(self.oha(
                                "http://127.0.0.1:18002/v1/chat/completions",
                                w,
                                Some(rate),
                                Some(&nginx),
                            ));
                        results
                            .entry((format!("{key} [1 key]"), "modelgate".into()))
                            .or_default()
                            .push(self.oha(
                                "http://127.0.0.1:18001/v1/chat/completions",
                                w,
                                Some(rate),
                                Some(&mg),
                            ));
                    }
                }
            }
            rss.insert(profile.into(), mg.rss_kib());
        }
        self.report(&results, &rss);
        results.remove(&("small [1 key]".to_owned(), "modelgate".to_owned()))
    }

    /// `c1`: one connection, one request at a time, a fixed number of requests (closed
    /// loop): what a proxy adds to a request when nothing queues, as public gateway
    /// comparisons report it (p50 / p99 added over going direct). Runs interleave; medians.
    fn concurrency_one(&self, w: &Workload) {
        let requests: u64 = if self.reps == 1 { 2_000 } else { 20_000 };
        let nginx = self.nginx();
        let mg = self.modelgate(&bench_config(0, false), "c1");
        let targets = [
            ("direct", "http://127.0.0.1:18000/v1/chat/completions", None),
            (
                "nginx",
                "http://127.0.0.1:18002/v1/chat/completions",
                Some(&nginx),
            ),
            (
                "modelgate",
                "http://127.0.0.1:18001/v1/chat/completions",
                Some(&mg),
            ),
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
        let w = Workload {
            name: "slow",
            path: "/v1/chat/completions",
            body: small_body("bench-slow"),
            knobs: "",
        };
        let knobs = format!("s/latency={SLOW_MS}/");
        let direct_url = format!("http://127.0.0.1:18000/{knobs}v1/chat/completions");
        let nginx_url = format!("http://127.0.0.1:18002/{knobs}v1/chat/completions");
        let nginx = self.nginx();
        let mg = self.modelgate(&bench_config(0, false), "slow");
        let targets = [
            ("direct", direct_url.as_str(), None),
            ("nginx", nginx_url.as_str(), Some(&nginx)),
            (
                "modelgate",
                "http://127.0.0.1:18001/v1/chat/completions",
                Some(&mg),
            ),
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
        let (fastest_name, fastest) = if n.rps >= m.rps {
            ("nginx", n.rps)
        } else {
            ("modelgate", m.rps)
        };
        let headroom = d.rps / fastest.max(1.0);
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
        let mg = self.modelgate(&config, "soak");
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
            knobs: "",
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
                "model_list:\n  - model_name: bench\n    litellm_params:\n      model: openai/bench\n      api_base: http://127.0.0.1:18000/v1\n      api_key: sk-upstream\ngeneral_settings:\n  master_key: {KEY}\n"
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

    fn report(
        &self,
        results: &BTreeMap<(String, String), Vec<Run>>,
        rss: &BTreeMap<String, (u64, u64)>,
    ) {
        let med = |name: &str, target: &str| -> Option<Run> {
            let runs = results.get(&(name.to_owned(), target.to_owned()))?;
            Some(median_run(runs))
        };
        println!(
            "## Throughput at saturation (closed loop, {} connections)\n",
            self.conns
        );
        println!(
            "| workload | direct rps | nginx rps | modelgate rps | modelgate/nginx | nginx CPU µs/req | modelgate CPU µs/req | CPU ratio | errors |"
        );
        println!("|---|---|---|---|---|---|---|---|---|");
        let mut verdicts = Vec::new();
        for (w, floor) in [
            ("small", 0.8),
            ("large", 0.7),
            ("stream", 0.0),
            ("embeddings", 0.0),
        ] {
            let (Some(d), Some(n)) = (med(w, "direct"), med(w, "nginx")) else {
                continue;
            };
            for profile in ["1 key", "100k keys", "1 key + limits"] {
                let Some(m) = med(&format!("{w} [{profile}]"), "modelgate") else {
                    continue;
                };
                let ratio = m.rps / n.rps.max(1.0);
                let cpu_ratio = m.cpu_us_per_req / n.cpu_us_per_req.max(0.001);
                println!(
                    "| {w} [{profile}] | {:.0} | {:.0} | {:.0} | {ratio:.2} | {:.1} | {:.1} | {cpu_ratio:.2} | {} |",
                    d.rps, n.rps, m.rps, n.cpu_us_per_req, m.cpu_us_per_req, m.errors
                );
                if floor > 0.0 {
                    verdicts.push((
                        format!("throughput {w} [{profile}] ≥ {floor} × nginx"),
                        ratio >= floor,
                        format!("{ratio:.2}"),
                    ));
                }
                if w == "small" {
                    verdicts.push((
                        format!("CPU per request {w} [{profile}] ≤ 2 × nginx"),
                        cpu_ratio <= 2.0,
                        format!("{cpu_ratio:.2}"),
                    ));
                }
            }
        }
        println!("\n## Latency at fixed rates (small body; open loop with latency correction)\n");
        println!(
            "| rate | direct p50 / p99 / p99.9 ms | nginx p50 / p99 ms | modelgate p50 / p99 / p99.9 ms | nginx added p50 / p99 | modelgate added p50 | modelgate added p99 |"
        );
        println!("|---|---|---|---|---|---|---|");
        for rate in [500u32, 1000, 5000] {
            let key = format!("small@{rate}/s");
            let (Some(d), Some(n), Some(m)) = (
                med(&key, "direct"),
                med(&key, "nginx"),
                med(&format!("{key} [1 key]"), "modelgate"),
            ) else {
                continue;
            };
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
                    a50 < 100.0,
                    format!("{a50:.0} µs"),
                ));
                verdicts.push((
                    format!("added p99 at {rate}/s < 500 µs"),
                    a99 < 500.0,
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
                (*peak as f64 / 1024.0) < limit,
                format!("{:.1} MiB", *peak as f64 / 1024.0),
            ));
        }
        println!("\n## Targets\n");
        for (what, pass, value) in verdicts {
            println!("- {} {what}: {value}", if pass { "PASS" } else { "MISS" });
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
                    }],
                    strategy: None,
                    timeout: None,
                    retries: None,
                    outlier_detection: None,
                    max_output_tokens: None,
                    stream_idle_timeout: None,
                    stream_timeout: None,
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
