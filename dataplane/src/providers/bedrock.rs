//! AWS Bedrock: the Converse and ConverseStream APIs, signed with SigV4 (service `bedrock`).
//!
//! ```text
//!   POST {url}/model/{model id, percent-encoded}/converse          JSON answer
//!   POST {url}/model/{model id, percent-encoded}/converse-stream   application/vnd.amazon.eventstream
//!   credentials: the backend's (JSON as `credential_process` prints it), or
//!                web identity: the pod's projected token ─► STS AssumeRoleWithWebIdentity ─► temporary keys (cached), or
//!                pod identity: GET the container credentials endpoint (EKS Pod Identity Agent) ─► temporary keys (cached)
//! ```
//!
//! Every client dialect reaches Bedrock translated (`translate::bedrock` writes the body and
//! reads the answers); this module only says where a request goes and signs it.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, Request, Uri, header};
use http_body_util::Full;
use modelgate_wire::{BedrockAuth, BedrockSpec};

use super::aws_auth::{self, Credentials};
use super::token::{Cached, Expiring, FetchError};
use super::{Failure, HttpClient};

/// Where EKS projects the ServiceAccount token for IRSA when the environment names no file.
const EKS_TOKEN_FILE: &str = "/var/run/secrets/eks.amazonaws.com/serviceaccount/token";

/// Largest STS answer read.
const MAX_STS_BODY: usize = 64 * 1024;

/// The ECS/EKS credentials host a relative container credentials URI is resolved against.
const CONTAINER_HOST: &str = "http://169.254.170.2";
/// Hosts a container credentials endpoint may be reached on over plain HTTP (besides
/// loopback), as AWS's SDKs allow: the ECS agent and the EKS Pod Identity Agent.
const CONTAINER_HTTP_HOSTS: [&str; 3] = ["169.254.170.2", "169.254.170.23", "[fd00:ec2::23]"];

#[derive(Debug)]
pub struct Upstream {
    /// The runtime endpoint: `/model/{id}/converse` follows.
    base: String,
    host: HeaderValue,
    region: String,
    source: Source,
    keys: aws_auth::KeyCache,
}

#[derive(Debug)]
enum Source {
    Static(Credentials),
    WebIdentity {
        role_arn: String,
        token_file: PathBuf,
        sts: Uri,
        cached: Cached<Credentials>,
    },
    Container {
        uri: Uri,
        /// Its text is the `Authorization` header, read on every fetch (the kubelet
        /// rotates it in place).
        token_file: Option<PathBuf>,
        cached: Cached<Credentials>,
    },
}

/// Static credentials from the backend's credential text (JSON with `AccessKeyId`,
/// `SecretAccessKey` and optionally `SessionToken`, read by `modelgate_wire`, which the
/// operator checks routes with too). Errors never repeat the text.
pub fn parse_keys(text: &str) -> Result<Credentials, String> {
    let k = modelgate_wire::credentials::AwsKeys::parse(text)?;
    Ok(Credentials::new(
        k.access_key_id,
        k.secret_access_key,
        k.session_token,
        None,
    ))
}

impl Upstream {
    /// `url`: the runtime endpoint (`None`: the region's); `credential`: the backend's
    /// credential text, for `auth: credentials`; `ambient`: whether this proxy lends its own
    /// identity (web identity) to routes.
    pub fn new(
        url: Option<&str>,
        credential: Option<&str>,
        spec: &BedrockSpec,
        ambient: bool,
    ) -> Result<Self, String> {
        let url = url
            .map(str::to_owned)
            .unwrap_or_else(|| modelgate_wire::bedrock_url(&spec.region));
        modelgate_wire::check::check_url(&url)?;
        let base = url.trim_end_matches('/').to_owned();
        let uri: Uri = base
            .parse()
            .map_err(|e| format!("invalid URL {url:?}: {e}"))?;
        let host = uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            .ok_or_else(|| format!("the URL {url:?} names no host"))?;
        let source = match spec.auth {
            BedrockAuth::Credentials => Source::Static(parse_keys(
                credential.ok_or("provider bedrock needs credentials (AWS keys as JSON)")?,
            )?),
            BedrockAuth::WebIdentity => {
                if !ambient {
                    return Err(ambient_refused());
                }
                let role_arn = spec
                    .role_arn
                    .clone()
                    .ok_or("bedrock.roleArn is required with auth: webIdentity")?;
                let token_file = spec
                    .web_identity_token_file
                    .clone()
                    .or_else(|| std::env::var("AWS_WEB_IDENTITY_TOKEN_FILE").ok())
                    .unwrap_or_else(|| EKS_TOKEN_FILE.to_owned());
                let sts = spec
                    .sts_url
                    .clone()
                    .unwrap_or_else(|| format!("https://sts.{}.amazonaws.com", spec.region));
                modelgate_wire::check::check_url(&sts)?;
                let sts = format!("{}/", sts.trim_end_matches('/'))
                    .parse()
                    .map_err(|e| format!("invalid bedrock.stsUrl: {e}"))?;
                Source::WebIdentity {
                    role_arn,
                    token_file: token_file.into(),
                    sts,
                    cached: Cached::default(),
                }
            }
            BedrockAuth::PodIdentity => {
                if !ambient {
                    return Err(ambient_refused());
                }
                let uri = match &spec.credentials_uri {
                    Some(u) => u.clone(),
                    None => container_uri_from_env()?,
                };
                let token_file = spec
                    .authorization_token_file
                    .clone()
                    .or_else(|| std::env::var("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE").ok());
                Source::Container {
                    uri: container_uri(&uri)?,
                    token_file: token_file.map(PathBuf::from),
                    cached: Cached::default(),
                }
            }
            BedrockAuth::Unknown => {
                return Err("bedrock.auth must be credentials, webIdentity or podIdentity".into());
            }
        };
        Ok(Self {
            base,
            host,
            region: spec.region.clone(),
            source,
            keys: aws_auth::KeyCache::default(),
        })
    }

    /// The URL of a Converse (or ConverseStream) call to `model`.
    pub fn url(&self, model: &str, stream: bool) -> String {
        format!(
            "{}{}",
            self.base,
            crate::translate::bedrock::path(model, stream)
        )
    }

    /// A signed Converse request with `body` (already Bedrock's JSON). Fetches temporary
    /// credentials first when they come from web identity.
    pub async fn request(
        &self,
        client: &HttpClient,
        model: &str,
        body: Bytes,
        stream: bool,
        timeout: Duration,
    ) -> Result<Request<Full<Bytes>>, Failure> {
        let url = self.url(model, stream);
        let accept = if stream {
            "application/vnd.amazon.eventstream"
        } else {
            "application/json"
        };
        let creds = match &self.source {
            Source::Static(c) => SignWith::Borrowed(c),
            Source::WebIdentity {
                role_arn,
                token_file,
                sts,
                cached,
            } => SignWith::Cached(
                cached
                    .get(|| assume_role(client, sts, role_arn, token_file, timeout))
                    .await
                    .map_err(|e| e.into_failure("AWS web identity"))?,
            ),
            Source::Container {
                uri,
                token_file,
                cached,
            } => SignWith::Cached(
                cached
                    .get(|| container_credentials(client, uri, token_file.as_deref(), timeout))
                    .await
                    .map_err(|e| e.into_failure("AWS pod identity"))?,
            ),
        };
        let host = self.host.to_str().unwrap_or_default();
        let signed = aws_auth::sign_cached(
            &self.keys,
            creds.get(),
            &self.region,
            "bedrock",
            "POST",
            &url,
            &[
                ("host", host),
                ("content-type", "application/json"),
                ("accept", accept),
            ],
            &body,
            SystemTime::now(),
        )
        .map_err(|e| Failure::Connect(format!("signing the Bedrock request: {e}")))?;
        let uri: Uri = url
            .parse()
            .map_err(|e| Failure::Connect(format!("the Bedrock URL: {e}")))?;
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = uri;
        let h = req.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::ACCEPT, HeaderValue::from_static(accept));
        for (name, mut value) in signed {
            value.set_sensitive(true);
            h.insert(name, value);
        }
        Ok(req)
    }
}

enum SignWith<'a> {
    Borrowed(&'a Credentials),
    Cached(std::sync::Arc<Expiring<Credentials>>),
}

impl SignWith<'_> {
    fn get(&self) -> &Credentials {
        match self {
            Self::Borrowed(c) => c,
            Self::Cached(c) => &c.value,
        }
    }
}

pub(crate) fn ambient_refused() -> String {
    "this proxy does not lend its own cloud identity to routes; the cluster admin enables it with --allow-ambient-identity (Helm: proxy.allowAmbientIdentity)".into()
}

/// A path segment with everything but RFC 3986's unreserved characters percent-encoded: a
/// model id (`anthropic.claude-3-5-haiku-20241022-v1:0`) or an inference-profile ARN.
pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// STS `AssumeRoleWithWebIdentity` with the token read from `token_file` now (the kubelet
/// rotates it in place).
async fn assume_role(
    client: &HttpClient,
    sts: &Uri,
    role_arn: &str,
    token_file: &std::path::Path,
    timeout: Duration,
) -> Result<Expiring<Credentials>, FetchError> {
    use http_body_util::{BodyExt, Limited};
    let unreachable = FetchError::Unreachable;
    let token = tokio::fs::read_to_string(token_file).await.map_err(|e| {
        unreachable(format!(
            "cannot read the web identity token {}: {e}",
            token_file.display()
        ))
    })?;
    let body = aws_auth::web_identity_request(role_arn, "modelgate", token.trim());
    let mut req = Request::new(Full::new(Bytes::from(body)));
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = sts.clone();
    req.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-www-form-urlencoded"),
    );
    let late = || unreachable("STS did not answer in time".into());
    let resp = tokio::time::timeout(timeout, client.request(req))
        .await
        .map_err(|_| late())?
        .map_err(|e| unreachable(format!("STS: {}", super::describe(&e))))?;
    let status = resp.status();
    let bytes = tokio::time::timeout(
        timeout,
        Limited::new(resp.into_body(), MAX_STS_BODY).collect(),
    )
    .await
    .map_err(|_| late())?
    .map_err(|e| unreachable(format!("STS: {e}")))?
    .to_bytes();
    match aws_auth::web_identity_response(&bytes) {
        Ok(creds) => {
            let expires_at = creds.expires_at;
            Ok(Expiring {
                value: creds,
                expires_at,
            })
        }
        // STS refused the token or the role: the backend's credentials are wrong.
        Err(e) if status.is_client_error() => {
            tracing::warn!(%status, error = %e, "STS refused AssumeRoleWithWebIdentity");
            Err(FetchError::Refused {
                status,
                reason: "AssumeRoleWithWebIdentity_refused".into(),
            })
        }
        Err(e) => Err(unreachable(format!("STS answered {status}: {e}"))),
    }
}

/// The container credentials endpoint the environment names, as AWS's SDKs read it.
fn container_uri_from_env() -> Result<String, String> {
    if let Ok(full) = std::env::var("AWS_CONTAINER_CREDENTIALS_FULL_URI") {
        return Ok(full);
    }
    match std::env::var("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") {
        Ok(relative) => Ok(format!("{CONTAINER_HOST}{relative}")),
        Err(_) => Err("bedrock auth podIdentity: the proxy's environment names no container credentials endpoint (AWS_CONTAINER_CREDENTIALS_FULL_URI, set by EKS for pods with a pod identity association)".into()),
    }
}

/// A container credentials endpoint, checked as AWS's SDKs check it: HTTPS anywhere, plain
/// HTTP only on loopback or the ECS / EKS agents' link-local addresses (the answer carries
/// keys; a plain-HTTP hop elsewhere could be read or forged).
fn container_uri(text: &str) -> Result<Uri, String> {
    let uri: Uri = text
        .parse()
        .map_err(|e| format!("the container credentials endpoint is not a URL: {e}"))?;
    let host = uri.host().unwrap_or_default();
    let loopback = host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match uri.scheme_str() {
        Some("https") if !host.is_empty() => Ok(uri),
        Some("http") if loopback || CONTAINER_HTTP_HOSTS.contains(&host) => Ok(uri),
        _ => Err(format!(
            "the container credentials endpoint must be https, or http on loopback or {}",
            CONTAINER_HTTP_HOSTS.join(", ")
        )),
    }
}

/// Largest container credentials answer read.
const MAX_CONTAINER_BODY: usize = 16 * 1024;

/// GET the container credentials endpoint, with the token read from `token_file` now as
/// `Authorization`.
async fn container_credentials(
    client: &HttpClient,
    uri: &Uri,
    token_file: Option<&std::path::Path>,
    timeout: Duration,
) -> Result<Expiring<Credentials>, FetchError> {
    use http_body_util::{BodyExt, Limited};
    let unreachable = FetchError::Unreachable;
    let mut req = Request::new(Full::new(Bytes::new()));
    *req.uri_mut() = uri.clone();
    if let Some(file) = token_file {
        let token = tokio::fs::read_to_string(file).await.map_err(|e| {
            unreachable(format!(
                "cannot read the container authorization token {}: {e}",
                file.display()
            ))
        })?;
        let mut value = HeaderValue::from_str(token.trim()).map_err(|_| {
            unreachable(format!(
                "the container authorization token {} is not a legal header value",
                file.display()
            ))
        })?;
        value.set_sensitive(true);
        req.headers_mut().insert(header::AUTHORIZATION, value);
    }
    let late = || unreachable("the container credentials endpoint did not answer in time".into());
    let resp = tokio::time::timeout(timeout, client.request(req))
        .await
        .map_err(|_| late())?
        .map_err(|e| {
            unreachable(format!(
                "the container credentials endpoint: {}",
                super::describe(&e)
            ))
        })?;
    let status = resp.status();
    let bytes = tokio::time::timeout(
        timeout,
        Limited::new(resp.into_body(), MAX_CONTAINER_BODY).collect(),
    )
    .await
    .map_err(|_| late())?
    .map_err(|e| unreachable(format!("the container credentials endpoint: {e}")))?
    .to_bytes();
    if status.is_client_error() {
        // A token the agent does not accept, or no association for this ServiceAccount.
        tracing::warn!(%status, "the container credentials endpoint refused the pod");
        return Err(FetchError::Refused {
            status,
            reason: "container_credentials_refused".into(),
        });
    }
    if !status.is_success() {
        return Err(unreachable(format!(
            "the container credentials endpoint answered {status}"
        )));
    }
    let creds = container_response(&bytes).map_err(unreachable)?;
    let expires_at = creds.expires_at;
    Ok(Expiring {
        value: creds,
        expires_at,
    })
}

/// The JSON a container credentials endpoint answers: `AccessKeyId`, `SecretAccessKey`,
/// `Token`, `Expiration` (RFC 3339); other fields (`AccountId`, `RoleArn`) are ignored.
/// Errors name what is missing, never a value.
fn container_response(body: &[u8]) -> Result<Credentials, String> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Answer {
        access_key_id: Option<String>,
        secret_access_key: Option<String>,
        token: Option<String>,
        expiration: Option<String>,
    }
    let a: Answer = serde_json::from_slice(body).map_err(|_| {
        "the container credentials answer is not the expected JSON object".to_owned()
    })?;
    let need = |v: Option<String>, name: &str| {
        v.filter(|v| !v.is_empty())
            .ok_or_else(|| format!("the container credentials answer has no {name}"))
    };
    let access_key_id = need(a.access_key_id, "AccessKeyId")?;
    let secret_access_key = need(a.secret_access_key, "SecretAccessKey")?;
    let token = need(a.token, "Token")?;
    let expiration = need(a.expiration, "Expiration")?;
    let expires_at = humantime::parse_rfc3339_weak(&expiration)
        .map_err(|_| "the container credentials Expiration is not an RFC 3339 time".to_owned())?;
    Ok(Credentials::new(
        access_key_id,
        secret_access_key,
        Some(token),
        Some(expires_at),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_ids_and_arns_are_one_encoded_path_segment() {
        assert_eq!(
            encode_segment("anthropic.claude-3-5-haiku-20241022-v1:0"),
            "anthropic.claude-3-5-haiku-20241022-v1%3A0"
        );
        assert_eq!(
            encode_segment("arn:aws:bedrock:us-east-1:1:inference-profile/us.x"),
            "arn%3Aaws%3Abedrock%3Aus-east-1%3A1%3Ainference-profile%2Fus.x"
        );
        let spec = BedrockSpec {
            region: "eu-west-1".into(),
            ..Default::default()
        };
        let keys = r#"{"Version":1,"AccessKeyId":"AKIDEXAMPLE","SecretAccessKey":"s3cr3t"}"#;
        let up = Upstream::new(None, Some(keys), &spec, false).unwrap();
        assert_eq!(
            up.url("m:0", true),
            "https://bedrock-runtime.eu-west-1.amazonaws.com/model/m%3A0/converse-stream"
        );
    }

    #[test]
    fn container_endpoints_are_https_or_local_http_as_aws_sdks_allow() {
        for ok in [
            "http://169.254.170.23/v1/credentials",
            "http://169.254.170.2/v2/credentials/abc",
            "http://[fd00:ec2::23]/v1/credentials",
            "http://127.0.0.1:8080/creds",
            "http://[::1]:80/creds",
            "http://localhost/creds",
            "https://creds.example.com/v1",
        ] {
            assert!(container_uri(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://169.254.169.254/latest/meta-data",
            "http://creds.example.com/v1",
            "http://10.0.0.1/creds",
            "ftp://127.0.0.1/creds",
            "/v1/credentials",
        ] {
            let err = container_uri(bad).unwrap_err();
            assert!(err.contains("https"), "{bad}: {err}");
        }
    }

    #[test]
    fn container_answers_give_temporary_keys_and_errors_no_values() {
        // The shape the EKS Pod Identity Agent answers (and AWS's SDKs read).
        let ok = br#"{"AccessKeyId":"ASIAEXAMPLE","SecretAccessKey":"wJalrXUtnFEMI","Token":"IQoJb3JpZ2lu","AccountId":"123456789012","Expiration":"2026-12-02T10:15:30Z"}"#;
        let c = container_response(ok).unwrap();
        assert_eq!(c.access_key_id, "ASIAEXAMPLE");
        assert_eq!(c.session_token.as_deref(), Some("IQoJb3JpZ2lu"));
        assert_eq!(
            c.expires_at,
            Some(humantime::parse_rfc3339("2026-12-02T10:15:30Z").unwrap())
        );
        for (body, says) in [
            (&br#"{"SecretAccessKey":"wJalrXUtnFEMI","Token":"t","Expiration":"2026-12-02T10:15:30Z"}"#[..], "AccessKeyId"),
            (br#"{"AccessKeyId":"A","SecretAccessKey":"wJalrXUtnFEMI","Expiration":"2026-12-02T10:15:30Z"}"#, "Token"),
            (br#"{"AccessKeyId":"A","SecretAccessKey":"wJalrXUtnFEMI","Token":"t","Expiration":"soon"}"#, "RFC 3339"),
            (br#"["wJalrXUtnFEMI"]"#, "JSON"),
            (b"\xff\xfe", "JSON"),
        ] {
            let err = container_response(body).unwrap_err();
            assert!(err.contains(says), "{err}");
            assert!(!err.contains("wJalrXUtnFEMI"), "{err}");
        }
    }

    #[test]
    fn bad_keys_and_unlent_identity_are_refused_without_echoing_the_secret() {
        let spec = BedrockSpec {
            region: "us-east-1".into(),
            ..Default::default()
        };
        let err = Upstream::new(None, Some("AKID:hunter2"), &spec, false).unwrap_err();
        assert!(err.contains("AccessKeyId"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        let web = BedrockSpec {
            auth: BedrockAuth::WebIdentity,
            role_arn: Some("arn:aws:iam::1:role/r".into()),
            ..spec
        };
        let err = Upstream::new(None, None, &web, false).unwrap_err();
        assert!(err.contains("--allow-ambient-identity"), "{err}");
        assert!(Upstream::new(None, None, &web, true).is_ok());
        let pod = BedrockSpec {
            auth: BedrockAuth::PodIdentity,
            role_arn: None,
            credentials_uri: Some("http://169.254.170.23/v1/credentials".into()),
            ..web
        };
        let err = Upstream::new(None, None, &pod, false).unwrap_err();
        assert!(err.contains("--allow-ambient-identity"), "{err}");
        assert!(Upstream::new(None, None, &pod, true).is_ok());
        let elsewhere = BedrockSpec {
            credentials_uri: Some("http://10.1.2.3/v1/credentials".into()),
            ..pod
        };
        assert!(Upstream::new(None, None, &elsewhere, true).is_err());
    }
}
