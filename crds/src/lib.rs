//! modelgate's custom resources, group `modelgate.dev`, version `v1alpha1`.
//!
//! ```text
//!   ApiKey ──secretRef──► Secret (raw key; hashed by the operator, never sent to proxies)
//!     │ spec.models (names / globs, same namespace)
//!     ▼
//!   ModelRoute ──backends[].credentialsRef──► Secret (provider credential)
//! ```
//!
//! The schema checks what it can at apply time (required fields, enums, minimums, duration
//! and URL patterns); the operator checks everything again (the test apiserver, v1.20,
//! ignores CEL) plus what needs other objects, and reports it in `status.conditions`.
#![forbid(unsafe_code)]

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Go-style duration: `500ms`, `30s`, `2m`, `1h30m`.
pub const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$";
/// Kubernetes object names (DNS-1123 subdomain).
pub const NAME_PATTERN: &str = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$";

/// What clients may ask for by `model`, and where it goes.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "modelgate.dev",
    version = "v1alpha1",
    kind = "ModelRoute",
    plural = "modelroutes",
    namespaced,
    status = "ModelRouteStatus",
    shortname = "mroute",
    category = "modelgate",
    printcolumn = r#"{"name":"Model","type":"string","jsonPath":".spec.model"}"#,
    printcolumn = r#"{"name":"Backends","type":"integer","jsonPath":".status.backends"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Programmed","type":"string","jsonPath":".status.conditions[?(@.type==\"Programmed\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ModelRouteSpec {
    /// The public model name clients send in the request's `model` field. Unique per
    /// namespace across all ModelRoutes (aliases included).
    #[schemars(length(min = 1, max = 253))]
    pub model: String,
    /// Further names that reach this route.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// Where requests go. Backends of the lowest priority are tried first; higher
    /// priorities are fallbacks.
    #[schemars(length(min = 1))]
    pub backends: Vec<RouteBackend>,
    /// How a backend is chosen within a priority tier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<Strategy>,
    /// Deadline across retries until an answer starts: a stream's first bytes, or the whole
    /// answer when not streaming (e.g. `60s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub timeout: Option<String>,
    /// Retries of failed attempts, before the first byte reaches the client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
    /// Passive outlier detection: backends that fail repeatedly are skipped for a while.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    /// Largest `max_tokens` / `max_completion_tokens` a request may ask for; larger ones
    /// are refused with a 400 naming this ceiling. Requests that set neither reserve at most
    /// this many output tokens per choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4_294_967_295_i64))]
    pub max_output_tokens: Option<i64>,
    /// A streamed answer whose upstream sends nothing for this long ends with an error event
    /// (the partial usage is metered); silence before its first byte is a timeout that fails
    /// over to the next backend like a connect error [default: 5m].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub stream_idle_timeout: Option<String>,
    /// The longest a streamed answer may last from its response headers [default: no limit].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub stream_timeout: Option<String>,
    /// Spend guard in US dollars: a request whose worst case costs more is refused up front
    /// with a 400 naming this guard. The worst case is the request's prompt estimate (about
    /// four bytes of JSON a token) and its output reservation (`max_tokens` times the
    /// choices, or the proxy's default) at the prices of the dearest backend, every prompt
    /// token at its dearest kind (uncached, cache read or cache write). Needs `pricing` on
    /// the backends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_cost_per_request: Option<f64>,
    /// Mirror a sampled share of this route's requests to a candidate backend (a new model
    /// version): clients get the primary's answer only; the shadow's is read, recorded
    /// beside the primary's (`modelgate_backend_*` series, `shadow="true"`) and dropped. Shadow
    /// calls never hold up or fail a request and count against no key's limits or budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<Shadow>,
    /// Exact-match response cache (opt-in): an identical request of the same namespace
    /// (model as routed, messages, tools, sampling parameters; never the API key) within
    /// `ttl` is answered by the proxy without an upstream call, a stream replayed as a
    /// stream. Answers carry `x-modelgate-cache: hit|miss|bypass`; a client's
    /// `Cache-Control: no-cache` skips the lookup, `no-store` the storing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<Cache>,
    /// Data masking: rules applied to every prompt text before it leaves the gateway (and
    /// to answers, streamed ones included, with `answers: true`). A rule finds text with a
    /// built-in `detector` or a custom `pattern` and redacts it (`[EMAIL]`), masks it (keeps
    /// the last characters) or blocks the request with a 400 naming the rule. Matches count
    /// in `modelgate_masking_total`; the matched text is never logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masking: Option<Masking>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Cache {
    /// How long a stored answer is served [default: 5m].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub ttl: Option<String>,
    /// Answers larger than this many bytes are not stored [default: 1048576].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 67_108_864))]
    pub max_entry_bytes: Option<i64>,
    /// Keep entries per API key instead of sharing them among the namespace's keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_key: Option<bool>,
    /// Also cache requests with `temperature > 0`, whose answers vary by design
    /// [default: false].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_sampled: Option<bool>,
    /// Share (0 to 1) of the original answer's tokens and cost that a hit charges against
    /// the key's rate limits and budget [default: 0: hits are free].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1))]
    pub hit_cost_fraction: Option<f64>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Masking {
    /// The rules, in order: where two rules match overlapping text, the first one wins.
    #[schemars(length(min = 1, max = 64))]
    pub rules: Vec<MaskingRule>,
    /// Also mask answers (streamed answers across chunk boundaries); a `block` rule
    /// redacts in an answer [default: false].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answers: Option<bool>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MaskingRule {
    /// Names the rule in metrics and in a block's error message; unique in the route.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// A built-in detector (exactly one of `detector` and `pattern`). Card numbers must pass
    /// the Luhn check, IBANs their mod-97 check, SSNs the SSA's ranges, IPv4 octets 0-255.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detector: Option<MaskingDetector>,
    /// A custom regular expression in Rust `regex` syntax (at most 4096 bytes, compiled
    /// within 1 MiB, never matching empty text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub pattern: Option<String>,
    /// What happens to a match [default: redact].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<MaskingAction>,
    /// `mask`: how many of the last characters stay visible [default: 4].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 16))]
    pub keep_last: Option<i32>,
    /// `redact`: the text put in place of a match [default: the detector upper-cased in
    /// brackets, `[EMAIL]`, `[CREDIT_CARD]`; for a pattern, the rule's name].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub replacement: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum MaskingDetector {
    Email,
    Phone,
    CreditCard,
    Iban,
    Ssn,
    Ipv4,
    Ipv6,
    /// Provider and cloud API keys by their prefixes (`sk-`, `AKIA`, `ghp_`, `xoxb-`, `AIza`).
    ApiKey,
}

impl MaskingDetector {
    /// The name the snapshot uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Email => "email",
            Self::Phone => "phone",
            Self::CreditCard => "credit-card",
            Self::Iban => "iban",
            Self::Ssn => "ssn",
            Self::Ipv4 => "ipv4",
            Self::Ipv6 => "ipv6",
            Self::ApiKey => "api-key",
        }
    }
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum MaskingAction {
    /// Replace the match with `replacement`.
    Redact,
    /// Replace every character but the last `keepLast` with `*`.
    Mask,
    /// Refuse the request with a 400 naming the rule, before any upstream call.
    Block,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Shadow {
    /// The candidate, in the shape of a backend of `backends`, with a name of its own;
    /// `weight` and `priority` do not apply. Its `credentialsRef` follows the same rules
    /// (a Secret of the route's namespace labelled `modelgate.dev/credential=true`).
    pub backend: RouteBackend,
    /// Percent of the route's admitted requests mirrored [default: 100].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub percent: Option<f64>,
    /// The longest one shadow call may take, its whole answer or stream read [default: 60s].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub timeout: Option<String>,
    /// Shadow calls of this route in flight at once on each proxy; a request that finds
    /// them all busy is not mirrored and counts in `modelgate_shadow_skipped_total`
    /// [default: 64].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10_000))]
    pub max_in_flight: Option<i32>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Random by weight.
    Weighted,
    /// Prefer the backend with the lower latency × load (power of two choices).
    LeastLatency,
    /// Prefer the cheapest backend by pricing.
    LowestCost,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Provider {
    Openai,
    OpenaiCompatible,
    Anthropic,
    AzureOpenai,
    Bedrock,
    Gemini,
    Vertex,
    Mock,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteBackend {
    /// Unique within the route; used in metrics.
    #[schemars(length(min = 1, max = 63), regex(pattern = NAME_PATTERN))]
    pub name: String,
    pub provider: Provider,
    /// Base URL including the API version path, e.g. `http://vllm.models:8000/v1`; for
    /// `azure-openai` the resource endpoint (see `azure`). Optional for `openai`
    /// (api.openai.com), `anthropic` (api.anthropic.com) and `mock`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://[^\s]+$"))]
    pub url: Option<String>,
    /// Upstream model name (pins a version); the client's model name when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Share of traffic within the priority tier (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1_000_000))]
    pub weight: Option<i32>,
    /// Fallback tier: lower first (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub priority: Option<i32>,
    /// The provider credential, from a Secret in the route's namespace. Never inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_ref: Option<SecretKeyRef>,
    /// Deadline for one attempt: until a stream's first bytes, or the whole answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub timeout: Option<String>,
    /// Prices for cost metering, budgets and `lowest-cost` routing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pricing: Option<Pricing>,
    /// Settings of the built-in `mock` provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mock: Option<MockSettings>,
    /// Settings of provider `anthropic` (Anthropic's Messages API; OpenAI clients' requests
    /// and answers are translated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anthropic: Option<AnthropicSettings>,
    /// Settings of provider `azure-openai`. `url` is the resource endpoint, e.g.
    /// `https://myres.openai.azure.com`; requests go to
    /// `{url}/openai/deployments/{deployment}/chat/completions?api-version={apiVersion}`.
    /// A url ending in `/openai/v1` uses the v1 API instead: `{url}/chat/completions`, no
    /// deployment or apiVersion, and the backend's `model` names the deployment. OpenAI
    /// clients' requests and answers pass through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azure: Option<AzureSettings>,
    /// Settings of provider `bedrock` (AWS Bedrock's Converse API, any model family it
    /// serves; requests signed with SigV4). `url` defaults to
    /// `https://bedrock-runtime.{region}.amazonaws.com`; `model` is the Bedrock model or
    /// inference-profile id, e.g. `anthropic.claude-3-5-haiku-20241022-v1:0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bedrock: Option<BedrockSettings>,
    /// Settings of provider `vertex` (Google Vertex AI: Gemini models by `generateContent`,
    /// Anthropic models by `rawPredict`). `url` defaults to
    /// `https://{location}-aiplatform.googleapis.com`. Provider `gemini` (the Gemini API with
    /// an API key in `credentialsRef`) needs no settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vertex: Option<VertexSettings>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BedrockSettings {
    /// The AWS region, e.g. `us-east-1`.
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[a-z0-9-]+$"))]
    pub region: String,
    /// Where the signing credentials come from: `credentials` (the Secret in
    /// `credentialsRef` holds JSON as AWS's `credential_process` prints it: `AccessKeyId`,
    /// `SecretAccessKey`, optional `SessionToken`) or `webIdentity` (the proxy pod's
    /// projected ServiceAccount token exchanged with STS for `roleArn`, the IRSA pattern) or
    /// `podIdentity` (temporary keys from the EKS Pod Identity Agent, as AWS's SDKs get them;
    /// the proxy pods' ServiceAccount must have a pod identity association). The last two
    /// only where the proxies allow ambient identity [default: credentials].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<BedrockAuth>,
    /// `webIdentity`: the IAM role to assume (at the region's STS endpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048), regex(pattern = r"^arn:"))]
    pub role_arn: Option<String>,
}

// No doc comment here: schemars would put it in place of the field's in the schema.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum BedrockAuth {
    /// AWS keys from `credentialsRef`.
    Credentials,
    /// The proxy's projected token exchanged with STS.
    WebIdentity,
    /// The proxy's EKS Pod Identity.
    PodIdentity,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VertexSettings {
    /// The Google Cloud project id.
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[a-z0-9-]+$"))]
    pub project: String,
    /// The location, e.g. `us-central1`, `europe-west4` or `global`.
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[a-z0-9-]+$"))]
    pub location: String,
    /// Whose models: `google` (Gemini) or `anthropic` (Claude on Vertex) [default: google].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publisher: Option<VertexPublisher>,
    /// Where the OAuth2 token comes from: `serviceAccountKey` (the Secret in
    /// `credentialsRef` holds a service-account key file; the proxy signs the JWT-bearer
    /// grant and refreshes the token before it expires) or `workloadIdentity` (the proxy
    /// pod's own identity from the metadata server; only where the proxies allow ambient
    /// identity) [default: serviceAccountKey].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<VertexAuth>,
}

// No doc comment here: schemars would put it in place of the field's in the schema.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum VertexPublisher {
    /// Gemini models.
    Google,
    /// Claude models.
    Anthropic,
}

// No doc comment here: schemars would put it in place of the field's in the schema.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum VertexAuth {
    /// A service-account key from `credentialsRef`.
    ServiceAccountKey,
    /// The proxy's own identity (GKE workload identity).
    WorkloadIdentity,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AzureSettings {
    /// The deployment name in the classic URL; required unless `url` ends in `/openai/v1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[A-Za-z0-9._-]+$"))]
    pub deployment: Option<String>,
    /// The `api-version` query of the classic URL, e.g. `2024-10-21`; required with
    /// `deployment`, absent with the v1 API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[A-Za-z0-9._-]+$"))]
    pub api_version: Option<String>,
    /// How the credential from `credentialsRef` is sent: `apiKey` as the `api-key` header,
    /// `bearer` as `Authorization: Bearer` (a Microsoft Entra ID token for scope
    /// `https://cognitiveservices.azure.com/.default`, kept fresh in the Secret by something
    /// else) [default: apiKey].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AzureAuth>,
}

// No doc comment here: schemars would put it in place of the field's in the schema.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum AzureAuth {
    /// The `api-key` header.
    ApiKey,
    /// `Authorization: Bearer <token>`.
    Bearer,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AnthropicSettings {
    /// The `anthropic-version` header [default: 2023-06-01].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[A-Za-z0-9._-]+$"))]
    pub version: Option<String>,
    /// `anthropic-beta` flags sent with every request, e.g. `prompt-caching-2024-07-31`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub beta: Vec<AnthropicBetaFlag>,
    /// `max_tokens` sent when an OpenAI client sets none (Anthropic requires one); never
    /// more than the request's output reservation [default: the proxy's
    /// `--default-max-tokens`, held to the route's `maxOutputTokens`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4_294_967_295_i64))]
    pub default_max_tokens: Option<i64>,
}

/// One `anthropic-beta` flag.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(transparent)]
pub struct AnthropicBetaFlag(
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[A-Za-z0-9._-]+$"))] pub String,
);

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct SecretKeyRef {
    /// Secret name, in the same namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret's data.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Pricing {
    /// USD per million input (prompt) tokens.
    #[schemars(range(min = 0))]
    pub input_per_million: f64,
    /// USD per million output (completion) tokens; reasoning tokens are output.
    #[schemars(range(min = 0))]
    pub output_per_million: f64,
    /// USD per million prompt tokens read from the provider's prompt cache [default: the
    /// input price].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub cache_read_per_million: Option<f64>,
    /// USD per million prompt tokens written to the provider's prompt cache [default: the
    /// input price].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub cache_write_per_million: Option<f64>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MockSettings {
    /// Wait before the response headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub latency: Option<String>,
    /// Completion tokens per answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100_000))]
    pub output_tokens: Option<i32>,
    /// Wait between streamed chunks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub chunk_delay: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Retries {
    /// Attempts after the first one, per priority tier (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10))]
    pub attempts: Option<i32>,
    /// Which failures are retried: `connect`, `timeout`, `429`, `5xx` (all four when none
    /// is listed). `contextLength` (opt-in, on top of the others) lets a prompt too long for
    /// a backend's context window fall to the next priority tier.
    /// (Not `on`: YAML 1.1 tools read a bare `on` key as `true`.)
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retry_on: Vec<RetryOn>,
    /// First backoff, doubled per attempt with jitter (default 100ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub backoff: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RetryOn {
    #[serde(rename = "connect")]
    Connect,
    #[serde(rename = "timeout")]
    Timeout,
    #[serde(rename = "429")]
    RateLimited,
    #[serde(rename = "5xx")]
    ServerError,
    /// A prompt too long for a backend's context window falls to the next priority tier.
    #[serde(rename = "contextLength")]
    ContextLength,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    /// Failures in a row that eject a backend (default 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub consecutive_failures: Option<i32>,
    /// First ejection; doubles while failures continue (default 30s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub ejection_time: Option<String>,
}

/// A condition in the usual Kubernetes shape.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Accepted` or `Programmed`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// A CamelCase word saying why.
    pub reason: String,
    /// What a person should know or do.
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// RFC 3339 time of the last status change.
    pub last_transition_time: String,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelRouteStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Backends in the route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backends: Option<i32>,
    /// Proxies connected to the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxies: Option<i32>,
    /// Proxies that acknowledged a snapshot containing this generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub programmed_proxies: Option<i32>,
}

/// A virtual key for a caller (a team, an app).
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "modelgate.dev",
    version = "v1alpha1",
    kind = "ApiKey",
    plural = "apikeys",
    namespaced,
    status = "ApiKeyStatus",
    shortname = "mgkey",
    category = "modelgate",
    printcolumn = r#"{"name":"Models","type":"string","jsonPath":".spec.models"}"#,
    printcolumn = r#"{"name":"RPM","type":"integer","jsonPath":".spec.limits.requestsPerMinute"}"#,
    printcolumn = r#"{"name":"TPM","type":"integer","jsonPath":".spec.limits.tokensPerMinute"}"#,
    printcolumn = r#"{"name":"Tokens","type":"integer","jsonPath":".status.usage.tokens"}"#,
    printcolumn = r#"{"name":"Cost","type":"string","jsonPath":".status.usage.costUsd"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeySpec {
    /// The Secret key holding the raw key. When absent, the operator mints a random key
    /// into a Secret it owns (named in `status.secretName`); set the annotation
    /// `modelgate.dev/rotate` to a new value to mint a fresh one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretKeyRef>,
    /// Allowed ModelRoutes of this namespace, by model name or glob (`gpt-*`); all when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,
    /// RFC 3339 time after which the key is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(
        pattern = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2})$"
    ))]
    pub expires_at: Option<String>,
    /// Refuse the key without deleting it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
    /// Spend guard in US dollars: a request of this key whose worst case costs more is
    /// refused up front with a 400 naming this guard (the worst case as for a ModelRoute's
    /// `maxCostPerRequest`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_cost_per_request: Option<f64>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    /// Requests per minute, across all proxies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub requests_per_minute: Option<i64>,
    /// Tokens (prompt + completion) per minute, across all proxies; reserved at admission.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub tokens_per_minute: Option<i64>,
    /// Requests in flight at once, per proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_concurrent: Option<i32>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Budget {
    /// Tokens per period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub tokens: Option<i64>,
    /// US dollars per period, from backend pricing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub usd: Option<f64>,
    /// `day` or `month` (UTC calendar).
    #[serde(default)]
    pub period: BudgetPeriod,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BudgetPeriod {
    Day,
    #[default]
    Month,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    /// The budget period this usage counts in, e.g. `2026-11` or `2026-11-27`.
    pub period: String,
    /// Tokens used in the period, across all proxies.
    pub tokens: i64,
    /// US dollars spent in the period, as a decimal string.
    pub cost_usd: String,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeyStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// RFC 3339 time of the last request seen with this key (to the minute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used: Option<String>,
    /// The Secret the operator minted, when `secretRef` is absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
}

/// The CRD manifests as YAML documents, in a stable order.
pub fn manifests() -> Vec<(&'static str, String)> {
    use kube::CustomResourceExt;
    let yaml = |crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition| {
        let header = "# Generated by `cargo run -p modelgate-crds --bin crdgen`; do not edit.\n";
        format!("{header}{}", serde_saphyr::to_string(crd).expect("CRD serializes"))
    };
    vec![
        ("modelroutes.modelgate.dev.yaml", yaml(&ModelRoute::crd())),
        ("apikeys.modelgate.dev.yaml", yaml(&ApiKey::crd())),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_manifests_match_the_types() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        for dir in [
            root.join("manifests"),
            root.join("../charts/modelgate/crds"),
        ] {
            for (name, text) in manifests() {
                let committed = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
                assert!(
                    committed == text,
                    "{}/{name} is out of date: run `make generate` and commit the result",
                    dir.display()
                );
            }
        }
    }

    #[test]
    fn schemas_carry_validation() {
        let text = manifests()[0].1.clone();
        for needle in [
            "pattern:",
            "minimum:",
            "openai-compatible",
            "shortNames",
            "modelgate",
            "additionalPrinterColumns",
        ] {
            assert!(
                text.contains(needle),
                "{needle} missing from the ModelRoute CRD"
            );
        }
    }
}
