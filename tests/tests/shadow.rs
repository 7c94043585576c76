//! Shadow traffic end to end: a route mirrors its requests to a candidate backend; clients
//! (the official OpenAI Python SDK) get the primary's answers only, the candidate's calls
//! are recorded beside the primary's (`modelgate_backend_*`, `shadow="true"`), and a
//! candidate that hangs or fails never delays, fails or limits the primary's requests.

use std::time::Duration;

use http::StatusCode;
use modelgate_tests::harness::*;
use modelgate_tests::upstream::MockUpstream;
use serde_json::json;

const METERED: &str = "sk-test-shadow-metered";
const SINGLE: &str = "sk-test-shadow-single";

/// Calls through the OpenAI SDK: each of `calls` (`{"key", "model", "stream"}`) prints one
/// JSON line with its status, the answering backend (`x-modelgate-backend`), the text and
/// the usage the client got, and the rate-limit headers.
const SDK_CALLS: &str = r#"
import json, os, openai
base = os.environ["BASE"]
for call in json.loads(os.environ["CALLS"]):
    c = openai.OpenAI(base_url=base, api_key=call["key"], max_retries=0, timeout=30)
    args = dict(model=call["model"], messages=[{"role": "user", "content": "Say hello"}])
    try:
        if call.get("stream"):
            raw = c.chat.completions.with_raw_response.create(
                stream=True, stream_options={"include_usage": True}, **args)
            text, usage = "", None
            for chunk in raw.parse():
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                if chunk.usage:
                    usage = chunk.usage.model_dump()
        else:
            raw = c.chat.completions.with_raw_response.create(**args)
            r = raw.parse()
            text, usage = r.choices[0].message.content, r.usage.model_dump()
        print(json.dumps({"status": raw.status_code, "backend": raw.headers.get("x-modelgate-backend"),
                          "remaining": raw.headers.get("x-ratelimit-remaining-requests"),
                          "text": text, "usage": usage}))
    except openai.APIStatusError as e:
        print(json.dumps({"status": e.status_code, "body": e.body}))
"#;

fn sdk_calls(base: &str, calls: &serde_json::Value) -> Vec<serde_json::Value> {
    python_json_lines(SDK_CALLS, &[("BASE", base), ("CALLS", &calls.to_string())])
}

async fn calls(p: &Proxy, calls: serde_json::Value) -> Vec<serde_json::Value> {
    let base = p.url("/v1");
    tokio::task::spawn_blocking(move || sdk_calls(&base, &calls))
        .await
        .unwrap()
}

fn recorded_config(up: &MockUpstream) -> String {
    format!(
        r#"
routes:
  - name: chat
    model: chat
    retries: {{attempts: 0}}
    backends:
      - {{name: primary, provider: openai-compatible, url: "{primary}", model: gpt-old, pricing: {{inputPerMillion: 1, outputPerMillion: 10}}}}
    shadow:
      backend: {{name: candidate, provider: openai-compatible, url: "{candidate}", model: gpt-next, pricing: {{inputPerMillion: 2, outputPerMillion: 20}}}}
  - name: unsampled
    model: unsampled
    backends:
      - {{name: primary, provider: openai-compatible, url: "{primary}"}}
    shadow:
      percent: 0
      backend: {{name: candidate, provider: openai-compatible, url: "{quiet}"}}
  - name: guarded
    model: guarded
    maxCostPerRequest: 0.05
    backends:
      - {{name: primary, provider: openai-compatible, url: "{primary}", pricing: {{inputPerMillion: 1, outputPerMillion: 10}}}}
    shadow:
      # 1024 output tokens at $100 a million: above the route's guard, so never mirrored.
      backend: {{name: candidate, provider: openai-compatible, url: "{quiet}", pricing: {{inputPerMillion: 1, outputPerMillion: 100}}}}
keys:
  - {{name: metered, sha256: {metered}, limits: {{requestsPerMinute: 3, tokensPerMinute: 4000}}}}
  - {{name: demo, sha256: {demo}}}
"#,
        // The primary reports 10 prompt and 5 completion tokens per answer, the candidate 12
        // and 7.
        primary = up.url("id=primary"),
        candidate = up.url("id=candidate;prompt_tokens=12;chunks=7"),
        quiet = up.url("id=quiet"),
        metered = sha256_hex(METERED),
        demo = sha256_hex(DEMO_KEY),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_is_recorded_beside_the_primary_and_clients_get_the_primarys_answers() {
    let up = MockUpstream::start();
    let p = Proxy::start(&recorded_config(&up));

    let got = calls(
        &p,
        json!([
            {"key": METERED, "model": "chat"},
            {"key": METERED, "model": "chat", "stream": true},
            {"key": METERED, "model": "chat"},
            {"key": METERED, "model": "chat"},
        ]),
    )
    .await;
    // The primary's answers, whole and streamed, with the primary's usage.
    for (i, r) in got[..3].iter().enumerate() {
        assert_eq!(r["status"], 200, "{r}");
        assert_eq!(r["backend"], "primary", "{r}");
        assert_eq!(r["usage"]["prompt_tokens"], 10, "{r}");
        assert_eq!(r["usage"]["completion_tokens"], 5, "{r}");
        assert!(!r["text"].as_str().unwrap().is_empty(), "call {i}: {r}");
    }
    // The key's limits count the primary's requests only: 3 a minute, the 4th refused.
    let remaining: Vec<_> = got[..3].iter().map(|r| r["remaining"].clone()).collect();
    assert_eq!(remaining, vec![json!("2"), json!("1"), json!("0")]);
    assert_eq!(got[3]["status"], 429, "{}", got[3]);

    // Three mirrored calls, each with the candidate's own model name; the stream's asks
    // for its usage like the primary's would.
    eventually(
        Duration::from_secs(10),
        "three shadow calls recorded",
        || async {
            p.metric(
                "modelgate_backend_requests_total",
                &[("shadow", "true"), ("outcome", "ok")],
            )
            .await
                == 3.0
        },
    )
    .await;
    assert_eq!(up.hits("primary"), 3);
    assert_eq!(up.hits("candidate"), 3);
    let body = up
        .counters("candidate")
        .last_body
        .lock()
        .unwrap()
        .clone()
        .unwrap();
    assert_eq!(body["model"], "gpt-next");
    assert_eq!(body["messages"][0]["content"], "Say hello");

    let m = p.metrics().await;
    let side = |name: &str, backend: &str, shadow: &str, extra: &[(&str, &str)]| {
        let mut labels = vec![
            ("route", "default/chat"),
            ("backend", backend),
            ("shadow", shadow),
        ];
        labels.extend_from_slice(extra);
        metric(&m, name, &labels)
    };
    let requests = "modelgate_backend_requests_total";
    let tokens = "modelgate_backend_tokens_total";
    assert_eq!(
        side(requests, "primary", "false", &[("outcome", "ok")]),
        3.0,
        "{m}"
    );
    assert_eq!(
        side(requests, "candidate", "true", &[("outcome", "ok")]),
        3.0
    );
    assert_eq!(side(tokens, "primary", "false", &[("kind", "input")]), 30.0);
    assert_eq!(
        side(tokens, "primary", "false", &[("kind", "output")]),
        15.0
    );
    assert_eq!(
        side(tokens, "candidate", "true", &[("kind", "input")]),
        36.0
    );
    assert_eq!(
        side(tokens, "candidate", "true", &[("kind", "output")]),
        21.0
    );
    let cost = side("modelgate_backend_cost_usd_total", "candidate", "true", &[]);
    assert!(
        (cost - 3.0 * (12.0 * 2.0 + 7.0 * 20.0) / 1e6).abs() < 1e-12,
        "{cost}"
    );
    assert_eq!(
        side(
            "modelgate_backend_request_duration_seconds_count",
            "candidate",
            "true",
            &[]
        ),
        3.0
    );
    assert_eq!(
        side(
            "modelgate_backend_request_duration_seconds_count",
            "primary",
            "false",
            &[]
        ),
        3.0
    );
    // Nothing of the shadow in the key's series: its tokens, requests and cost are the
    // primary's.
    let key = [("key", "default/metered")];
    assert_eq!(metric(&m, "modelgate_tokens_total", &key), 45.0);
    assert_eq!(
        metric(
            &m,
            "modelgate_requests_total",
            &[("key", "default/metered"), ("status", "200")]
        ),
        3.0
    );
    assert!(
        (metric(&m, "modelgate_cost_usd_total", &key) - 3.0 * 60e-6).abs() < 1e-12,
        "{m}"
    );
    assert!(!m.contains("backend=\"candidate\",key="), "{m}");

    // Percent 0 mirrors nothing; a shadow whose worst case is above the route's guard is
    // skipped, and the client does not notice either.
    for model in ["unsampled", "guarded"] {
        assert_eq!(p.chat(DEMO_KEY, model).await.status, StatusCode::OK);
    }
    let m = p.metrics().await;
    assert_eq!(
        metric(
            &m,
            "modelgate_shadow_skipped_total",
            &[("route", "default/guarded"), ("reason", "cost_guard")]
        ),
        1.0,
        "{m}"
    );
    assert_eq!(up.hits("quiet"), 0);
    assert_eq!(
        metric(
            &m,
            "modelgate_backend_requests_total",
            &[("route", "default/unsampled"), ("shadow", "false")]
        ),
        1.0,
        "a route with a shadow records its primary side even when nothing is sampled"
    );
    promtool_check(&m);
}

fn faulty_config(up: &MockUpstream) -> String {
    format!(
        r#"
routes:
  - name: hang
    model: hang
    backends:
      - {{name: primary, provider: openai-compatible, url: "{primary}"}}
    shadow:
      backend: {{name: candidate, provider: openai-compatible, url: "{hang}"}}
      # Longer than this test: the calls still hang when it looks.
      timeout: 10m
      maxInFlight: 2
  - name: silent
    model: silent
    backends:
      - {{name: primary, provider: openai-compatible, url: "{primary}"}}
    shadow:
      backend: {{name: candidate, provider: openai-compatible, url: "{silent}"}}
      timeout: 1s
  - name: failing
    model: failing
    backends:
      - {{name: primary, provider: openai-compatible, url: "{primary}"}}
    shadow:
      backend: {{name: candidate, provider: openai-compatible, url: "{failing}"}}
keys:
  - {{name: single, sha256: {single}, limits: {{maxConcurrent: 1}}}}
"#,
        primary = up.url("id=primary"),
        hang = up.url("id=hang;hang=1"),
        silent = up.url("id=silent;silent=1"),
        failing = up.url("id=failing;status=500"),
        single = sha256_hex(SINGLE),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_or_failing_shadow_never_delays_fails_or_limits_the_primary() {
    let up = MockUpstream::start();
    let p = Proxy::start(&faulty_config(&up));
    let in_flight = |route: &'static str| {
        let p = &p;
        async move {
            p.metric(
                "modelgate_shadow_in_flight",
                &[("route", route), ("backend", "candidate")],
            )
            .await
        }
    };

    // A candidate that never answers. The key may have one request in flight: every
    // request is answered while the shadow calls still hang, so they hold none of its slot.
    let got = calls(
        &p,
        json!([
            {"key": SINGLE, "model": "hang", "stream": true},
            {"key": SINGLE, "model": "hang"},
            {"key": SINGLE, "model": "hang"},
            {"key": SINGLE, "model": "hang", "stream": true},
        ]),
    )
    .await;
    for r in &got {
        assert_eq!(r["status"], 200, "{r}");
        assert_eq!(r["backend"], "primary");
        assert!(!r["text"].as_str().unwrap().is_empty(), "{r}");
    }
    eventually(
        Duration::from_secs(10),
        "two shadows at the candidate",
        || async { up.hits("hang") == 2 },
    )
    .await;
    // Answered, and the candidate still holds both calls: at most maxInFlight of them,
    // the others skipped.
    let m = p.metrics().await;
    assert_eq!(in_flight("default/hang").await, 2.0, "{m}");
    assert_eq!(
        metric(
            &m,
            "modelgate_shadow_skipped_total",
            &[("route", "default/hang"), ("reason", "max_in_flight")]
        ),
        2.0,
        "{m}"
    );
    assert_eq!(up.hits("primary"), 4);
    assert_eq!(
        metric(
            &m,
            "modelgate_backend_requests_total",
            &[
                ("route", "default/hang"),
                ("shadow", "false"),
                ("outcome", "ok")
            ],
        ),
        4.0
    );

    // A candidate that sends its headers and then nothing: drained until its timeout, then
    // let go (the upstream sees the call cancelled) and recorded as a timeout; its slot
    // comes back. The primary is untouched.
    let got = calls(
        &p,
        json!([{"key": SINGLE, "model": "silent", "stream": true}]),
    )
    .await;
    assert_eq!(got[0]["status"], 200, "{}", got[0]);
    eventually(
        Duration::from_secs(15),
        "the silent shadow let go",
        || async {
            up.counters("silent")
                .cancelled
                .load(std::sync::atomic::Ordering::SeqCst)
                == 1
        },
    )
    .await;
    eventually(Duration::from_secs(5), "recorded as a timeout", || async {
        p.metric(
            "modelgate_backend_requests_total",
            &[
                ("route", "default/silent"),
                ("shadow", "true"),
                ("outcome", "timeout"),
            ],
        )
        .await
            == 1.0
    })
    .await;
    assert_eq!(in_flight("default/silent").await, 0.0);

    // A candidate that fails: the client never sees it; it is recorded as an error, not
    // retried, and counts in no error series of the primary.
    let got = calls(
        &p,
        json!([
            {"key": SINGLE, "model": "failing"},
            {"key": SINGLE, "model": "failing", "stream": true},
        ]),
    )
    .await;
    for r in &got {
        assert_eq!(r["status"], 200, "{r}");
        assert_eq!(r["backend"], "primary");
    }
    eventually(
        Duration::from_secs(10),
        "the failed shadows recorded",
        || async {
            p.metric(
                "modelgate_backend_requests_total",
                &[
                    ("route", "default/failing"),
                    ("shadow", "true"),
                    ("outcome", "error"),
                ],
            )
            .await
                == 2.0
        },
    )
    .await;
    assert_eq!(up.hits("failing"), 2);
    let m = p.metrics().await;
    assert_eq!(
        metric(&m, "modelgate_upstream_errors_total", &[]),
        0.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "modelgate_requests_total", &[("key", "default/single")]),
        7.0
    );
    assert_eq!(
        metric(
            &m,
            "modelgate_requests_total",
            &[("key", "default/single"), ("status", "200")]
        ),
        7.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_of_another_api_is_called_through_the_translators() {
    let up = MockUpstream::start();
    let yaml = format!(
        r#"
routes:
  - name: chat
    model: chat
    backends:
      - {{name: gpt, provider: openai-compatible, url: "{primary}"}}
    shadow:
      backend: {{name: claude, provider: anthropic, url: "{claude}", model: claude-next, credentials: {{env: SHADOW_TEST_ANTHROPIC_KEY}}, pricing: {{inputPerMillion: 3, outputPerMillion: 15, cacheReadPerMillion: 0.3}}}}
keys:
  - {{name: demo, sha256: {demo}}}
"#,
        primary = up.url("id=gpt"),
        claude = up.url("id=claude;cache_read=3;chunks=4"),
        demo = sha256_hex(DEMO_KEY),
    );
    let p = Proxy::start_with(
        &yaml,
        &[("SHADOW_TEST_ANTHROPIC_KEY", "sk-ant-shadow-test")],
    );
    let got = calls(
        &p,
        json!([
            {"key": DEMO_KEY, "model": "chat"},
            {"key": DEMO_KEY, "model": "chat", "stream": true},
        ]),
    )
    .await;
    for r in &got {
        assert_eq!(r["status"], 200, "{r}");
        assert_eq!(r["backend"], "gpt", "{r}");
    }
    eventually(
        Duration::from_secs(10),
        "both shadow calls recorded",
        || async {
            p.metric(
                "modelgate_backend_requests_total",
                &[("backend", "claude"), ("shadow", "true"), ("outcome", "ok")],
            )
            .await
                == 2.0
        },
    )
    .await;
    // Sent as Anthropic's Messages API, with the candidate's key and model, and the output
    // bound admission reserved for the primary (the proxy's default 1024).
    let c = up.counters("claude");
    assert_eq!(c.last_path.lock().unwrap().as_deref(), Some("/v1/messages"));
    let headers = c.last_headers.lock().unwrap().clone().unwrap();
    assert_eq!(headers["x-api-key"], "sk-ant-shadow-test");
    let body = c.last_body.lock().unwrap().clone().unwrap();
    assert_eq!(body["model"], "claude-next");
    assert_eq!(body["max_tokens"], 1024);
    assert_eq!(body["stream"], true, "the last call was the streamed one");
    // Its usage read in its own dialect, whole and streamed: 10 input, 3 cache reads and 4
    // output tokens each.
    let m = p.metrics().await;
    let tokens = |kind: &str| {
        metric(
            &m,
            "modelgate_backend_tokens_total",
            &[("backend", "claude"), ("shadow", "true"), ("kind", kind)],
        )
    };
    assert_eq!(
        (tokens("input"), tokens("cache_read"), tokens("output")),
        (20.0, 6.0, 8.0),
        "{m}"
    );
    let cost = metric(
        &m,
        "modelgate_backend_cost_usd_total",
        &[("backend", "claude"), ("shadow", "true")],
    );
    assert!(
        (cost - 2.0 * (10.0 * 3.0 + 3.0 * 0.3 + 4.0 * 15.0) / 1e6).abs() < 1e-12,
        "{cost}"
    );
    // The candidate's key is nowhere in what the proxy shows.
    for text in [&m, &p.log_text()] {
        assert!(!text.contains("sk-ant-shadow-test"));
    }
}

/// The expressions of the README's `promql` blocks, block by block (one per line; `#`
/// lines are comments).
fn readme_queries() -> Vec<Vec<String>> {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let mut blocks = Vec::new();
    let mut current: Option<Vec<String>> = None;
    for line in readme.lines() {
        match (&mut current, line.trim()) {
            (None, "```promql") => current = Some(Vec::new()),
            (Some(_), "```") => blocks.push(current.take().unwrap()),
            (Some(b), l) if !l.is_empty() && !l.starts_with('#') => b.push(l.to_owned()),
            _ => {}
        }
    }
    blocks
}

/// The README's recipe on a real Prometheus: its queries give both versions' figures
/// during the shadow step (`shadow` "false" and "true") and during the weighted steps (by
/// backend), and its cost queries give figures by key, route and backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readmes_queries_compare_the_versions_in_prometheus() {
    let blocks = readme_queries();
    assert_eq!(blocks.len(), 3, "shadow, weighted steps, cost: {blocks:?}");
    let up = MockUpstream::start();
    let old = up.url("id=old");
    let key = |capped: bool| {
        format!(
            "  - {{name: {}, sha256: {}{}}}\n",
            if capped { "capped" } else { "demo" },
            sha256_hex(if capped { SINGLE } else { DEMO_KEY }),
            if capped {
                ", maxCostPerRequest: 0.000001"
            } else {
                ""
            }
        )
    };
    let keys = format!("keys:\n{}{}", key(false), key(true));
    // Step 1: the candidate as a shadow; its first call fails, and it is slow enough that
    // a burst finds its one slot busy.
    let shadowed = format!(
        r#"
routes:
  - name: chat
    model: chat
    backends:
      - {{name: gpt-4o, provider: openai-compatible, url: "{old}", pricing: {{inputPerMillion: 2.5, outputPerMillion: 10}}}}
    shadow:
      maxInFlight: 1
      backend: {{name: gpt-4o-next, provider: openai-compatible, url: "{next}", pricing: {{inputPerMillion: 2.5, outputPerMillion: 10}}}}
{keys}"#,
        next = up.url("id=next;fail_first=1;status=500;latency=1000;chunks=8"),
    );
    let p = Proxy::start(&shadowed);
    let prom = Prometheus::start(&[p.admin.to_string()]);
    let url = p.url("/v1/chat/completions");
    // One at a time, each mirrored: the candidate's first call fails, three succeed.
    for stream in [false, true, false, true] {
        let r = post(&url, Some(DEMO_KEY), &chat("chat", stream)).await;
        assert_eq!(r.status, StatusCode::OK);
        eventually(Duration::from_secs(10), "the shadow call done", || async {
            p.metric("modelgate_shadow_in_flight", &[]).await == 0.0
        })
        .await;
    }
    // A burst finds the one slot busy (each shadow call takes a second).
    let burst: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { post(&url, Some(DEMO_KEY), &chat("chat", false)).await })
        })
        .collect();
    for b in burst {
        assert_eq!(b.await.unwrap().status, StatusCode::OK);
    }
    // A request above a key's spend guard, for the cost block's last query.
    let r = post(&url, Some(SINGLE), &chat("chat", false)).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    let labels = |series: &[serde_json::Value], name: &str| -> Vec<String> {
        let mut v: Vec<String> = series
            .iter()
            .map(|s| s["metric"][name].as_str().unwrap_or("").to_owned())
            .collect();
        v.sort();
        v.dedup();
        v
    };
    for (i, q) in blocks[0].iter().enumerate() {
        let prom = &prom;
        eventually(
            Duration::from_secs(60),
            &format!("README query {q}"),
            || {
                let q = q.clone();
                async move {
                    let got = prom.query(&q).await;
                    let versions = labels(&got, "shadow");
                    // The skipped query has no shadow label; the error ratio sees the
                    // candidate's failure only; the others show both versions.
                    match i {
                        4 => !got.is_empty(),
                        0 => versions == ["true"] || versions == ["false", "true"],
                        _ => versions == ["false", "true"],
                    }
                }
            },
        )
        .await;
    }

    // Steps 2 and 3: the candidate takes weight under the same name; its first answer fails.
    let weighted = format!(
        r#"
routes:
  - name: chat
    model: chat
    retries: {{attempts: 0}}
    backends:
      - {{name: gpt-4o, provider: openai-compatible, url: "{old}", weight: 50, pricing: {{inputPerMillion: 2.5, outputPerMillion: 10}}}}
      - {{name: gpt-4o-next, provider: openai-compatible, url: "{next}", weight: 50, pricing: {{inputPerMillion: 2.5, outputPerMillion: 10}}}}
{keys}"#,
        next = up.url("id=next2;fail_first=1;status=500;chunks=8"),
    );
    let before = p.version().await;
    p.write_config(&weighted);
    eventually(
        Duration::from_secs(10),
        "the weighted step applied",
        || async { p.version().await != before },
    )
    .await;
    // Until each version answered a stream and the candidate failed once (weights are
    // random: a few dozen requests at most).
    let mut streamed = std::collections::HashSet::new();
    for n in 0..200 {
        let resp = post_stream(&url, Some(DEMO_KEY), &chat("chat", n % 2 == 0)).await;
        let backend = resp
            .headers()
            .get("x-modelgate-backend")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let status = resp.status();
        let _ = read(resp).await;
        if status == StatusCode::OK && n % 2 == 0 {
            streamed.insert(backend);
        }
        if streamed.len() == 2 && up.hits("next2") >= 2 {
            break;
        }
    }
    assert_eq!(streamed.len(), 2, "both versions answered streams");
    for q in &blocks[1] {
        let prom = &prom;
        eventually(
            Duration::from_secs(60),
            &format!("README query {q}"),
            || {
                let q = q.clone();
                async move {
                    let got = prom.query(&q).await;
                    // The failure queries see the candidate; the others both versions.
                    let backends = labels(&got, "backend");
                    backends == ["gpt-4o", "gpt-4o-next"] || backends == ["gpt-4o-next"]
                }
            },
        )
        .await;
    }
    for q in &blocks[2] {
        let prom = &prom;
        eventually(
            Duration::from_secs(60),
            &format!("README query {q}"),
            || {
                let q = q.clone();
                async move { !prom.query(&q).await.is_empty() }
            },
        )
        .await;
    }
}
