//! Upstream answers that are not what was asked for, and upstreams that ask for patience.
//!
//! A whole JSON answer to a stream request reaches the client as a valid stream (also for the
//! official OpenAI SDK) and is metered; a 2xx that is not JSON is a 502, never passed on; an
//! answer without usage is estimated from its text. `Retry-After` on 429/503 is waited out
//! when it fits the route's timeout, and sends the request on to the next tier when not.

use std::process::Command;
use std::time::{Duration, Instant};

use http::StatusCode;
use modelgate_tests::harness::*;
use modelgate_tests::upstream::MockUpstream;
use serde_json::json;

const KEY: &str = "sk-test-answers";

fn config(up: &MockUpstream) -> String {
    format!(
        r#"
routes:
  - name: whole
    model: whole
    backends:
      - {{name: up, provider: openai-compatible, url: "{whole}"}}
  - name: wholenousage
    model: wholenousage
    backends:
      - {{name: up, provider: openai-compatible, url: "{whole_nousage}"}}
  - name: nousage
    model: nousage
    backends:
      - {{name: up, provider: openai-compatible, url: "{nousage}"}}
  - name: text
    model: text
    retries: {{attempts: 0}}
    backends:
      - {{name: up, provider: openai-compatible, url: "{text}"}}
  - name: errorjson
    model: errorjson
    retries: {{attempts: 0}}
    backends:
      - {{name: up, provider: openai-compatible, url: "{error_json}"}}
keys:
  - {{name: k, sha256: {key}}}
"#,
        whole = up.url("id=whole;json_stream=1;chunks=5;prompt_tokens=7"),
        whole_nousage = up.url("id=wholenousage;json_stream=1;usage=0;chunks=4"),
        nousage = up.url("id=nousage;usage=0;chunks=4"),
        text = up.url("id=text;text=1"),
        // A 200 whose JSON is an error object, not an answer.
        error_json = up.url("id=errorjson;status=200"),
        key = sha256_hex(KEY),
    )
}

/// The `data:` events of a stream, parsed; asserts every event is one and it ends in [DONE].
fn events(text: &str) -> Vec<serde_json::Value> {
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").expect("only data events"))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

fn content(events: &[serde_json::Value]) -> String {
    events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_answer_to_a_stream_request_reaches_the_client_as_a_stream() {
    let up = MockUpstream::start();
    let p = Proxy::start(&config(&up));
    let url = p.url("/v1/chat/completions");

    let r = post(&url, Some(KEY), &chat("whole", true)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let ev = events(&r.text());
    assert!(ev.iter().all(|e| e["object"] == "chat.completion.chunk"));
    assert!(ev.iter().all(|e| e["id"] == "chatcmpl-upstream"));
    assert_eq!(ev[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(content(&ev), "tok tok tok tok tok");
    assert_eq!(ev.last().unwrap()["choices"][0]["finish_reason"], "stop");
    assert!(
        ev.iter().all(|e| e.get("usage").is_none()),
        "no usage chunk unless asked for"
    );

    let mut body = chat("whole", true);
    body["stream_options"] = json!({"include_usage": true});
    let r = post(&url, Some(KEY), &body).await;
    let ev = events(&r.text());
    let last = ev.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["prompt_tokens"], 7);
    assert_eq!(last["usage"]["completion_tokens"], 5);

    let r = post(
        &p.url("/v1/completions"),
        Some(KEY),
        &json!({"model": "whole", "prompt": "Once", "stream": true}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let ev = events(&r.text());
    assert!(ev.iter().all(|e| e["object"] == "text_completion"));
    let text: String = ev
        .iter()
        .filter_map(|e| e["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, "tok tok tok tok tok");

    // Metered from the answer's usage: 3 × (7 in, 5 out), none of it estimated.
    let m = p.metrics().await;
    let tokens = |kind| {
        metric(
            &m,
            "modelgate_tokens_total",
            &[("route", "default/whole"), ("kind", kind)],
        )
    };
    assert_eq!(tokens("input"), 21.0, "{m}");
    assert_eq!(tokens("output"), 15.0, "{m}");
    assert_eq!(
        metric(
            &m,
            "modelgate_usage_estimated_total",
            &[("route", "default/whole")]
        ),
        0.0
    );
    assert_eq!(up.hits("whole"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_without_usage_are_estimated_from_their_text() {
    let up = MockUpstream::start();
    let p = Proxy::start(&config(&up));
    let url = p.url("/v1/chat/completions");

    // "tok tok tok tok": 15 characters, 4 tokens at four characters a token.
    let r = post(&url, Some(KEY), &chat("wholenousage", true)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(content(&events(&r.text())), "tok tok tok tok");
    let r = post(&url, Some(KEY), &chat("nousage", false)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        r.json()["choices"][0]["message"]["content"],
        "tok tok tok tok"
    );

    let m = p.metrics().await;
    for route in ["default/wholenousage", "default/nousage"] {
        assert_eq!(
            metric(
                &m,
                "modelgate_tokens_total",
                &[("route", route), ("kind", "output")]
            ),
            4.0,
            "{route}: {m}"
        );
        assert_eq!(
            metric(&m, "modelgate_usage_estimated_total", &[("route", route)]),
            1.0,
            "{route}: {m}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2xx_that_is_not_an_answer_is_a_502() {
    let up = MockUpstream::start();
    let p = Proxy::start(&config(&up));
    let url = p.url("/v1/chat/completions");

    let cases = [
        ("text", false, "text/plain"),
        ("text", true, "text/plain"),
        ("errorjson", true, "not a complete chat.completion response"),
    ];
    for (model, stream, says) in cases {
        let r = post(&url, Some(KEY), &chat(model, stream)).await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{model} {stream}");
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.error_code(), "upstream_protocol_error");
        let body = r.json();
        assert_eq!(body["error"]["type"], "upstream_error");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{model} {stream}: {message}");
        assert!(
            !message.contains("all good"),
            "the upstream's body is not passed on"
        );
    }
    // A JSON error object with a 200 is still JSON: passed on when no stream was asked for.
    let r = post(&url, Some(KEY), &chat("errorjson", false)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["error"]["type"], "mock_error");

    let m = p.metrics().await;
    assert_eq!(
        metric(
            &m,
            "modelgate_requests_total",
            &[("route", "default/text"), ("status", "502")]
        ),
        2.0,
        "{m}"
    );
    assert_eq!(up.hits("text"), 2, "a 502 of this kind is not retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_reads_a_stream_made_from_a_json_answer() {
    let up = MockUpstream::start();
    let p = Proxy::start(&config(&up));
    let out = tokio::task::spawn_blocking({
        let base = p.url("/v1");
        move || {
            Command::new(python())
                .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
                .arg(repo_root().join("tests/python/test_whole_answers.py"))
                .env("MODELGATE_BASE_URL", base)
                .env("MODELGATE_KEY", KEY)
                .output()
                .expect("run pytest")
        }
    })
    .await
    .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the SDK tests failed:\n{report}");
    assert!(report.contains("3 passed"), "{report}");
}

fn retry_config(up: &MockUpstream) -> String {
    format!(
        r#"
routes:
  # A backoff far beyond the timeout: only an honoured Retry-After lets a retry happen.
  - name: patient
    model: patient
    timeout: 30s
    retries: {{attempts: 1, backoff: 1h, maxBackoff: 1h}}
    backends:
      - {{name: busy, provider: openai-compatible, url: "{busy}"}}
  - name: overloaded
    model: overloaded
    timeout: 30s
    retries: {{attempts: 1, backoff: 1h, maxBackoff: 1h}}
    backends:
      - {{name: down, provider: openai-compatible, url: "{down}"}}
  # Retry-Afters the route cannot wait out: the spare tier answers at once.
  - name: beyondtimeout
    model: beyondtimeout
    timeout: 10s
    retries: {{attempts: 2, backoff: 1ms}}
    backends:
      - {{name: slowpoke, provider: openai-compatible, url: "{thirty}", priority: 0}}
      - {{name: spare, provider: openai-compatible, url: "{spare1}", priority: 1}}
  - name: absurd
    model: absurd
    retries: {{attempts: 2, backoff: 1ms}}
    backends:
      - {{name: sleeper, provider: openai-compatible, url: "{hour}", priority: 0}}
      - {{name: spare, provider: openai-compatible, url: "{spare2}", priority: 1}}
  - name: alone
    model: alone
    retries: {{attempts: 2, backoff: 1ms}}
    backends:
      - {{name: sleeper, provider: openai-compatible, url: "{alone}"}}
keys:
  - {{name: k, sha256: {key}}}
"#,
        busy = up.url("id=busy;status=429;fail_first=1;retry_after=1"),
        down = up.url("id=down;status=503;fail_first=1;retry_after=1"),
        thirty = up.url("id=thirty;status=429;retry_after=30"),
        spare1 = up.url("id=spare1"),
        hour = up.url("id=hour;status=503;retry_after=3600"),
        spare2 = up.url("id=spare2"),
        alone = up.url("id=alone;status=429;retry_after=3600"),
        key = sha256_hex(KEY),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_that_fits_the_timeout_is_waited_out_instead_of_the_backoff() {
    let up = MockUpstream::start();
    let p = Proxy::start(&retry_config(&up));
    let url = p.url("/v1/chat/completions");
    for (model, id) in [("patient", "busy"), ("overloaded", "down")] {
        let started = Instant::now();
        let r = post(&url, Some(KEY), &chat(model, false)).await;
        let took = started.elapsed();
        assert_eq!(r.status, StatusCode::OK, "{model}: {}", r.text());
        // The first attempt failed with Retry-After: 1; the second, after the wait, answered.
        assert_eq!(up.hits(id), 2, "{model}");
        // A lower bound only (the proxy waited at least what the upstream asked for): a busy
        // machine makes it longer, never shorter. The 1 h backoff is the upper side: had the
        // proxy used it instead, the 30 s route timeout would have failed the request.
        assert!(
            took >= Duration::from_secs(1),
            "{model}: retried after {took:?}"
        );
    }
    let m = p.metrics().await;
    for route in ["default/patient", "default/overloaded"] {
        assert_eq!(
            metric(&m, "modelgate_retries_total", &[("route", route)]),
            1.0,
            "{route}: {m}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_beyond_the_budget_moves_to_the_next_tier_at_once() {
    let up = MockUpstream::start();
    let p = Proxy::start(&retry_config(&up));
    let url = p.url("/v1/chat/completions");
    // 30 s does not fit a 10 s timeout; an hour is beyond what any request waits.
    for (model, first, spare) in [
        ("beyondtimeout", "thirty", "spare1"),
        ("absurd", "hour", "spare2"),
    ] {
        let r = post(&url, Some(KEY), &chat(model, false)).await;
        assert_eq!(r.status, StatusCode::OK, "{model}: {}", r.text());
        assert_eq!(r.header("x-modelgate-backend"), Some("spare"));
        assert_eq!(up.hits(first), 1, "{model}: not retried");
        assert_eq!(up.hits(spare), 1, "{model}");
    }
    // With no other backend the upstream's 429 and its Retry-After reach the client at once.
    let r = post(&url, Some(KEY), &chat("alone", false)).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.header("retry-after"), Some("3600"));
    assert_eq!(up.hits("alone"), 1);

    let m = p.metrics().await;
    for route in ["default/beyondtimeout", "default/absurd"] {
        assert_eq!(
            metric(&m, "modelgate_fallbacks_total", &[("route", route)]),
            1.0,
            "{route}: {m}"
        );
        assert_eq!(
            metric(&m, "modelgate_retries_total", &[("route", route)]),
            0.0,
            "{route}: {m}"
        );
    }
}
