//! Weighted splits, retries, fallback tiers and passive outlier ejection, end to end.

use std::time::Duration;

use http::StatusCode;
use modelgate_tests::harness::*;
use modelgate_tests::upstream::MockUpstream;

const KEY: &str = "sk-test-routing";

fn keys() -> String {
    format!("keys:\n  - {{name: k, sha256: {}}}\n", sha256_hex(KEY))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_split_follows_the_weights() {
    let up = MockUpstream::start();
    let p = Proxy::start(&format!(
        r#"
routes:
  - name: split
    model: m
    backends:
      - {{name: heavy, provider: openai-compatible, url: "{a}", weight: 75}}
      - {{name: light, provider: openai-compatible, url: "{b}", weight: 25}}
{keys}"#,
        a = up.url("id=heavy"),
        b = up.url("id=light"),
        keys = keys()
    ));
    let n = 800;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let url = p.url("/v1/chat/completions");
        tasks.push(tokio::spawn(async move {
            for _ in 0..n / 8 {
                let r = post(&url, Some(KEY), &chat("m", false)).await;
                assert_eq!(r.status, StatusCode::OK);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let heavy = up.hits("heavy") as f64 / n as f64;
    assert_eq!(up.hits("heavy") + up.hits("light"), n);
    // 800 draws at p = 0.75: sd ≈ 0.015, so ±0.06 is four sigma.
    assert!(
        (0.69..=0.81).contains(&heavy),
        "heavy got {heavy:.3} of the traffic"
    );
    let m = p.metrics().await;
    assert_eq!(
        metric(&m, "modelgate_requests_total", &[("backend", "heavy")]),
        up.hits("heavy") as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_then_succeeds_and_falls_back_to_the_next_tier() {
    let up = MockUpstream::start();
    let p = Proxy::start(&format!(
        r#"
routes:
  - name: flaky
    model: flaky
    retries: {{attempts: 2, backoff: 10ms}}
    backends:
      - {{name: only, provider: openai-compatible, url: "{flaky}"}}
  - name: tiers
    model: tiers
    retries: {{attempts: 1, backoff: 10ms}}
    backends:
      - {{name: primary, provider: openai-compatible, url: "{down}", priority: 0}}
      - {{name: secondary, provider: openai-compatible, url: "{up}", priority: 1}}
  - name: strict
    model: strict
    retries: {{attempts: 3, backoff: 10ms, retryOn: [connect]}}
    backends:
      - {{name: only, provider: openai-compatible, url: "{always500}"}}
{keys}"#,
        flaky = up.url("id=flaky;status=503;fail_first=2"),
        down = up.url("id=primary;status=500"),
        up = up.url("id=secondary"),
        always500 = up.url("id=strict;status=500"),
        keys = keys()
    ));
    let url = p.url("/v1/chat/completions");

    // Two failures, then the third attempt answers.
    let r = post(&url, Some(KEY), &chat("flaky", false)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(up.hits("flaky"), 3);

    // Tier 0 fails twice (first try + one retry), tier 1 answers.
    let r = post(&url, Some(KEY), &chat("tiers", false)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.header("x-modelgate-backend"), Some("secondary"));
    assert_eq!(up.hits("primary"), 2);
    assert_eq!(up.hits("secondary"), 1);

    // 500 is not in `on`: no retry.
    let r = post(&url, Some(KEY), &chat("strict", false)).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(up.hits("strict"), 1);

    let m = p.metrics().await;
    assert_eq!(
        metric(&m, "modelgate_retries_total", &[("route", "default/flaky")]),
        2.0
    );
    assert_eq!(
        metric(
            &m,
            "modelgate_fallbacks_total",
            &[("route", "default/tiers")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "modelgate_upstream_errors_total",
            &[("backend", "primary"), ("kind", "server_error")]
        ),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_retry_once_the_stream_has_started() {
    let up = MockUpstream::start();
    let p = Proxy::start(&format!(
        r#"
routes:
  - name: breaks
    model: breaks
    retries: {{attempts: 3, backoff: 10ms}}
    backends:
      - {{name: a, provider: openai-compatible, url: "{breaks}"}}
      - {{name: b, provider: openai-compatible, url: "{breaks2}"}}
{keys}"#,
        breaks = up.url("id=breaks;reset_after=3;delay=5"),
        breaks2 = up.url("id=breaks;reset_after=3;delay=5"),
        keys = keys()
    ));
    let resp = post_stream(
        &p.url("/v1/chat/completions"),
        Some(KEY),
        &chat("breaks", true),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    use http_body_util::BodyExt;
    let mut body = resp.into_body();
    let mut got = Vec::new();
    let mut failed = false;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => got.extend_from_slice(f.data_ref().map(|b| &b[..]).unwrap_or_default()),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&got);
    assert!(
        failed,
        "the client must see the stream break, not a clean end: {text}"
    );
    assert!(
        text.contains("tok0"),
        "chunks before the break were delivered: {text}"
    );
    assert!(!text.contains("[DONE]"));
    assert_eq!(
        up.hits("breaks"),
        1,
        "no retry after the first byte reached the client"
    );
    let m = p.metrics().await;
    assert_eq!(
        metric(
            &m,
            "modelgate_upstream_errors_total",
            &[("kind", "stream_broken")]
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_backend_is_ejected_then_returns() {
    let up = MockUpstream::start();
    let yaml = |bad: &str| {
        format!(
            r#"
routes:
  - name: pool
    model: pool
    retries: {{attempts: 1, backoff: 1ms}}
    outlierDetection: {{consecutiveFailures: 3, ejectionTime: 3s, maxEjectionTime: 3s}}
    backends:
      - {{name: bad, provider: openai-compatible, url: "{bad}"}}
      - {{name: good, provider: openai-compatible, url: "{good}"}}
{keys}"#,
            good = up.url("id=good"),
            keys = keys()
        )
    };
    // `bad` fails its first 3 requests, then recovers. The 3 s ejection outlasts the 40
    // requests below even on a loaded machine; nothing waits for it to pass but the poll.
    let p = Proxy::start(&yaml(&up.url("id=bad;status=500;fail_first=3")));
    let url = p.url("/v1/chat/completions");
    for _ in 0..40 {
        let r = post(&url, Some(KEY), &chat("pool", false)).await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "a retry on the good backend hides every failure"
        );
    }
    assert_eq!(
        up.hits("bad"),
        3,
        "ejected after 3 consecutive failures, then skipped"
    );
    let m = p.metrics().await;
    assert_eq!(
        metric(
            &m,
            "modelgate_backend_ejections_total",
            &[("backend", "bad")]
        ),
        1.0
    );

    // After the ejection time it gets traffic again (and now succeeds).
    eventually(
        Duration::from_secs(20),
        "bad backend back in rotation",
        || async {
            let r = p.chat(KEY, "pool").await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text());
            up.hits("bad") > 3
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_latency_prefers_the_faster_backend() {
    let up = MockUpstream::start();
    let p = Proxy::start(&format!(
        r#"
routes:
  - name: fast
    model: fast
    strategy: least-latency
    backends:
      - {{name: slow, provider: openai-compatible, url: "{slow}"}}
      - {{name: quick, provider: openai-compatible, url: "{quick}"}}
{keys}"#,
        slow = up.url("id=slow;latency=40"),
        quick = up.url("id=quick"),
        keys = keys()
    ));
    for _ in 0..60 {
        let r = post(
            &p.url("/v1/chat/completions"),
            Some(KEY),
            &chat("fast", false),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
    }
    // Power of two choices picks the slow one only when both draws land on it.
    assert!(
        up.hits("quick") >= 36,
        "quick {} slow {}",
        up.hits("quick"),
        up.hits("slow")
    );
}

/// A client that leaves while its attempt waits on the upstream takes the attempt out of the
/// backend's in-flight count: `least-latency` keeps preferring the faster backend afterwards
/// instead of seeing it as loaded by calls nobody waits for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_leaving_mid_call_do_not_count_as_load() {
    let up = MockUpstream::start();
    // `b` keeps its health across reloads (same name); weight 0 parks it without forgetting.
    let yaml = |a: &str, b_weight: u32| {
        format!(
            r#"
routes:
  - name: ll
    model: ll
    strategy: least-latency
    retries: {{attempts: 0}}
    backends:
      - {{name: a, provider: openai-compatible, url: "{a}"}}
      - {{name: b, provider: openai-compatible, url: "{b}", weight: {b_weight}}}
{keys}"#,
            b = up.url("id=b;latency=80"),
            keys = keys()
        )
    };
    let fast = yaml(&up.url("id=a;latency=5"), 1);
    let p = Proxy::start(&fast);
    let url = p.url("/v1/chat/completions");
    // Unmeasured backends look fastest, so a few requests measure both.
    eventually(Duration::from_secs(10), "both backends measured", || {
        let url = url.clone();
        let up = &up;
        async move {
            let r = post(&url, Some(KEY), &chat("ll", false)).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text());
            up.hits("a") > 0 && up.hits("b") > 0
        }
    })
    .await;

    // `a` now hangs; clients give up while their calls wait on it.
    let version = p.version().await.unwrap();
    p.write_config(&yaml(&up.url("id=hang;hang=1"), 0));
    eventually(Duration::from_secs(10), "hanging snapshot", || async {
        p.version().await.is_some_and(|v| v != version)
    })
    .await;
    const LEFT: u64 = 40;
    let clients: Vec<_> = (0..LEFT)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { post(&url, Some(KEY), &chat("ll", false)).await })
        })
        .collect();
    eventually(
        Duration::from_secs(10),
        "every call reached `a`",
        || async { up.hits("hang") == LEFT },
    )
    .await;
    for c in &clients {
        c.abort();
    }
    eventually(
        Duration::from_secs(10),
        "the proxy saw every client leave",
        || async {
            let m = p.metrics().await;
            metric(&m, "modelgate_in_flight_requests", &[]) == 0.0
        },
    )
    .await;

    // `a` is fast again. Had the 40 abandoned calls stayed in its count, it would look
    // 41 times busier than it is (5 ms × 41 > 80 ms) and lose every draw to `b`.
    let version = p.version().await.unwrap();
    p.write_config(&fast);
    eventually(Duration::from_secs(10), "fast snapshot", || async {
        p.version().await.is_some_and(|v| v != version)
    })
    .await;
    let before = up.hits("b");
    for _ in 0..10 {
        let r = post(&url, Some(KEY), &chat("ll", false)).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(r.header("x-modelgate-backend"), Some("a"));
    }
    assert_eq!(up.hits("b"), before);
}
