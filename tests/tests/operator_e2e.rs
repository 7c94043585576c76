//! The control plane end to end: a real kube-apiserver (started by `make test`), the real
//! operator, two real proxies, kubectl and the official OpenAI Python SDK.
//!
//! The tests share one apiserver and each runs its own operator, so they run one at a time
//! (a lock below), each in namespaces of its own.

use std::time::{Duration, Instant};

use http::StatusCode;
use modelgate_tests::harness::*;
use modelgate_tests::k8s::*;
use modelgate_tests::upstream::MockUpstream;
use serde_json::json;

/// Tests take turns: each runs its own operator against the shared apiserver.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Each test gives team-a a raw key of its own: two ApiKeys with one raw key are refused.
fn team_a_key(ns: &str) -> String {
    format!("sk-{ns}-team-a-0123456789")
}

/// Take this test's turn; the CRDs are in place before any operator starts.
/// One operator (leader of `ns`'s lease) and two proxies following it.
/// The proxies authenticate as the gateway ServiceAccount of `ns` (a TokenRequest token).
fn operator_and_two_proxies(ns: &str) -> (Operator, Proxy, Proxy) {
    let op = Operator::start(ns, "op-a");
    let token = gateway_token(ns);
    let p1 = Proxy::follow(&op, &token, "proxy-1");
    let p2 = Proxy::follow(&op, &token, "proxy-2");
    (op, p1, p2)
}

async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    let guard = SERIAL.lock().await;
    install_crds();
    guard
}

fn apply_examples(ns: &str) {
    install_crds();
    kubectl_ok(
        &[
            "apply",
            "-n",
            ns,
            "-f",
            &repo_root().join("examples/k8s").display().to_string(),
        ],
        None,
    );
    let secret = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: team-a-key, labels: {{modelgate.dev/credential: \"true\"}}}}\nstringData: {{key: {}}}\n",
        team_a_key(ns)
    );
    kubectl_ok(&["apply", "-n", ns, "-f", "-"], Some(&secret));
}

/// An object of this test's namespace in a proxy's `/config` summary.
async fn summary(p: &Proxy, list: &str, ns: &str, name: &str) -> serde_json::Value {
    let cfg = get(&p.admin_url("/config"), None).await.json();
    cfg["snapshot"][list]
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|o| o["namespace"] == ns && o["name"] == name)
                .cloned()
        })
        .unwrap_or_default()
}

async fn wait_programmed(ns: &str, what: &str, proxies: usize) {
    eventually(
        Duration::from_secs(30),
        &format!("{what} Programmed on {proxies} proxies"),
        || async {
            condition(ns, what, "Programmed") == "True"
                && jsonpath(
                    ns,
                    what,
                    "{.status.conditions[?(@.type==\"Programmed\")].message}",
                )
                .starts_with(&format!("all {proxies} connected proxies"))
        },
    )
    .await;
}

async fn proxy_version(p: &Proxy) -> String {
    p.version().await.unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn examples_become_programmed_and_changes_reach_both_proxies_fast() {
    let _serial = serial().await;
    let ns = Namespace::new("e2e-examples");
    let (op, p1, p2) = operator_and_two_proxies(&ns.0);
    apply_examples(&ns.0);

    wait_programmed(&ns.0, "modelroute/chat", 2).await;
    assert_eq!(condition(&ns.0, "modelroute/chat", "Accepted"), "True");
    assert_eq!(
        jsonpath(&ns.0, "modelroute/chat", "{.status.observedGeneration}"),
        "1"
    );
    let table = kubectl_ok(&["get", "modelroutes", "-n", &ns.0], None);
    assert!(table.contains("chat") && table.contains("True"), "{table}");

    // The minted key: a Secret owned by the ApiKey, named in its status.
    eventually(Duration::from_secs(30), "team-b minted", || async {
        condition(&ns.0, "apikey/team-b", "Accepted") == "True"
    })
    .await;
    assert_eq!(
        jsonpath(&ns.0, "apikey/team-b", "{.status.secretName}"),
        "team-b-modelgate-key"
    );
    let owner = jsonpath(
        &ns.0,
        "secret/team-b-modelgate-key",
        "{.metadata.ownerReferences[0].name}",
    );
    assert_eq!(owner, "team-b");

    // The official SDK through each proxy.
    for p in [&p1, &p2] {
        let answer = tokio::task::spawn_blocking({
            let base = p.url("/v1");
            let key = team_a_key(&ns.0);
            move || sdk_chat(&base, &key, "gpt-4o-mini")
        })
        .await
        .unwrap()
        .expect("chat through the proxy");
        assert!(
            answer.starts_with("Hello from the modelgate mock model"),
            "{answer}"
        );
    }
    // Raw keys never reach a proxy; credentials do, but never its logs or /config.
    for p in [&p1, &p2] {
        let cfg = get(&p.admin_url("/config"), None).await.text();
        assert!(
            !cfg.contains(&team_a_key(&ns.0)) && !cfg.contains("sk-replace-with"),
            "{cfg}"
        );
        assert!(
            !p.log_text().contains(&team_a_key(&ns.0)) && !p.log_text().contains("sk-replace-with")
        );
    }

    // Change a weight and wait until both proxies run a snapshot with it. The time it took is
    // printed, not asserted: on a loaded machine a wall-clock target only measures the load.
    async fn weights(p: &Proxy, ns: &str) -> Vec<u64> {
        summary(p, "routes", ns, "chat").await["backends"]
            .as_array()
            .map(|b| b.iter().filter_map(|b| b["weight"].as_u64()).collect())
            .unwrap_or_default()
    }
    assert_eq!(weights(&p1, &ns.0).await, vec![80, 20, 1]);
    let started = Instant::now();
    kubectl_ok(
        &[
            "patch",
            "modelroute",
            "chat",
            "-n",
            &ns.0,
            "--type=json",
            "-p",
            r#"[{"op":"replace","path":"/spec/backends/1/weight","value":60}]"#,
        ],
        None,
    );
    eventually(
        Duration::from_secs(20),
        "both proxies serve the new weight",
        || async {
            weights(&p1, &ns.0).await == vec![80, 60, 1]
                && weights(&p2, &ns.0).await == vec![80, 60, 1]
        },
    )
    .await;
    let took = started.elapsed();
    println!(
        "PROPAGATION kubectl patch -> both proxies serving the new snapshot: {} ms",
        took.as_millis()
    );
    wait_programmed(&ns.0, "modelroute/chat", 2).await;
    assert_eq!(
        jsonpath(&ns.0, "modelroute/chat", "{.status.observedGeneration}"),
        "2"
    );

    let metrics = get(&format!("{}/metrics", op.admin_url), None).await.text();
    assert!(
        metric(&metrics, "modelgate_operator_connected_proxies", &[]) == 2.0,
        "{metrics}"
    );
    assert!(
        metric(
            &metrics,
            "modelgate_operator_push_to_ack_seconds_count",
            &[]
        ) >= 2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_keys_stop_working_and_bad_routes_are_reported() {
    let _serial = serial().await;
    let ns = Namespace::new("e2e-keys");
    let (_op, p1, p2) = operator_and_two_proxies(&ns.0);
    apply_examples(&ns.0);
    wait_programmed(&ns.0, "apikey/team-a", 2).await;
    for p in [&p1, &p2] {
        let r = p.chat(&team_a_key(&ns.0), "chat").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }

    // A route referencing a missing Secret: Accepted=False with a reason, an Event, and
    // the good route keeps working.
    let bad = r#"
apiVersion: modelgate.dev/v1alpha1
kind: ModelRoute
metadata: {name: broken}
spec:
  model: broken
  backends:
    - name: b
      provider: openai
      credentialsRef: {name: no-such-secret, key: api-key}
"#;
    kubectl_ok(&["apply", "-n", &ns.0, "-f", "-"], Some(bad));
    eventually(Duration::from_secs(20), "broken route rejected", || async {
        condition(&ns.0, "modelroute/broken", "Accepted") == "False"
    })
    .await;
    let reason = jsonpath(
        &ns.0,
        "modelroute/broken",
        "{.status.conditions[?(@.type==\"Accepted\")].reason}",
    );
    let message = jsonpath(
        &ns.0,
        "modelroute/broken",
        "{.status.conditions[?(@.type==\"Accepted\")].message}",
    );
    assert_eq!(reason, "SecretNotFound");
    assert!(message.contains("no-such-secret"), "{message}");
    eventually(Duration::from_secs(20), "a Warning event", || async {
        let ev = kubectl_ok(
            &[
                "get",
                "events",
                "-n",
                &ns.0,
                "--field-selector",
                "reason=SecretNotFound",
                "-o",
                "name",
            ],
            None,
        );
        !ev.trim().is_empty()
    })
    .await;
    let r = p1.chat(&team_a_key(&ns.0), "broken").await;
    assert_eq!(
        r.status,
        StatusCode::NOT_FOUND,
        "an invalid route is not served"
    );
    assert_eq!(
        p1.chat(&team_a_key(&ns.0), "chat").await.status,
        StatusCode::OK
    );

    // A duplicate model name: the younger route is refused.
    let dup = r#"
apiVersion: modelgate.dev/v1alpha1
kind: ModelRoute
metadata: {name: chat-copy}
spec:
  model: chat
  backends: [{name: m, provider: mock}]
"#;
    kubectl_ok(&["apply", "-n", &ns.0, "-f", "-"], Some(dup));
    eventually(Duration::from_secs(20), "duplicate refused", || async {
        jsonpath(
            &ns.0,
            "modelroute/chat-copy",
            "{.status.conditions[?(@.type==\"Accepted\")].reason}",
        ) == "DuplicateModel"
    })
    .await;

    // The schema refuses what it can at apply time.
    let invalid = r#"
apiVersion: modelgate.dev/v1alpha1
kind: ModelRoute
metadata: {name: negative}
spec:
  model: x
  timeout: soon
  backends: [{name: m, provider: telepathy, weight: -1}]
"#;
    let out = kubectl(&["apply", "-n", &ns.0, "-f", "-"], Some(invalid));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("spec.timeout") && err.contains("spec.backends"),
        "{err}"
    );

    // Delete the key: 401 on both proxies (how long it took is printed, not asserted).
    let started = Instant::now();
    kubectl_ok(
        &["delete", "apikey", "team-a", "-n", &ns.0, "--wait=false"],
        None,
    );
    eventually(Duration::from_secs(20), "401 on both proxies", || async {
        let mut all = true;
        for p in [&p1, &p2] {
            all &= p.chat(&team_a_key(&ns.0), "chat").await.status == StatusCode::UNAUTHORIZED;
        }
        all
    })
    .await;
    let took = started.elapsed();
    println!(
        "KEY-REVOCATION kubectl delete apikey -> 401 on both proxies: {} ms",
        took.as_millis()
    );
}

/// A change reverted (GitOps rolls back) compiles to a snapshot the proxies already ran: the
/// new generation is Programmed all the same. (Found on the cluster with real pods: a route
/// re-applied with its original weight stayed Pending forever.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reverted_change_is_programmed_at_its_new_generation() {
    let _serial = serial().await;
    let ns = Namespace::new("e2e-revert");
    let op = Operator::start(&ns.0, "op-a");
    let token = gateway_token(&ns.0);
    let _p = Proxy::follow(&op, &token, "proxy-1");
    apply_examples(&ns.0);
    wait_programmed(&ns.0, "modelroute/chat", 1).await;
    let weight = |w: u32| {
        kubectl_ok(
            &[
                "patch",
                "modelroute",
                "chat",
                "-n",
                &ns.0,
                "--type=json",
                "-p",
                &format!(r#"[{{"op":"replace","path":"/spec/backends/0/weight","value":{w}}}]"#),
            ],
            None,
        );
        jsonpath(&ns.0, "modelroute/chat", "{.metadata.generation}")
    };
    let programmed_at = |generation: String| {
        let ns = ns.0.clone();
        async move {
            eventually(
                Duration::from_secs(30),
                &format!("Programmed at generation {generation}"),
                || async {
                    jsonpath(
                        &ns,
                        "modelroute/chat",
                        r#"{.status.conditions[?(@.type=="Programmed")].observedGeneration} {.status.conditions[?(@.type=="Programmed")].status}"#,
                    ) == format!("{generation} True")
                },
            )
            .await
        }
    };
    programmed_at(weight(10)).await;
    // Back to the examples' weight: the snapshot of the first generation, again.
    programmed_at(weight(80)).await;
}

/// Behind a Service, every proxy may stream from a replica that does not lead: the leader,
/// with no proxy of its own, still reads their acknowledgements and writes Programmed. (Found
/// on the first cluster with real pods: both proxies on the follower, routes Pending forever.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_without_proxies_of_its_own_sees_the_fleet_apply_its_config() {
    let _serial = serial().await;
    let ns = Namespace::new("e2e-follower-fleet");
    let token = gateway_token(&ns.0);
    let leader = Operator::start(&ns.0, "op-a");
    let is_leader = |op: &Operator| {
        let url = format!("{}/metrics", op.admin_url);
        async move {
            metric(
                &get(&url, None).await.text(),
                "modelgate_operator_leader",
                &[],
            )
        }
    };
    eventually(Duration::from_secs(20), "op-a leads", || async {
        is_leader(&leader).await == 1.0
    })
    .await;
    let follower = Operator::start(&ns.0, "op-b");
    let p = Proxy::follow(&follower, &token, "proxy-1");
    apply_examples(&ns.0);
    wait_programmed(&ns.0, "modelroute/chat", 1).await;
    wait_programmed(&ns.0, "apikey/team-a", 1).await;
    assert_eq!(is_leader(&follower).await, 0.0, "op-b follows");
    let connected = |op: &Operator| {
        let url = format!("{}/metrics", op.admin_url);
        async move {
            metric(
                &get(&url, None).await.text(),
                "modelgate_operator_connected_proxies",
                &[],
            )
        }
    };
    assert_eq!(
        connected(&leader).await,
        0.0,
        "no proxy streams from the leader"
    );
    assert_eq!(connected(&follower).await, 1.0);
    let r = p.chat(&team_a_key(&ns.0), "chat").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_survive_the_operator_and_one_replica_leads() {
    let _serial = serial().await;
    let ns = Namespace::new("e2e-replicas");
    let token = gateway_token(&ns.0);
    let mut first = Operator::start(&ns.0, "op-a");
    let p1 = Proxy::follow(&first, &token, "proxy-1");
    apply_examples(&ns.0);
    wait_programmed(&ns.0, "modelroute/chat", 1).await;
    let version = proxy_version(&p1).await;

    // The operator dies: once the proxy has seen its stream break and a reconnect fail, it
    // still serves and stays ready.
    let config_addr = first.config_url.trim_start_matches("https://").to_owned();
    let failures = p1
        .metric("modelgate_operator_stream_failures_total", &[])
        .await;
    first.kill();
    eventually(
        Duration::from_secs(20),
        "the proxy lost the operator and failed to reconnect",
        || async {
            p1.metric("modelgate_operator_stream_failures_total", &[])
                .await
                >= failures + 2.0
        },
    )
    .await;
    let r = p1.chat(&team_a_key(&ns.0), "chat").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        get(&p1.admin_url("/readyz"), None).await.status,
        StatusCode::OK
    );

    // A change made while it is down; then it comes back at the same address (as behind a
    // Service) next to a second replica.
    kubectl_ok(
        &[
            "patch",
            "modelroute",
            "chat",
            "-n",
            &ns.0,
            "--type=json",
            "-p",
            r#"[{"op":"replace","path":"/spec/backends/0/weight","value":10}]"#,
        ],
        None,
    );
    let a = Operator::start_on(&ns.0, "op-a", &config_addr);
    let b = Operator::start(&ns.0, "op-b");
    let p2 = Proxy::follow(&b, &token, "proxy-2");
    eventually(
        Duration::from_secs(20),
        "the proxies resync to the new version",
        || async {
            let (v1, v2) = (proxy_version(&p1).await, proxy_version(&p2).await);
            v1 != version && v1 == v2
        },
    )
    .await;
    // Programmed counts the proxies of both replicas.
    wait_programmed(&ns.0, "modelroute/chat", 2).await;

    let leader = |m: &str| metric(m, "modelgate_operator_leader", &[]);
    let writes = |m: &str| metric(m, "modelgate_operator_status_writes_total", &[]);
    let (ma, mb) = (
        get(&format!("{}/metrics", a.admin_url), None).await.text(),
        get(&format!("{}/metrics", b.admin_url), None).await.text(),
    );
    assert_eq!(leader(&ma) + leader(&mb), 1.0, "exactly one leader");
    let (lead, follow) = if leader(&ma) == 1.0 {
        (&ma, &mb)
    } else {
        (&mb, &ma)
    };
    assert!(writes(lead) > 0.0, "the leader writes status");
    assert_eq!(writes(follow), 0.0, "the other replica never writes status");
}

/// A route `metered` to `url` and an ApiKey `capped` (raw key `raw`) with a daily budget.
fn metered_key(raw: &str, url: &str, tokens_per_day: u64) -> String {
    format!(
        r#"
apiVersion: v1
kind: Secret
metadata: {{name: capped-key, labels: {{modelgate.dev/credential: "true"}}}}
stringData: {{key: {raw}}}
---
apiVersion: modelgate.dev/v1alpha1
kind: ModelRoute
metadata: {{name: metered}}
spec:
  model: metered
  backends:
    - name: up
      provider: openai-compatible
      url: "{url}"
---
apiVersion: modelgate.dev/v1alpha1
kind: ApiKey
metadata: {{name: capped}}
spec:
  secretRef: {{name: capped-key, key: key}}
  budget: {{tokens: {tokens_per_day}, period: day}}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_used_up_through_one_proxy_holds_on_the_other() {
    let _serial = serial().await;
    let ns = Namespace::new("e2e-budget");
    let up = MockUpstream::start();
    let (_op, p1, p2) = operator_and_two_proxies(&ns.0);
    let raw = "sk-budget-e2e-0123456789";
    // Each answer reports 50 prompt + 5 completion tokens: one request uses the budget.
    let manifests = metered_key(raw, &up.url("id=budget;prompt_tokens=50;chunks=5"), 50);
    kubectl_ok(&["apply", "-n", &ns.0, "-f", "-"], Some(&manifests));
    wait_programmed(&ns.0, "apikey/capped", 2).await;

    let mut body = chat("metered", false);
    body["max_tokens"] = json!(10);
    let r = post(&p1.url("/v1/chat/completions"), Some(raw), &body).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());

    // p1 reports, the leader sums it into status, every proxy learns the key is exhausted.
    eventually(
        Duration::from_secs(20),
        "usage in ApiKey status",
        || async { jsonpath(&ns.0, "apikey/capped", "{.status.usage.tokens}") == "55" },
    )
    .await;
    eventually(
        Duration::from_secs(20),
        "p2 refuses the exhausted key",
        || async { summary(&p2, "keys", &ns.0, "capped").await["exhausted"] == json!(true) },
    )
    .await;
    let r = post(&p2.url("/v1/chat/completions"), Some(raw), &body).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text());
    assert_eq!(r.error_code(), "budget_exceeded");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("across the gateway")
    );
    assert_eq!(up.hits("budget"), 1, "p2 never forwarded a request");
    let table = kubectl_ok(&["get", "apikeys", "-n", &ns.0], None);
    assert!(table.contains("55"), "usage shows in kubectl get: {table}");
}

/// A proxy that restarts starts from what the fleet spent, not from zero. Three proxies; a
/// key spends 165 of its 200 tokens through one of them; another restarts and refuses a
/// request that would take the key past its budget, although the key is not exhausted yet.
/// (The bound that remains, stated in the README: each proxy admits against the fleet's
/// figure as of its last snapshot plus its own count, so the fleet can overshoot by what it
/// spends within one report interval, until the operator marks the key exhausted.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_proxy_starts_from_the_fleets_spending() {
    let _serial = serial().await;
    let ns = Namespace::new("e2e-fleet-budget");
    let up = MockUpstream::start();
    let (op, p1, _p2) = operator_and_two_proxies(&ns.0);
    let token = gateway_token(&ns.0);
    let p3 = Proxy::follow(&op, &token, "proxy-3");
    let raw = "sk-fleet-budget-0123456789";
    // Each answer reports 50 prompt + 5 completion tokens.
    let manifests = metered_key(raw, &up.url("id=fleet;prompt_tokens=50;chunks=5"), 200);
    kubectl_ok(&["apply", "-n", &ns.0, "-f", "-"], Some(&manifests));
    wait_programmed(&ns.0, "apikey/capped", 3).await;

    let mut body = chat("metered", false);
    body["max_tokens"] = json!(10);
    for _ in 0..3 {
        let r = post(&p1.url("/v1/chat/completions"), Some(raw), &body).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
    eventually(
        Duration::from_secs(20),
        "165 tokens in ApiKey status",
        || async { jsonpath(&ns.0, "apikey/capped", "{.status.usage.tokens}") == "165" },
    )
    .await;

    // proxy-3's pod restarts: a new process with the same id and nothing counted.
    drop(p3);
    let p3 = Proxy::follow(&op, &token, "proxy-3");
    eventually(
        Duration::from_secs(20),
        "proxy-3 has a snapshot",
        || async { !summary(&p3, "keys", &ns.0, "capped").await.is_null() },
    )
    .await;
    assert_eq!(
        summary(&p3, "keys", &ns.0, "capped").await["exhausted"],
        json!(false),
        "the key is not exhausted: the refusal below comes from the fleet's figure"
    );
    body["max_tokens"] = json!(50);
    let r = post(&p3.url("/v1/chat/completions"), Some(raw), &body).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text());
    assert_eq!(r.error_code(), "budget_exceeded");
    let message = r.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(message.contains("(165 used"), "{message}");
    assert_eq!(up.hits("fleet"), 3, "the restarted proxy forwarded nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_leader_hands_the_lease_over_at_once() {
    let _serial = serial().await;
    let ns = Namespace::new("e2e-handover");
    // A long lease: without a hand-over the other replica would wait 60 s for it to expire.
    let start = |identity: &str| {
        Operator::launch(OperatorConfig {
            lease_duration: "60s".into(),
            ..OperatorConfig::new(&ns.0, identity)
        })
    };
    let mut a = start("op-a");
    eventually(Duration::from_secs(30), "op-a leads", || async {
        jsonpath(&ns.0, "lease/modelgate-operator", "{.spec.holderIdentity}") == "op-a"
    })
    .await;
    let b = start("op-b");
    a.terminate();
    assert!(
        a.log_text().contains("released the leader Lease"),
        "{}",
        a.log_text()
    );
    eventually(
        Duration::from_secs(30),
        "op-b leads well before the 60 s lease would have expired",
        || async {
            jsonpath(&ns.0, "lease/modelgate-operator", "{.spec.holderIdentity}") == "op-b"
        },
    )
    .await;
    eventually(Duration::from_secs(20), "op-b reports leading", || async {
        b.metric("modelgate_operator_leader", &[]).await == 1.0
    })
    .await;
}

/// A ModelRoute's `cache` and `masking` through the real apiserver: the CRD's schema takes
/// them, the operator compiles them, and both proxies enforce them (a card number blocked,
/// e-mail addresses redacted, so two prompts that differ only in the address share one cache
/// entry). A pattern that does not compile is refused with a condition naming its path, and
/// the good route keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routes_cache_and_masking_reach_both_proxies_and_a_bad_pattern_is_named() {
    let _serial = serial().await;
    let ns = Namespace::new("e2e-policies");
    let (_op, p1, p2) = operator_and_two_proxies(&ns.0);
    apply_examples(&ns.0);
    // team-a may use "gpt-4o-*".
    let route = r#"
apiVersion: modelgate.dev/v1alpha1
kind: ModelRoute
metadata: {name: faq}
spec:
  model: gpt-4o-faq
  cache: {ttl: 10m}
  masking:
    rules:
      - {name: no-cards, detector: credit-card, action: block}
      - {name: emails, detector: email}
  backends:
    - {name: m, provider: mock, mock: {latency: 1ms, outputTokens: 8}}
"#;
    kubectl_ok(&["apply", "-n", &ns.0, "-f", "-"], Some(route));
    wait_programmed(&ns.0, "modelroute/faq", 2).await;
    let key = team_a_key(&ns.0);
    let ask = |text: &str| json!({"model": "gpt-4o-faq", "messages": [{"role": "user", "content": text}]});
    for p in [&p1, &p2] {
        let url = p.url("/v1/chat/completions");
        let first = post(&url, Some(&key), &ask("Mail ann@example.com the list")).await;
        assert_eq!(first.status, StatusCode::OK, "{}", first.text());
        assert_eq!(first.header("x-modelgate-cache"), Some("miss"));
        let again = post(&url, Some(&key), &ask("Mail bob@example.com the list")).await;
        assert_eq!(again.status, StatusCode::OK, "{}", again.text());
        assert_eq!(
            again.header("x-modelgate-cache"),
            Some("hit"),
            "the masked request's entry"
        );
        let card = post(&url, Some(&key), &ask("card 4111 1111 1111 1111")).await;
        assert_eq!(card.status, StatusCode::BAD_REQUEST, "{}", card.text());
        assert_eq!(card.error_code(), "masking_blocked");
        assert!(!card.text().contains("4111"), "{}", card.text());
    }

    let bad = r#"
apiVersion: modelgate.dev/v1alpha1
kind: ModelRoute
metadata: {name: faq-bad}
spec:
  model: gpt-4o-faq-bad
  masking:
    rules:
      - {name: broken, pattern: "(unclosed"}
  backends: [{name: m, provider: mock}]
"#;
    kubectl_ok(&["apply", "-n", &ns.0, "-f", "-"], Some(bad));
    eventually(Duration::from_secs(20), "bad pattern refused", || async {
        condition(&ns.0, "modelroute/faq-bad", "Accepted") == "False"
    })
    .await;
    let message = jsonpath(
        &ns.0,
        "modelroute/faq-bad",
        "{.status.conditions[?(@.type==\"Accepted\")].message}",
    );
    assert!(
        message.contains("masking.rules[0] (broken).pattern"),
        "{message}"
    );
    let r = post(
        &p1.url("/v1/chat/completions"),
        Some(&key),
        &ask("Mail ann@example.com the list"),
    )
    .await;
    assert_eq!(r.header("x-modelgate-cache"), Some("hit"));
}
