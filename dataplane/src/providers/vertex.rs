//! Google Vertex AI: Gemini models by `generateContent` (the Gemini API's JSON) and Anthropic
//! models by `rawPredict` (Anthropic's Messages JSON), with an OAuth2 access token.
//!
//! ```text
//!   {url}/v1/projects/{project}/locations/{location}/publishers/google/models/{model}:generateContent
//!                                                                          :streamGenerateContent?alt=sse
//!   {url}/v1/projects/{project}/locations/{location}/publishers/anthropic/models/{model}:rawPredict
//!                                                                             :streamRawPredict
//!   Authorization: Bearer <token>
//!     token: service-account key ─► RS256 JWT-bearer grant at the key's token_uri, or
//!            the metadata server (GKE workload identity); cached, refreshed before expiry
//! ```
//!
//! A Claude body on Vertex is Anthropic's without `model` (it is in the URL) and with
//! `"anthropic_version": "vertex-2023-10-16"` in place of the header.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderValue, Request, Uri, header};
use http_body_util::Full;
use modelgate_wire::{VertexAuth, VertexPublisher, VertexSpec};
use serde_json::value::RawValue;

use super::google_auth::{self, ServiceAccountKey};
use super::token::{Cached, Expiring, FetchError, reason_word};
use super::{Failure, HttpClient, json_post};
use crate::providers::bedrock::encode_segment;

/// The body field that replaces the `anthropic-version` header on Vertex.
pub const ANTHROPIC_VERSION: &str = "vertex-2023-10-16";

/// Where GKE's metadata server answers when the backend names none.
const METADATA_URL: &str = "http://metadata.google.internal";

/// Largest token answer read.
const MAX_TOKEN_BODY: usize = 64 * 1024;

#[derive(Debug)]
pub struct Upstream {
    /// `.../publishers/{publisher}/models/`: the model and the method follow.
    base: String,
    pub publisher: VertexPublisher,
    source: Source,
    cached: Cached<HeaderValue>,
}

#[derive(Debug)]
enum Source {
    Key(Box<ServiceAccountKey>),
    Metadata(Uri),
}

impl Upstream {
    /// `url`: the service endpoint (`None`: the location's); `credential`: the backend's
    /// credential text (a service-account key file); `ambient`: whether this proxy lends its
    /// own identity (the metadata server) to routes.
    pub fn new(
        url: Option<&str>,
        credential: Option<&str>,
        spec: &VertexSpec,
        ambient: bool,
    ) -> Result<Self, String> {
        let url = url
            .map(str::to_owned)
            .unwrap_or_else(|| modelgate_wire::vertex_url(&spec.location));
        modelgate_wire::check::check_url(&url)?;
        let publisher = match spec.publisher {
            VertexPublisher::Google => "google",
            VertexPublisher::Anthropic => "anthropic",
            VertexPublisher::Unknown => {
                return Err("vertex.publisher must be google or anthropic".into());
            }
        };
        let base = format!(
            "{}/v1/projects/{}/locations/{}/publishers/{publisher}/models/",
            url.trim_end_matches('/'),
            encode_segment(&spec.project),
            encode_segment(&spec.location),
        );
        let source = match spec.auth {
            VertexAuth::ServiceAccountKey => {
                let text = credential
                    .ok_or("provider vertex needs credentials (a service-account key file)")?;
                Source::Key(Box::new(ServiceAccountKey::from_json(text.as_bytes())?))
            }
            VertexAuth::WorkloadIdentity => {
                if !ambient {
                    return Err(super::bedrock::ambient_refused());
                }
                let base = spec.metadata_url.as_deref().unwrap_or(METADATA_URL);
                modelgate_wire::check::check_url(base)?;
                let uri = format!(
                    "{}/computeMetadata/v1/instance/service-accounts/default/token",
                    base.trim_end_matches('/')
                )
                .parse()
                .map_err(|e| format!("invalid vertex.metadataUrl: {e}"))?;
                Source::Metadata(uri)
            }
            VertexAuth::Unknown => {
                return Err("vertex.auth must be serviceAccountKey or workloadIdentity".into());
            }
        };
        Ok(Self {
            base,
            publisher: spec.publisher,
            source,
            cached: Cached::default(),
        })
    }

    /// The URL of a call to `model`.
    pub fn uri(&self, model: &str, stream: bool) -> Result<Uri, String> {
        match self.publisher {
            VertexPublisher::Anthropic => {
                let method = if stream {
                    "streamRawPredict"
                } else {
                    "rawPredict"
                };
                format!(
                    "{}{}:{method}",
                    self.base,
                    encode_segment(model).replace("%40", "@")
                )
                .parse()
                .map_err(|e| format!("invalid Vertex URL for model {model:?}: {e}"))
            }
            _ => super::gemini::method_uri(&self.base, model, stream),
        }
    }

    /// A request to `model` with `body` (Gemini's JSON, or Anthropic's made ready by
    /// [`anthropic_body`]), with a fresh access token.
    pub async fn request(
        &self,
        client: &HttpClient,
        model: &str,
        body: Bytes,
        stream: bool,
        timeout: Duration,
    ) -> Result<Request<Full<Bytes>>, Failure> {
        let uri = self.uri(model, stream).map_err(Failure::Connect)?;
        let token = self
            .cached
            .get(|| self.fetch_token(client, timeout))
            .await
            .map_err(|e| e.into_failure("Google OAuth2 token"))?;
        let mut req = json_post(&uri, body, stream);
        req.headers_mut()
            .insert(header::AUTHORIZATION, token.value.clone());
        Ok(req)
    }

    async fn fetch_token(
        &self,
        client: &HttpClient,
        timeout: Duration,
    ) -> Result<Expiring<HeaderValue>, FetchError> {
        let now = SystemTime::now();
        let req = match &self.source {
            Source::Key(key) => {
                let unix = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
                let assertion = key
                    .assertion(google_auth::CLOUD_PLATFORM_SCOPE, unix)
                    .map_err(FetchError::Unreachable)?;
                let uri: Uri = key
                    .token_uri()
                    .parse()
                    .map_err(|e| FetchError::Unreachable(format!("the key's token_uri: {e}")))?;
                let mut req = Request::new(Full::new(Bytes::from(
                    google_auth::token_request_body(&assertion),
                )));
                *req.method_mut() = http::Method::POST;
                *req.uri_mut() = uri;
                req.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/x-www-form-urlencoded"),
                );
                req
            }
            Source::Metadata(uri) => {
                let mut req = Request::new(Full::new(Bytes::new()));
                *req.uri_mut() = uri.clone();
                req.headers_mut()
                    .insert("metadata-flavor", HeaderValue::from_static("Google"));
                req
            }
        };
        let body = fetch(client, req, timeout).await?;
        let token = google_auth::token_response(&body).map_err(FetchError::Unreachable)?;
        let mut value = HeaderValue::from_str(&format!("Bearer {}", token.token.expose()))
            .map_err(|_| {
                FetchError::Unreachable(
                    "the token endpoint answered a token that cannot be a header".into(),
                )
            })?;
        value.set_sensitive(true);
        Ok(Expiring {
            value,
            expires_at: Some(now + Duration::from_secs(token.expires_in)),
        })
    }
}

async fn fetch(
    client: &HttpClient,
    req: Request<Full<Bytes>>,
    timeout: Duration,
) -> Result<Bytes, FetchError> {
    use http_body_util::{BodyExt, Limited};
    let late = || FetchError::Unreachable("the token endpoint did not answer in time".into());
    let resp = tokio::time::timeout(timeout, client.request(req))
        .await
        .map_err(|_| late())?
        .map_err(|e| {
            FetchError::Unreachable(format!("the token endpoint: {}", super::describe(&e)))
        })?;
    let status = resp.status();
    let body = tokio::time::timeout(
        timeout,
        Limited::new(resp.into_body(), MAX_TOKEN_BODY).collect(),
    )
    .await
    .map_err(|_| late())?
    .map_err(|e| FetchError::Unreachable(format!("the token endpoint: {e}")))?
    .to_bytes();
    if status.is_client_error() {
        // An OAuth2 error answer names the refusal (`invalid_grant`); its description is
        // logged by `token_response`'s caller only as far as it says.
        #[derive(serde::Deserialize)]
        struct OAuthError {
            error: String,
        }
        let reason = serde_json::from_slice::<OAuthError>(&body)
            .ok()
            .and_then(|e| reason_word(&e.error))
            .unwrap_or_else(|| "token_refused".into());
        return Err(FetchError::Refused { status, reason });
    }
    if !status.is_success() {
        return Err(FetchError::Unreachable(format!(
            "the token endpoint answered {status}"
        )));
    }
    Ok(body)
}

/// An Anthropic Messages body made ready for Vertex: `model` dropped (it is in the URL) and
/// `anthropic_version` set. Top-level fields only are touched; values are copied as text.
pub fn anthropic_body(body: &[u8]) -> Result<Vec<u8>, String> {
    let fields: Vec<(String, Box<RawValue>)> = serde_json::from_slice::<ordered::Fields>(body)
        .map_err(|e| format!("the request body: {e}"))?
        .0;
    let mut out = Vec::with_capacity(body.len() + 48);
    out.push(b'{');
    out.extend_from_slice(b"\"anthropic_version\":\"");
    out.extend_from_slice(ANTHROPIC_VERSION.as_bytes());
    out.push(b'"');
    for (k, v) in fields
        .iter()
        .filter(|(k, _)| k != "model" && k != "anthropic_version")
    {
        out.push(b',');
        out.extend_from_slice(serde_json::to_string(k).unwrap_or_default().as_bytes());
        out.push(b':');
        out.extend_from_slice(v.get().as_bytes());
    }
    out.push(b'}');
    Ok(out)
}

/// Top-level fields of a JSON object in order, values as raw text.
mod ordered {
    use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
    use serde_json::value::RawValue;

    pub struct Fields(pub Vec<(String, Box<RawValue>)>);

    impl<'de> Deserialize<'de> for Fields {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Fields;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Fields, A::Error> {
                    let mut out = Vec::new();
                    while let Some((k, v)) = m.next_entry::<String, Box<RawValue>>()? {
                        out.push((k, v));
                    }
                    Ok(Fields(out))
                }
            }
            d.deserialize_map(V)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claude_body_loses_its_model_and_gains_the_vertex_version() {
        let body = br#"{"model":"claude-x","max_tokens":5,"messages":[{"role":"user","content":"hi"}],"stream":true}"#;
        let out = anthropic_body(body).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["anthropic_version"], ANTHROPIC_VERSION);
        assert!(v.get("model").is_none());
        assert_eq!(v["max_tokens"], 5);
        assert_eq!(v["stream"], true);
        assert_eq!(v["messages"][0]["content"], "hi");
    }

    #[test]
    fn urls_name_project_location_publisher_model_and_method() {
        let spec = VertexSpec {
            project: "my-proj".into(),
            location: "us-east5".into(),
            publisher: VertexPublisher::Anthropic,
            auth: VertexAuth::WorkloadIdentity,
            metadata_url: None,
        };
        let up = Upstream::new(None, None, &spec, true).unwrap();
        assert_eq!(
            up.uri("claude-sonnet-4@20250514", true).unwrap(),
            "https://us-east5-aiplatform.googleapis.com/v1/projects/my-proj/locations/us-east5/publishers/anthropic/models/claude-sonnet-4@20250514:streamRawPredict"
        );
        let google = VertexSpec {
            publisher: VertexPublisher::Google,
            location: "global".into(),
            ..spec.clone()
        };
        let up = Upstream::new(None, None, &google, true).unwrap();
        assert_eq!(
            up.uri("gemini-2.5-pro", false).unwrap(),
            "https://aiplatform.googleapis.com/v1/projects/my-proj/locations/global/publishers/google/models/gemini-2.5-pro:generateContent"
        );
        assert!(
            Upstream::new(None, None, &spec, false)
                .unwrap_err()
                .contains("--allow-ambient-identity")
        );
    }
}
