//! AWS Bedrock, Google Gemini and Vertex AI through the real proxy, against mocks in
//! `tests/python` that check what the real services check with the providers' own libraries:
//! every Bedrock request's SigV4 signature is recomputed with `botocore`, every Vertex token
//! grant's JWT is verified with `google-auth`, Gemini's API key and thought signatures are
//! checked as Gemini checks them. Clients are the official OpenAI and Anthropic SDKs.

use std::time::Duration;

use http::StatusCode;
use modelgate_tests::harness::*;

const ACCESS_KEY: &str = "AKIDMODELGATETEST01";
const SECRET_KEY: &str = "modelgate/test+secret/key0123456789";
const MODEL_ID: &str = "anthropic.claude-3-5-haiku-20241022-v1:0";

fn keys_json(secret: &str) -> String {
    format!(r#"{{"Version":1,"AccessKeyId":"{ACCESS_KEY}","SecretAccessKey":"{secret}"}}"#)
}

fn bedrock_mock(extra: &[&str]) -> PyMock {
    let mut args = vec![
        "--access-key",
        ACCESS_KEY,
        "--secret-key",
        SECRET_KEY,
        "--region",
        "us-east-1",
    ];
    args.extend_from_slice(extra);
    PyMock::start("mock_bedrock.py", &args)
}

fn keys_yaml() -> String {
    format!(
        "keys:\n  - {{name: demo, sha256: {}}}\n",
        sha256_hex(DEMO_KEY)
    )
}

/// A route `name` with one backend of `backend` (YAML flow mapping without the braces).
fn route(name: &str, backend: &str) -> String {
    format!(
        "  - name: {name}\n    model: {name}\n    retries: {{attempts: 0}}\n    backends:\n      - {{name: b, {backend}}}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bedrock_and_gemini_serve_the_responses_api_and_chat() {
    let bedrock = bedrock_mock(&[]);
    let google = PyMock::start("mock_google.py", &["--api-key", "AIza-modelgate-test"]);
    let b = |name: &str| {
        route(
            name,
            &format!(
                "provider: bedrock, url: '{}', model: '{MODEL_ID}', bedrock: {{region: us-east-1}}, credentials: {{env: AWS_KEYS}}",
                bedrock.url("")
            ),
        )
    };
    let g = |name: &str| {
        route(
            name,
            &format!(
                "provider: gemini, url: '{}', model: gemini-2.5-flash, credentials: {{env: GEMINI_KEY}}",
                google.url("/v1beta")
            ),
        )
    };
    let yaml = format!(
        "routes:\n{}{}{}{}{}",
        b("bedrock-r"),
        b("bedrock-tool"),
        g("gemini-r"),
        g("gemini-tool"),
        keys_yaml()
    );
    let keys = keys_json(SECRET_KEY);
    let p = Proxy::start_with(
        &yaml,
        &[("AWS_KEYS", &keys), ("GEMINI_KEY", "AIza-modelgate-test")],
    );
    let envs = vec![
        ("MODELGATE_BASE_URL", p.url("/v1")),
        ("MODELGATE_KEY", DEMO_KEY.to_owned()),
        (
            "MODELGATE_RESPONSES_MODELS",
            "bedrock-r=bedrock,bedrock-tool=bedrock,gemini-r=gemini,gemini-tool=gemini".to_owned(),
        ),
    ];
    // 4 per text model, 2 per tool model, 1 per translated model, 1 more (the pass-through case
    // is skipped: no OpenAI backend here).
    tokio::task::spawn_blocking(move || pytest("test_openai_sdk_responses.py", &envs, 17))
        .await
        .unwrap();
    // Chat Completions clients too, through the official SDK.
    for model in ["bedrock-r", "gemini-r"] {
        let base = p.url("/v1");
        let answer = tokio::task::spawn_blocking(move || sdk_chat(&base, DEMO_KEY, model))
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{model}: {e}"));
        assert!(answer.contains("mock"), "{model}: {answer}");
    }
    // Chat streams and Anthropic clients, JSON and streamed, on both.
    for model in ["bedrock-r", "gemini-r"] {
        let r = post(
            &p.url("/v1/chat/completions"),
            Some(DEMO_KEY),
            &chat(model, true),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{model}: {}", r.text());
        let text = r.text();
        assert!(text.contains("chat.completion.chunk"), "{model}: {text}");
        assert!(
            text.contains("\"finish_reason\":\"stop\""),
            "{model}: {text}"
        );
        assert!(text.trim_end().ends_with("data: [DONE]"), "{model}: {text}");
        for stream in [false, true] {
            let r = post(
                &p.url("/v1/messages"),
                Some(DEMO_KEY),
                &serde_json::json!({"model": model, "max_tokens": 64, "stream": stream,
                    "messages": [{"role": "user", "content": "Say hello"}]}),
            )
            .await;
            assert_eq!(r.status, StatusCode::OK, "{model}: {}", r.text());
            let text = r.text();
            if stream {
                assert!(text.contains("event: message_stop"), "{model}: {text}");
                assert!(text.contains("\"text_delta\""), "{model}: {text}");
            } else {
                let m: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
                assert_eq!(m["type"], "message", "{m}");
                assert_eq!(m["stop_reason"], "end_turn", "{m}");
                assert!(m["usage"]["output_tokens"].as_u64().unwrap() > 0, "{m}");
            }
        }
    }
    // Every Bedrock request was signed right (botocore agreed), to the encoded model id.
    let stats = bedrock.state("stats").await;
    assert_eq!(
        stats["signature_failures"].as_u64().unwrap_or(0),
        0,
        "{stats}"
    );
    let requests = bedrock.state("requests").await;
    let paths: Vec<&str> = requests
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["path"].as_str())
        .collect();
    assert!(
        paths.contains(&"/model/anthropic.claude-3-5-haiku-20241022-v1%3A0/converse-stream"),
        "{paths:?}"
    );
    // Gemini saw its key in the header, never in the URL.
    let requests = google.state("requests").await;
    for r in requests.as_array().unwrap() {
        assert!(!r["query"].as_str().unwrap_or("").contains("key="), "{r}");
    }
    // Metered like every other backend.
    let metrics = p.metrics().await;
    for route in ["default/bedrock-r", "default/gemini-r"] {
        assert!(
            metric(
                &metrics,
                "modelgate_tokens_total",
                &[("route", route), ("kind", "output")]
            ) > 0.0,
            "{route}: {metrics}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_aws_secret_is_refused_as_aws_refuses_it_and_never_echoed() {
    let bedrock = bedrock_mock(&[]);
    let backend = format!(
        "provider: bedrock, url: '{}', model: '{MODEL_ID}', bedrock: {{region: us-east-1}}, credentials: {{env: AWS_KEYS}}",
        bedrock.url("")
    );
    let yaml = format!("routes:\n{}{}", route("bedrock-bad", &backend), keys_yaml());
    let keys = keys_json("not-the-secret-9f8e7d");
    let p = Proxy::start_with(&yaml, &[("AWS_KEYS", &keys)]);
    let r = post(
        &p.url("/v1/chat/completions"),
        Some(DEMO_KEY),
        &chat("bedrock-bad", false),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    let text = r.text();
    assert!(text.contains("InvalidSignatureException"), "{text}");
    assert!(text.contains("credentials"), "{text}");
    assert!(!text.contains("not-the-secret"), "{text}");
    let stats = bedrock.state("stats").await;
    assert!(
        stats["signature_failures"].as_u64().unwrap_or(0) >= 1,
        "{stats}"
    );
    let metrics = p.metrics().await;
    assert!(
        metric(
            &metrics,
            "modelgate_upstream_errors_total",
            &[("kind", "credentials_refused")]
        ) >= 1.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bedrock_web_identity_exchanges_the_pod_token_and_refreshes_before_expiry() {
    let dir = temp_dir("web-identity");
    let token_file = dir.join("token");
    std::fs::write(&token_file, "eyJ.projected-sa-token.sig\n").unwrap();
    // Temporary keys live 302 s: under the 300 s refresh margin after 2 s.
    let bedrock = bedrock_mock(&[
        "--web-identity-token",
        "eyJ.projected-sa-token.sig",
        "--role-arn",
        "arn:aws:iam::123456789012:role/modelgate",
        "--sts-ttl",
        "302",
    ]);
    let backend = format!(
        "provider: bedrock, url: '{}', model: '{MODEL_ID}', bedrock: {{region: us-east-1, auth: webIdentity, roleArn: 'arn:aws:iam::123456789012:role/modelgate', webIdentityTokenFile: '{}', stsUrl: '{}'}}",
        bedrock.url(""),
        token_file.display(),
        bedrock.url("")
    );
    let yaml = format!(
        "routes:\n{}{}",
        route("bedrock-irsa", &backend),
        keys_yaml()
    );
    let p = Proxy::start(&yaml);
    let ask = || async {
        post(
            &p.url("/v1/chat/completions"),
            Some(DEMO_KEY),
            &chat("bedrock-irsa", false),
        )
        .await
    };
    let r = ask().await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let issued = |s: &serde_json::Value| s["sts_credentials_issued"].as_u64().unwrap_or(0);
    assert_eq!(issued(&bedrock.state("stats").await), 1);
    // Calls within the keys' life reuse them; once they are near expiry the proxy fetches
    // new ones before signing.
    eventually(Duration::from_secs(30), "a second STS exchange", || async {
        let r = ask().await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        issued(&bedrock.state("stats").await) >= 2
    })
    .await;
    let stats = bedrock.state("stats").await;
    assert_eq!(
        stats["signature_failures"].as_u64().unwrap_or(0),
        0,
        "{stats}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bedrock_pod_identity_gets_keys_from_the_container_endpoint_and_refreshes_them() {
    let dir = temp_dir("pod-identity");
    let token_file = dir.join("eks-pod-identity-token");
    std::fs::write(&token_file, "eyJ.pod-identity-token.sig").unwrap();
    // Temporary keys live 302 s: under the 300 s refresh margin after 2 s.
    let bedrock = bedrock_mock(&[
        "--pod-identity-token",
        &format!("@{}", token_file.display()),
        "--sts-ttl",
        "302",
    ]);
    // The endpoint and the token file come from the environment, as EKS sets them in a pod
    // with a pod identity association.
    let backend = format!(
        "provider: bedrock, url: '{}', model: '{MODEL_ID}', bedrock: {{region: us-east-1, auth: podIdentity}}",
        bedrock.url(""),
    );
    let yaml = format!("routes:\n{}{}", route("bedrock-pod", &backend), keys_yaml());
    let endpoint = bedrock.url("/v1/credentials");
    let env = |token: &std::path::Path| {
        vec![
            ("AWS_CONTAINER_CREDENTIALS_FULL_URI", endpoint.clone()),
            (
                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
                token.display().to_string(),
            ),
        ]
    };
    let with = |vars: &[(&'static str, String)]| {
        let pairs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Proxy::start_with(&yaml, &pairs)
    };
    let p = with(&env(&token_file));
    let ask = |p: &Proxy| {
        let url = p.url("/v1/chat/completions");
        async move { post(&url, Some(DEMO_KEY), &chat("bedrock-pod", false)).await }
    };
    let r = ask(&p).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let issued = |s: &serde_json::Value| s["container_credentials_issued"].as_u64().unwrap_or(0);
    assert_eq!(issued(&bedrock.state("stats").await), 1);
    // Calls within the keys' life reuse them; near expiry the proxy fetches new ones.
    eventually(
        Duration::from_secs(30),
        "keys fetched again before they expire",
        || async {
            let r = ask(&p).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text());
            issued(&bedrock.state("stats").await) >= 2
        },
    )
    .await;

    // A pod whose token the agent does not accept (no association): the gateway's
    // problem, said as such; the token is in nothing the client or the log sees.
    let wrong = dir.join("other-token");
    std::fs::write(&wrong, "eyJ.another-token.sig").unwrap();
    let stranger = with(&env(&wrong));
    let r = ask(&stranger).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    assert!(
        r.text().contains("container_credentials_refused"),
        "{}",
        r.text()
    );
    for secret in ["eyJ.pod-identity-token.sig", "eyJ.another-token.sig"] {
        assert!(!r.text().contains(secret));
        assert!(!p.log_text().contains(secret) && !stranger.log_text().contains(secret));
    }
    let stats = bedrock.state("stats").await;
    assert_eq!(
        stats["signature_failures"].as_u64().unwrap_or(0),
        0,
        "{stats}"
    );
    assert!(stats["container_rejected"].as_u64().unwrap_or(0) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vertex_signs_a_jwt_grant_caches_the_token_and_serves_gemini_and_claude() {
    let dir = temp_dir("vertex");
    let key_file = dir.join("sa.json");
    // Tokens live an hour here: every call after a backend's first reuses its token.
    let google = PyMock::start(
        "mock_google.py",
        &[
            "--write-service-account",
            key_file.to_str().unwrap(),
            "--token-ttl",
            "3600",
            "--project",
            "modelgate-test",
        ],
    );
    let v = |publisher: &str, model: &str| {
        format!(
            "provider: vertex, url: '{}', model: '{model}', vertex: {{project: modelgate-test, location: us-central1, publisher: {publisher}}}, credentials: {{file: '{}'}}",
            google.url(""),
            key_file.display()
        )
    };
    let yaml = format!(
        "routes:\n{}{}{}{}{}",
        route("vertex-gemini", &v("google", "gemini-2.5-pro")),
        route("vertex-claude", &v("anthropic", "claude-sonnet-4@20250514")),
        route("vertex-gemini-tool", &v("google", "gemini-2.5-pro")),
        route(
            "vertex-claude-tool",
            &v("anthropic", "claude-sonnet-4@20250514")
        ),
        keys_yaml()
    );
    let p = Proxy::start(&yaml);
    for model in ["vertex-gemini", "vertex-claude"] {
        for stream in [false, true] {
            let r = post(
                &p.url("/v1/chat/completions"),
                Some(DEMO_KEY),
                &chat(model, stream),
            )
            .await;
            assert_eq!(r.status, StatusCode::OK, "{model}: {}", r.text());
            assert!(r.text().contains("mock"), "{model}: {}", r.text());
        }
    }
    // An Anthropic client's request to Claude on Vertex passes through, made Vertex's shape.
    let r = post(
        &p.url("/v1/messages"),
        Some(DEMO_KEY),
        &serde_json::json!({"model": "vertex-claude", "max_tokens": 64,
            "messages": [{"role": "user", "content": "hello"}]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let answer: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(answer["type"], "message", "{answer}");
    let tokens = |s: &serde_json::Value| s["tokens_issued"].as_u64().unwrap_or(0);
    assert_eq!(
        tokens(&google.state("stats").await),
        2,
        "one grant per backend for five calls"
    );
    let requests = google.state("requests").await;
    let claude = requests
        .as_array()
        .unwrap()
        .iter()
        .find(|r| {
            r["path"]
                .as_str()
                .is_some_and(|p| p.ends_with(":rawPredict"))
        })
        .expect("a rawPredict call");
    let body: serde_json::Value = serde_json::from_str(claude["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["anthropic_version"], "vertex-2023-10-16", "{body}");
    assert!(body.get("model").is_none(), "{body}");
    // The OpenAI SDK's Responses API on both publishers, tools included.
    let envs = [
        ("MODELGATE_BASE_URL", p.url("/v1")),
        ("MODELGATE_KEY", DEMO_KEY.to_owned()),
        (
            "MODELGATE_RESPONSES_MODELS",
            "vertex-gemini=vertex,vertex-claude=vertex,vertex-gemini-tool=vertex,vertex-claude-tool=vertex"
                .to_owned(),
        ),
    ];
    tokio::task::spawn_blocking(move || pytest("test_openai_sdk_responses.py", &envs, 17))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemini_thought_signatures_survive_an_openai_clients_tool_turns() {
    let google = PyMock::start("mock_google.py", &["--api-key", "AIza-modelgate-test"]);
    let backend = format!(
        "provider: gemini, url: '{}', model: gemini-3-pro-preview, credentials: {{env: GEMINI_KEY}}",
        google.url("/v1beta")
    );
    let yaml = format!("routes:\n{}{}", route("gemini-tool", &backend), keys_yaml());
    let p = Proxy::start_with(&yaml, &[("GEMINI_KEY", "AIza-modelgate-test")]);
    let tool = serde_json::json!({"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}});
    let first = post(
        &p.url("/v1/chat/completions"),
        Some(DEMO_KEY),
        &serde_json::json!({"model": "gemini-tool", "tools": [tool],
            "messages": [{"role": "user", "content": "Weather in Paris? (tool)"}]}),
    )
    .await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text());
    let first: serde_json::Value = serde_json::from_slice(&first.body).unwrap();
    let message = first["choices"][0]["message"].clone();
    let call = &message["tool_calls"][0];
    assert_eq!(call["function"]["name"], "get_weather", "{first}");
    // The client keeps only what OpenAI's format has: the id carries the signature back.
    let second = post(
        &p.url("/v1/chat/completions"),
        Some(DEMO_KEY),
        &serde_json::json!({"model": "gemini-tool", "tools": [tool], "messages": [
            {"role": "user", "content": "Weather in Paris? (tool)"},
            {"role": "assistant", "content": null, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": "18C"}]}),
    )
    .await;
    assert_eq!(
        second.status,
        StatusCode::OK,
        "Gemini refused the turn: {}",
        second.text()
    );
    let stats = google.state("stats").await;
    assert_eq!(stats["thought_signatures_verified"], 1, "{stats}");
    assert_eq!(
        stats["thought_signature_failures"].as_u64().unwrap_or(0),
        0,
        "{stats}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_gemini_key_is_the_gateways_problem_not_the_clients() {
    let google = PyMock::start("mock_google.py", &["--api-key", "AIza-modelgate-test"]);
    let backend = format!(
        "provider: gemini, url: '{}', model: gemini-2.5-flash, credentials: {{env: GEMINI_KEY}}",
        google.url("/v1beta")
    );
    let yaml = format!("routes:\n{}{}", route("gemini-bad", &backend), keys_yaml());
    let p = Proxy::start_with(&yaml, &[("GEMINI_KEY", "AIza-wrong-key-5f4e3d")]);
    let r = post(
        &p.url("/v1/chat/completions"),
        Some(DEMO_KEY),
        &chat("gemini-bad", false),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    let text = r.text();
    assert!(text.contains("upstream_credentials_refused"), "{text}");
    assert!(text.contains("API_KEY_INVALID"), "{text}");
    assert!(!text.contains("AIza-wrong"), "{text}");
    let metrics = p.metrics().await;
    assert!(
        metric(
            &metrics,
            "modelgate_upstream_errors_total",
            &[("kind", "credentials_refused")]
        ) >= 1.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_account_key_google_does_not_know_is_refused_as_the_gateways_problem() {
    let dir = temp_dir("vertex-badkey");
    let (known, unknown) = (dir.join("known.json"), dir.join("unknown.json"));
    let google = PyMock::start(
        "mock_google.py",
        &[
            "--write-service-account",
            known.to_str().unwrap(),
            "--project",
            "modelgate-test",
        ],
    );
    // Another mock's key, sent to this one's token endpoint: a key Google never issued.
    let other = PyMock::start(
        "mock_google.py",
        &["--write-service-account", unknown.to_str().unwrap()],
    );
    let mut key: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&unknown).unwrap()).unwrap();
    key["token_uri"] = serde_json::json!(google.url("/token"));
    key["client_email"] = serde_json::from_slice::<serde_json::Value>(
        &std::fs::read(&known).unwrap(),
    )
    .unwrap()["client_email"]
        .clone();
    std::fs::write(&unknown, key.to_string()).unwrap();
    drop(other);
    let backend = format!(
        "provider: vertex, url: '{}', model: gemini-2.5-pro, vertex: {{project: modelgate-test, location: us-central1}}, credentials: {{file: '{}'}}",
        google.url(""),
        unknown.display()
    );
    let yaml = format!("routes:\n{}{}", route("vertex-bad", &backend), keys_yaml());
    let p = Proxy::start(&yaml);
    let r = post(
        &p.url("/v1/chat/completions"),
        Some(DEMO_KEY),
        &chat("vertex-bad", false),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    let text = r.text();
    assert!(text.contains("upstream_credentials_refused"), "{text}");
    assert!(text.contains("invalid_grant"), "{text}");
    assert!(!text.contains("PRIVATE KEY"), "{text}");
    let stats = google.state("stats").await;
    assert!(
        stats["token_failures"].as_u64().unwrap_or(0) >= 1,
        "{stats}"
    );
}

/// The mocks themselves, driven by botocore's and google-auth's own clients: their wire
/// formats and checks are the services' (tests/python/test_mocks.py).
#[test]
fn the_cloud_mocks_pass_their_self_tests() {
    pytest("test_mocks.py", &[], 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vertex_tokens_are_refreshed_before_they_expire_and_workload_identity_works() {
    let dir = temp_dir("vertex-refresh");
    let key_file = dir.join("sa.json");
    // Tokens live 302 s: under the 300 s refresh margin after 2 s.
    let google = PyMock::start(
        "mock_google.py",
        &[
            "--write-service-account",
            key_file.to_str().unwrap(),
            "--token-ttl",
            "302",
            "--project",
            "modelgate-test",
        ],
    );
    let vertex = |auth: &str| {
        format!(
            "provider: vertex, url: '{url}', model: gemini-2.5-pro, vertex: {{project: modelgate-test, location: us-central1{auth}}}",
            url = google.url("")
        )
    };
    let yaml = format!(
        "routes:\n{}{}{}",
        route(
            "vertex-key",
            &format!(
                "{}, credentials: {{file: '{}'}}",
                vertex(""),
                key_file.display()
            )
        ),
        route(
            "vertex-wi",
            &vertex(&format!(
                ", auth: workloadIdentity, metadataUrl: '{}'",
                google.url("")
            ))
        ),
        keys_yaml()
    );
    let p = Proxy::start(&yaml);
    let tokens = |s: &serde_json::Value| s["tokens_issued"].as_u64().unwrap_or(0);
    eventually(Duration::from_secs(30), "a refreshed token", || async {
        let r = post(
            &p.url("/v1/chat/completions"),
            Some(DEMO_KEY),
            &chat("vertex-key", false),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        tokens(&google.state("stats").await) >= 2
    })
    .await;
    // Workload identity: the metadata server's token, asked with its header.
    let r = post(
        &p.url("/v1/chat/completions"),
        Some(DEMO_KEY),
        &chat("vertex-wi", true),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let stats = google.state("stats").await;
    assert_eq!(
        stats["metadata_forbidden"].as_u64().unwrap_or(0),
        0,
        "{stats}"
    );
}
