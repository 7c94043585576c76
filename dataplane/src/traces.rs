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
//! trace, `samplingRatio` for traces that start here. Attributes are the conventions' `gen_ai.*`
//! ones plus a few `modelgate.*` (route, backend, key name, request id); credentials and API keys
//! never are, prompts and answers only with `captureContent`.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use http_body_util::{BodyExt, Full, Limited};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Span as _, SpanContext, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Array, Context, KeyValue, StringValue, Value};
use opentelemetry_http::{HeaderExtractor, HeaderInjector, HttpError};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider, Span, SpanData,
    SpanExporter,
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
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("modelgate");
        Ok(Some(Self {
            provider,
            tracer,
            capture_content: spec.capture_content,
        }))
    }

    /// The span of a request that just arrived, child of the client's `traceparent` if any.
    pub fn request_span(&self, headers: &HeaderMap) -> RequestSpan {
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
        let span = self
            .tracer
            .span_builder("gen_ai")
            .with_kind(SpanKind::Server)
            .start_with_context(&self.tracer, &parent);
        RequestSpan {
            span,
            tracer: self.tracer.clone(),
            capture_content: self.capture_content,
            provider: None,
        }
    }

    /// Export what is queued, within `within` (the drain deadline's rest); blocking, so on a
    /// thread of its own.
    pub async fn shutdown(self: Arc<Self>, within: Duration) {
        let provider = self.provider.clone();
        let done = tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(within));
        match tokio::time::timeout(within + Duration::from_millis(200), done).await {
            Ok(Ok(Ok(()))) => tracing::info!("traces flushed"),
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "traces not all flushed at shutdown"),
            _ => tracing::warn!("traces not flushed within the drain deadline"),
        }
    }
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
    fn of(sc: &SpanContext) -> Option<Self> {
        let mut h = HeaderMap::new();
        let cx = Context::new().with_remote_span_context(sc.clone());
        TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(&mut h));
        Some(Self {
            traceparent: h.remove("traceparent")?,
            tracestate: h.remove("tracestate").filter(|v| !v.is_empty()),
        })
    }

    pub fn apply(&self, headers: &mut HeaderMap) {
        headers.insert("traceparent", self.traceparent.clone());
        match &self.tracestate {
            Some(s) => headers.insert("tracestate", s.clone()),
            None => headers.remove("tracestate"),
        };
    }
}

/// A request's span, held by its Meter.
pub struct RequestSpan {
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
        let sc = self.span.span_context();
        sc.is_sampled().then(|| sc.trace_id().to_string())
    }

    /// Whether prompts and answers go on spans.
    pub fn captures_content(&self) -> bool {
        self.capture_content && self.span.is_recording()
    }

    /// `gen_ai.input.messages`: the conversation of the client's request as it sent it
    /// (its `messages`, `system`, `input` or `prompt` fields), cut at 64 KiB.
    pub fn input(&mut self, body: &[u8]) {
        if !self.captures_content() {
            return;
        }
        if let Some(v) = content_of(body, &["system", "messages", "input", "prompt"]) {
            self.span
                .set_attribute(KeyValue::new("gen_ai.input.messages", v));
        }
    }

    /// `gen_ai.output.messages`: the answer's `choices`, `content` or `output`, as the client
    /// got it (whole answers; streamed ones are not gathered).
    pub fn output(&mut self, body: &[u8]) {
        if !self.captures_content() {
            return;
        }
        if let Some(v) = content_of(body, &["choices", "content", "output"]) {
            self.span
                .set_attribute(KeyValue::new("gen_ai.output.messages", v));
        }
    }

    /// A child span for one try of `backend`; its context goes upstream as `traceparent`.
    pub fn attempt(&mut self, backend: &Backend, endpoint: &str, model: &str) -> AttemptSpan {
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
            span,
        }
    }

    /// End the span with what the request came to.
    pub fn finish(mut self, f: &Finished<'_>) {
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

/// One upstream try's span.
pub struct AttemptSpan {
    span: Span,
    headers: Option<TraceHeaders>,
}

impl AttemptSpan {
    pub fn headers(&self) -> Option<TraceHeaders> {
        self.headers.clone()
    }

    /// The try ended: the upstream's status, or why it failed (`UpstreamErrorKind` words).
    pub fn end(mut self, status: Option<u16>, error: Option<&'static str>) {
        if !self.span.is_recording() {
            return;
        }
        if let Some(st) = status {
            self.span
                .set_attribute(KeyValue::new("http.response.status_code", i64::from(st)));
        }
        let error = match (error, status) {
            (Some(e), _) => Some(e.to_owned()),
            (None, Some(st)) if st >= 400 => Some(st.to_string()),
            _ => None,
        };
        if let Some(e) = error {
            self.span
                .set_attribute(KeyValue::new("error.type", e.clone()));
            self.span.set_status(Status::error(e));
        }
        self.span.end();
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

#[cfg(test)]
mod tests {
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
        let m = Arc::new(Metrics::new());
        let spec = TracingSpec {
            otlp_endpoint: Some("http://127.0.0.1:9".into()),
            sampling_ratio: 0.0,
            ..TracingSpec::default()
        };
        let t = Tracing::start(&spec, m).unwrap().unwrap();
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
        let backend = Backend::new(
            "default/r",
            "b",
            Provider::Mock(Default::default()),
            None,
            1,
            None,
            Default::default(),
            Arc::default(),
        );
        let attempt = span.attempt(&backend, "chat", "m");
        let up = attempt.headers().unwrap();
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
        let up = span.attempt(&backend, "chat", "m").headers().unwrap();
        assert!(up.traceparent.to_str().unwrap().ends_with("-00"));
        // No parent and a ratio of 0: not recorded.
        assert_eq!(t.request_span(&HeaderMap::new()).trace_id(), None);
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
    use std::time::Instant;

    use super::*;

    fn one_request(tracing: Option<&Tracing>, client: &HeaderMap, backend: &Backend) {
        let mut span = tracing.map(|t| Box::new(t.request_span(black_box(client))));
        let attempt = span
            .as_deref_mut()
            .map(|s| s.attempt(backend, "chat", "gpt-4o"));
        let trace = attempt.as_ref().and_then(AttemptSpan::headers);
        let mut upstream = HeaderMap::new();
        if let Some(t) = &trace {
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
        let rounds = std::env::var("MODELGATE_ROUNDS")
            .ok()
            .and_then(|r| r.parse().ok())
            .unwrap_or(100_000);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _in_runtime = rt.enter();
        let on = |ratio: f64| {
            let spec = TracingSpec {
                otlp_endpoint: Some("http://127.0.0.1:9".into()),
                sampling_ratio: ratio,
                ..TracingSpec::default()
            };
            Tracing::start(&spec, Arc::new(Metrics::new()))
                .unwrap()
                .unwrap()
        };
        let (zero, one) = (on(0.0), on(1.0));
        let backend = Backend::new(
            "default/gpt-4o",
            "openai",
            Provider::Mock(Default::default()),
            None,
            1,
            None,
            Default::default(),
            Arc::default(),
        );
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
            let ns = (0..5)
                .map(|_| {
                    let start = Instant::now();
                    for _ in 0..rounds {
                        one_request(tracing, client, &backend);
                    }
                    start.elapsed().as_nanos() as f64 / rounds as f64
                })
                .fold(f64::MAX, f64::min);
            println!(
                "tracing calls of one request, {what}: {:.3} µs per request",
                ns / 1e3
            );
        }
    }
}
