//! One error type for the request path and the one place it becomes a response.
//!
//! Every variant says whose fault it is (client, gateway, upstream) through its status, and
//! `into_response` matches every variant with no catch-all arm, so a new variant forces a
//! decision. Bodies are OpenAI-shaped: `{"error":{"message","type","param","code"}}`.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::admission::{LimitKind, Rejection, SpendGuard};
use crate::stream::ProxyBody;
use crate::translate::Dialect;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("{0}")]
    BadRequest(String),
    /// A field of the body has a value the gateway refuses; `param` names it, as OpenAI does.
    #[error("{message}")]
    InvalidParam {
        param: &'static str,
        message: String,
    },
    #[error(
        "unknown path {0}; this gateway serves /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/messages, /v1/messages/count_tokens and /v1/models"
    )]
    UnknownPath(String),
    #[error("method {0} is not allowed here")]
    MethodNotAllowed(String),
    #[error("request body is larger than the limit of {0} bytes")]
    PayloadTooLarge(u64),
    #[error(
        "missing API key; send it as 'Authorization: Bearer <key>', 'x-api-key: <key>' or 'api-key: <key>'"
    )]
    MissingKey,
    #[error("invalid API key")]
    InvalidKey,
    #[error("this API key is disabled")]
    KeyDisabled,
    #[error("this API key has expired")]
    KeyExpired,
    #[error("the model {0:?} is not allowed for this API key")]
    ModelNotAllowed(String),
    #[error("the model {0:?} does not exist")]
    UnknownModel(String),
    #[error("{}", .0.message)]
    Limited(Rejection),
    /// A spend guard (`maxCostPerRequest` of the route or the key) refused the request up
    /// front: its worst case costs more.
    #[error(
        "this request could cost up to ${cost:.6} ({detail}), above {owner} maxCostPerRequest of ${limit}; ask for fewer output tokens (max_tokens) or send a shorter prompt",
        owner = .guard.owner()
    )]
    AboveSpendGuard {
        guard: SpendGuard,
        limit: f64,
        cost: f64,
        detail: String,
    },
    /// A `block` masking rule of the route matched the prompt; named, never the text.
    #[error(
        "the prompt was refused by masking rule {0:?} of this model's route; remove what the rule protects and send it again"
    )]
    MaskingBlocked(String),
    #[error("this API key's budget is used up across the gateway")]
    BudgetExhausted,
    #[error("the gateway has no configuration yet")]
    NotReady,
    #[error("{0}")]
    Internal(String),
    #[error("could not reach the upstream: {0}")]
    UpstreamConnect(String),
    #[error("the upstream did not answer in time")]
    UpstreamTimeout,
    #[error("the upstream is rate limiting requests")]
    UpstreamRateLimited { retry_after: Option<HeaderValue> },
    #[error("the upstream returned an error (status {0})")]
    UpstreamStatus(StatusCode),
    #[error("the upstream sent a response the gateway cannot read: {0}")]
    UpstreamProtocol(String),
    /// The provider's own answer (which may echo a masked provider key) is never passed on;
    /// only the error's name where the provider gives one apart from the body (AWS's
    /// `x-amzn-ErrorType`, e.g. `ExpiredTokenException`).
    #[error(
        "the backend refused the gateway's credentials (status {0}{detail}); the gateway's administrator must fix the backend's credentials",
        detail = .1.as_deref().map(|d| format!(", {d}")).unwrap_or_default()
    )]
    UpstreamCredentials(StatusCode, Option<String>),
}

impl ProxyError {
    /// A short stable word for logs and the `code` field.
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "invalid_request",
            Self::InvalidParam { .. } => "invalid_value",
            Self::UnknownPath(_) => "unknown_url",
            Self::MethodNotAllowed(_) => "method_not_allowed",
            Self::PayloadTooLarge(_) => "request_too_large",
            Self::MissingKey => "missing_api_key",
            Self::InvalidKey => "invalid_api_key",
            Self::KeyDisabled => "api_key_disabled",
            Self::KeyExpired => "api_key_expired",
            Self::ModelNotAllowed(_) => "model_not_allowed",
            Self::UnknownModel(_) => "model_not_found",
            Self::Limited(r) => match r.kind {
                LimitKind::Budget => "budget_exceeded",
                LimitKind::Requests | LimitKind::Tokens | LimitKind::Concurrency => {
                    "rate_limit_exceeded"
                }
            },
            Self::BudgetExhausted => "budget_exceeded",
            Self::AboveSpendGuard { .. } => "max_cost_per_request_exceeded",
            Self::MaskingBlocked(_) => "masking_blocked",
            Self::NotReady => "not_ready",
            Self::Internal(_) => "internal_error",
            Self::UpstreamConnect(_) => "upstream_unavailable",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::UpstreamRateLimited { .. } => "upstream_rate_limited",
            Self::UpstreamStatus(_) => "upstream_error",
            Self::UpstreamProtocol(_) => "upstream_protocol_error",
            Self::UpstreamCredentials(..) => "upstream_credentials_refused",
        }
    }

    /// The response in the client's dialect: OpenAI's error shape, or Anthropic's with the
    /// request id (docs/providers.md 6.1).
    pub fn into_response_for(self, dialect: Dialect, request_id: &str) -> Response<ProxyBody> {
        match dialect {
            Dialect::Anthropic => self.into_anthropic_response(request_id),
            // Responses errors are OpenAI's envelope; no client speaks the others.
            Dialect::OpenAiChat | Dialect::OpenAiResponses | Dialect::Bedrock | Dialect::Gemini => {
                self.into_response()
            }
        }
    }

    fn into_anthropic_response(self, request_id: &str) -> Response<ProxyBody> {
        let (mut status, _, retry_after) = self.parts();
        let kind = match &self {
            Self::BadRequest(_)
            | Self::InvalidParam { .. }
            | Self::MethodNotAllowed(_)
            | Self::AboveSpendGuard { .. }
            | Self::MaskingBlocked(_) => "invalid_request_error",
            Self::UnknownPath(_) | Self::UnknownModel(_) => "not_found_error",
            Self::PayloadTooLarge(_) => "request_too_large",
            Self::MissingKey | Self::InvalidKey => "authentication_error",
            Self::KeyDisabled | Self::KeyExpired | Self::ModelNotAllowed(_) => "permission_error",
            Self::Limited(_) | Self::BudgetExhausted | Self::UpstreamRateLimited { .. } => {
                "rate_limit_error"
            }
            Self::UpstreamTimeout => "timeout_error",
            // Anthropic's own overload, passed on as Anthropic's SDKs know it.
            Self::UpstreamStatus(s) if s.as_u16() == 529 => {
                status = *s;
                "overloaded_error"
            }
            Self::NotReady
            | Self::Internal(_)
            | Self::UpstreamConnect(_)
            | Self::UpstreamStatus(_)
            | Self::UpstreamProtocol(_)
            | Self::UpstreamCredentials(..) => "api_error",
        };
        let body = serde_json::json!({
            "type": "error",
            "error": {"type": kind, "message": self.to_string()},
            "request_id": request_id,
        });
        let mut resp = json_response(status, &body);
        if let Some(v) = retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        resp
    }

    /// Status, OpenAI error type and `Retry-After` of each variant.
    fn parts(&self) -> (StatusCode, &'static str, Option<HeaderValue>) {
        match self {
            Self::BadRequest(_)
            | Self::InvalidParam { .. }
            | Self::AboveSpendGuard { .. }
            | Self::MaskingBlocked(_) => (StatusCode::BAD_REQUEST, "invalid_request_error", None),
            Self::UnknownPath(_) => (StatusCode::NOT_FOUND, "invalid_request_error", None),
            Self::MethodNotAllowed(_) => (
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                None,
            ),
            Self::PayloadTooLarge(_) => {
                (StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", None)
            }
            Self::MissingKey | Self::InvalidKey => {
                (StatusCode::UNAUTHORIZED, "authentication_error", None)
            }
            Self::KeyDisabled | Self::KeyExpired | Self::ModelNotAllowed(_) => {
                (StatusCode::FORBIDDEN, "permission_error", None)
            }
            Self::UnknownModel(_) => (StatusCode::NOT_FOUND, "invalid_request_error", None),
            Self::Limited(r) => (
                StatusCode::TOO_MANY_REQUESTS,
                match r.kind {
                    LimitKind::Budget => "insufficient_quota",
                    LimitKind::Requests | LimitKind::Tokens | LimitKind::Concurrency => {
                        "rate_limit_error"
                    }
                },
                Some(retry_secs(r.retry_after)),
            ),
            Self::BudgetExhausted => (
                StatusCode::TOO_MANY_REQUESTS,
                "insufficient_quota",
                Some(HeaderValue::from_static("3600")),
            ),
            Self::NotReady => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some(HeaderValue::from_static("1")),
            ),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None),
            Self::UpstreamConnect(_) => (StatusCode::BAD_GATEWAY, "upstream_error", None),
            Self::UpstreamTimeout => (StatusCode::GATEWAY_TIMEOUT, "upstream_error", None),
            Self::UpstreamRateLimited { retry_after } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                Some(retry_after.clone().unwrap_or(HeaderValue::from_static("1"))),
            ),
            Self::UpstreamStatus(s) => (
                if *s == StatusCode::SERVICE_UNAVAILABLE {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::BAD_GATEWAY
                },
                "upstream_error",
                None,
            ),
            Self::UpstreamProtocol(_) => (StatusCode::BAD_GATEWAY, "upstream_error", None),
            Self::UpstreamCredentials(..) => (StatusCode::BAD_GATEWAY, "upstream_error", None),
        }
    }

    pub fn into_response(self) -> Response<ProxyBody> {
        let (status, kind, retry_after) = self.parts();
        let param = match &self {
            Self::InvalidParam { param, .. } => Some(*param),
            _ => None,
        };
        let body = serde_json::json!({
            "error": {"message": self.to_string(), "type": kind, "param": param, "code": self.code()}
        });
        let mut resp = json_response(status, &body);
        if let Some(v) = retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        resp
    }
}

fn retry_secs(d: Duration) -> HeaderValue {
    HeaderValue::from(d.as_secs().max(1))
}

pub fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<ProxyBody> {
    let bytes = Bytes::from(serde_json::to_vec(body).unwrap_or_default());
    let mut resp = Response::new(ProxyBody::full(bytes));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}
