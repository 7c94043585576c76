//! The snapshot as it travels: the routes and keys of the namespaces a proxy serves.
//!
//! No `deny_unknown_fields` here: the stream reads these types tolerantly (a newer operator
//! may add fields) and a file strictly ([`crate::refuse_unknown`]). A field added later
//! is `#[serde(default, skip_serializing_if = ...)]`, so a snapshot that does not use it is
//! byte-for-byte what older proxies read.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The snapshot: routes and keys. `version` is set by the operator (a content hash) and
/// computed by the proxy when absent.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotSpec {
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
    #[serde(default)]
    pub keys: Vec<KeySpec>,
}

impl SnapshotSpec {
    /// A hash of everything in the snapshot but its version (16 hex digits), written as
    /// the JSON is produced: a 100k-key snapshot is not copied for it.
    pub fn content_version(&self) -> String {
        use sha2::Digest;
        struct HashWriter(sha2::Sha256);
        impl std::io::Write for HashWriter {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.update(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        #[derive(Serialize)]
        struct Unversioned<'a> {
            version: Option<()>,
            routes: &'a [RouteSpec],
            keys: &'a [KeySpec],
        }
        let mut w = std::io::BufWriter::with_capacity(64 * 1024, HashWriter(sha2::Sha256::new()));
        let _ = serde_json::to_writer(
            &mut w,
            &Unversioned {
                version: None,
                routes: &self.routes,
                keys: &self.keys,
            },
        );
        let _ = std::io::Write::flush(&mut w);
        let digest = w.into_parts().0.0.finalize();
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteSpec {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// The public model name clients send.
    pub model: String,
    #[serde(default)]
    pub aliases: Vec<String>,
    #[serde(default)]
    pub strategy: Strategy,
    /// Deadline across retries until an answer starts: a stream's first bytes, or the whole
    /// answer when not streaming.
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub retries: Option<RetrySpec>,
    #[serde(default)]
    pub outlier_detection: Option<OutlierSpec>,
    /// Largest `max_tokens` / `max_completion_tokens` a request may ask for; larger ones get
    /// a 400 naming this ceiling. Requests that set neither reserve at most this much.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_tokens: Option<u64>,
    /// A streamed answer whose upstream sends nothing for this long ends with an error event
    /// (metered); silence before its first byte is a timeout that fails over. Default 5m.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_idle_timeout: Option<String>,
    /// The longest a streamed answer may last from its response headers (default: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_timeout: Option<String>,
    /// Spend guard, USD: a request whose worst case (its prompt estimate and output
    /// reservation at the dearest backend's prices) costs more is refused with a 400.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cost_per_request: Option<f64>,
    /// A candidate backend that sees a sampled copy of the route's requests; its answers
    /// are read, metered apart (`shadow="true"`) and dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowSpec>,
    /// Exact-match response cache of this route's answers (opt-in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheSpec>,
    /// Data masking: rules applied to prompts before they leave the gateway (and to
    /// answers when `answers` is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masking: Option<MaskingSpec>,
    pub backends: Vec<BackendSpec>,
}

/// A route's response cache: an identical request (same namespace, routed model, messages,
/// tools and sampling parameters) within `ttl` is answered from the proxy's memory (or the
/// proxies' shared Redis) without an upstream call.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CacheSpec {
    /// How long an answer may be served [default: 5m].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    /// Answers larger than this (bytes) are not stored [default: 1 MiB].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_entry_bytes: Option<u64>,
    /// Entries are kept per API key, not shared by the keys of the namespace.
    #[serde(default)]
    pub per_key: bool,
    /// Cache requests with `temperature > 0` (sampled answers) too.
    #[serde(default)]
    pub cache_sampled: bool,
    /// Share (0 to 1) of the original answer's tokens and cost a hit charges against the
    /// key's limits and budget [default: 0].
    #[serde(default)]
    pub hit_cost_fraction: f64,
}

/// A cached answer is served this long when its route names no ttl.
pub const DEFAULT_CACHE_TTL: &str = "5m";
/// The largest answer a route stores when it names no bound.
pub const DEFAULT_CACHE_MAX_ENTRY_BYTES: u64 = 1 << 20;
/// The largest bound a route may name.
pub const MAX_CACHE_ENTRY_BYTES: u64 = 64 << 20;

/// A route's data masking policy: `rules` in order (the first rule wins where two match
/// overlapping text), applied to every prompt text and, with `answers`, to the answer text.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MaskingSpec {
    #[serde(default)]
    pub rules: Vec<MaskRuleSpec>,
    /// Also mask answers, streamed ones included [default: false].
    #[serde(default)]
    pub answers: bool,
}

/// One masking rule: what it finds (a built-in `detector` or a custom `pattern`, exactly
/// one) and what happens to it.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MaskRuleSpec {
    /// Names the rule in metrics and in a block's error message.
    pub name: String,
    /// A built-in detector, one of [`MASK_DETECTORS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detector: Option<String>,
    /// A custom regular expression (Rust `regex` syntax).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    #[serde(default)]
    pub action: MaskAction,
    /// `mask`: how many of the last characters stay visible [default: 4].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_last: Option<u32>,
    /// `redact`: the text put in place of a match [default: `[DETECTOR]`, or `[RULE-NAME]`
    /// for a pattern, upper-cased].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replacement: Option<String>,
}

/// What a masking rule does with what it found.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum MaskAction {
    /// Replace the match with the rule's replacement.
    #[default]
    Redact,
    /// Replace every character but the last `keepLast` with `*`.
    Mask,
    /// Refuse the request with a 400 naming the rule (prompts); answers are redacted.
    Block,
    /// From a newer operator; refused by `check`.
    #[serde(other)]
    Unknown,
}

/// The built-in detectors a masking rule may name.
pub const MASK_DETECTORS: &[&str] = &[
    "email",
    "phone",
    "credit-card",
    "iban",
    "ssn",
    "ipv4",
    "ipv6",
    "api-key",
];
/// The most rules one route may have.
pub const MAX_MASK_RULES: usize = 64;
/// The longest custom pattern, in bytes.
pub const MAX_MASK_PATTERN: usize = 4096;
/// The most memory one compiled custom pattern may take.
pub const MASK_PATTERN_SIZE_LIMIT: usize = 1 << 20;
/// The most characters a `mask` rule may leave visible.
pub const MAX_MASK_KEEP_LAST: u32 = 16;
/// What `keepLast` is when a `mask` rule does not say.
pub const DEFAULT_MASK_KEEP_LAST: u32 = 4;
/// The longest replacement text.
pub const MAX_MASK_REPLACEMENT: usize = 256;

/// Mirroring of a route's requests to a candidate backend (a new model version). The client
/// only ever gets the primary's answer; the shadow's is read for its latency, outcome and
/// usage, and dropped. Shadow calls count against no key's limits or budget.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ShadowSpec {
    /// The candidate, in a route backend's shape; `weight` and `priority` do not apply.
    pub backend: BackendSpec,
    /// Share of the route's admitted requests mirrored, 0 to 100 [default: 100].
    #[serde(default = "default_shadow_percent")]
    pub percent: f64,
    /// The longest one shadow call may take, its whole answer (or stream) read
    /// [default: 60s].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Shadow calls of this route in flight at once per proxy; a request that finds them
    /// all busy is not mirrored (counted as skipped) [default: 64].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<u32>,
}

/// A shadow call may take this long when its route names no timeout.
pub const DEFAULT_SHADOW_TIMEOUT: &str = "60s";
/// Shadow calls of one route in flight at once per proxy, when the route names no bound.
pub const DEFAULT_SHADOW_MAX_IN_FLIGHT: u32 = 64;
/// The most shadow calls of one route a route may allow in flight.
pub const MAX_SHADOW_IN_FLIGHT: u32 = 10_000;

/// How a tier's backend is picked.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Random by weight.
    #[default]
    Weighted,
    /// Power of two choices over weighted picks, preferring the lower latency × load.
    LeastLatency,
    /// The cheapest backend by pricing; ties by weight.
    LowestCost,
    /// A value from a newer operator; refused by [`crate::check`].
    #[serde(other, skip_serializing)]
    Unknown,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RetrySpec {
    /// Attempts after the first one, per priority tier.
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// Which failures are retried; all of them when empty. (Not `on`: YAML 1.1 tools read
    /// a bare `on` key as `true`.)
    #[serde(default)]
    pub retry_on: Vec<RetryOn>,
    /// First backoff; doubles per attempt, with jitter.
    #[serde(default = "default_backoff")]
    pub backoff: String,
    #[serde(default = "default_max_backoff")]
    pub max_backoff: String,
}

/// Failures that may be retried (and fall through to the next tier).
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum RetryOn {
    /// Connection refused, reset or TLS failure before a response.
    Connect,
    /// The attempt ran past its timeout.
    Timeout,
    /// Upstream answered 429.
    #[serde(rename = "429")]
    RateLimited,
    /// Upstream answered 5xx.
    #[serde(rename = "5xx")]
    ServerError,
    /// A prompt too long for a backend's context window falls to the next priority tier
    /// (never retried on the same tier).
    #[serde(rename = "contextLength")]
    ContextLength,
    /// A condition from a newer operator; refused by [`crate::check`].
    #[serde(other, skip_serializing)]
    Unknown,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutlierSpec {
    #[serde(default = "default_consecutive_failures")]
    pub consecutive_failures: u32,
    #[serde(default = "default_ejection_time")]
    pub ejection_time: String,
    #[serde(default = "default_max_ejection_time")]
    pub max_ejection_time: String,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ProviderKind {
    Openai,
    OpenaiCompatible,
    Anthropic,
    AzureOpenai,
    Bedrock,
    Gemini,
    Vertex,
    Mock,
    /// A provider from a newer operator; refused by [`crate::check`].
    #[serde(other, skip_serializing)]
    Unknown,
}

impl ProviderKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Openai => "openai",
            Self::OpenaiCompatible => "openai-compatible",
            Self::Anthropic => "anthropic",
            Self::AzureOpenai => "azure-openai",
            Self::Bedrock => "bedrock",
            Self::Gemini => "gemini",
            Self::Vertex => "vertex",
            Self::Mock => "mock",
            Self::Unknown => "unknown",
        }
    }

    /// Whether this version of the proxy can call this provider.
    pub fn supported(&self) -> bool {
        matches!(
            self,
            Self::Openai
                | Self::OpenaiCompatible
                | Self::Anthropic
                | Self::AzureOpenai
                | Self::Bedrock
                | Self::Gemini
                | Self::Vertex
                | Self::Mock
        )
    }

    /// Whether the credential is a JSON document (AWS keys, a Google service-account key)
    /// rather than a key sent in a header.
    pub fn credential_is_document(&self) -> bool {
        matches!(self, Self::Bedrock | Self::Vertex)
    }

    /// Where the provider goes when a backend names no url.
    pub fn default_url(&self) -> Option<&'static str> {
        match self {
            Self::Openai => Some(OPENAI_DEFAULT_URL),
            Self::Anthropic => Some(ANTHROPIC_DEFAULT_URL),
            Self::Gemini => Some(GEMINI_DEFAULT_URL),
            // Bedrock's and Vertex's come from the region or location (`bedrock_url`,
            // `vertex_url`).
            Self::OpenaiCompatible
            | Self::AzureOpenai
            | Self::Bedrock
            | Self::Vertex
            | Self::Mock
            | Self::Unknown => None,
        }
    }
}

/// Where provider `openai` goes when a backend names no url.
pub const OPENAI_DEFAULT_URL: &str = "https://api.openai.com/v1";
/// Where provider `anthropic` goes when a backend names no url.
pub const ANTHROPIC_DEFAULT_URL: &str = "https://api.anthropic.com/v1";
/// Where provider `gemini` goes when a backend names no url (the Generative Language API).
pub const GEMINI_DEFAULT_URL: &str = "https://generativelanguage.googleapis.com/v1beta";

/// Bedrock's runtime endpoint in `region`, where a backend names no url.
pub fn bedrock_url(region: &str) -> String {
    format!("https://bedrock-runtime.{region}.amazonaws.com")
}

/// Vertex AI's endpoint for `location`, where a backend names no url (`global` has no
/// location prefix).
pub fn vertex_url(location: &str) -> String {
    if location == "global" {
        "https://aiplatform.googleapis.com".to_owned()
    } else {
        format!("https://{location}-aiplatform.googleapis.com")
    }
}

/// The `anthropic-version` sent when neither the backend nor (on pass-through) the client
/// names one: the only value Anthropic's SDKs send.
pub const ANTHROPIC_DEFAULT_VERSION: &str = "2023-06-01";

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendSpec {
    pub name: String,
    pub provider: ProviderKind,
    /// Base URL including the API version path, e.g. `http://127.0.0.1:8000/v1`.
    #[serde(default)]
    pub url: Option<String>,
    /// Upstream model name (pins a version); the client's model name when absent.
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Fallback tier: lower first.
    #[serde(default)]
    pub priority: u32,
    #[serde(default)]
    pub credentials: Option<CredentialSpec>,
    /// Deadline for one attempt: until a stream's first bytes, or the whole answer.
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub pricing: Option<PricingSpec>,
    /// Settings of the built-in mock provider.
    #[serde(default)]
    pub mock: Option<MockSpec>,
    /// Settings of provider `anthropic`.
    #[serde(default)]
    pub anthropic: Option<AnthropicSpec>,
    /// Settings of provider `azure-openai`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azure: Option<AzureSpec>,
    /// Settings of provider `bedrock`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bedrock: Option<BedrockSpec>,
    /// Settings of provider `vertex`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vertex: Option<VertexSpec>,
}

/// Where a `bedrock` backend sends requests and how it signs them (SigV4, service
/// `bedrock`). `url` defaults to `https://bedrock-runtime.{region}.amazonaws.com`; the
/// backend's `model` (or the client's) is the Bedrock model or inference-profile id.
#[derive(Clone, Debug, Deserialize, Serialize, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BedrockSpec {
    /// The AWS region, e.g. `us-east-1`.
    #[serde(default)]
    pub region: String,
    /// Where the signing credentials come from [default: `credentials`].
    #[serde(default)]
    pub auth: BedrockAuth,
    /// `webIdentity`: the IAM role to assume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role_arn: Option<String>,
    /// `webIdentity`: the projected ServiceAccount token file [default:
    /// `$AWS_WEB_IDENTITY_TOKEN_FILE`, else the EKS path].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub web_identity_token_file: Option<String>,
    /// `webIdentity`: the STS endpoint [default: `https://sts.{region}.amazonaws.com`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sts_url: Option<String>,
    /// `podIdentity`: the container credentials endpoint [default:
    /// `$AWS_CONTAINER_CREDENTIALS_FULL_URI`, else `http://169.254.170.2` followed by
    /// `$AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_uri: Option<String>,
    /// `podIdentity`: the file whose text is sent as `Authorization` [default:
    /// `$AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`; none when unset].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization_token_file: Option<String>,
}

/// Where a Bedrock backend's AWS credentials come from.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum BedrockAuth {
    /// The backend's credential: JSON as AWS's `credential_process` prints it
    /// (`AccessKeyId`, `SecretAccessKey`, optional `SessionToken`).
    #[default]
    Credentials,
    /// The proxy pod's projected token exchanged with STS (`AssumeRoleWithWebIdentity`,
    /// the IRSA / EKS pattern); needs the proxy's `allowAmbientIdentity`.
    WebIdentity,
    /// The proxy pod's EKS Pod Identity: temporary keys from the container credentials
    /// endpoint the EKS Pod Identity Agent serves (as AWS's SDKs read it); needs the proxy's
    /// `allowAmbientIdentity`.
    PodIdentity,
    /// A value from a newer operator; refused by [`crate::check`].
    #[serde(other, skip_serializing)]
    Unknown,
}

/// Where a `vertex` backend sends requests and how it gets its OAuth2 token.
#[derive(Clone, Debug, Deserialize, Serialize, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct VertexSpec {
    /// The Google Cloud project id.
    #[serde(default)]
    pub project: String,
    /// The location, e.g. `us-central1` or `global`.
    #[serde(default)]
    pub location: String,
    /// Whose models: `google` (Gemini, `generateContent`) or `anthropic` (Claude,
    /// `rawPredict`) [default: google].
    #[serde(default)]
    pub publisher: VertexPublisher,
    /// Where the token comes from [default: `serviceAccountKey`].
    #[serde(default)]
    pub auth: VertexAuth,
    /// `workloadIdentity`: the metadata server [default: `http://metadata.google.internal`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata_url: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum VertexPublisher {
    #[default]
    Google,
    Anthropic,
    /// A value from a newer operator; refused by [`crate::check`].
    #[serde(other, skip_serializing)]
    Unknown,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum VertexAuth {
    /// The backend's credential is a service-account key file (JSON); the proxy signs the
    /// OAuth2 JWT-bearer grant with it.
    #[default]
    ServiceAccountKey,
    /// The proxy pod's own identity from the metadata server (GKE workload identity); needs
    /// the proxy's `allowAmbientIdentity`.
    WorkloadIdentity,
    /// A value from a newer operator; refused by [`crate::check`].
    #[serde(other, skip_serializing)]
    Unknown,
}

/// Where an `azure-openai` backend sends requests and how it signs them. `url` is the
/// resource endpoint (`https://myres.openai.azure.com`): with `deployment` (and then
/// `api_version`) the classic `{url}/openai/deployments/{deployment}/chat/completions?
/// api-version=...`; with a url ending in `/openai/v1` (and neither) the v1 API
/// `{url}/chat/completions`, where the body's `model` names the deployment.
#[derive(Clone, Debug, Deserialize, Serialize, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AzureSpec {
    /// The deployment name in the classic URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<String>,
    /// The `api-version` query of the classic URL, e.g. `2024-10-21`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    /// How the credential is sent [default: `apiKey`].
    #[serde(default)]
    pub auth: AzureAuth,
}

impl AzureSpec {
    /// Whether `url` is a v1 API base (`.../openai/v1`), which takes no deployment or
    /// api-version.
    pub fn is_v1_url(url: &str) -> bool {
        url.trim_end_matches('/').ends_with("/openai/v1")
    }
}

/// How an Azure OpenAI backend presents its credential.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum AzureAuth {
    /// `api-key: <key>`: the resource's key.
    #[default]
    ApiKey,
    /// `Authorization: Bearer <token>`: a Microsoft Entra ID token (scope
    /// `https://cognitiveservices.azure.com/.default`), read from the credential as a key is.
    Bearer,
    /// A value from a newer operator; refused by [`crate::check`].
    #[serde(other, skip_serializing)]
    Unknown,
}

#[derive(Clone, Debug, Deserialize, Serialize, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AnthropicSpec {
    /// `anthropic-version` header [default: 2023-06-01].
    #[serde(default)]
    pub version: Option<String>,
    /// `anthropic-beta` flags sent with translated requests.
    #[serde(default)]
    pub beta: Vec<String>,
    /// `max_tokens` sent when an OpenAI client sets none (Anthropic requires one)
    /// [default: the proxy's default output reservation].
    #[serde(default)]
    pub default_max_tokens: Option<u64>,
}

/// One of `env`, `file` or (operator stream only) `value`.
#[derive(Clone, Deserialize, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct CredentialSpec {
    #[serde(default)]
    pub env: Option<String>,
    #[serde(default)]
    pub file: Option<String>,
    #[serde(default)]
    pub value: Option<String>,
}

impl fmt::Debug for CredentialSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialSpec")
            .field("env", &self.env)
            .field("file", &self.file)
            .field("value", &self.value.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct PricingSpec {
    /// USD per million input (prompt) tokens.
    #[serde(default)]
    pub input_per_million: f64,
    /// USD per million output (completion) tokens.
    #[serde(default)]
    pub output_per_million: f64,
    /// USD per million prompt tokens read from the provider's cache [default: the input price].
    #[serde(default)]
    pub cache_read_per_million: Option<f64>,
    /// USD per million prompt tokens written to the provider's cache [default: the input price].
    #[serde(default)]
    pub cache_write_per_million: Option<f64>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct MockSpec {
    /// Wait before the response headers.
    pub latency: String,
    /// Completion tokens per answer (one streamed chunk each).
    pub output_tokens: u32,
    /// Wait between streamed chunks.
    pub chunk_delay: String,
    /// Embedding vector length.
    pub dimensions: u32,
}

impl Default for MockSpec {
    fn default() -> Self {
        Self {
            latency: "0ms".into(),
            output_tokens: 16,
            chunk_delay: "0ms".into(),
            dimensions: 8,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeySpec {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Hex SHA-256 of the raw key (`modelgate-dataplane hash-key` prints it).
    pub sha256: String,
    /// Allowed model names or globs (`gpt-*`); every route of the namespace when empty.
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default)]
    pub limits: Option<LimitsSpec>,
    #[serde(default)]
    pub budget: Option<BudgetSpec>,
    /// RFC 3339 time after which the key is refused.
    #[serde(default)]
    pub expires_at: Option<String>,
    #[serde(default)]
    pub disabled: bool,
    /// Set by the operator when usage across all proxies used up the budget.
    #[serde(default)]
    pub exhausted: bool,
    /// Spend guard, USD: a request of this key whose worst case costs more is refused with
    /// a 400 (as the route's `maxCostPerRequest`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cost_per_request: Option<f64>,
}

#[derive(Clone, Debug, Deserialize, Serialize, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LimitsSpec {
    #[serde(default)]
    pub requests_per_minute: Option<u64>,
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
    #[serde(default)]
    pub max_concurrent: Option<u32>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BudgetSpec {
    #[serde(default)]
    pub tokens: Option<u64>,
    #[serde(default)]
    pub usd: Option<f64>,
    #[serde(default)]
    pub period: BudgetPeriod,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BudgetPeriod {
    Day,
    #[default]
    Month,
}

/// What the fleet spent on one key in its current budget period, as the operator knows it
/// from every proxy's reports. Sent to a proxy before its first snapshot (and again with
/// later ones), so a proxy that restarts does not hand out the budget afresh.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KeyUsage {
    /// `namespace/name`.
    pub key: String,
    /// The budget period these figures belong to ([`crate::clock::budget_period`]'s id).
    pub period: u64,
    pub tokens: u64,
    pub usd: f64,
}

fn default_shadow_percent() -> f64 {
    100.0
}
fn default_namespace() -> String {
    "default".into()
}
fn default_weight() -> u32 {
    1
}
fn default_attempts() -> u32 {
    2
}
fn default_backoff() -> String {
    "100ms".into()
}
fn default_max_backoff() -> String {
    "2s".into()
}
fn default_consecutive_failures() -> u32 {
    5
}
fn default_ejection_time() -> String {
    "30s".into()
}
fn default_max_ejection_time() -> String {
    "300s".into()
}
