//! Real clients and tools against the real proxy: the official OpenAI Python SDK, and
//! Prometheus's `promtool` on the `/metrics` text.

use http::StatusCode;
use modelgate_tests::harness::*;

const LIMITED: &str = "sk-test-sdk-limited";
const NARROW: &str = "sk-test-sdk-narrow";

fn config() -> String {
    format!(
        r#"
routes:
  - name: mock-gpt
    model: mock-gpt
    aliases: [gpt-4o-mini]
    backends:
      - name: mock
        provider: mock
        pricing: {{inputPerMillion: 0.15, outputPerMillion: 0.6}}
        mock: {{outputTokens: 6, chunkDelay: 1ms}}
keys:
  - {{name: demo, sha256: {demo}}}
  - {{name: limited, sha256: {limited}, limits: {{requestsPerMinute: 1}}}}
  - {{name: narrow, sha256: {narrow}, models: [gpt-4o-*]}}
"#,
        demo = sha256_hex(DEMO_KEY),
        limited = sha256_hex(LIMITED),
        narrow = sha256_hex(NARROW),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_sdk_works_against_the_proxy() {
    let p = Proxy::start(&config());
    let envs = [
        ("MODELGATE_BASE_URL", p.url("/v1")),
        ("MODELGATE_KEY", DEMO_KEY.to_owned()),
        ("MODELGATE_LIMITED_KEY", LIMITED.to_owned()),
        ("MODELGATE_NARROW_KEY", NARROW.to_owned()),
    ];
    tokio::task::spawn_blocking(move || pytest("test_openai_sdk.py", &envs, 8))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_sdk_works_against_an_anthropic_backend() {
    let up = modelgate_tests::upstream::MockUpstream::start();
    let route = |name: &str, knobs: &str| {
        format!(
            "  - name: {name}\n    model: {name}\n    retries: {{attempts: 0}}\n    backends:\n      - {{name: anthropic, provider: anthropic, url: {}, credentials: {{env: ANTHROPIC_TEST_KEY}}}}\n",
            up.url(knobs)
        )
    };
    let yaml = format!(
        "routes:\n{}{}{}{}{}keys:\n  - {{name: demo, sha256: {}}}\n",
        route("claude-text", "id=text;cache_read=3;chunks=3"),
        route("claude-sdk", "id=sdk;thinking=1;tool=1;chunks=2"),
        route("claude-turns", "id=turns;thinking=1;tool=1;chunks=2"),
        route("claude-bad", "id=bad;status=400"),
        route("claude-busy", "id=busy;status=529"),
        sha256_hex(DEMO_KEY),
    );
    let p = Proxy::start_with(&yaml, &[("ANTHROPIC_TEST_KEY", "sk-ant-sdk-test")]);
    let envs = [
        ("MODELGATE_BASE_URL", p.url("/v1")),
        ("MODELGATE_KEY", DEMO_KEY.to_owned()),
    ];
    tokio::task::spawn_blocking(move || pytest("test_openai_sdk_anthropic.py", &envs, 7))
        .await
        .unwrap();
    // The second tool turn reached Anthropic as Anthropic wants it: the assistant's thinking
    // block (signature included) first, then its tool call; the result in a user turn.
    let sent = up
        .counters("turns")
        .last_body
        .lock()
        .unwrap()
        .clone()
        .unwrap();
    let messages = sent["messages"].as_array().unwrap();
    let turn = messages
        .iter()
        .find(|m| m["role"] == "assistant")
        .expect("the assistant turn went back");
    assert_eq!(turn["content"][0]["type"], "thinking", "{sent}");
    assert_eq!(turn["content"][0]["thinking"], "Let me think.");
    assert!(
        turn["content"][0]["signature"]
            .as_str()
            .is_some_and(|s| !s.is_empty())
    );
    assert!(
        turn["content"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["type"] == "tool_use"
                && b["id"] == "toolu_mock1"
                && b["input"]["city"] == "Paris"),
        "{sent}"
    );
    let result = &messages.last().unwrap()["content"][0];
    assert_eq!(result["type"], "tool_result", "{sent}");
    assert_eq!(result["tool_use_id"], "toolu_mock1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_python_sdk_works_against_the_proxy() {
    let up = modelgate_tests::upstream::MockUpstream::start();
    let anthropic = |name: &str, knobs: &str| {
        format!(
            "  - name: {name}\n    model: {name}\n    retries: {{attempts: 0}}\n    backends:\n      - {{name: anthropic, provider: anthropic, url: {}, model: claude-upstream, credentials: {{env: ANTHROPIC_TEST_KEY}}}}\n",
            up.url(knobs)
        )
    };
    let yaml = format!(
        r#"routes:
  - name: mock-gpt
    model: mock-gpt
    backends:
      - {{name: mock, provider: mock, mock: {{outputTokens: 6}}}}
  - name: gpt-up
    model: gpt-up
    backends:
      - {{name: openai, provider: openai-compatible, url: {oai}}}
{pass}{tools}{turns}{bad}{busy}keys:
  - {{name: demo, sha256: {demo}}}
  - {{name: limited, sha256: {limited}, limits: {{requestsPerMinute: 1}}}}
"#,
        oai = up.url("id=oai"),
        pass = anthropic("claude-pass", "id=pass;cache_read=3"),
        tools = anthropic("claude-tools", "id=tools;thinking=1;tool=1"),
        turns = anthropic("claude-turns", "id=turns;thinking=1;tool=1"),
        bad = anthropic("claude-bad", "id=bad;status=400"),
        busy = anthropic("claude-busy", "id=busy;status=529"),
        demo = sha256_hex(DEMO_KEY),
        limited = sha256_hex(LIMITED),
    );
    let p = Proxy::start_with(&yaml, &[("ANTHROPIC_TEST_KEY", "sk-ant-upstream")]);
    let envs = [
        ("MODELGATE_BASE_URL", p.url("")),
        ("MODELGATE_KEY", DEMO_KEY.to_owned()),
        ("MODELGATE_LIMITED_KEY", LIMITED.to_owned()),
    ];
    tokio::task::spawn_blocking(move || pytest("test_anthropic_sdk.py", &envs, 12))
        .await
        .unwrap();
    // Pass-through: the client's own Anthropic headers, the gateway's credential, the
    // upstream model spliced, the thinking block sent back byte for byte.
    let c = up.counters("pass");
    let headers = c.last_headers.lock().unwrap().clone().unwrap();
    assert_eq!(
        headers["x-api-key"], "sk-ant-upstream",
        "never the client's key"
    );
    // The pinned SDK (anthropic 2.15.0) sends a newer version than the gateway's default
    // for translated requests (2023-06-01): what arrives is the client's, unchanged.
    let version = headers["anthropic-version"].to_str().unwrap();
    assert!(!version.is_empty() && version != "2023-06-01", "{version}");
    assert_eq!(
        c.last_body.lock().unwrap().as_ref().unwrap()["model"],
        "claude-upstream"
    );
    let sent = up
        .counters("turns")
        .last_body
        .lock()
        .unwrap()
        .clone()
        .unwrap();
    let turn = &sent["messages"][1];
    assert_eq!(turn["role"], "assistant", "{sent}");
    assert_eq!(turn["content"][0]["type"], "thinking");
    assert!(
        turn["content"][0]["signature"]
            .as_str()
            .is_some_and(|s| !s.is_empty())
    );
    // Translated: an OpenAI chat request, with the limit where OpenAI-compatible servers
    // read it and usage asked for.
    let oai = up
        .counters("oai")
        .last_body
        .lock()
        .unwrap()
        .clone()
        .unwrap();
    assert_eq!(oai["max_tokens"], 64, "{oai}");
    assert_eq!(oai["messages"][0]["role"], "user");
    assert_eq!(oai["stream_options"]["include_usage"], true, "{oai}");
    // Metered in every direction: Anthropic's cache reads passed through (3 per call to
    // claude-pass: create and stream in test_create/test_stream, twice more in
    // test_cache_tokens_reach_the_client), OpenAI's usage translated.
    let m = p.metrics().await;
    let tokens = |route: &str, kind: &str| {
        metric(
            &m,
            "modelgate_tokens_total",
            &[("route", &format!("default/{route}")), ("kind", kind)],
        )
    };
    assert_eq!(tokens("claude-pass", "cache_read"), 12.0, "{m}");
    assert_eq!(tokens("claude-pass", "input"), 40.0, "{m}");
    assert!(
        tokens("gpt-up", "input") > 0.0 && tokens("gpt-up", "output") > 0.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool() {
    let p = Proxy::start(&config());
    let url = p.url("/v1/chat/completions");
    assert_eq!(
        post(&url, Some(DEMO_KEY), &chat("mock-gpt", false))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        post(&url, Some(DEMO_KEY), &chat("mock-gpt", true))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        post(&url, Some("sk-bad"), &chat("mock-gpt", false))
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    let _ = post(&url, Some(LIMITED), &chat("mock-gpt", false)).await;
    let _ = post(&url, Some(LIMITED), &chat("mock-gpt", false)).await;
    let text = p.metrics().await;
    for family in [
        "modelgate_requests_total",
        "modelgate_request_duration_seconds_bucket",
        "modelgate_time_to_first_token_seconds_bucket",
        "modelgate_gateway_overhead_seconds_bucket",
        "modelgate_tokens_total",
        "modelgate_cost_usd_total",
        "modelgate_limit_rejections_total",
        "modelgate_in_flight_requests",
        "modelgate_snapshot_info",
        "modelgate_config_last_reload_success",
    ] {
        assert!(text.contains(family), "{family} missing:\n{text}");
    }
    promtool_check(&text);

    // OpenMetrics for scrapers that ask for it.
    let mut req = request(
        http::Method::GET,
        &p.admin_url("/metrics"),
        None,
        bytes::Bytes::new(),
    );
    req.headers_mut().insert(
        "accept",
        "application/openmetrics-text; version=1.0.0"
            .parse()
            .unwrap(),
    );
    let r = send(req).await;
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    assert!(r.text().ends_with("# EOF\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_sdk_works_against_an_azure_backend() {
    let up = modelgate_tests::upstream::MockUpstream::start();
    let classic = |name: &str, knobs: &str| {
        format!(
            "  - name: {name}\n    model: {name}\n    retries: {{attempts: 0}}\n    backends:\n      - {{name: azure, provider: azure-openai, url: {}, credentials: {{env: AZURE_TEST_KEY}}, azure: {{deployment: gpt-4o-prod, apiVersion: 2024-10-21}}}}\n",
            up.azure_endpoint(knobs)
        )
    };
    let v1 = format!(
        "  - name: azure-v1\n    model: azure-v1\n    backends:\n      - {{name: azure, provider: azure-openai, url: {}/openai/v1, model: gpt-4o-deployment, credentials: {{env: AZURE_TEST_KEY}}}}\n",
        up.azure_endpoint("id=v1;chunks=3")
    );
    let yaml = format!(
        "routes:\n{}{v1}{}{}keys:\n  - {{name: demo, sha256: {}}}\n",
        classic("azure-gpt", "id=classic;chunks=3"),
        classic("azure-filter", "id=filter;filter=1"),
        classic("azure-blocked", "id=blocked;blocked=1;chunks=3"),
        sha256_hex(DEMO_KEY),
    );
    let p = Proxy::start_with(&yaml, &[("AZURE_TEST_KEY", "azure-sdk-test-key")]);
    let envs = [
        ("MODELGATE_BASE_URL", p.url("/v1")),
        ("MODELGATE_KEY", DEMO_KEY.to_owned()),
    ];
    let report = tokio::task::spawn_blocking(move || pytest("test_openai_sdk_azure.py", &envs, 8))
        .await
        .unwrap();
    assert!(!report.contains("azure-sdk-test-key"), "{report}");
    // The SDK's requests reached Azure's URLs with Azure's key header, never a bearer; the
    // v1 API got the deployment as the body's model.
    let reached = |classic: &str, v1: &str| {
        for (id, path, query) in [
            ("classic", classic, Some("api-version=2024-10-21")),
            ("v1", v1, None),
        ] {
            let c = up.counters(id);
            assert_eq!(c.last_path.lock().unwrap().as_deref(), Some(path));
            assert_eq!(c.last_query.lock().unwrap().as_deref(), query);
            let headers = c.last_headers.lock().unwrap().clone().unwrap();
            assert_eq!(headers["api-key"], "azure-sdk-test-key");
            assert!(headers.get("authorization").is_none());
        }
        let sent = up.counters("v1").last_body.lock().unwrap().clone().unwrap();
        assert_eq!(sent["model"], "gpt-4o-deployment", "{sent}");
    };
    reached(
        "/openai/deployments/gpt-4o-prod/embeddings",
        "/openai/v1/chat/completions",
    );
    // The Responses API on both Azure APIs: translated to the classic deployment's chat
    // completions, passed through to the v1 API's own Responses API (stored state included).
    let envs = [
        ("MODELGATE_BASE_URL", p.url("/v1")),
        ("MODELGATE_KEY", DEMO_KEY.to_owned()),
        (
            "MODELGATE_RESPONSES_MODELS",
            "azure-gpt=azure,azure-v1=openai".to_owned(),
        ),
    ];
    tokio::task::spawn_blocking(move || pytest("test_openai_sdk_responses.py", &envs, 11))
        .await
        .unwrap();
    reached(
        "/openai/deployments/gpt-4o-prod/chat/completions",
        "/openai/v1/responses",
    );
}

/// The OpenAI SDK's Responses API on every kind of backend: the built-in mock and an
/// Anthropic upstream translated, an OpenAI upstream passed through (stored state included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_responses_api_works_on_every_backend() {
    let up = modelgate_tests::upstream::MockUpstream::start();
    let route = |name: &str, provider: &str, knobs: &str| {
        format!(
            "  - name: {name}\n    model: {name}\n    retries: {{attempts: 0}}\n    backends:\n      - {{name: b, provider: {provider}, url: {}, credentials: {{env: UPSTREAM_TEST_KEY}}}}\n",
            up.url(knobs)
        )
    };
    let yaml = format!(
        "routes:\n  - name: mock-gpt\n    model: mock-gpt\n    backends:\n      - {{name: mock, provider: mock, mock: {{outputTokens: 6}}}}\n{}{}{}keys:\n  - {{name: demo, sha256: {}}}\n",
        route("gpt-pass", "openai", "id=pass;cache_read=2;chunks=3"),
        route("claude-r", "anthropic", "id=claude;chunks=3"),
        route("claude-tool", "anthropic", "id=tool;tool=1;chunks=2"),
        sha256_hex(DEMO_KEY),
    );
    let p = Proxy::start_with(&yaml, &[("UPSTREAM_TEST_KEY", "sk-upstream-test")]);
    let envs = [
        ("MODELGATE_BASE_URL", p.url("/v1")),
        ("MODELGATE_KEY", DEMO_KEY.to_owned()),
        (
            "MODELGATE_RESPONSES_MODELS",
            "mock-gpt=mock,gpt-pass=openai,claude-r=anthropic,claude-tool=anthropic".to_owned(),
        ),
    ];
    tokio::task::spawn_blocking(move || pytest("test_openai_sdk_responses.py", &envs, 19))
        .await
        .unwrap();
    // Pass-through: OpenAI got the client's own body, stored state included.
    let pass = up.counters("pass");
    assert_eq!(
        pass.last_path.lock().unwrap().as_deref(),
        Some("/v1/responses")
    );
    let sent = pass.last_body.lock().unwrap().clone().unwrap();
    assert_eq!(sent["previous_response_id"], "resp_abc123", "{sent}");
    assert_eq!(sent["model"], "gpt-pass");
    // Translated: Anthropic got Messages, the function result in a tool_result block.
    let tool = up.counters("tool");
    assert_eq!(
        tool.last_path.lock().unwrap().as_deref(),
        Some("/v1/messages")
    );
    let sent = tool.last_body.lock().unwrap().clone().unwrap();
    let results: Vec<_> = sent["messages"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|m| m["content"].as_array().cloned().unwrap_or_default())
        .filter(|b| b["type"] == "tool_result")
        .collect();
    assert!(
        results.iter().any(|b| b["tool_use_id"] == "toolu_mock1"),
        "{sent}"
    );
    // Every call was metered, the pass-through ones from the Responses usage.
    let metrics = p.metrics().await;
    assert!(
        metric(
            &metrics,
            "modelgate_tokens_total",
            &[("route", "default/gpt-pass"), ("kind", "cache_read")]
        ) > 0.0,
        "{metrics}"
    );
}
