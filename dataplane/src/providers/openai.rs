//! OpenAI's wire format, spoken by OpenAI itself and by vLLM, Ollama, llama.cpp server, TGI
//! and other OpenAI-compatible servers: the body passes through with the model rewritten,
//! and the credential goes into `Authorization: Bearer`.

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Uri, header};
use http_body_util::Full;

use crate::request::Endpoint;
use crate::routes::Credential;
use crate::translate::openai_chat::MaxTokensField;

#[derive(Debug)]
pub struct Upstream {
    /// Request URIs per endpoint, built once from the base URL.
    chat: Uri,
    completions: Uri,
    embeddings: Uri,
    credential: Option<Credential>,
    /// Where a translated request puts its output limit: OpenAI takes
    /// `max_completion_tokens`, many compatible servers know only `max_tokens`.
    pub max_tokens_field: MaxTokensField,
}

impl Upstream {
    pub fn new(base: &str, credential: Option<Credential>) -> Result<Self, String> {
        // The snapshot check applies the same rule; a caller that skipped it is told here.
        modelgate_wire::check::check_url(base)?;
        let base = base.trim_end_matches('/');
        let uri = |e: Endpoint| -> Result<Uri, String> {
            format!("{base}{}", e.upstream_path())
                .parse()
                .map_err(|e| format!("invalid URL {base:?}: {e}"))
        };
        Ok(Self {
            chat: uri(Endpoint::Chat)?,
            completions: uri(Endpoint::Completions)?,
            embeddings: uri(Endpoint::Embeddings)?,
            credential,
            max_tokens_field: MaxTokensField::MaxTokens,
        })
    }

    pub fn request(&self, endpoint: Endpoint, body: Bytes, stream: bool) -> Request<Full<Bytes>> {
        let uri = match endpoint {
            // Anthropic clients' requests reach an OpenAI backend translated into chat.
            Endpoint::Chat | Endpoint::Messages | Endpoint::CountTokens => &self.chat,
            Endpoint::Completions => &self.completions,
            Endpoint::Embeddings => &self.embeddings,
        };
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = Method::POST;
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
        if let Some(c) = &self.credential {
            h.insert(header::AUTHORIZATION, c.header().clone());
        }
        req
    }
}
