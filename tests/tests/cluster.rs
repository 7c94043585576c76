//! The chart on a cluster with a real node (`make test-cluster`: kubelet, containerd, CNI,
//! kube-proxy, cluster DNS; scripts/cluster-up.sh): `helm install` with default values brings
//! every pod to Ready from the images `make images` built, the examples become Programmed,
//! and the official OpenAI SDK gets answers through the `modelgate-proxy` Service. The proxies
//! find the operator by its Service's DNS name and prove who they are with their projected
//! ServiceAccount token.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
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

/// Waits until the namespace's pods are all Ready (`pods_ready`) and `done` holds for their
/// names; returns the names.
async fn wait_pods(
    ns: &str,
    what: &str,
    within: Duration,
    done: impl Fn(&[String]) -> bool,
) -> Vec<String> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(p) = pods_ready(ns)
            && done(&p)
        {
            return p;
        }
        assert!(Instant::now() < deadline, "{what}:\n{}", describe(ns));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Changes the `chat` route of `apps` (its first backend's weight) and waits until that
/// generation is Programmed.
async fn reweigh_chat(weight: u32) {
    let patch =
        format!(r#"[{{"op":"replace","path":"/spec/backends/0/weight","value":{weight}}}]"#);
    kubectl_ok(
        &[
            "patch",
            "modelroute",
            "chat",
            "-n",
            APPS,
            "--type=json",
            "-p",
            &patch,
        ],
        None,
    );
    let generation = jsonpath(APPS, "modelroute/chat", "{.metadata.generation}");
    wait_jsonpath(
        APPS,
        "modelroute/chat",
        r#"{.status.conditions[?(@.type=="Programmed")].observedGeneration} {.status.conditions[?(@.type=="Programmed")].status}"#,
        &format!("{generation} True"),
        Duration::from_secs(60),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn helm_install_with_default_values_serves_the_openai_sdk_through_the_proxy_service() {
    let chart = repo_root().join("charts/modelgate").display().to_string();
    // Starts from nothing: no release, and no `apps` of the other tests (the examples' raw
    // keys must be unique across the cluster).
    helm_ok(&[
        "uninstall",
        RELEASE,
        "-n",
        NS,
        "--ignore-not-found",
        "--wait",
    ]);
    let _ = kubectl(
        &[
            "delete",
            "namespace",
            APPS,
            "--ignore-not-found",
            "--wait=true",
            "--timeout=180s",
        ],
        None,
    );
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
    let pods = wait_pods(NS, "pods not Ready", Duration::from_secs(120), |_| true).await;
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

/// The namespace where the failover tests keep the examples.
const APPS: &str = "apps";

/// The chart installed with default values and the examples Programmed in `apps`, from an
/// earlier test or now; returns the proxy Service's base URL.
async fn installed() -> String {
    let chart = repo_root().join("charts/modelgate").display().to_string();
    let status = run(&helm_bin(), &["status", RELEASE, "-n", NS], None, &[]);
    if !status.status.success() {
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
    }
    wait_pods(NS, "pods not Ready", Duration::from_secs(120), |p| {
        p.len() == 4
    })
    .await;
    let _ = kubectl(&["create", "namespace", APPS], None);
    let examples = repo_root().join("examples/k8s");
    for f in ["secrets.yaml", "modelroute.yaml", "apikey.yaml"] {
        kubectl_ok(
            &[
                "apply",
                "-n",
                APPS,
                "-f",
                &examples.join(f).display().to_string(),
            ],
            None,
        );
    }
    // A key without limits for the load: the examples' keys are rate limited.
    kubectl_ok(&["apply", "-n", APPS, "-f", "-"], Some(LOAD_KEY_YAML));
    for what in ["modelroute/chat", "modelroute/slow", "apikey/load"] {
        wait_jsonpath(
            APPS,
            what,
            r#"{.status.conditions[?(@.type=="Programmed")].status}"#,
            "True",
            Duration::from_secs(60),
        )
        .await;
    }
    let ip = jsonpath(NS, "service/modelgate-proxy", "{.spec.clusterIP}");
    let port = jsonpath(
        NS,
        "service/modelgate-proxy",
        r#"{.spec.ports[?(@.name=="api")].port}"#,
    );
    format!("http://{ip}:{port}")
}

/// The raw key of the `load` ApiKey.
const LOAD_KEY: &str = "sk-cluster-load-0123456789abcdef";
const LOAD_KEY_YAML: &str = r#"
apiVersion: v1
kind: Secret
metadata:
  name: load-key
  labels: {modelgate.dev/credential: "true"}
type: Opaque
stringData: {key: sk-cluster-load-0123456789abcdef}
---
apiVersion: modelgate.dev/v1alpha1
kind: ApiKey
metadata: {name: load}
spec:
  secretRef: {name: load-key, key: key}
  models: ["chat", "slow"]
---
# Long streams (about 2 s each), so that pods go while streams are in flight.
apiVersion: modelgate.dev/v1alpha1
kind: ModelRoute
metadata: {name: slow}
spec:
  model: slow
  backends:
    - name: mock
      provider: mock
      model: mock-slow
      mock: {latency: 20ms, outputTokens: 40, chunkDelay: 50ms}
"#;

/// What a load run saw.
#[derive(Debug, Default)]
struct Tally {
    sent: u64,
    ok: u64,
    /// Requests that got no response at all (connection refused or reset before an answer)
    /// and were sent again, as every SDK does.
    retried: u64,
    failed: Vec<String>,
}

/// Clients sending chat completions (every other one streamed) through the proxy Service
/// until stopped; keep-alive connections, as SDKs keep them.
struct Load {
    stop: Arc<AtomicBool>,
    workers: Vec<tokio::task::JoinHandle<Tally>>,
}

impl Tally {
    fn assert_none_failed(&self) {
        assert!(self.ok > 0, "nothing answered");
        assert!(
            self.failed.is_empty(),
            "{} of {} requests failed; the first: {:?}",
            self.failed.len(),
            self.sent,
            &self.failed[..self.failed.len().min(5)]
        );
    }
}

impl Load {
    /// `workers` clients on `model`; with `all_streams` every request streams, else every
    /// other client does.
    fn start(base: &str, key: &str, model: &str, workers: usize, all_streams: bool) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let workers = (0..workers)
            .map(|i| {
                let (stop, url, key, model) = (
                    stop.clone(),
                    format!("{base}/v1/chat/completions"),
                    key.to_owned(),
                    model.to_owned(),
                );
                let stream = all_streams || i % 2 == 1;
                tokio::spawn(async move { load_worker(&url, &key, &model, stream, &stop).await })
            })
            .collect();
        Self { stop, workers }
    }

    async fn stop(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Tally::default();
        for w in self.workers {
            let t = w.await.unwrap();
            all.sent += t.sent;
            all.ok += t.ok;
            all.retried += t.retried;
            all.failed.extend(t.failed);
        }
        all
    }
}

async fn load_worker(url: &str, key: &str, model: &str, stream: bool, stop: &AtomicBool) -> Tally {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    c.set_connect_timeout(Some(Duration::from_secs(5)));
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(c);
    let body = Bytes::from(serde_json::to_vec(&chat(model, stream)).unwrap());
    let mut t = Tally::default();
    while !stop.load(Ordering::Relaxed) {
        // A steady, modest rate (about 40 requests a second per worker): the point is to
        // be in flight when pods go, not to saturate a 2-core node.
        tokio::time::sleep(Duration::from_millis(25)).await;
        t.sent += 1;
        let mut attempts = 0;
        let outcome = loop {
            attempts += 1;
            let req = request(http::Method::POST, url, Some(key), body.clone());
            match tokio::time::timeout(Duration::from_secs(30), client.request(req)).await {
                Err(_) => break Err("no response within 30 s".to_owned()),
                // No answer at all: safe to send again (nothing reached a model).
                Ok(Err(e)) if attempts < 5 => {
                    t.retried += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok(Err(e)) => break Err(format!("no response after {attempts} attempts: {e}")),
                Ok(Ok(resp)) => {
                    let status = resp.status();
                    let text = match resp.into_body().collect().await {
                        Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
                        Err(e) => break Err(format!("{status}, body broken: {e}")),
                    };
                    let whole = if stream {
                        text.trim_end().ends_with("data: [DONE]")
                    } else {
                        text.contains("\"choices\"")
                    };
                    break if status.is_success() && whole {
                        Ok(())
                    } else {
                        Err(format!(
                            "{status}: {}",
                            text.chars().take(200).collect::<String>()
                        ))
                    };
                }
            }
        };
        match outcome {
            Ok(()) => t.ok += 1,
            Err(e) => t.failed.push(e),
        }
    }
    t
}

/// `helm upgrade` of the release with its values and one more `--set`, waiting for it.
fn helm_upgrade(set: &str) {
    let chart = repo_root().join("charts/modelgate").display().to_string();
    helm_ok(&[
        "upgrade",
        RELEASE,
        &chart,
        "-n",
        NS,
        "--reuse-values",
        "--set",
        set,
        "--wait",
        "--timeout",
        "300s",
    ]);
}

fn lease_holder() -> String {
    jsonpath(NS, "lease", "{.items[*].spec.holderIdentity}")
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_the_leader_operator_pod_hands_over_the_lease_and_traffic_never_stops() {
    let base = installed().await;
    let leader = lease_holder();
    assert!(!leader.is_empty(), "a leader holds the Lease");
    let load = Load::start(&base, LOAD_KEY, "chat", 8, false);
    tokio::time::sleep(Duration::from_secs(2)).await;

    let t0 = Instant::now();
    kubectl_ok(&["delete", "pod", &leader, "-n", NS, "--wait=false"], None);
    let deadline = Instant::now() + Duration::from_secs(60);
    let new_leader = loop {
        let holder = lease_holder();
        if !holder.is_empty() && holder != leader {
            break holder;
        }
        assert!(
            Instant::now() < deadline,
            "no new leader: {holder:?}\n{}",
            describe(NS)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let handover = t0.elapsed();

    // The new leader writes status: a change becomes Programmed at its new generation.
    reweigh_chat(70).await;
    let programmed = t0.elapsed();
    // The Deployment brings the second replica back while traffic goes on.
    wait_pods(NS, "no replacement", Duration::from_secs(120), |p| {
        p.len() == 4
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let tally = load.stop().await;
    println!(
        "failover: leader {leader} deleted; {new_leader} held the Lease after {:.2} s; a route \
         change Programmed {:.2} s after the deletion; {} requests sent, {} answered, {} failed, \
         {} resent after no answer",
        handover.as_secs_f64(),
        programmed.as_secs_f64(),
        tally.sent,
        tally.ok,
        tally.failed.len(),
        tally.retried
    );
    tally.assert_none_failed();
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_a_proxy_pod_under_load_lets_its_streams_finish_and_loses_no_request() {
    let base = installed().await;
    // Streams of about 2 s each on 12 clients: a proxy always has some in flight.
    let load = Load::start(&base, LOAD_KEY, "slow", 12, true);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let before = pods_ready(NS).expect("pods Ready");
    let victim = before
        .iter()
        .find(|p| p.contains("-proxy-"))
        .unwrap()
        .clone();
    let t0 = Instant::now();
    kubectl_ok(&["delete", "pod", &victim, "-n", NS, "--wait=false"], None);
    // Gone (drain delay, then its streams end), and a replacement Ready.
    let deadline = Instant::now() + Duration::from_secs(150);
    let gone = loop {
        let left = kubectl(&["get", "pod", &victim, "-n", NS], None);
        if !left.status.success() {
            break t0.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "{victim} never went\n{}",
            describe(NS)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // The same deadline as the pod's going.
    let left = deadline.saturating_duration_since(Instant::now());
    wait_pods(NS, "no replacement", left, |p| {
        p.len() == 4 && !p.contains(&victim)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let tally = load.stop().await;
    println!(
        "drain: proxy {victim} deleted under {} streaming clients; gone after {:.1} s; {} \
         streams sent, {} finished whole, {} failed, {} resent after no answer",
        12,
        gone.as_secs_f64(),
        tally.sent,
        tally.ok,
        tally.failed.len(),
        tally.retried
    );
    tally.assert_none_failed();
}

/// `ctr` on the node's containerd, in the kubelet's namespace.
fn node_ctr(args: &[&str]) -> String {
    let socket = std::env::var("MODELGATE_CONTAINERD")
        .expect("MODELGATE_CONTAINERD is not set: run `make test-cluster`");
    let out = std::process::Command::new("ctr")
        .args(["--address", &socket, "-n", "k8s.io"])
        .args(args)
        .output()
        .expect("run ctr");
    assert!(
        out.status.success(),
        "ctr {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn helm_upgrade_to_a_new_image_tag_rolls_every_pod_under_load_without_a_failed_request() {
    let base = installed().await;
    // The same build under a new tag, as a release pipeline would push it: the rollout is
    // what is tested (both Deployments change their pod template).
    let tag = chart_app_version();
    let new_tag = format!("{tag}-upgrade");
    for name in ["modelgate-dataplane", "modelgate-operator"] {
        let new = format!("ghcr.io/modelgate/{name}:{new_tag}");
        let _ = std::process::Command::new("ctr")
            .args(["--address", &std::env::var("MODELGATE_CONTAINERD").unwrap()])
            .args(["-n", "k8s.io", "images", "rm", &new])
            .output();
        node_ctr(&[
            "images",
            "tag",
            &format!("ghcr.io/modelgate/{name}:{tag}"),
            &new,
        ]);
    }
    let old_pods = pods_ready(NS).expect("pods Ready");
    let chat_load = Load::start(&base, LOAD_KEY, "chat", 6, false);
    let stream_load = Load::start(&base, LOAD_KEY, "slow", 6, true);
    tokio::time::sleep(Duration::from_secs(3)).await;

    let t0 = Instant::now();
    helm_upgrade(&format!("image.tag={new_tag}"));
    // Every pod replaced, Ready, on the new tag.
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let images = jsonpath(NS, "pods", "{.items[*].spec.containers[*].image}");
        let ready = pods_ready(NS);
        if let Some(pods) = &ready
            && pods.len() == 4
            && pods.iter().all(|p| !old_pods.contains(p))
            && images
                .split_whitespace()
                .all(|i| i.ends_with(&format!(":{new_tag}")))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rollout incomplete: {images}\n{}",
            describe(NS)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rolled = t0.elapsed();
    // The new operators program the new proxies: a change reaches Programmed.
    reweigh_chat(60).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (chats, streams) = (chat_load.stop().await, stream_load.stop().await);
    println!(
        "upgrade: helm upgrade to {new_tag}, 4 pods replaced in {:.1} s; {} requests ({} \
         streams) sent, {} answered, {} failed, {} resent after no answer",
        rolled.as_secs_f64(),
        chats.sent + streams.sent,
        streams.sent,
        chats.ok + streams.ok,
        chats.failed.len() + streams.failed.len(),
        chats.retried + streams.retried
    );
    chats.assert_none_failed();
    streams.assert_none_failed();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_network_policy_profile_applies_selects_the_charts_pods_and_traffic_still_flows() {
    let base = installed().await;
    helm_upgrade("networkPolicy.enabled=true");
    // The API server took both policies; each selects exactly the pods it is written for.
    for (policy, component) in [
        ("modelgate-operator", "operator"),
        ("modelgate-proxy", "proxy"),
    ] {
        let json = kubectl_ok(
            &["get", "networkpolicy", policy, "-n", NS, "-o", "json"],
            None,
        );
        let spec: serde_json::Value = serde_json::from_str(&json).unwrap();
        let labels = spec["spec"]["podSelector"]["matchLabels"]
            .as_object()
            .unwrap_or_else(|| panic!("{policy} selects by labels: {json}"));
        let selector: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap()))
            .collect();
        let selected = kubectl_ok(
            &[
                "get",
                "pods",
                "-n",
                NS,
                "-l",
                &selector.join(","),
                "-o",
                "name",
            ],
            None,
        );
        let selected: Vec<&str> = selected.lines().collect();
        assert_eq!(selected.len(), 2, "{policy}: {selected:?}");
        assert!(
            selected
                .iter()
                .all(|p| p.contains(&format!("-{component}-"))),
            "{policy} selects only {component} pods: {selected:?}"
        );
    }
    // Proxies still receive the operator's snapshots, and clients still get answers.
    reweigh_chat(70).await;
    let answer = sdk_chat(&format!("{base}/v1"), LOAD_KEY, "chat");
    assert!(answer.is_ok(), "{answer:?}");
    helm_upgrade("networkPolicy.enabled=false");
    assert_eq!(
        kubectl_ok(&["get", "networkpolicies", "-n", NS, "-o", "name"], None).trim(),
        "",
        "disabling the profile removes its policies"
    );
    println!(
        "network policy: the profile applies and selects 2 operator + 2 proxy pods; \
         enforcement not tested (the rig's bridge CNI does not enforce NetworkPolicy)"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sidecar_examples_app_reaches_its_proxy_on_localhost() {
    installed().await;
    // The example as a user applies it, with one change: its app image (python) cannot be
    // pulled here, so the app container is the rig's static busybox, which sleeps.
    let example = std::fs::read_to_string(
        repo_root().join("examples/k8s/sidecar/app-with-proxy-sidecar.yaml"),
    )
    .unwrap();
    assert!(
        example.contains("image: python:3.12-slim")
            && example.contains(r#"command: ["sleep", "infinity"]"#)
    );
    let manifest = example
        .replace(
            "image: python:3.12-slim",
            "image: localhost/modelgate-rig/busybox:1.35",
        )
        .replace(
            r#"command: ["sleep", "infinity"]"#,
            r#"command: ["/bin/busybox", "sleep", "86400"]"#,
        );
    // A namespace of its own per run, so that a run does not wait for the last one's to go.
    let ns = format!("my-app-{}", std::process::id());
    let manifest = manifest
        .replace("name: my-app\n  labels:", &format!("name: {ns}\n  labels:"))
        .replace("namespace: my-app\n", &format!("namespace: {ns}\n"));
    let _cleanup = Namespace(ns.clone());
    let ns = ns.as_str();
    // Raw keys are unique across the cluster, and the example's team-a key is in other
    // tests' namespaces too: this run's app gets a key of its own.
    let example_key = "c2stdGVhbS1hLWV4YW1wbGUtMDEyMzQ1Njc4OWFiY2RlZg==";
    assert!(manifest.contains(example_key));
    let own_key = format!("sk-sidecar-{}-0123456789abcdef", std::process::id());
    let manifest = manifest.replace(example_key, &base64(own_key.as_bytes()));
    let examples = repo_root().join("examples/k8s");
    // The route's fallback credential from the examples' Secrets first, then the example
    // (its team-a-key, with this run's key, replaces theirs before any pod reads it).
    kubectl_ok(&["create", "namespace", ns], None);
    let secrets = examples.join("secrets.yaml").display().to_string();
    kubectl_ok(&["apply", "-n", ns, "-f", &secrets], None);
    kubectl_ok(&["apply", "-f", "-"], Some(&manifest));
    for f in ["modelroute.yaml", "apikey.yaml"] {
        kubectl_ok(
            &[
                "apply",
                "-n",
                ns,
                "-f",
                &examples.join(f).display().to_string(),
            ],
            None,
        );
    }
    let t0 = Instant::now();
    let pods = wait_pods(
        ns,
        "sidecar pods not Ready",
        Duration::from_secs(120),
        |p| p.len() == 2,
    )
    .await;
    let ready = t0.elapsed();
    for what in ["modelroute/chat", "apikey/team-a"] {
        wait_jsonpath(
            ns,
            what,
            r#"{.status.conditions[?(@.type=="Programmed")].status}"#,
            "True",
            Duration::from_secs(60),
        )
        .await;
    }
    // From the app container: the OpenAI API on 127.0.0.1:8080, with the key the example
    // hands the app in OPENAI_API_KEY. (busybox nc stops reading when its input ends, so the
    // input stays open until the proxy has answered and closed the HTTP/1.0 connection.)
    let script = r#"body='{"model":"chat","messages":[{"role":"user","content":"hi"}]}'
{ printf 'POST /v1/chat/completions HTTP/1.0\r\nHost: localhost\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\nContent-Length: %s\r\n\r\n%s' "$OPENAI_API_KEY" "${#body}" "$body"; /bin/busybox sleep 5; } | /bin/busybox nc 127.0.0.1 8080"#;
    for pod in &pods {
        let answer = kubectl_ok(
            &[
                "exec",
                "-n",
                ns,
                pod,
                "-c",
                "app",
                "--",
                "/bin/busybox",
                "sh",
                "-c",
                script,
            ],
            None,
        );
        assert!(
            answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200"),
            "{pod}: {answer}"
        );
        assert!(answer.contains("\"choices\""), "{pod}: {answer}");
    }
    // The API listens on the pod's loopback only: not on the pod's address.
    let ip = jsonpath(ns, &format!("pod/{}", pods[0]), "{.status.podIP}");
    let outside = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(format!("{ip}:8080")),
    )
    .await;
    assert!(
        !matches!(outside, Ok(Ok(_))),
        "the sidecar's API answers on {ip}:8080"
    );
    println!(
        "sidecar: 2 app pods with a proxy each Ready {:.1} s after apply; each app got an \
         answer from 127.0.0.1:8080",
        ready.as_secs_f64()
    );
}

/// Standard base64 (for a Secret's `data`).
fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
