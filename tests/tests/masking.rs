//! Data masking end to end: a real proxy on 127.0.0.1 in front of the recording mock
//! upstream. Prompts reach the upstream with every detector's find redacted (and near misses
//! untouched), in the OpenAI and the Anthropic dialect; `mask` keeps the last characters; a
//! `block` rule answers 400 naming the rule before any upstream call or limit, and the
//! matched text is in no log line and no metric; answers are masked whole and streamed, a
//! secret split across stream chunks included, as the OpenAI SDK reads them, and as the
//! Anthropic SDK and the OpenAI Responses API read them from either kind of upstream.

use std::time::Duration;

use http::StatusCode;
use modelgate_tests::harness::*;
use modelgate_tests::upstream::MockUpstream;
use serde_json::json;

const KEY: &str = "sk-test-masking";
/// A key with 2 requests a minute: blocked requests must not use them up.
const TIGHT: &str = "sk-test-masking-tight";

const CARD: &str = "4111 1111 1111 1111";

fn config(up: &MockUpstream) -> String {
    format!(
        r#"
routes:
  - name: all
    model: all
    backends:
      - {{name: up, provider: openai-compatible, url: "{all}"}}
    masking:
      answers: true
      rules:
        - {{name: mail, detector: email}}
        - {{name: phone, detector: phone}}
        - {{name: card, detector: credit-card}}
        - {{name: iban, detector: iban}}
        - {{name: ssn, detector: ssn}}
        - {{name: ipv4, detector: ipv4}}
        - {{name: ipv6, detector: ipv6}}
        - {{name: keys, detector: api-key}}
        - {{name: ticket, pattern: "TICKET-[0-9]{{4}}"}}
  - name: tail
    model: tail
    backends:
      - {{name: up, provider: openai-compatible, url: "{tail}"}}
    masking:
      rules:
        - {{name: card-tail, detector: credit-card, action: mask, keepLast: 4}}
  - name: guarded
    model: guarded
    backends:
      - {{name: up, provider: openai-compatible, url: "{guarded}"}}
    masking:
      rules:
        - {{name: no-cards, detector: credit-card, action: block}}
        - {{name: mail, detector: email}}
  - name: said
    model: said
    backends:
      - {{name: up, provider: openai-compatible, url: "{said}"}}
    masking:
      answers: true
      rules:
        - {{name: split, pattern: "tok1 tok2"}}
        - {{name: pair, pattern: "tok tok"}}
  - name: said-claude
    model: said-claude
    backends:
      - {{name: up, provider: anthropic, url: "{said_claude}", credentials: {{env: MASKING_TEST_ANTHROPIC_KEY}}}}
    masking:
      answers: true
      rules:
        - {{name: split, pattern: "tok1 tok2"}}
keys:
  - {{name: k, sha256: {key}}}
  - {{name: tight, sha256: {tight}, limits: {{requestsPerMinute: 2}}}}
"#,
        all = up.url("id=all;echo=3"),
        tail = up.url("id=tail"),
        guarded = up.url("id=guarded"),
        said = up.url("id=said"),
        said_claude = up.url("id=said-claude"),
        key = sha256_hex(KEY),
        tight = sha256_hex(TIGHT),
    )
}

/// A proxy with `config`, the Anthropic backend's key in its environment.
fn start(up: &MockUpstream) -> Proxy {
    Proxy::start_with(
        &config(up),
        &[("MASKING_TEST_ANTHROPIC_KEY", "sk-ant-test")],
    )
}

fn last_body(up: &MockUpstream, id: &str) -> serde_json::Value {
    up.counters(id).last_body.lock().unwrap().clone().unwrap()
}

/// Each detector's find, and what the upstream must see instead.
const FINDS: &[(&str, &str)] = &[
    ("jane.doe@example.com", "[EMAIL]"),
    ("(415) 555-0132", "[PHONE]"),
    (CARD, "[CREDIT_CARD]"),
    ("GB82 WEST 1234 5698 7654 32", "[IBAN]"),
    ("123-45-6789", "[SSN]"),
    ("10.20.30.40", "[IPV4]"),
    ("2001:db8:85a3::8a2e:370:7334", "[IPV6]"),
    ("sk-proj-ABCDEFGHIJKLMNOPQRSTUVWX12", "[API_KEY]"),
    ("TICKET-4821", "[TICKET]"),
];

/// Near misses no rule may touch: a 16-digit number failing Luhn, a bad IBAN checksum, an
/// SSN in a never-issued area, an octet above 255, a version number, a time of day.
const NEAR: &str = "order 4111111111111112, GB82 WEST 1234 5698 7654 33, 666-45-6789, 300.1.2.3, v1.2.3.4.5, 12:30:45, TICKET-12";

fn prompt() -> (String, String) {
    let mut said = String::from("Please help.");
    let mut seen = said.clone();
    for (find, instead) in FINDS {
        said.push_str(&format!(" {find};"));
        seen.push_str(&format!(" {instead};"));
    }
    said.push_str(&format!(" {NEAR}"));
    seen.push_str(&format!(" {NEAR}"));
    (said, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_detector_is_redacted_before_the_prompt_leaves_and_near_misses_pass() {
    let up = MockUpstream::start();
    let p = start(&up);
    let (said, seen) = prompt();

    // OpenAI chat: a string content and text parts; other fields as the client sent them.
    let body = json!({"model": "all", "user": "jane.doe@example.com", "temperature": 0.5,
        "messages": [
            {"role": "system", "content": said},
            {"role": "user", "content": [{"type": "text", "text": said}]}]});
    let r = post(&p.url("/v1/chat/completions"), Some(KEY), &body).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let got = last_body(&up, "all");
    assert_eq!(got["messages"][0]["content"], seen.as_str());
    assert_eq!(got["messages"][1]["content"][0]["text"], seen.as_str());
    assert_eq!(got["user"], "jane.doe@example.com", "not prompt text");
    assert_eq!(got["temperature"], 0.5);

    // Anthropic Messages to an OpenAI-shaped backend: masked, then translated.
    let body = json!({"model": "all", "max_tokens": 64, "system": said,
        "messages": [{"role": "user", "content": [{"type": "text", "text": said}]}]});
    let mut req = request(
        http::Method::POST,
        &p.url("/v1/messages"),
        Some(KEY),
        serde_json::to_vec(&body).unwrap(),
    );
    req.headers_mut()
        .insert("anthropic-version", "2023-06-01".parse().unwrap());
    let r = send(req).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let got = last_body(&up, "all").to_string();
    assert!(got.contains(&seen), "{got}");
    for (find, _) in FINDS {
        assert!(!got.contains(find), "{find} reached the upstream: {got}");
    }

    // Counted per rule and action, prompts apart from answers.
    let m = p.metrics().await;
    let count = |rule: &str, direction: &str| {
        metric(
            &m,
            "modelgate_masking_total",
            &[
                ("route", "default/all"),
                ("rule", rule),
                ("action", "redact"),
                ("direction", direction),
            ],
        )
    };
    // Two texts in each of two requests.
    assert_eq!(count("mail", "prompt"), 4.0, "{m}");
    assert_eq!(count("ticket", "prompt"), 4.0);
    assert_eq!(count("card", "prompt"), 4.0);
    for (find, _) in FINDS {
        assert!(!m.contains(find));
    }
    promtool_check(&m);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mask_keeps_the_last_characters() {
    let up = MockUpstream::start();
    let p = start(&up);
    let body = json!({"model": "tail", "messages": [{"role": "user", "content": format!("pay with {CARD} now")}]});
    let r = post(&p.url("/v1/chat/completions"), Some(KEY), &body).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        last_body(&up, "tail")["messages"][0]["content"],
        "pay with ***************1111 now"
    );
    assert_eq!(
        p.metric(
            "modelgate_masking_total",
            &[("rule", "card-tail"), ("action", "mask")]
        )
        .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_is_a_400_naming_the_rule_before_any_upstream_call_or_limit() {
    let up = MockUpstream::start();
    let p = start(&up);
    let secret = "5500 0000 0000 0004";
    let body = json!({"model": "guarded", "messages": [{"role": "user", "content": format!("mail a@b.io, card {secret}")}]});
    for _ in 0..3 {
        let r = post(&p.url("/v1/chat/completions"), Some(TIGHT), &body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
        assert_eq!(r.error_code(), "masking_blocked");
        let msg = r.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(msg.contains("no-cards"), "{msg}");
        assert!(!r.text().contains(secret) && !r.text().contains("5500"));
        assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    }
    // Anthropic clients get Anthropic's error shape.
    let mut req = request(
        http::Method::POST,
        &p.url("/v1/messages"),
        Some(KEY),
        serde_json::to_vec(&json!({"model": "guarded", "max_tokens": 8,
            "messages": [{"role": "user", "content": format!("card {secret}")}]}))
        .unwrap(),
    );
    req.headers_mut()
        .insert("anthropic-version", "2023-06-01".parse().unwrap());
    let r = send(req).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["type"], "error", "{}", r.text());
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no-cards")
    );

    assert_eq!(up.hits("guarded"), 0, "no upstream call");
    // `/config` shows each route's rules: detector or pattern, action, keepLast where it
    // applies, and whether answers are masked.
    let config = get(&p.admin_url("/config"), None).await.json();
    let masking = |route: &str| {
        config["snapshot"]["routes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == route)
            .map(|r| r["masking"].clone())
            .unwrap()
    };
    assert_eq!(
        masking("guarded"),
        json!({"answers": false, "rules": [
            {"name": "no-cards", "detector": "credit-card", "action": "block"},
            {"name": "mail", "detector": "email", "action": "redact"}]})
    );
    assert_eq!(
        masking("tail")["rules"][0],
        json!({"name": "card-tail", "detector": "credit-card", "action": "mask", "keepLast": 4})
    );
    assert_eq!(masking("all")["answers"], true);
    assert_eq!(
        masking("all")["rules"][8],
        json!({"name": "ticket", "pattern": "TICKET-[0-9]{4}", "action": "redact"})
    );
    // The tight key's 2 requests a minute are all still there.
    let clean =
        json!({"model": "guarded", "messages": [{"role": "user", "content": "mail a@b.io"}]});
    for _ in 0..2 {
        let r = post(&p.url("/v1/chat/completions"), Some(TIGHT), &clean).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
    assert_eq!(
        last_body(&up, "guarded")["messages"][0]["content"],
        "mail [EMAIL]"
    );

    let m = p.metrics().await;
    assert_eq!(
        metric(
            &m,
            "modelgate_masking_total",
            &[
                ("route", "default/guarded"),
                ("rule", "no-cards"),
                ("action", "block"),
                ("direction", "prompt")
            ]
        ),
        4.0
    );
    // The matched text is in no metric and no log line.
    assert!(!m.contains("5500"));
    eventually(
        Duration::from_secs(10),
        "the access log has the blocked requests",
        || async { p.log_text().contains("masking_blocked") },
    )
    .await;
    let log = p.log_text();
    assert!(!log.contains(secret) && !log.contains("5500"), "{log}");
    assert!(!log.contains("a@b.io"));
}

/// The OpenAI SDK streams an answer whose secrets arrive 3 characters per chunk.
const SDK_STREAM: &str = r#"
import json, os, openai
c = openai.OpenAI(base_url=os.environ["BASE"], api_key=os.environ["KEY"], max_retries=0, timeout=30)
text, chunks = "", 0
for chunk in c.chat.completions.create(model="all", stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Say it"}],
        extra_body={"echo": os.environ["ECHO"]}):
    if chunk.choices:
        chunks += 1
        text += chunk.choices[0].delta.content or ""
whole = c.chat.completions.create(model="all", messages=[{"role": "user", "content": "Say it"}],
        extra_body={"echo": os.environ["ECHO"]})
print(json.dumps({"text": text, "chunks": chunks, "whole": whole.choices[0].message.content}))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_secret_split_across_stream_chunks_is_masked_for_the_openai_sdk() {
    let up = MockUpstream::start();
    let p = start(&up);
    let echo =
        "Sure: write to jane.doe@example.com, card 4111111111111111, ticket TICKET-0042. Bye";
    let base = p.url("/v1");
    let lines = tokio::task::spawn_blocking(move || {
        python_json_lines(SDK_STREAM, &[("BASE", &base), ("KEY", KEY), ("ECHO", echo)])
    })
    .await
    .unwrap();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let got = &lines[0];
    let want = "Sure: write to [EMAIL], card [CREDIT_CARD], ticket [TICKET]. Bye";
    assert_eq!(got["text"], want, "{got}");
    assert_eq!(got["whole"], want, "{got}");
    assert!(got["chunks"].as_u64().unwrap() > 3, "{got}");
    let m = p.metrics().await;
    for rule in ["mail", "card", "ticket"] {
        assert_eq!(
            metric(
                &m,
                "modelgate_masking_total",
                &[
                    ("rule", rule),
                    ("direction", "answer"),
                    ("action", "redact")
                ]
            ),
            2.0,
            "{rule}: {m}"
        );
    }
    assert!(!m.contains("jane.doe"));
    promtool_check(&m);
}

/// The Anthropic SDK and the OpenAI SDK's Responses API read answers, streamed and whole,
/// from an OpenAI-compatible upstream (translated for both) and an Anthropic one (passed
/// through to the Anthropic SDK, translated for Responses). The upstreams stream
/// `tok0 tok1 tok2 tok3 tok4 `, one word a chunk, so the rule's match spans two chunks; the
/// Anthropic upstream's whole answer is the same text, the OpenAI one's `tok tok tok tok tok `.
const SDK_DIALECTS: &str = r#"
import json, os, anthropic, openai
base, key = os.environ["BASE"], os.environ["KEY"]
a = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0, timeout=30)
o = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=30)
said = [{"role": "user", "content": "Say it"}]
for model in ["said", "said-claude"]:
    with a.messages.stream(model=model, max_tokens=64, messages=said) as s:
        streamed = "".join(s.text_stream)
        final = s.get_final_message().content[0].text
    whole = a.messages.create(model=model, max_tokens=64, messages=said).content[0].text
    print(json.dumps({"model": model, "sdk": "anthropic", "stream": streamed, "final": final,
                      "whole": whole}))
    streamed, final = "", None
    for ev in o.responses.create(model=model, input="Say it", stream=True):
        if ev.type == "response.output_text.delta":
            streamed += ev.delta
        elif ev.type == "response.completed":
            final = ev.response.output_text
    whole = o.responses.create(model=model, input="Say it").output_text
    print(json.dumps({"model": model, "sdk": "responses", "stream": streamed, "final": final,
                      "whole": whole}))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_are_masked_for_the_anthropic_sdk_and_the_responses_api_streamed_and_whole() {
    let up = MockUpstream::start();
    let p = start(&up);
    let base = p.url("");
    let base = base.trim_end_matches('/').to_owned();
    let lines = tokio::task::spawn_blocking(move || {
        python_json_lines(SDK_DIALECTS, &[("BASE", &base), ("KEY", KEY)])
    })
    .await
    .unwrap();
    assert_eq!(lines.len(), 4, "{lines:?}");
    let streamed = "tok0 [SPLIT] tok3 tok4";
    for line in &lines {
        let whole = match line["model"].as_str() {
            Some("said") => "[PAIR] [PAIR] tok",
            _ => streamed,
        };
        for (field, want) in [("stream", streamed), ("final", streamed), ("whole", whole)] {
            assert_eq!(
                line[field].as_str().map(str::trim_end),
                Some(want),
                "{field}: {line}"
            );
        }
    }
    // Each model's upstream was asked four times; `split` matched each answer of the
    // Anthropic upstream and each stream of the OpenAI one.
    assert_eq!((up.hits("said"), up.hits("said-claude")), (4, 4));
    let m = p.metrics().await;
    for (route, n) in [("default/said", 2.0), ("default/said-claude", 4.0)] {
        assert_eq!(
            metric(
                &m,
                "modelgate_masking_total",
                &[("route", route), ("rule", "split"), ("direction", "answer")]
            ),
            n,
            "{route}: {m}"
        );
    }
}

/// examples/policies.yaml as it is (the harness puts its listeners on free ports): a card
/// number is blocked, an e-mail address redacted; with its mock backend swapped for the
/// recording upstream, the upstream sees `[EMAIL]`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policies_example_blocks_cards_and_redacts_emails() {
    let yaml = std::fs::read_to_string(repo_root().join("examples/policies.yaml")).unwrap();
    let p = Proxy::start(&yaml);
    let ask =
        |text: &str| json!({"model": "mock-gpt", "messages": [{"role": "user", "content": text}]});
    let r = post(
        &p.url("/v1/chat/completions"),
        Some(DEMO_KEY),
        &ask("my card is 4111 1111 1111 1111"),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    assert_eq!(r.error_code(), "masking_blocked");
    assert!(r.text().contains("no-card-numbers"));
    let r = post(
        &p.url("/v1/chat/completions"),
        Some(DEMO_KEY),
        &ask("write to jane@example.com"),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let m = p.metrics().await;
    assert_eq!(
        metric(
            &m,
            "modelgate_masking_total",
            &[("rule", "emails"), ("action", "redact")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "modelgate_masking_total",
            &[("rule", "no-card-numbers"), ("action", "block")]
        ),
        1.0
    );

    let up = MockUpstream::start();
    let mock = "        provider: mock\n";
    assert!(yaml.contains(mock));
    let recorded = yaml
        .lines()
        .filter(|l| !l.trim_start().starts_with("mock:"))
        .map(|l| format!("{l}\n"))
        .collect::<String>()
        .replacen(
            mock,
            &format!(
                "        provider: openai-compatible\n        url: \"{}\"\n",
                up.url("id=example")
            ),
            1,
        );
    let p = Proxy::start(&recorded);
    let r = post(
        &p.url("/v1/chat/completions"),
        Some(DEMO_KEY),
        &ask("write to jane@example.com"),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        last_body(&up, "example")["messages"][0]["content"],
        "write to [EMAIL]"
    );
}
