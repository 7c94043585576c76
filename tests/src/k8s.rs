//! Helpers for end-to-end tests against the real kube-apiserver that `make test` starts
//! (`scripts/k8s-up.sh`): kubectl, throwaway namespaces, and operator processes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use crate::harness::{operator_bin, repo_root, temp_dir, wait_addr_file};

/// The test cluster's kubeconfig; the e2e tests need `make test` (it starts the apiserver).
pub fn kubeconfig() -> PathBuf {
    let p = std::env::var("MODELGATE_KUBECONFIG").unwrap_or_else(|_| {
        panic!("MODELGATE_KUBECONFIG is not set: run `make test`, which builds and starts a kube-apiserver")
    });
    PathBuf::from(p)
}

pub fn kubectl_bin() -> String {
    std::env::var("MODELGATE_KUBECTL").unwrap_or_else(|_| "kubectl".into())
}

/// Run a tool with stdin (optional); returns its output.
pub fn run(program: &str, args: &[&str], stdin: Option<&str>, envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env("KUBECONFIG", kubeconfig())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e} (run `make test`)"));
    if let Some(input) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    child.wait_with_output().unwrap()
}

pub fn helm_bin() -> String {
    std::env::var("MODELGATE_HELM").unwrap_or_else(|_| "helm".into())
}

/// helm that must succeed; returns stdout.
pub fn helm_ok(args: &[&str]) -> String {
    succeeded("helm", args, run(&helm_bin(), args, None, &[]))
}

/// stdout of a command that must have succeeded; its stderr in the failure message.
fn succeeded(tool: &str, args: &[&str], out: Output) -> String {
    assert!(
        out.status.success(),
        "{tool} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn kubernetes_validate_bin() -> String {
    std::env::var("MODELGATE_KUBERNETES_VALIDATE").unwrap_or_else(|_| {
        repo_root()
            .join(".venv/bin/kubernetes-validate")
            .display()
            .to_string()
    })
}

/// Run kubectl against the test cluster; stdin optional.
pub fn kubectl(args: &[&str], stdin: Option<&str>) -> Output {
    run(&kubectl_bin(), args, stdin, &[])
}

/// kubectl that must succeed; returns stdout.
pub fn kubectl_ok(args: &[&str], stdin: Option<&str>) -> String {
    succeeded("kubectl", args, kubectl(args, stdin))
}

/// Install the CRDs once per test process and wait until they are served.
pub fn install_crds() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let dir = repo_root().join("crds/manifests");
        kubectl_ok(&["apply", "-f", &dir.display().to_string()], None);
        kubectl_ok(
            &[
                "wait",
                "--for",
                "condition=established",
                "--timeout=60s",
                "crd/modelroutes.modelgate.dev",
                "crd/apikeys.modelgate.dev",
            ],
            None,
        );
    });
}

/// A namespace of its own for one test, deleted when dropped.
pub struct Namespace(pub String);

impl Namespace {
    pub fn new(prefix: &str) -> Self {
        let name = format!("{prefix}-{}-{}", std::process::id(), fastrand_suffix());
        kubectl_ok(&["create", "namespace", &name], None);
        Self(name)
    }
}

fn fastrand_suffix() -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{:x}", n % 0xfffff)
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = kubectl(&["delete", "namespace", &self.0, "--wait=false"], None);
    }
}

/// A shared development token in a file (for `--proxy-auth shared-token`).
pub fn token_file() -> PathBuf {
    let dir = temp_dir("token");
    let f = dir.join("token");
    std::fs::write(
        &f,
        format!(
            "e2e-token-{}-{:x}",
            std::process::id(),
            Instant::now().elapsed().as_nanos() ^ 0x5eed_5eed_5eed
        ),
    )
    .unwrap();
    f
}

/// The ServiceAccount the test operators treat as the gateway's (as the chart does).
pub const GATEWAY_SA: &str = "modelgate-proxy";

/// A token of ServiceAccount `ns/sa` for the modelgate audience, minted with the
/// TokenRequest API (`kubectl create token`), in a file. Creates the ServiceAccount.
pub fn sa_token(ns: &str, sa: &str) -> PathBuf {
    let out = kubectl(&["create", "serviceaccount", sa, "-n", ns], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() || err.contains("already exists"),
        "create serviceaccount: {err}"
    );
    let token = kubectl_ok(
        &[
            "create",
            "token",
            sa,
            "-n",
            ns,
            "--audience",
            "modelgate",
            "--duration",
            "1h",
        ],
        None,
    );
    let f = temp_dir("sa-token").join("token");
    std::fs::write(&f, token.trim()).unwrap();
    f
}

/// A token of the gateway ServiceAccount of namespace `ns`.
pub fn gateway_token(ns: &str) -> PathBuf {
    sa_token(ns, GATEWAY_SA)
}

/// How a test operator runs.
#[derive(Debug, Clone)]
pub struct OperatorConfig {
    /// Lease, CA Secret and CA bundle ConfigMap live here.
    pub namespace: String,
    pub identity: String,
    pub config_addr: String,
    pub kubeconfig: PathBuf,
    /// `Some(file)`: `--proxy-auth shared-token` with that token.
    pub shared_token: Option<PathBuf>,
    /// `NS/NAME` of gateway ServiceAccounts.
    pub gateway_accounts: Vec<String>,
    pub lease_duration: String,
    pub extra_args: Vec<String>,
}

impl OperatorConfig {
    /// ServiceAccount identity; the gateway is `ns/modelgate-proxy`; upstreams allowed:
    /// 127.0.0.1 (the tests' mock upstreams) and OpenAI (the examples' fallback).
    pub fn new(namespace: &str, identity: &str) -> Self {
        Self {
            namespace: namespace.into(),
            identity: identity.into(),
            config_addr: "127.0.0.1:0".into(),
            kubeconfig: kubeconfig(),
            shared_token: None,
            gateway_accounts: vec![format!("{namespace}/{GATEWAY_SA}")],
            lease_duration: "3s".into(),
            extra_args: [
                "--allow-upstream",
                "127.0.0.1/32",
                "--allow-upstream",
                "*.openai.com",
            ]
            .map(String::from)
            .to_vec(),
        }
    }
}

/// A running operator process.
pub struct Operator {
    pub config_url: String,
    pub admin_url: String,
    pub log: PathBuf,
    pub namespace: String,
    dir: PathBuf,
    child: Child,
}

impl Operator {
    pub fn start(namespace: &str, identity: &str) -> Self {
        Self::launch(OperatorConfig::new(namespace, identity))
    }

    /// Start with the config server on a given address (to restart at the same one).
    pub fn start_on(namespace: &str, identity: &str, config_addr: &str) -> Self {
        Self::launch(OperatorConfig {
            config_addr: config_addr.into(),
            ..OperatorConfig::new(namespace, identity)
        })
    }

    pub fn launch(c: OperatorConfig) -> Self {
        let dir = temp_dir("operator");
        let addr_file = dir.join("addr.json");
        let log = dir.join("operator.log");
        let mut cmd = Command::new(operator_bin());
        cmd.args([
            "--config-listen",
            &c.config_addr,
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .args(["--namespace", &c.namespace, "--identity", &c.identity])
        .args(["--lease-duration", &c.lease_duration, "--heartbeat", "1s"]);
        match &c.shared_token {
            Some(t) => {
                cmd.args(["--proxy-auth", "shared-token", "--token-file"])
                    .arg(t);
            }
            None => {
                cmd.args(["--proxy-auth", "serviceaccount"]);
            }
        }
        for a in &c.gateway_accounts {
            cmd.args(["--gateway-serviceaccount", a]);
        }
        cmd.args(&c.extra_args)
            .arg("--addr-file")
            .arg(&addr_file)
            .env("KUBECONFIG", &c.kubeconfig)
            .env("RUST_LOG", "info,kube=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let mut child = cmd.spawn().expect("spawn modelgate-operator");
        let v = wait_addr_file(
            &mut child,
            &addr_file,
            &log,
            "operator",
            Duration::from_secs(60),
        );
        Self {
            config_url: format!("https://{}", v["config"].as_str().unwrap()),
            admin_url: format!("http://{}", v["admin"].as_str().unwrap()),
            log,
            namespace: c.namespace,
            dir,
            child,
        }
    }

    /// The CA bundle proxies trust, as the operator publishes it (the `modelgate-ca`
    /// ConfigMap of its namespace), in a file.
    pub fn ca_file(&self) -> PathBuf {
        ca_bundle_file(&self.namespace, &self.dir)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory (VmRSS) in KiB.
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    pub async fn metrics(&self) -> String {
        crate::harness::get(&format!("{}/metrics", self.admin_url), None)
            .await
            .text()
    }

    /// One metric (the sum of its series whose labels include `labels`), scraped now.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        crate::harness::metric(&self.metrics().await, name, labels)
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, and wait (at most 20 s) for the process to exit.
    pub fn terminate(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
    }
}

/// Wait for the `modelgate-ca` ConfigMap of `ns` and write its bundle into `dir/ca.crt`.
pub fn ca_bundle_file(ns: &str, dir: &Path) -> PathBuf {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pem = jsonpath(ns, "configmap/modelgate-ca", "{.data.ca\\.crt}");
        if pem.contains("BEGIN CERTIFICATE") {
            let f = dir.join("ca.crt");
            std::fs::write(&f, pem).unwrap();
            return f;
        }
        assert!(
            Instant::now() < deadline,
            "no CA bundle ConfigMap modelgate-ca in {ns} after 60 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("operator log kept at {}", self.log.display());
        }
    }
}

/// `kubectl get <what> -n ns -o jsonpath=<path>`.
pub fn jsonpath(ns: &str, what: &str, path: &str) -> String {
    let out = kubectl(
        &["get", what, "-n", ns, "-o", &format!("jsonpath={path}")],
        None,
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A condition's status (`True`/`False`) on a modelgate object.
pub fn condition(ns: &str, what: &str, type_: &str) -> String {
    jsonpath(
        ns,
        what,
        &format!("{{.status.conditions[?(@.type==\"{type_}\")].status}}"),
    )
}

/// A client of the operator's config API as any pod could be: TLS verified against a CA
/// bundle file, HTTP/1.1 (one connection per open stream).
pub struct ConfigApi {
    url: String,
    client: hyper_util::client::legacy::Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        http_body_util::Full<bytes::Bytes>,
    >,
}

impl ConfigApi {
    pub fn new(op: &Operator) -> Self {
        Self::with_ca(&op.config_url, &op.ca_file())
    }

    pub fn with_ca(url: &str, ca_file: &Path) -> Self {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(ca_file).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_only()
            .enable_http1()
            .build();
        Self {
            url: url.to_owned(),
            client: hyper_util::client::legacy::Client::builder(
                hyper_util::rt::TokioExecutor::new(),
            )
            .build(https),
        }
    }

    fn request(
        &self,
        method: http::Method,
        path: &str,
        token: Option<&str>,
        body: String,
    ) -> http::Request<http_body_util::Full<bytes::Bytes>> {
        let mut b = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.url))
            .header("content-type", "application/json");
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {}", t.trim()));
        }
        b.body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .unwrap()
    }

    /// POST JSON; the whole answer.
    pub async fn post(
        &self,
        path: &str,
        token: Option<&str>,
        body: &serde_json::Value,
    ) -> crate::harness::Reply {
        let req = self.request(http::Method::POST, path, token, body.to_string());
        let resp = tokio::time::timeout(Duration::from_secs(20), self.client.request(req))
            .await
            .expect("config API answers")
            .expect("config API reachable");
        crate::harness::read(resp).await
    }

    /// Open a config stream. On 200: the first message (the snapshot) and the open
    /// response, to keep the stream alive; otherwise the status and the error body.
    pub async fn open_stream(
        &self,
        token: Option<&str>,
        proxy_id: &str,
    ) -> (
        http::StatusCode,
        String,
        Option<hyper::Response<hyper::body::Incoming>>,
    ) {
        use http_body_util::BodyExt;
        let req = self.request(
            http::Method::GET,
            &format!("/v1/stream?proxy={proxy_id}"),
            token,
            String::new(),
        );
        let resp = tokio::time::timeout(Duration::from_secs(20), self.client.request(req))
            .await
            .expect("config API answers")
            .expect("config API reachable");
        let status = resp.status();
        if status != http::StatusCode::OK {
            let r = crate::harness::read(resp).await;
            return (status, r.text(), None);
        }
        let (parts, mut body) = resp.into_parts();
        let mut line = Vec::new();
        while !line.contains(&b'\n') {
            match tokio::time::timeout(Duration::from_secs(20), body.frame()).await {
                Ok(Some(Ok(f))) => {
                    if let Ok(d) = f.into_data() {
                        line.extend_from_slice(&d);
                    }
                }
                _ => break,
            }
        }
        (
            status,
            String::from_utf8_lossy(&line).into_owned(),
            Some(hyper::Response::from_parts(parts, body)),
        )
    }
}
