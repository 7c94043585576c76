//! The Helm chart: renders valid manifests for Kubernetes 1.25–1.33 in every profile, installs
//! into the real test apiserver, grants the operator exactly what it needs, is scraped by a
//! real Prometheus, and survives a GitOps-style double server-side apply.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use http::StatusCode;
use modelgate_tests::harness::*;
use modelgate_tests::k8s::*;

const PROFILES: &[(&str, Option<&str>)] = &[
    ("default", None),
    ("ha-off", Some("ci/ha-off-values.yaml")),
    ("sidecar-only", Some("ci/sidecar-only-values.yaml")),
    ("monitoring", Some("ci/monitoring-values.yaml")),
    ("networkpolicy", Some("ci/networkpolicy-values.yaml")),
];

/// Tests that run an operator take turns.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn chart() -> PathBuf {
    repo_root().join("charts/modelgate")
}

fn render(
    release: &str,
    ns: &str,
    kube_version: &str,
    values: Option<&str>,
    extra: &[&str],
) -> String {
    let chart = chart().display().to_string();
    let values_path = values.map(|v| chart.clone() + "/" + v);
    let mut args = vec![
        "template",
        release,
        &chart,
        "-n",
        ns,
        "--kube-version",
        kube_version,
    ];
    if let Some(v) = &values_path {
        args.extend(["-f", v.as_str()]);
    }
    args.extend(extra);
    helm_ok(&args)
}

#[test]
fn chart_lints_and_renders_valid_manifests_in_every_profile() {
    for (name, values) in PROFILES {
        let chart = chart().display().to_string();
        let mut args = vec!["lint", "--strict", chart.as_str()];
        let v;
        if let Some(values) = values {
            v = format!("{chart}/{values}");
            args.extend(["-f", v.as_str()]);
        }
        helm_ok(&args);
        for kube in ["1.25.0", "1.33.0"] {
            let rendered = render("modelgate", "modelgate", kube, *values, &["--include-crds"]);
            let out = run(
                &kubernetes_validate_bin(),
                &["--strict", "-k", kube, "--quiet", "-"],
                Some(&rendered),
                &[],
            );
            assert!(
                out.status.success(),
                "{name} on {kube} is invalid:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    // The sidecar example is valid for the same versions.
    let sidecar_example = repo_root().join("examples/k8s/sidecar/app-with-proxy-sidecar.yaml");
    for kube in ["1.25.0", "1.33.0"] {
        let out = run(
            &kubernetes_validate_bin(),
            &[
                "--strict",
                "-k",
                kube,
                "--quiet",
                &sidecar_example.display().to_string(),
            ],
            None,
            &[],
        );
        assert!(
            out.status.success(),
            "sidecar example on {kube}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    // The API versions follow what the cluster serves.
    let old = render(
        "modelgate",
        "modelgate",
        "1.20.2",
        Some("ci/monitoring-values.yaml"),
        &[],
    );
    assert!(
        old.contains("apiVersion: policy/v1beta1")
            && old.contains("apiVersion: autoscaling/v2beta2")
    );
    let new = render(
        "modelgate",
        "modelgate",
        "1.33.0",
        Some("ci/monitoring-values.yaml"),
        &[],
    );
    assert!(
        new.contains("apiVersion: policy/v1\n") && new.contains("apiVersion: autoscaling/v2\n")
    );

    // Profiles do what they say.
    let defaults = render("modelgate", "modelgate", "1.33.0", None, &[]);
    let sidecar = render(
        "modelgate",
        "modelgate",
        "1.33.0",
        Some("ci/sidecar-only-values.yaml"),
        &[],
    );
    assert!(
        !sidecar.contains("name: modelgate-proxy\n"),
        "no central proxy in sidecar-only installs"
    );
    assert!(sidecar.contains("name: modelgate-operator\n"));
    for needle in [
        "readOnlyRootFilesystem: true",
        "runAsNonRoot: true",
        "type: RuntimeDefault",
        "drop: [\"ALL\"]",
        "kind: PodDisruptionBudget",
        "topologySpreadConstraints",
        "terminationGracePeriodSeconds: 120",
        "prometheus.io/scrape: \"true\"",
        "replicas: 2",
    ] {
        assert!(defaults.contains(needle), "defaults lack {needle}");
    }

    // The values schema rejects wrong types with a message naming the field.
    let out = run(
        &helm_bin(),
        &[
            "template",
            "x",
            &chart().display().to_string(),
            "--set",
            "operator.replicas=two",
        ],
        None,
        &[],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("operator.replicas"));

    // The golden render (token pinned; everything else as shipped).
    let golden = render(
        "modelgate",
        "modelgate",
        "1.33.0",
        None,
        &["--set", "proxyToken.value=golden-render-token-0123456789"],
    );
    let path = repo_root().join("tests/golden/chart-default.yaml");
    if std::env::var("UPDATE_GOLDEN").is_ok() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &golden).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == golden,
        "the default render changed: review it, then run UPDATE_GOLDEN=1 cargo test -p modelgate-tests --test chart"
    );
}

#[test]
fn rendered_manifests_pass_server_side_dry_run() {
    install_crds();
    kubectl_ok(
        &[
            "apply",
            "-f",
            &repo_root()
                .join("tests/fixtures/servicemonitor-crd.yaml")
                .display()
                .to_string(),
        ],
        None,
    );
    kubectl_ok(
        &[
            "wait",
            "--for",
            "condition=established",
            "--timeout=60s",
            "crd/servicemonitors.monitoring.coreos.com",
        ],
        None,
    );
    let ns = Namespace::new("chart-dryrun");
    for (name, values) in PROFILES {
        // v1.20 serves policy/v1beta1 and autoscaling/v2beta2: render for it.
        let rendered = render(&format!("dry-{name}"), &ns.0, "1.20.2", *values, &[]);
        let out = kubectl(&["apply", "--dry-run=server", "-f", "-"], Some(&rendered));
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A kubeconfig that authenticates as a ServiceAccount (its token Secret, which v1.20's
/// token controller creates).
async fn service_account_kubeconfig(ns: &str, sa: &str) -> PathBuf {
    let token_of = || {
        let secret = jsonpath(ns, &format!("serviceaccount/{sa}"), "{.secrets[0].name}");
        if secret.is_empty() {
            return String::new();
        }
        jsonpath(ns, &format!("secret/{secret}"), "{.data.token}")
    };
    eventually(Duration::from_secs(60), "service account token", || async {
        !token_of().is_empty()
    })
    .await;
    let token = token_of();
    let token = String::from_utf8(decode_base64(&token)).unwrap();
    let admin = std::fs::read_to_string(kubeconfig()).unwrap();
    let server = admin
        .lines()
        .find_map(|l| {
            l.split("server: \"")
                .nth(1)
                .and_then(|s| s.split('"').next())
        })
        .unwrap()
        .to_owned();
    let dir = temp_dir("sa-kubeconfig");
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {{server: \"{server}\", insecure-skip-tls-verify: true}}\nusers:\n- name: sa\n  user: {{token: \"{token}\"}}\ncontexts:\n- name: c\n  context: {{cluster: c, user: sa, namespace: {ns}}}\ncurrent-context: c\n"
        ),
    )
    .unwrap();
    path
}

fn decode_base64(s: &str) -> Vec<u8> {
    let out = Command::new("base64")
        .arg("-d")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(s.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    out.stdout
}

fn can_i(kubeconfig: &std::path::Path, args: &[&str]) -> bool {
    let out = run(
        &kubectl_bin(),
        &[&["auth", "can-i"], args].concat(),
        None,
        &[("KUBECONFIG", &kubeconfig.display().to_string())],
    );
    String::from_utf8_lossy(&out.stdout).trim() == "yes"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_rbac_is_enough_and_no_wider_and_prometheus_scrapes() {
    let _serial = SERIAL.lock().await;
    install_crds();
    let release_ns = Namespace::new("chart-install");
    let apps = Namespace::new("chart-apps");
    // Cluster-scoped objects carry the release name: one of its own per run.
    let release = &format!("mg{}", std::process::id());
    helm_ok(&[
        "install",
        release,
        &chart().display().to_string(),
        "-n",
        &release_ns.0,
        "--set",
        "operator.leaseDuration=3s",
    ]);
    // The token survives an upgrade.
    let token_secret = format!("secret/{release}-modelgate-proxy-token");
    let read_token = || jsonpath(&release_ns.0, &token_secret, "{.data.token}");
    let token = read_token();
    assert_eq!(token.len(), 64, "48 random characters, base64");
    helm_ok(&[
        "upgrade",
        release,
        &chart().display().to_string(),
        "-n",
        &release_ns.0,
        "--set",
        "operator.leaseDuration=3s",
    ]);
    assert_eq!(read_token(), token);

    // Run the operator as the chart's ServiceAccount.
    let sa_config =
        service_account_kubeconfig(&release_ns.0, &format!("{release}-modelgate-operator")).await;
    let token_file = temp_dir("chart-token").join("token");
    std::fs::write(&token_file, decode_base64(&token)).unwrap();
    let op = Operator::start_as(&token_file, &release_ns.0, "chart-op", &sa_config);
    let proxy = Proxy::follow(&op.config_url, &token_file, "chart-proxy");

    // Everything it does works with those permissions...
    kubectl_ok(
        &[
            "apply",
            "-n",
            &apps.0,
            "-f",
            &repo_root().join("examples/k8s").display().to_string(),
        ],
        None,
    );
    let secret = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: team-a-key}}\nstringData: {{key: sk-{}-team-a-0123456789}}\n",
        apps.0
    );
    kubectl_ok(&["apply", "-n", &apps.0, "-f", "-"], Some(&secret));
    eventually(
        Duration::from_secs(30),
        "route and minted key Programmed",
        || async {
            condition(&apps.0, "modelroute/chat", "Programmed") == "True"
                && condition(&apps.0, "apikey/team-b", "Programmed") == "True"
                && condition(&apps.0, "apikey/team-a", "Programmed") == "True"
        },
    )
    .await;
    let key = format!("sk-{}-team-a-0123456789", apps.0);
    for _ in 0..3 {
        let r = post(
            &proxy.url("/v1/chat/completions"),
            Some(&key),
            &chat("chat", true),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
    let metrics = get(&format!("{}/metrics", op.admin_url), None).await.text();
    assert_eq!(
        metric(&metrics, "modelgate_operator_errors_total", &[]),
        0.0,
        "{}",
        op.log_text()
    );
    assert!(!op.log_text().contains("forbidden"), "{}", op.log_text());

    // ...and nothing beyond them.
    for allowed in [
        vec!["list", "secrets", "-A"],
        vec!["create", "secrets", "-n", &apps.0],
        vec![
            "patch",
            "modelroutes.modelgate.dev",
            "--subresource=status",
            "-n",
            &apps.0,
        ],
        vec!["update", "leases.coordination.k8s.io", "-n", &release_ns.0],
        vec!["create", "events.events.k8s.io", "-n", &apps.0],
    ] {
        assert!(
            can_i(&sa_config, &allowed),
            "should be allowed: {allowed:?}"
        );
    }
    for denied in [
        vec!["delete", "secrets", "-n", &apps.0],
        vec!["update", "secrets", "-n", &apps.0],
        vec!["patch", "modelroutes.modelgate.dev", "-n", &apps.0],
        vec!["delete", "apikeys.modelgate.dev", "-n", &apps.0],
        vec!["create", "deployments.apps", "-n", &apps.0],
        vec!["get", "pods", "-n", &apps.0],
        vec!["update", "leases.coordination.k8s.io", "-n", &apps.0],
        vec!["create", "clusterrolebindings.rbac.authorization.k8s.io"],
    ] {
        assert!(!can_i(&sa_config, &denied), "should be denied: {denied:?}");
    }
    let out = run(
        &kubectl_bin(),
        &[
            "delete",
            "secret",
            "team-a-key",
            "-n",
            &apps.0,
            "--dry-run=server",
        ],
        None,
        &[("KUBECONFIG", &sa_config.display().to_string())],
    );
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("forbidden"));

    // A real Prometheus scrapes the proxy and the operator the way the chart's annotations say.
    let prom = Prometheus::start(&[
        proxy.admin.to_string(),
        op.admin_url.trim_start_matches("http://").to_owned(),
    ]);
    eventually(
        Duration::from_secs(60),
        "Prometheus has the request and token series",
        || async {
            let has = |q: &'static str| {
                let prom = &prom;
                async move {
                    let r = get(&prom.query_url(q), None).await;
                    r.status == StatusCode::OK
                        && !r.json()["data"]["result"]
                            .as_array()
                            .is_none_or(|a| a.is_empty())
                }
            };
            has("modelgate_requests_total{status=\"200\"}").await
                && has("modelgate_tokens_total").await
                && has("modelgate_operator_connected_proxies").await
        },
    )
    .await;

    // Every dashboard query parses (as recording rules for promtool).
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(chart().join("dashboards/modelgate.json")).unwrap(),
    )
    .unwrap();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let mut n = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            n += 1;
            let expr = t["expr"].as_str().unwrap();
            rules.push_str(&format!(
                "      - record: modelgate:dashboard_query_{n}\n        expr: {}\n",
                serde_json::to_string(expr).unwrap()
            ));
        }
    }
    let rules_file = temp_dir("rules").join("dashboard-rules.yaml");
    std::fs::write(&rules_file, rules).unwrap();
    let out =
        Command::new(std::env::var("MODELGATE_PROMTOOL").unwrap_or_else(|_| "promtool".into()))
            .args(["check", "rules"])
            .arg(&rules_file)
            .output()
            .expect("promtool");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(n >= 14, "every panel has a query");

    helm_ok(&["uninstall", release, "-n", &release_ns.0]);
    // The token Secret is kept on uninstall (resource-policy: keep).
    assert_eq!(read_token(), token);
}

/// A Prometheus server (Debian's package) on 127.0.0.1 scraping the given targets.
struct Prometheus {
    addr: String,
    child: std::process::Child,
    _dir: PathBuf,
}

impl Prometheus {
    fn start(targets: &[String]) -> Self {
        let dir = temp_dir("prometheus");
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
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

    fn query_url(&self, q: &str) -> String {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gitops_double_server_side_apply_changes_nothing() {
    let _serial = SERIAL.lock().await;
    install_crds();
    let ns = Namespace::new("chart-gitops");
    let token_file = token_file();
    let token = std::fs::read_to_string(&token_file).unwrap();
    // What a GitOps tool would apply: the rendered install (token pinned in Git via a
    // sealed/external secret in real life) plus the example resources.
    let mut manifests = render(
        "gitops",
        &ns.0,
        "1.20.2",
        None,
        &["--set", &format!("proxyToken.value={token}")],
    );
    for f in ["secrets.yaml", "modelroute.yaml", "apikey.yaml"] {
        let text = std::fs::read_to_string(repo_root().join("examples/k8s").join(f)).unwrap();
        manifests.push_str("\n---\n");
        manifests.push_str(&text);
    }
    // The example key is shared by other tests' namespaces; give this one its own.
    let manifests = manifests.replace(
        "sk-team-a-example-0123456789abcdef",
        &format!("sk-{}-gitops-0123456789", ns.0),
    );
    let apply = |m: &str| {
        kubectl_ok(
            &[
                "apply",
                "--server-side",
                "--field-manager=gitops",
                "-n",
                &ns.0,
                "-f",
                "-",
            ],
            Some(m),
        )
    };
    apply(&manifests);

    // The operator reconciles meanwhile, as in a real cluster.
    let op = Operator::start(&token_file, &ns.0, "gitops-op");
    let proxy = Proxy::follow(&op.config_url, &token_file, "gitops-proxy");
    eventually(Duration::from_secs(30), "examples programmed", || async {
        condition(&ns.0, "modelroute/chat", "Programmed") == "True"
            && condition(&ns.0, "apikey/team-b", "Programmed") == "True"
    })
    .await;
    // Let status settle, then look for churn.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let versions = || {
        kubectl_ok(
            &[
                "get",
                "deployments,services,serviceaccounts,secrets,roles,rolebindings,poddisruptionbudgets,modelroutes,apikeys",
                "-n",
                &ns.0,
                "-o",
                "jsonpath={range .items[*]}{.kind}/{.metadata.name}={.metadata.resourceVersion}{\"\\n\"}{end}",
            ],
            None,
        )
    };
    let before = versions();
    let second = apply(&manifests);
    assert!(!second.contains("configured"), "{second}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = versions();
    assert_eq!(
        before, after,
        "a second apply or a controller changed objects"
    );
    assert!(before.lines().count() >= 10, "{before}");
    drop(proxy);
    drop(op);
}
