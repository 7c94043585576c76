//! The request path: named phases over one request's [`Meter`].
//!
//! ```text
//!  parse path ─► authenticate ─► read body ─► resolve route ─► authorize
//!      ─► response cache (a hit is answered here: no limits, no upstream; `cache.rs`)
//!      ─► spend guards ─► admit ─► mirror to the shadow (detached, sampled)
//!      ─► forward (pick backend, send, receive; retry, fall back) ─► respond
//!  receive: an event stream's first bytes, or a whole answer, before anything is committed
//!  to the client, so an upstream that answers headers and then nothing is retried too
//!  respond: an event stream passes through (`stream`); a whole JSON answer to a stream
//!  request is written as one (`synth`); a 2xx that is not JSON is a 502
//!  meter: always, when the Meter drops (after errors, streams, disconnects too)
//! ```
//!
//! Errors from any phase are `ProxyError`s, turned into responses in `error.rs`.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use crate::admission::{self, Estimate, SpendGuard};
use crate::busy::BusyClock;
use crate::cache::{self, Outcome, Shape};
use crate::error::{ProxyError, json_response};
use crate::keys::Key;
use crate::meter::Meter;
use crate::metrics::{Metrics, UpstreamErrorKind};
use crate::providers::{self, Failure, HttpClient, Outbound};
use crate::request::{ApiRequest, Endpoint};
use crate::routes::{Backend, Demand, Route};
use crate::shadow::{self, Mirror};
use crate::snapshot::{Live, Snapshot};
use crate::stream::{self, MeteredStream, MockStream, ProxyBody, UpstreamBody, usage_of_body};
use crate::synth;
use crate::translate::{self, Dialect, StreamTranslator, StreamWatcher};

/// Per-attempt deadline (until the answer's first bytes, or all of a whole answer) when
/// neither the backend nor the route sets one.
const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(600);
/// Largest non-streamed upstream body the proxy reads.
const MAX_UPSTREAM_BODY: usize = 64 * 1024 * 1024;

/// Request-path settings fixed at start.
#[derive(Debug, Clone)]
pub struct Settings {
    pub max_body_bytes: u64,
    pub default_max_tokens: u64,
    /// Largest server-sent event of a streamed answer.
    pub max_stream_event_bytes: usize,
    /// Where upstream connections may go (operator mode); `None`: anywhere.
    pub egress: Option<Arc<crate::egress::UpstreamPolicy>>,
    /// How long `/metrics` keeps the series of a name the config no longer holds.
    pub series_grace: Duration,
}

/// Everything a request needs, shared by all connections.
pub struct Gateway {
    pub live: Live,
    pub metrics: Arc<Metrics>,
    pub client: HttpClient,
    pub settings: Settings,
    /// OpenTelemetry traces; `None` (the default): no span is made.
    pub tracing: Option<Arc<crate::traces::Tracing>>,
    /// The routes' response cache (memory, and Redis when configured).
    pub cache: Arc<cache::Store>,
}

impl Gateway {
    pub fn new(settings: Settings) -> Self {
        let metrics = Arc::new(Metrics::with_series_grace(settings.series_grace));
        Self {
            live: Live::metered(metrics.clone()),
            cache: Arc::new(cache::Store::new(
                cache::DEFAULT_MEMORY_BYTES,
                None,
                &metrics.cache,
            )),
            metrics,
            client: providers::http_client(settings.egress.clone()),
            settings,
            tracing: None,
        }
    }
}

enum Reply {
    Full(Response<ProxyBody>),
    /// An event stream to pass on, the upstream's or one written from a whole answer.
    Stream {
        resp: Response<UpstreamBody>,
        /// Bytes already read from the body, to send first.
        first: Option<Bytes>,
        /// When the stream's headers came: its `streamTimeout` counts from here.
        since: Instant,
        strip_usage: bool,
        /// What happens to the upstream's events besides metering.
        stage: Stage,
    },
}

/// How a stream's events reach the client.
enum Stage {
    /// As the upstream wrote them, metered by the OpenAI scanner.
    Pass,
    /// Translated: the upstream speaks another dialect than the client.
    Translate(Box<StreamTranslator>),
    /// As the upstream wrote them, read for metering in their own (non-OpenAI) dialect.
    Watch(Box<StreamWatcher>),
}

/// The dialect a client of `path` speaks, for errors written before the body is read: the
/// Anthropic endpoints, and `/v1/models` asked with an `anthropic-version` header.
fn client_dialect(path: &str, headers: &HeaderMap) -> Dialect {
    let p = path
        .strip_prefix("/v1")
        .unwrap_or(path)
        .trim_end_matches('/');
    if p.starts_with("/messages") || (p == "/models" && headers.contains_key("anthropic-version")) {
        Dialect::Anthropic
    } else if p == "/responses" {
        Dialect::OpenAiResponses
    } else {
        Dialect::OpenAiChat
    }
}

fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| format!("{:016x}", fastrand::u64(..)))
}

/// Serve one API request. Never fails: every error becomes an OpenAI-shaped response.
/// `connection`: the busy clock of the client's connection, charged to the request.
pub async fn handle(
    gw: Arc<Gateway>,
    req: Request<Incoming>,
    connection: Option<BusyClock>,
) -> Response<ProxyBody> {
    let mut meter = Meter::new(gw.metrics.clone(), request_id(req.headers()));
    if let Some(clock) = connection {
        meter.charge_connection(clock);
    }
    if let Some(t) = &gw.tracing {
        meter.span = Some(t.request_span(req.headers()));
    }
    let dialect = client_dialect(req.uri().path(), req.headers());
    let reply = serve(&gw, req, &mut meter).await;
    let (mut resp, meter) = match reply {
        Ok(Reply::Full(resp)) => {
            meter.response_ready(resp.status().as_u16());
            if let Some(fill) = &meter.cache_fill
                && resp.status() == StatusCode::OK
                && let ProxyBody::Full(Some(body)) = resp.body()
            {
                fill.head(resp.headers(), false);
                fill.record(body);
                fill.body_end(true);
            }
            if let Some(span) = meter.span.as_mut()
                && resp.status().is_success()
                && let ProxyBody::Full(Some(body)) = resp.body()
            {
                span.output(body);
            }
            (resp, Some(meter))
        }
        Ok(Reply::Stream {
            resp: upstream,
            first,
            since,
            strip_usage,
            stage,
        }) => {
            meter.response_ready(upstream.status().as_u16());
            let mut resp = Response::new(ProxyBody::Full(None));
            *resp.status_mut() = upstream.status();
            if matches!(stage, Stage::Translate(_)) {
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/event-stream"),
                );
            } else {
                copy_content_type(upstream.headers(), resp.headers_mut());
            }
            resp.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            add_gateway_headers(&meter, resp.headers_mut());
            let (idle, total) = meter
                .route
                .as_ref()
                .map_or((None, None), |r| (r.stream_idle_timeout, r.stream_timeout));
            let masking = meter
                .route
                .as_ref()
                .and_then(|r| Some((r.masking.clone().filter(|m| m.answers)?, r.id.clone())));
            let azure = meter
                .backend
                .as_ref()
                .is_some_and(|b| matches!(b.provider, crate::routes::Provider::Azure(_)));
            let fill = meter.cache_fill.clone();
            let body = MeteredStream::with_limits(
                upstream.into_body(),
                meter,
                strip_usage,
                gw.settings.max_stream_event_bytes,
                idle,
                total,
            )
            .starting_with(first, since);
            let body = match stage {
                Stage::Pass if azure => body.azure_filtered(),
                Stage::Pass => body,
                Stage::Translate(t) => body.translating(t),
                Stage::Watch(w) => body.watching(w),
            };
            // The cache keeps what the client gets: the masked text.
            let fill = fill.filter(|_| resp.status() == StatusCode::OK);
            if let Some(fill) = &fill {
                fill.head(resp.headers(), true);
            }
            *resp.body_mut() = match (masking, fill) {
                (Some((masker, route)), fill) => {
                    let masked = crate::mask::MaskedStream::new(
                        Box::new(body),
                        masker,
                        dialect,
                        gw.metrics.clone(),
                        route,
                    );
                    match fill {
                        Some(fill) => ProxyBody::MaskedRecorded(Box::new(cache::Recording::new(
                            Box::new(masked),
                            fill,
                        ))),
                        None => ProxyBody::Masked(Box::new(masked)),
                    }
                }
                (None, Some(fill)) => {
                    ProxyBody::Recorded(Box::new(cache::Recording::new(Box::new(body), fill)))
                }
                (None, None) => ProxyBody::Stream(Box::new(body)),
            };
            return resp;
        }
        Err(e) => {
            meter.error = Some(e.code());
            let resp = e.into_response_for(dialect, &meter.request_id);
            meter.response_ready(resp.status().as_u16());
            (resp, Some(meter))
        }
    };
    if let Some(meter) = &meter {
        add_gateway_headers(meter, resp.headers_mut());
    }
    resp
}

fn add_gateway_headers(meter: &Meter, h: &mut HeaderMap) {
    if let Ok(v) = HeaderValue::from_str(&meter.request_id) {
        h.insert("x-request-id", v);
    }
    let overhead = meter.overhead().unwrap_or_default().as_micros() as u64;
    h.insert("x-modelgate-overhead-us", HeaderValue::from(overhead));
    if let Some(b) = &meter.backend
        && let Ok(v) = HeaderValue::from_str(&b.name)
    {
        h.insert("x-modelgate-backend", v);
    }
    if let Some(t) = &meter.ticket {
        for (name, v) in &t.headers {
            h.insert(*name, v.clone());
        }
    }
    if let Some(c) = meter.cache {
        h.insert("x-modelgate-cache", HeaderValue::from_static(c.as_str()));
    }
    if !meter.ignored_params.is_empty()
        && let Ok(v) = HeaderValue::from_str(&meter.ignored_params.join(","))
    {
        h.insert("x-modelgate-ignored-params", v);
    }
}

fn copy_content_type(from: &HeaderMap, to: &mut HeaderMap) {
    if let Some(ct) = from.get(header::CONTENT_TYPE) {
        to.insert(header::CONTENT_TYPE, ct.clone());
    }
}

enum Call {
    Models,
    Api(Endpoint),
}

fn parse_path(method: &Method, path: &str) -> Result<Call, ProxyError> {
    let p = path.strip_prefix("/v1").unwrap_or(path);
    let (call, allowed) = match p.trim_end_matches('/') {
        "/chat/completions" => (Call::Api(Endpoint::Chat), Method::POST),
        "/completions" => (Call::Api(Endpoint::Completions), Method::POST),
        "/embeddings" => (Call::Api(Endpoint::Embeddings), Method::POST),
        "/messages" => (Call::Api(Endpoint::Messages), Method::POST),
        "/messages/count_tokens" => (Call::Api(Endpoint::CountTokens), Method::POST),
        "/responses" => (Call::Api(Endpoint::Responses), Method::POST),
        "/models" => (Call::Models, Method::GET),
        _ => return Err(ProxyError::UnknownPath(path.chars().take(200).collect())),
    };
    if *method != allowed {
        return Err(ProxyError::MethodNotAllowed(method.to_string()));
    }
    Ok(call)
}

/// The key a client sent: `Authorization: Bearer <key>` (the scheme in any case, as RFC 9110
/// says), else `x-api-key` (Anthropic-style clients) or `api-key` (Azure-style clients).
fn presented_key(headers: &HeaderMap) -> Option<&[u8]> {
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        let v = v.as_bytes().trim_ascii();
        let (scheme, rest) = v.split_at_checked(6)?;
        if !(scheme.eq_ignore_ascii_case(b"bearer") && rest.first() == Some(&b' ')) {
            return None;
        }
        let rest = rest.trim_ascii();
        return (!rest.is_empty()).then_some(rest);
    }
    ["x-api-key", "api-key"].into_iter().find_map(|name| {
        headers
            .get(name)
            .map(|v| v.as_bytes().trim_ascii())
            .filter(|v| !v.is_empty())
    })
}

fn authenticate(snapshot: &Snapshot, headers: &HeaderMap) -> Result<Arc<Key>, ProxyError> {
    let raw = presented_key(headers).ok_or(ProxyError::MissingKey)?;
    let key = snapshot
        .keys
        .authenticate(raw)
        .ok_or(ProxyError::InvalidKey)?;
    if key.disabled {
        return Err(ProxyError::KeyDisabled);
    }
    if key.expired(SystemTime::now()) {
        return Err(ProxyError::KeyExpired);
    }
    Ok(key.clone())
}

async fn read_body(body: Incoming, headers: &HeaderMap, limit: u64) -> Result<Bytes, ProxyError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ProxyError::PayloadTooLarge(limit));
    }
    match Limited::new(body, limit as usize).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ProxyError::PayloadTooLarge(limit))
        }
        Err(e) => Err(ProxyError::BadRequest(format!(
            "could not read the request body: {e}"
        ))),
    }
}

async fn serve(
    gw: &Gateway,
    req: Request<Incoming>,
    meter: &mut Meter,
) -> Result<Reply, ProxyError> {
    // parse (path), authenticate
    let call = parse_path(req.method(), req.uri().path())?;
    let snapshot = gw.live.load().ok_or(ProxyError::NotReady)?;
    let key = authenticate(&snapshot, req.headers())?;
    meter.key = Some(key.clone());
    let endpoint = match call {
        Call::Models => {
            meter.endpoint = "models";
            let dialect = client_dialect(req.uri().path(), req.headers());
            return Ok(Reply::Full(list_models(&snapshot, &key, dialect)));
        }
        Call::Api(e) => e,
    };
    meter.endpoint = endpoint.as_str();

    // parse (body)
    let (parts, body) = req.into_parts();
    let body = read_body(body, &parts.headers, gw.settings.max_body_bytes).await?;
    let api = ApiRequest::parse(endpoint, &body)?;
    meter.model = Some(api.model.chars().take(256).collect());
    meter.stream = api.stream;
    meter.prompt_estimate = api.prompt_tokens_estimate();

    // authorize and resolve the route
    let route = snapshot
        .routes
        .get(&key.namespace, &api.model)
        .ok_or_else(|| ProxyError::UnknownModel(api.model.to_string()))?
        .clone();
    if !key.allows(&route.model, &api.model) {
        return Err(ProxyError::ModelNotAllowed(api.model.to_string()));
    }
    meter.route = Some(route.clone());

    // mask the prompt: before anything is charged and before any upstream call
    let masked: Bytes;
    let (body, api) = match mask_prompt(gw, &route, endpoint, &body)? {
        Some(b) => {
            masked = b;
            (&masked, ApiRequest::parse(endpoint, &masked)?)
        }
        None => (&body, api),
    };
    if let Some(span) = meter.span.as_mut() {
        span.input(api.body());
    }

    // the response cache: after the key's namespace and route are known and the prompt is
    // masked (the key is the masked request's), before limits
    if let Some(policy) = route.cache.clone()
        && endpoint != Endpoint::CountTokens
    {
        let series = policy.series(&gw.metrics, &route.id);
        let outcome =
            match consult_cache(gw, &policy, &route, &key, &api, body, &parts.headers).await {
                Consulted::Hit(entry) => return cache_hit(gw, &policy, series, &key, entry, meter),
                Consulted::Miss(fill) => {
                    meter.cache_fill = fill;
                    Outcome::Miss
                }
                Consulted::Bypass(fill) => {
                    meter.cache_fill = fill;
                    Outcome::Bypass
                }
            };
        series.outcome(outcome).inc();
        meter.cache = Some(outcome);
    }

    // admit
    if key.exhausted {
        reject(&gw.metrics, &key, "budget");
        return Err(ProxyError::BudgetExhausted);
    }
    let output = api.output_reservation(gw.settings.default_max_tokens, route.max_output_tokens)?;
    // Counting tokens makes no model work: it counts as a request and charges nothing.
    let prompt = match endpoint {
        Endpoint::CountTokens => 0,
        _ => api.prompt_tokens_estimate(),
    };
    let demand = Demand { prompt, output };
    let (worst, dearest) = route.worst_case_cost(demand);
    spend_guards(&route, &key, demand, worst, dearest).inspect_err(|e| {
        if let ProxyError::AboveSpendGuard { guard, .. } = e {
            reject(&gw.metrics, &key, guard.as_str());
        }
    })?;
    let estimate = Estimate {
        tokens: prompt.saturating_add(output),
        usd: worst,
    };
    match admission::admit(&key, &gw.live.registry, estimate, admission::unix_now()) {
        Ok(ticket) => meter.ticket = Some(ticket),
        Err(rejection) => {
            reject(&gw.metrics, &key, rejection.kind.as_str());
            return Err(ProxyError::Limited(rejection));
        }
    }

    // pick, forward and receive
    let client = endpoint.dialect();
    let mut out = Outbound::new(&api, output / api.choices.max(1));
    if client == Dialect::Anthropic {
        out.anthropic_headers = providers::anthropic::ClientHeaders::of(&parts.headers);
    }
    if endpoint == Endpoint::CountTokens {
        return count_tokens(gw, &route, &mut out, meter).await;
    }
    if let Some(shadow) = &route.shadow {
        let gear = shadow::Context {
            client: &gw.client,
            metrics: &gw.metrics,
            max_event: gw.settings.max_stream_event_bytes,
        };
        shadow.mirror(gear, demand, route.max_cost_per_request, || Mirror {
            endpoint,
            body: body.clone(),
            output_reservation: out.output_reservation,
            anthropic_headers: out.anthropic_headers.clone(),
            request_id: meter.request_id.clone(),
        });
    }
    let answer = forward(gw, &route, &mut out, meter).await;
    meter.ignored_params = out.ignored().to_vec();
    let answer = answer?;
    // The dialect of the backend that answered.
    let backend = meter
        .backend
        .as_ref()
        .map_or(client, |b| b.provider.dialect(client));
    let (parts, bytes) = match answer {
        Answer::Stream { resp, first, since } => {
            let stage = if backend != client {
                Stage::Translate(Box::new(StreamTranslator::new(
                    backend,
                    client,
                    &api.model,
                    admission::unix_now(),
                    api.client_wants_usage,
                    &meter.request_id,
                )))
            } else if client != Dialect::OpenAiChat {
                Stage::Watch(Box::new(StreamWatcher::new(client)))
            } else {
                Stage::Pass
            };
            return Ok(Reply::Stream {
                resp,
                first,
                since,
                strip_usage: !api.client_wants_usage,
                stage,
            });
        }
        // A whole answer the client gets whole: its text masked here (one it gets as a
        // stream is masked on the way, in `handle`).
        Answer::Whole(parts, bytes) => match route.masking.as_ref().filter(|m| m.answers) {
            Some(m) if parts.status.is_success() && !api.stream => {
                let mut tally = crate::mask::Tally::default();
                let masked = m.mask_answer_body(&bytes, &mut tally);
                m.record(
                    &gw.metrics,
                    &route.id,
                    crate::mask::Direction::Answer,
                    &tally,
                );
                (parts, masked.unwrap_or(bytes))
            }
            _ => (parts, bytes),
        },
        Answer::Oversized(parts) => {
            return Err(ProxyError::UpstreamProtocol(format!(
                "the upstream's answer ({}) is larger than {MAX_UPSTREAM_BODY} bytes",
                media_type(&parts.headers)
            )));
        }
    };
    let status = parts.status;
    if backend != client || client != Dialect::OpenAiChat {
        return translate_whole(&api, backend, client, parts, bytes, meter);
    }
    if api.stream && status.is_success() {
        // A whole answer to a stream request: written as the stream the client asked for,
        // and metered by the same scanner as any stream.
        let answer = synth::stream_of_answer(
            api.endpoint,
            &bytes,
            api.client_wants_usage,
            &api.model,
            admission::unix_now(),
        )
        .map_err(|e| {
            ProxyError::UpstreamProtocol(format!(
                "a stream was asked for and the upstream answered {} instead: {e}",
                media_type(&parts.headers)
            ))
        })?;
        if let Some(u) = answer.usage {
            meter.set_usage(u);
        }
        let mut synthesized = Response::new(UpstreamBody::Mock(MockStream::new(
            answer.events,
            Duration::ZERO,
        )));
        synthesized.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        return Ok(Reply::Stream {
            resp: synthesized,
            first: None,
            since: Instant::now(),
            strip_usage: !api.client_wants_usage,
            stage: Stage::Pass,
        });
    }
    // A buffered answer (or an upstream client error passed on), read whole for usage.
    if status.is_success() {
        match usage_of_body(&bytes) {
            Some(u) => meter.set_usage(u),
            // No usage: the output is estimated from the answer's text, so limits still hold;
            // a body that is not JSON at all is no answer to pass on.
            None => match synth::output_chars(&bytes) {
                Ok(chars) => meter.output_text(chars),
                Err(e) => {
                    return Err(ProxyError::UpstreamProtocol(format!(
                        "the upstream answered {}: {e}",
                        media_type(&parts.headers)
                    )));
                }
            },
        }
    }
    let mut out = Response::new(ProxyBody::full(bytes));
    *out.status_mut() = status;
    copy_content_type(&parts.headers, out.headers_mut());
    Ok(Reply::Full(out))
}

/// A whole answer to a client of another dialect than OpenAI's, or from a backend of
/// another dialect than the client's: a 2xx answer (as a stream if the client asked for
/// one) or an error the client must fix, passed on with its status. Same dialect on both
/// sides: the bytes as they came, read for usage; otherwise rewritten.
fn translate_whole(
    api: &ApiRequest<'_>,
    from: Dialect,
    to: Dialect,
    parts: http::response::Parts,
    bytes: Bytes,
    meter: &mut Meter,
) -> Result<Reply, ProxyError> {
    let status = parts.status;
    let json = |body: Bytes| {
        let mut resp = Response::new(ProxyBody::full(body));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        resp
    };
    if !status.is_success() {
        if from == to {
            return Ok(Reply::Full(json(bytes)));
        }
        let err = translate::error_in(from, status.as_u16(), &parts.headers, &bytes);
        let body = translate::error_out(to, &err, &meter.request_id);
        return Ok(Reply::Full(json(Bytes::from(body))));
    }
    let answer = translate::response_in(from, &bytes, &meter.request_id).map_err(|e| {
        ProxyError::UpstreamProtocol(format!(
            "the upstream answered {}: {e}",
            media_type(&parts.headers)
        ))
    })?;
    meter.set_usage(answer.usage);
    meter.stop_reason(answer.stop);
    let now = admission::unix_now();
    if api.stream {
        let events =
            translate::stream_of(&answer, from, to, &api.model, now, api.client_wants_usage);
        let mut resp = Response::new(UpstreamBody::Mock(MockStream::new(
            vec![Bytes::from(events)],
            Duration::ZERO,
        )));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        // Written by the gateway in the client's dialect: metered above, passed as is.
        let stage = match to {
            Dialect::OpenAiChat => Stage::Pass,
            _ => Stage::Watch(Box::new(StreamWatcher::new(to))),
        };
        return Ok(Reply::Stream {
            resp,
            first: None,
            since: Instant::now(),
            strip_usage: false,
            stage,
        });
    }
    if from == to {
        return Ok(Reply::Full(json(bytes)));
    }
    let body = translate::response_out(to, &answer, &api.model, now);
    Ok(Reply::Full(json(Bytes::from(body))))
}

/// `/v1/messages/count_tokens`: exact from the route's first Anthropic backend, passed
/// through; estimated (prompt bytes / 4, the gateway's admission rule) when the route has
/// none, and said so in `x-modelgate-token-count: estimated`.
async fn count_tokens(
    gw: &Gateway,
    route: &Arc<Route>,
    out: &mut Outbound<'_, '_>,
    meter: &mut Meter,
) -> Result<Reply, ProxyError> {
    // Nothing is charged either way.
    meter.set_usage(crate::canonical::Usage {
        output: Some(0),
        ..Default::default()
    });
    let anthropic = route
        .backends()
        .find(|b| matches!(b.provider, crate::routes::Provider::Anthropic(_)));
    let Some(backend) = anthropic else {
        let mut resp = json_response(
            StatusCode::OK,
            &serde_json::json!({"input_tokens": out.api.prompt_tokens_estimate()}),
        );
        resp.headers_mut().insert(
            "x-modelgate-token-count",
            HeaderValue::from_static("estimated"),
        );
        return Ok(Reply::Full(resp));
    };
    meter.attempts += 1;
    meter.backend = Some(backend.clone());
    let timeout = backend.timeout.unwrap_or(DEFAULT_ATTEMPT_TIMEOUT);
    let resp = providers::attempt(&gw.client, backend, out, timeout)
        .await
        .map_err(Failure::into_error)?;
    let (parts, body) = resp.into_parts();
    let bytes = match tokio::time::timeout(timeout, Limited::new(body, MAX_UPSTREAM_BODY).collect())
        .await
    {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) => return Err(ProxyError::UpstreamConnect(providers::describe(&*e))),
        Err(_) => return Err(ProxyError::UpstreamTimeout),
    };
    let mut resp = Response::new(ProxyBody::full(bytes));
    *resp.status_mut() = parts.status;
    copy_content_type(&parts.headers, resp.headers_mut());
    Ok(Reply::Full(resp))
}

/// What an attempt brought back, before anything went to the client.
enum Answer {
    /// An event stream and its first bytes (`None`: it ended without any).
    Stream {
        resp: Response<UpstreamBody>,
        first: Option<Bytes>,
        since: Instant,
    },
    /// A whole body: a JSON answer, or an upstream client error to pass on.
    Whole(http::response::Parts, Bytes),
    /// A body over the size limit: nothing to pass on, and no reason to ask another backend.
    Oversized(http::response::Parts),
}

/// The second half of an attempt: wait for what the client will get, within what is `left`
/// of the attempt's time. An event stream goes on once its first bytes came, which must be
/// within the route's `streamIdleTimeout` (and `streamTimeout`) of its headers; any other
/// answer is read whole. An upstream silent until then failed like one that never answered
/// (a timeout), one that broke off like one that could not be reached: the client has seen
/// nothing yet, so both may be retried.
async fn receive(
    mut resp: Response<UpstreamBody>,
    route: &Route,
    stream: bool,
    left: Duration,
) -> Result<Answer, Failure> {
    let since = Instant::now();
    if stream && resp.status().is_success() && is_event_stream(resp.headers()) {
        let wait = first_byte_wait(route, left);
        return match tokio::time::timeout(wait, stream::first_bytes(resp.body_mut())).await {
            Err(_) => Err(Failure::Timeout),
            Ok(Err(e)) => Err(broke_off(&*e)),
            Ok(Ok(first)) => {
                if first.is_none() {
                    // Ended: never polled again.
                    *resp.body_mut() =
                        UpstreamBody::Mock(MockStream::new(Vec::new(), Duration::ZERO));
                }
                Ok(Answer::Stream { resp, first, since })
            }
        };
    }
    let (parts, body) = resp.into_parts();
    match tokio::time::timeout(left, Limited::new(body, MAX_UPSTREAM_BODY).collect()).await {
        Err(_) => Err(Failure::Timeout),
        Ok(Ok(b)) => Ok(Answer::Whole(parts, b.to_bytes())),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Ok(Answer::Oversized(parts)),
        Ok(Err(e)) => Err(broke_off(&*e)),
    }
}

/// The longest an event stream may take from its headers to its first bytes.
fn first_byte_wait(route: &Route, left: Duration) -> Duration {
    [route.stream_idle_timeout, route.stream_timeout]
        .into_iter()
        .flatten()
        .fold(left, Duration::min)
}

fn broke_off(e: &(dyn std::error::Error + 'static)) -> Failure {
    Failure::Connect(format!(
        "the connection broke before the answer came: {}",
        providers::describe(e)
    ))
}

/// The media type of a `Content-Type`, parameters left out.
fn media_type_of(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    Some(v.split(';').next().unwrap_or("").trim())
}

fn is_event_stream(headers: &HeaderMap) -> bool {
    media_type_of(headers).is_some_and(|t| {
        t.eq_ignore_ascii_case("text/event-stream")
            || t.eq_ignore_ascii_case("application/vnd.amazon.eventstream")
    })
}

/// The upstream's content type for an error message: short, and only if it looks like one.
fn media_type(headers: &HeaderMap) -> String {
    match media_type_of(headers) {
        Some(t)
            if !t.is_empty()
                && t.len() <= 100
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"/+-._".contains(&b)) =>
        {
            format!("with Content-Type {t}")
        }
        Some(_) => "with an unreadable Content-Type".to_owned(),
        None => "without a Content-Type".to_owned(),
    }
}

/// The spend guards, route's first: a request whose worst case (`cost`, at backend
/// `dearest`'s prices) is above one is refused before it reserves anything.
fn spend_guards(
    route: &Route,
    key: &Key,
    demand: Demand,
    cost: f64,
    dearest: Option<&Backend>,
) -> Result<(), ProxyError> {
    let guards = [
        (SpendGuard::Route, route.max_cost_per_request),
        (SpendGuard::Key, key.max_cost_per_request),
    ];
    for (guard, limit) in guards {
        let Some(limit) = limit else { continue };
        if cost > limit {
            return Err(ProxyError::AboveSpendGuard {
                guard,
                limit,
                cost,
                detail: format!(
                    "a prompt of about {} tokens and {} output tokens reserved, at backend {}'s prices",
                    demand.prompt,
                    demand.output,
                    dearest.map_or("", |b| b.name.as_str())
                ),
            });
        }
    }
    Ok(())
}

enum Consulted {
    Hit(Arc<cache::Entry>),
    /// Not found; the answer may be stored (None: the client said `no-store`).
    Miss(Option<cache::Fill>),
    /// Not looked up (`no-cache`, a sampled request the route does not cache, a body that
    /// is no JSON object); a `no-cache` answer may still be stored.
    Bypass(Option<cache::Fill>),
}

async fn consult_cache(
    gw: &Gateway,
    policy: &cache::Policy,
    route: &Route,
    key: &Key,
    api: &ApiRequest<'_>,
    body: &[u8],
    headers: &HeaderMap,
) -> Consulted {
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Consulted::Bypass(None);
    };
    if !policy.cache_sampled && cache::sampled(&json) {
        return Consulted::Bypass(None);
    }
    let scope = cache::Scope {
        namespace: &route.namespace,
        route: &route.id,
        key_id: policy.per_key.then_some(&*key.id),
        endpoint: api.endpoint.as_str(),
        shape: if api.stream {
            Shape::Stream {
                usage: api.client_wants_usage,
            }
        } else {
            Shape::Whole
        },
    };
    let Some(k) = cache::key_of(&scope, &json) else {
        return Consulted::Bypass(None);
    };
    let wish = cache::directive(headers);
    let fill = wish.store.then(|| {
        cache::Fill::new(cache::Pending {
            store: gw.cache.clone(),
            key: k,
            ttl: policy.ttl,
            max_bytes: policy.max_entry_bytes,
        })
    });
    if !wish.lookup {
        return Consulted::Bypass(fill);
    }
    match gw.cache.get(&k, policy.max_entry_bytes).await {
        // The shape is in the key; an entry (from Redis) of the other shape is not served.
        Some(e) if e.stream == api.stream => Consulted::Hit(e),
        _ => Consulted::Miss(fill),
    }
}

/// Answer from the cache: no upstream call; the key's limits and budget are charged the
/// route's `hitCostFraction` of what the original answer used (nothing by default).
fn cache_hit(
    gw: &Gateway,
    policy: &cache::Policy,
    series: &cache::Series,
    key: &Arc<Key>,
    entry: Arc<cache::Entry>,
    meter: &mut Meter,
) -> Result<Reply, ProxyError> {
    meter.cache = Some(Outcome::Hit);
    let f = policy.hit_cost_fraction;
    let mut limit_headers = Vec::new();
    if f > 0.0 {
        if key.exhausted {
            reject(&gw.metrics, key, "budget");
            return Err(ProxyError::BudgetExhausted);
        }
        let charge = Estimate {
            tokens: (entry.usage.processed() as f64 * f).ceil() as u64,
            usd: entry.cost_usd * f,
        };
        match admission::admit(key, &gw.live.registry, charge, admission::unix_now()) {
            Ok(ticket) => {
                limit_headers = ticket.headers.clone();
                ticket.settle(charge.tokens, charge.usd);
            }
            Err(rejection) => {
                reject(&gw.metrics, key, rejection.kind.as_str());
                return Err(ProxyError::Limited(rejection));
            }
        }
    }
    meter.served_from_cache();
    series.hit.inc();
    series.tokens_saved.inc_by(entry.usage.processed());
    series.cost_saved.inc_by(entry.cost_usd);
    let mut resp = Response::new(ProxyBody::full(entry.body.clone()));
    if let Ok(ct) = HeaderValue::from_str(&entry.content_type) {
        resp.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    if entry.stream {
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    }
    for (name, v) in limit_headers {
        resp.headers_mut().insert(name, v);
    }
    Ok(Reply::Full(resp))
}

/// The request body with the route's masking rules applied to its prompt text (`None`:
/// no rules, or nothing matched), or the refusal of a `block` rule.
fn mask_prompt(
    gw: &Gateway,
    route: &Route,
    endpoint: Endpoint,
    body: &[u8],
) -> Result<Option<Bytes>, ProxyError> {
    use crate::mask::{Direction, Tally};
    let Some(masker) = &route.masking else {
        return Ok(None);
    };
    let mut tally = Tally::default();
    match masker.mask_request(endpoint, body, &mut tally) {
        Ok(masked) => {
            masker.record(&gw.metrics, &route.id, Direction::Prompt, &tally);
            Ok(masked)
        }
        Err(blocked) => {
            masker.record_block(&gw.metrics, &route.id, &blocked);
            Err(ProxyError::MaskingBlocked(blocked.rule))
        }
    }
}

fn reject(metrics: &Metrics, key: &Key, limit: &'static str) {
    metrics.key(&key.id).rejected(limit).inc();
}

/// Tiers in priority order; within a tier up to `1 + retries.attempts` attempts, preferring
/// backends not tried yet. Only failures listed in `retries.on` are retried or fall through.
/// Every retry happens before any byte reached the client: an attempt lasts until its
/// answer can go on (see [`receive`]), and its timeout (the backend's, capped by what is
/// left of the route's) covers all of it.
///
/// No pause outlasts the route's timeout: a backoff that would moves on to the next tier at
/// once. A backend that answers 429/503 with a `Retry-After` that fits the time left is next
/// tried after that wait instead of a backoff; one that asks for longer is not tried again,
/// and the next backend (or tier) is tried at once.
async fn forward(
    gw: &Gateway,
    route: &Arc<Route>,
    out: &mut Outbound<'_, '_>,
    meter: &mut Meter,
) -> Result<Answer, ProxyError> {
    let api = out.api;
    let demand = Demand {
        prompt: api.prompt_tokens_estimate(),
        output: out.output_reservation.saturating_mul(api.choices),
    };
    let deadline = route.timeout.map(|t| Instant::now() + t);
    let mut tried: Vec<usize> = Vec::new();
    let mut last: Option<Failure> = None;
    // Backends that asked to be retried after a time within the budget, and until when.
    let mut ready_at: Vec<(usize, Instant)> = Vec::new();
    // Backends that asked for a wait the budget cannot hold.
    let mut busy: Vec<usize> = Vec::new();
    'tiers: for (ti, tier) in route.tiers.iter().enumerate() {
        if ti > 0 {
            let reason = last
                .as_ref()
                .map_or(UpstreamErrorKind::Connect, Failure::reason);
            gw.metrics.route(&route.id).fallbacks(reason).inc();
        }
        // The last failure asked for a wait the budget cannot hold: no backoff before the next.
        let mut at_once = false;
        for n in 0..=route.retry.attempts {
            let Some(backend) = route.pick(tier, &tried, demand) else {
                break;
            };
            if busy.contains(&backend.id()) {
                // Only backends that cannot answer in time are left in this tier.
                break;
            }
            if n > 0 {
                let asked = ready_at.iter().find(|(id, _)| *id == backend.id());
                let pause = match asked {
                    Some((_, at)) => at.saturating_duration_since(Instant::now()),
                    None if std::mem::take(&mut at_once) => Duration::ZERO,
                    None => route.retry.backoff(n - 1),
                };
                if deadline
                    .is_some_and(|d| Instant::now().checked_add(pause).is_none_or(|t| t >= d))
                {
                    break;
                }
                let reason = last
                    .as_ref()
                    .map_or(UpstreamErrorKind::Connect, Failure::reason);
                backend.series(&gw.metrics).retries(reason).inc();
                tokio::time::sleep(pause).await;
            }
            let mut timeout = backend.timeout.unwrap_or(DEFAULT_ATTEMPT_TIMEOUT);
            if let Some(d) = deadline {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(last.map_or(ProxyError::UpstreamTimeout, Failure::into_error));
                }
                timeout = timeout.min(left);
            }
            tried.push(backend.id());
            meter.attempts += 1;
            meter.backend = Some(backend.clone());
            // Dropped after the attempt, or with this future when the client leaves mid-call.
            let in_flight = backend.state.start_attempt();
            let mut span = meter
                .span
                .as_mut()
                .map(|s| s.attempt(&backend, api.endpoint.as_str(), &api.model));
            out.trace = span
                .as_mut()
                .and_then(crate::traces::AttemptSpan::take_headers);
            let started = Instant::now();
            let result = match providers::attempt(&gw.client, &backend, out, timeout).await {
                Ok(resp) => {
                    // The upstream connection's reads and writes are the request's cost too.
                    let connection = resp.extensions().get::<BusyClock>().cloned();
                    let left = timeout.saturating_sub(started.elapsed());
                    let answer = receive(resp, route, api.stream, left).await;
                    if let Some(clock) = connection {
                        meter.charge_upstream(clock);
                    }
                    answer
                }
                Err(failure) => Err(failure),
            };
            let took = started.elapsed();
            drop(in_flight);
            // A prompt too long for this backend: a later tier may hold it.
            let result = match result {
                Ok(Answer::Whole(parts, bytes)) if parts.status == StatusCode::BAD_REQUEST => {
                    let dialect = backend.provider.dialect(api.endpoint.dialect());
                    if context_overflow(dialect, &parts.headers, &bytes) {
                        Err(Failure::ContextLength(parts, bytes))
                    } else {
                        Ok(Answer::Whole(parts, bytes))
                    }
                }
                other => other,
            };
            if let Some(span) = span {
                let (status, error) = attempt_outcome(&result);
                span.end(status, error);
            }
            match result {
                Ok(answer) => {
                    backend.state.record_success(took);
                    return Ok(answer);
                }
                Err(Failure::ContextLength(parts, bytes)) => {
                    // The backend is fine; the prompt is too long for it.
                    backend.state.record_success(took);
                    record_failure(
                        gw,
                        route,
                        &backend,
                        &Failure::ContextLength(parts.clone(), Bytes::new()),
                    );
                    if !route.retry.context_length || ti + 1 == route.tiers.len() {
                        return Ok(Answer::Whole(parts, bytes));
                    }
                    last = Some(Failure::ContextLength(parts, bytes));
                    continue 'tiers;
                }
                // The client's request, not the backend, is at fault: no retry, no health mark.
                Err(refused @ Failure::Refused(_)) => return Err(refused.into_error()),
                Err(failure) => {
                    record_failure(gw, route, &backend, &failure);
                    let retryable = failure.retryable(&route.retry.on);
                    let wait = failure.retry_after(SystemTime::now());
                    let again = failure.may_ask_again();
                    last = Some(failure);
                    if !retryable {
                        return Err(last.map_or(ProxyError::UpstreamTimeout, Failure::into_error));
                    }
                    if !again {
                        // Out of quota: the others may answer, at once.
                        busy.push(backend.id());
                        at_once = true;
                        continue;
                    }
                    if let Some(wait) = wait {
                        let now = Instant::now();
                        if wait <= retry_after_budget(deadline, now) {
                            ready_at.retain(|(id, _)| *id != backend.id());
                            ready_at.push((backend.id(), now + wait));
                        } else {
                            busy.push(backend.id());
                            at_once = true;
                        }
                    }
                }
            }
        }
    }
    Err(last.map_or_else(
        || ProxyError::Internal(format!("route {} has no backend to try", route.id)),
        Failure::into_error,
    ))
}

/// An attempt's upstream status and, when it failed, why (a trace's `error.type`).
fn attempt_outcome(result: &Result<Answer, Failure>) -> (Option<u16>, Option<&'static str>) {
    // An error status passed on is named by its code (`AttemptSpan::end`).
    let status_error = |s: StatusCode| (Some(s.as_u16()), None);
    match result {
        Ok(Answer::Stream { resp, .. }) => status_error(resp.status()),
        Ok(Answer::Whole(parts, _)) | Ok(Answer::Oversized(parts)) => status_error(parts.status),
        Err(Failure::Refused(_)) => (None, Some("invalid_request")),
        Err(f) => {
            let status = match f {
                Failure::Status { status, .. } | Failure::CredentialsRefused(status, _) => {
                    Some(status.as_u16())
                }
                Failure::ContextLength(parts, _) => Some(parts.status.as_u16()),
                _ => None,
            };
            (status, Some(f.reason().as_str()))
        }
    }
}

/// The longest the gateway holds a request to honour an upstream's `Retry-After`, whatever
/// the route's timeout; clients rarely wait longer for a first byte.
const MAX_RETRY_AFTER_WAIT: Duration = Duration::from_secs(60);
/// What a retry after a `Retry-After` wait must still have of the route's timeout.
const RETRY_AFTER_ATTEMPT_RESERVE: Duration = Duration::from_secs(1);

/// The longest `Retry-After` the request can wait out and still make its attempt in time.
fn retry_after_budget(deadline: Option<Instant>, now: Instant) -> Duration {
    let left = deadline.map_or(Duration::MAX, |d| {
        d.saturating_duration_since(now)
            .saturating_sub(RETRY_AFTER_ATTEMPT_RESERVE)
    });
    left.min(MAX_RETRY_AFTER_WAIT)
}

/// Whether a 400 from a backend of `dialect` says the prompt exceeds the model's window.
fn context_overflow(dialect: Dialect, headers: &HeaderMap, body: &[u8]) -> bool {
    translate::error_in(dialect, 400, headers, body).kind
        == crate::canonical::ErrorKind::ContextLength
}

fn record_failure(gw: &Gateway, route: &Route, backend: &Arc<Backend>, failure: &Failure) {
    let series = backend.series(&gw.metrics);
    series.upstream_error(failure.metric_kind()).inc();
    if !failure.unhealthy() {
        // A busy upstream is healthy; ejecting it would only move the load elsewhere.
        return;
    }
    if backend
        .state
        .record_failure(&route.outlier, route.may_eject(backend))
    {
        series.ejections().inc();
        tracing::warn!(route = %route.id, backend = %backend.name, "backend ejected after consecutive failures");
    }
    tracing::debug!(route = %route.id, backend = %backend.name, ?failure, "upstream attempt failed");
}

/// The models `key` may call, in the client's shape: OpenAI's list, or Anthropic's page
/// (`anthropic-version` sent) with every model on it.
fn list_models(snapshot: &Snapshot, key: &Key, dialect: Dialect) -> Response<ProxyBody> {
    let names: Vec<_> = snapshot
        .routes
        .names(&key.namespace)
        .into_iter()
        .filter(|name| {
            snapshot
                .routes
                .get(&key.namespace, name)
                .is_some_and(|r| key.allows(&r.model, name))
        })
        .collect();
    let body = match dialect {
        Dialect::OpenAiChat | Dialect::OpenAiResponses | Dialect::Bedrock | Dialect::Gemini => {
            let data: Vec<_> = names
                .iter()
                .map(|name| serde_json::json!({"id": name, "object": "model", "created": 0, "owned_by": "modelgate"}))
                .collect();
            serde_json::json!({"object": "list", "data": data})
        }
        Dialect::Anthropic => {
            let data: Vec<_> = names
                .iter()
                .map(|name| {
                    serde_json::json!({"type": "model", "id": name, "display_name": name,
                    "created_at": "1970-01-01T00:00:00Z"})
                })
                .collect();
            serde_json::json!({"data": data, "has_more": false,
                "first_id": names.first(), "last_id": names.last()})
        }
    };
    json_response(StatusCode::OK, &body)
}

#[cfg(test)]
mod key_header_tests {
    use super::presented_key;
    use http::HeaderMap;

    fn key(pairs: &[(&'static str, &str)]) -> Option<String> {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        presented_key(&h).map(|k| String::from_utf8_lossy(k).into_owned())
    }

    #[test]
    fn every_documented_way_of_sending_a_key() {
        for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
            assert_eq!(
                key(&[("authorization", &format!("{scheme} sk-1"))]).as_deref(),
                Some("sk-1")
            );
        }
        assert_eq!(
            key(&[("authorization", "Bearer  sk-1 ")]).as_deref(),
            Some("sk-1")
        );
        assert_eq!(key(&[("authorization", "Basic c2stMQ==")]), None);
        assert_eq!(key(&[("authorization", "Bearersk-1")]), None);
        assert_eq!(key(&[("authorization", "Bearer ")]), None);
        assert_eq!(key(&[("x-api-key", "sk-2")]).as_deref(), Some("sk-2"));
        assert_eq!(key(&[("api-key", "sk-3")]).as_deref(), Some("sk-3"));
        assert_eq!(key(&[]), None);
    }
}

#[cfg(test)]
mod forward_tests {
    use std::time::Duration;

    use futures_util::FutureExt;

    use super::*;
    use crate::providers::mock::MockSettings;
    use crate::routes::{OutlierPolicy, Pricing, Provider, RetryPolicy, Strategy, Tier};

    fn slow_route() -> Arc<Route> {
        let backend = Arc::new(Backend::new(
            "default/r",
            "slow",
            Provider::Mock(MockSettings {
                latency: Duration::from_secs(3600),
                ..MockSettings::default()
            }),
            None,
            1,
            None,
            Pricing::default(),
            Arc::default(),
        ));
        Arc::new(Route {
            id: "default/r".into(),
            namespace: "default".into(),
            model: "m".into(),
            aliases: vec![],
            strategy: Strategy::LeastLatency,
            timeout: None,
            retry: RetryPolicy::default(),
            outlier: OutlierPolicy::default(),
            max_output_tokens: None,
            stream_idle_timeout: None,
            stream_timeout: None,
            max_cost_per_request: None,
            shadow: None,
            cache: None,
            masking: None,
            tiers: vec![Tier {
                priority: 0,
                backends: vec![backend],
            }],
        })
    }

    #[test]
    fn a_retry_after_may_use_the_time_left_but_a_reserve_and_never_more_than_a_minute() {
        let now = Instant::now();
        let budget = |left: Option<Duration>| retry_after_budget(left.map(|l| now + l), now);
        assert_eq!(budget(None), MAX_RETRY_AFTER_WAIT);
        assert_eq!(
            budget(Some(Duration::from_secs(3600))),
            MAX_RETRY_AFTER_WAIT
        );
        assert_eq!(
            budget(Some(Duration::from_secs(10))),
            Duration::from_secs(9)
        );
        assert_eq!(budget(Some(Duration::from_millis(500))), Duration::ZERO);
        let past = now.checked_sub(Duration::from_secs(1)).unwrap();
        assert_eq!(retry_after_budget(Some(past), now), Duration::ZERO);
    }

    /// A client that leaves mid-call drops the request's future with the attempt pending;
    /// the backend's in-flight count (which `least-latency` weighs) must come back down.
    #[tokio::test]
    async fn a_dropped_attempt_leaves_the_in_flight_count() {
        let gw = Gateway::new(Settings {
            max_body_bytes: 1 << 20,
            default_max_tokens: 16,
            max_stream_event_bytes: crate::stream::DEFAULT_MAX_EVENT_BYTES,
            egress: None,
            series_grace: crate::metrics::SERIES_GRACE,
        });
        let route = slow_route();
        let backend = route.tiers[0].backends[0].clone();
        let body = br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
        let api = ApiRequest::parse(Endpoint::Chat, body).unwrap();
        let mut meter = Meter::new(gw.metrics.clone(), "test".into());
        {
            let mut out = Outbound::new(&api, 16);
            let mut call = std::pin::pin!(forward(&gw, &route, &mut out, &mut meter));
            assert!(
                call.as_mut().now_or_never().is_none(),
                "the attempt is pending"
            );
            assert_eq!(backend.state.in_flight(), 1, "counted while the call runs");
        }
        assert_eq!(
            backend.state.in_flight(),
            0,
            "the dropped call left the count"
        );
    }

    /// What a loopback upstream does after it sent its response head.
    #[derive(Clone, Copy)]
    enum Then {
        /// Nothing, with the connection open.
        Idle,
        /// Close the connection.
        Close,
    }

    const EVENT_STREAM_HEAD: &str =
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
    const JSON_HEAD: &str =
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n";

    /// An upstream on 127.0.0.1 that answers every request with `head` and then `then`;
    /// returns its base URL.
    async fn upstream_that_stalls(head: &'static str, then: Then) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    let mut buf = [0u8; 4096];
                    while memchr::memmem::find(&seen, b"\r\n\r\n").is_none() {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    }
                    conn.write_all(head.as_bytes()).await.unwrap();
                    if let Then::Idle = then {
                        // Hold the connection until the gateway lets go of it.
                        while matches!(conn.read(&mut buf).await, Ok(n) if n > 0) {}
                    }
                });
            }
        });
        url
    }

    fn backend(name: &str, provider: Provider, timeout: Option<Duration>) -> Arc<Backend> {
        Arc::new(Backend::new(
            "default/r",
            name,
            provider,
            None,
            1,
            timeout,
            Pricing::default(),
            Arc::default(),
        ))
    }

    fn http(url: &str) -> Provider {
        Provider::OpenAi(Box::new(
            crate::providers::openai::Upstream::new(url, None).unwrap(),
        ))
    }

    /// One backend per tier, tried in order; no retries within a tier.
    fn tiered(backends: Vec<Arc<Backend>>, on: Vec<crate::routes::RetryOn>) -> Arc<Route> {
        Arc::new(Route {
            id: "default/r".into(),
            namespace: "default".into(),
            model: "m".into(),
            aliases: vec![],
            strategy: Strategy::Weighted,
            timeout: None,
            retry: RetryPolicy {
                attempts: 0,
                on,
                ..RetryPolicy::default()
            },
            outlier: OutlierPolicy {
                consecutive_failures: 1,
                ..OutlierPolicy::default()
            },
            max_output_tokens: None,
            stream_idle_timeout: Some(Duration::from_millis(50)),
            stream_timeout: None,
            max_cost_per_request: None,
            shadow: None,
            cache: None,
            masking: None,
            tiers: backends
                .into_iter()
                .enumerate()
                .map(|(i, b)| Tier {
                    priority: i as u32,
                    backends: vec![b],
                })
                .collect(),
        })
    }

    fn gateway() -> Gateway {
        Gateway::new(Settings {
            max_body_bytes: 1 << 20,
            default_max_tokens: 16,
            max_stream_event_bytes: crate::stream::DEFAULT_MAX_EVENT_BYTES,
            egress: None,
            series_grace: crate::metrics::SERIES_GRACE,
        })
    }

    const STREAM: &[u8] =
        br#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    const WHOLE: &[u8] = br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;

    fn upstream_errors(gw: &Gateway, backend: &str, kind: &str) -> bool {
        gw.metrics.encode_prometheus().contains(&format!(
            "modelgate_upstream_errors_total{{route=\"default/r\",backend=\"{backend}\",kind=\"{kind}\"}} 1"
        ))
    }

    #[tokio::test]
    async fn a_stream_silent_after_its_headers_fails_over_like_a_timeout() {
        use crate::routes::RetryOn;
        let gw = gateway();
        let silent = backend(
            "silent",
            http(&upstream_that_stalls(EVENT_STREAM_HEAD, Then::Idle).await),
            None,
        );
        let healthy = backend("healthy", Provider::Mock(MockSettings::default()), None);
        let route = tiered(vec![silent.clone(), healthy], vec![RetryOn::Timeout]);
        let api = ApiRequest::parse(Endpoint::Chat, STREAM).unwrap();
        let mut meter = Meter::new(gw.metrics.clone(), "test".into());
        let answer = forward(&gw, &route, &mut Outbound::new(&api, 16), &mut meter).await;
        let Ok(Answer::Stream {
            first: Some(first), ..
        }) = answer
        else {
            panic!("the second tier's stream, with its first bytes");
        };
        assert!(first.starts_with(b"data: "), "{first:?}");
        assert_eq!(meter.backend.as_ref().unwrap().name, "healthy");
        assert_eq!(meter.attempts, 2);
        assert!(upstream_errors(&gw, "silent", "timeout"));
        assert!(
            silent.state.is_ejected(),
            "the outlier detector saw a failure"
        );
        assert_eq!(silent.state.in_flight(), 0);

        // Not retried when the policy leaves timeouts out: the client gets a 504.
        let silent = backend(
            "silent",
            http(&upstream_that_stalls(EVENT_STREAM_HEAD, Then::Idle).await),
            None,
        );
        let healthy = backend("healthy", Provider::Mock(MockSettings::default()), None);
        let route = tiered(vec![silent, healthy], vec![RetryOn::Connect]);
        let mut meter = Meter::new(gw.metrics.clone(), "test".into());
        let Err(e) = forward(&gw, &route, &mut Outbound::new(&api, 16), &mut meter).await else {
            panic!("no retry on a timeout");
        };
        assert_eq!(e.into_response().status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(meter.attempts, 1);
    }

    #[tokio::test]
    async fn a_whole_answer_that_never_comes_fails_over_within_the_attempt_timeout() {
        use crate::routes::RetryOn;
        let gw = gateway();
        let silent = backend(
            "silent",
            http(&upstream_that_stalls(JSON_HEAD, Then::Idle).await),
            Some(Duration::from_millis(50)),
        );
        let healthy = backend("healthy", Provider::Mock(MockSettings::default()), None);
        let route = tiered(vec![silent, healthy], vec![RetryOn::Timeout]);
        let api = ApiRequest::parse(Endpoint::Chat, WHOLE).unwrap();
        let mut meter = Meter::new(gw.metrics.clone(), "test".into());
        let Ok(Answer::Whole(parts, body)) =
            forward(&gw, &route, &mut Outbound::new(&api, 16), &mut meter).await
        else {
            panic!("the second tier's answer");
        };
        assert_eq!(parts.status, StatusCode::OK);
        assert!(usage_of_body(&body).is_some());
        assert_eq!(meter.backend.as_ref().unwrap().name, "healthy");
        assert!(upstream_errors(&gw, "silent", "timeout"));
    }

    #[tokio::test]
    async fn a_connection_broken_before_the_first_byte_fails_over_like_a_connect_error() {
        use crate::routes::RetryOn;
        for (head, body) in [(EVENT_STREAM_HEAD, STREAM), (JSON_HEAD, WHOLE)] {
            let gw = gateway();
            let broken = backend(
                "broken",
                http(&upstream_that_stalls(head, Then::Close).await),
                None,
            );
            let healthy = backend("healthy", Provider::Mock(MockSettings::default()), None);
            let route = tiered(vec![broken, healthy], vec![RetryOn::Connect]);
            let api = ApiRequest::parse(Endpoint::Chat, body).unwrap();
            let mut meter = Meter::new(gw.metrics.clone(), "test".into());
            let answer = forward(&gw, &route, &mut Outbound::new(&api, 16), &mut meter).await;
            assert!(
                matches!(
                    answer,
                    Ok(Answer::Stream { first: Some(_), .. } | Answer::Whole(..))
                ),
                "{head}"
            );
            assert_eq!(meter.backend.as_ref().unwrap().name, "healthy");
            assert!(upstream_errors(&gw, "broken", "connect"), "{head}");
        }
    }

    #[test]
    fn the_first_byte_waits_no_longer_than_any_limit() {
        let mut route = Arc::try_unwrap(tiered(vec![], vec![])).unwrap();
        let s = Duration::from_secs;
        route.stream_idle_timeout = Some(s(300));
        assert_eq!(first_byte_wait(&route, s(600)), s(300), "idle");
        assert_eq!(
            first_byte_wait(&route, s(20)),
            s(20),
            "the attempt's time left"
        );
        route.stream_timeout = Some(s(60));
        assert_eq!(first_byte_wait(&route, s(600)), s(60), "the stream's total");
        route.stream_idle_timeout = None;
        route.stream_timeout = None;
        assert_eq!(first_byte_wait(&route, s(600)), s(600));
    }
}
