//! Providers: how one attempt reaches a model.
//!
//! `attempt` sends one request to one backend and classifies the outcome: a response to pass
//! on (success, or a client error the upstream explains best), or a [`Failure`] that may be
//! retried. OpenAI and OpenAI-compatible servers share the `openai` wire module; the `mock`
//! module answers in-process. A provider that needs translation (Anthropic, Azure) adds a
//! module and a `Provider` variant; the request path does not change.

pub mod mock;
pub mod openai;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::egress::{GuardedResolver, UpstreamPolicy};
use crate::error::ProxyError;
use crate::metrics::UpstreamErrorKind;
use crate::request::ApiRequest;
use crate::routes::{Backend, Provider, RetryOn};
use crate::stream::UpstreamBody;

pub type HttpClient = Client<HttpsConnector<HttpConnector<GuardedResolver>>, Full<Bytes>>;

/// One pooled client for every upstream: keep-alive, TCP_NODELAY, HTTP/2 where TLS
/// negotiates it, rustls with the ring provider and the Mozilla root set. With an egress
/// policy, names are resolved only to addresses it admits.
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
        .build(https)
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
}

impl Failure {
    pub fn retry_on(&self) -> RetryOn {
        match self {
            Self::Connect(_) => RetryOn::Connect,
            Self::Timeout => RetryOn::Timeout,
            Self::Status { status, .. } if *status == StatusCode::TOO_MANY_REQUESTS => {
                RetryOn::RateLimited
            }
            Self::Status { .. } | Self::CredentialsRefused(_) => RetryOn::ServerError,
        }
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
        }
    }
}

/// Send one attempt and wait for the response headers, at most `timeout`.
pub async fn attempt(
    client: &HttpClient,
    backend: &Backend,
    req: &ApiRequest<'_>,
    timeout: Duration,
) -> Result<Response<UpstreamBody>, Failure> {
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
    }
}

/// The error chain as one line (hyper's top-level message alone says little).
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}
