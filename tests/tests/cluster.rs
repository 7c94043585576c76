//! The chart on a cluster with a real node (`make test-cluster`: kubelet, containerd, CNI,
//! kube-proxy, cluster DNS; scripts/cluster-up.sh): `helm install` with default values brings
//! every pod to Ready from the images `make images` built, the examples become Programmed,
//! and the official OpenAI SDK gets answers through the `modelgate-proxy` Service. The proxies
//! find the operator by its Service's DNS name and prove who they are with their projected
//! ServiceAccount token.

use std::time::{Duration, Instant};

use modelgate_tests::harness::*;
use modelgate_tests::k8s::*;

const RELEASE: &str = "modelgate";
const NS: &str = "modelgate";
/// The raw key of examples/k8s/secrets.yaml's `team-a-key`.
const TEAM_A_KEY: &str = "sk-team-a-example-0123456789abcdef";

/// Waits until `kubectl` prints `want` for a jsonpath, or fails with what it printed last.
async fn wait_jsonpath(ns: &str, what: &str, path: &str, want: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let got = jsonpath(ns, what, path);
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} in {ns}: {path} is {got:?}, not {want:?}, after {within:?}\n{}",
            describe(ns)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What a person would look at when pods do not come up.
fn describe(ns: &str) -> String {
    let pods = kubectl(&["get", "pods", "-n", ns, "-o", "wide"], None);
    let events = kubectl(
        &["get", "events", "-n", ns, "--sort-by", ".lastTimestamp"],
        None,
    );
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&pods.stdout),
        String::from_utf8_lossy(&events.stdout)
    )
}

/// Every pod of the namespace Running, Ready and never restarted; returns their names.
fn pods_ready(ns: &str) -> Option<Vec<String>> {
    let out = jsonpath(
        ns,
        "pods",
        r#"{range .items[*]}{.metadata.name} {.status.phase} {.status.conditions[?(@.type=="Ready")].status} {.status.containerStatuses[*].restartCount}{"\n"}{end}"#,
    );
    let mut names = Vec::new();
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 || f[1] != "Running" || f[2] != "True" {
            return None;
        }
        assert!(
            f[3..].iter().all(|r| *r == "0"),
            "a pod restarted: {line}\n{}",
            describe(ns)
        );
        names.push(f[0].to_owned());
    }
    (!names.is_empty()).then_some(names)
}

#[tokio::test(flavor = "multi_thread")]
async fn helm_install_with_default_values_serves_the_openai_sdk_through_the_proxy_service() {
    let chart = repo_root().join("charts/modelgate").display().to_string();
    // A rerun on the same node starts from nothing.
    helm_ok(&[
        "uninstall",
        RELEASE,
        "-n",
        NS,
        "--ignore-not-found",
        "--wait",
    ]);
    let t0 = Instant::now();
    helm_ok(&[
        "install",
        RELEASE,
        &chart,
        "-n",
        NS,
        "--create-namespace",
        "--wait",
        "--timeout",
        "300s",
    ]);
    let deadline = Instant::now() + Duration::from_secs(120);
    let pods = loop {
        if let Some(p) = pods_ready(NS) {
            break p;
        }
        assert!(
            Instant::now() < deadline,
            "pods not Ready:\n{}",
            describe(NS)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let installed = t0.elapsed();
    // Two operators (leader election) and two proxies by default.
    assert_eq!(
        pods.iter().filter(|p| p.contains("-operator-")).count(),
        2,
        "{pods:?}"
    );
    assert_eq!(
        pods.iter().filter(|p| p.contains("-proxy-")).count(),
        2,
        "{pods:?}"
    );

    // The examples, in a tenant namespace, as a cluster admin applies them.
    let tenant = Namespace::new("apps");
    let examples = repo_root().join("examples/k8s");
    let t1 = Instant::now();
    for f in ["secrets.yaml", "modelroute.yaml", "apikey.yaml"] {
        kubectl_ok(
            &[
                "apply",
                "-n",
                &tenant.0,
                "-f",
                &examples.join(f).display().to_string(),
            ],
            None,
        );
    }
    for what in ["modelroute/chat", "apikey/team-a", "apikey/team-b"] {
        wait_jsonpath(
            &tenant.0,
            what,
            r#"{.status.conditions[?(@.type=="Programmed")].status}"#,
            "True",
            Duration::from_secs(60),
        )
        .await;
    }
    let programmed = t1.elapsed();

    // The proxy Service's ClusterIP, reached from the node through kube-proxy's rules.
    let ip = jsonpath(NS, "service/modelgate-proxy", "{.spec.clusterIP}");
    let port = jsonpath(
        NS,
        "service/modelgate-proxy",
        r#"{.spec.ports[?(@.name=="api")].port}"#,
    );
    assert!(
        !ip.is_empty() && !port.is_empty(),
        "proxy Service {ip}:{port}"
    );
    let base = format!("http://{ip}:{port}/v1");
    let t2 = Instant::now();
    let mut answered = None;
    while t2.elapsed() < Duration::from_secs(60) {
        match sdk_chat(&base, TEAM_A_KEY, "chat") {
            Ok(text) => {
                answered = Some(text);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
    let text = answered.unwrap_or_else(|| {
        panic!(
            "no answer through {base}: {:?}\n{}",
            sdk_chat(&base, TEAM_A_KEY, "chat"),
            describe(NS)
        )
    });
    assert!(!text.is_empty());
    // A key the route does not know is refused by every proxy, as the SDK sees it.
    let refused = sdk_chat(&base, "sk-not-a-key", "chat").unwrap_err();
    assert!(refused.contains("AuthenticationError"), "{refused}");

    // Each proxy got its config over the operator's stream, authenticated by its projected
    // token: the leader counts them as connected.
    let leader = jsonpath(NS, "lease", "{.items[*].spec.holderIdentity}");
    assert!(!leader.is_empty(), "a leader holds the Lease");
    println!(
        "cluster: helm install → {} pods Ready in {:.1} s; examples Programmed in {:.1} s; \
         first SDK answer {:.1} s later (leader {leader})",
        pods.len(),
        installed.as_secs_f64(),
        programmed.as_secs_f64(),
        t2.elapsed().as_secs_f64()
    );
}
