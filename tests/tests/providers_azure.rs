//! Azure OpenAI backends over real sockets: an OpenAI client of the real proxy, whose routes'
//! backends are the mock upstream in its Azure mode (`upstream.rs`: Azure's paths, filter
//! results in answers, prompt-filter and annotation chunks in streams, the content-filter
//! 400). Asserts what the upstream received (path, `api-version`, auth headers, body model)
//! and what the client got: OpenAI's shape, Azure's filter chunks gone from streams.

use std::time::Duration;

use http::StatusCode;
use modelgate_tests::harness::*;
use modelgate_tests::upstream::{Counters, MockUpstream};
use serde_json::{Value, json};

const AZURE_KEY: &str = "azure-test-resource-key-0123";

/// Route `gpt` on a classic backend (deployment + api-version), route `gpt-v1` on the v1 API
/// (the backend's model names the deployment); both with these knobs on their own ids.
fn config(up: &MockUpstream, knobs: &str) -> String {
    format!(
        r#"
routes:
  - name: gpt
    model: gpt
    backends:
      - name: azure
        provider: azure-openai
        url: {classic}
        credentials: {{env: AZURE_TEST_KEY}}
        azure: {{deployment: gpt-4o-prod, apiVersion: 2024-10-21}}
        pricing: {{inputPerMillion: 2.5, outputPerMillion: 10}}
  - name: gpt-v1
    model: gpt-v1
    backends:
      - name: azure-v1
        provider: azure-openai
        url: {v1}/openai/v1
        model: gpt-4o-deployment
        credentials: {{env: AZURE_TEST_KEY}}
keys:
  - {{name: demo, sha256: {demo}}}
"#,
        classic = up.azure_endpoint(&format!("id=classic;{knobs}")),
        v1 = up.azure_endpoint(&format!("id=v1;{knobs}")),
        demo = sha256_hex(DEMO_KEY),
    )
}

fn start(up: &MockUpstream, knobs: &str) -> Proxy {
    Proxy::start_with(&config(up, knobs), &[("AZURE_TEST_KEY", AZURE_KEY)])
}

fn request(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream,
        "stream_options": if stream { json!({"include_usage": true}) } else { Value::Null },
        "messages": [{"role": "user", "content": "Say hello"}]})
}

/// The `data` of every event of an OpenAI stream, `[DONE]` as a string.
fn events(body: &str) -> Vec<Value> {
    body.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap_or(Value::String(d.to_owned())))
        .collect()
}

/// What the upstream last received: path (knobs stripped), query, headers, body.
fn received(c: &Counters) -> (String, Option<String>, http::HeaderMap, Value) {
    (
        c.last_path.lock().unwrap().clone().unwrap(),
        c.last_query.lock().unwrap().clone(),
        c.last_headers.lock().unwrap().clone().unwrap(),
        c.last_body.lock().unwrap().clone().unwrap(),
    )
}

/// Every chunk is one an OpenAI client expects: choices that each carry a delta (or a finish,
/// which Azure may send on an annotation chunk with an empty `object`), and none of Azure's
/// prompt-filter results.
fn assert_openai_chunks(chunks: &[Value]) {
    for c in chunks {
        if c["choices"][0].get("delta").is_some() {
            assert_eq!(c["object"], "chat.completion.chunk", "{c}");
        }
        assert!(c.get("prompt_filter_results").is_none(), "{c}");
        for choice in c["choices"].as_array().unwrap() {
            assert!(
                choice.get("delta").is_some() || !choice["finish_reason"].is_null(),
                "an annotation-only choice reached the client: {c}"
            );
            assert!(
                choice.get("content_filter_offsets").is_none()
                    || !choice["finish_reason"].is_null(),
                "{c}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_classic_deployment_gets_the_api_version_and_the_api_key_and_answers_pass_through() {
    let up = MockUpstream::start();
    let p = start(&up, "chunks=4;prompt_tokens=12");
    let r = post(
        &p.url("/v1/chat/completions"),
        Some(DEMO_KEY),
        &request("gpt", false),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let (path, query, headers, body) = received(&up.counters("classic"));
    assert_eq!(path, "/openai/deployments/gpt-4o-prod/chat/completions");
    assert_eq!(query.as_deref(), Some("api-version=2024-10-21"));
    assert_eq!(headers["api-key"], AZURE_KEY);
    assert!(
        headers.get("authorization").is_none(),
        "no bearer with auth: apiKey"
    );
    assert!(
        !headers
            .values()
            .any(|v| v.as_bytes() == DEMO_KEY.as_bytes()),
        "the client's gateway key never reaches Azure"
    );
    assert_eq!(
        body["model"], "gpt",
        "spliced as for OpenAI (the deployment decides)"
    );
    assert_eq!(body["messages"][0]["content"], "Say hello");

    // The answer is Azure's, passed through: OpenAI's fields, Azure's extra ones kept.
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], "tok tok tok tok");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        v["prompt_filter_results"][0]["content_filter_results"]["hate"]["filtered"],
        false
    );
    assert!(v["choices"][0]["content_filter_results"].is_object());
    assert_eq!(r.header("x-modelgate-backend"), Some("azure"));
    let m = p.metrics().await;
    let tokens = |kind: &str| {
        metric(
            &m,
            "modelgate_tokens_total",
            &[("route", "default/gpt"), ("kind", kind)],
        )
    };
    assert_eq!(tokens("input"), 12.0, "{m}");
    assert_eq!(tokens("output"), 4.0);

    // Embeddings and completions take the deployment's URLs too.
    let r = post(
        &p.url("/v1/embeddings"),
        Some(DEMO_KEY),
        &json!({"model": "gpt", "input": ["a", "b"]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["data"].as_array().unwrap().len(), 2);
    let (path, query, _, _) = received(&up.counters("classic"));
    assert_eq!(path, "/openai/deployments/gpt-4o-prod/embeddings");
    assert_eq!(query.as_deref(), Some("api-version=2024-10-21"));
    let r = post(
        &p.url("/v1/completions"),
        Some(DEMO_KEY),
        &json!({"model": "gpt", "prompt": "Say"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        received(&up.counters("classic")).0,
        "/openai/deployments/gpt-4o-prod/completions"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_classic_stream_reaches_the_client_without_azures_filter_chunks() {
    let up = MockUpstream::start();
    let p = start(&up, "chunks=3;prompt_tokens=9");
    let r = post(
        &p.url("/v1/chat/completions"),
        Some(DEMO_KEY),
        &request("gpt", true),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let text = r.text();
    assert!(!text.contains("prompt_filter_results"), "{text}");
    assert!(!text.contains("content_filter_offsets"), "{text}");
    let ev = events(&text);
    assert_eq!(ev.last(), Some(&json!("[DONE]")), "{text}");
    let chunks = &ev[..ev.len() - 1];
    assert_openai_chunks(chunks);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "tok0 tok1 tok2 ");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["prompt_tokens"], 9);
    assert_eq!(usage["usage"]["completion_tokens"], 3);
    // Role, three contents, the finish, usage: nothing else.
    assert_eq!(chunks.len(), 6, "{text}");

    let (path, query, headers, body) = received(&up.counters("classic"));
    assert_eq!(path, "/openai/deployments/gpt-4o-prod/chat/completions");
    assert_eq!(query.as_deref(), Some("api-version=2024-10-21"));
    assert_eq!(headers["api-key"], AZURE_KEY);
    assert_eq!(headers["accept"], "text/event-stream");
    assert_eq!(body["stream_options"]["include_usage"], true);
    eventually(Duration::from_secs(10), "the stream is metered", || async {
        p.metric(
            "modelgate_tokens_total",
            &[("route", "default/gpt"), ("kind", "output")],
        )
        .await
            == 3.0
    })
    .await;

    // A client that did not ask for usage does not get Azure's usage chunk either.
    let r = post(
        &p.url("/v1/chat/completions"),
        Some(DEMO_KEY),
        &json!({"model": "gpt", "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    let ev = events(&r.text());
    let chunks = &ev[..ev.len() - 1];
    assert_openai_chunks(chunks);
    assert!(chunks.iter().all(|c| c["usage"].is_null()), "{ev:?}");
    assert_eq!(chunks.len(), 5, "{ev:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_v1_api_takes_the_deployment_as_the_body_model_and_no_api_version() {
    let up = MockUpstream::start();
    let p = start(&up, "chunks=2");
    let r = post(
        &p.url("/v1/chat/completions"),
        Some(DEMO_KEY),
        &request("gpt-v1", false),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let (path, query, headers, body) = received(&up.counters("v1"));
    assert_eq!(path, "/openai/v1/chat/completions");
    assert_eq!(query, None, "no api-version with the v1 API");
    assert_eq!(headers["api-key"], AZURE_KEY);
    assert!(headers.get("authorization").is_none());
    assert_eq!(body["model"], "gpt-4o-deployment");
    assert_eq!(r.json()["choices"][0]["message"]["content"], "tok tok");

    let r = post(
        &p.url("/v1/chat/completions"),
        Some(DEMO_KEY),
        &request("gpt-v1", true),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let text = r.text();
    assert!(!text.contains("prompt_filter_results"), "{text}");
    let ev = events(&text);
    let chunks = &ev[..ev.len() - 1];
    assert_openai_chunks(chunks);
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "tok0 tok1 ");
    let (path, query, _, body) = received(&up.counters("v1"));
    assert_eq!(path, "/openai/v1/chat/completions");
    assert_eq!(query, None);
    assert_eq!(body["model"], "gpt-4o-deployment");
    assert_eq!(body["stream"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_filter_400_reaches_openai_clients_in_openai_words_and_other_4xx_unchanged() {
    let up = MockUpstream::start();
    let p = start(&up, "filter=1");
    for model in ["gpt", "gpt-v1"] {
        let r = post(
            &p.url("/v1/chat/completions"),
            Some(DEMO_KEY),
            &request(model, false),
        )
        .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
        assert_eq!(r.header("content-type"), Some("application/json"));
        let v = r.json();
        assert_eq!(
            v,
            json!({"error": {
                "message": "The response was filtered due to the prompt triggering Azure OpenAI's content management policy. Please modify your prompt and retry. To learn more about our content filtering policies please read our documentation: https://go.microsoft.com/fwlink/?linkid=2198766",
                "type": "invalid_request_error", "param": "prompt", "code": "content_filter"}}),
            "{model}"
        );
        // A stream request is blocked the same way, before any event.
        let r = post(
            &p.url("/v1/chat/completions"),
            Some(DEMO_KEY),
            &request(model, true),
        )
        .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert_eq!(r.json()["error"]["code"], "content_filter");
        assert!(r.json()["error"].get("innererror").is_none());
    }
    assert_eq!(up.hits("classic"), 2, "a filtered prompt is never retried");

    // Any other client error is the upstream's own bytes.
    let up2 = MockUpstream::start();
    let p2 = start(&up2, "status=404");
    let r = post(
        &p2.url("/v1/chat/completions"),
        Some(DEMO_KEY),
        &request("gpt", false),
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json()["error"]["type"], "mock_error", "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "404");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_completion_keeps_its_content_filter_finish() {
    let up = MockUpstream::start();
    let p = start(&up, "blocked=1;chunks=3");
    let r = post(
        &p.url("/v1/chat/completions"),
        Some(DEMO_KEY),
        &request("gpt", true),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let text = r.text();
    let ev = events(&text);
    let chunks = &ev[..ev.len() - 1];
    assert_openai_chunks(chunks);
    let finishes: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0))
        .map(|c| &c["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finishes, [&json!("content_filter")], "{text}");
    assert!(!text.contains("prompt_filter_results"), "{text}");
    // The annotation between content chunks is gone; the blocking one stays.
    assert_eq!(text.matches("content_filter_offsets").count(), 1, "{text}");
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "tok0 tok1 tok2 ");

    let r = post(
        &p.url("/v1/chat/completions"),
        Some(DEMO_KEY),
        &request("gpt", false),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["choices"][0]["finish_reason"], "content_filter");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_auth_sends_the_entra_token_and_a_new_one_after_a_reload() {
    let up = MockUpstream::start();
    let dir = temp_dir("azure-bearer");
    let token = dir.join("token");
    std::fs::write(&token, "entra-token-one\n").unwrap();
    let yaml = |generation: u32| {
        format!(
            r#"# generation {generation}
routes:
  - name: gpt
    model: gpt
    backends:
      - name: azure
        provider: azure-openai
        url: {url}
        credentials: {{file: {token}}}
        azure: {{deployment: gpt-4o-prod, apiVersion: 2024-10-21, auth: bearer}}
keys:
  - {{name: demo, sha256: {demo}}}
"#,
            url = up.azure_endpoint("id=bearer"),
            token = token.display(),
            demo = sha256_hex(DEMO_KEY),
        )
    };
    let p = Proxy::start(&yaml(1));
    let r = post(
        &p.url("/v1/chat/completions"),
        Some(DEMO_KEY),
        &request("gpt", false),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let (path, query, headers, _) = received(&up.counters("bearer"));
    assert_eq!(path, "/openai/deployments/gpt-4o-prod/chat/completions");
    assert_eq!(query.as_deref(), Some("api-version=2024-10-21"));
    assert_eq!(headers["authorization"], "Bearer entra-token-one");
    assert!(
        headers.get("api-key").is_none(),
        "no api-key with auth: bearer"
    );
    assert!(!p.log_text().contains("entra-token-one"), "never logged");

    // A refreshed token is read with the next snapshot, as any credential file is.
    std::fs::write(&token, "entra-token-two\n").unwrap();
    p.write_config(&yaml(2));
    eventually(Duration::from_secs(20), "the new token is sent", || async {
        post(
            &p.url("/v1/chat/completions"),
            Some(DEMO_KEY),
            &request("gpt", false),
        )
        .await;
        up.counters("bearer")
            .last_headers
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|h| h["authorization"] == "Bearer entra-token-two")
    })
    .await;
    let text = p.log_text();
    assert!(!text.contains("entra-token"), "never logged: {text}");
}

/// An Anthropic client of an Azure backend: its request reaches the deployment translated
/// into chat (with `max_completion_tokens`), and the answer and the stream (Azure's filter
/// chunks and all) come back as Anthropic's message and named events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anthropic_client_reaches_azure_through_the_chat_translation() {
    let up = MockUpstream::start();
    let p = start(&up, "chunks=3");
    let body = |stream: bool| {
        json!({"model": "gpt", "max_tokens": 64, "stream": stream,
            "system": "Be brief.", "messages": [{"role": "user", "content": "Say hello"}]})
    };
    let r = post(&p.url("/v1/messages"), Some(DEMO_KEY), &body(false)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let v = r.json();
    assert_eq!(v["type"], "message");
    assert_eq!(v["model"], "gpt");
    assert_eq!(v["content"][0]["type"], "text");
    assert!(
        v["content"][0]["text"]
            .as_str()
            .is_some_and(|t| !t.is_empty()),
        "{v}"
    );
    assert_eq!(v["stop_reason"], "end_turn");
    assert!(
        v["usage"]["input_tokens"].as_u64().is_some_and(|n| n > 0),
        "{v}"
    );
    let (path, query, headers, sent) = received(&up.counters("classic"));
    assert!(
        path.ends_with("/openai/deployments/gpt-4o-prod/chat/completions"),
        "{path}"
    );
    assert_eq!(query.as_deref(), Some("api-version=2024-10-21"));
    assert_eq!(headers["api-key"], AZURE_KEY);
    assert_eq!(
        sent["messages"][0],
        json!({"role": "system", "content": "Be brief."})
    );
    assert_eq!(sent["max_completion_tokens"], 64, "{sent}");

    let r = post(&p.url("/v1/messages"), Some(DEMO_KEY), &body(true)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let text = r.text();
    let names: Vec<&str> = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("event: "))
        .map(|e| e.split('\n').next().unwrap_or(""))
        .collect();
    assert_eq!(names.first(), Some(&"message_start"), "{text}");
    assert_eq!(names.last(), Some(&"message_stop"), "{text}");
    assert!(names.contains(&"content_block_delta") && names.contains(&"message_delta"));
    assert!(!text.contains("prompt_filter_results") && !text.contains("content_filter_results"));
    eventually(Duration::from_secs(10), "both calls metered", || async {
        p.metric("modelgate_requests_total", &[("route", "default/gpt")])
            .await
            == 2.0
    })
    .await;
}
