//! OpenTelemetry traces after the GenAI semantic conventions, exported by OTLP/HTTP.
//!
//! ```text
//!  client ─ traceparent? ─► request span (SERVER, "chat gpt-4o"): started by `proxy::handle`,
//!                             │  ended when the Meter drops (after the stream, with usage)
//!                             └► attempt span (CLIENT) per upstream try ─ traceparent ─► upstream
//!  ended spans ─► BatchSpanProcessor (bounded queue, its own thread; full: dropped)
//!              ─► OTLP/HTTP protobuf ─► ExportClient (the proxy's hyper + rustls, on the runtime)
//! ```
//!
//! Off unless `server.tracing.otlpEndpoint` is set: the gateway then holds no [`Tracing`] and a
//! request builds no span. Sampling is parent-based: a client's sampled flag decides for its
//! trace, `samplingRatio` for traces that start here. The decision is taken here, before the
//! SDK sees the request: a sampled-out request (most of them at a low ratio) keeps only its
//! trace id and the client's `tracestate`, so that an upstream still gets a `traceparent`
//! (not sampled), and builds no SDK span, context or attribute. Attributes are the conventions' `gen_ai.*`
//! ones plus a few `modelgate.*` (route, backend, key name, request id); credentials and API keys
//! never are, prompts and answers only with `captureContent`.

use std::cell::Cell;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body_util::{BodyExt, Full, Limited};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Array, Context, KeyValue, StringValue, Value};
use opentelemetry_http::{HeaderExtractor, HttpError};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, IdGenerator, RandomIdGenerator, Sampler,
    SamplingDecision, SdkTracer, SdkTracerProvider, ShouldSample, Span, SpanData, SpanExporter,
};

use crate::canonical::Usage;
use crate::config::TracingSpec;
use crate::metrics::Metrics;
use crate::routes::{Backend, Provider};

/// How long one export may take (connect, send, answer); a slow collector costs a batch,
/// never a request.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a captured prompt or answer attribute may be.
const MAX_CONTENT_BYTES: usize = 64 * 1024;

/// The tracer of a proxy with tracing on.
pub struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    capture_content: bool,
    /// `samplingRatio`, for traces that start here (the SDK's sampler is the same one behind
    /// the parent-based rule, and agrees: it sees the same trace id, see [`Ids`]).
    root: Sampler,
    /// Shutting down: the SDK starts no span now, and no context goes upstream.
    closed: AtomicBool,
}

impl fmt::Debug for Tracing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracing")
            .field("capture_content", &self.capture_content)
            .finish_non_exhaustive()
    }
}

/// `<endpoint>/v1/traces`, unless the endpoint names that path already.
pub fn traces_url(endpoint: &str) -> Result<http::Uri, String> {
    let e = endpoint.trim();
    let url = if e.trim_end_matches('/').ends_with("/v1/traces") {
        e.to_owned()
    } else {
        format!("{}/v1/traces", e.trim_end_matches('/'))
    };
    let uri: http::Uri = url
        .parse()
        .map_err(|err| format!("otlpEndpoint {endpoint:?} is not a URL: {err}"))?;
    match uri.scheme_str() {
        Some("http" | "https") if uri.host().is_some() => Ok(uri),
        _ => Err(format!(
            "otlpEndpoint {endpoint:?} must be an http:// or https:// URL (OTLP/HTTP, e.g. http://otel-collector:4318)"
        )),
    }
}

impl Tracing {
    /// Start the exporter (on the current Tokio runtime) when `spec` names an endpoint.
    pub fn start(spec: &TracingSpec, metrics: Arc<Metrics>) -> Result<Option<Self>, String> {
        let Some(endpoint) = spec
            .otlp_endpoint
            .as_deref()
            .filter(|e| !e.trim().is_empty())
        else {
            return Ok(None);
        };
        if !(0.0..=1.0).contains(&spec.sampling_ratio) {
            return Err(format!(
                "samplingRatio must be from 0 to 1, not {}",
                spec.sampling_ratio
            ));
        }
        let url = traces_url(endpoint)?;
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| "tracing starts inside the proxy's runtime".to_owned())?;
        let client = ExportClient {
            // Its own pool, and no egress policy: the admin names the collector.
            client: crate::providers::http_client(None),
            runtime,
        };
        let otlp = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_endpoint(url.to_string())
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| format!("OTLP exporter: {e}"))?;
        let exporter = CountingExporter {
            inner: otlp,
            metrics,
            warned_at: AtomicU64::new(0),
        };
        let batch = BatchConfigBuilder::default()
            .with_max_queue_size(spec.max_queue_size.max(1))
            .with_max_export_batch_size(512.min(spec.max_queue_size.max(1)))
            .with_scheduled_delay(Duration::from_secs(1))
            .build();
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(batch)
            .build();
        let resource = opentelemetry_sdk::Resource::builder_empty()
            .with_service_name(spec.service_name.clone())
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                spec.sampling_ratio,
            ))))
            .with_id_generator(Ids)
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("modelgate");
        Ok(Some(Self {
            provider,
            tracer,
            capture_content: spec.capture_content,
            root: Sampler::TraceIdRatioBased(spec.sampling_ratio),
            closed: AtomicBool::new(false),
        }))
    }

    /// The span of a request that just arrived, child of the client's `traceparent` if any.
    /// Parent-based, as the SDK's sampler would decide: a valid client context decides by its
    /// sampled flag, a trace that starts here by `samplingRatio` on its new trace id. Only a
    /// sampled request reaches the SDK.
    pub fn request_span(&self, headers: &HeaderMap) -> RequestSpan {
        if self.closed.load(Ordering::Relaxed) {
            return RequestSpan(Inner::Off);
        }
        let parent = match remote_parent(headers) {
            Some(p) if p.is_sampled() => Context::new().with_remote_span_context(p),
            Some(p) => {
                return RequestSpan(Inner::Unsampled {
                    trace_id: p.trace_id(),
                    trace_state: p.trace_state().clone(),
                });
            }
            None => {
                let trace_id = RandomIdGenerator::default().new_trace_id();
                let decision = self
                    .root
                    .should_sample(None, trace_id, "gen_ai", &SpanKind::Server, &[], &[])
                    .decision;
                if decision == SamplingDecision::Drop {
                    return RequestSpan(Inner::Unsampled {
                        trace_id,
                        trace_state: TraceState::NONE,
                    });
                }
                DRAWN.set(Some(trace_id));
                Context::new()
            }
        };
        let span = self
            .tracer
            .span_builder("gen_ai")
            .with_kind(SpanKind::Server)
            .start_with_context(&self.tracer, &parent);
        // Unused if the SDK drew no id (shut down meanwhile).
        DRAWN.set(None);
        RequestSpan(Inner::Recorded(Box::new(Recorded {
            span,
            tracer: self.tracer.clone(),
            capture_content: self.capture_content,
            provider: None,
        })))
    }

    /// Export what is queued, within `within` (the drain deadline's rest); blocking, so on a
    /// thread of its own.
    pub async fn shutdown(self: Arc<Self>, within: Duration) {
        self.closed.store(true, Ordering::Relaxed);
        let provider = self.provider.clone();
        let done = tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(within));
        match tokio::time::timeout(within + Duration::from_millis(200), done).await {
            Ok(Ok(Ok(()))) => tracing::info!("traces flushed"),
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "traces not all flushed at shutdown"),
            _ => tracing::warn!("traces not flushed within the drain deadline"),
        }
    }
}

thread_local! {
    /// The trace id `request_span` drew, and sampled on, for a trace that starts here; the
    /// SDK's next root span takes it (on this thread, in the same call).
    static DRAWN: Cell<Option<TraceId>> = const { Cell::new(None) };
}

/// The SDK's random ids, except that a root span gets the trace id `request_span` already
/// decided on, so that the SDK's ratio sampler agrees and a recorded trace's id is the one
/// `samplingRatio` picked.
#[derive(Debug)]
struct Ids;

impl IdGenerator for Ids {
    fn new_trace_id(&self) -> TraceId {
        DRAWN
            .take()
            .unwrap_or_else(|| RandomIdGenerator::default().new_trace_id())
    }

    fn new_span_id(&self) -> SpanId {
        RandomIdGenerator::default().new_span_id()
    }
}

/// The client's context (`traceparent`, with its `tracestate`) when it is valid: what the
/// W3C propagator extracts. The usual form (version 00, lower-case hex, nothing around it)
/// is read here without the propagator's allocations; any other goes to the propagator.
fn remote_parent(headers: &HeaderMap) -> Option<SpanContext> {
    let tp = headers.get("traceparent")?.as_bytes();
    let usual = tp.len() == 55 && tp.starts_with(b"00-") && tp[35] == b'-' && tp[52] == b'-';
    let ids = usual
        .then(|| {
            Some((
                hex_u128(&tp[3..35])?,
                hex_u128(&tp[36..52])?,
                hex_u128(&tp[53..55])?,
            ))
        })
        .flatten();
    let Some((trace_id, span_id, flags)) = ids else {
        let cx = TraceContextPropagator::new()
            .extract_with_context(&Context::new(), &HeaderExtractor(headers));
        let sc = cx.span().span_context().clone();
        return sc.is_valid().then_some(sc);
    };
    let (trace_id, span_id) = (TraceId::from(trace_id), SpanId::from(span_id as u64));
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    let trace_state = headers
        .get("tracestate")
        .and_then(|v| v.to_str().ok())
        .map(|s| TraceState::from_str(s).unwrap_or_default())
        .unwrap_or_default();
    Some(SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags as u8) & TraceFlags::SAMPLED,
        true,
        trace_state,
    ))
}

/// Lower-case hex digits (at most 32) as a number; `None` for anything else.
fn hex_u128(digits: &[u8]) -> Option<u128> {
    digits.iter().try_fold(0u128, |v, &b| {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            _ => return None,
        };
        Some(v << 4 | u128::from(d))
    })
}

/// `gen_ai.provider.name` of a backend (the conventions' well-known values; the built-in mock
/// is `modelgate.mock`).
pub fn provider_name(p: &Provider) -> &'static str {
    match p {
        Provider::OpenAi(_) => "openai",
        Provider::Anthropic(_) => "anthropic",
        Provider::Azure(_) => "azure.ai.openai",
        Provider::Bedrock(_) => "aws.bedrock",
        Provider::Gemini(_) => "gcp.gemini",
        Provider::Vertex(_) => "gcp.vertex_ai",
        Provider::Mock(_) => "modelgate.mock",
    }
}

/// `gen_ai.operation.name` of an endpoint (`Endpoint::as_str`).
pub fn operation_name(endpoint: &str) -> &'static str {
    match endpoint {
        "chat" | "messages" | "responses" => "chat",
        "completions" => "text_completion",
        "embeddings" => "embeddings",
        "count_tokens" => "count_tokens",
        "models" => "list_models",
        _ => "unknown",
    }
}

/// The `traceparent` (and `tracestate`) an upstream gets: the attempt's span.
#[derive(Clone, Debug)]
pub struct TraceHeaders {
    pub traceparent: HeaderValue,
    pub tracestate: Option<HeaderValue>,
}

impl TraceHeaders {
    /// What the W3C propagator injects for a span: `traceparent` (version 00, the sampled
    /// flag alone) and a non-empty `tracestate`; nothing for an invalid context.
    fn new(
        trace_id: TraceId,
        span_id: SpanId,
        flags: TraceFlags,
        state: &TraceState,
    ) -> Option<Self> {
        if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
            return None;
        }
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut tp = *b"00-00000000000000000000000000000000-0000000000000000-00";
        let flags = (flags & TraceFlags::SAMPLED).to_u8();
        let digits = trace_id
            .to_bytes()
            .into_iter()
            .chain(span_id.to_bytes())
            .chain([flags]);
        // The hex digit pairs' places: the trace id's 16 bytes, the span id's 8, the flags.
        let at = (3..35).step_by(2).chain((36..52).step_by(2)).chain([53]);
        for (i, b) in at.zip(digits) {
            tp[i] = HEX[usize::from(b >> 4)];
            tp[i + 1] = HEX[usize::from(b & 0xf)];
        }
        let traceparent = HeaderValue::from_bytes(&tp).ok()?;
        let state = state.header();
        Some(Self {
            traceparent,
            tracestate: (!state.is_empty())
                .then(|| HeaderValue::from_str(&state).ok())
                .flatten(),
        })
    }

    fn of(sc: &SpanContext) -> Option<Self> {
        Self::new(
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags(),
            sc.trace_state(),
        )
    }

    pub fn apply(self, headers: &mut HeaderMap) {
        const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
        const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
        headers.insert(TRACEPARENT, self.traceparent);
        match self.tracestate {
            Some(s) => headers.insert(TRACESTATE, s),
            None => headers.remove(TRACESTATE),
        };
    }
}

/// A request's span, held by its Meter.
pub struct RequestSpan(Inner);

enum Inner {
    /// Sampled: the SDK's span, exported when it ends.
    Recorded(Box<Recorded>),
    /// Sampled out: no span, only what the upstream's `traceparent` needs.
    Unsampled {
        trace_id: TraceId,
        trace_state: TraceState,
    },
    /// Tracing is shutting down: no span and no context.
    Off,
}

struct Recorded {
    span: Span,
    tracer: SdkTracer,
    capture_content: bool,
    /// The provider of the backend tried last.
    provider: Option<&'static str>,
}

/// What the Meter knows when the request ends.
pub struct Finished<'a> {
    pub request_id: &'a str,
    pub endpoint: &'a str,
    pub model: Option<&'a str>,
    pub route: &'a str,
    pub backend: Option<&'a Backend>,
    pub key: &'a str,
    /// 499: the client left first.
    pub status: u16,
    pub outcome: &'a str,
    pub error: Option<&'a str>,
    pub usage: Option<Usage>,
    pub finish_reason: Option<&'a str>,
    pub stream: bool,
    pub attempts: u32,
    pub cost_usd: f64,
}

impl RequestSpan {
    /// The trace's id (32 hex digits) when this span is recorded, for the access log.
    pub fn trace_id(&self) -> Option<String> {
        let Inner::Recorded(r) = &self.0 else {
            return None;
        };
        let sc = r.span.span_context();
        sc.is_sampled().then(|| sc.trace_id().to_string())
    }

    /// Whether prompts and answers go on spans.
    pub fn captures_content(&self) -> bool {
        matches!(&self.0, Inner::Recorded(r) if r.capture_content && r.span.is_recording())
    }

    /// The recorded span, when content is captured.
    fn capturing(&mut self) -> Option<&mut Span> {
        match &mut self.0 {
            Inner::Recorded(r) if r.capture_content && r.span.is_recording() => Some(&mut r.span),
            _ => None,
        }
    }

    /// `gen_ai.input.messages`: the conversation of the client's request as it sent it
    /// (its `messages`, `system`, `input` or `prompt` fields), cut at 64 KiB.
    pub fn input(&mut self, body: &[u8]) {
        let Some(span) = self.capturing() else {
            return;
        };
        if let Some(v) = content_of(body, &["system", "messages", "input", "prompt"]) {
            span.set_attribute(KeyValue::new("gen_ai.input.messages", v));
        }
    }

    /// `gen_ai.output.messages`: the answer's `choices`, `content` or `output`, as the client
    /// got it (whole answers; streamed ones are not gathered).
    pub fn output(&mut self, body: &[u8]) {
        let Some(span) = self.capturing() else {
            return;
        };
        if let Some(v) = content_of(body, &["choices", "content", "output"]) {
            span.set_attribute(KeyValue::new("gen_ai.output.messages", v));
        }
    }

    /// A child span for one try of `backend`; its context goes upstream as `traceparent`.
    /// Sampled out: no span, and the upstream gets the trace with a new span id, not sampled.
    pub fn attempt(&mut self, backend: &Backend, endpoint: &str, model: &str) -> AttemptSpan {
        match &mut self.0 {
            Inner::Recorded(r) => r.attempt(backend, endpoint, model),
            Inner::Unsampled {
                trace_id,
                trace_state,
            } => AttemptSpan {
                span: None,
                headers: TraceHeaders::new(
                    *trace_id,
                    RandomIdGenerator::default().new_span_id(),
                    TraceFlags::NOT_SAMPLED,
                    trace_state,
                ),
            },
            Inner::Off => AttemptSpan {
                span: None,
                headers: None,
            },
        }
    }

    /// End the span with what the request came to.
    pub fn finish(self, f: &Finished<'_>) {
        if let Inner::Recorded(r) = self.0 {
            r.finish(f);
        }
    }
}

impl Recorded {
    fn attempt(&mut self, backend: &Backend, endpoint: &str, model: &str) -> AttemptSpan {
        let provider = provider_name(&backend.provider);
        self.provider = Some(provider);
        let operation = operation_name(endpoint);
        let model = backend.upstream_model.as_deref().unwrap_or(model);
        let parent = Context::new().with_remote_span_context(self.span.span_context().clone());
        let attributes = vec![
            KeyValue::new("gen_ai.operation.name", operation),
            KeyValue::new("gen_ai.provider.name", provider),
            KeyValue::new("gen_ai.request.model", model.to_owned()),
            KeyValue::new("modelgate.backend", backend.name.clone()),
        ];
        let span = self
            .tracer
            .span_builder(format!("{operation} {model}"))
            .with_kind(SpanKind::Client)
            .with_attributes(attributes)
            .start_with_context(&self.tracer, &parent);
        AttemptSpan {
            headers: TraceHeaders::of(span.span_context()),
            span: Some(span),
        }
    }

    fn finish(mut self, f: &Finished<'_>) {
        let s = &mut self.span;
        if !s.is_recording() {
            return;
        }
        let operation = operation_name(f.endpoint);
        let model = f.model.unwrap_or("");
        s.update_name(if model.is_empty() {
            operation.to_owned()
        } else {
            format!("{operation} {model}")
        });
        let mut a = Vec::with_capacity(20);
        a.push(KeyValue::new("gen_ai.operation.name", operation));
        if let Some(p) = f
            .backend
            .map(|b| provider_name(&b.provider))
            .or(self.provider)
        {
            a.push(KeyValue::new("gen_ai.provider.name", p));
        }
        if !model.is_empty() {
            a.push(KeyValue::new("gen_ai.request.model", model.to_owned()));
        }
        if let Some(b) = f.backend {
            let answered = b.upstream_model.as_deref().unwrap_or(model);
            if !answered.is_empty() {
                a.push(KeyValue::new("gen_ai.response.model", answered.to_owned()));
            }
            a.push(KeyValue::new("modelgate.backend", b.name.clone()));
        }
        if let Some(u) = f.usage {
            if u.input.is_some() || u.cache_read.is_some() || u.cache_write.is_some() {
                a.push(KeyValue::new(
                    "gen_ai.usage.input_tokens",
                    i64::try_from(u.prompt()).unwrap_or(i64::MAX),
                ));
            }
            for (name, v) in [
                ("gen_ai.usage.output_tokens", u.output),
                ("gen_ai.usage.cache_read.input_tokens", u.cache_read),
                ("gen_ai.usage.cache_creation.input_tokens", u.cache_write),
                ("gen_ai.usage.reasoning.output_tokens", u.reasoning),
            ] {
                if let Some(v) = v {
                    a.push(KeyValue::new(name, i64::try_from(v).unwrap_or(i64::MAX)));
                }
            }
        }
        if let Some(r) = f.finish_reason {
            a.push(KeyValue::new(
                "gen_ai.response.finish_reasons",
                Value::Array(Array::String(vec![StringValue::from(r.to_owned())])),
            ));
        }
        a.push(KeyValue::new(
            "http.response.status_code",
            i64::from(f.status),
        ));
        if !f.route.is_empty() {
            a.push(KeyValue::new("modelgate.route", f.route.to_owned()));
        }
        if !f.key.is_empty() {
            a.push(KeyValue::new("modelgate.key", f.key.to_owned()));
        }
        a.push(KeyValue::new(
            "modelgate.request_id",
            f.request_id.to_owned(),
        ));
        a.push(KeyValue::new("modelgate.outcome", f.outcome.to_owned()));
        a.push(KeyValue::new("modelgate.stream", f.stream));
        a.push(KeyValue::new("modelgate.attempts", i64::from(f.attempts)));
        if f.cost_usd > 0.0 && f.cost_usd.is_finite() {
            a.push(KeyValue::new("modelgate.cost_usd", f.cost_usd));
        }
        // The gateway's own error code (`upstream_timeout`, `rate_limited`, ...), or the
        // status for an error passed on from the upstream.
        let error = f.error.map(str::to_owned).or_else(|| {
            (f.status >= 500 || f.status == 499).then(|| {
                if f.status == 499 {
                    "client_closed".to_owned()
                } else {
                    f.status.to_string()
                }
            })
        });
        if let Some(e) = error {
            a.push(KeyValue::new("error.type", e.clone()));
            s.set_status(Status::error(e));
        }
        s.set_attributes(a);
        s.end_with_timestamp(SystemTime::now());
    }
}

/// One upstream try's span (none when the request is sampled out).
pub struct AttemptSpan {
    span: Option<Span>,
    headers: Option<TraceHeaders>,
}

impl AttemptSpan {
    /// The context for the upstream request (taken: one request carries it).
    pub fn take_headers(&mut self) -> Option<TraceHeaders> {
        self.headers.take()
    }

    /// The try ended: the upstream's status, or why it failed (`UpstreamErrorKind` words).
    pub fn end(self, status: Option<u16>, error: Option<&'static str>) {
        let Some(mut span) = self.span.filter(|s| s.is_recording()) else {
            return;
        };
        if let Some(st) = status {
            span.set_attribute(KeyValue::new("http.response.status_code", i64::from(st)));
        }
        let error = match (error, status) {
            (Some(e), _) => Some(e.to_owned()),
            (None, Some(st)) if st >= 400 => Some(st.to_string()),
            _ => None,
        };
        if let Some(e) = error {
            span.set_attribute(KeyValue::new("error.type", e.clone()));
            span.set_status(Status::error(e));
        }
        span.end();
    }
}

/// The named fields of a JSON body, as one JSON object, cut at [`MAX_CONTENT_BYTES`].
fn content_of(body: &[u8], fields: &[&str]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let obj = v.as_object()?;
    let picked: serde_json::Map<String, serde_json::Value> = fields
        .iter()
        .filter_map(|f| obj.get(*f).map(|v| ((*f).to_owned(), v.clone())))
        .collect();
    if picked.is_empty() {
        return None;
    }
    let mut s = serde_json::Value::Object(picked).to_string();
    if s.len() > MAX_CONTENT_BYTES {
        let mut cut = MAX_CONTENT_BYTES;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    Some(s)
}

/// Counts what the OTLP exporter delivered (`modelgate_trace_spans_exported`) and what it
/// could not (`modelgate_trace_spans_export_failed`).
#[derive(Debug)]
struct CountingExporter<E> {
    inner: E,
    metrics: Arc<Metrics>,
    /// Unix second of the last warning.
    warned_at: AtomicU64,
}

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len() as u64;
        let result = self.inner.export(batch).await;
        match &result {
            Ok(()) => self.metrics.trace_spans_exported.inc_by(n),
            Err(e) => {
                self.metrics.trace_spans_failed.inc_by(n);
                // A collector that is down is said so once a minute at most (and counted).
                let now = crate::admission::unix_now();
                let last = self.warned_at.load(Ordering::Relaxed);
                if now >= last.saturating_add(60) {
                    self.warned_at.store(now, Ordering::Relaxed);
                    tracing::warn!(error = %e, spans = n, "trace export failed; spans dropped");
                }
                0
            }
        };
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

/// The exporter's HTTP client: the proxy's hyper + rustls client, driven on the proxy's runtime
/// (the batch processor's thread has none), each export bounded by [`EXPORT_TIMEOUT`].
struct ExportClient {
    client: crate::providers::HttpClient,
    runtime: tokio::runtime::Handle,
}

impl fmt::Debug for ExportClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ExportClient")
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for ExportClient {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, HttpError> {
        let (parts, body) = request.into_parts();
        let sent = self
            .client
            .request(http::Request::from_parts(parts, Full::new(body)));
        let task = self.runtime.spawn(async move {
            let exchange = async {
                let resp = sent.await?;
                let (parts, body) = resp.into_parts();
                let body = Limited::new(body, 1024 * 1024).collect().await?.to_bytes();
                Ok::<_, HttpError>(http::Response::from_parts(parts, body))
            };
            match tokio::time::timeout(EXPORT_TIMEOUT, exchange).await {
                Ok(r) => r,
                Err(_) => Err("the OTLP endpoint did not answer in time".into()),
            }
        });
        task.await?
    }
}

/// What the tests and the timing loop start tracing with.
#[cfg(test)]
mod fixtures {
    use super::*;

    /// Tracing on, exporting to a port nothing answers on, recording `ratio` of new traces.
    pub fn tracing_at(ratio: f64) -> Tracing {
        let spec = TracingSpec {
            otlp_endpoint: Some("http://127.0.0.1:9".into()),
            sampling_ratio: ratio,
            ..TracingSpec::default()
        };
        Tracing::start(&spec, Arc::new(Metrics::new()))
            .unwrap()
            .unwrap()
    }

    /// A backend of the built-in mock provider.
    pub fn mock_backend(route: &str, name: &str) -> Backend {
        Backend::new(
            route,
            name,
            Provider::Mock(Default::default()),
            None,
            1,
            None,
            Default::default(),
            Arc::default(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{mock_backend, tracing_at};
    use super::*;

    #[test]
    fn endpoint_gets_the_traces_path_once() {
        assert_eq!(
            traces_url("http://c:4318").unwrap().to_string(),
            "http://c:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://c:4318/").unwrap().to_string(),
            "http://c:4318/v1/traces"
        );
        assert_eq!(
            traces_url("https://c/otlp/v1/traces").unwrap().to_string(),
            "https://c/otlp/v1/traces"
        );
        assert!(traces_url("c:4318").is_err());
        assert!(traces_url("grpc://c:4317").is_err());
    }

    #[test]
    fn operation_and_provider_names_follow_the_conventions() {
        assert_eq!(operation_name("chat"), "chat");
        assert_eq!(operation_name("messages"), "chat");
        assert_eq!(operation_name("completions"), "text_completion");
        assert_eq!(operation_name("embeddings"), "embeddings");
    }

    #[test]
    fn content_is_the_named_fields_cut_at_the_limit() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":1}"#;
        let picked: serde_json::Value =
            serde_json::from_str(&content_of(body, &["system", "messages"]).unwrap()).unwrap();
        assert_eq!(
            picked,
            serde_json::json!({"messages": [{"role": "user", "content": "hi"}]})
        );
        assert_eq!(content_of(b"not json", &["messages"]), None);
        let long = format!(r#"{{"messages":"{}"}}"#, "é".repeat(MAX_CONTENT_BYTES));
        let cut = content_of(long.as_bytes(), &["messages"]).unwrap();
        assert!(cut.len() <= MAX_CONTENT_BYTES);
    }

    #[tokio::test]
    async fn off_without_an_endpoint_and_refuses_bad_settings() {
        let m = Arc::new(Metrics::new());
        assert!(
            Tracing::start(&TracingSpec::default(), m.clone())
                .unwrap()
                .is_none()
        );
        let bad = TracingSpec {
            otlp_endpoint: Some("http://127.0.0.1:4318".into()),
            sampling_ratio: 1.5,
            ..TracingSpec::default()
        };
        assert!(
            Tracing::start(&bad, m)
                .unwrap_err()
                .contains("samplingRatio")
        );
    }

    /// A client's sampled traceparent: the request span joins its trace, the attempt span is
    /// its child, and the upstream gets the attempt's context with the client's tracestate.
    #[tokio::test]
    async fn client_context_is_continued_and_propagated() {
        let t = tracing_at(0.0);
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        );
        h.insert("tracestate", HeaderValue::from_static("vendor=x"));
        let mut span = t.request_span(&h);
        assert_eq!(
            span.trace_id().as_deref(),
            Some("0af7651916cd43dd8448eb211c80319c"),
            "a sampled parent wins over a ratio of 0"
        );
        let backend = mock_backend("default/r", "b");
        let mut attempt = span.attempt(&backend, "chat", "m");
        let up = attempt.take_headers().unwrap();
        let tp = up.traceparent.to_str().unwrap();
        assert!(
            tp.starts_with("00-0af7651916cd43dd8448eb211c80319c-"),
            "{tp}"
        );
        assert!(tp.ends_with("-01"), "{tp}");
        assert!(
            !tp.contains("b7ad6b7169203331"),
            "the attempt's own span id: {tp}"
        );
        assert_eq!(up.tracestate.unwrap(), "vendor=x");
        attempt.end(Some(200), None);

        // Not sampled by the client: nothing recorded, the flag passed on.
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"),
        );
        let mut span = t.request_span(&h);
        assert_eq!(span.trace_id(), None);
        let up = span.attempt(&backend, "chat", "m").take_headers().unwrap();
        assert!(up.traceparent.to_str().unwrap().ends_with("-00"));
        // No parent and a ratio of 0: not recorded.
        assert_eq!(t.request_span(&HeaderMap::new()).trace_id(), None);
    }

    /// Sampled out, the upstream still gets the trace: the client's trace id and
    /// `tracestate` with a new span id for each try, or a trace id of its own when the client
    /// sent none; never sampled, never the same span id twice.
    #[tokio::test]
    async fn a_sampled_out_request_still_propagates_its_trace() {
        let t = tracing_at(0.0);
        let backend = mock_backend("default/r", "b");
        let parts = |h: &TraceHeaders| {
            let tp = h.traceparent.to_str().unwrap().to_owned();
            let p: Vec<String> = tp.split('-').map(str::to_owned).collect();
            assert_eq!(p.len(), 4, "{tp}");
            assert_eq!((p[0].as_str(), p[3].as_str()), ("00", "00"), "{tp}");
            (p[1].clone(), p[2].clone())
        };
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"),
        );
        h.insert("tracestate", HeaderValue::from_static("vendor=x,other=y"));
        let mut span = t.request_span(&h);
        assert!(!span.captures_content());
        let mut seen = Vec::new();
        for _ in 0..3 {
            let mut a = span.attempt(&backend, "chat", "m");
            let up = a.take_headers().unwrap();
            let (trace, id) = parts(&up);
            assert_eq!(trace, "0af7651916cd43dd8448eb211c80319c");
            assert!(id != "b7ad6b7169203331" && id != "0000000000000000" && !seen.contains(&id));
            seen.push(id);
            assert_eq!(up.tracestate.unwrap(), "vendor=x,other=y");
            a.end(Some(200), None);
        }
        assert_eq!(span.trace_id(), None);

        // No client context: a trace of its own, the same for each try, no tracestate.
        let mut span = t.request_span(&HeaderMap::new());
        let first = span.attempt(&backend, "chat", "m").take_headers().unwrap();
        let second = span.attempt(&backend, "chat", "m").take_headers().unwrap();
        let ((t1, s1), (t2, s2)) = (parts(&first), parts(&second));
        assert_eq!(t1, t2);
        assert_ne!(s1, s2);
        assert_ne!(t1, "00000000000000000000000000000000");
        assert!(first.tracestate.is_none());
        let (other, _) = parts(
            &t.request_span(&HeaderMap::new())
                .attempt(&backend, "chat", "m")
                .take_headers()
                .unwrap(),
        );
        assert_ne!(t1, other, "each request its own trace");

        // A broken traceparent is no context (and its tracestate is not passed on).
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-xyz-b7ad6b7169203331-01"),
        );
        let up = t
            .request_span(&h)
            .attempt(&backend, "chat", "m")
            .take_headers()
            .unwrap();
        assert_ne!(parts(&up).0, "0af7651916cd43dd8448eb211c80319c");
        assert!(up.tracestate.is_none());
    }

    /// With a ratio between 0 and 1 the decision is the SDK's ratio rule on the trace id, and
    /// a recorded trace carries the very id that was decided on: recorded ids fall under the
    /// ratio's bound, sampled-out ones (seen upstream) above it.
    #[tokio::test]
    async fn the_ratio_decides_on_the_trace_id_that_is_recorded() {
        let ratio = 0.5;
        let t = tracing_at(ratio);
        let backend = mock_backend("default/r", "b");
        let bound = (ratio * (1u64 << 63) as f64) as u64;
        let under = |trace: &str| {
            let low = u64::from_str_radix(&trace[16..], 16).unwrap();
            (low >> 1) < bound
        };
        let (mut recorded, mut dropped) = (0, 0);
        for _ in 0..400 {
            let mut span = t.request_span(&HeaderMap::new());
            let up = span.attempt(&backend, "chat", "m").take_headers().unwrap();
            let tp = up.traceparent.to_str().unwrap().to_owned();
            let trace = &tp[3..35];
            match span.trace_id() {
                Some(id) => {
                    recorded += 1;
                    assert_eq!(id, trace);
                    assert!(under(trace) && tp.ends_with("-01"), "{tp}");
                }
                None => {
                    dropped += 1;
                    assert!(!under(trace) && tp.ends_with("-00"), "{tp}");
                }
            }
        }
        assert!(recorded > 100 && dropped > 100, "{recorded} / {dropped}");
    }

    /// The propagator's extraction of the client's context, held up against the fast reader.
    fn propagator_parent(h: &HeaderMap) -> Option<SpanContext> {
        let cx = TraceContextPropagator::new()
            .extract_with_context(&Context::new(), &HeaderExtractor(h));
        let sc = cx.span().span_context().clone();
        sc.is_valid().then_some(sc)
    }

    /// The propagator's injection for a context, held up against [`TraceHeaders::of`].
    fn propagator_headers(sc: &SpanContext) -> Option<TraceHeaders> {
        let mut h = HeaderMap::new();
        let cx = Context::new().with_remote_span_context(sc.clone());
        TraceContextPropagator::new()
            .inject_context(&cx, &mut opentelemetry_http::HeaderInjector(&mut h));
        Some(TraceHeaders {
            traceparent: h.remove("traceparent")?,
            tracestate: h.remove("tracestate").filter(|v| !v.is_empty()),
        })
    }

    fn traceparent() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            // The usual form, zero ids now and then.
            ("[0-9a-f]{32}|0{32}", "[0-9a-f]{16}|0{16}", "[0-9a-f]{2}")
                .prop_map(|(t, s, f)| format!("00-{t}-{s}-{f}")),
            // Other versions, case, lengths, separators, space around, extra fields.
            (
                "00|01|fe|ff|0A|0|000|\\+0",
                "[0-9a-fA-F]{30,34}",
                "[0-9a-fA-F]{15,17}",
                "[0-9a-fA-F]{1,3}",
                "|-|-[a-z0-9]{1,4}",
                "[ \t]{0,2}",
            )
                .prop_map(|(v, t, s, f, x, w)| format!("{w}{v}-{t}-{s}-{f}{x}{w}")),
            "[ -~]{0,60}",
        ]
    }

    proptest::proptest! {
        #[test]
        fn the_client_context_is_read_as_the_propagator_reads_it(
            tp in traceparent(),
            state in proptest::option::of("vendor=x|a=1,b=2|=bad|k=v,k=w| |[ -~]{0,20}"),
        ) {
            let mut h = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_str(&tp) {
                h.insert("traceparent", v);
            }
            if let Some(s) = state.and_then(|s| HeaderValue::from_str(&s).ok()) {
                h.insert("tracestate", s);
            }
            let ours = remote_parent(&h);
            proptest::prop_assert_eq!(&ours, &propagator_parent(&h));
            // And what goes upstream for it, as the propagator would write it.
            if let Some(sc) = ours {
                let (a, b) = (TraceHeaders::of(&sc), propagator_headers(&sc));
                proptest::prop_assert_eq!(
                    a.as_ref().map(|a| (&a.traceparent, &a.tracestate)),
                    b.as_ref().map(|b| (&b.traceparent, &b.tracestate))
                );
            }
        }
    }
}

#[cfg(test)]
mod bench {
    //! Timing loop, run by hand in release:
    //! `cargo test -p modelgate-dataplane --release --lib traces::bench -- --ignored --nocapture`.
    //! A request's tracing calls as `proxy::handle` and the Meter make them: the request span
    //! from the client's headers, one attempt span, its headers put on the upstream request,
    //! the attempt ended, the trace id read for the access log, the request span finished.
    //! Tracing off, on with `samplingRatio: 0` (no `traceparent`, and a client's unsampled
    //! one with a `tracestate`) and on with every request traced. The exporter's runtime is
    //! not driven, so with every request traced the batch queue fills and further spans are
    //! dropped at `on_end`, as a collector that cannot keep up would make it.
    //! `MODELGATE_ROUNDS` sets the rounds (default 100,000); best of five.

    use std::hint::black_box;

    use super::fixtures::{mock_backend, tracing_at};
    use super::*;

    fn one_request(tracing: Option<&Tracing>, client: &HeaderMap, backend: &Backend) {
        let mut span = tracing.map(|t| t.request_span(black_box(client)));
        let mut attempt = span.as_mut().map(|s| s.attempt(backend, "chat", "gpt-4o"));
        let trace = attempt.as_mut().and_then(AttemptSpan::take_headers);
        let mut upstream = HeaderMap::new();
        if let Some(t) = trace {
            t.apply(&mut upstream);
        }
        black_box(&upstream);
        if let Some(a) = attempt {
            a.end(Some(200), None);
        }
        let trace_id = span.as_ref().and_then(|s| s.trace_id());
        if let Some(s) = span.take() {
            s.finish(&Finished {
                request_id: "req-1",
                endpoint: "chat",
                model: Some("gpt-4o"),
                route: "default/gpt-4o",
                backend: Some(backend),
                key: "team-a",
                status: 200,
                outcome: "ok",
                error: None,
                usage: Some(Usage {
                    input: Some(27),
                    output: Some(16),
                    ..Usage::default()
                }),
                finish_reason: Some("stop"),
                stream: false,
                attempts: 1,
                cost_usd: 0.0001,
            });
        }
        black_box(trace_id);
    }

    #[test]
    #[ignore = "a timing loop"]
    fn tracing_calls_of_one_request() {
        let rounds = crate::timing::rounds();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _in_runtime = rt.enter();
        let (zero, one) = (tracing_at(0.0), tracing_at(1.0));
        let backend = mock_backend("default/gpt-4o", "openai");
        let plain = HeaderMap::new();
        let mut unsampled = HeaderMap::new();
        unsampled.insert(
            "traceparent",
            HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"),
        );
        unsampled.insert("tracestate", HeaderValue::from_static("vendor=x"));
        for (what, tracing, client) in [
            ("off", None, &plain),
            ("ratio 0", Some(&zero), &plain),
            (
                "ratio 0, client's unsampled traceparent",
                Some(&zero),
                &unsampled,
            ),
            ("ratio 1", Some(&one), &plain),
        ] {
            for _ in 0..rounds / 10 {
                one_request(tracing, client, &backend);
            }
            let ns = crate::timing::best_of_five(rounds, &|| {
                one_request(tracing, client, &backend);
            });
            println!(
                "tracing calls of one request, {what}: {:.3} µs per request",
                ns / 1e3
            );
        }
    }
}
