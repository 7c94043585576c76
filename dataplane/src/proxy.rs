//! The request path: named phases over one request's [`Meter`].
//!
//! ```text
//!  parse path ─► authenticate ─► read body ─► resolve route ─► authorize ─► admit
//!      ─► forward (pick backend, retry, fall back; before the first byte only) ─► respond
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

use crate::admission::{self, Estimate};
use crate::error::{ProxyError, json_response};
use crate::keys::Key;
use crate::meter::Meter;
use crate::metrics::{BackendLabels, LimitLabels, Metrics, RouteLabels, UpstreamErrorLabels};
use crate::providers::{self, Failure, HttpClient};
use crate::request::{ApiRequest, Endpoint};
use crate::routes::{Backend, Route};
use crate::snapshot::{Live, Snapshot};
use crate::stream::{MeteredStream, ProxyBody, UpstreamBody, usage_of_body};

/// Per-attempt deadline when neither the backend nor the route sets one.
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
}

/// Everything a request needs, shared by all connections.
pub struct Gateway {
    pub live: Live,
    pub metrics: Arc<Metrics>,
    pub client: HttpClient,
    pub settings: Settings,
}

impl Gateway {
    pub fn new(settings: Settings) -> Self {
        Self {
            live: Live::default(),
            metrics: Arc::new(Metrics::new()),
            client: providers::http_client(settings.egress.clone()),
            settings,
        }
    }
}

enum Reply {
    Full(Response<ProxyBody>),
    Stream(Response<UpstreamBody>, bool),
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
pub async fn handle(gw: Arc<Gateway>, req: Request<Incoming>) -> Response<ProxyBody> {
    let mut meter = Meter::new(gw.metrics.clone(), request_id(req.headers()));
    let reply = serve(&gw, req, &mut meter).await;
    let (mut resp, meter) = match reply {
        Ok(Reply::Full(resp)) => {
            meter.response_ready(resp.status().as_u16());
            (resp, Some(meter))
        }
        Ok(Reply::Stream(upstream, strip)) => {
            meter.response_ready(upstream.status().as_u16());
            let mut resp = Response::new(ProxyBody::Full(None));
            *resp.status_mut() = upstream.status();
            copy_content_type(upstream.headers(), resp.headers_mut());
            resp.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            add_gateway_headers(&meter, resp.headers_mut());
            let body = MeteredStream::with_max_event(
                upstream.into_body(),
                meter,
                strip,
                gw.settings.max_stream_event_bytes,
            );
            *resp.body_mut() = ProxyBody::Stream(Box::new(body));
            return resp;
        }
        Err(e) => {
            meter.error = Some(e.code());
            let resp = e.into_response();
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
            return Ok(Reply::Full(list_models(&snapshot, &key)));
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
        .ok_or_else(|| ProxyError::UnknownModel(api.model.clone()))?
        .clone();
    if !key.allows(&route.model, &api.model) {
        return Err(ProxyError::ModelNotAllowed(api.model.clone()));
    }
    meter.route = Some(route.clone());

    // admit
    if key.exhausted {
        reject(&gw.metrics, &key, "budget");
        return Err(ProxyError::BudgetExhausted);
    }
    let output = api.output_reservation(gw.settings.default_max_tokens, route.max_output_tokens)?;
    let prompt = api.prompt_tokens_estimate();
    let estimate = Estimate {
        tokens: prompt.saturating_add(output),
        usd: route.max_pricing().cost(prompt, output),
    };
    match admission::admit(&key, &gw.live.registry, estimate, admission::unix_now()) {
        Ok(ticket) => meter.ticket = Some(ticket),
        Err(rejection) => {
            reject(&gw.metrics, &key, rejection.kind.as_str());
            return Err(ProxyError::Limited(rejection));
        }
    }

    // pick and forward
    let (backend, resp) = forward(gw, &route, &api, meter).await?;
    let status = resp.status();
    if api.stream && status.is_success() {
        return Ok(Reply::Stream(resp, !api.client_wants_usage));
    }
    // A buffered answer (or an upstream client error passed on): read it whole for usage.
    let timeout = backend.timeout.unwrap_or(DEFAULT_ATTEMPT_TIMEOUT);
    let started = Instant::now();
    let (parts, body) = resp.into_parts();
    let read = tokio::time::timeout(timeout, Limited::new(body, MAX_UPSTREAM_BODY).collect()).await;
    meter.upstream_time += started.elapsed();
    let bytes = match read {
        Err(_) => return Err(ProxyError::UpstreamTimeout),
        Ok(Err(e)) => return Err(ProxyError::UpstreamProtocol(e.to_string())),
        Ok(Ok(b)) => b.to_bytes(),
    };
    if status.is_success()
        && let Some(u) = usage_of_body(&bytes)
    {
        meter.set_usage(u);
    }
    let mut out = Response::new(ProxyBody::full(bytes));
    *out.status_mut() = status;
    copy_content_type(&parts.headers, out.headers_mut());
    Ok(Reply::Full(out))
}

fn reject(metrics: &Metrics, key: &Key, limit: &'static str) {
    metrics
        .rejected
        .get_or_create(&LimitLabels {
            key: key.id.to_string(),
            limit,
        })
        .inc();
}

/// Tiers in priority order; within a tier up to `1 + retries.attempts` attempts, preferring
/// backends not tried yet. Only failures listed in `retries.on` are retried or fall through.
/// Every retry happens before any byte reached the client.
async fn forward(
    gw: &Gateway,
    route: &Arc<Route>,
    api: &ApiRequest<'_>,
    meter: &mut Meter,
) -> Result<(Arc<Backend>, Response<UpstreamBody>), ProxyError> {
    let deadline = route.timeout.map(|t| Instant::now() + t);
    let mut tried: Vec<usize> = Vec::new();
    let mut last: Option<Failure> = None;
    for (ti, tier) in route.tiers.iter().enumerate() {
        if ti > 0 {
            gw.metrics
                .fallbacks
                .get_or_create(&RouteLabels {
                    route: route.id.clone(),
                })
                .inc();
        }
        for n in 0..=route.retry.attempts {
            let Some(backend) = route.pick(tier, &tried) else {
                break;
            };
            if n > 0 {
                gw.metrics
                    .retries
                    .get_or_create(&BackendLabels {
                        route: route.id.clone(),
                        backend: backend.name.clone(),
                    })
                    .inc();
                let pause = route.retry.backoff(n - 1);
                let started = Instant::now();
                tokio::time::sleep(pause).await;
                meter.upstream_time += started.elapsed();
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
            let started = Instant::now();
            let result = providers::attempt(&gw.client, &backend, api, timeout).await;
            let took = started.elapsed();
            drop(in_flight);
            meter.upstream_time += took;
            match result {
                Ok(resp) => {
                    backend.state.record_success(took);
                    return Ok((backend, resp));
                }
                Err(failure) => {
                    record_failure(gw, route, &backend, &failure);
                    let retryable = route.retry.on.contains(&failure.retry_on());
                    last = Some(failure);
                    if !retryable {
                        return Err(last.map_or(ProxyError::UpstreamTimeout, Failure::into_error));
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

fn record_failure(gw: &Gateway, route: &Route, backend: &Arc<Backend>, failure: &Failure) {
    gw.metrics
        .upstream_errors
        .get_or_create(&UpstreamErrorLabels {
            route: route.id.clone(),
            backend: backend.name.clone(),
            kind: failure.metric_kind(),
        })
        .inc();
    if failure.retry_on() == crate::routes::RetryOn::RateLimited {
        // A busy upstream is healthy; ejecting it would only move the load elsewhere.
        return;
    }
    if backend
        .state
        .record_failure(&route.outlier, route.may_eject(backend))
    {
        gw.metrics
            .ejections
            .get_or_create(&BackendLabels {
                route: route.id.clone(),
                backend: backend.name.clone(),
            })
            .inc();
        tracing::warn!(route = %route.id, backend = %backend.name, "backend ejected after consecutive failures");
    }
    tracing::debug!(route = %route.id, backend = %backend.name, ?failure, "upstream attempt failed");
}

fn list_models(snapshot: &Snapshot, key: &Key) -> Response<ProxyBody> {
    let data: Vec<_> = snapshot
        .routes
        .names(&key.namespace)
        .into_iter()
        .filter(|name| {
            snapshot
                .routes
                .get(&key.namespace, name)
                .is_some_and(|r| key.allows(&r.model, name))
        })
        .map(|name| serde_json::json!({"id": name, "object": "model", "created": 0, "owned_by": "modelgate"}))
        .collect();
    json_response(
        StatusCode::OK,
        &serde_json::json!({"object": "list", "data": data}),
    )
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
            tiers: vec![Tier {
                priority: 0,
                backends: vec![backend],
            }],
        })
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
        });
        let route = slow_route();
        let backend = route.tiers[0].backends[0].clone();
        let body = br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
        let api = ApiRequest::parse(Endpoint::Chat, body).unwrap();
        let mut meter = Meter::new(gw.metrics.clone(), "test".into());
        {
            let mut call = std::pin::pin!(forward(&gw, &route, &api, &mut meter));
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
}
