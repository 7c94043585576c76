//! OpenTelemetry GenAI traces, received by a real OTLP/HTTP receiver (`tests/python/
//! otlp_receiver.py`, the official `opentelemetry-proto` package) from the real proxy, with the
//! official OpenAI Python SDK as the client and the mock OpenAI upstream behind it.

use std::time::Duration;

use modelgate_tests::harness::*;
use modelgate_tests::upstream::MockUpstream;
use serde_json::Value;

const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
const CLIENT_SPAN: &str = "b7ad6b7169203331";

/// A route whose first tier answers 500 and whose second answers (two attempts), with
/// tracing sent to `otlp`.
fn config(up: &MockUpstream, tracing: &str) -> String {
    format!(
        r#"
server:
  tracing: {tracing}
routes:
  - name: gpt-up
    model: gpt-up
    retries: {{attempts: 0}}
    backends:
      - {{name: broken, provider: openai-compatible, url: "{broken}", model: up-model-v1}}
      - {{name: good, provider: openai-compatible, priority: 1, url: "{good}", model: up-model-v1}}
keys:
  - {{name: demo, sha256: {demo}}}
"#,
        broken = up.url("id=broken;status=500"),
        good = up.url("id=good;chunks=3;prompt_tokens=12"),
        demo = sha256_hex(DEMO_KEY),
    )
}

/// One streamed chat completion through the OpenAI SDK, with `traceparent` when given.
fn sdk_stream(base: &str, traceparent: Option<&str>) -> Value {
    let script = r#"
import json, os, openai
c = openai.OpenAI(base_url=os.environ["BASE"], api_key=os.environ["KEY"], max_retries=0, timeout=30)
tp = os.environ.get("TP")
h = {"traceparent": tp, "tracestate": "vendor=test"} if tp else {}
s = c.chat.completions.create(model="gpt-up", messages=[{"role": "user", "content": "hello trace"}],
    stream=True, stream_options={"include_usage": True}, extra_headers=h)
text, usage = "", None
for ch in s:
    if ch.choices and ch.choices[0].delta.content:
        text += ch.choices[0].delta.content
    if ch.usage:
        usage = ch.usage
print(json.dumps({"text": text, "prompt": usage.prompt_tokens, "completion": usage.completion_tokens}))
"#;
    let mut envs = vec![("BASE", base), ("KEY", DEMO_KEY)];
    if let Some(tp) = traceparent {
        envs.push(("TP", tp));
    }
    let mut lines = python_json_lines(script, &envs);
    assert_eq!(lines.len(), 1, "the script prints one JSON line: {lines:?}");
    lines.remove(0)
}

async fn spans(rx: &PyMock) -> Vec<Value> {
    rx.state("spans")
        .await
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn attr<'a>(span: &'a Value, name: &str) -> &'a Value {
    &span["attributes"][name]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_follow_the_genai_conventions_and_continue_the_clients_trace() {
    let up = MockUpstream::start();
    let rx = PyMock::start("otlp_receiver.py", &[]);
    // Ratio 0: only traces the client sampled are recorded.
    let tracing = format!(
        "{{otlpEndpoint: \"{}\", samplingRatio: 0, captureContent: true, serviceName: gw-test}}",
        rx.url("")
    );
    let p = Proxy::start(&config(&up, &tracing));
    let base = p.url("/v1");

    // Not sampled by anyone: no span. Then the client's sampled trace.
    let b = base.clone();
    let plain = tokio::task::spawn_blocking(move || sdk_stream(&b, None))
        .await
        .unwrap();
    assert_eq!(plain["prompt"], 12);
    let b = base.clone();
    let tp = format!("00-{TRACE_ID}-{CLIENT_SPAN}-01");
    let answer = tokio::task::spawn_blocking(move || sdk_stream(&b, Some(&tp)))
        .await
        .unwrap();
    assert!(!answer["text"].as_str().unwrap().is_empty());

    eventually(
        Duration::from_secs(30),
        "the request span arrives",
        || async {
            spans(&rx)
                .await
                .iter()
                .any(|s| s["kind"] == "SPAN_KIND_SERVER")
        },
    )
    .await;
    // Spans are exported in the order they end: the unsampled request's would be here.
    let all = spans(&rx).await;
    let servers: Vec<&Value> = all
        .iter()
        .filter(|s| s["kind"] == "SPAN_KIND_SERVER")
        .collect();
    assert_eq!(
        servers.len(),
        1,
        "only the client's sampled trace: {all:#?}"
    );
    let req = servers[0];
    assert_eq!(req["trace_id"], TRACE_ID, "the client's trace continues");
    assert_eq!(req["parent_span_id"], CLIENT_SPAN);
    assert_eq!(req["name"], "chat gpt-up");
    assert_eq!(req["resource"]["service.name"], "gw-test");
    assert_eq!(attr(req, "gen_ai.operation.name"), "chat");
    assert_eq!(attr(req, "gen_ai.provider.name"), "openai");
    assert_eq!(attr(req, "gen_ai.request.model"), "gpt-up");
    assert_eq!(attr(req, "gen_ai.response.model"), "up-model-v1");
    assert_eq!(attr(req, "gen_ai.usage.input_tokens"), &answer["prompt"]);
    assert_eq!(
        attr(req, "gen_ai.usage.output_tokens"),
        &answer["completion"]
    );
    assert_eq!(
        attr(req, "gen_ai.response.finish_reasons"),
        &serde_json::json!(["stop"])
    );
    assert_eq!(attr(req, "http.response.status_code"), 200);
    assert_eq!(attr(req, "modelgate.route"), "default/gpt-up");
    assert_eq!(attr(req, "modelgate.backend"), "good");
    assert_eq!(attr(req, "modelgate.attempts"), 2);
    assert!(attr(req, "error.type").is_null(), "{req:#}");
    assert!(
        attr(req, "gen_ai.input.messages")
            .as_str()
            .unwrap()
            .contains("hello trace"),
        "captureContent: the prompt is on the span"
    );
    // Nothing secret: no attribute carries the client's key.
    assert!(!req.to_string().contains(DEMO_KEY));

    // One child span per attempt: the 500, then the fallback that answered.
    let mut attempts: Vec<&Value> = all
        .iter()
        .filter(|s| s["kind"] == "SPAN_KIND_CLIENT" && s["trace_id"] == TRACE_ID)
        .collect();
    attempts.sort_by_key(|s| s["start_ns"].as_u64());
    assert_eq!(attempts.len(), 2, "{all:#?}");
    for a in &attempts {
        assert_eq!(a["parent_span_id"], req["span_id"]);
        assert_eq!(a["name"], "chat up-model-v1");
        assert_eq!(attr(a, "gen_ai.provider.name"), "openai");
        assert_eq!(attr(a, "gen_ai.request.model"), "up-model-v1");
    }
    assert_eq!(attr(attempts[0], "modelgate.backend"), "broken");
    assert_eq!(attr(attempts[0], "error.type"), "server_error");
    assert_eq!(attr(attempts[0], "http.response.status_code"), 500);
    assert_eq!(attempts[0]["status_code"], "STATUS_CODE_ERROR");
    assert_eq!(attr(attempts[1], "modelgate.backend"), "good");
    assert_eq!(attr(attempts[1], "http.response.status_code"), 200);

    // The upstream got the attempt's context, the client's tracestate with it.
    let headers = up
        .counters("good")
        .last_headers
        .lock()
        .unwrap()
        .clone()
        .unwrap();
    let sent = headers["traceparent"].to_str().unwrap().to_owned();
    assert_eq!(
        sent,
        format!(
            "00-{TRACE_ID}-{}-01",
            attempts[1]["span_id"].as_str().unwrap()
        )
    );
    assert_eq!(headers["tracestate"], "vendor=test");

    // The access log names the trace.
    eventually(
        Duration::from_secs(10),
        "trace_id in the access log",
        || async {
            p.log_text()
                .contains(&format!("\"trace_id\":\"{TRACE_ID}\""))
        },
    )
    .await;
    let exported = p.metric("modelgate_trace_spans_exported_total", &[]).await;
    assert!(exported >= 3.0, "{exported}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_refuses_costs_spans_not_requests() {
    let up = MockUpstream::start();
    let rx = PyMock::start("otlp_receiver.py", &["--status", "503"]);
    let tracing = format!("{{otlpEndpoint: \"{}\", samplingRatio: 1}}", rx.url(""));
    let mut p = Proxy::start(&config(&up, &tracing));
    for _ in 0..20 {
        let r = p.chat(DEMO_KEY, "gpt-up").await;
        assert_eq!(r.status, http::StatusCode::OK, "{}", r.text());
    }
    eventually(
        Duration::from_secs(60),
        "failed exports counted",
        || async {
            p.metric("modelgate_trace_spans_export_failed_total", &[])
                .await
                > 0.0
        },
    )
    .await;
    assert_eq!(
        p.metric("modelgate_trace_spans_exported_total", &[]).await,
        0.0
    );
    // Shutdown still ends within the drain deadline (30 s by default).
    p.signal("TERM");
    let status = p.wait_exit(Duration::from_secs(40)).await;
    assert!(status.is_some_and(|s| s.success()), "{}", p.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_by_default_nothing_is_added() {
    let up = MockUpstream::start();
    let p = Proxy::start(&config(&up, "{}"));
    let b = p.url("/v1");
    let tp = format!("00-{TRACE_ID}-{CLIENT_SPAN}-01");
    tokio::task::spawn_blocking(move || sdk_stream(&b, Some(&tp)))
        .await
        .unwrap();
    let headers = up
        .counters("good")
        .last_headers
        .lock()
        .unwrap()
        .clone()
        .unwrap();
    assert!(headers.get("traceparent").is_none(), "{headers:?}");
    eventually(Duration::from_secs(10), "the access log line", || async {
        p.log_text().contains("\"message\":\"request\"")
    })
    .await;
    assert!(!p.log_text().contains("trace_id"));
    assert!(
        !p.metrics()
            .await
            .lines()
            .any(|l| l.starts_with("modelgate_trace_spans_exported_total") && !l.ends_with(" 0"))
    );
}
