//! Start the real `modelgate-dataplane` binary on loopback ports and talk to it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Once;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// The demo key of `examples/standalone.yaml`, and its hash.
pub const DEMO_KEY: &str = "sk-modelgate-demo";

pub fn sha256_hex(raw: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(raw.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Runs a Python `script` (the test venv's, with the official SDKs) with `envs`, asserts
/// that it succeeded (else panics with its output) and reads each line it printed as JSON.
pub fn python_json_lines(script: &str, envs: &[(&str, &str)]) -> Vec<serde_json::Value> {
    let out = Command::new(python())
        .args(["-c", script])
        .envs(envs.iter().copied())
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// Prometheus's own `promtool check metrics` on a `/metrics` text (MODELGATE_PROMTOOL, else
/// `promtool` on PATH, installed by `make test-deps`); panics with its findings and the text.
pub fn promtool_check(text: &str) {
    use std::io::Write;
    let promtool = std::env::var("MODELGATE_PROMTOOL").unwrap_or_else(|_| "promtool".into());
    let mut child = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run {promtool} ({e}): run `make test-deps` (Debian package prometheus)")
        });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The venv `make test-deps` creates (with the openai SDK and pytest), or MODELGATE_PYTHON.
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("MODELGATE_PYTHON") {
        return p.into();
    }
    let p = repo_root().join(".venv/bin/python");
    assert!(
        p.exists(),
        "{} is missing: run `make test-deps` (a venv with the openai SDK and pytest)",
        p.display()
    );
    p
}

/// Runs one pytest file of `tests/python` with `envs`; it must pass, its report saying
/// `passed` tests passed. Returns the report.
pub fn pytest(file: &str, envs: &[(&str, String)], passed: usize) -> String {
    let out = Command::new(python())
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(repo_root().join("tests/python").join(file))
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("run pytest");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{file} failed:\n{report}");
    assert!(report.contains(&format!("{passed} passed")), "{report}");
    report
}

/// One chat completion through the official OpenAI Python SDK; returns the answer text.
pub fn sdk_chat(base_url: &str, key: &str, model: &str) -> Result<String, String> {
    let script = r#"
import os, sys, openai
c = openai.OpenAI(base_url=os.environ["BASE"], api_key=os.environ["KEY"], max_retries=0, timeout=30)
r = c.chat.completions.create(model=os.environ["MODEL"], messages=[{"role": "user", "content": "hi"}])
print(r.choices[0].message.content)
"#;
    let out = Command::new(python())
        .args(["-c", script])
        .env("BASE", base_url)
        .env("KEY", key)
        .env("MODEL", model)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The chart's appVersion: the tag `make images` gives both images.
pub fn chart_app_version() -> String {
    let chart = std::fs::read_to_string(repo_root().join("charts/modelgate/Chart.yaml")).unwrap();
    chart
        .lines()
        .find_map(|l| l.strip_prefix("appVersion:"))
        .expect("appVersion")
        .trim()
        .trim_matches('"')
        .to_owned()
}

/// A port on 127.0.0.1 that was free a moment ago (for a server the test starts itself).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A fresh directory under the system temp dir (removed when the test's Proxy drops).
pub fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let d = std::env::temp_dir().join(format!(
        "modelgate-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A throw-away certificate authority for servers the tests start (a TLS Redis, say).
pub struct TestCa {
    key: rcgen::KeyPair,
    cert: rcgen::Certificate,
    params: rcgen::CertificateParams,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        Self { key, cert, params }
    }

    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// A server certificate for these DNS names and IP addresses: (certificate, key) PEM.
    pub fn server_cert(&self, names: &[&str], ips: &[&str]) -> (String, String) {
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(
            names
                .iter()
                .chain(ips)
                .map(|s| s.to_string())
                .collect::<Vec<_>>(),
        )
        .unwrap();
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            names.first().copied().unwrap_or("server"),
        );
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// The proxy binary of this build, rebuilt once per test process so it is never stale.
pub fn dataplane_bin() -> PathBuf {
    workspace_bin("modelgate-dataplane")
}

/// The operator binary of this build.
pub fn operator_bin() -> PathBuf {
    workspace_bin("modelgate-operator")
}

/// A workspace binary, built once per test process (cheap when up to date).
pub fn workspace_bin(name: &str) -> PathBuf {
    let var = format!("{}_BIN", name.to_uppercase().replace('-', "_"));
    if let Ok(p) = std::env::var(var) {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    static BUILD: Once = Once::new();
    BUILD.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "--quiet",
            "-p",
            "modelgate-dataplane",
            "-p",
            "modelgate-operator",
            "--bins",
        ]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd
            .current_dir(repo_root())
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building the workspace binaries failed");
    });
    let bin = profile_dir.join(name);
    assert!(
        bin.exists(),
        "{} missing: run cargo build --workspace --bins",
        bin.display()
    );
    bin
}

/// The addresses a starting process (`--addr-file`) writes once it listens; panics with its
/// log when it exits first or does not listen within `timeout`.
pub fn wait_addr_file(
    child: &mut Child,
    addr_file: &Path,
    log: &Path,
    what: &str,
    timeout: Duration,
) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(text) = std::fs::read_to_string(addr_file) {
            return serde_json::from_str(&text).unwrap();
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{what} exited with {status} before listening:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not start in {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running proxy process.
pub struct Proxy {
    pub api: SocketAddr,
    pub admin: SocketAddr,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    child: Child,
}

impl Proxy {
    pub fn start(yaml: &str) -> Self {
        Self::start_with(yaml, &[])
    }

    pub fn start_with(yaml: &str, envs: &[(&str, &str)]) -> Self {
        Self::start_with_args(yaml, &[], envs)
    }

    /// A standalone proxy with more command line `args` (`--series-grace 1s`, say).
    pub fn start_with_args(yaml: &str, args: &[&str], envs: &[(&str, &str)]) -> Self {
        let dir = temp_dir("proxy");
        let config = dir.join("config.yaml");
        std::fs::write(&config, yaml).unwrap();
        let mut all = vec!["--config".to_owned(), config.display().to_string()];
        all.extend(args.iter().map(|a| a.to_string()));
        Self::spawn(dir, config, &all, envs)
    }

    /// A proxy that follows an operator's config stream, trusting the CA bundle the
    /// operator publishes, with the given token (a ServiceAccount token or the shared one).
    pub fn follow(op: &crate::k8s::Operator, token_file: &Path, id: &str) -> Self {
        Self::follow_with(&op.config_url, &op.ca_file(), token_file, id)
    }

    /// A proxy that follows `operator_url`, trusting the CAs in `ca_file`.
    pub fn follow_with(operator_url: &str, ca_file: &Path, token_file: &Path, id: &str) -> Self {
        let dir = temp_dir("proxy");
        let config = dir.join("unused.yaml");
        let args: Vec<String> = [
            "--operator",
            operator_url,
            "--operator-ca",
            &ca_file.display().to_string(),
            "--operator-token-file",
            &token_file.display().to_string(),
            "--proxy-id",
            id,
            "--usage-interval",
            "500ms",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        Self::spawn(dir, config, &args, &[])
    }

    fn spawn(dir: PathBuf, config: PathBuf, args: &[String], envs: &[(&str, &str)]) -> Self {
        let addr_file = dir.join("addr.json");
        let log = dir.join("proxy.log");
        let mut cmd = Command::new(dataplane_bin());
        cmd.args(args)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--admin",
                "127.0.0.1:0",
                "--reload-interval",
                "100ms",
            ])
            .arg("--addr-file")
            .arg(&addr_file)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn modelgate-dataplane");
        let v = wait_addr_file(
            &mut child,
            &addr_file,
            &log,
            "proxy",
            Duration::from_secs(30),
        );
        Self {
            api: v["api"].as_str().unwrap().parse().unwrap(),
            admin: v["admin"].as_str().unwrap().parse().unwrap(),
            dir,
            config,
            log,
            child,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.api)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// Replace the config file atomically (as a ConfigMap update would).
    pub fn write_config(&self, yaml: &str) {
        let tmp = self.dir.join("config.yaml.tmp");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, &self.config).unwrap();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    pub async fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    pub async fn metrics(&self) -> String {
        let r = get(&self.admin_url("/metrics"), None).await;
        assert_eq!(r.status, StatusCode::OK);
        r.text()
    }

    /// One metric (the sum of its series whose labels include `labels`), scraped now.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric(&self.metrics().await, name, labels)
    }

    /// The request most tests send: a non-streaming chat completion for `model` with `key`.
    pub async fn chat(&self, key: &str, model: &str) -> Reply {
        post(
            &self.url("/v1/chat/completions"),
            Some(key),
            &chat(model, false),
        )
        .await
    }

    /// The snapshot version `/config` reports.
    pub async fn version(&self) -> Option<String> {
        let r = get(&self.admin_url("/config"), None).await;
        r.json()["version"].as_str().map(str::to_owned)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("proxy log kept at {}", self.log.display());
        }
    }
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The OpenAI error `code`, asserting the body is OpenAI-shaped.
    pub fn error_code(&self) -> String {
        let v = self.json();
        let e = &v["error"];
        assert!(
            e["message"].is_string() && e["type"].is_string(),
            "not an OpenAI error: {v}"
        );
        e["code"].as_str().unwrap_or("").to_owned()
    }
}

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(c)
}

pub fn request(
    method: Method,
    url: &str,
    key: Option<&str>,
    body: impl Into<Bytes>,
) -> Request<Full<Bytes>> {
    let mut b = Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json");
    if let Some(k) = key {
        b = b.header("authorization", format!("Bearer {k}"));
    }
    b.body(Full::new(body.into())).unwrap()
}

pub async fn send(req: Request<Full<Bytes>>) -> Reply {
    let resp = client().request(req).await.expect("request");
    read(resp).await
}

pub async fn read(resp: Response<Incoming>) -> Reply {
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// POST and hand back the response unread, to consume a stream frame by frame.
pub async fn post_stream(
    url: &str,
    key: Option<&str>,
    body: &serde_json::Value,
) -> Response<Incoming> {
    client()
        .request(request(
            Method::POST,
            url,
            key,
            serde_json::to_vec(body).unwrap(),
        ))
        .await
        .expect("request")
}

pub async fn post(url: &str, key: Option<&str>, body: &serde_json::Value) -> Reply {
    send(request(
        Method::POST,
        url,
        key,
        serde_json::to_vec(body).unwrap(),
    ))
    .await
}

pub async fn get(url: &str, key: Option<&str>) -> Reply {
    send(request(Method::GET, url, key, Bytes::new())).await
}

/// A chat request body.
pub fn chat(model: &str, stream: bool) -> serde_json::Value {
    serde_json::json!({"model": model, "stream": stream,
        "messages": [{"role": "user", "content": "Say hello"}]})
}

/// Sum of every sample of `name` whose labels include all of `labels`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            if n != name {
                return None;
            }
            labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// Poll `check` until it returns true or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A mock server of `tests/python` (a cloud provider's wire format, checked with the
/// provider's own Python libraries) on 127.0.0.1: started with `args`, it prints
/// `listening 127.0.0.1:<port>` and serves until dropped (or until its stdin closes).
pub struct PyMock {
    pub addr: SocketAddr,
    child: Child,
}

impl PyMock {
    pub fn start(script: &str, args: &[&str]) -> Self {
        use std::io::{BufRead, BufReader};
        let mut child = Command::new(python())
            .arg(repo_root().join("tests/python").join(script))
            .args(args)
            .arg("--exit-on-stdin-eof")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("start {script}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            // Keep reading so the mock never blocks on a full pipe.
            for _ in lines {}
        });
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("{script} did not say where it listens within 60 s"));
        let addr = line
            .strip_prefix("listening ")
            .and_then(|a| a.trim().parse().ok())
            .unwrap_or_else(|| panic!("{script} said {line:?}"));
        Self { addr, child }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `GET /_mock/<what>` as JSON (`requests`, `stats`).
    pub async fn state(&self, what: &str) -> serde_json::Value {
        let r = get(&self.url(&format!("/_mock/{what}")), None).await;
        serde_json::from_slice(&r.body).unwrap_or(serde_json::Value::Null)
    }
}

impl Drop for PyMock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Prometheus server (Debian's package) on 127.0.0.1 scraping the given targets.
pub struct Prometheus {
    addr: String,
    child: Child,
    _dir: PathBuf,
}

impl Prometheus {
    pub fn start(targets: &[String]) -> Self {
        let dir = temp_dir("prometheus");
        let port = free_port();
        let config = format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nscrape_configs:\n  - job_name: modelgate\n    metrics_path: /metrics\n    static_configs:\n      - targets: [{}]\n",
            targets
                .iter()
                .map(|t| format!("\"{t}\""))
                .collect::<Vec<_>>()
                .join(", ")
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let child = Command::new(
            std::env::var("MODELGATE_PROMETHEUS").unwrap_or_else(|_| "prometheus".into()),
        )
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
        .spawn()
        .expect("run prometheus (Debian package prometheus; `make test-deps`)");
        let addr = format!("127.0.0.1:{port}");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "prometheus did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Self {
            addr,
            child,
            _dir: dir,
        }
    }

    pub fn query_url(&self, q: &str) -> String {
        let mut enc = String::new();
        for b in q.bytes() {
            if b.is_ascii_alphanumeric() || b"_-.".contains(&b) {
                enc.push(b as char);
            } else {
                enc.push_str(&format!("%{b:02X}"));
            }
        }
        format!("http://{}/api/v1/query?query={enc}", self.addr)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// The result vector of an instant query (empty when the query failed or matched nothing).
    pub async fn query(&self, q: &str) -> Vec<serde_json::Value> {
        let r = get(&self.query_url(q), None).await;
        if r.status != StatusCode::OK {
            return Vec::new();
        }
        r.json()["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}
