//! Admission under concurrency: reservations keep limits exact.

use std::time::Duration;

use http::StatusCode;
use modelgate_tests::harness::*;
use modelgate_tests::upstream::MockUpstream;
use serde_json::json;

const TPM: &str = "sk-test-tpm";
const CONC: &str = "sk-test-concurrent";
const BUDGET: &str = "sk-test-budget";

fn config(up: &MockUpstream) -> String {
    format!(
        r#"
routes:
  - name: r
    model: m
    retries: {{attempts: 0}}
    backends:
      - {{name: up, provider: openai-compatible, url: "{url}"}}
  - name: stuck
    model: stuck
    retries: {{attempts: 0}}
    backends:
      - {{name: up, provider: openai-compatible, url: "{hang}"}}
keys:
  - name: tpm
    sha256: {tpm}
    limits: {{tokensPerMinute: 1000}}
  - name: conc
    sha256: {conc}
    limits: {{maxConcurrent: 2}}
  - name: budget
    sha256: {budget}
    budget: {{tokens: 250, period: day}}
"#,
        // Each answer reports 10 prompt + 90 completion tokens = 100, after 300 ms.
        url = up.url("id=up;latency=300;chunks=90;prompt_tokens=10"),
        hang = up.url("id=stuck;hang=1"),
        tpm = sha256_hex(TPM),
        conc = sha256_hex(CONC),
        budget = sha256_hex(BUDGET),
    )
}

fn body() -> serde_json::Value {
    // Prompt estimate: the messages JSON is 32 bytes → 8 tokens; reserve 8 + 100 = 108.
    json!({"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]})
}

async fn burst(p: &Proxy, key: &'static str, n: usize) -> Vec<Reply> {
    let url = p.url("/v1/chat/completions");
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { post(&url, Some(key), &body()).await })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_never_overshoot_a_token_limit() {
    let up = MockUpstream::start();
    let p = Proxy::start(&config(&up));
    let replies = burst(&p, TPM, 40).await;
    let ok = replies
        .iter()
        .filter(|r| r.status == StatusCode::OK)
        .count();
    let limited: Vec<_> = replies
        .iter()
        .filter(|r| r.status == StatusCode::TOO_MANY_REQUESTS)
        .collect();
    assert_eq!(ok + limited.len(), 40);
    // 9 × 108 = 972 fits in 1000; a 10th reservation would not.
    assert_eq!(ok, 9, "admitted {ok} of 40 concurrent requests");
    for r in &limited {
        assert_eq!(r.error_code(), "rate_limit_exceeded");
        assert!(r.header("retry-after").is_some());
    }
    let m = p.metrics().await;
    let used = metric(&m, "modelgate_tokens_total", &[("key", "default/tpm")]);
    assert_eq!(used, 900.0);
    assert!(used <= 1000.0, "the limit was overshot: {used}");
    assert_eq!(
        up.hits("up"),
        9,
        "rejected requests never reached the upstream"
    );

    // Settling 108 → 100 per request freed 72 tokens: not enough for another 108.
    let r = post(&p.url("/v1/chat/completions"), Some(TPM), &body()).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    // A smaller request fits in what is left.
    let mut small = body();
    small["max_tokens"] = json!(50);
    let r = post(&p.url("/v1/chat/completions"), Some(TPM), &small).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.header("x-ratelimit-limit-tokens"), Some("1000"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrent_and_budgets_hold() {
    let up = MockUpstream::start();
    let p = Proxy::start(&config(&up));
    let url = p.url("/v1/chat/completions");
    // Six calls at once to an upstream that never answers: an admitted call holds its slot
    // until it is dropped, so the count cannot depend on how quickly the machine runs them.
    let mut held = body();
    held["model"] = json!("stuck");
    let calls: Vec<_> = (0..6)
        .map(|_| {
            let (url, held) = (url.clone(), held.clone());
            tokio::spawn(async move { post(&url, Some(CONC), &held).await })
        })
        .collect();
    eventually(
        Duration::from_secs(10),
        "every call refused or at the upstream",
        || async {
            calls.iter().filter(|c| c.is_finished()).count() as u64 + up.hits("stuck") == 6
        },
    )
    .await;
    assert_eq!(up.hits("stuck"), 2, "maxConcurrent: 2");
    let (refused, admitted): (Vec<_>, Vec<_>) = calls.into_iter().partition(|c| c.is_finished());
    for c in refused {
        assert_eq!(c.await.unwrap().status, StatusCode::TOO_MANY_REQUESTS);
    }
    // Slots come back when calls end (here: their clients leave).
    for c in admitted {
        c.abort();
    }
    eventually(Duration::from_secs(10), "the slots came back", || async {
        post(&url, Some(CONC), &body()).await.status == StatusCode::OK
    })
    .await;

    assert_eq!(
        post(&url, Some(BUDGET), &body()).await.status,
        StatusCode::OK
    );
    assert_eq!(
        post(&url, Some(BUDGET), &body()).await.status,
        StatusCode::OK
    );
    // 200 used + 108 reserved > 250.
    let r = post(&url, Some(BUDGET), &body()).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.error_code(), "budget_exceeded");
    assert_eq!(r.json()["error"]["type"], "insufficient_quota");
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=86_400).contains(&retry));
    let m = p.metrics().await;
    assert_eq!(
        metric(
            &m,
            "modelgate_limit_rejections_total",
            &[("key", "default/budget"), ("limit", "budget")]
        ),
        1.0
    );
}

const FIELDS: &str = "sk-test-fields";
const ONE: &str = "sk-test-one-at-a-time";

fn fields_config(up: &MockUpstream) -> String {
    format!(
        r#"
routes:
  - name: capped
    model: capped
    maxOutputTokens: 100
    retries: {{attempts: 0}}
    backends:
      - {{name: up, provider: openai-compatible, url: "{url}"}}
  - name: open
    model: open
    retries: {{attempts: 0}}
    backends:
      - {{name: up, provider: openai-compatible, url: "{url}"}}
  - name: stuck
    model: stuck
    retries: {{attempts: 0}}
    backends:
      - {{name: up, provider: openai-compatible, url: "{hang}"}}
keys:
  - name: fields
    sha256: {fields}
    limits: {{tokensPerMinute: 1000}}
  - name: one
    sha256: {one}
    limits: {{maxConcurrent: 1}}
"#,
        url = up.url("id=up"),
        hang = up.url("id=stuck;hang=1"),
        fields = sha256_hex(FIELDS),
        one = sha256_hex(ONE),
    )
}

/// `body()` with other output fields; the prompt estimate stays 8 tokens.
fn with(model: &str, fields: serde_json::Value) -> serde_json::Value {
    let mut b = json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
    for (k, v) in fields.as_object().unwrap() {
        b[k] = v.clone();
    }
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_fields_are_checked_and_reservations_never_overflow() {
    let up = MockUpstream::start();
    let p = Proxy::start(&fields_config(&up));
    let url = p.url("/v1/chat/completions");

    // Refused with a 400 that names the field: absurd, negative, fractional, zero choices.
    for (model, fields, param) in [
        ("open", json!({"max_tokens": u64::MAX - 3}), "max_tokens"),
        ("open", json!({"max_tokens": -1}), "max_tokens"),
        ("open", json!({"max_tokens": 1.5}), "max_tokens"),
        (
            "open",
            json!({"max_tokens": 10, "max_completion_tokens": u64::MAX}),
            "max_completion_tokens",
        ),
        ("open", json!({"n": 0}), "n"),
        ("open", json!({"n": u64::MAX}), "n"),
        // Above the route's ceiling, whichever field carries it.
        ("capped", json!({"max_tokens": 101}), "max_tokens"),
        (
            "capped",
            json!({"max_tokens": 10, "max_completion_tokens": 101}),
            "max_completion_tokens",
        ),
    ] {
        let r = post(&url, Some(FIELDS), &with(model, fields.clone())).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{fields}: {}", r.text());
        assert_eq!(r.error_code(), "invalid_value", "{fields}");
        assert_eq!(r.json()["error"]["param"], param, "{fields}");
        assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    }
    let r = post(
        &url,
        Some(FIELDS),
        &with("capped", json!({"max_tokens": 101})),
    )
    .await;
    assert!(r.text().contains("ceiling of 100"), "{}", r.text());

    // The reservation is the larger field times the choices, and it saturates: each of
    // these needs more than the 1000 tokens a minute this key has.
    for fields in [
        json!({"max_tokens": 4_294_967_295_u64, "n": 128}),
        json!({"max_tokens": 10, "max_completion_tokens": 995}),
        json!({"max_completion_tokens": 10, "max_tokens": 995}),
        json!({"max_tokens": 100, "n": 10}),
    ] {
        let r = post(&url, Some(FIELDS), &with("open", fields.clone())).await;
        assert_eq!(
            r.status,
            StatusCode::TOO_MANY_REQUESTS,
            "{fields}: {}",
            r.text()
        );
        assert_eq!(r.error_code(), "rate_limit_exceeded", "{fields}");
    }
    assert_eq!(up.hits("up"), 0, "nothing refused reached the upstream");

    // At the ceiling is fine; 8 + 100 × 9 = 908 fits in the minute.
    let r = post(
        &url,
        Some(FIELDS),
        &with("capped", json!({"max_tokens": 100})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let r = post(
        &url,
        Some(FIELDS),
        &with("open", json!({"max_tokens": 100, "n": 9})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(up.hits("up"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_mid_call_gives_its_concurrency_slot_back() {
    let up = MockUpstream::start();
    let p = Proxy::start(&fields_config(&up));
    let url = p.url("/v1/chat/completions");
    let stuck = {
        let url = url.clone();
        tokio::spawn(async move { post(&url, Some(ONE), &with("stuck", json!({}))).await })
    };
    eventually(
        Duration::from_secs(10),
        "the call reached the upstream",
        || async { up.hits("stuck") == 1 },
    )
    .await;
    let r = post(&url, Some(ONE), &with("open", json!({}))).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "the slot is taken");
    stuck.abort();
    eventually(Duration::from_secs(10), "the slot came back", || {
        let url = url.clone();
        async move {
            post(&url, Some(ONE), &with("open", json!({}))).await.status == StatusCode::OK
        }
    })
    .await;
    let m = p.metrics().await;
    assert_eq!(metric(&m, "modelgate_in_flight_requests", &[]), 0.0);
}
