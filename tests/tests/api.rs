//! The API surface: answers, rewrites, and every error status with an OpenAI-shaped body.

use std::time::Duration;

use http::{Method, StatusCode};
use modelgate_tests::harness::*;
use modelgate_tests::upstream::MockUpstream;
use serde_json::json;

const KEY: &str = "sk-test-team-a";
const LIMITED: &str = "sk-test-limited";
const DISABLED: &str = "sk-test-disabled";
const EXPIRED: &str = "sk-test-expired";
const NARROW: &str = "sk-test-narrow";
const OTHER_NS: &str = "sk-test-other-ns";

fn config(up: &MockUpstream) -> String {
    format!(
        r#"
server:
  maxBodyBytes: 4096
routes:
  - name: chat
    model: gpt-test
    aliases: [gpt-alias]
    backends:
      - name: up
        provider: openai-compatible
        url: {ok}
        model: upstream-model-v1
        credentials: {{env: TEST_UPSTREAM_KEY}}
  - name: embed
    model: embed-test
    backends:
      - {{name: up, provider: openai-compatible, url: {ok}}}
  - name: broken
    model: broken
    retries: {{attempts: 0}}
    backends:
      - {{name: down, provider: openai-compatible, url: "http://127.0.0.1:1/v1"}}
  - name: overloaded
    model: overloaded
    retries: {{attempts: 0}}
    backends:
      - {{name: up, provider: openai-compatible, url: {unavailable}}}
  - name: erroring
    model: erroring
    retries: {{attempts: 0}}
    backends:
      - {{name: up, provider: openai-compatible, url: {erroring}}}
  - name: busy
    model: busy
    retries: {{attempts: 0}}
    backends:
      - {{name: up, provider: openai-compatible, url: {busy}}}
  - name: slow
    model: slow
    timeout: 300ms
    retries: {{attempts: 0}}
    backends:
      - {{name: up, provider: openai-compatible, url: {hang}}}
  - name: picky
    model: picky
    backends:
      - {{name: up, provider: openai-compatible, url: {picky}}}
  - name: mock
    model: mock-gpt
    backends:
      - {{name: mock, provider: mock, mock: {{outputTokens: 4}}}}
  - name: elsewhere
    namespace: other
    model: gpt-test
    backends:
      - {{name: mock, provider: mock}}
keys:
  - {{name: a, sha256: {key}}}
  - name: limited
    sha256: {limited}
    limits: {{requestsPerMinute: 2}}
  - {{name: disabled, sha256: {disabled}, disabled: true}}
  - {{name: expired, sha256: {expired}, expiresAt: "2020-01-01T00:00:00Z"}}
  - {{name: narrow, sha256: {narrow}, models: ["embed-*"]}}
  - {{name: o, namespace: other, sha256: {other}}}
"#,
        ok = up.url("id=ok"),
        unavailable = up.url("id=unavailable;status=503"),
        erroring = up.url("id=erroring;status=500"),
        busy = up.url("id=busy;status=429;retry_after=7"),
        hang = up.url("id=hang;hang=1"),
        picky = up.url("id=picky;status=400"),
        key = sha256_hex(KEY),
        limited = sha256_hex(LIMITED),
        disabled = sha256_hex(DISABLED),
        expired = sha256_hex(EXPIRED),
        narrow = sha256_hex(NARROW),
        other = sha256_hex(OTHER_NS),
    )
}

/// `MODELGATE_WORKERS=1` (a current-thread runtime, the cheapest per request on one CPU)
/// serves concurrent calls and streams; the overhead header and histogram report the
/// proxy's own busy time, never the upstream's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker_thread_serves_concurrent_calls_and_streams() {
    let up = MockUpstream::start();
    let p = Proxy::start_with(
        &config(&up),
        &[
            ("MODELGATE_WORKERS", "1"),
            ("TEST_UPSTREAM_KEY", "sk-upstream"),
        ],
    );
    let calls = (0..16).map(|i| {
        let url = p.url("/v1/chat/completions");
        async move { post(&url, Some(KEY), &chat("gpt-test", i % 4 == 0)).await }
    });
    for r in futures_util::future::join_all(calls).await {
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        let own: u64 = r
            .header("x-modelgate-overhead-us")
            .unwrap()
            .parse()
            .unwrap();
        assert!(own > 0, "the proxy's own time is never nothing");
    }
    // The slow route's upstream never answers within 300 ms: the wait is not the proxy's.
    let r = post(
        &p.url("/v1/chat/completions"),
        Some(KEY),
        &chat("slow", false),
    )
    .await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT, "{}", r.text());
    let own: u64 = r
        .header("x-modelgate-overhead-us")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        own < 300_000,
        "waiting on the upstream was charged: {own} µs"
    );
    eventually(
        Duration::from_secs(10),
        "every call observed in the overhead histogram",
        || async {
            let text = get(&p.admin_url("/metrics"), None).await.text();
            metric(&text, "modelgate_gateway_overhead_seconds_count", &[]) == 17.0
        },
    )
    .await;
}

/// HTTP/2 clients (prior knowledge): each stream is served in a task of its own, timed on
/// the connection's busy clock, so a call over HTTP/2 reports the gateway's work on it as one
/// over HTTP/1.1 does. A 2 MB prompt makes that work (reading and checking the body) far
/// larger than the connection's own frame handling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_calls_report_the_gateways_work_as_http1_calls_do() {
    let p = Proxy::start(&format!(
        "server: {{maxBodyBytes: 8388608}}\nroutes:\n  - {{name: m, model: mock-gpt, backends: [{{name: mock, provider: mock}}]}}\nkeys:\n  - {{name: a, sha256: {}}}\n",
        sha256_hex(KEY)
    ));
    let text = "The sea keeps its own time. ".repeat(75_000);
    let body = serde_json::to_vec(&json!({"model": "mock-gpt",
        "messages": [{"role": "user", "content": text}]}))
    .unwrap();
    let url = p.url("/v1/chat/completions");
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let own = |r: &Reply| -> u64 {
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        r.header("x-modelgate-overhead-us")
            .unwrap()
            .parse()
            .unwrap()
    };
    // The busy clock also counts a thread's time off the CPU in a poll, so on a loaded
    // machine either side can read high for a while: the best of each is taken over up to
    // ten rounds, ending as soon as they agree. An untimed stream task never agrees.
    let mut h1_best = u64::MAX;
    let mut h2_best = u64::MAX;
    for round in 0..10 {
        let r = send(request(Method::POST, &url, Some(KEY), body.clone())).await;
        h1_best = h1_best.min(own(&r));
        let resp = h2.request(request(Method::POST, &url, Some(KEY), body.clone()));
        let r = read(resp.await.expect("an HTTP/2 answer")).await;
        h2_best = h2_best.min(own(&r));
        if round >= 2 && h2_best * 3 > h1_best {
            break;
        }
    }
    assert!(
        h2_best * 3 > h1_best,
        "HTTP/2 reported {h2_best} µs where HTTP/1.1 reported {h1_best} µs: the stream's task is not timed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_rewrite_the_model_and_inject_credentials() {
    let up = MockUpstream::start();
    let p = Proxy::start_with(&config(&up), &[("TEST_UPSTREAM_KEY", "sk-upstream-secret")]);
    let r = post(
        &p.url("/v1/chat/completions"),
        Some(KEY),
        &chat("gpt-alias", false),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["usage"]["prompt_tokens"], 10);
    assert!(
        r.header("x-modelgate-overhead-us")
            .unwrap()
            .parse::<u64>()
            .is_ok()
    );
    assert_eq!(r.header("x-modelgate-backend"), Some("up"));
    let c = up.counters("ok");
    let sent = c.last_body.lock().unwrap().clone().unwrap();
    assert_eq!(sent["model"], "upstream-model-v1");
    assert_eq!(sent["messages"][0]["content"], "Say hello");
    assert_eq!(
        c.last_authorization.lock().unwrap().as_deref(),
        Some("Bearer sk-upstream-secret"),
        "the backend credential replaces the client's key"
    );

    // Secrets stay out of logs, metrics and /config.
    let metrics = p.metrics().await;
    let config = get(&p.admin_url("/config"), None).await.text();
    for text in [&metrics, &config, &p.log_text()] {
        assert!(
            !text.contains("sk-upstream-secret") && !text.contains(KEY),
            "secret leaked"
        );
    }
    assert!(
        config.contains("TEST_UPSTREAM_KEY"),
        "/config names the env var: {config}"
    );
    assert_eq!(
        metric(
            &metrics,
            "modelgate_tokens_total",
            &[("route", "default/chat"), ("kind", "input")]
        ),
        10.0
    );

    // Embeddings and the legacy completions endpoint go through too.
    let r = post(
        &p.url("/v1/embeddings"),
        Some(KEY),
        &json!({"model": "embed-test", "input": ["a", "b"]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["data"].as_array().unwrap().len(), 2);
    let r = post(
        &p.url("/v1/completions"),
        Some(KEY),
        &json!({"model": "mock-gpt", "prompt": "Once"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["object"], "text_completion");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_lists_only_what_the_key_may_use() {
    let up = MockUpstream::start();
    let p = Proxy::start_with(&config(&up), &[("TEST_UPSTREAM_KEY", "x")]);
    let ids = |r: Reply| -> Vec<String> {
        assert_eq!(r.json()["object"], "list");
        r.json()["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let all = ids(get(&p.url("/v1/models"), Some(KEY)).await);
    assert!(all.contains(&"gpt-test".to_owned()) && all.contains(&"gpt-alias".to_owned()));
    assert_eq!(
        ids(get(&p.url("/v1/models"), Some(NARROW)).await),
        vec!["embed-test"]
    );
    assert_eq!(
        ids(get(&p.url("/v1/models"), Some(OTHER_NS)).await),
        vec!["gpt-test"]
    );
    // The same model name in another namespace is another route.
    let r = post(
        &p.url("/v1/chat/completions"),
        Some(OTHER_NS),
        &chat("gpt-test", false),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-modelgate-backend"), Some("mock"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_has_its_status_and_an_openai_body() {
    let up = MockUpstream::start();
    let p = Proxy::start_with(&config(&up), &[("TEST_UPSTREAM_KEY", "x")]);
    let url = p.url("/v1/chat/completions");

    let cases: Vec<(Reply, StatusCode, &str)> = vec![
        (send(request(Method::POST, &url, Some(KEY), "{not json")).await, StatusCode::BAD_REQUEST, "invalid_request"),
        (post(&url, Some(KEY), &json!({"messages": []})).await, StatusCode::BAD_REQUEST, "invalid_request"),
        (post(&url, None, &chat("gpt-test", false)).await, StatusCode::UNAUTHORIZED, "missing_api_key"),
        (post(&url, Some("sk-wrong"), &chat("gpt-test", false)).await, StatusCode::UNAUTHORIZED, "invalid_api_key"),
        (post(&url, Some(DISABLED), &chat("gpt-test", false)).await, StatusCode::FORBIDDEN, "api_key_disabled"),
        (post(&url, Some(EXPIRED), &chat("gpt-test", false)).await, StatusCode::FORBIDDEN, "api_key_expired"),
        (post(&url, Some(NARROW), &chat("gpt-test", false)).await, StatusCode::FORBIDDEN, "model_not_allowed"),
        (post(&url, Some(KEY), &chat("no-such-model", false)).await, StatusCode::NOT_FOUND, "model_not_found"),
        (post(&p.url("/v1/nope"), Some(KEY), &chat("gpt-test", false)).await, StatusCode::NOT_FOUND, "unknown_url"),
        (get(&url, Some(KEY)).await, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
        (
            post(&url, Some(KEY), &json!({"model": "gpt-test", "messages": [{"role": "user", "content": "x".repeat(5000)}]})).await,
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
        ),
        (post(&url, Some(KEY), &chat("broken", false)).await, StatusCode::BAD_GATEWAY, "upstream_unavailable"),
        (post(&url, Some(KEY), &chat("erroring", false)).await, StatusCode::BAD_GATEWAY, "upstream_error"),
        (post(&url, Some(KEY), &chat("overloaded", false)).await, StatusCode::SERVICE_UNAVAILABLE, "upstream_error"),
        (post(&url, Some(KEY), &chat("slow", false)).await, StatusCode::GATEWAY_TIMEOUT, "upstream_timeout"),
    ];
    for (r, status, code) in &cases {
        assert_eq!(r.status, *status, "{}", r.text());
        assert_eq!(r.error_code(), *code, "{}", r.text());
        assert_eq!(r.header("content-type"), Some("application/json"));
    }

    // Upstream 429 passes on as 429 with the upstream's Retry-After.
    let r = post(&url, Some(KEY), &chat("busy", false)).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.error_code(), "upstream_rate_limited");
    assert_eq!(r.header("retry-after"), Some("7"));

    // An upstream client error (its 400 explains the problem best) passes through untouched.
    let r = post(&url, Some(KEY), &chat("picky", false)).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["error"]["type"], "mock_error");

    // The gateway's own rate limit: headers on success, 429 + Retry-After past the limit.
    let r = post(&url, Some(LIMITED), &chat("mock-gpt", false)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-ratelimit-limit-requests"), Some("2"));
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("1"));
    assert_eq!(
        post(&url, Some(LIMITED), &chat("mock-gpt", false))
            .await
            .status,
        StatusCode::OK
    );
    let r = post(&url, Some(LIMITED), &chat("mock-gpt", false)).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.error_code(), "rate_limit_exceeded");
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");

    let metrics = p.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "modelgate_limit_rejections_total",
            &[("key", "default/limited")]
        ),
        1.0
    );
    assert_eq!(
        metric(&metrics, "modelgate_requests_total", &[("status", "401")]),
        2.0
    );
    assert!(
        metric(
            &metrics,
            "modelgate_upstream_errors_total",
            &[("kind", "timeout")]
        ) >= 1.0
    );

    // None of it disturbed normal service.
    let r = post(&url, Some(KEY), &chat("gpt-test", false)).await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_never_takes_the_proxy_down() {
    let up = MockUpstream::start();
    let p = Proxy::start_with(&config(&up), &[("TEST_UPSTREAM_KEY", "x")]);
    let url = p.url("/v1/chat/completions");
    let bodies: Vec<Vec<u8>> = vec![
        vec![0xff, 0xfe, 0x00],
        b"null".to_vec(),
        b"{\"model\":null,\"messages\":[]}".to_vec(),
        b"{\"model\":\"gpt-test\",\"messages\":[],\"stream\":true,\"stream_options\":7}".to_vec(),
        b"{\"model\":\"gpt-test\",\"messages\":[],\"max_tokens\":1e400}".to_vec(),
        "{\"model\":\"\u{1F600}\",\"messages\":[]}"
            .as_bytes()
            .to_vec(),
        b"{\"model\":\"gpt-test\",\"messages\":[],\"model\":\"x\"}".to_vec(),
        vec![b'['; 10_000],
    ];
    for b in bodies {
        let r = send(request(Method::POST, &url, Some(KEY), b.clone())).await;
        assert!(
            r.status.is_client_error(),
            "{:?} -> {}",
            String::from_utf8_lossy(&b),
            r.status
        );
        r.error_code();
    }
    // Raw garbage on the socket, then a normal request still works.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(p.api).await.unwrap();
    s.write_all(b"\x00\x01GARBAGE / HTTP/9\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    let r = post(&url, Some(KEY), &chat("mock-gpt", false)).await;
    assert_eq!(r.status, StatusCode::OK);
    let health = get(&p.admin_url("/healthz"), None).await;
    assert_eq!(health.status, StatusCode::OK);
}
