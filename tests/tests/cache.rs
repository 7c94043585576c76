//! The response cache end to end: real proxies on 127.0.0.1, the mock upstream counting its
//! calls, the official OpenAI Python SDK reading a replayed stream, and a real `redis-server`
//! (Debian's package) shared by two proxies and then killed.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use modelgate_tests::harness::*;
use modelgate_tests::upstream::MockUpstream;
use serde_json::json;

const A: &str = "sk-test-cache-a";
const A2: &str = "sk-test-cache-a2";
const B: &str = "sk-test-cache-b";
const LIMITED: &str = "sk-test-cache-limited";

fn config(up: &MockUpstream, server: &str) -> String {
    format!(
        r#"
server: {server}
routes:
  - name: cached
    model: cached
    aliases: [cached-alias]
    cache: {{ttl: 10m}}
    backends:
      - {{name: up, provider: openai-compatible, url: "{cached}", pricing: {{inputPerMillion: 1, outputPerMillion: 10}}}}
  - name: sampled
    model: sampled
    cache: {{cacheSampled: true}}
    backends:
      - {{name: up, provider: openai-compatible, url: "{sampled}"}}
  - name: short
    model: short
    cache: {{ttl: 2s}}
    backends:
      - {{name: up, provider: openai-compatible, url: "{short}"}}
  - name: mine
    model: mine
    cache: {{perKey: true}}
    backends:
      - {{name: up, provider: openai-compatible, url: "{mine}"}}
  - name: charged
    model: charged
    cache: {{hitCostFraction: 1}}
    backends:
      - {{name: up, provider: openai-compatible, url: "{charged}"}}
  - name: cut
    model: cut
    cache: {{}}
    backends:
      - {{name: up, provider: openai-compatible, url: "{cut}"}}
  - name: plain
    model: plain
    backends:
      - {{name: up, provider: openai-compatible, url: "{plain}"}}
  - name: cached
    namespace: other
    model: cached
    cache: {{}}
    backends:
      - {{name: up, provider: openai-compatible, url: "{cached}"}}
keys:
  - {{name: a, sha256: {a}}}
  - {{name: a2, sha256: {a2}}}
  - {{name: b, namespace: other, sha256: {b}}}
  - {{name: limited, sha256: {limited}, limits: {{requestsPerMinute: 2}}}}
"#,
        cached = up.url("id=cached"),
        sampled = up.url("id=sampled"),
        short = up.url("id=short"),
        mine = up.url("id=mine"),
        charged = up.url("id=charged"),
        cut = up.url("id=cut;reset_after=2;delay=5"),
        plain = up.url("id=plain"),
        a = sha256_hex(A),
        a2 = sha256_hex(A2),
        b = sha256_hex(B),
        limited = sha256_hex(LIMITED),
    )
}

fn body(model: &str, prompt: &str) -> serde_json::Value {
    json!({"model": model, "temperature": 0,
        "messages": [{"role": "user", "content": prompt}]})
}

async fn ask(p: &Proxy, key: &str, body: &serde_json::Value, cache_control: Option<&str>) -> Reply {
    let mut req = request(
        Method::POST,
        &p.url("/v1/chat/completions"),
        Some(key),
        Bytes::from(serde_json::to_vec(body).unwrap()),
    );
    if let Some(cc) = cache_control {
        req.headers_mut()
            .insert("cache-control", cc.parse().unwrap());
    }
    send(req).await
}

fn cache(r: &Reply) -> &str {
    r.header("x-modelgate-cache").unwrap_or("(none)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_then_a_hit_with_the_same_body_and_no_upstream_call() {
    let up = MockUpstream::start();
    let p = Proxy::start(&config(&up, "{}"));
    let q = body("cached", "Say hello");

    let miss = ask(&p, A, &q, None).await;
    assert_eq!(miss.status, StatusCode::OK, "{}", miss.text());
    assert_eq!(cache(&miss), "miss");
    assert_eq!(up.hits("cached"), 1);
    let hit = ask(&p, A, &q, None).await;
    assert_eq!(hit.status, StatusCode::OK);
    assert_eq!(cache(&hit), "hit");
    assert_eq!(hit.body, miss.body, "the same answer, byte for byte");
    assert_eq!(hit.header("content-type"), miss.header("content-type"));
    // An alias routes to the same route: the same entry; `stream: false` and `user` do not
    // change the answer; the key order does not matter.
    let same = json!({"messages": [{"content": "Say hello", "role": "user"}],
        "user": "someone", "stream": false, "temperature": 0, "model": "cached-alias"});
    let hit = ask(&p, A2, &same, None).await;
    assert_eq!(cache(&hit), "hit", "{}", hit.text());
    assert_eq!(up.hits("cached"), 1, "answered without an upstream call");
    // Another prompt is another entry; a route without a cache says nothing.
    assert_eq!(
        cache(&ask(&p, A, &body("cached", "Other"), None).await),
        "miss"
    );
    assert_eq!(up.hits("cached"), 2);
    let plain = ask(&p, A, &body("plain", "Say hello"), None).await;
    assert_eq!(plain.header("x-modelgate-cache"), None);

    let m = p.metrics().await;
    let result = |r: &str| {
        metric(
            &m,
            "modelgate_cache_requests_total",
            &[("route", "default/cached"), ("result", r)],
        )
    };
    assert_eq!((result("hit"), result("miss")), (2.0, 2.0), "{m}");
    // The mock reports 10 prompt and 5 completion tokens; priced at $1 and $10 a million.
    assert_eq!(
        metric(
            &m,
            "modelgate_cache_tokens_saved_total",
            &[("route", "default/cached")]
        ),
        30.0
    );
    let saved = metric(
        &m,
        "modelgate_cache_cost_saved_usd_total",
        &[("route", "default/cached")],
    );
    assert!((saved - 2.0 * (10.0 + 50.0) / 1e6).abs() < 1e-12, "{saved}");
    assert_eq!(metric(&m, "modelgate_cache_memory_entries", &[]), 2.0);
    assert!(metric(&m, "modelgate_cache_memory_bytes", &[]) > 0.0);
    // Hits meter no tokens and no cost of their own: the key's series count the two misses.
    assert_eq!(
        metric(
            &m,
            "modelgate_tokens_total",
            &[("key", "default/a"), ("route", "default/cached")]
        ),
        30.0
    );
    // The access log (written off the request path) says what the cache did.
    eventually(
        Duration::from_secs(10),
        "a hit in the access log",
        || async { p.log_text().contains(r#""cache":"hit""#) },
    )
    .await;
}

/// The stream a client got is replayed as a stream: the official SDK reads the same text
/// and usage from the replay, and the upstream was asked once.
const SDK_STREAM: &str = r#"
import json, os, openai
c = openai.OpenAI(base_url=os.environ["BASE"], api_key=os.environ["KEY"], max_retries=0, timeout=30)
for _ in range(2):
    raw = c.chat.completions.with_raw_response.create(
        model="cached", temperature=0, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Stream please"}])
    text, usage, finish = "", None, None
    for chunk in raw.parse():
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage.model_dump()
    print(json.dumps({"status": raw.status_code, "cache": raw.headers.get("x-modelgate-cache"),
                      "type": raw.headers.get("content-type"), "text": text,
                      "usage": usage, "finish": finish}))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_stream_is_replayed_as_a_stream_to_the_openai_sdk() {
    let up = MockUpstream::start();
    let p = Proxy::start(&config(&up, "{}"));
    let base = p.url("/v1");
    let got = tokio::task::spawn_blocking(move || {
        python_json_lines(SDK_STREAM, &[("BASE", &base), ("KEY", A)])
    })
    .await
    .unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0]["cache"], "miss", "{}", got[0]);
    assert_eq!(got[1]["cache"], "hit", "{}", got[1]);
    assert!(
        got[1]["type"]
            .as_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    assert!(!got[0]["text"].as_str().unwrap().is_empty());
    for k in ["status", "text", "usage", "finish"] {
        assert_eq!(got[0][k], got[1][k], "{k}");
    }
    assert_eq!(got[1]["usage"]["completion_tokens"], 5);
    assert_eq!(up.hits("cached"), 1);

    // A stream and a whole answer are different entries; a stream without usage too.
    let whole = ask(&p, A, &body("cached", "Stream please"), None).await;
    assert_eq!(cache(&whole), "miss");
    let mut q = body("cached", "Stream please");
    q["stream"] = json!(true);
    let r = post(&p.url("/v1/chat/completions"), Some(A), &q).await;
    assert_eq!(cache(&r), "miss");
    let again = post(&p.url("/v1/chat/completions"), Some(A), &q).await;
    assert_eq!(cache(&again), "hit");
    assert_eq!(again.body, r.body);
    assert!(!r.text().contains("\"usage\":{"), "{}", r.text());
    assert_eq!(up.hits("cached"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_cache_bypasses_no_store_stores_nothing_and_sampled_requests_need_the_route() {
    let up = MockUpstream::start();
    let p = Proxy::start(&config(&up, "{}"));
    let q = body("cached", "fresh");
    // no-cache: not looked up (an upstream call); the fresh answer may be kept.
    let r = ask(&p, A, &q, Some("no-cache")).await;
    assert_eq!((r.status, cache(&r)), (StatusCode::OK, "bypass"));
    assert_eq!(up.hits("cached"), 1);
    let r = ask(&p, A, &q, Some("no-cache")).await;
    assert_eq!(cache(&r), "bypass");
    assert_eq!(up.hits("cached"), 2, "no-cache always asks the upstream");
    assert_eq!(cache(&ask(&p, A, &q, None).await), "hit");

    // no-store: nothing kept.
    let q = body("cached", "secret");
    assert_eq!(cache(&ask(&p, A, &q, Some("no-store")).await), "miss");
    assert_eq!(cache(&ask(&p, A, &q, None).await), "miss");
    assert_eq!(up.hits("cached"), 4);
    assert_eq!(cache(&ask(&p, A, &q, None).await), "hit");

    // temperature > 0: never cached unless the route says cacheSampled.
    let mut hot = body("cached", "hot");
    hot["temperature"] = json!(0.7);
    for _ in 0..2 {
        assert_eq!(cache(&ask(&p, A, &hot, None).await), "bypass");
    }
    assert_eq!(up.hits("cached"), 6);
    hot["model"] = json!("sampled");
    assert_eq!(cache(&ask(&p, A, &hot, None).await), "miss");
    assert_eq!(cache(&ask(&p, A, &hot, None).await), "hit");
    assert_eq!(up.hits("sampled"), 1);

    let m = p.metrics().await;
    assert_eq!(
        metric(
            &m,
            "modelgate_cache_requests_total",
            &[("route", "default/cached"), ("result", "bypass")]
        ),
        4.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_expires_after_its_ttl() {
    let up = MockUpstream::start();
    let p = Proxy::start(&config(&up, "{}"));
    let q = body("short", "soon stale");
    let start = Instant::now();
    assert_eq!(cache(&ask(&p, A, &q, None).await), "miss");
    let second = ask(&p, A, &q, None).await;
    // Asserted only when the second answer came well within the ttl (a loaded box may be
    // slower; the expiry below is what this test is about).
    if start.elapsed() < Duration::from_millis(1500) {
        assert_eq!(cache(&second), "hit");
    }
    eventually(Duration::from_secs(30), "the entry expired", || async {
        cache(&ask(&p, A, &q, None).await) == "miss"
    })
    .await;
    assert!(up.hits("short") >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_stay_in_their_namespace_and_per_key_routes_keep_them_per_key() {
    let up = MockUpstream::start();
    let p = Proxy::start(&config(&up, "{}"));
    let q = body("cached", "tenant data");
    assert_eq!(cache(&ask(&p, A, &q, None).await), "miss");
    assert_eq!(cache(&ask(&p, A, &q, None).await), "hit");
    // The same model name and the same body in another namespace: never a hit.
    let other = ask(&p, B, &q, None).await;
    assert_eq!((other.status, cache(&other)), (StatusCode::OK, "miss"));
    assert_eq!(up.hits("cached"), 2);
    assert_eq!(cache(&ask(&p, B, &q, None).await), "hit");

    // perKey: a's entry is a's only.
    let q = body("mine", "mine only");
    assert_eq!(cache(&ask(&p, A, &q, None).await), "miss");
    assert_eq!(cache(&ask(&p, A2, &q, None).await), "miss");
    assert_eq!(cache(&ask(&p, A, &q, None).await), "hit");
    assert_eq!(up.hits("mine"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_are_free_of_rate_limits_unless_the_route_charges_a_fraction() {
    let up = MockUpstream::start();
    let p = Proxy::start(&config(&up, "{}"));
    // 2 requests a minute; the miss takes one.
    let q = body("cached", "popular");
    let r = ask(&p, LIMITED, &q, None).await;
    assert_eq!((r.status, cache(&r)), (StatusCode::OK, "miss"));
    for i in 0..6 {
        let r = ask(&p, LIMITED, &q, None).await;
        assert_eq!((r.status, cache(&r)), (StatusCode::OK, "hit"), "hit {i}");
    }
    // The second request of the minute is the key's last.
    assert_eq!(
        ask(&p, LIMITED, &body("cached", "new"), None).await.status,
        StatusCode::OK
    );
    let r = ask(&p, LIMITED, &body("cached", "newer"), None).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.error_code(), "rate_limit_exceeded");
    // Still served from the cache.
    assert_eq!(ask(&p, LIMITED, &q, None).await.status, StatusCode::OK);
    assert_eq!(up.hits("cached"), 2);

    // hitCostFraction 1: a hit counts like the request it replays.
    let up2 = MockUpstream::start();
    let p = Proxy::start(&config(&up2, "{}"));
    let q = body("charged", "pay anyway");
    assert_eq!(cache(&ask(&p, LIMITED, &q, None).await), "miss");
    let r = ask(&p, LIMITED, &q, None).await;
    assert_eq!((r.status, cache(&r)), (StatusCode::OK, "hit"));
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("0"));
    let r = ask(&p, LIMITED, &q, None).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text());
    assert_eq!(up2.hits("charged"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_off_midway_is_never_stored() {
    let up = MockUpstream::start();
    let p = Proxy::start(&config(&up, "{}"));
    let mut q = body("cut", "break");
    q["stream"] = json!(true);
    for _ in 0..2 {
        let resp = post_stream(&p.url("/v1/chat/completions"), Some(A), &q).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["x-modelgate-cache"], "miss");
        // The body ends in an error (or an error event): read what there is.
        let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
    }
    assert_eq!(up.hits("cut"), 2);
    let m = p.metrics().await;
    assert_eq!(metric(&m, "modelgate_cache_memory_entries", &[]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_byte_budget_evicts_the_least_recently_used() {
    // One entry's size, measured on a proxy with room to spare.
    let up = MockUpstream::start();
    let p = Proxy::start(&config(&up, "{}"));
    assert_eq!(cache(&ask(&p, A, &body("cached", "A"), None).await), "miss");
    let one = p.metric("modelgate_cache_memory_bytes", &[]).await;
    assert!(one > 0.0);
    drop(p);

    // Room for two and a half.
    let budget = (one * 2.5) as u64;
    let p = Proxy::start(&config(
        &up,
        &format!("{{cache: {{memoryBytes: {budget}}}}}"),
    ));
    let (a, b, c) = (
        body("cached", "A"),
        body("cached", "B"),
        body("cached", "C"),
    );
    assert_eq!(cache(&ask(&p, A, &a, None).await), "miss");
    assert_eq!(cache(&ask(&p, A, &b, None).await), "miss");
    assert_eq!(
        cache(&ask(&p, A, &a, None).await),
        "hit",
        "a is now the most recent"
    );
    assert_eq!(cache(&ask(&p, A, &c, None).await), "miss", "c evicts b");
    assert_eq!(p.metric("modelgate_cache_memory_entries", &[]).await, 2.0);
    assert_eq!(cache(&ask(&p, A, &a, None).await), "hit");
    assert_eq!(cache(&ask(&p, A, &c, None).await), "hit");
    assert_eq!(cache(&ask(&p, A, &b, None).await), "miss", "b was evicted");
}

/// A real Redis on a free port, without persistence; killed on drop.
struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    fn start() -> Self {
        Self::start_with(&[])
    }

    /// A Redis with more arguments (TLS, users); its plain port stays on for the test's own
    /// inspection.
    fn start_with(args: &[&str]) -> Self {
        let port = free_port();
        let bin = std::env::var("MODELGATE_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let child = Command::new(&bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {bin} ({e}): run `make test-deps`"));
        Self { child, port }
    }

    /// One command's raw reply, or None while Redis does not answer.
    fn command(&self, cmd: &str) -> Option<String> {
        self.commands(&[cmd]).pop()
    }

    /// The replies to a few one-line commands sent on one connection, in order.
    fn commands(&self, cmds: &[&str]) -> Vec<String> {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return Vec::new();
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut replies = Vec::new();
        for cmd in cmds {
            if s.write_all(format!("{cmd}\r\n").as_bytes()).is_err() {
                break;
            }
            let mut buf = vec![0u8; 64 * 1024];
            match s.read(&mut buf) {
                Ok(n) if n > 0 => replies.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
                _ => break,
            }
        }
        replies
    }

    /// The names of every key (`KEYS *`: a handful here).
    fn keys(&self) -> std::collections::BTreeSet<String> {
        let reply = self.command("KEYS *").unwrap_or_default();
        reply
            .split("\r\n")
            .filter(|l| l.starts_with("modelgate:"))
            .map(str::to_owned)
            .collect()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_share_hits_through_redis_and_keep_serving_when_it_dies() {
    let mut redis = Redis::start();
    eventually(Duration::from_secs(20), "redis answers PING", || async {
        redis
            .command("PING")
            .is_some_and(|r| r.starts_with("+PONG"))
    })
    .await;
    let up = MockUpstream::start();
    let server = format!(
        "{{cache: {{redis: \"redis://127.0.0.1:{}/0\", redisTimeout: 2s}}}}",
        redis.port
    );
    let p1 = Proxy::start(&config(&up, &server));
    let p2 = Proxy::start(&config(&up, &server));
    let q = body("cached", "shared");
    let first = ask(&p1, A, &q, None).await;
    assert_eq!(cache(&first), "miss");
    // The entry goes to Redis after the answer (the client never waits for it).
    eventually(Duration::from_secs(20), "the entry is in Redis", || async {
        redis.command("DBSIZE").as_deref() == Some(":1\r\n")
    })
    .await;
    let second = ask(&p2, A, &q, None).await;
    assert_eq!(cache(&second), "hit", "{}", p2.log_text());
    assert_eq!(second.body, first.body);
    assert_eq!(up.hits("cached"), 1, "one upstream call for two proxies");
    // The Redis hit filled p2's memory.
    assert_eq!(p2.metric("modelgate_cache_memory_entries", &[]).await, 1.0);
    // Another namespace's proxy lookups never reach this entry either.
    assert_eq!(cache(&ask(&p2, B, &q, None).await), "miss");

    redis.kill();
    // Redis is gone: misses go upstream, memory hits still come, nothing fails.
    for (i, p) in [&p1, &p2, &p1, &p2].into_iter().enumerate() {
        let r = ask(p, A, &body("cached", &format!("after redis {i}")), None).await;
        assert_eq!(
            (r.status, cache(&r)),
            (StatusCode::OK, "miss"),
            "{}",
            r.text()
        );
    }
    let r = ask(&p1, A, &q, None).await;
    assert_eq!((r.status, cache(&r)), (StatusCode::OK, "hit"));
    assert_eq!(up.hits("cached"), 6);
}

/// With an entry key, what the proxies keep in Redis is sealed: Redis holds no answer in the
/// clear; a proxy with another key, an entry written without the seal (by a proxy without
/// the key, or anybody who can write to Redis) and a sealed entry copied to another
/// request's place are all misses, never served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_entries_are_unreadable_unforgeable_and_bound_to_their_place() {
    let redis = Redis::start();
    eventually(Duration::from_secs(20), "redis answers PING", || async {
        redis
            .command("PING")
            .is_some_and(|r| r.starts_with("+PONG"))
    })
    .await;
    let dir = temp_dir("redis-sealed");
    let key_file = |name: &str, secret: &str| {
        let path = dir.join(name);
        std::fs::write(&path, format!("{secret}\n")).unwrap();
        path.display().to_string()
    };
    let k1 = key_file("k1", &"a1".repeat(32));
    let k2 = key_file("k2", &"b2".repeat(32));
    let url = format!("redis://127.0.0.1:{}/0", redis.port);
    let server = |entry_key: Option<&str>| {
        let sealed = entry_key.map_or(String::new(), |k| format!(", redisEntryKeyFile: \"{k}\""));
        format!("{{cache: {{redis: \"{url}\", redisTimeout: 2s{sealed}}}}}")
    };
    let up = MockUpstream::start();
    let p1 = Proxy::start(&config(&up, &server(Some(&k1))));
    let p2 = Proxy::start(&config(&up, &server(Some(&k1))));
    let stranger = Proxy::start(&config(&up, &server(Some(&k2))));
    let plain = Proxy::start(&config(&up, &server(None)));
    // A new key in Redis after `ask`: its name.
    let stored = |before: std::collections::BTreeSet<String>| {
        let redis = &redis;
        async move {
            let mut new = None;
            eventually(Duration::from_secs(20), "a new entry in Redis", || {
                new = redis.keys().difference(&before).next().cloned();
                let found = new.is_some();
                async move { found }
            })
            .await;
            new.unwrap()
        }
    };

    let q = body("cached", "sealed");
    let before = redis.keys();
    let first = ask(&p1, A, &q, None).await;
    assert_eq!(cache(&first), "miss");
    let sealed_key = stored(before).await;
    let raw = redis.command(&format!("GET {sealed_key}")).unwrap();
    assert!(
        raw.contains("MGS\u{1}") && !raw.contains("MGC\u{1}"),
        "{raw:?}"
    );
    let answer = first.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        !raw.contains(&answer),
        "the answer is in Redis in the clear: {raw:?}"
    );
    // Kept aside before the stranger's miss writes its own seal in this place.
    assert_eq!(
        redis.command(&format!("COPY {sealed_key} saved-by-the-test")),
        Some(":1\r\n".into())
    );
    // The same key opens it; another key does not.
    let second = ask(&p2, A, &q, None).await;
    assert_eq!(cache(&second), "hit", "{}", p2.log_text());
    assert_eq!(second.body, first.body);
    assert_eq!(cache(&ask(&stranger, A, &q, None).await), "miss");

    // An entry stored without the seal is never served by a sealing proxy.
    let q2 = body("cached", "written in the clear");
    let before = redis.keys();
    assert_eq!(cache(&ask(&plain, A, &q2, None).await), "miss");
    let clear_key = stored(before).await;
    assert!(
        redis
            .command(&format!("GET {clear_key}"))
            .unwrap()
            .contains("MGC\u{1}")
    );
    assert_eq!(cache(&ask(&p2, A, &q2, None).await), "miss");
    // p2's miss stores its own sealed answer in that place, after the answer: wait for it,
    // so it cannot land after the copy below.
    eventually(
        Duration::from_secs(20),
        "p2's sealed entry of q2",
        || async {
            redis
                .command(&format!("GET {clear_key}"))
                .is_some_and(|v| v.contains("MGS\u{1}"))
        },
    )
    .await;

    // p1's sealed entry of `q`, copied into `q2`'s place, does not answer `q2`.
    assert_eq!(
        redis.command(&format!("COPY saved-by-the-test {clear_key} REPLACE")),
        Some(":1\r\n".into())
    );
    let q2_hits = up.hits("cached");
    let r = ask(&p1, A, &q2, None).await;
    assert_eq!((r.status, cache(&r)), (StatusCode::OK, "miss"));
    assert_eq!(up.hits("cached"), q2_hits + 1, "answered upstream");
    eventually(Duration::from_secs(10), "the proxies say why", || async {
        p1.log_text().contains("seal does not hold")
            && p2.log_text().contains("not sealed")
            && stranger.log_text().contains("seal does not hold")
    })
    .await;
    let config = get(&p1.admin_url("/config"), None).await.json();
    assert_eq!(config["cache"]["redis"]["sealed"], true);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A Redis that speaks only TLS to the proxies and wants an ACL user's password: two
/// proxies share an entry through it; a proxy with the wrong password, or one that does not
/// trust the server's CA, only misses (and says why, never with a password), and picks up
/// a corrected password file on its next connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_redis_with_a_password_is_shared_and_a_wrong_password_or_ca_is_only_a_miss() {
    const PASSWORD: &str = "c4che-s3cret-Pa55";
    const WRONG: &str = "n0t-the-Pa55w0rd";
    let dir = temp_dir("redis-tls");
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let ca = TestCa::new("modelgate test Redis CA");
    let (cert, key) = ca.server_cert(&["localhost"], &["127.0.0.1"]);
    let (cert, key, ca_file) = (
        write("redis.crt", &cert),
        write("redis.key", &key),
        write("ca.crt", &ca.cert_pem()),
    );
    let stranger = write("stranger.crt", &TestCa::new("someone else").cert_pem());
    let tls_port = free_port();
    let redis = Redis::start_with(&[
        "--tls-port",
        &tls_port.to_string(),
        "--tls-cert-file",
        &cert,
        "--tls-key-file",
        &key,
        "--tls-auth-clients",
        "no",
        // The default user is off: only `cache` with its password gets in.
        "--user",
        "default",
        "off",
        "--user",
        "cache",
        "on",
        &format!(">{PASSWORD}"),
        "~*",
        "&*",
        "+@all",
    ]);
    let dbsize = || {
        redis
            .commands(&[&format!("AUTH cache {PASSWORD}"), "DBSIZE"])
            .get(1)
            .cloned()
            .unwrap_or_default()
    };
    eventually(Duration::from_secs(20), "redis answers", || async {
        dbsize() == ":0\r\n"
    })
    .await;
    let right = write("password", &format!("{PASSWORD}\n"));
    let wrong = write("wrong", &format!("{WRONG}\n"));
    let server = |password: &str, ca: &str| {
        format!(
            "{{cache: {{redis: \"rediss://localhost:{tls_port}/0\", redisTimeout: 2s, \
             redisCaFile: \"{ca}\", redisUsername: cache, redisPasswordFile: \"{password}\"}}}}"
        )
    };
    let up = MockUpstream::start();
    let p1 = Proxy::start(&config(&up, &server(&right, &ca_file)));
    let p2 = Proxy::start(&config(&up, &server(&right, &ca_file)));
    let q = body("cached", "over tls");
    let first = ask(&p1, A, &q, None).await;
    assert_eq!(cache(&first), "miss");
    eventually(Duration::from_secs(20), "the entry is in Redis", || async {
        dbsize() == ":1\r\n"
    })
    .await;
    let second = ask(&p2, A, &q, None).await;
    assert_eq!(cache(&second), "hit", "{}", p2.log_text());
    assert_eq!(second.body, first.body);
    assert_eq!(up.hits("cached"), 1);
    // `/config` says where Redis is and how the proxy reaches it, never the password.
    let shown = get(&p1.admin_url("/config"), None).await;
    let redis = &shown.json()["cache"]["redis"];
    assert_eq!(redis["addr"], format!("localhost:{tls_port}"), "{redis}");
    assert_eq!(
        (&redis["tls"], &redis["username"], &redis["passwordFile"]),
        (&json!(true), &json!("cache"), &json!(right)),
        "{redis}"
    );
    assert!(!shown.text().contains(PASSWORD));

    // A wrong password, and a CA that did not sign Redis's certificate: misses, 200s.
    let p3 = Proxy::start(&config(&up, &server(&wrong, &ca_file)));
    let p4 = Proxy::start(&config(&up, &server(&right, &stranger)));
    for p in [&p3, &p4] {
        let r = ask(p, A, &q, None).await;
        assert_eq!(
            (r.status, cache(&r)),
            (StatusCode::OK, "miss"),
            "{}",
            r.text()
        );
    }
    assert_eq!(up.hits("cached"), 3);
    eventually(Duration::from_secs(20), "p3 and p4 say why", || async {
        p3.log_text().contains("refused the credentials") && p4.log_text().contains("UnknownIssuer")
    })
    .await;
    for p in [&p1, &p2, &p3, &p4] {
        let log = p.log_text();
        assert!(!log.contains(PASSWORD) && !log.contains(WRONG), "{log}");
    }

    // The Secret is corrected: p3 reads the file again on its next connection (after the
    // circuit's few seconds) and finds what p1 stores. Each round asks a new prompt, so a hit
    // can only come from Redis.
    std::fs::write(dir.join("wrong"), format!("{PASSWORD}\n")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    for round in 0.. {
        assert!(Instant::now() < deadline, "p3 never hit: {}", p3.log_text());
        let q = body("cached", &format!("after the fix {round}"));
        assert_eq!(cache(&ask(&p1, A, &q, None).await), "miss");
        let stored = format!(":{}\r\n", 2 + round);
        eventually(
            Duration::from_secs(20),
            "p1's entry is in Redis",
            || async { dbsize() == stored },
        )
        .await;
        if cache(&ask(&p3, A, &q, None).await) == "hit" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(!p3.log_text().contains(PASSWORD));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The README's `promql cache` block: one expression a line (`#` lines are comments).
fn readme_cache_queries() -> Vec<String> {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let block = readme
        .split("```promql cache\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("the README's promql cache block");
    let mut queries = Vec::new();
    for line in block.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // A line starting with an operator continues the expression above.
        match queries.last_mut() {
            Some(q) if line.starts_with('/') => *q = format!("{q} {line}"),
            _ => queries.push(line.to_owned()),
        }
    }
    queries
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readmes_cache_queries_answer_in_prometheus() {
    let queries = readme_cache_queries();
    assert_eq!(queries.len(), 3, "{queries:?}");
    let up = MockUpstream::start();
    let p = Proxy::start(&config(&up, "{}"));
    let prom = Prometheus::start(&[p.admin.to_string()]);
    // A first request (sampled: a bypass) makes the route's series; once they are scraped,
    // the counters' increase shows in rate().
    let mut hot = body("cached", "Say hello");
    hot["temperature"] = json!(1);
    assert_eq!(cache(&ask(&p, A, &hot, None).await), "bypass");
    eventually(
        Duration::from_secs(60),
        "the route's series scraped",
        || async {
            !prom
                .query("modelgate_cache_tokens_saved_total{route=\"default/cached\"}")
                .await
                .is_empty()
        },
    )
    .await;
    let q = body("cached", "Say hello");
    assert_eq!(cache(&ask(&p, A, &q, None).await), "miss");
    for _ in 0..3 {
        assert_eq!(cache(&ask(&p, A, &q, None).await), "hit");
    }
    for query in &queries {
        eventually(Duration::from_secs(60), query, || async {
            prom.query(query).await.iter().any(|s| {
                s["metric"]["route"] == "default/cached"
                    && s["value"][1]
                        .as_str()
                        .and_then(|v| v.parse::<f64>().ok())
                        .is_some_and(|v| v > 0.0)
            })
        })
        .await;
    }
    // The hit ratio: three hits of four requests.
    let ratio = prom.query(&queries[0]).await;
    let v: f64 = ratio[0]["value"][1].as_str().unwrap().parse().unwrap();
    assert!((v - 0.75).abs() < 1e-9, "{ratio:?}");
}

/// Masking runs before the cache: the key is the masked request's (two prompts that differ
/// only in a redacted e-mail address share an entry, as the upstream saw the same text), a
/// `block` rule refuses before any lookup, and what is kept and replayed is the masked answer
/// the client got, whole and streamed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_masked_route_caches_the_masked_request_and_answer() {
    let up = MockUpstream::start();
    let p = Proxy::start(&format!(
        r#"
routes:
  - name: masked
    model: masked
    cache: {{ttl: 10m}}
    masking:
      answers: true
      rules:
        - {{name: no-cards, detector: credit-card, action: block}}
        - {{name: emails, detector: email}}
    backends:
      - {{name: up, provider: openai-compatible, url: "{url}"}}
keys:
  - {{name: a, sha256: {a}}}
"#,
        url = up.url("id=masked;echo=4"),
        a = sha256_hex(A),
    ));
    let ask_about = |email: &str, stream: bool| {
        let mut q = body("masked", &format!("Mail {email} the summary"));
        q["echo"] = json!("Reply to bob@example.org now");
        q["stream"] = json!(stream);
        q
    };

    let miss = ask(&p, A, &ask_about("jane@example.com", false), None).await;
    assert_eq!(miss.status, StatusCode::OK, "{}", miss.text());
    assert_eq!(cache(&miss), "miss");
    let sent = up
        .counters("masked")
        .last_body
        .lock()
        .unwrap()
        .clone()
        .unwrap();
    assert_eq!(sent["messages"][0]["content"], "Mail [EMAIL] the summary");
    assert_eq!(
        miss.json()["choices"][0]["message"]["content"],
        "Reply to [EMAIL] now"
    );

    let hit = ask(&p, A, &ask_about("jane@example.com", false), None).await;
    assert_eq!(cache(&hit), "hit");
    assert_eq!(hit.text(), miss.text(), "the masked answer, replayed");
    let other = ask(&p, A, &ask_about("kim@example.net", false), None).await;
    assert_eq!(cache(&other), "hit", "the same masked request");
    assert_eq!(up.hits("masked"), 1);

    let mut card = body("masked", "Charge 4111 1111 1111 1111 please");
    card["echo"] = json!("ok");
    let blocked = ask(&p, A, &card, None).await;
    assert_eq!(blocked.status, StatusCode::BAD_REQUEST);
    assert_eq!(blocked.error_code(), "masking_blocked");
    assert_eq!(up.hits("masked"), 1);

    let streamed = ask(&p, A, &ask_about("jane@example.com", true), None).await;
    assert_eq!(streamed.status, StatusCode::OK);
    assert_eq!(cache(&streamed), "miss", "a stream is an entry of its own");
    assert!(streamed.text().contains("[EMAIL]"), "{}", streamed.text());
    assert!(!streamed.text().contains("bob@"), "{}", streamed.text());
    assert_eq!(up.hits("masked"), 2);
    let replayed = ask(&p, A, &ask_about("kim@example.net", true), None).await;
    assert_eq!(cache(&replayed), "hit");
    assert_eq!(
        replayed.text(),
        streamed.text(),
        "the masked stream, replayed"
    );
    assert_eq!(up.hits("masked"), 2);
}

/// examples/policies.yaml as it is (the harness puts its listeners on free ports): the
/// second identical question is a hit, the first was mirrored to the shadow candidate, and
/// a request over the spend guard is refused naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policies_example_caches_and_mirrors_to_its_shadow() {
    let yaml = std::fs::read_to_string(repo_root().join("examples/policies.yaml")).unwrap();
    let p = Proxy::start(&yaml);
    let q = json!({"model": "mock-gpt", "messages": [{"role": "user", "content": "Say hello"}]});
    let first = ask(&p, DEMO_KEY, &q, None).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text());
    assert_eq!(cache(&first), "miss");
    let again = ask(&p, DEMO_KEY, &q, None).await;
    assert_eq!(cache(&again), "hit");
    assert_eq!(again.text(), first.text());
    eventually(
        Duration::from_secs(20),
        "the shadow call recorded",
        || async {
            p.metric(
                "modelgate_backend_requests_total",
                &[
                    ("backend", "mock-next"),
                    ("shadow", "true"),
                    ("outcome", "ok"),
                ],
            )
            .await
                == 1.0
        },
    )
    .await;
    let big = json!({"model": "mock-gpt", "max_tokens": 100_000,
        "messages": [{"role": "user", "content": "Write a book"}]});
    let r = ask(&p, DEMO_KEY, &big, None).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    assert_eq!(r.error_code(), "max_cost_per_request_exceeded");
    assert!(r.text().contains("maxCostPerRequest"), "{}", r.text());
}

/// GitOps deletes a route with a cache and masking rules, and drops a rule from a route that
/// stays: once the (shortened) grace has passed, `/metrics` names neither the route nor the
/// rule, and the route that stays keeps its counts. `/config` shows each route's cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_routes_cache_and_masking_series_leave_metrics_after_the_grace() {
    let up = MockUpstream::start();
    let yaml = |with_gone: bool| {
        let gone = format!(
            r#"
  - name: gone
    model: gone
    cache: {{}}
    masking:
      rules:
        - {{name: mail, detector: email}}
    backends:
      - {{name: up, provider: openai-compatible, url: "{gone}"}}"#,
            gone = up.url("id=gone"),
        );
        let ticket = r#"
        - {name: ticket, pattern: "TICKET-[0-9]{4}"}"#;
        format!(
            r#"
routes:{gone}
  - name: kept
    model: kept
    cache: {{ttl: 10m, maxEntryBytes: 4096, perKey: true}}
    masking:
      rules:
        - {{name: mail, detector: email}}{ticket}
    backends:
      - {{name: up, provider: openai-compatible, url: "{kept}"}}
keys:
  - {{name: a, sha256: {a}}}
"#,
            gone = if with_gone { gone.as_str() } else { "" },
            ticket = if with_gone { ticket } else { "" },
            kept = up.url("id=kept"),
            a = sha256_hex(A),
        )
    };
    let p = Proxy::start_with_args(&yaml(true), &["--series-grace", "1s"], &[]);
    for model in ["gone", "kept"] {
        let q = body(model, "Mail jane@example.com about TICKET-1234");
        assert_eq!(cache(&ask(&p, A, &q, None).await), "miss");
        assert_eq!(cache(&ask(&p, A, &q, None).await), "hit");
    }
    let m = p.metrics().await;
    for route in ["default/gone", "default/kept"] {
        let hit = [("route", route), ("result", "hit")];
        assert_eq!(metric(&m, "modelgate_cache_requests_total", &hit), 1.0);
        let route = [("route", route)];
        assert!(metric(&m, "modelgate_cache_tokens_saved_total", &route) > 0.0);
        let mail = [("route", route[0].1), ("rule", "mail")];
        assert_eq!(metric(&m, "modelgate_masking_total", &mail), 2.0, "{m}");
    }
    assert!(m.contains(r#"modelgate_cache_cost_saved_usd_total{route="default/gone"}"#));
    let ticket = [("route", "default/kept"), ("rule", "ticket")];
    assert_eq!(metric(&m, "modelgate_masking_total", &ticket), 2.0);
    let config = get(&p.admin_url("/config"), None).await.json();
    let routes = config["snapshot"]["routes"].as_array().unwrap().clone();
    let shown = |name: &str| routes.iter().find(|r| r["name"] == name).unwrap()["cache"].clone();
    assert_eq!(
        shown("kept"),
        json!({"ttl": "10m", "maxEntryBytes": 4096, "perKey": true, "cacheSampled": false,
            "hitCostFraction": 0.0})
    );
    assert_eq!(shown("gone")["ttl"], "5m", "the default in force");
    let version = config["version"].clone();

    p.write_config(&yaml(false));
    eventually(
        Duration::from_secs(20),
        "the new config in force",
        || async { get(&p.admin_url("/config"), None).await.json()["version"] != version },
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "the deleted route's and the dropped rule's series gone from /metrics",
        || async {
            let m = p.metrics().await;
            !m.contains(r#"route="default/gone""#) && !m.contains(r#"rule="ticket""#)
        },
    )
    .await;
    let m = p.metrics().await;
    let hit = [("route", "default/kept"), ("result", "hit")];
    assert_eq!(
        metric(&m, "modelgate_cache_requests_total", &hit),
        1.0,
        "{m}"
    );
    let mail = [("route", "default/kept"), ("rule", "mail")];
    assert_eq!(metric(&m, "modelgate_masking_total", &mail), 2.0, "{m}");
    let routes = get(&p.admin_url("/config"), None).await.json()["snapshot"]["routes"].clone();
    assert_eq!(routes.as_array().unwrap().len(), 1, "{routes}");
}
