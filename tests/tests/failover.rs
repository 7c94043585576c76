//! Provider-aware failover over real sockets: each reason a backend fails for is handled as
//! docs/providers.md 6.3 says, and shows as the `reason` of `modelgate_retries_total` and
//! `modelgate_fallbacks_total` and the `kind` of `modelgate_upstream_errors_total`.

use http::StatusCode;
use modelgate_tests::harness::*;
use modelgate_tests::upstream::MockUpstream;
use serde_json::json;

const PROVIDER_KEY: &str = "sk-failover-provider";

/// A route `name` with a first tier `first` (two attempts, 1 ms backoff) and a healthy
/// second tier.
fn route(up: &MockUpstream, name: &str, provider: &str, first: &str, retry_on: &str) -> String {
    let creds = if provider == "anthropic" {
        ", credentials: {env: FAILOVER_KEY}"
    } else {
        ""
    };
    format!(
        r#"  - name: {name}
    model: {name}
    retries: {{attempts: 2, backoff: 1ms{retry_on}}}
    backends:
      - {{name: first, provider: {provider}, url: {first}{creds}}}
      - {{name: second, provider: {provider}, priority: 1, url: {second}{creds}}}
"#,
        first = up.url(first),
        second = up.url(&format!("id={name}-second")),
    )
}

fn proxy(routes: &[String]) -> Proxy {
    let yaml = format!(
        "routes:\n{}keys:\n  - {{name: demo, sha256: {}}}\n",
        routes.concat(),
        sha256_hex(DEMO_KEY)
    );
    Proxy::start_with(&yaml, &[("FAILOVER_KEY", PROVIDER_KEY)])
}

async fn call(p: &Proxy, model: &str) -> Reply {
    post(
        &p.url("/v1/chat/completions"),
        Some(DEMO_KEY),
        &json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await
}

fn count(m: &str, name: &str, route: &str, label: (&str, &str)) -> f64 {
    metric(m, name, &[("route", &format!("default/{route}")), label])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_with_and_without_a_wait_are_retried_and_told_apart() {
    let up = MockUpstream::start();
    let p = proxy(&[
        route(
            &up,
            "wait",
            "openai-compatible",
            "id=wait;status=429;retry_after=0;fail_first=1",
            "",
        ),
        route(
            &up,
            "nowait",
            "openai-compatible",
            "id=nowait;status=429;fail_first=1",
            "",
        ),
    ]);
    for model in ["wait", "nowait"] {
        let r = call(&p, model).await;
        assert_eq!(r.status, StatusCode::OK, "{model}: {}", r.text());
        assert_eq!(
            r.header("x-modelgate-backend"),
            Some("first"),
            "retried on the same backend"
        );
    }
    let m = p.metrics().await;
    assert_eq!(
        count(
            &m,
            "modelgate_retries_total",
            "wait",
            ("reason", "rate_limited")
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        count(
            &m,
            "modelgate_retries_total",
            "nowait",
            ("reason", "rate_limited_no_wait")
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        count(
            &m,
            "modelgate_upstream_errors_total",
            "nowait",
            ("kind", "rate_limited_no_wait")
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overloaded_anthropic_backend_is_retried_then_falls_over_and_is_never_ejected() {
    let up = MockUpstream::start();
    let p = proxy(&[route(&up, "busy", "anthropic", "id=busy;status=529", "")]);
    for _ in 0..3 {
        let r = call(&p, "busy").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(r.header("x-modelgate-backend"), Some("second"));
    }
    let m = p.metrics().await;
    assert_eq!(
        count(
            &m,
            "modelgate_fallbacks_total",
            "busy",
            ("reason", "overloaded")
        ),
        3.0,
        "{m}"
    );
    assert_eq!(
        count(
            &m,
            "modelgate_retries_total",
            "busy",
            ("reason", "overloaded")
        ),
        6.0,
        "{m}"
    );
    assert_eq!(
        count(
            &m,
            "modelgate_upstream_errors_total",
            "busy",
            ("kind", "overloaded")
        ),
        9.0
    );
    // Nine failures in a row and still not ejected: overload is not ill health.
    assert_eq!(
        metric(
            &m,
            "modelgate_backend_ejections_total",
            &[("route", "default/busy")]
        ),
        0.0
    );
    assert_eq!(up.hits("busy"), 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_quota_is_never_asked_again_for_the_request() {
    let up = MockUpstream::start();
    let p = proxy(&[route(
        &up,
        "quota",
        "openai-compatible",
        "id=quota;status=429;code=insufficient_quota",
        "",
    )]);
    let r = call(&p, "quota").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.header("x-modelgate-backend"), Some("second"));
    assert_eq!(up.hits("quota"), 1, "no retry on a backend out of quota");
    let m = p.metrics().await;
    assert_eq!(
        count(
            &m,
            "modelgate_fallbacks_total",
            "quota",
            ("reason", "quota_exhausted")
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        count(
            &m,
            "modelgate_retries_total",
            "quota",
            ("reason", "quota_exhausted")
        ),
        0.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_context_overflow_falls_to_a_later_tier_only_when_the_route_says_so() {
    let up = MockUpstream::start();
    let p = proxy(&[
        route(
            &up,
            "long",
            "openai-compatible",
            "id=long;status=400;code=context_length_exceeded",
            ", retryOn: [contextLength]",
        ),
        route(
            &up,
            "claude-long",
            "anthropic",
            "id=claude-long;status=400;code=context_length_exceeded",
            ", retryOn: [contextLength]",
        ),
        route(
            &up,
            "strict",
            "openai-compatible",
            "id=strict;status=400;code=context_length_exceeded",
            "",
        ),
    ]);
    for model in ["long", "claude-long"] {
        let r = call(&p, model).await;
        assert_eq!(r.status, StatusCode::OK, "{model}: {}", r.text());
        assert_eq!(r.header("x-modelgate-backend"), Some("second"));
    }
    assert_eq!(up.hits("long"), 1, "never retried on the same tier");
    assert_eq!(up.hits("claude-long"), 1);
    // Not listed: the client reads the upstream's 400, in its own words.
    let r = call(&p, "strict").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        r.json()["error"]["code"],
        "context_length_exceeded",
        "{}",
        r.text()
    );
    assert_eq!(up.hits("strict-second"), 0);
    let m = p.metrics().await;
    for model in ["long", "claude-long"] {
        assert_eq!(
            count(
                &m,
                "modelgate_fallbacks_total",
                model,
                ("reason", "context_length")
            ),
            1.0,
            "{m}"
        );
    }
    assert_eq!(
        count(
            &m,
            "modelgate_upstream_errors_total",
            "strict",
            ("kind", "context_length")
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filtered_content_is_answered_and_never_retried() {
    let up = MockUpstream::start();
    let endpoint = up.azure_endpoint("id=filtered;filter=1");
    let yaml = format!(
        r#"routes:
  - name: filtered
    model: filtered
    retries: {{attempts: 2, backoff: 1ms, retryOn: [contextLength]}}
    backends:
      - {{name: first, provider: azure-openai, url: {endpoint}, credentials: {{env: FAILOVER_KEY}}, azure: {{deployment: d1, apiVersion: 2024-10-21}}}}
      - {{name: second, provider: openai-compatible, priority: 1, url: {second}}}
keys:
  - {{name: demo, sha256: {demo}}}
"#,
        second = up.url("id=filtered-second"),
        demo = sha256_hex(DEMO_KEY),
    );
    let p = Proxy::start_with(&yaml, &[("FAILOVER_KEY", PROVIDER_KEY)]);
    let r = call(&p, "filtered").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "content_filter");
    assert_eq!(up.hits("filtered"), 1);
    assert_eq!(
        up.hits("filtered-second"),
        0,
        "a filtered prompt is not shopped around"
    );
}
