//! A fast mock of an OpenAI-compatible upstream, speaking the real wire format (JSON bodies
//! and server-sent events as documented at platform.openai.com/docs/api-reference), with
//! knobs for the failures a gateway must survive.
//!
//! Knobs ride in the URL path, so every backend of a test config can behave differently:
//!
//! ```text
//!   http://127.0.0.1:PORT/s/id=a;status=500;fail_first=2/v1/chat/completions
//!   http://127.0.0.1:PORT/v1/chat/completions              (defaults)
//! ```
//!
//! | knob | meaning |
//! |---|---|
//! | `id=NAME` | counters are kept per id (`hits`, `completed`, `cancelled`) |
//! | `status=N` | answer every request (or the first `fail_first`) with status N |
//! | `fail_first=N` | only the first N requests of this id fail |
//! | `retry_after=S` | `Retry-After` header on failures |
//! | `latency=MS` | wait before the response headers |
//! | `chunks=N` | content chunks in a stream (default 5), tokens in a JSON answer |
//! | `delay=MS` | wait between streamed chunks |
//! | `usage=0` | never report usage |
//! | `prompt_tokens=N` | reported prompt tokens (default 10) |
//! | `reset_after=N` | break the connection after N streamed chunks |
//! | `hang=1` | never answer |
//! | `pretty=1` | stream events as indented JSON (one `data:` line per JSON line, `": "`) |
//! | `json_stream=1` | answer a stream request with the whole JSON answer (`application/json`) |
//! | `text=1` | answer every request 200 with a `text/plain` body |
//! | `silent=1` | send a 200's headers (event stream or JSON), then nothing: the body never comes |
//! | `echo=N` | chat and completions: the answer's text is the body's `echo` field (a string), else the last message's (or the prompt's) text, streamed in deltas of N characters |
//! | `code=CODE` | with `status`: the error body's `code` (`insufficient_quota`, `context_length_exceeded`; for `/v1/messages` the latter is Anthropic's "prompt is too long" message) |
//!
//! `POST /v1/messages` answers as Anthropic's Messages API does (docs.anthropic.com, and the
//! recorded streams of `anthropics/anthropic-sdk-python`): a `message` JSON answer or a stream
//! of named events (`message_start` with the input side of the usage, `ping`, content blocks,
//! `message_delta` with the cumulative usage, `message_stop`); errors as
//! `{"type":"error","error":{"type","message"}}`. Its own knobs:
//!
//! | knob | meaning |
//! |---|---|
//! | `cache_read=N`, `cache_write=N` | prompt-cache tokens in the usage |
//! | `thinking=1` | a thinking block with its signature comes first |
//! | `tool=1` | the answer ends with a `tool_use` block (arguments streamed in fragments) |
//! | `old_usage=1` | `message_delta` carries `output_tokens` only (older recordings) |
//! | `overloaded_mid=1` | an `overloaded_error` event right after `message_start` |
//!
//! `POST /openai/deployments/{deployment}/{chat/completions,completions,embeddings}` (classic,
//! `?api-version=` required: 404 `Resource not found` without it, the body commonly reported
//! for Azure, not confirmed from its docs) and `POST
//! /openai/v1/{chat/completions,completions,embeddings,responses}` (v1; the Responses API
//! answers as OpenAI's, as Azure's Responses how-to shows it) answer as Azure OpenAI does
//! (`MicrosoftDocs/azure-ai-docs`: `articles/ai-foundry/openai/concepts/content-streaming.md`,
//! `content-filter-annotations.md`, `content-filter.md`): the OpenAI answers above, JSON ones
//! with `prompt_filter_results` and per-choice `content_filter_results`; streams start with the
//! prompt-filter chunk (`id: ""`, `choices: []`, `usage: null`) and carry an annotation-only
//! chunk (a choice with `content_filter_results` and `content_filter_offsets`, no `delta`)
//! between content chunks and after the finish. The request's path (knobs stripped) and query
//! are recorded (`last_path`, `last_query`). Its own knobs:
//!
//! | knob | meaning |
//! |---|---|
//! | `filter=1` | answer Azure's content-filter 400 (`code: content_filter`, `innererror`) |
//! | `blocked=1` | the completion is filtered: a stream ends with an annotation chunk carrying `finish_reason: content_filter` (no `delta`), as content-streaming.md's blocked sample; a JSON answer has that finish reason (shape built, not from a recording) |

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

#[derive(Debug, Default)]
pub struct Counters {
    pub hits: AtomicU64,
    pub completed: AtomicU64,
    pub cancelled: AtomicU64,
    pub last_body: Mutex<Option<serde_json::Value>>,
    pub last_authorization: Mutex<Option<String>>,
    /// Every header of the last request (credentials included: tests assert on them).
    pub last_headers: Mutex<Option<http::HeaderMap>>,
    /// The path of the last request, knobs stripped (`/openai/deployments/d/chat/completions`).
    pub last_path: Mutex<Option<String>>,
    /// The query of the last request (`api-version=2024-10-21`), if it had one.
    pub last_query: Mutex<Option<String>>,
}

#[derive(Debug, Default)]
pub struct State {
    ids: Mutex<HashMap<String, Arc<Counters>>>,
}

impl State {
    pub fn counters(&self, id: &str) -> Arc<Counters> {
        self.ids
            .lock()
            .unwrap()
            .entry(id.to_owned())
            .or_default()
            .clone()
    }
}

#[derive(Debug, Clone)]
struct Knobs {
    id: String,
    status: Option<u16>,
    fail_first: Option<u64>,
    retry_after: Option<String>,
    latency: Duration,
    chunks: u64,
    delay: Duration,
    usage: bool,
    prompt_tokens: u64,
    reset_after: Option<u64>,
    hang: bool,
    pretty: bool,
    json_stream: bool,
    text: bool,
    silent: bool,
    cache_read: u64,
    cache_write: u64,
    thinking: bool,
    tool: bool,
    old_usage: bool,
    overloaded_mid: bool,
    filter: bool,
    code: Option<String>,
    blocked: bool,
    echo: u64,
}

impl Default for Knobs {
    fn default() -> Self {
        Self {
            id: "default".into(),
            status: None,
            fail_first: None,
            retry_after: None,
            latency: Duration::ZERO,
            chunks: 5,
            delay: Duration::ZERO,
            usage: true,
            prompt_tokens: 10,
            reset_after: None,
            hang: false,
            pretty: false,
            json_stream: false,
            text: false,
            silent: false,
            cache_read: 0,
            cache_write: 0,
            thinking: false,
            tool: false,
            old_usage: false,
            overloaded_mid: false,
            filter: false,
            code: None,
            blocked: false,
            echo: 0,
        }
    }
}

/// Split `/s/<knobs>/v1/...` into knobs and the API path.
fn parse_path(path: &str) -> (Knobs, &str) {
    let mut k = Knobs::default();
    let Some(rest) = path.strip_prefix("/s/") else {
        return (k, path);
    };
    let (spec, api) = rest.split_once('/').map_or((rest, ""), |(a, b)| (a, b));
    let api = &path[path.len() - api.len() - 1..];
    for pair in spec.split(';') {
        let (name, v) = pair.split_once('=').unwrap_or((pair, ""));
        let num = || v.parse::<u64>().unwrap_or(0);
        match name {
            "id" => k.id = v.to_owned(),
            "status" => k.status = Some(num() as u16),
            "fail_first" => k.fail_first = Some(num()),
            "retry_after" => k.retry_after = Some(v.to_owned()),
            "latency" => k.latency = Duration::from_millis(num()),
            "chunks" => k.chunks = num(),
            "delay" => k.delay = Duration::from_millis(num()),
            "usage" => k.usage = v != "0",
            "prompt_tokens" => k.prompt_tokens = num(),
            "reset_after" => k.reset_after = Some(num()),
            "hang" => k.hang = v == "1",
            "pretty" => k.pretty = v == "1",
            "json_stream" => k.json_stream = v == "1",
            "text" => k.text = v == "1",
            "silent" => k.silent = v == "1",
            "cache_read" => k.cache_read = num(),
            "cache_write" => k.cache_write = num(),
            "thinking" => k.thinking = v == "1",
            "tool" => k.tool = v == "1",
            "old_usage" => k.old_usage = v == "1",
            "overloaded_mid" => k.overloaded_mid = v == "1",
            "filter" => k.filter = v == "1",
            "code" => k.code = Some(v.to_owned()),
            "blocked" => k.blocked = v == "1",
            "echo" => k.echo = num(),
            _ => {}
        }
    }
    (k, api)
}

/// A running mock upstream on 127.0.0.1, on its own runtime thread.
pub struct MockUpstream {
    pub addr: SocketAddr,
    pub state: Arc<State>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MockUpstream {
    pub fn start() -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap(), 1)
    }

    pub fn start_on(addr: SocketAddr, threads: usize) -> Self {
        let state = Arc::new(State::default());
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let st = state.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads.max(1))
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = TcpListener::bind(addr).await.expect("bind mock upstream");
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                tokio::select! {
                    _ = serve(listener, st) => {}
                    _ = stop_rx => {}
                }
            });
        });
        let addr = addr_rx.recv().expect("mock upstream started");
        Self {
            addr,
            state,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// Base URL for a backend with these knobs, e.g. `url("id=a;status=500")`.
    pub fn url(&self, knobs: &str) -> String {
        if knobs.is_empty() {
            format!("http://{}/v1", self.addr)
        } else {
            format!("http://{}/s/{knobs}/v1", self.addr)
        }
    }

    /// An Azure OpenAI resource endpoint with these knobs (no `/v1`): the gateway appends
    /// `/openai/deployments/...`, or the backend's url adds `/openai/v1` for the v1 API.
    pub fn azure_endpoint(&self, knobs: &str) -> String {
        format!("http://{}/s/{knobs}", self.addr)
    }

    pub fn counters(&self, id: &str) -> Arc<Counters> {
        self.state.counters(id)
    }

    pub fn hits(&self, id: &str) -> u64 {
        self.counters(id).hits.load(Ordering::SeqCst)
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub async fn serve(listener: TcpListener, state: Arc<State>) {
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let service = service_fn(move |req| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(handle(state, req).await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        tokio::spawn(conn);
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Chunks released with a delay, optionally breaking the connection; counts completion
/// and cancellation (dropped before the end) per id.
pub struct ChunkBody {
    chunks: std::collections::VecDeque<Bytes>,
    delay: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    reset_after: Option<u64>,
    sent: u64,
    counters: Option<Arc<Counters>>,
}

impl ChunkBody {
    fn full(b: Bytes) -> Self {
        Self {
            chunks: vec![b].into(),
            delay: Duration::ZERO,
            sleep: None,
            reset_after: None,
            sent: 0,
            counters: None,
        }
    }
}

impl Body for ChunkBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(s) = &mut this.sleep {
            if s.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.sleep = None;
        }
        if this.reset_after == Some(this.sent) {
            this.counters = None;
            return Poll::Ready(Some(Err(
                "mock upstream: connection reset mid-stream".into()
            )));
        }
        match this.chunks.pop_front() {
            None => {
                if let Some(c) = this.counters.take() {
                    c.completed.fetch_add(1, Ordering::SeqCst);
                }
                Poll::Ready(None)
            }
            Some(b) => {
                this.sent += 1;
                if !this.delay.is_zero() {
                    this.sleep = Some(Box::pin(tokio::time::sleep(this.delay)));
                }
                Poll::Ready(Some(Ok(Frame::data(b))))
            }
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        if self.counters.is_none() && self.chunks.len() == 1 && self.delay.is_zero() {
            return hyper::body::SizeHint::with_exact(self.chunks[0].len() as u64);
        }
        hyper::body::SizeHint::default()
    }
}

impl Drop for ChunkBody {
    fn drop(&mut self) {
        if let Some(c) = self.counters.take()
            && (!self.chunks.is_empty() || self.sleep.is_some())
        {
            c.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

fn json(status: StatusCode, v: &serde_json::Value) -> Response<ChunkBody> {
    let mut r = Response::new(ChunkBody::full(Bytes::from(serde_json::to_vec(v).unwrap())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// `silent=1`: the headers go out, the body waits a day. Counted as cancelled when the
/// gateway lets go of it.
fn silenced(mut r: Response<ChunkBody>, counters: &Arc<Counters>) -> Response<ChunkBody> {
    let body = r.body_mut();
    body.sleep = Some(Box::pin(tokio::time::sleep(Duration::from_secs(86_400))));
    body.counters = Some(counters.clone());
    r
}

fn error(status: StatusCode, msg: &str) -> Response<ChunkBody> {
    json(
        status,
        &serde_json::json!({"error": {"message": msg, "type": "mock_error", "param": null, "code": status.as_u16().to_string()}}),
    )
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<ChunkBody> {
    let path = req.uri().path().to_owned();
    let (knobs, api) = parse_path(&path);
    let counters = state.counters(&knobs.id);
    let n = counters.hits.fetch_add(1, Ordering::SeqCst) + 1;
    *counters.last_authorization.lock().unwrap() = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    *counters.last_headers.lock().unwrap() = Some(req.headers().clone());
    *counters.last_path.lock().unwrap() = Some(api.to_owned());
    *counters.last_query.lock().unwrap() = req.uri().query().map(str::to_owned);
    // Azure's paths answer as the OpenAI ones do, dressed as Azure dresses them.
    let azure = azure_api(api);
    if azure.is_some_and(|a| a.classic)
        && !req
            .uri()
            .query()
            .is_some_and(|q| q.contains("api-version="))
    {
        return json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": {"code": "404", "message": "Resource not found"}}),
        );
    }
    let api = azure.map_or(api, |a| a.api);
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return error(StatusCode::BAD_REQUEST, "unreadable body"),
    };
    let parsed: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(_) if api.ends_with("/models") => serde_json::Value::Null,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("invalid JSON: {e}")),
    };
    *counters.last_body.lock().unwrap() = Some(parsed.clone());
    if knobs.hang {
        std::future::pending::<()>().await;
    }
    if !knobs.latency.is_zero() {
        tokio::time::sleep(knobs.latency).await;
    }
    if let Some(status) = knobs.status
        && knobs.fail_first.is_none_or(|f| n <= f)
    {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut r = match (api, knobs.code.as_deref()) {
            // Anthropic has no code for it: its message says so (docs/providers.md 4.5).
            ("/v1/messages", Some("context_length_exceeded")) => {
                anthropic_error(status, "prompt is too long: 250000 tokens > 200000 maximum")
            }
            ("/v1/messages", _) => anthropic_error(status, "mock upstream failure"),
            // As OpenAI words these: the code is also the type for quota.
            (_, Some(code)) => json(
                status,
                &serde_json::json!({"error": {"message": format!("mock upstream failure: {code}"),
                    "type": if code == "insufficient_quota" { code } else { "invalid_request_error" },
                    "param": null, "code": code}}),
            ),
            _ => error(status, "mock upstream failure"),
        };
        if let Some(ra) = &knobs.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_str(ra).unwrap());
        }
        return r;
    }
    if knobs.filter && azure.is_some() {
        return json(StatusCode::BAD_REQUEST, &azure_content_filter_error());
    }
    if knobs.text {
        let mut r = Response::new(ChunkBody::full(Bytes::from_static(
            b"mock upstream: all good\n",
        )));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        counters.completed.fetch_add(1, Ordering::SeqCst);
        return r;
    }
    let model = parsed["model"].as_str().unwrap_or("mock").to_owned();
    let usage = |completion: u64| {
        serde_json::json!({"prompt_tokens": knobs.prompt_tokens, "completion_tokens": completion,
            "total_tokens": knobs.prompt_tokens + completion})
    };
    match api {
        "/v1/chat/completions" | "/v1/completions" => {
            let chat = api == "/v1/chat/completions";
            let stream = parsed["stream"].as_bool().unwrap_or(false);
            let echoed = (knobs.echo > 0).then(|| {
                let said = if parsed["echo"].is_string() {
                    &parsed["echo"]
                } else if chat {
                    &parsed["messages"]
                        .as_array()
                        .and_then(|m| m.last())
                        .unwrap_or(&serde_json::Value::Null)["content"]
                } else {
                    &parsed["prompt"]
                };
                said.as_str().unwrap_or("").to_owned()
            });
            if !stream || knobs.json_stream {
                let text = echoed
                    .clone()
                    .unwrap_or_else(|| vec!["tok"; knobs.chunks as usize].join(" "));
                let finish = if azure.is_some() && knobs.blocked {
                    "content_filter"
                } else {
                    "stop"
                };
                let mut choice = if chat {
                    serde_json::json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish})
                } else {
                    serde_json::json!({"index": 0, "text": text, "finish_reason": finish})
                };
                if azure.is_some() {
                    choice["content_filter_results"] = completion_filter_results(knobs.blocked);
                }
                let mut v = serde_json::json!({"id": "chatcmpl-upstream", "object": if chat {"chat.completion"} else {"text_completion"},
                    "created": 1_700_000_000, "model": model, "choices": [choice]});
                if azure.is_some() {
                    v["prompt_filter_results"] = prompt_filter_results();
                }
                if knobs.usage {
                    v["usage"] = usage(knobs.chunks);
                }
                if knobs.silent {
                    return silenced(json(StatusCode::OK, &v), &counters);
                }
                counters.completed.fetch_add(1, Ordering::SeqCst);
                return json(StatusCode::OK, &v);
            }
            let include_usage = parsed["stream_options"]["include_usage"]
                .as_bool()
                .unwrap_or(false);
            let object = if chat {
                "chat.completion.chunk"
            } else {
                "text_completion"
            };
            let event = |v: serde_json::Value| {
                let mut out = Vec::new();
                if knobs.pretty {
                    // As a Python server with `json.dumps(v, indent=2)` would: SSE data cannot
                    // hold a newline, so each line of the document is a `data:` line.
                    for line in serde_json::to_string_pretty(&v).unwrap().lines() {
                        out.extend_from_slice(b"data: ");
                        out.extend_from_slice(line.as_bytes());
                        out.push(b'\n');
                    }
                } else {
                    out.extend_from_slice(b"data: ");
                    out.extend_from_slice(&serde_json::to_vec(&v).unwrap());
                    out.push(b'\n');
                }
                out.push(b'\n');
                Bytes::from(out)
            };
            let base = |choices: serde_json::Value| {
                let mut v = serde_json::json!({"id": "chatcmpl-upstream", "object": object, "created": 1_700_000_000,
                    "model": model, "choices": choices});
                if include_usage && knobs.usage {
                    v["usage"] = serde_json::Value::Null;
                }
                v
            };
            let mut chunks = Vec::new();
            // Azure's filter chunks carry no id, model or object (content-streaming.md).
            let annotation = |finish: Option<&str>, end: u64| {
                event(
                    serde_json::json!({"id": "", "object": "", "created": 0, "model": "",
                    "choices": [{"index": 0, "finish_reason": finish,
                        "content_filter_results": completion_filter_results(finish.is_some()),
                        "content_filter_offsets": {"check_offset": 0, "start_offset": 0, "end_offset": end}}],
                    "usage": null}),
                )
            };
            if azure.is_some() {
                chunks.push(event(serde_json::json!({"id": "", "object": "", "created": 0, "model": "",
                    "prompt_filter_results": prompt_filter_results(), "choices": [], "usage": null})));
            }
            if chat {
                chunks.push(event(base(serde_json::json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]))));
            }
            let pieces: Vec<String> = match &echoed {
                Some(text) => {
                    let chars: Vec<char> = text.chars().collect();
                    chars
                        .chunks(knobs.echo as usize)
                        .map(|c| c.iter().collect())
                        .collect()
                }
                None => (0..knobs.chunks).map(|i| format!("tok{i} ")).collect(),
            };
            for (i, piece) in pieces.into_iter().enumerate() {
                let c = if chat {
                    serde_json::json!([{"index": 0, "delta": {"content": piece}, "finish_reason": null}])
                } else {
                    serde_json::json!([{"index": 0, "text": piece, "finish_reason": null}])
                };
                chunks.push(event(base(c)));
                if azure.is_some() && i == 0 && chat {
                    chunks.push(annotation(None, 5));
                }
            }
            if azure.is_some() && knobs.blocked {
                // A blocked completion ends on the annotation that blocks it, without a delta.
                chunks.push(annotation(Some("content_filter"), 5 * knobs.chunks));
            } else {
                chunks.push(event(base(if chat {
                    serde_json::json!([{"index": 0, "delta": {}, "finish_reason": "stop"}])
                } else {
                    serde_json::json!([{"index": 0, "text": "", "finish_reason": "stop"}])
                })));
                if azure.is_some() && chat {
                    chunks.push(annotation(None, 5 * knobs.chunks));
                }
            }
            if include_usage && knobs.usage {
                let mut v = base(serde_json::json!([]));
                v["usage"] = usage(knobs.chunks);
                chunks.push(event(v));
            }
            chunks.push(Bytes::from_static(b"data: [DONE]\n\n"));
            let mut r = Response::new(ChunkBody {
                chunks: chunks.into(),
                delay: knobs.delay,
                sleep: None,
                reset_after: knobs.reset_after,
                sent: 0,
                counters: Some(counters.clone()),
            });
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            );
            if knobs.silent {
                r = silenced(r, &counters);
            }
            r
        }
        "/v1/embeddings" => {
            let inputs = match &parsed["input"] {
                serde_json::Value::Array(a) => a.len().max(1),
                _ => 1,
            };
            let data: Vec<_> = (0..inputs)
                .map(|i| serde_json::json!({"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]}))
                .collect();
            let mut v = serde_json::json!({"object": "list", "data": data, "model": model});
            if knobs.usage {
                v["usage"] = serde_json::json!({"prompt_tokens": knobs.prompt_tokens, "total_tokens": knobs.prompt_tokens});
            }
            counters.completed.fetch_add(1, Ordering::SeqCst);
            json(StatusCode::OK, &v)
        }
        "/v1/messages" => anthropic(&knobs, &parsed, &counters),
        "/v1/responses" => responses(&knobs, &parsed, &counters),
        "/v1/messages/count_tokens" => {
            counters.completed.fetch_add(1, Ordering::SeqCst);
            json(
                StatusCode::OK,
                &serde_json::json!({"input_tokens": knobs.prompt_tokens}),
            )
        }
        _ => error(StatusCode::NOT_FOUND, &format!("unknown path {api}")),
    }
}

/// An Azure OpenAI path as the OpenAI path it answers like.
#[derive(Clone, Copy)]
struct AzureApi {
    api: &'static str,
    /// `/openai/deployments/{d}/...`, which needs `?api-version=`.
    classic: bool,
}

fn azure_api(path: &str) -> Option<AzureApi> {
    let (rest, classic) = match path.strip_prefix("/openai/v1/") {
        Some(rest) => (rest, false),
        None => (
            path.strip_prefix("/openai/deployments/")?
                .split_once('/')?
                .1,
            true,
        ),
    };
    let api = match rest {
        "chat/completions" => "/v1/chat/completions",
        "completions" => "/v1/completions",
        "embeddings" => "/v1/embeddings",
        // The Responses API is the v1 API's only (the classic one has it per resource, in
        // preview, which the gateway does not use).
        "responses" if !classic => "/v1/responses",
        _ => return None,
    };
    Some(AzureApi { api, classic })
}

/// A prompt's `prompt_filter_results`, nothing filtered (content-filter-annotations.md).
fn prompt_filter_results() -> serde_json::Value {
    serde_json::json!([{"prompt_index": 0, "content_filter_results": {
        "hate": {"filtered": false, "severity": "safe"},
        "jailbreak": {"filtered": false, "detected": false},
        "self_harm": {"filtered": false, "severity": "safe"},
        "sexual": {"filtered": false, "severity": "safe"},
        "violence": {"filtered": false, "severity": "safe"}}}])
}

/// A choice's `content_filter_results`; `blocked`: protected material found and filtered,
/// as in the blocked stream of content-streaming.md.
fn completion_filter_results(blocked: bool) -> serde_json::Value {
    serde_json::json!({
        "hate": {"filtered": false, "severity": "safe"},
        "protected_material_code": {"filtered": false, "detected": false},
        "protected_material_text": {"filtered": blocked, "detected": blocked},
        "self_harm": {"filtered": false, "severity": "safe"},
        "sexual": {"filtered": false, "severity": "safe"},
        "violence": {"filtered": false, "severity": "safe"}})
}

/// Azure's answer to a prompt its filters block: content-filter.md's example, with the
/// `innererror` member spelled `content_filter_result` as there.
fn azure_content_filter_error() -> serde_json::Value {
    serde_json::json!({"error": {
        "message": "The response was filtered due to the prompt triggering Azure OpenAI's content management policy. Please modify your prompt and retry. To learn more about our content filtering policies please read our documentation: https://go.microsoft.com/fwlink/?linkid=2198766",
        "type": null, "param": "prompt", "code": "content_filter", "status": 400,
        "innererror": {"code": "ResponsibleAIPolicyViolation", "content_filter_result": {
            "hate": {"filtered": true, "severity": "high"},
            "self_harm": {"filtered": false, "severity": "safe"},
            "sexual": {"filtered": false, "severity": "safe"},
            "violence": {"filtered": false, "severity": "safe"}}}}})
}

/// An error body as Anthropic writes one, its type chosen by status as its docs list them.
fn anthropic_error(status: StatusCode, msg: &str) -> Response<ChunkBody> {
    let kind = match status.as_u16() {
        400 => "invalid_request_error",
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        504 => "timeout_error",
        529 => "overloaded_error",
        _ => "api_error",
    };
    json(
        status,
        &serde_json::json!({"type": "error", "error": {"type": kind, "message": msg}, "request_id": "req_mock"}),
    )
}

/// One named server-sent event, as Anthropic writes them.
fn named_event(name: &str, data: &serde_json::Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

/// `POST /v1/messages`: a message, or its stream, as Anthropic's API sends them.
fn anthropic(
    knobs: &Knobs,
    req: &serde_json::Value,
    counters: &Arc<Counters>,
) -> Response<ChunkBody> {
    use serde_json::json;
    let model = req["model"].as_str().unwrap_or("claude-mock").to_owned();
    if !req["max_tokens"].is_u64() || !req["messages"].is_array() {
        return anthropic_error(
            StatusCode::BAD_REQUEST,
            "max_tokens and messages are required",
        );
    }
    let output = knobs.chunks + u64::from(knobs.thinking) * 3 + u64::from(knobs.tool) * 4;
    let input_side = json!({"input_tokens": knobs.prompt_tokens,
        "cache_creation_input_tokens": knobs.cache_write, "cache_read_input_tokens": knobs.cache_read});
    let text = (0..knobs.chunks)
        .map(|i| format!("tok{i} "))
        .collect::<String>();
    let stop = if knobs.tool { "tool_use" } else { "end_turn" };
    const SIGNATURE: &str = "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds";
    const ARGS: [&str; 3] = ["", "{\"city\": ", "\"Paris\"}"];
    if !req["stream"].as_bool().unwrap_or(false) {
        let mut content = Vec::new();
        if knobs.thinking {
            content.push(
                json!({"type": "thinking", "thinking": "Let me think.", "signature": SIGNATURE}),
            );
        }
        content.push(json!({"type": "text", "text": text}));
        if knobs.tool {
            content.push(json!({"type": "tool_use", "id": "toolu_mock1", "name": "get_weather", "input": {"city": "Paris"}}));
        }
        let mut usage = input_side.clone();
        usage["output_tokens"] = json!(output);
        counters.completed.fetch_add(1, Ordering::SeqCst);
        return json(
            StatusCode::OK,
            &json!({"id": "msg_mock1", "type": "message", "role": "assistant", "model": model,
                "content": content, "stop_reason": stop, "stop_sequence": null, "usage": usage}),
        );
    }
    let mut start_usage = input_side.clone();
    start_usage["output_tokens"] = json!(1);
    let mut chunks = vec![
        named_event(
            "message_start",
            &json!({"type": "message_start", "message": {"id": "msg_mock1", "type": "message",
                "role": "assistant", "model": model, "content": [], "stop_reason": null,
                "stop_sequence": null, "usage": start_usage}}),
        ),
        named_event("ping", &json!({"type": "ping"})),
    ];
    if knobs.overloaded_mid {
        chunks.push(named_event(
            "error",
            &json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
        ));
    } else {
        let mut index = 0;
        let mut block = |start: serde_json::Value, deltas: Vec<serde_json::Value>| {
            let mut out = vec![named_event(
                "content_block_start",
                &json!({"type": "content_block_start", "index": index, "content_block": start}),
            )];
            for d in deltas {
                out.push(named_event(
                    "content_block_delta",
                    &json!({"type": "content_block_delta", "index": index, "delta": d}),
                ));
            }
            out.push(named_event(
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": index}),
            ));
            index += 1;
            out
        };
        if knobs.thinking {
            chunks.extend(block(
                json!({"type": "thinking", "thinking": "", "signature": ""}),
                vec![
                    json!({"type": "thinking_delta", "thinking": "Let me "}),
                    json!({"type": "thinking_delta", "thinking": "think."}),
                    json!({"type": "signature_delta", "signature": SIGNATURE}),
                ],
            ));
        }
        chunks.extend(block(
            json!({"type": "text", "text": ""}),
            (0..knobs.chunks)
                .map(|i| json!({"type": "text_delta", "text": format!("tok{i} ")}))
                .collect(),
        ));
        if knobs.tool {
            chunks.extend(block(
                json!({"type": "tool_use", "id": "toolu_mock1", "name": "get_weather", "input": {}}),
                ARGS.iter()
                    .map(|a| json!({"type": "input_json_delta", "partial_json": a}))
                    .collect(),
            ));
        }
        let mut usage = if knobs.old_usage {
            json!({})
        } else {
            input_side
        };
        usage["output_tokens"] = json!(output);
        chunks.push(named_event(
            "message_delta",
            &json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null}, "usage": usage}),
        ));
        chunks.push(named_event(
            "message_stop",
            &json!({"type": "message_stop"}),
        ));
    }
    let mut r = Response::new(ChunkBody {
        chunks: chunks.into(),
        delay: knobs.delay,
        sleep: None,
        reset_after: knobs.reset_after,
        sent: 0,
        counters: Some(counters.clone()),
    });
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    r
}

/// `POST /v1/responses`: a response object, or its stream, as OpenAI's Responses API sends
/// them (text only; `input_tokens` counts the cached ones too, as OpenAI reports them).
fn responses(
    knobs: &Knobs,
    req: &serde_json::Value,
    counters: &Arc<Counters>,
) -> Response<ChunkBody> {
    use serde_json::json;
    let model = req["model"].as_str().unwrap_or("gpt-mock").to_owned();
    if req.get("input").is_none() {
        return error(
            StatusCode::BAD_REQUEST,
            "Missing required parameter: 'input'.",
        );
    }
    let text = (0..knobs.chunks)
        .map(|i| format!("tok{i} "))
        .collect::<String>();
    let usage = json!({"input_tokens": knobs.prompt_tokens + knobs.cache_read,
        "input_tokens_details": {"cached_tokens": knobs.cache_read},
        "output_tokens": knobs.chunks, "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": knobs.prompt_tokens + knobs.cache_read + knobs.chunks});
    let message = |text: &str, status: &str| {
        json!({"id": "msg_mock1", "type": "message", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]})
    };
    let response = |status: &str, output: serde_json::Value, usage: serde_json::Value| {
        json!({"id": "resp_mock1", "object": "response", "created_at": 1_700_000_000,
            "status": status, "error": null, "incomplete_details": null, "instructions": null,
            "max_output_tokens": req["max_output_tokens"], "model": model, "output": output,
            "parallel_tool_calls": true, "previous_response_id": req["previous_response_id"],
            "store": req["store"].as_bool().unwrap_or(true), "temperature": 1.0,
            "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [],
            "top_p": 1.0, "truncation": "disabled", "usage": usage, "metadata": {}})
    };
    if !req["stream"].as_bool().unwrap_or(false) {
        counters.completed.fetch_add(1, Ordering::SeqCst);
        return json(
            StatusCode::OK,
            &response("completed", json!([message(&text, "completed")]), usage),
        );
    }
    let mut seq = 0u64;
    let mut event = |name: &str, mut data: serde_json::Value| {
        data["type"] = json!(name);
        data["sequence_number"] = json!(seq);
        seq += 1;
        named_event(name, &data)
    };
    let mut chunks = vec![
        event(
            "response.created",
            json!({"response": response("in_progress", json!([]), json!(null))}),
        ),
        event(
            "response.in_progress",
            json!({"response": response("in_progress", json!([]), json!(null))}),
        ),
        event(
            "response.output_item.added",
            json!({"output_index": 0, "item": {"id": "msg_mock1", "type": "message",
                "status": "in_progress", "role": "assistant", "content": []}}),
        ),
        event(
            "response.content_part.added",
            json!({"item_id": "msg_mock1", "output_index": 0, "content_index": 0,
                "part": {"type": "output_text", "text": "", "annotations": []}}),
        ),
    ];
    for i in 0..knobs.chunks {
        chunks.push(event(
            "response.output_text.delta",
            json!({"item_id": "msg_mock1", "output_index": 0, "content_index": 0,
                "delta": format!("tok{i} "), "logprobs": []}),
        ));
    }
    chunks.push(event(
        "response.output_text.done",
        json!({"item_id": "msg_mock1", "output_index": 0, "content_index": 0, "text": text,
            "logprobs": []}),
    ));
    chunks.push(event(
        "response.content_part.done",
        json!({"item_id": "msg_mock1", "output_index": 0, "content_index": 0,
            "part": {"type": "output_text", "text": text, "annotations": []}}),
    ));
    chunks.push(event(
        "response.output_item.done",
        json!({"output_index": 0, "item": message(&text, "completed")}),
    ));
    chunks.push(event(
        "response.completed",
        json!({"response": response("completed", json!([message(&text, "completed")]), usage)}),
    ));
    let mut r = Response::new(ChunkBody {
        chunks: chunks.into(),
        delay: knobs.delay,
        sleep: None,
        reset_after: knobs.reset_after,
        sent: 0,
        counters: Some(counters.clone()),
    });
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knobs_parse_from_the_path() {
        let (k, api) = parse_path("/s/id=a;status=503;fail_first=2;delay=5/v1/chat/completions");
        assert_eq!(k.id, "a");
        assert_eq!(k.status, Some(503));
        assert_eq!(k.fail_first, Some(2));
        assert_eq!(k.delay, Duration::from_millis(5));
        assert_eq!(api, "/v1/chat/completions");
        assert!(!k.pretty);
        let (k, _) = parse_path("/s/id=p;pretty=1/v1/chat/completions");
        assert!(k.pretty);
        let (k, _) = parse_path("/s/id=j;json_stream=1;text=1/v1/chat/completions");
        assert!(k.json_stream && k.text);
        let (k, _) = parse_path("/s/id=q;silent=1/v1/chat/completions");
        assert!(k.silent);
        let (k, api) = parse_path("/v1/embeddings");
        assert_eq!(k.id, "default");
        assert_eq!(api, "/v1/embeddings");
        let (k, api) =
            parse_path("/s/id=az;filter=1;blocked=1/openai/deployments/gpt-4o/chat/completions");
        assert!(k.filter && k.blocked);
        let a = azure_api(api).unwrap();
        assert_eq!((a.api, a.classic), ("/v1/chat/completions", true));
        let a = azure_api("/openai/v1/embeddings").unwrap();
        assert_eq!((a.api, a.classic), ("/v1/embeddings", false));
        let a = azure_api("/openai/v1/responses").unwrap();
        assert_eq!((a.api, a.classic), ("/v1/responses", false));
        assert!(azure_api("/openai/deployments/d/responses").is_none());
        assert!(azure_api("/openai/deployments/d").is_none());
        assert!(azure_api("/v1/chat/completions").is_none());
    }
}
