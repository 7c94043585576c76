//! Hot reload under load, invalid reloads, and graceful drain on SIGTERM.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use http::StatusCode;
use http_body_util::BodyExt;
use modelgate_tests::harness::*;
use modelgate_tests::upstream::MockUpstream;

const KEY: &str = "sk-test-lifecycle";

fn config(backend_url: &str, weight: u32) -> String {
    format!(
        r#"
routes:
  - name: r
    model: m
    backends:
      - {{name: b, provider: openai-compatible, url: "{backend_url}", weight: {weight}}}
  - name: slow
    model: slow
    backends:
      - {{name: mock, provider: mock, mock: {{outputTokens: 30, chunkDelay: 30ms}}}}
keys:
  - {{name: k, sha256: {key}}}
"#,
        key = sha256_hex(KEY)
    )
}

async fn wait_version_change(p: &Proxy, from: &str) -> String {
    eventually(Duration::from_secs(10), "new snapshot version", || async {
        p.version().await.is_some_and(|v| v != from)
    })
    .await;
    p.version().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_under_load_drops_nothing() {
    let up = MockUpstream::start();
    let (a, b) = (up.url("id=a"), up.url("id=b"));
    let p = Proxy::start(&config(&a, 1));
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (url, stop, sent) = (p.url("/v1/chat/completions"), stop.clone(), sent.clone());
        tasks.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let r = post(&url, Some(KEY), &chat("m", false)).await;
                sent.fetch_add(1, Ordering::Relaxed);
                if r.status != StatusCode::OK {
                    failures.push(format!("{} {}", r.status, r.text()));
                }
            }
            failures
        }));
    }
    let mut version = p.version().await.unwrap();
    for i in 0..8 {
        let url = if i % 2 == 0 { &b } else { &a };
        p.write_config(&config(url, i + 1));
        version = wait_version_change(&p, &version).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for t in tasks {
        failures.extend(t.await.unwrap());
    }
    assert!(
        failures.is_empty(),
        "{} failed requests: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(sent.load(Ordering::Relaxed) > 50);
    assert!(up.hits("a") > 0 && up.hits("b") > 0);
    let m = p.metrics().await;
    assert_eq!(
        metric(
            &m,
            "modelgate_config_reloads_total",
            &[("result", "applied")]
        ),
        9.0
    );
    assert_eq!(
        metric(&m, "modelgate_snapshot_info", &[("version", &version)]),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_reload_keeps_the_last_good_snapshot() {
    let up = MockUpstream::start();
    let p = Proxy::start(&config(&up.url("id=a"), 1));
    let good = p.version().await.unwrap();
    let url = p.url("/v1/chat/completions");

    let bad_configs = [
        "routes: [unclosed".to_owned(),
        config(&up.url("id=a"), 1).replace("provider: openai-compatible", "provider: telepathy"),
        config(&up.url("id=a"), 1).replace("chunkDelay: 30ms", "chunkDelay: soon"),
        config("ftp://nowhere", 1),
    ];
    for (i, bad) in bad_configs.iter().enumerate() {
        p.write_config(bad);
        eventually(Duration::from_secs(10), "rejection recorded", || async {
            let m = p.metrics().await;
            metric(
                &m,
                "modelgate_config_reloads_total",
                &[("result", "rejected")],
            ) == (i + 1) as f64
        })
        .await;
        assert_eq!(p.version().await.unwrap(), good, "the good snapshot stays");
        let cfg = get(&p.admin_url("/config"), None).await.json();
        assert!(cfg["lastError"].is_string(), "{cfg}");
        assert_eq!(
            post(&url, Some(KEY), &chat("m", false)).await.status,
            StatusCode::OK
        );
        let ready = get(&p.admin_url("/readyz"), None).await;
        assert_eq!(
            ready.status,
            StatusCode::OK,
            "still ready on the last good snapshot"
        );
    }
    let m = p.metrics().await;
    assert_eq!(metric(&m, "modelgate_config_last_reload_success", &[]), 0.0);
    assert!(
        p.log_text().contains("keeping the last good"),
        "{}",
        p.log_text()
    );

    // A valid file is taken again.
    p.write_config(&config(&up.url("id=b"), 1));
    wait_version_change(&p, &good).await;
    assert_eq!(
        post(&url, Some(KEY), &chat("m", false)).await.status,
        StatusCode::OK
    );
    assert_eq!(up.hits("b"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_an_in_flight_stream() {
    let up = MockUpstream::start();
    let mut p = Proxy::start(&config(&up.url("id=a"), 1));
    let resp = post_stream(
        &p.url("/v1/chat/completions"),
        Some(KEY),
        &chat("slow", true),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut text = String::new();
    while !text.contains("Hello") {
        let f = body.frame().await.unwrap().unwrap();
        text.push_str(&String::from_utf8_lossy(f.data_ref().unwrap()));
    }

    p.signal("TERM");
    // New connections are refused while the stream is still going.
    let api = p.api;
    eventually(Duration::from_secs(5), "listener closed", || async move {
        tokio::net::TcpStream::connect(api).await.is_err()
    })
    .await;
    assert!(p.try_wait().is_none(), "the proxy waits for the stream");

    while let Some(f) = body.frame().await {
        let f = f.expect("the stream finishes cleanly during drain");
        text.push_str(&String::from_utf8_lossy(
            f.data_ref().map(|b| &b[..]).unwrap_or_default(),
        ));
    }
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let status = p
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("proxy exited after draining");
    assert!(status.success(), "{status}");
    assert!(p.log_text().contains("drained"));
}
