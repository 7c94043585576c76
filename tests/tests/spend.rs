//! Spend guards end to end: `maxCostPerRequest` of a route and of a key refuse, up front, a
//! request whose worst case costs more (nothing reserved, nothing sent upstream), with a 400
//! in the client's dialect that names the guard; requests below it pass and their cost lands
//! in metrics and the access log by key, route and backend. The client is the official
//! OpenAI Python SDK (and Anthropic's, for its error shape).

use std::time::Duration;

use modelgate_tests::harness::*;
use modelgate_tests::upstream::MockUpstream;

const CAPPED: &str = "sk-test-spend-capped";

fn config(up: &MockUpstream) -> String {
    format!(
        r#"
routes:
  - name: guarded
    model: guarded
    maxCostPerRequest: 0.001
    retries: {{attempts: 0}}
    backends:
      - {{name: main, provider: openai-compatible, url: "{main}", pricing: {{inputPerMillion: 1, outputPerMillion: 10}}}}
      # The fallback tier is dearer: the worst case is priced there.
      - {{name: fallback, provider: openai-compatible, url: "{fallback}", priority: 1, pricing: {{inputPerMillion: 2, outputPerMillion: 20}}}}
  - name: open
    model: open
    retries: {{attempts: 0}}
    backends:
      - {{name: main, provider: openai-compatible, url: "{open}", pricing: {{inputPerMillion: 1, outputPerMillion: 10}}}}
keys:
  - {{name: demo, sha256: {demo}, limits: {{requestsPerMinute: 3}}}}
  - {{name: capped, sha256: {capped}, maxCostPerRequest: 0.0002}}
"#,
        // Each answer reports 10 prompt and 5 completion tokens.
        main = up.url("id=main"),
        fallback = up.url("id=fallback"),
        open = up.url("id=open"),
        demo = sha256_hex(DEMO_KEY),
        capped = sha256_hex(CAPPED),
    )
}

/// Each case of the script prints one JSON line: the status and the error's type, code and
/// message (or the answer's text).
const SCRIPT: &str = r#"
import json, os, anthropic, openai
base, key, capped = os.environ["BASE"], os.environ["KEY"], os.environ["CAPPED"]

def chat(api_key, model, **kw):
    c = openai.OpenAI(base_url=base + "/v1", api_key=api_key, max_retries=0, timeout=30)
    try:
        r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], **kw)
        return {"status": 200, "text": r.choices[0].message.content}
    except openai.APIStatusError as e:
        err = e.body if isinstance(e.body, dict) else {}
        return {"status": e.status_code, "type": err.get("type"), "code": err.get("code"),
                "message": err.get("message")}

def messages(api_key, model, max_tokens):
    c = anthropic.Anthropic(base_url=base, api_key=api_key, max_retries=0, timeout=30)
    try:
        r = c.messages.create(model=model, max_tokens=max_tokens,
                              messages=[{"role": "user", "content": "hi"}])
        return {"status": 200, "text": r.content[0].text}
    except anthropic.APIStatusError as e:
        err = e.body.get("error", {}) if isinstance(e.body, dict) else {}
        return {"status": e.status_code, "type": err.get("type"), "message": err.get("message")}

cases = [
    # No max_tokens: the proxy reserves its default of 1024 output tokens.
    chat(key, "guarded"),
    chat(key, "guarded", max_tokens=60),
    chat(key, "guarded", max_tokens=40),
    chat(key, "guarded", max_completion_tokens=40),
    chat(key, "guarded", max_tokens=40),
    # The key's requestsPerMinute (3) counted only the three admitted requests.
    chat(key, "guarded", max_tokens=40),
    chat(capped, "open", max_tokens=30),
    chat(capped, "open", max_tokens=10),
    messages(capped, "open", 30),
    messages(capped, "open", 10),
]
for c in cases:
    print(json.dumps(c))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spend_guards_refuse_up_front_and_name_the_guard() {
    let up = MockUpstream::start();
    let p = Proxy::start(&config(&up));
    let base = p.url("");
    let cases = tokio::task::spawn_blocking(move || {
        python_json_lines(
            SCRIPT,
            &[
                ("BASE", base.trim_end_matches('/')),
                ("KEY", DEMO_KEY),
                ("CAPPED", CAPPED),
            ],
        )
    })
    .await
    .unwrap();
    assert_eq!(cases.len(), 10, "{cases:?}");
    let status = |i: usize| cases[i]["status"].as_u64().unwrap();
    let message = |i: usize| cases[i]["message"].as_str().unwrap_or_default().to_owned();

    // The route's guard: the worst case at the dearest backend (the fallback tier's).
    for i in [0, 1] {
        assert_eq!(status(i), 400, "{}", cases[i]);
        assert_eq!(cases[i]["type"], "invalid_request_error");
        assert_eq!(cases[i]["code"], "max_cost_per_request_exceeded");
        let m = message(i);
        assert!(
            m.contains("above the route's maxCostPerRequest of $0.001")
                && m.contains("at backend fallback's prices"),
            "{m}"
        );
    }
    // A prompt of 8 tokens (the SDK's `[{"role":"user","content":"hi"}]`, 32 bytes at
    // about 4 a token) and 1024 output tokens at $2 and $20 a million: $0.020496.
    assert!(message(0).contains("$0.020496"), "{}", message(0));
    assert!(message(0).contains("a prompt of about 8 tokens"));
    assert!(message(0).contains("1024 output tokens reserved"));
    assert!(message(1).contains("60 output tokens reserved"));
    // Below the guard ($0.000816): answered; both token fields are read.
    for i in [2, 3, 4] {
        assert_eq!(status(i), 200, "{}", cases[i]);
    }
    assert_eq!(
        status(5),
        429,
        "refused requests reserved nothing, the admitted ones did: {}",
        cases[5]
    );
    // The key's guard, in OpenAI's shape and in Anthropic's.
    assert_eq!(status(6), 400);
    assert_eq!(cases[6]["code"], "max_cost_per_request_exceeded");
    assert!(
        message(6).contains("above this API key's maxCostPerRequest of $0.0002"),
        "{}",
        message(6)
    );
    assert_eq!(status(7), 200, "{}", cases[7]);
    assert_eq!(status(8), 400);
    assert_eq!(cases[8]["type"], "invalid_request_error");
    assert!(
        message(8).contains("this API key's maxCostPerRequest"),
        "{}",
        cases[8]
    );
    assert_eq!(status(9), 200, "{}", cases[9]);

    // Nothing refused went upstream: three answers of main, none of the fallback.
    assert_eq!(up.hits("main"), 3);
    assert_eq!(up.hits("fallback"), 0);
    assert_eq!(up.hits("open"), 2);

    let m = p.metrics().await;
    let refusals = |key: &str, limit: &str| {
        metric(
            &m,
            "modelgate_limit_rejections_total",
            &[("key", key), ("limit", limit)],
        )
    };
    assert_eq!(
        refusals("default/demo", "route_max_cost_per_request"),
        2.0,
        "{m}"
    );
    assert_eq!(refusals("default/capped", "key_max_cost_per_request"), 2.0);
    assert_eq!(refusals("default/demo", "requests_per_minute"), 1.0);
    // Cost by key, route and backend: 10 prompt and 5 completion tokens per answer at $1
    // and $10 a million, $0.00006 each.
    let cost = |key: &str, route: &str| {
        metric(
            &m,
            "modelgate_cost_usd_total",
            &[("key", key), ("route", route), ("backend", "main")],
        )
    };
    assert!(
        (cost("default/demo", "default/guarded") - 3.0 * 6e-5).abs() < 1e-12,
        "{m}"
    );
    assert!((cost("default/capped", "default/open") - 2.0 * 6e-5).abs() < 1e-12);

    // The access log: each answer's cost with its key, route and backend; each refusal
    // with its error code and no cost.
    eventually(
        Duration::from_secs(5),
        "access log lines with costs and refusals",
        || async {
            let log = p.log_text();
            let lines: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("\"message\":\"request\""))
                .collect();
            let answered = lines
                .iter()
                .filter(|l| {
                    l.contains("\"route\":\"default/guarded\"")
                        && l.contains("\"backend\":\"main\"")
                        && l.contains("\"key\":\"default/demo\"")
                        && l.contains("\"cost_usd\":0.00006")
                })
                .count();
            let refused = lines
                .iter()
                .filter(|l| {
                    l.contains("\"error\":\"max_cost_per_request_exceeded\"")
                        && l.contains("\"status\":400")
                        && l.contains("\"cost_usd\":0")
                })
                .count();
            answered == 3 && refused == 4
        },
    )
    .await;
}
