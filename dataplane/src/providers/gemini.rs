//! Google's Gemini API (the Generative Language API) with an API key.
//!
//! ```text
//!   POST {url}/models/{model}:generateContent                  JSON answer
//!   POST {url}/models/{model}:streamGenerateContent?alt=sse    SSE, one GenerateContentResponse per event
//!   x-goog-api-key: <key>
//! ```
//!
//! Every client dialect reaches Gemini translated (`translate::gemini`). Vertex AI serves the
//! same JSON at other URLs with OAuth2 tokens (`vertex`).

use bytes::Bytes;
use http::{HeaderName, Request, Uri};
use http_body_util::Full;

use super::json_post;
use crate::providers::bedrock::encode_segment;
use crate::routes::Credential;

static API_KEY: HeaderName = HeaderName::from_static("x-goog-api-key");

#[derive(Debug)]
pub struct Upstream {
    /// `{url}/models/`: the model and the method follow.
    base: String,
    credential: Option<Credential>,
}

impl Upstream {
    pub fn new(url: &str, credential: Option<Credential>) -> Result<Self, String> {
        modelgate_wire::check::check_url(url)?;
        Ok(Self {
            base: format!("{}/models/", url.trim_end_matches('/')),
            credential,
        })
    }

    /// A generateContent (or streamGenerateContent) request with `body` (Gemini's JSON).
    pub fn request(
        &self,
        model: &str,
        body: Bytes,
        stream: bool,
    ) -> Result<Request<Full<Bytes>>, String> {
        let uri = method_uri(&self.base, model, stream)?;
        let mut req = json_post(&uri, body, stream);
        if let Some(c) = &self.credential {
            req.headers_mut().insert(API_KEY.clone(), c.raw().clone());
        }
        Ok(req)
    }
}

/// `{base}{model}:generateContent`, or `:streamGenerateContent?alt=sse` (SSE rather than
/// one JSON array, so the answer streams event by event).
pub fn method_uri(base: &str, model: &str, stream: bool) -> Result<Uri, String> {
    let method = if stream {
        "streamGenerateContent?alt=sse"
    } else {
        "generateContent"
    };
    format!("{base}{}:{method}", encode_segment(model))
        .parse()
        .map_err(|e| format!("invalid Gemini URL for model {model:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_name_the_model_and_method_and_carry_the_key_header_only() {
        let up = Upstream::new(
            "https://generativelanguage.googleapis.com/v1beta/",
            Credential::bearer("AIza-test"),
        )
        .unwrap();
        let req = up
            .request("gemini-2.5-flash", Bytes::from_static(b"{}"), true)
            .unwrap();
        assert_eq!(
            req.uri(),
            "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
        );
        assert_eq!(req.headers()["x-goog-api-key"], "AIza-test");
        assert!(req.headers()["x-goog-api-key"].is_sensitive());
        assert!(req.headers().get("authorization").is_none());
        let req = up.request("gemini-2.5-flash", Bytes::new(), false).unwrap();
        assert!(req.uri().path().ends_with(":generateContent"));
    }
}
