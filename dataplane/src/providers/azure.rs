//! Azure OpenAI: OpenAI's chat, completions and embeddings formats at Azure's URLs, signed
//! with Azure's headers. The body passes through with the model spliced, as for OpenAI.
//!
//! ```text
//!   classic  {url}/openai/deployments/{deployment}/chat/completions?api-version={apiVersion}
//!   v1       {url = .../openai/v1}/chat/completions      (the body's model names the deployment)
//!   auth     api-key: <key>   |   Authorization: Bearer <Entra ID token>
//! ```
//!
//! What differs in the answers stays out of here: the stream observer drops Azure's
//! prompt-filter and annotation-only chunks (`stream.rs`), and [`content_filter_error`] says
//! a content-filter 400 in OpenAI's words (docs/providers.md 3.3, 6.2).

use bytes::Bytes;
use http::{HeaderName, Request, Uri, header};
use http_body_util::Full;
use modelgate_wire::{AzureAuth, AzureSpec};

use super::{OpenAiUris, json_post};
use crate::canonical::ErrorKind;
use crate::request::Endpoint;
use crate::routes::Credential;

static API_KEY: HeaderName = HeaderName::from_static("api-key");

/// The most of an upstream 400 body read to recognise Azure's content-filter error; a larger
/// body is passed on unread.
pub const MAX_ERROR_BODY: usize = 64 * 1024;

#[derive(Debug)]
pub struct Upstream {
    /// Request URIs per endpoint, built once.
    uris: OpenAiUris,
    /// The v1 API, which has the Responses API: Responses clients' requests pass through;
    /// with a classic URL they are translated to chat (its api-version may predate it).
    pub responses: bool,
    credential: Option<Credential>,
    auth: AzureAuth,
}

impl Upstream {
    /// `url` is the resource endpoint, or a v1 base ending in `/openai/v1`; the snapshot
    /// check has vetted `spec` against it, and a caller that skipped it is told here.
    pub fn new(
        url: &str,
        credential: Option<Credential>,
        spec: &AzureSpec,
    ) -> Result<Self, String> {
        modelgate_wire::check::check_url(url)?;
        let base = url.trim_end_matches('/');
        let v1 = AzureSpec::is_v1_url(base);
        let (prefix, query) = match (&spec.deployment, &spec.api_version) {
            (None, None) if v1 => (base.to_owned(), String::new()),
            (Some(d), Some(v)) if !v1 => (
                format!("{base}/openai/deployments/{d}"),
                format!("?api-version={v}"),
            ),
            _ => {
                return Err(format!(
                    "azure: set deployment and apiVersion with a resource endpoint, or neither with a url ending in /openai/v1 (url {base:?})"
                ));
            }
        };
        let uri = |e: Endpoint| -> Result<Uri, String> {
            // The Responses API is the resource's, not a deployment's: the body's model
            // names the deployment.
            if e == Endpoint::Responses && !v1 {
                return format!("{base}/openai/responses{query}")
                    .parse()
                    .map_err(|e| format!("invalid Azure URL from {base:?}: {e}"));
            }
            format!("{prefix}{}{query}", e.upstream_path())
                .parse()
                .map_err(|e| format!("invalid Azure URL from {base:?}: {e}"))
        };
        if spec.auth == AzureAuth::Unknown {
            return Err("azure.auth must be apiKey or bearer".into());
        }
        Ok(Self {
            uris: OpenAiUris::new(uri)?,
            responses: v1,
            credential,
            auth: spec.auth,
        })
    }

    pub fn request(&self, endpoint: Endpoint, body: Bytes, stream: bool) -> Request<Full<Bytes>> {
        let mut req = json_post(self.uris.of(endpoint), body, stream);
        let h = req.headers_mut();
        if let Some(c) = &self.credential {
            match self.auth {
                AzureAuth::ApiKey => {
                    h.insert(API_KEY.clone(), c.raw().clone());
                }
                AzureAuth::Bearer => {
                    h.insert(header::AUTHORIZATION, c.header().clone());
                }
                // Refused by `new`.
                AzureAuth::Unknown => {}
            }
        }
        req
    }
}

/// Azure's content-filter 400 (`{"error": {"code": "content_filter", "param": "prompt",
/// "status": 400, "innererror": {...}}}`) as OpenAI writes a client error: `{"error":
/// {"message", "type": "invalid_request_error", "param": "prompt", "code":
/// "content_filter"}}`, without `innererror` and `status`. `None` for any other body, which
/// is then passed on unchanged.
pub fn content_filter_error(body: &[u8]) -> Option<Vec<u8>> {
    if body.len() > MAX_ERROR_BODY || memchr::memmem::find(body, b"content_filter").is_none() {
        return None;
    }
    let mut err = crate::translate::openai_chat::error_in(400, body);
    if err.kind != ErrorKind::ContentFiltered {
        return None;
    }
    // A blocked prompt is always what Azure names; an absent param says the same.
    err.param.get_or_insert_with(|| "prompt".to_owned());
    Some(crate::translate::openai_chat::error_out(&err))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(deployment: Option<&str>, version: Option<&str>, auth: AzureAuth) -> AzureSpec {
        AzureSpec {
            deployment: deployment.map(str::to_owned),
            api_version: version.map(str::to_owned),
            auth,
        }
    }

    #[test]
    fn classic_urls_name_the_deployment_and_the_api_version_for_every_endpoint() {
        let up = Upstream::new(
            "https://myres.openai.azure.com/",
            Credential::bearer("azure-key-1"),
            &spec(Some("gpt-4o-prod"), Some("2024-10-21"), AzureAuth::ApiKey),
        )
        .unwrap();
        for (e, path) in [
            (Endpoint::Chat, "chat/completions"),
            (Endpoint::Completions, "completions"),
            (Endpoint::Embeddings, "embeddings"),
        ] {
            let req = up.request(e, Bytes::from_static(b"{}"), false);
            assert_eq!(
                req.uri(),
                &format!(
                    "https://myres.openai.azure.com/openai/deployments/gpt-4o-prod/{path}?api-version=2024-10-21"
                )[..]
            );
        }
    }

    #[test]
    fn v1_urls_take_the_path_alone() {
        let up = Upstream::new(
            "https://myres.openai.azure.com/openai/v1/",
            Credential::bearer("azure-key-1"),
            &spec(None, None, AzureAuth::ApiKey),
        )
        .unwrap();
        let req = up.request(Endpoint::Chat, Bytes::from_static(b"{}"), true);
        assert_eq!(
            req.uri(),
            "https://myres.openai.azure.com/openai/v1/chat/completions"
        );
        assert_eq!(req.uri().query(), None);
        assert_eq!(req.headers()["accept"], "text/event-stream");
        let req = up.request(Endpoint::Embeddings, Bytes::new(), false);
        assert_eq!(
            req.uri(),
            "https://myres.openai.azure.com/openai/v1/embeddings"
        );
    }

    #[test]
    fn mismatched_settings_are_refused() {
        let c = || Credential::bearer("k");
        for (url, s) in [
            (
                "https://r.openai.azure.com",
                spec(None, None, AzureAuth::ApiKey),
            ),
            (
                "https://r.openai.azure.com",
                spec(Some("d"), None, AzureAuth::ApiKey),
            ),
            (
                "https://r.openai.azure.com/openai/v1",
                spec(Some("d"), Some("2024-10-21"), AzureAuth::ApiKey),
            ),
            (
                "https://r.openai.azure.com",
                spec(Some("d"), Some("v"), AzureAuth::Unknown),
            ),
            (
                "https://r.openai.azure.com?x=1",
                spec(Some("d"), Some("v"), AzureAuth::ApiKey),
            ),
        ] {
            assert!(Upstream::new(url, c(), &s).is_err(), "{url} {s:?}");
        }
    }

    #[test]
    fn the_key_goes_in_api_key_and_is_sensitive_and_never_in_debug() {
        let up = Upstream::new(
            "http://127.0.0.1:9",
            Credential::bearer("azure-secret-key"),
            &spec(Some("d"), Some("2024-10-21"), AzureAuth::ApiKey),
        )
        .unwrap();
        let req = up.request(Endpoint::Chat, Bytes::from_static(b"{}"), false);
        let h = req.headers();
        assert_eq!(h["api-key"], "azure-secret-key");
        assert!(h["api-key"].is_sensitive());
        assert!(h.get("authorization").is_none());
        assert_eq!(h["content-type"], "application/json");
        assert_eq!(h["accept"], "application/json");
        let debug = format!("{up:?} {:?}", req.headers());
        assert!(!debug.contains("azure-secret-key"), "{debug}");
    }

    #[test]
    fn bearer_auth_sends_the_token_as_authorization_only() {
        let up = Upstream::new(
            "https://r.openai.azure.com/openai/v1",
            Credential::bearer("eyJ0eXAi.entra.token"),
            &spec(None, None, AzureAuth::Bearer),
        )
        .unwrap();
        let req = up.request(Endpoint::Chat, Bytes::from_static(b"{}"), false);
        let h = req.headers();
        assert_eq!(h["authorization"], "Bearer eyJ0eXAi.entra.token");
        assert!(h["authorization"].is_sensitive());
        assert!(h.get("api-key").is_none());
        assert!(!format!("{up:?}").contains("entra.token"));
    }

    #[test]
    fn a_content_filter_400_is_said_in_openais_words() {
        let fixtures = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/providers/openai/errors/"
        );
        for name in [
            "400-azure-content-filter-result.json",
            "400-azure-content-filter-results.json",
        ] {
            let body = std::fs::read(format!("{fixtures}{name}")).unwrap();
            let out = content_filter_error(&body).expect(name);
            let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
            let e = &v["error"];
            assert_eq!(e["type"], "invalid_request_error", "{name}");
            assert_eq!(e["code"], "content_filter");
            assert_eq!(e["param"], "prompt");
            assert!(
                e["message"]
                    .as_str()
                    .unwrap()
                    .starts_with("The response was filtered")
            );
            assert_eq!(e.as_object().unwrap().len(), 4, "no innererror, no status");
        }
        // Without a param, the prompt is still what was blocked.
        let out =
            content_filter_error(br#"{"error":{"message":"m","code":"content_filter"}}"#).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["error"]["param"], "prompt");
    }

    #[test]
    fn other_errors_and_large_bodies_are_left_alone() {
        let ctx = br#"{"error":{"message":"too long","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#;
        assert_eq!(content_filter_error(ctx), None);
        assert_eq!(content_filter_error(b"not json"), None);
        let mut big = br#"{"error":{"message":"m","code":"content_filter","pad":""#.to_vec();
        big.extend(std::iter::repeat_n(b'x', MAX_ERROR_BODY));
        big.extend_from_slice(b"\"}}");
        assert_eq!(content_filter_error(&big), None);
    }
}
