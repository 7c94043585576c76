//! Providers: how one attempt reaches a model.
//!
//! `attempt` sends one request to one backend and classifies the outcome: a response to pass
//! on (success, or a client error the upstream explains best), or a [`Failure`] that may be
//! retried. OpenAI and OpenAI-compatible servers share the `openai` wire module; the `mock`
//! module answers in-process. A provider that needs translation (Anthropic) or other URLs and
//! headers (Azure) adds a module and a `Provider` variant; the request path does not change.

pub mod anthropic;
pub mod azure;
pub mod mock;
pub mod openai;

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
use crate::translate::{self, Refused};

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

/// A failed attempt that the retry policy may retry.
#[derive(Debug)]
pub enum Failure {
    Connect(String),
    Timeout,
    Status {
        status: StatusCode,
        retry_after: Option<HeaderValue>,
    },
    /// 401/403: the backend refused the gateway's credentials. Another backend may still
    /// answer (it is a backend failure, not the client's), so it falls over like a 5xx.
    CredentialsRefused(StatusCode),
    /// The request asks for what this backend's API cannot express: the client's to fix,
    /// never retried.
    Refused(Refused),
}

impl Failure {
    pub fn retry_on(&self) -> RetryOn {
        match self {
            Self::Connect(_) => RetryOn::Connect,
            Self::Timeout => RetryOn::Timeout,
            Self::Status { status, .. } if *status == StatusCode::TOO_MANY_REQUESTS => {
                RetryOn::RateLimited
            }
            Self::Status { .. } | Self::CredentialsRefused(_) | Self::Refused(_) => {
                RetryOn::ServerError
            }
        }
    }

    /// Whether the route's retry policy may try again (or fall through) after this.
    pub fn retryable(&self, on: &[RetryOn]) -> bool {
        !matches!(self, Self::Refused(_)) && on.contains(&self.retry_on())
    }

    pub fn metric_kind(&self) -> UpstreamErrorKind {
        if let Self::CredentialsRefused(_) = self {
            return UpstreamErrorKind::CredentialsRefused;
        }
        match self.retry_on() {
            RetryOn::Connect => UpstreamErrorKind::Connect,
            RetryOn::Timeout => UpstreamErrorKind::Timeout,
            RetryOn::RateLimited => UpstreamErrorKind::RateLimited,
            RetryOn::ServerError => UpstreamErrorKind::ServerError,
        }
    }

    /// How long the upstream asked the gateway to wait (`Retry-After` on a 429 or 503), as
    /// of `now`.
    pub fn retry_after(&self, now: SystemTime) -> Option<Duration> {
        match self {
            Self::Status {
                status,
                retry_after: Some(v),
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
            Self::Connect(msg) => ProxyError::UpstreamConnect(msg),
            Self::Timeout => ProxyError::UpstreamTimeout,
            Self::Status {
                status,
                retry_after,
            } if status == StatusCode::TOO_MANY_REQUESTS => {
                ProxyError::UpstreamRateLimited { retry_after }
            }
            Self::Status { status, .. } => ProxyError::UpstreamStatus(status),
            Self::CredentialsRefused(status) => ProxyError::UpstreamCredentials(status),
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
    canonical: Option<Result<canonical::Request, Refused>>,
}

impl<'r, 'a> Outbound<'r, 'a> {
    pub fn new(api: &'r ApiRequest<'a>, output_reservation: u64) -> Self {
        Self {
            api,
            output_reservation,
            canonical: None,
        }
    }

    /// The canonical request, read from the body the first time it is asked for.
    fn canonical(&mut self) -> Result<&canonical::Request, Refused> {
        let api = self.api;
        let parsed = self.canonical.get_or_insert_with(|| {
            if api.endpoint != Endpoint::Chat {
                return Err(Refused::new(
                    None,
                    format!(
                        "this model's backend speaks Anthropic's Messages API, which has no {} endpoint; use /v1/chat/completions",
                        api.endpoint.upstream_path()
                    ),
                ));
            }
            translate::openai_chat::request_in(api.body())
        });
        parsed.as_ref().map_err(Clone::clone)
    }
}

/// Send one attempt and wait for the response headers, at most `timeout`.
pub async fn attempt(
    client: &HttpClient,
    backend: &Backend,
    out: &mut Outbound<'_, '_>,
    timeout: Duration,
) -> Result<Response<UpstreamBody>, Failure> {
    let req = out.api;
    let model = backend.upstream_model.as_deref().unwrap_or(&req.model);
    match &backend.provider {
        Provider::Mock(settings) => {
            match tokio::time::timeout(timeout, mock::respond(settings, req, model)).await {
                Ok(resp) => Ok(resp),
                Err(_) => Err(Failure::Timeout),
            }
        }
        Provider::OpenAi(upstream) => {
            let request = upstream.request(req.endpoint, req.upstream_body(model), req.stream);
            send(client, request, timeout).await
        }
        Provider::Azure(upstream) => {
            let started = std::time::Instant::now();
            let request = upstream.request(req.endpoint, req.upstream_body(model), req.stream);
            let resp = send(client, request, timeout).await?;
            if resp.status() != StatusCode::BAD_REQUEST {
                return Ok(resp);
            }
            azure_bad_request(resp, timeout.saturating_sub(started.elapsed())).await
        }
        Provider::Anthropic(upstream) => {
            // Never more than admission reserved: settlement cannot undershoot.
            let reserved = out.output_reservation;
            let default_max_tokens = upstream
                .default_max_tokens
                .map_or(reserved, |d| d.min(reserved));
            let body = translate::anthropic::request_out(
                out.canonical().map_err(Failure::Refused)?,
                model,
                translate::anthropic::Out { default_max_tokens },
            )
            .map_err(Failure::Refused)?;
            send(
                client,
                upstream.request(Bytes::from(body), req.stream),
                timeout,
            )
            .await
        }
    }
}

/// An Azure 400 to pass on: its body is read when its announced length fits
/// [`azure::MAX_ERROR_BODY`], and a content-filter error is rewritten in OpenAI's words;
/// any other body, or one of unannounced length, goes on as it came.
async fn azure_bad_request(
    resp: Response<UpstreamBody>,
    left: Duration,
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
    let bytes = match azure::content_filter_error(&bytes) {
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

/// Send a request to an upstream and classify its status.
async fn send(
    client: &HttpClient,
    request: http::Request<Full<Bytes>>,
    timeout: Duration,
) -> Result<Response<UpstreamBody>, Failure> {
    let resp = match tokio::time::timeout(timeout, client.request(request)).await {
        Err(_) => return Err(Failure::Timeout),
        Ok(Err(e)) => return Err(Failure::Connect(describe(&e))),
        Ok(Ok(resp)) => resp,
    };
    let status = resp.status();
    if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
        // The body is dropped here: it may echo (part of) the provider key.
        return Err(Failure::CredentialsRefused(status));
    }
    if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        return Err(Failure::Status {
            status,
            retry_after: resp.headers().get(header::RETRY_AFTER).cloned(),
        });
    }
    Ok(resp.map(UpstreamBody::Http))
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
        };
        let now = SystemTime::now();
        assert_eq!(failure(429).retry_after(now), Some(Duration::from_secs(3)));
        assert_eq!(failure(503).retry_after(now), Some(Duration::from_secs(3)));
        assert_eq!(failure(500).retry_after(now), None);
        assert_eq!(Failure::Timeout.retry_after(now), None);
    }
}
