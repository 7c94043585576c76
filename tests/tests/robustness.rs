//! Slow clients, too many clients and slow upstreams are bounded.

use std::time::{Duration, Instant};

use http::StatusCode;
use modelgate_tests::harness::*;
use modelgate_tests::upstream::MockUpstream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const KEY: &str = "sk-test-robust";

fn config(up: &MockUpstream) -> String {
    format!(
        r#"
server:
  headerReadTimeout: 500ms
  maxConnections: 3
routes:
  - name: r
    model: m
    retries: {{attempts: 0}}
    backends:
      - {{name: stuck, provider: openai-compatible, url: "{hang}", timeout: 300ms, priority: 0}}
      - {{name: spare, provider: openai-compatible, url: "{ok}", priority: 1}}
keys:
  - {{name: k, sha256: {key}}}
"#,
        hang = up.url("id=stuck;hang=1"),
        ok = up.url("id=spare"),
        key = sha256_hex(KEY)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_timeout_falls_back_to_the_next_tier() {
    let up = MockUpstream::start();
    let p = Proxy::start(&config(&up));
    let started = Instant::now();
    let r = p.chat(KEY, "m").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.header("x-modelgate-backend"), Some("spare"));
    // A lower bound only: the proxy gave the stuck backend its whole 300 ms before falling
    // back. A slow machine makes this longer, never shorter.
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(up.hits("stuck"), 1);
    assert_eq!(
        p.metric(
            "modelgate_upstream_errors_total",
            &[("backend", "stuck"), ("kind", "timeout")]
        )
        .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_are_cut_off() {
    let up = MockUpstream::start();
    let p = Proxy::start(&config(&up));
    // Timed from before the connection exists, so the proxy's 500 ms header deadline (which
    // starts once it accepts) cannot have started earlier: a lower bound a busy machine only
    // makes longer.
    let started = Instant::now();
    let mut s = tokio::net::TcpStream::connect(p.api).await.unwrap();
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    assert!(
        read.is_ok(),
        "a client that never finishes its headers is disconnected"
    );
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(500), "cut after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_refused() {
    let up = MockUpstream::start();
    let p = Proxy::start(&config(&up));
    // Three idle keep-alive connections hold every slot (each sent one complete request).
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = tokio::net::TcpStream::connect(p.api).await.unwrap();
        s.write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nx-api-key: sk-test-robust\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        held.push(s);
    }
    let mut extra = tokio::net::TcpStream::connect(p.api).await.unwrap();
    let _ = extra
        .write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nx-api-key: sk-test-robust\r\n\r\n")
        .await;
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), extra.read_to_end(&mut buf))
        .await
        .expect("closed promptly")
        .unwrap_or(0);
    assert_eq!(n, 0, "the fourth connection is closed without an answer");
    let m = p.metrics().await;
    assert!(metric(&m, "modelgate_connections_refused_total", &[]) >= 1.0);

    // Freeing a slot lets clients in again.
    drop(held.pop());
    eventually(Duration::from_secs(10), "a slot frees up", || async {
        let mut s = tokio::net::TcpStream::connect(p.api).await.unwrap();
        let _ = s
            .write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nx-api-key: sk-test-robust\r\nConnection: close\r\n\r\n")
            .await;
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf)).await;
        String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_refuses_the_gateways_credentials_never_speaks_to_the_client() {
    let up = MockUpstream::start();
    let p = Proxy::start(&format!(
        r#"
routes:
  - name: r
    model: m
    retries: {{attempts: 0}}
    backends:
      - {{name: refuses, provider: openai-compatible, url: "{refuses}"}}
  - name: f
    model: fallback
    retries: {{attempts: 0}}
    backends:
      - {{name: refuses, provider: openai-compatible, url: "{forbidden}", priority: 0}}
      - {{name: spare, provider: openai-compatible, url: "{ok}", priority: 1}}
keys:
  - {{name: k, sha256: {key}}}
"#,
        refuses = up.url("id=refuses;status=401"),
        forbidden = up.url("id=forbidden;status=403"),
        ok = up.url("id=spare"),
        key = sha256_hex(KEY)
    ));
    for stream in [false, true] {
        let r = post(
            &p.url("/v1/chat/completions"),
            Some(KEY),
            &chat("m", stream),
        )
        .await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
        assert_eq!(r.error_code(), "upstream_credentials_refused");
        assert!(
            r.text().contains("refused the gateway's credentials"),
            "{}",
            r.text()
        );
        assert!(
            !r.text().contains("mock upstream failure"),
            "the provider's body never reaches the client: {}",
            r.text()
        );
    }
    // Another backend may still answer: a refused credential falls over like a 5xx.
    let r = post(
        &p.url("/v1/chat/completions"),
        Some(KEY),
        &chat("fallback", false),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.header("x-modelgate-backend"), Some("spare"));
    let m = p.metrics().await;
    assert_eq!(
        metric(
            &m,
            "modelgate_upstream_errors_total",
            &[("kind", "credentials_refused")]
        ),
        3.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_never_lock_clients_out() {
    let up = MockUpstream::start();
    let p = Proxy::start(&config(&up));
    // More silent sockets than maxConnections (3): they connect and never send a byte.
    let mut silent = Vec::new();
    for _ in 0..6 {
        silent.push(tokio::net::TcpStream::connect(p.api).await.unwrap());
    }
    // Each is closed once the header read timeout (500 ms) passes, so a client gets in.
    eventually(Duration::from_secs(10), "a real client is served", || async {
        let Ok(mut s) = tokio::net::TcpStream::connect(p.api).await else {
            return false;
        };
        let _ = s
            .write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nx-api-key: sk-test-robust\r\nConnection: close\r\n\r\n")
            .await;
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf)).await;
        String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200")
    })
    .await;
    // And the silent ones were closed by the proxy (reads end with EOF).
    for mut s in silent {
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("the proxy closes a silent socket")
            .unwrap_or(0);
        assert_eq!(n, 0);
    }
}
