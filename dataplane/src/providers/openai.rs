//! OpenAI's wire format, spoken by OpenAI itself and by vLLM, Ollama, llama.cpp server, TGI
//! and other OpenAI-compatible servers: the body passes through with the model rewritten,
//! and the credential goes into `Authorization: Bearer`.

use bytes::Bytes;
use http::{Request, Uri, header};
use http_body_util::Full;

use super::{OpenAiUris, json_post};
use crate::request::Endpoint;
use crate::routes::Credential;
use crate::translate::openai_chat::MaxTokensField;

#[derive(Debug)]
pub struct Upstream {
    /// Request URIs per endpoint, built once from the base URL.
    uris: OpenAiUris,
    credential: Option<Credential>,
    /// Where a translated request puts its output limit: OpenAI takes
    /// `max_completion_tokens`, many compatible servers know only `max_tokens`.
    pub max_tokens_field: MaxTokensField,
    /// Whether the server has OpenAI's Responses API (OpenAI itself): Responses clients'
    /// requests pass through; otherwise they are translated to chat.
    pub responses: bool,
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
            uris: OpenAiUris::new(uri)?,
            credential,
            max_tokens_field: MaxTokensField::MaxTokens,
            responses: false,
        })
    }

    pub fn request(&self, endpoint: Endpoint, body: Bytes, stream: bool) -> Request<Full<Bytes>> {
        let mut req = json_post(self.uris.of(endpoint), body, stream);
        let h = req.headers_mut();
        if let Some(c) = &self.credential {
            h.insert(header::AUTHORIZATION, c.header().clone());
        }
        req
    }
}
