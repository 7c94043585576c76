//! Providers: how one attempt reaches a model.
//!
//! `attempt` sends one request to one backend and classifies the outcome: a response to pass
//! on (success, or a client error the upstream explains best), or a [`Failure`] that may be
//! retried. OpenAI and OpenAI-compatible servers share the `openai` wire module; the `mock`
//! module answers in-process. A provider that needs translation (Anthropic) or other URLs and
//! headers (Azure) adds a module and a `Provider` variant; the request path does not change.

pub mod anthropic;
pub mod aws_auth;
pub mod azure;
pub mod bedrock;
pub mod gemini;
pub mod google_auth;
pub mod mock;
pub mod openai;
pub mod token;
pub mod vertex;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::busy::TimedConnector;
use crate::canonical;
use crate::egress::{GuardedResolver, UpstreamPolicy};
use crate::error::ProxyError;
use crate::metrics::UpstreamErrorKind;
use crate::request::{ApiRequest, Endpoint};
use crate::routes::{Backend, Provider, RetryOn};
use crate::stream::UpstreamBody;
use crate::translate::openai_chat::MaxTokensField;
use crate::translate::{self, Dialect, Refused};

pub type HttpClient =
    Client<TimedConnector<HttpsConnector<HttpConnector<GuardedResolver>>>, Full<Bytes>>;

/// One pooled client for every upstream: keep-alive, TCP_NODELAY, HTTP/2 where TLS
/// negotiates it, rustls with the ring provider and the Mozilla root set. With an egress
/// policy, names are resolved only to addresses it admits. Each connection's reads and
/// writes are timed (`busy`): the requests it serves are charged for them.
pub fn http_client(egress: Option<Arc<UpstreamPolicy>>) -> HttpClient {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut http = HttpConnector::new_with_resolver(GuardedResolver::new(egress));
    http.set_nodelay(true);
    http.enforce_http(false);
    http.set_connect_timeout(Some(Duration::from_secs(10)));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(1024)
        .build(TimedConnector(https))
}

/// The request URIs of an OpenAI-shaped upstream, one per endpoint, built once.
#[derive(Debug)]
pub struct OpenAiUris {
    chat: http::Uri,
    completions: http::Uri,
    embeddings: http::Uri,
    responses: http::Uri,
}

impl OpenAiUris {
    /// `uri` makes the URI of one endpoint.
    pub fn new(uri: impl Fn(Endpoint) -> Result<http::Uri, String>) -> Result<Self, String> {
        Ok(Self {
            chat: uri(Endpoint::Chat)?,
            completions: uri(Endpoint::Completions)?,
            embeddings: uri(Endpoint::Embeddings)?,
            responses: uri(Endpoint::Responses)?,
        })
    }

    pub fn of(&self, endpoint: Endpoint) -> &http::Uri {
        match endpoint {
            // Anthropic clients' requests reach an OpenAI-shaped backend translated into chat.
            Endpoint::Chat | Endpoint::Messages | Endpoint::CountTokens => &self.chat,
            Endpoint::Completions => &self.completions,
            Endpoint::Embeddings => &self.embeddings,
            Endpoint::Responses => &self.responses,
        }
    }
}

/// A JSON POST to `uri`, accepting an event stream or JSON; the provider adds its auth.
pub fn json_post(uri: &http::Uri, body: Bytes, stream: bool) -> http::Request<Full<Bytes>> {
    let mut req = http::Request::new(Full::new(body));
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = uri.clone();
    let h = req.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(
        header::ACCEPT,
        HeaderValue::from_static(if stream {
            "text/event-stream"
        } else {
            "application/json"
        }),
    );
    req
}

/// A failed attempt that the retry policy may retry.
#[derive(Debug)]
pub enum Failure {
    Connect(String),
    Timeout,
    Status {
        status: StatusCode,
        retry_after: Option<HeaderValue>,
        /// What the error body said, where it changes the handling (quota, overload).
        kind: Option<canonical::ErrorKind>,
    },
    /// 401/403: the backend refused the gateway's credentials. Another backend may still
    /// answer (it is a backend failure, not the client's), so it falls over like a 5xx.
    CredentialsRefused(StatusCode, Option<String>),
    /// The request asks for what this backend's API cannot express: the client's to fix,
    /// never retried.
    Refused(Refused),
    /// A 400 saying the prompt does not fit the model's window: a later tier may take it if
    /// the route says so (`retryOn: [contextLength]`); else the answer goes to the client.
    ContextLength(http::response::Parts, Bytes),
}

impl Failure {
    pub fn retry_on(&self) -> RetryOn {
        match self {
            Self::Connect(_) => RetryOn::Connect,
            Self::Timeout => RetryOn::Timeout,
            Self::Status { status, .. } if *status == StatusCode::TOO_MANY_REQUESTS => {
                RetryOn::RateLimited
            }
            Self::Status { .. }
            | Self::CredentialsRefused(..)
            | Self::Refused(_)
            | Self::ContextLength(..) => RetryOn::ServerError,
        }
    }

    /// Whether the route's retry policy may try again (or fall through) after this.
    /// A refusal is the client's to fix; a context overflow has its own rule (the route's
    /// `contextLength`, later tiers only).
    pub fn retryable(&self, on: &[RetryOn]) -> bool {
        !matches!(self, Self::Refused(_) | Self::ContextLength(..)) && on.contains(&self.retry_on())
    }

    /// Whether the same backend may be asked again for this request: not when its account
    /// is out of quota, nor when it cannot hold the prompt.
    pub fn may_ask_again(&self) -> bool {
        !matches!(
            self.reason(),
            UpstreamErrorKind::QuotaExhausted | UpstreamErrorKind::ContextLength
        )
    }

    /// Whether this failure says the backend is unhealthy (counts towards ejection). A busy
    /// or rate-limited upstream is healthy; ejecting it would only move the load elsewhere.
    pub fn unhealthy(&self) -> bool {
        !matches!(
            self.reason(),
            UpstreamErrorKind::RateLimited
                | UpstreamErrorKind::RateLimitedNoWait
                | UpstreamErrorKind::Overloaded
                | UpstreamErrorKind::QuotaExhausted
                | UpstreamErrorKind::ContextLength
        )
    }

    /// Why the attempt failed: the `kind` of `upstream_errors` and the `reason` of
    /// `retries` and `fallbacks` (docs/providers.md 6.3).
    pub fn reason(&self) -> UpstreamErrorKind {
        match self {
            Self::Connect(_) | Self::Refused(_) => UpstreamErrorKind::Connect,
            Self::Timeout => UpstreamErrorKind::Timeout,
            Self::CredentialsRefused(..) => UpstreamErrorKind::CredentialsRefused,
            Self::ContextLength(..) => UpstreamErrorKind::ContextLength,
            Self::Status {
                kind: Some(canonical::ErrorKind::QuotaExhausted),
                ..
            } => UpstreamErrorKind::QuotaExhausted,
            Self::Status { status, .. } if status.as_u16() == 529 => UpstreamErrorKind::Overloaded,
            Self::Status {
                kind: Some(canonical::ErrorKind::Overloaded),
                ..
            } if status_is_5xx(self) => UpstreamErrorKind::Overloaded,
            Self::Status {
                status,
                retry_after,
                ..
            } if *status == StatusCode::TOO_MANY_REQUESTS => {
                if retry_after.is_some() {
                    UpstreamErrorKind::RateLimited
                } else {
                    UpstreamErrorKind::RateLimitedNoWait
                }
            }
            Self::Status { .. } => UpstreamErrorKind::ServerError,
        }
    }

    pub fn metric_kind(&self) -> UpstreamErrorKind {
        self.reason()
    }

    /// How long the upstream asked the gateway to wait (`Retry-After` on a 429 or 503), as
    /// of `now`.
    pub fn retry_after(&self, now: SystemTime) -> Option<Duration> {
        match self {
            Self::Status {
                status,
                retry_after: Some(v),
                ..
            } if matches!(
                *status,
                StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
            ) =>
            {
                retry_after(v, now)
            }
            _ => None,
        }
    }

    pub fn into_error(self) -> ProxyError {
        match self {
            // Only ever the last failure when no later tier was allowed; forward passes the
            // answer itself on instead.
            Self::ContextLength(parts, _) => ProxyError::UpstreamStatus(parts.status),
            Self::Connect(msg) => ProxyError::UpstreamConnect(msg),
            Self::Timeout => ProxyError::UpstreamTimeout,
            Self::Status {
                status,
                retry_after,
                ..
            } if status == StatusCode::TOO_MANY_REQUESTS => {
                ProxyError::UpstreamRateLimited { retry_after }
            }
            Self::Status { status, .. } => ProxyError::UpstreamStatus(status),
            Self::CredentialsRefused(status, name) => ProxyError::UpstreamCredentials(status, name),
            Self::Refused(r) => match r.param {
                Some(param) => ProxyError::InvalidParam {
                    param,
                    message: r.message,
                },
                None => ProxyError::BadRequest(r.message),
            },
        }
    }
}

/// A request on its way out: the client's request as parsed, and its canonical form, read
/// from the body once, when the first backend that needs a translation is tried.
pub struct Outbound<'r, 'a> {
    pub api: &'r ApiRequest<'a>,
    /// Output tokens admission reserved (per choice): the most a translated request may ask.
    pub output_reservation: u64,
    /// An Anthropic client's `anthropic-version` and `anthropic-beta`, for pass-through.
    pub anthropic_headers: anthropic::ClientHeaders,
    /// The attempt span's context for the upstream (tracing on); set per attempt.
    pub trace: Option<crate::traces::TraceHeaders>,
    canonical: Option<Result<canonical::Request, Refused>>,
}

impl<'r, 'a> Outbound<'r, 'a> {
    pub fn new(api: &'r ApiRequest<'a>, output_reservation: u64) -> Self {
        Self {
            api,
            output_reservation,
            anthropic_headers: anthropic::ClientHeaders::default(),
            trace: None,
            canonical: None,
        }
    }

    /// The canonical request, read from the body the first time it is asked for.
    fn canonical(&mut self) -> Result<&canonical::Request, Refused> {
        let api = self.api;
        let parsed = self.canonical.get_or_insert_with(|| match api.endpoint {
            Endpoint::Chat => translate::openai_chat::request_in(api.body()),
            Endpoint::Messages => translate::anthropic::request_in(api.body()),
            Endpoint::Responses => translate::openai_responses::request_in(api.body()),
            e @ (Endpoint::Completions | Endpoint::Embeddings | Endpoint::CountTokens) => {
                Err(Refused::new(
                    None,
                    format!(
                        "this model's backend speaks another API, which has no {} endpoint; use /v1/chat/completions, /v1/responses or /v1/messages",
                        e.upstream_path()
                    ),
                ))
            }
        });
        parsed.as_ref().map_err(Clone::clone)
    }

    /// The fields of the client's request the translation dropped (none when it was not
    /// translated): said back in `x-modelgate-ignored-params`.
    pub fn ignored(&self) -> &[&'static str] {
        match &self.canonical {
            Some(Ok(r)) => &r.ignored,
            _ => &[],
        }
    }

    /// The request as an Anthropic Messages body for `model`; `max_tokens`, when the client
    /// set none, is the backend's default held to the reservation (never more than
    /// admission reserved: settlement cannot undershoot).
    fn anthropic(&mut self, model: &str, default: Option<u64>) -> Result<Vec<u8>, Refused> {
        let reserved = self.output_reservation;
        let default_max_tokens = default.map_or(reserved, |d| d.min(reserved));
        translate::anthropic::request_out(
            self.canonical()?,
            model,
            translate::anthropic::Out { default_max_tokens },
        )
    }

    /// The request as a Bedrock Converse body for `model` (which goes in the URL); the
    /// fields Bedrock cannot carry join `ignored`.
    fn bedrock(&mut self, model: &str) -> Result<Vec<u8>, Refused> {
        let out = translate::bedrock::Out {
            max_tokens: self.output_reservation,
            family: translate::bedrock::Family::of(model),
        };
        let req = self.canonical()?;
        let body = translate::bedrock::request_out(req, out)?;
        let dropped = translate::bedrock::dropped(req, out);
        self.also_ignored(dropped);
        Ok(body)
    }

    /// The request as a Gemini generateContent body (the model is in the URL).
    fn gemini(&mut self, model: &str) -> Result<Vec<u8>, Refused> {
        let out = translate::gemini::Out {
            max_tokens: Some(self.output_reservation),
            thinking: translate::gemini::ThinkingStyle::for_model(model),
        };
        let req = self.canonical()?;
        let body = translate::gemini::request_out(req, out)?;
        let dropped = translate::gemini::ignored(req);
        self.also_ignored(dropped);
        Ok(body)
    }

    /// Fields a translator dropped beside the ones the client's reader named.
    fn also_ignored(&mut self, dropped: Vec<&'static str>) {
        if let Some(Ok(r)) = &mut self.canonical {
            for d in dropped {
                if !r.ignored.contains(&d) {
                    r.ignored.push(d);
                }
            }
        }
    }

    /// The request as an OpenAI chat body for `model`.
    fn openai_chat(&mut self, model: &str, field: MaxTokensField) -> Result<Vec<u8>, Refused> {
        let out = translate::openai_chat::Out {
            max_tokens_field: field,
        };
        translate::openai_chat::request_out(self.canonical()?, model, out)
    }
}

/// Send one attempt and wait for the response headers, at most `timeout`. A backend whose
/// API is not the client's gets the request translated (`translate`); one that speaks it gets
/// the client's bytes with the model spliced.
pub async fn attempt(
    client: &HttpClient,
    backend: &Backend,
    out: &mut Outbound<'_, '_>,
    timeout: Duration,
) -> Result<Response<UpstreamBody>, Failure> {
    let req = out.api;
    let model = backend.upstream_model.as_deref().unwrap_or(&req.model);
    let dialect = req.endpoint.dialect();
    let trace = out.trace.take();
    match &backend.provider {
        Provider::Mock(settings) if dialect == Dialect::OpenAiChat => {
            match tokio::time::timeout(timeout, mock::respond(settings, req, model)).await {
                Ok(resp) => Ok(resp),
                Err(_) => Err(Failure::Timeout),
            }
        }
        Provider::Mock(settings) => {
            // The mock speaks OpenAI chat: other dialects reach it translated.
            let body = out
                .openai_chat(model, MaxTokensField::MaxTokens)
                .map_err(Failure::Refused)?;
            let chat = ApiRequest::parse(Endpoint::Chat, &body).map_err(|e| {
                Failure::Refused(Refused::new(None, format!("the translated request: {e}")))
            })?;
            match tokio::time::timeout(timeout, mock::respond(settings, &chat, model)).await {
                Ok(resp) => Ok(resp),
                Err(_) => Err(Failure::Timeout),
            }
        }
        Provider::OpenAi(upstream)
            if dialect == Dialect::OpenAiChat
                || (dialect == Dialect::OpenAiResponses && upstream.responses) =>
        {
            let request = upstream.request(req.endpoint, req.upstream_body(model), req.stream);
            send(client, request, timeout, dialect, trace).await
        }
        Provider::OpenAi(upstream) => {
            let body = out
                .openai_chat(model, upstream.max_tokens_field)
                .map_err(Failure::Refused)?;
            let request = upstream.request(Endpoint::Chat, Bytes::from(body), req.stream);
            send(client, request, timeout, Dialect::OpenAiChat, trace).await
        }
        Provider::Anthropic(upstream) if dialect == Dialect::Anthropic => {
            let request = upstream.pass_through(
                req.endpoint == Endpoint::CountTokens,
                req.upstream_body(model),
                req.stream,
                &out.anthropic_headers,
            );
            send(client, request, timeout, Dialect::Anthropic, trace).await
        }
        Provider::Azure(upstream) => {
            let started = std::time::Instant::now();
            let pass = dialect == Dialect::OpenAiChat
                || (dialect == Dialect::OpenAiResponses && upstream.responses);
            let request = if pass {
                upstream.request(req.endpoint, req.upstream_body(model), req.stream)
            } else {
                let body = out
                    .openai_chat(model, MaxTokensField::MaxCompletionTokens)
                    .map_err(Failure::Refused)?;
                upstream.request(Endpoint::Chat, Bytes::from(body), req.stream)
            };
            let resp = send(client, request, timeout, dialect_if(pass, dialect), trace).await?;
            if resp.status() != StatusCode::BAD_REQUEST {
                return Ok(resp);
            }
            let left = timeout.saturating_sub(started.elapsed());
            bad_request(resp, left, |body| {
                azure::content_filter_error(body).map_or(Look::Keep, Look::Rewrite)
            })
            .await
        }
        Provider::Bedrock(upstream) => {
            let body = out.bedrock(model).map_err(Failure::Refused)?;
            let started = std::time::Instant::now();
            let request = upstream
                .request(client, model, Bytes::from(body), req.stream, timeout)
                .await?;
            let left = timeout.saturating_sub(started.elapsed());
            send(client, request, left, Dialect::Bedrock, trace).await
        }
        Provider::Gemini(upstream) => {
            let started = std::time::Instant::now();
            let body = out.gemini(model).map_err(Failure::Refused)?;
            let request = upstream
                .request(model, Bytes::from(body), req.stream)
                .map_err(Failure::Connect)?;
            let resp = send(client, request, timeout, Dialect::Gemini, trace).await?;
            if resp.status() != StatusCode::BAD_REQUEST {
                return Ok(resp);
            }
            // Gemini says a bad API key with a 400: the gateway's credential, not the
            // client's request.
            let left = timeout.saturating_sub(started.elapsed());
            bad_request(resp, left, |body| {
                match translate::gemini::error_in(400, body).kind {
                    canonical::ErrorKind::Authentication => {
                        Look::CredentialsRefused("API_KEY_INVALID")
                    }
                    _ => Look::Keep,
                }
            })
            .await
        }
        Provider::Vertex(upstream) => {
            let body = match upstream.publisher {
                modelgate_wire::VertexPublisher::Anthropic => {
                    let anthropic = if dialect == Dialect::Anthropic {
                        req.body().to_vec()
                    } else {
                        out.anthropic(model, None).map_err(Failure::Refused)?
                    };
                    vertex::anthropic_body(&anthropic)
                        .map_err(|e| Failure::Refused(Refused::new(None, e)))?
                }
                _ => out.gemini(model).map_err(Failure::Refused)?,
            };
            let started = std::time::Instant::now();
            let request = upstream
                .request(client, model, Bytes::from(body), req.stream, timeout)
                .await?;
            let left = timeout.saturating_sub(started.elapsed());
            send(client, request, left, upstream_dialect(upstream), trace).await
        }
        Provider::Anthropic(upstream) => {
            let body = out
                .anthropic(model, upstream.default_max_tokens)
                .map_err(Failure::Refused)?;
            send(
                client,
                upstream.request(Bytes::from(body), req.stream),
                timeout,
                Dialect::Anthropic,
                trace,
            )
            .await
        }
    }
}

/// The API a request to an OpenAI-shaped backend was sent in: the client's on
/// pass-through, else chat.
fn dialect_if(pass: bool, client: Dialect) -> Dialect {
    if pass { client } else { Dialect::OpenAiChat }
}

fn upstream_dialect(v: &vertex::Upstream) -> Dialect {
    match v.publisher {
        modelgate_wire::VertexPublisher::Anthropic => Dialect::Anthropic,
        _ => Dialect::Gemini,
    }
}

/// What a 400's body turns out to be.
enum Look {
    /// Passed on as it came.
    Keep,
    /// Passed on in these words.
    Rewrite(Vec<u8>),
    /// The backend refused the gateway's credential (named so).
    CredentialsRefused(&'static str),
}

/// A 400 to pass on, read when its announced length fits [`azure::MAX_ERROR_BODY`]: `look`
/// may rewrite it (Azure's content-filter error in OpenAI's words) or turn it into a failure
/// (Gemini's bad API key); any other body, or one of unannounced length, goes on as it came.
async fn bad_request(
    resp: Response<UpstreamBody>,
    left: Duration,
    look: impl FnOnce(&Bytes) -> Look,
) -> Result<Response<UpstreamBody>, Failure> {
    use http_body_util::{BodyExt, Limited};
    use hyper::body::Body;
    // The length hyper read from Content-Length (`UpstreamBody` does not pass it on).
    let fits = match resp.body() {
        UpstreamBody::Http(b) => b
            .size_hint()
            .upper()
            .is_some_and(|n| n <= azure::MAX_ERROR_BODY as u64),
        UpstreamBody::Mock(_) => false,
    };
    if !fits {
        return Ok(resp);
    }
    let (mut parts, body) = resp.into_parts();
    let read = Limited::new(body, azure::MAX_ERROR_BODY).collect();
    let bytes = match tokio::time::timeout(left, read).await {
        Err(_) => return Err(Failure::Timeout),
        Ok(Err(e)) => return Err(Failure::Connect(describe(&*e))),
        Ok(Ok(b)) => b.to_bytes(),
    };
    let rewritten = match look(&bytes) {
        Look::Keep => None,
        Look::Rewrite(b) => Some(b),
        Look::CredentialsRefused(name) => {
            return Err(Failure::CredentialsRefused(
                parts.status,
                Some(name.to_owned()),
            ));
        }
    };
    let bytes = match rewritten {
        Some(rewritten) => {
            parts.headers.remove(header::CONTENT_LENGTH);
            parts.headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            Bytes::from(rewritten)
        }
        None => bytes,
    };
    Ok(Response::from_parts(
        parts,
        UpstreamBody::Mock(crate::stream::MockStream::new(vec![bytes], Duration::ZERO)),
    ))
}

fn status_is_5xx(f: &Failure) -> bool {
    matches!(f, Failure::Status { status, .. } if status.is_server_error())
}

/// The longest the gateway waits for a 429/5xx body it classifies.
const ERROR_BODY_WAIT: Duration = Duration::from_secs(2);

/// Largest error body read to classify a 429 or 5xx; never logged or passed on.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// What a 429/5xx body says, in the backend's dialect: only the kinds that change the
/// handling (quota exhausted, overloaded) are kept.
async fn error_kind(
    resp: Response<hyper::body::Incoming>,
    dialect: Dialect,
    within: Duration,
) -> Option<canonical::ErrorKind> {
    let status = resp.status();
    let (parts, body) = resp.into_parts();
    use http_body_util::{BodyExt, Limited};
    let read = Limited::new(body, MAX_ERROR_BODY).collect();
    let bytes = tokio::time::timeout(within, read)
        .await
        .ok()?
        .ok()?
        .to_bytes();
    let err = translate::error_in(dialect, status.as_u16(), &parts.headers, &bytes);
    matches!(
        err.kind,
        canonical::ErrorKind::QuotaExhausted | canonical::ErrorKind::Overloaded
    )
    .then_some(err.kind)
}

/// Send a request to an upstream and classify its status; a 429/5xx body is read (at most
/// 64 KiB, briefly) for what it says.
async fn send(
    client: &HttpClient,
    mut request: http::Request<Full<Bytes>>,
    timeout: Duration,
    dialect: Dialect,
    trace: Option<crate::traces::TraceHeaders>,
) -> Result<Response<UpstreamBody>, Failure> {
    if let Some(t) = trace {
        // Added after any signing (SigV4 signs the headers it names, not these).
        t.apply(request.headers_mut());
    }
    let started = std::time::Instant::now();
    let resp = match tokio::time::timeout(timeout, client.request(request)).await {
        Err(_) => return Err(Failure::Timeout),
        Ok(Err(e)) => return Err(Failure::Connect(describe(&e))),
        Ok(Ok(resp)) => resp,
    };
    let status = resp.status();
    if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
        // The body is dropped here: it may echo (part of) the provider key.
        return Err(Failure::CredentialsRefused(
            status,
            aws_error_name(resp.headers()),
        ));
    }
    if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        let retry_after = resp.headers().get(header::RETRY_AFTER).cloned();
        let left = timeout.saturating_sub(started.elapsed());
        let kind = error_kind(resp, dialect, left.min(ERROR_BODY_WAIT)).await;
        return Err(Failure::Status {
            status,
            retry_after,
            kind,
        });
    }
    Ok(resp.map(UpstreamBody::Http))
}

/// The name AWS gives an error in `x-amzn-ErrorType` (`ExpiredTokenException:http://...`):
/// letters and digits only, so nothing else of the answer reaches the client.
fn aws_error_name(headers: &http::HeaderMap) -> Option<String> {
    let v = headers.get("x-amzn-errortype")?.to_str().ok()?;
    let name = v.split(':').next()?.trim();
    (!name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric()))
        .then(|| name.to_owned())
}

/// The error chain as one line (hyper's top-level message alone says little).
pub(crate) fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

/// Longest `Retry-After` taken at its word; anything longer reads as this (no route waits
/// that long anyway, and it keeps the arithmetic far from overflow).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(86_400);

/// A `Retry-After` value (RFC 9110 §10.2.3) as a wait from `now`: delay-seconds (a fraction is
/// tolerated) or an HTTP-date in any of its three formats; a date in the past is no wait.
/// `None` for anything else.
pub fn retry_after(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let v = value.to_str().ok()?.trim();
    let wait = if v.bytes().next()?.is_ascii_digit() {
        let (whole, frac) = v.split_once('.').unwrap_or((v, ""));
        if !whole.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        // Beyond 19 digits a number only says "very long".
        let secs = whole.parse::<u64>().unwrap_or(u64::MAX);
        let nanos = format!("{:0<9}", &frac[..frac.len().min(9)])
            .parse::<u32>()
            .unwrap_or(0);
        Duration::new(secs.min(MAX_RETRY_AFTER.as_secs()), nanos)
    } else {
        let at = UNIX_EPOCH + Duration::from_secs(http_date(v)?);
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// Seconds since the Unix epoch of an HTTP-date: IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`),
/// or the obsolete RFC 850 (`Sunday, 06-Nov-94 08:49:37 GMT`) and asctime
/// (`Sun Nov  6 08:49:37 1994`) forms recipients must still accept.
fn http_date(s: &str) -> Option<u64> {
    let words: Vec<&str> = s.split_ascii_whitespace().collect();
    let (day, month, year, time) = match words.as_slice() {
        [wd, d, m, y, t, "GMT"] if wd.ends_with(',') => (*d, *m, y.parse::<u64>().ok()?, *t),
        [wd, dmy, t, "GMT"] if wd.ends_with(',') => {
            let mut parts = dmy.split('-');
            let (d, m, y) = (parts.next()?, parts.next()?, parts.next()?);
            if parts.next().is_some() || y.len() != 2 {
                return None;
            }
            // Two-digit years: RFC 9110 reads a year more than 50 years ahead as the past.
            let y = y.parse::<u64>().ok()?;
            (d, m, if y >= 70 { 1900 + y } else { 2000 + y }, *t)
        }
        [_, m, d, t, y] => (*d, *m, y.parse::<u64>().ok()?, *t),
        _ => return None,
    };
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS.iter().position(|m| *m == month)? as u64 + 1;
    let day = day.parse::<u64>().ok().filter(|d| (1..=31).contains(d))?;
    let mut hms = time.split(':').map(|p| p.parse::<u64>().ok());
    let (h, m, sec) = (hms.next()??, hms.next()??, hms.next()??);
    if hms.next().is_some() || h > 23 || m > 59 || sec > 60 || !(1970..=9999).contains(&year) {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm), with years from 1970 only.
    let (y, mo) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * mo + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = (era * 146_097 + doe).checked_sub(719_468)?;
    Some(days * 86_400 + h * 3600 + m * 60 + sec)
}

#[cfg(test)]
mod retry_after_tests {
    use super::*;

    fn wait(v: &str, now_secs: u64) -> Option<Duration> {
        retry_after(
            &HeaderValue::from_str(v).unwrap(),
            UNIX_EPOCH + Duration::from_secs(now_secs),
        )
    }

    /// 1994-11-06 08:49:37 UTC, RFC 9110's example date.
    const EXAMPLE: u64 = 784_111_777;

    #[test]
    fn delay_seconds() {
        assert_eq!(wait("0", 0), Some(Duration::ZERO));
        assert_eq!(wait("7", 0), Some(Duration::from_secs(7)));
        assert_eq!(wait(" 120 ", 0), Some(Duration::from_secs(120)));
        assert_eq!(wait("1.5", 0), Some(Duration::from_millis(1500)));
        // Absurd values are capped, never overflow.
        assert_eq!(wait("99999999999999999999999", 0), Some(MAX_RETRY_AFTER));
        assert_eq!(wait("604800", 0), Some(MAX_RETRY_AFTER));
        for bad in ["", "-1", "1s", "1e3", "soon", "1,5", "0x10", "1.5.0"] {
            assert_eq!(wait(bad, 0), None, "{bad:?}");
        }
    }

    #[test]
    fn http_dates_in_all_three_formats() {
        assert_eq!(http_date("Sun, 06 Nov 1994 08:49:37 GMT"), Some(EXAMPLE));
        assert_eq!(http_date("Sunday, 06-Nov-94 08:49:37 GMT"), Some(EXAMPLE));
        assert_eq!(http_date("Sun Nov  6 08:49:37 1994"), Some(EXAMPLE));
        assert_eq!(http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(
            http_date("Tue, 29 Feb 2028 12:00:00 GMT"),
            Some(1_835_438_400)
        );
        for bad in [
            "Sun, 06 Nov 1994 08:49:37 UTC",
            "Sun, 06 Foo 1994 08:49:37 GMT",
            "Sun, 32 Nov 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 24:00:00 GMT",
            "Sun, 06 Nov 1994 08:49 GMT",
            "Sun, 06 Nov 1969 08:49:37 GMT",
            "2026-01-01T00:00:00Z",
        ] {
            assert_eq!(http_date(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_date_is_a_wait_from_now() {
        let date = "Sun, 06 Nov 1994 08:49:37 GMT";
        assert_eq!(wait(date, EXAMPLE - 30), Some(Duration::from_secs(30)));
        assert_eq!(
            wait(date, EXAMPLE + 30),
            Some(Duration::ZERO),
            "past: no wait"
        );
        assert_eq!(
            wait("Fri, 31 Dec 9999 23:59:59 GMT", 0),
            Some(MAX_RETRY_AFTER)
        );
    }

    #[test]
    fn only_429_and_503_carry_a_wait() {
        let failure = |status: u16| Failure::Status {
            status: StatusCode::from_u16(status).unwrap(),
            retry_after: Some(HeaderValue::from_static("3")),
            kind: None,
        };
        let now = SystemTime::now();
        assert_eq!(failure(429).retry_after(now), Some(Duration::from_secs(3)));
        assert_eq!(failure(503).retry_after(now), Some(Duration::from_secs(3)));
        assert_eq!(failure(500).retry_after(now), None);
        assert_eq!(Failure::Timeout.retry_after(now), None);
    }
}
