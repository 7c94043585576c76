//! Translated providers over real sockets: an OpenAI client of the real proxy, whose route's
//! backend is an upstream speaking Anthropic's Messages API (the mock of `upstream.rs`, in
//! Anthropic's wire format). Asserts field by field what the upstream received and what the
//! client got, for JSON answers and streams, and what the meter counted.

use std::sync::atomic::Ordering;
use std::time::Duration;

use http::StatusCode;
use http_body_util::BodyExt;
use modelgate_tests::harness::*;
use modelgate_tests::upstream::MockUpstream;
use serde_json::{Value, json};

const PROVIDER_KEY: &str = "sk-ant-test-provider-key";

/// One route `claude` on an Anthropic backend with these mock knobs; a second route
/// `claude-fallback` whose first tier fails with `status` and falls to a healthy tier.
fn config(up: &MockUpstream, knobs: &str) -> String {
    format!(
        r#"
routes:
  - name: claude
    model: claude
    backends:
      - name: anthropic
        provider: anthropic
        url: {url}
        model: claude-upstream-1
        credentials: {{env: ANTHROPIC_TEST_KEY}}
        anthropic: {{beta: [prompt-caching-2024-07-31]}}
        pricing: {{inputPerMillion: 3, outputPerMillion: 15, cacheReadPerMillion: 0.3, cacheWritePerMillion: 3.75}}
  - name: claude-fallback
    model: claude-fallback
    retries: {{attempts: 0}}
    backends:
      - name: overloaded
        provider: anthropic
        url: {overloaded}
        credentials: {{env: ANTHROPIC_TEST_KEY}}
      - name: healthy
        provider: anthropic
        priority: 1
        url: {healthy}
        credentials: {{env: ANTHROPIC_TEST_KEY}}
keys:
  - {{name: demo, sha256: {demo}}}
"#,
        url = up.url(knobs),
        overloaded = up.url("id=busy;status=529"),
        healthy = up.url("id=healthy"),
        demo = sha256_hex(DEMO_KEY),
    )
}

fn start(up: &MockUpstream, knobs: &str) -> Proxy {
    Proxy::start_with(&config(up, knobs), &[("ANTHROPIC_TEST_KEY", PROVIDER_KEY)])
}

fn request(stream: bool) -> Value {
    json!({"model": "claude", "stream": stream,
        "stream_options": if stream { json!({"include_usage": true}) } else { Value::Null },
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"}
        ],
        "tools": [{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]})
}

/// The `data` of every event of an OpenAI stream, `[DONE]` as a string.
fn events(body: &str) -> Vec<Value> {
    body.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap_or(Value::String(d.to_owned())))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openai_client_gets_an_anthropic_answer_in_openai_shape() {
    let up = MockUpstream::start();
    let p = start(
        &up,
        "id=json;prompt_tokens=10;cache_read=3;cache_write=2;chunks=4",
    );
    let r = post(
        &p.url("/v1/chat/completions"),
        Some(DEMO_KEY),
        &request(false),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(
        v["model"], "claude",
        "the client's name, not the upstream's"
    );
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "tok0 tok1 tok2 tok3 "
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // Anthropic's input_tokens excludes the cache; OpenAI's prompt_tokens includes it.
    assert_eq!(v["usage"]["prompt_tokens"], 15);
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 3);
    assert_eq!(v["usage"]["completion_tokens"], 4);

    // What the upstream was sent: Anthropic's headers and body.
    let c = up.counters("json");
    let headers = c.last_headers.lock().unwrap().clone().unwrap();
    assert_eq!(headers["x-api-key"], PROVIDER_KEY);
    assert_eq!(headers["anthropic-version"], "2023-06-01");
    assert_eq!(headers["anthropic-beta"], "prompt-caching-2024-07-31");
    assert!(
        headers.get("authorization").is_none(),
        "no bearer to Anthropic"
    );
    let sent = c.last_body.lock().unwrap().clone().unwrap();
    assert_eq!(sent["model"], "claude-upstream-1");
    assert_eq!(sent["system"][0]["text"], "Be brief.");
    assert_eq!(
        sent["messages"],
        json!([{"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]}])
    );
    // No max_tokens from the client: the reservation (the proxy's default) is sent.
    assert_eq!(sent["max_tokens"], 1024);
    assert_eq!(sent["tools"][0]["name"], "get_weather");
    assert!(sent.get("seed").is_none() && sent.get("presence_penalty").is_none());
    assert_eq!(
        sent["tools"][0]["input_schema"]["properties"]["city"]["type"],
        "string"
    );

    // Each kind metered once, priced at its own rate.
    let m = p.metrics().await;
    let tokens = |kind: &str| {
        metric(
            &m,
            "modelgate_tokens_total",
            &[("route", "default/claude"), ("kind", kind)],
        )
    };
    assert_eq!(tokens("input"), 10.0);
    assert_eq!(tokens("cache_read"), 3.0);
    assert_eq!(tokens("cache_write"), 2.0);
    assert_eq!(tokens("output"), 4.0);
    let cost = metric(
        &m,
        "modelgate_cost_usd_total",
        &[("route", "default/claude")],
    );
    let expected = (10.0 * 3.0 + 3.0 * 0.3 + 2.0 * 3.75 + 4.0 * 15.0) / 1e6;
    assert!((cost - expected).abs() < 1e-12, "{cost} != {expected}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anthropic_stream_reaches_an_openai_client_as_chunks_with_tools_and_thinking() {
    let up = MockUpstream::start();
    let p = start(
        &up,
        "id=stream;prompt_tokens=10;cache_read=3;chunks=3;thinking=1;tool=1",
    );
    let r = post(
        &p.url("/v1/chat/completions"),
        Some(DEMO_KEY),
        &request(true),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let ev = events(&r.text());
    assert_eq!(ev.last(), Some(&Value::String("[DONE]".into())), "{ev:#?}");
    let chunks = &ev[..ev.len() - 1];
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    for c in chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["model"], "claude");
        assert_eq!(c["id"], chunks[0]["id"], "one id for the whole stream");
    }
    let joined = |field: &str| -> String {
        chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"][field].as_str())
            .collect()
    };
    assert_eq!(joined("content"), "tok0 tok1 tok2 ");
    assert_eq!(joined("reasoning_content"), "Let me think.");
    let blocks: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["thinking_blocks"].as_array())
        .flatten()
        .collect();
    assert_eq!(
        blocks.len(),
        1,
        "the whole thinking block, signature included, once"
    );
    assert_eq!(blocks[0]["type"], "thinking");
    assert_eq!(blocks[0]["thinking"], "Let me think.");
    assert!(
        blocks[0]["signature"]
            .as_str()
            .is_some_and(|s| !s.is_empty())
    );
    let calls: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array())
        .flatten()
        .collect();
    assert_eq!(calls[0]["index"], 0);
    assert_eq!(calls[0]["id"], "toolu_mock1");
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    let args: String = calls
        .iter()
        .filter_map(|c| c["function"]["arguments"].as_str())
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&args).unwrap(),
        json!({"city": "Paris"})
    );
    let finish: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish, [&json!("tool_calls")]);
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(chunks.last().unwrap()["choices"], json!([]));
    assert_eq!(
        usage["prompt_tokens"], 13,
        "input from message_start plus the cache read"
    );
    assert_eq!(usage["completion_tokens"], 3 + 3 + 4);

    let sent = up
        .counters("stream")
        .last_body
        .lock()
        .unwrap()
        .clone()
        .unwrap();
    assert_eq!(sent["stream"], true);
    assert!(
        sent.get("stream_options").is_none(),
        "not an Anthropic field"
    );
    eventually(Duration::from_secs(10), "the stream is metered", || async {
        let m = p.metrics().await;
        metric(
            &m,
            "modelgate_tokens_total",
            &[("route", "default/claude"), ("kind", "input")],
        ) == 10.0
            && metric(
                &m,
                "modelgate_tokens_total",
                &[("route", "default/claude"), ("kind", "cache_read")],
            ) == 3.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_tokens_from_message_start_count_when_message_delta_reports_output_only() {
    let up = MockUpstream::start();
    let p = start(&up, "id=old;prompt_tokens=21;chunks=2;old_usage=1");
    let r = post(
        &p.url("/v1/chat/completions"),
        Some(DEMO_KEY),
        &request(true),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let ev = events(&r.text());
    let usage = &ev[ev.len() - 2]["usage"];
    assert_eq!(usage["prompt_tokens"], 21, "not zero: message_start had it");
    assert_eq!(usage["completion_tokens"], 2);
    eventually(Duration::from_secs(10), "input metered", || async {
        p.metric(
            "modelgate_tokens_total",
            &[("route", "default/claude"), ("kind", "input")],
        )
        .await
            == 21.0
    })
    .await;
}

/// An Anthropic client asks for a stream; the OpenAI-compatible upstream answers with a whole
/// JSON answer instead: the client still gets Anthropic's named events, metered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_answer_to_a_stream_request_reaches_an_anthropic_client_as_its_events() {
    let up = MockUpstream::start();
    let yaml = format!(
        "routes:\n  - name: gpt\n    model: gpt\n    backends:\n      - {{name: up, provider: openai-compatible, url: {}}}\nkeys:\n  - {{name: demo, sha256: {}}}\n",
        up.url("id=whole;json_stream=1;chunks=3;prompt_tokens=12"),
        sha256_hex(DEMO_KEY)
    );
    let p = Proxy::start(&yaml);
    let r = post(
        &p.url("/v1/messages"),
        Some(DEMO_KEY),
        &json!({"model": "gpt", "max_tokens": 32, "stream": true,
            "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let text = r.text();
    let data: Vec<Value> = text
        .split(
            "

",
        )
        .filter_map(|e| {
            e.split_once(
                "
data: ",
            )
            .map(|(_, d)| d)
        })
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(data[0]["type"], "message_start", "{text}");
    let joined: String = data
        .iter()
        .filter_map(|d| d["delta"]["text"].as_str())
        .collect();
    assert_eq!(joined, "tok tok tok");
    let delta = data.iter().find(|d| d["type"] == "message_delta").unwrap();
    assert_eq!(delta["usage"]["input_tokens"], 12);
    assert_eq!(delta["usage"]["output_tokens"], 3);
    assert_eq!(data.last().unwrap()["type"], "message_stop");
    eventually(Duration::from_secs(10), "metered once", || async {
        p.metric(
            "modelgate_tokens_total",
            &[("route", "default/gpt"), ("kind", "input")],
        )
        .await
            == 12.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_errors_reach_openai_clients_in_openai_shape() {
    let up = MockUpstream::start();
    // A client error the upstream explains: passed on with its status, rewritten.
    let p = start(&up, "id=bad;status=400");
    let r = post(
        &p.url("/v1/chat/completions"),
        Some(DEMO_KEY),
        &request(false),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let v = r.json();
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    assert_eq!(v["error"]["message"], "mock upstream failure");
    assert!(v.get("type").is_none(), "not Anthropic's envelope: {v}");

    // What Anthropic cannot express is refused before any upstream is asked.
    let mut two = request(false);
    two["n"] = json!(2);
    let r = post(&p.url("/v1/chat/completions"), Some(DEMO_KEY), &two).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["error"]["param"], "n", "{}", r.text());
    assert_eq!(
        up.hits("bad"),
        1,
        "the refused request never left the gateway"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overloaded_anthropic_backend_falls_over_and_a_mid_stream_overload_ends_the_stream() {
    let up = MockUpstream::start();
    let p = start(&up, "id=mid;overloaded_mid=1");
    // 529 before the answer: the next tier answers.
    let mut req = request(false);
    req["model"] = json!("claude-fallback");
    let r = post(&p.url("/v1/chat/completions"), Some(DEMO_KEY), &req).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.header("x-modelgate-backend"), Some("healthy"));
    assert_eq!(up.hits("busy"), 1);
    let m = p.metrics().await;
    assert_eq!(
        metric(
            &m,
            "modelgate_upstream_errors_total",
            &[("backend", "overloaded")]
        ),
        1.0,
        "{m}"
    );
    // After message_start nothing can be retried: the client reads the error as the last event.
    let resp = post_stream(
        &p.url("/v1/chat/completions"),
        Some(DEMO_KEY),
        &request(true),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.map(|b| b.to_bytes());
    let text = String::from_utf8_lossy(&body.unwrap_or_default()).into_owned();
    let ev = events(&text);
    let last = ev.last().unwrap();
    assert!(last["error"]["message"].as_str().is_some(), "{text}");
    assert!(!text.contains("[DONE]"), "{text}");
    assert_eq!(up.counters("mid").completed.load(Ordering::SeqCst), 1);
    // The upstream's own error event breaks the stream for the meter too.
    eventually(
        Duration::from_secs(10),
        "the broken stream is counted",
        || async {
            p.metric(
                "modelgate_upstream_errors_total",
                &[("route", "default/claude"), ("kind", "stream_broken")],
            )
            .await
                == 1.0
        },
    )
    .await;
}
