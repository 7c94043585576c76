//! Anthropic's Messages API: `POST {base}/messages` with `x-api-key`, `anthropic-version` and
//! the backend's `anthropic-beta` flags. The body is written by `translate::anthropic` from the
//! canonical request; this module only says where it goes and with which headers.

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Uri};
use http_body_util::Full;
use modelgate_wire::{ANTHROPIC_DEFAULT_VERSION, AnthropicSpec};

use crate::routes::Credential;

static VERSION: HeaderName = HeaderName::from_static("anthropic-version");
static BETA: HeaderName = HeaderName::from_static("anthropic-beta");
static API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// The Anthropic headers an Anthropic client sent, forwarded unchanged on pass-through.
#[derive(Debug, Clone, Default)]
pub struct ClientHeaders {
    pub version: Option<HeaderValue>,
    pub beta: Option<HeaderValue>,
}

impl ClientHeaders {
    pub fn of(headers: &http::HeaderMap) -> Self {
        Self {
            version: headers.get(&VERSION).cloned(),
            beta: headers.get(&BETA).cloned(),
        }
    }
}

#[derive(Debug)]
pub struct Upstream {
    messages: Uri,
    count_tokens: Uri,
    credential: Option<Credential>,
    version: HeaderValue,
    beta: Option<HeaderValue>,
    /// `max_tokens` for requests that set none; `None`: the proxy's default reservation.
    pub default_max_tokens: Option<u64>,
}

impl Upstream {
    pub fn new(
        base: &str,
        credential: Option<Credential>,
        spec: &AnthropicSpec,
    ) -> Result<Self, String> {
        modelgate_wire::check::check_url(base)?;
        let base = base.trim_end_matches('/');
        let uri = |path: &str| -> Result<Uri, String> {
            format!("{base}{path}")
                .parse()
                .map_err(|e| format!("invalid URL {base:?}: {e}"))
        };
        let (messages, count_tokens) = (uri("/messages")?, uri("/messages/count_tokens")?);
        let version = spec.version.as_deref().unwrap_or(ANTHROPIC_DEFAULT_VERSION);
        let version = HeaderValue::from_str(version)
            .map_err(|_| format!("anthropic.version {version:?} cannot be a header value"))?;
        let beta = if spec.beta.is_empty() {
            None
        } else {
            let joined = spec.beta.join(",");
            Some(
                HeaderValue::from_str(&joined)
                    .map_err(|_| format!("anthropic.beta {joined:?} cannot be a header value"))?,
            )
        };
        Ok(Self {
            messages,
            count_tokens,
            credential,
            version,
            beta,
            default_max_tokens: spec.default_max_tokens,
        })
    }

    /// A Messages request with `body` (already in Anthropic's format).
    pub fn request(&self, body: Bytes, stream: bool) -> Request<Full<Bytes>> {
        self.request_to(&self.messages, body, stream, &ClientHeaders::default())
    }

    /// An Anthropic client's own request, passed through: to `/messages` or
    /// `/messages/count_tokens`, with the client's `anthropic-version` and `anthropic-beta`
    /// in place of the backend's when it sent them.
    pub fn pass_through(
        &self,
        count_tokens: bool,
        body: Bytes,
        stream: bool,
        client: &ClientHeaders,
    ) -> Request<Full<Bytes>> {
        let uri = if count_tokens {
            &self.count_tokens
        } else {
            &self.messages
        };
        self.request_to(uri, body, stream, client)
    }

    fn request_to(
        &self,
        uri: &Uri,
        body: Bytes,
        stream: bool,
        client: &ClientHeaders,
    ) -> Request<Full<Bytes>> {
        let mut req = super::json_post(uri, body, stream);
        let h = req.headers_mut();
        h.insert(
            VERSION.clone(),
            client.version.as_ref().unwrap_or(&self.version).clone(),
        );
        if let Some(b) = client.beta.as_ref().or(self.beta.as_ref()) {
            h.insert(BETA.clone(), b.clone());
        }
        if let Some(c) = &self.credential {
            h.insert(API_KEY.clone(), c.raw().clone());
        }
        req
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_carries_the_key_version_and_flags_and_never_a_bearer() {
        let spec = AnthropicSpec {
            version: None,
            beta: vec!["a-1".into(), "b-2".into()],
            default_max_tokens: None,
        };
        let up = Upstream::new(
            "http://127.0.0.1:9/v1/",
            Credential::bearer("sk-ant-1"),
            &spec,
        )
        .unwrap();
        let req = up.request(Bytes::from_static(b"{}"), true);
        assert_eq!(req.uri(), "http://127.0.0.1:9/v1/messages");
        let h = req.headers();
        assert_eq!(h["x-api-key"], "sk-ant-1");
        assert!(h["x-api-key"].is_sensitive());
        assert_eq!(h["anthropic-version"], "2023-06-01");
        assert_eq!(h["anthropic-beta"], "a-1,b-2");
        assert_eq!(h["accept"], "text/event-stream");
        assert!(h.get("authorization").is_none());
    }
}
