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
    ("shared-token", Some("ci/shared-token-values.yaml")),
    ("upstream-policy", Some("ci/upstream-policy-values.yaml")),
    ("tracing", Some("ci/tracing-values.yaml")),
    ("cache", Some("ci/cache-values.yaml")),
    ("cache-tls", Some("ci/cache-tls-values.yaml")),
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

    // Trust (issue 9): proxies prove their ServiceAccount, the config stream is TLS.
    for (name, expected) in [
        ("--proxy-auth", vec!["serviceaccount"]),
        ("--token-audience", vec!["modelgate"]),
        ("--token-file", vec![]),
        ("--namespace", vec!["$(POD_NAMESPACE)"]),
        (
            "--gateway-serviceaccount",
            vec!["modelgate/modelgate-proxy"],
        ),
        ("--gateway-namespaces", vec!["all"]),
        ("--ca-secret", vec!["modelgate-ca"]),
        ("--ca-configmap", vec!["modelgate-ca"]),
        (
            "--tls-san",
            vec![
                "modelgate-operator",
                "modelgate-operator.modelgate",
                "modelgate-operator.modelgate.svc",
                "modelgate-operator.modelgate.svc.cluster.local",
            ],
        ),
        ("--allow-upstream", vec![]),
        ("--deny-upstream", vec![]),
        ("--service-cidr", vec![]),
        (
            "--operator",
            vec!["https://modelgate-operator.modelgate.svc:8443"],
        ),
        ("--operator-ca", vec!["/var/run/modelgate/ca.crt"]),
        ("--operator-token-file", vec!["/var/run/modelgate/token"]),
    ] {
        assert_eq!(flag_values(&defaults, name), expected, "defaults: {name}");
    }
    assert!(
        !defaults.contains("proxy-token"),
        "no shared token by default"
    );
    let proxy_deployment = document(&defaults, "Deployment", "modelgate-proxy");
    for needle in [
        "automountServiceAccountToken: false",
        "serviceAccountToken:",
        "audience: modelgate",
        "expirationSeconds: 3600",
        "name: modelgate-ca",
        "optional: true",
    ] {
        assert!(
            proxy_deployment.contains(needle),
            "proxy Deployment lacks {needle}"
        );
    }
    for (role, labels) in [
        (
            "modelgate-edit",
            &[
                "rbac.authorization.k8s.io/aggregate-to-edit: \"true\"",
                "rbac.authorization.k8s.io/aggregate-to-admin: \"true\"",
            ][..],
        ),
        (
            "modelgate-view",
            &["rbac.authorization.k8s.io/aggregate-to-view: \"true\""][..],
        ),
    ] {
        let doc = document(&defaults, "ClusterRole", role);
        for label in labels {
            assert!(doc.contains(label), "{role} lacks {label}");
        }
        let rules = doc.split("rules:").nth(1).unwrap();
        assert!(
            !rules.contains("status") && !rules.contains("secrets"),
            "{role} grants status or Secrets: {rules}"
        );
    }
    assert!(
        flag_values(&sidecar, "--gateway-serviceaccount").is_empty(),
        "no gateway identity without the central proxies"
    );
    let shared = render(
        "modelgate",
        "modelgate",
        "1.33.0",
        Some("ci/shared-token-values.yaml"),
        &[],
    );
    // Traces: off by default; the values reach the proxy's flags.
    for flag in ["--otlp-endpoint", "--trace-sampling"] {
        assert!(flag_values(&defaults, flag).is_empty(), "defaults: {flag}");
    }
    assert!(!defaults.contains("--trace-content"));
    let traced = render(
        "modelgate",
        "modelgate",
        "1.33.0",
        Some("ci/tracing-values.yaml"),
        &[],
    );
    let traced_proxy = document(&traced, "Deployment", "modelgate-proxy");
    assert_eq!(
        flag_values(traced_proxy, "--otlp-endpoint"),
        ["http://otel-collector.observability:4318"]
    );
    assert_eq!(flag_values(traced_proxy, "--trace-sampling"), ["0.1"]);
    assert!(traced_proxy.contains("- --trace-content"));
    // The response cache's storage: the default budget, Redis only when set.
    let default_proxy = document(&defaults, "Deployment", "modelgate-proxy");
    assert_eq!(
        flag_values(default_proxy, "--cache-memory-bytes"),
        ["67108864"]
    );
    assert!(flag_values(default_proxy, "--cache-redis").is_empty());
    let cached = render(
        "modelgate",
        "modelgate",
        "1.33.0",
        Some("ci/cache-values.yaml"),
        &[],
    );
    let cached_proxy = document(&cached, "Deployment", "modelgate-proxy");
    assert_eq!(
        flag_values(cached_proxy, "--cache-memory-bytes"),
        ["33554432"]
    );
    assert_eq!(
        flag_values(cached_proxy, "--cache-redis"),
        ["redis://redis.modelgate-cache.svc:6379/0"]
    );
    assert!(!cached_proxy.contains("modelgate-redis"), "{cached_proxy}");
    // Over TLS with a user: the password and the CA are files from a Secret and a ConfigMap,
    // never an argument.
    let tls = render(
        "modelgate",
        "modelgate",
        "1.33.0",
        Some("ci/cache-tls-values.yaml"),
        &[],
    );
    let tls_proxy = document(&tls, "Deployment", "modelgate-proxy");
    for (flag, value) in [
        ("--cache-redis", "rediss://redis.modelgate-cache.svc:6380/0"),
        ("--cache-redis-username", "modelgate"),
        (
            "--cache-redis-password-file",
            "/var/run/modelgate-redis/password",
        ),
        ("--cache-redis-ca-file", "/var/run/modelgate-redis/ca.crt"),
        (
            "--cache-redis-entry-key-file",
            "/var/run/modelgate-redis/entry-key",
        ),
    ] {
        assert_eq!(flag_values(tls_proxy, flag), [value], "{flag}");
    }
    for mounted in [
        "name: modelgate-redis\n",
        "items: [{key: password, path: password}]",
        "name: modelgate-redis-ca\n",
        "items: [{key: ca.crt, path: ca.crt}]",
        "name: modelgate-cache-key\n",
        "items: [{key: key, path: entry-key}]",
        "{name: redis, mountPath: /var/run/modelgate-redis, readOnly: true}",
    ] {
        assert!(tls_proxy.contains(mounted), "{mounted}: {tls_proxy}");
    }
    // A CA for a plain URL, or a user without a password, is refused by name.
    for (set, named) in [
        (
            "proxy.cache.redis=redis://r:6379,proxy.cache.redisCaConfigMap=ca",
            "proxy.cache.redisCaConfigMap needs a rediss://",
        ),
        (
            "proxy.cache.redis=redis://r:6379,proxy.cache.redisUsername=u",
            "proxy.cache.redisUsername needs proxy.cache.redisPasswordSecret",
        ),
        (
            "proxy.cache.redisEntryKeySecret=k",
            "proxy.cache.redisEntryKeySecret needs proxy.cache.redis",
        ),
    ] {
        let chart = chart().display().to_string();
        let out = run(
            &helm_bin(),
            &["template", "x", &chart, "--set", set],
            None,
            &[],
        );
        assert!(!out.status.success(), "{set}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(named), "{set}: {err}");
    }
    assert_eq!(flag_values(&shared, "--proxy-auth"), ["shared-token"]);
    assert_eq!(
        flag_values(&shared, "--token-file"),
        ["/var/run/modelgate/token/token"]
    );
    assert!(flag_values(&shared, "--token-audience").is_empty());
    document(&shared, "Secret", "modelgate-proxy-token");
    let shared_proxy = document(&shared, "Deployment", "modelgate-proxy");
    assert!(
        !shared_proxy.contains("serviceAccountToken:")
            && shared_proxy.contains("name: modelgate-proxy-token")
            && shared_proxy.contains("name: modelgate-ca"),
        "shared-token proxies mount the token Secret and still the CA: {shared_proxy}"
    );
    let policy = render(
        "modelgate",
        "modelgate",
        "1.33.0",
        Some("ci/upstream-policy-values.yaml"),
        &[],
    );
    // The operator judges route URLs; the proxies the addresses names resolve to.
    for deployment in ["modelgate-operator", "modelgate-proxy"] {
        let d = document(&policy, "Deployment", deployment);
        assert_eq!(
            flag_values(d, "--allow-upstream"),
            ["api.openai.com", "*.openai.azure.com", "10.20.0.0/16"],
            "{deployment}"
        );
        assert_eq!(
            flag_values(d, "--deny-upstream"),
            ["internal.example.com"],
            "{deployment}"
        );
        assert_eq!(
            flag_values(d, "--service-cidr"),
            ["10.96.0.0/12", "fd00:10:96::/112"],
            "{deployment}"
        );
    }
    assert_eq!(
        flag_values(&policy, "--gateway-namespaces"),
        ["modelgate.dev/gateway=true,tier=prod"]
    );
    assert_eq!(flag_values(&policy, "--ca-configmap"), ["example-ca"]);
    assert!(
        document(&policy, "ClusterRole", "modelgate-operator")
            .contains("resourceNames: [\"example-ca\"]")
            && document(&policy, "Deployment", "modelgate-proxy").contains("name: example-ca"),
        "the CA ConfigMap name follows tls.caConfigMap"
    );
    // Operator replicas reach each other's config port (replica-to-leader calls).
    let netpol = render(
        "modelgate",
        "modelgate",
        "1.33.0",
        Some("ci/networkpolicy-values.yaml"),
        &[],
    );
    let ingress = document(&netpol, "NetworkPolicy", "modelgate-operator")
        .split("ingress:")
        .nth(1)
        .unwrap()
        .to_owned();
    assert!(
        ingress.contains("app.kubernetes.io/component: operator")
            && ingress.contains("app.kubernetes.io/component: proxy"),
        "{ingress}"
    );

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
    let out = run(
        &helm_bin(),
        &[
            "template",
            "x",
            &chart().display().to_string(),
            "--set",
            "proxyAuth.mode=none",
        ],
        None,
        &[],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("proxyAuth.mode"));

    // The golden render: the defaults as shipped (ServiceAccount identities, so no generated
    // token to pin).
    let golden = defaults;
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

/// The values given to `name` in rendered container args (`- --flag` then `- value`).
fn flag_values(rendered: &str, name: &str) -> Vec<String> {
    let mut lines = rendered.lines().map(str::trim);
    let mut values = Vec::new();
    while let Some(line) = lines.next() {
        if line.strip_prefix("- ") == Some(name) {
            let value = lines
                .next()
                .and_then(|l| l.strip_prefix("- "))
                .unwrap_or("");
            let value = value.split(" #").next().unwrap_or("").trim();
            values.push(value.trim_matches('"').to_owned());
        }
    }
    values
}

/// One document of a render, by kind and metadata.name.
fn document<'a>(rendered: &'a str, kind: &str, name: &str) -> &'a str {
    rendered
        .split("\n---")
        .find(|d| {
            d.contains(&format!("\nkind: {kind}\n")) && d.contains(&format!("\n  name: {name}\n"))
        })
        .unwrap_or_else(|| panic!("no {kind} {name} in the render"))
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
    // Proxies prove who they are with ServiceAccount tokens: no shared token by default.
    assert!(
        jsonpath(&release_ns.0, "secrets", "{.items[*].metadata.name}")
            .split(' ')
            .all(|n| n != format!("{release}-modelgate-proxy-token")),
        "no shared proxy token in the default install"
    );
    helm_ok(&[
        "upgrade",
        release,
        &chart().display().to_string(),
        "-n",
        &release_ns.0,
        "--set",
        "operator.leaseDuration=3s",
    ]);

    // Run the operator as the chart's ServiceAccount, with the chart's names; the proxy
    // with a token of the chart's proxy ServiceAccount.
    let sa_config =
        service_account_kubeconfig(&release_ns.0, &format!("{release}-modelgate-operator")).await;
    let op = Operator::launch(OperatorConfig {
        kubeconfig: sa_config.clone(),
        gateway_accounts: vec![format!("{}/{release}-modelgate-proxy", release_ns.0)],
        extra_args: vec!["--ca-secret".into(), format!("{release}-modelgate-ca")],
        ..OperatorConfig::new(&release_ns.0, "chart-op")
    });
    let proxy_token = sa_token(&release_ns.0, &format!("{release}-modelgate-proxy"));
    let proxy = Proxy::follow(&op, &proxy_token, "chart-proxy");

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
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: team-a-key, labels: {{modelgate.dev/credential: \"true\"}}}}\nstringData: {{key: sk-{}-team-a-0123456789}}\n",
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
    let ca_secret = format!("secrets/{release}-modelgate-ca");
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
        // Proxy identities, and which namespaces opted in.
        vec!["create", "tokenreviews.authentication.k8s.io"],
        vec!["list", "namespaces"],
        vec!["watch", "namespaces"],
        // The CA: its Secret in the release namespace, its ConfigMap wherever sidecars run.
        vec!["update", &ca_secret, "-n", &release_ns.0],
        vec!["create", "configmaps", "-n", &apps.0],
        vec!["get", "configmaps/modelgate-ca", "-n", &apps.0],
        vec!["update", "configmaps/modelgate-ca", "-n", &apps.0],
        // The usage book.
        vec!["update", "configmaps/modelgate-usage", "-n", &release_ns.0],
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
        // Secrets: read and mint, never rewrite (the CA Secret by name, in its namespace).
        vec!["delete", "secrets", "-n", &release_ns.0],
        vec!["update", "secrets/other-name", "-n", &release_ns.0],
        vec!["update", &ca_secret, "-n", &apps.0],
        // ConfigMaps: only the CA and usage ones, by name, where they belong.
        vec!["list", "configmaps", "-n", &apps.0],
        vec!["get", "configmaps/other-name", "-n", &apps.0],
        vec!["update", "configmaps/other-name", "-n", &apps.0],
        vec!["patch", "configmaps/other-name", "-n", &release_ns.0],
        vec!["delete", "configmaps/modelgate-ca", "-n", &apps.0],
        vec!["update", "configmaps/modelgate-usage", "-n", &apps.0],
        // Namespaces read only; no minting of tokens, no access reviews on others' behalf.
        vec!["patch", "namespaces"],
        vec!["delete", "namespaces"],
        vec![
            "create",
            "serviceaccounts",
            "--subresource=token",
            "-n",
            &apps.0,
        ],
        vec!["create", "subjectaccessreviews.authorization.k8s.io"],
        vec!["patch", "apikeys.modelgate.dev", "-n", &apps.0],
    ] {
        assert!(!can_i(&sa_config, &denied), "should be denied: {denied:?}");
    }

    // Tenants: the aggregated roles give the specs, not status and not Secrets.
    let admin = kubeconfig();
    for (user, role) in [
        ("tenant-editor", format!("{release}-modelgate-edit")),
        ("tenant-viewer", format!("{release}-modelgate-view")),
    ] {
        kubectl_ok(
            &[
                "create",
                "rolebinding",
                user,
                &format!("--clusterrole={role}"),
                &format!("--user={user}"),
                "-n",
                &apps.0,
            ],
            None,
        );
    }
    let as_user = |user: &str, args: &[&str]| {
        let who = format!("--as={user}");
        can_i(&admin, &[args, &["-n", &apps.0, &who]].concat())
    };
    for (user, args) in [
        ("tenant-editor", vec!["patch", "modelroutes.modelgate.dev"]),
        ("tenant-editor", vec!["create", "apikeys.modelgate.dev"]),
        ("tenant-editor", vec!["delete", "apikeys.modelgate.dev"]),
        ("tenant-viewer", vec!["list", "apikeys.modelgate.dev"]),
        ("tenant-viewer", vec!["watch", "modelroutes.modelgate.dev"]),
    ] {
        assert!(as_user(user, &args), "{user} should be allowed: {args:?}");
    }
    for (user, args) in [
        (
            "tenant-editor",
            vec!["patch", "apikeys.modelgate.dev", "--subresource=status"],
        ),
        (
            "tenant-editor",
            vec![
                "update",
                "modelroutes.modelgate.dev",
                "--subresource=status",
            ],
        ),
        ("tenant-editor", vec!["get", "secrets"]),
        ("tenant-editor", vec!["create", "secrets"]),
        ("tenant-viewer", vec!["patch", "modelroutes.modelgate.dev"]),
        ("tenant-viewer", vec!["get", "secrets"]),
    ] {
        assert!(!as_user(user, &args), "{user} should be denied: {args:?}");
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gitops_double_server_side_apply_changes_nothing() {
    let _serial = SERIAL.lock().await;
    install_crds();
    let ns = Namespace::new("chart-gitops");
    // What a GitOps tool would apply: the rendered install plus the example resources.
    let mut manifests = render("gitops", &ns.0, "1.20.2", None, &[]);
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
    let op = Operator::launch(OperatorConfig {
        gateway_accounts: vec![format!("{}/gitops-modelgate-proxy", ns.0)],
        extra_args: vec!["--ca-secret".into(), "gitops-modelgate-ca".into()],
        ..OperatorConfig::new(&ns.0, "gitops-op")
    });
    let proxy = Proxy::follow(
        &op,
        &sa_token(&ns.0, "gitops-modelgate-proxy"),
        "gitops-proxy",
    );
    // Settled: every route and key is Programmed, the last status the operator writes for
    // them (a minted key's Secret comes before it).
    eventually(Duration::from_secs(30), "examples programmed", || async {
        ["modelroute/chat", "apikey/team-a", "apikey/team-b"]
            .iter()
            .all(|o| condition(&ns.0, o, "Programmed") == "True")
    })
    .await;
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
    // That nothing changes is only worth checking after the operator has had its chance: look
    // again once it has handled an event that came after the second apply (a route in another
    // namespace, accepted). The status pass that wrote that route weighed every other object too.
    let elsewhere = Namespace::new("chart-gitops-marker");
    kubectl_ok(
        &["apply", "-n", &elsewhere.0, "-f", "-"],
        Some(
            "apiVersion: modelgate.dev/v1alpha1\nkind: ModelRoute\nmetadata: {name: marker}\nspec: {model: gitops-marker, backends: [{name: m, provider: mock}]}\n",
        ),
    );
    eventually(
        Duration::from_secs(30),
        "the operator handled an event after the second apply",
        || async { condition(&elsewhere.0, "modelroute/marker", "Accepted") == "True" },
    )
    .await;
    let after = versions();
    assert_eq!(
        before, after,
        "a second apply or a controller changed objects"
    );
    assert!(before.lines().count() >= 10, "{before}");
    drop(proxy);
    drop(op);
}
