//! The in-memory index of everything a snapshot is made of, and the compiler.
//!
//! ```text
//!  watch ModelRoute ─┐
//!  watch ApiKey ─────┼─► Index (apply / delete / reset per kind) ─► compile(Context)
//!  watch Secret ─────┘                                                  │
//!            Compiled { spec: SnapshotSpec, verdicts, generations, to_mint }
//! ```
//!
//! Compiling checks what the schema cannot: referenced Secrets and keys exist, model names
//! are unique per namespace (the oldest route keeps a contested name), providers are
//! supported, and each route passes the proxy's own validation. An invalid object is left
//! out with a verdict saying why; the valid ones are not held back. Raw keys are hashed
//! here and never leave the operator.

use std::collections::{BTreeMap, HashMap, HashSet};

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use modelgate_crds::{ApiKey, ModelRoute, Provider, RetryOn, RouteBackend, Strategy};
use modelgate_wire::{
    AnthropicSpec, AzureAuth, AzureSpec, BackendSpec, BedrockAuth, BedrockSpec, BudgetPeriod,
    BudgetSpec, CredentialSpec, KeySpec, LimitsSpec, MockSpec, OutlierSpec, PricingSpec,
    ProviderKind, RetrySpec, RouteSpec, ShadowSpec, SnapshotSpec, Source, VertexAuth,
    VertexPublisher, VertexSpec,
};

use crate::tenancy::{Namespaces, View};
use modelgate_wire::egress::UpstreamPolicy;

/// The label a Secret carries to be read by the operator at all (provider credentials and
/// raw keys). Everything else (Helm release Secrets, tokens, TLS keys) is never cached.
pub const CREDENTIAL_LABEL: &str = "modelgate.dev/credential";

/// Which object: kind, namespace, name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    ModelRoute,
    ApiKey,
}

impl ObjKey {
    pub fn route(ns: &str, name: &str) -> Self {
        Self {
            kind: Kind::ModelRoute,
            namespace: ns.into(),
            name: name.into(),
        }
    }
    pub fn key(ns: &str, name: &str) -> Self {
        Self {
            kind: Kind::ApiKey,
            namespace: ns.into(),
            name: name.into(),
        }
    }
    /// `namespace/name`: how proxies name keys in usage reports.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Accepted or not, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub accepted: bool,
    pub reason: &'static str,
    pub message: String,
    pub generation: i64,
    /// The Secret (of the object's namespace) a reference to which did not resolve.
    pub unresolved_secret: Option<String>,
}

impl Verdict {
    fn ok(generation: i64, message: impl Into<String>) -> Self {
        Self {
            accepted: true,
            reason: "Accepted",
            message: message.into(),
            generation,
            unresolved_secret: None,
        }
    }
    fn bad(generation: i64, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            accepted: false,
            reason,
            message: message.into(),
            generation,
            unresolved_secret: None,
        }
    }

    /// True when the verdict is about a reference that did not resolve.
    pub fn refs_unresolved(&self) -> bool {
        self.unresolved_secret.is_some()
    }
}

/// Why a reference or a check failed: reason, message, and the Secret it concerns.
type Failure = (&'static str, String, Option<String>);

/// What the compiler needs beyond the objects.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Context {
    /// Connected proxies serving each namespace: a key's rate limits are divided among the
    /// proxies that actually serve it.
    pub serving: HashMap<String, u32>,
    /// Keys (`namespace/name`) whose budget is used up across all proxies.
    pub exhausted: HashSet<String>,
}

#[derive(Debug, Clone, Default)]
pub struct Compiled {
    pub spec: SnapshotSpec,
    pub verdicts: BTreeMap<ObjKey, Verdict>,
    /// Generation of every object included in the snapshot.
    pub generations: HashMap<ObjKey, i64>,
    /// ApiKeys without `secretRef` whose minted Secret does not exist yet.
    pub to_mint: Vec<ObjKey>,
    /// Backends per route, for status.
    pub backends: HashMap<ObjKey, i32>,
}

/// The name of the Secret the operator mints for an ApiKey without `secretRef`.
pub fn minted_secret_name(apikey: &str) -> String {
    format!("{apikey}-modelgate-key")
}

/// The data key holding the raw key in a minted Secret.
pub const MINTED_KEY: &str = "key";

#[derive(Debug, Default, Clone)]
pub struct Index {
    /// Where backends may point (set once at start).
    pub policy: UpstreamPolicy,
    /// Whether routes may sign with the proxies' own cloud identity (set once at start; the
    /// proxies are started with the same choice).
    pub ambient_identity: bool,
    /// Namespace labels: sidecar opt-in and the gateway's namespace selector.
    pub namespaces: Namespaces,
    routes: BTreeMap<(String, String), ModelRoute>,
    keys: BTreeMap<(String, String), ApiKey>,
    secrets: HashMap<(String, String), BTreeMap<String, Vec<u8>>>,
    secret_annotations: HashMap<(String, String), BTreeMap<String, String>>,
}

fn ns_name<K: ResourceExt>(o: &K) -> (String, String) {
    (o.namespace().unwrap_or_default(), o.name_any())
}

impl Index {
    pub fn apply_route(&mut self, r: ModelRoute) {
        self.routes.insert(ns_name(&r), r);
    }
    pub fn delete_route(&mut self, r: &ModelRoute) {
        self.routes.remove(&ns_name(r));
    }
    pub fn reset_routes(&mut self, all: Vec<ModelRoute>) {
        self.routes = all.into_iter().map(|r| (ns_name(&r), r)).collect();
    }
    pub fn apply_key(&mut self, k: ApiKey) {
        self.keys.insert(ns_name(&k), k);
    }
    pub fn delete_key(&mut self, k: &ApiKey) {
        self.keys.remove(&ns_name(k));
    }
    pub fn reset_keys(&mut self, all: Vec<ApiKey>) {
        self.keys = all.into_iter().map(|k| (ns_name(&k), k)).collect();
    }
    pub fn apply_secret(&mut self, s: Secret) {
        let key = ns_name(&s);
        match s.metadata.annotations.clone() {
            Some(a) if !a.is_empty() => self.secret_annotations.insert(key.clone(), a),
            _ => self.secret_annotations.remove(&key),
        };
        self.secrets.insert(key, secret_data(&s));
    }
    pub fn delete_secret(&mut self, s: &Secret) {
        self.secrets.remove(&ns_name(s));
        self.secret_annotations.remove(&ns_name(s));
    }
    pub fn reset_secrets(&mut self, all: Vec<Secret>) {
        self.secrets.clear();
        self.secret_annotations.clear();
        for s in all {
            self.apply_secret(s);
        }
    }

    pub fn apply_namespace(&mut self, name: String, labels: BTreeMap<String, String>) {
        self.namespaces.insert(name, labels);
    }
    pub fn delete_namespace(&mut self, name: &str) {
        self.namespaces.remove(name);
    }
    pub fn reset_namespaces(&mut self, all: Namespaces) {
        self.namespaces = all;
    }

    /// Secrets held in memory (only those labelled as modelgate credentials are watched).
    pub fn secret_count(&self) -> usize {
        self.secrets.len()
    }

    pub fn secret_annotation(&self, ns: &str, name: &str, annotation: &str) -> Option<String> {
        self.secret_annotations
            .get(&(ns.to_owned(), name.to_owned()))?
            .get(annotation)
            .cloned()
    }

    pub fn route(&self, ns: &str, name: &str) -> Option<&ModelRoute> {
        self.routes.get(&(ns.to_owned(), name.to_owned()))
    }

    pub fn route_conditions(&self, ns: &str, name: &str) -> Option<Vec<modelgate_crds::Condition>> {
        let r = self.route(ns, name)?;
        Some(
            r.status
                .as_ref()
                .map(|s| s.conditions.clone())
                .unwrap_or_default(),
        )
    }

    pub fn key(&self, ns: &str, name: &str) -> Option<&ApiKey> {
        self.keys.get(&(ns.to_owned(), name.to_owned()))
    }

    pub fn keys(&self) -> impl Iterator<Item = &ApiKey> {
        self.keys.values()
    }

    /// A value of a Secret of `ns`. Messages name the Secret and the key asked for, never
    /// what else the Secret holds.
    fn secret_value(&self, ns: &str, name: &str, key: &str) -> Result<&[u8], Failure> {
        let data = self
            .secrets
            .get(&(ns.to_owned(), name.to_owned()))
            .ok_or_else(|| {
                (
                    "SecretNotFound",
                    format!(
                        "Secret {ns}/{name} does not exist or does not carry the label {CREDENTIAL_LABEL}=true (only labelled Secrets are read)"
                    ),
                    Some(name.to_owned()),
                )
            })?;
        data.get(key).map(Vec::as_slice).ok_or_else(|| {
            (
                "SecretKeyNotFound",
                format!("Secret {ns}/{name} has no key {key:?}"),
                Some(name.to_owned()),
            )
        })
    }

    /// Build the snapshot and a verdict for every object.
    pub fn compile(&self, ctx: &Context) -> Compiled {
        let mut out = Compiled::default();

        // Routes, oldest first so an older route keeps a contested model name.
        let mut routes: Vec<&ModelRoute> = self.routes.values().collect();
        routes.sort_by(|a, b| {
            let t = |r: &ModelRoute| r.metadata.creation_timestamp.clone().map(|t| t.0);
            t(a).cmp(&t(b))
                .then_with(|| a.name_any().cmp(&b.name_any()))
        });
        let mut claimed: HashMap<(String, String), String> = HashMap::new();
        for r in routes {
            let (ns, name) = ns_name(r);
            let key = ObjKey::route(&ns, &name);
            let generation = r.metadata.generation.unwrap_or(0);
            out.backends
                .insert(key.clone(), r.spec.backends.len() as i32);
            let verdict = match self.route_spec(r) {
                Err((reason, msg, secret)) => Verdict {
                    unresolved_secret: secret,
                    ..Verdict::bad(generation, reason, msg)
                },
                Ok(spec) => {
                    let names: Vec<&String> = std::iter::once(&spec.model)
                        .chain(spec.aliases.iter())
                        .collect();
                    let clash = names.iter().find_map(|m| {
                        claimed
                            .get(&(ns.clone(), (*m).clone()))
                            .map(|owner| ((*m).clone(), owner.clone()))
                    });
                    if let Some((model, owner)) = clash {
                        Verdict::bad(
                            generation,
                            "DuplicateModel",
                            format!(
                                "model {model:?} is already served by ModelRoute {owner} in this namespace; rename it or delete one of the routes"
                            ),
                        )
                    } else {
                        // The proxy's own validation, route by route, so one bad route
                        // cannot take the snapshot down.
                        let single = SnapshotSpec {
                            version: Some("check".into()),
                            routes: vec![spec.clone()],
                            keys: vec![],
                        };
                        match modelgate_wire::check(&single, Source::Operator) {
                            Err(e) => Verdict::bad(generation, "Invalid", e.to_string()),
                            Ok(_) => {
                                for m in names {
                                    claimed.insert((ns.clone(), m.clone()), name.clone());
                                }
                                out.spec.routes.push(spec);
                                out.generations.insert(key.clone(), generation);
                                Verdict::ok(
                                    generation,
                                    "the route is valid and its references resolve",
                                )
                            }
                        }
                    }
                }
            };
            out.verdicts.insert(key, verdict);
        }

        // Keys, oldest first: of two ApiKeys with one raw key, the older keeps it.
        let mut keys: Vec<&ApiKey> = self.keys.values().collect();
        keys.sort_by(|a, b| {
            let t = |k: &ApiKey| k.metadata.creation_timestamp.clone().map(|t| t.0);
            t(a).cmp(&t(b)).then_with(|| ns_name(*a).cmp(&ns_name(*b)))
        });
        let mut hashes: HashMap<String, String> = HashMap::new();
        for k in keys {
            let (ns, name) = ns_name(k);
            let key = ObjKey::key(&ns, &name);
            let generation = k.metadata.generation.unwrap_or(0);
            let raw = match &k.spec.secret_ref {
                Some(r) => self
                    .secret_value(&ns, &r.name, &r.key)
                    .map_err(|(reason, msg, secret)| (reason, msg, secret, false)),
                None => self
                    .secret_value(&ns, &minted_secret_name(&name), MINTED_KEY)
                    .map_err(|_| {
                        (
                            "Minting",
                            "waiting for the operator to mint this key's Secret".to_owned(),
                            None,
                            true,
                        )
                    }),
            };
            let raw = match raw {
                Ok(raw) => String::from_utf8_lossy(raw).trim().to_owned(),
                Err((reason, msg, secret, mint)) => {
                    if mint {
                        out.to_mint.push(key.clone());
                    }
                    out.verdicts.insert(
                        key,
                        Verdict {
                            unresolved_secret: secret,
                            ..Verdict::bad(generation, reason, msg)
                        },
                    );
                    continue;
                }
            };
            if raw.len() < 16 {
                out.verdicts.insert(
                    key,
                    Verdict::bad(
                        generation,
                        "WeakKey",
                        "the raw key must be at least 16 characters long",
                    ),
                );
                continue;
            }
            let hash = modelgate_wire::hash_key(&raw);
            if let Some(other) = hashes.get(&hash) {
                // Never name an object of another namespace to this one's tenant.
                let message = match other.split_once('/') {
                    Some((other_ns, other_name)) if other_ns == ns => format!(
                        "ApiKey {other_name} in this namespace uses the same raw key; every ApiKey needs its own"
                    ),
                    _ => "another ApiKey already uses this raw key; every ApiKey needs its own"
                        .to_owned(),
                };
                out.verdicts
                    .insert(key, Verdict::bad(generation, "DuplicateKey", message));
                continue;
            }
            let spec = key_spec(k, &ns, &name, hash.clone(), ctx);
            let single = SnapshotSpec {
                version: Some("check".into()),
                routes: vec![],
                keys: vec![spec.clone()],
            };
            if let Err(e) = modelgate_wire::check(&single, Source::Operator) {
                out.verdicts
                    .insert(key, Verdict::bad(generation, "Invalid", e.to_string()));
                continue;
            }
            hashes.insert(hash, format!("{ns}/{name}"));
            out.spec.keys.push(spec);
            out.generations.insert(key.clone(), generation);
            out.verdicts.insert(
                key,
                Verdict::ok(generation, "the key is valid and its Secret resolves"),
            );
        }

        out.spec.version = Some(version_of(&out.spec));
        out
    }

    fn route_spec(&self, r: &ModelRoute) -> Result<RouteSpec, Failure> {
        let (ns, name) = ns_name(r);
        let s = &r.spec;
        let mut backends = Vec::with_capacity(s.backends.len());
        for b in &s.backends {
            backends.push(self.backend_spec(&ns, "backend", b)?);
        }
        let shadow = match &s.shadow {
            None => None,
            Some(sh) => Some(ShadowSpec {
                backend: self.backend_spec(&ns, "shadow backend", &sh.backend)?,
                percent: sh.percent.unwrap_or(100.0),
                timeout: sh.timeout.clone(),
                max_in_flight: sh.max_in_flight.map(|n| n.max(0) as u32),
            }),
        };
        Ok(RouteSpec {
            name,
            namespace: ns,
            model: s.model.clone(),
            aliases: s.aliases.clone(),
            strategy: match s.strategy {
                None | Some(Strategy::Weighted) => modelgate_wire::Strategy::Weighted,
                Some(Strategy::LeastLatency) => modelgate_wire::Strategy::LeastLatency,
                Some(Strategy::LowestCost) => modelgate_wire::Strategy::LowestCost,
            },
            timeout: s.timeout.clone(),
            retries: s.retries.as_ref().map(|r| RetrySpec {
                attempts: r.attempts.map_or(2, |a| a.max(0) as u32),
                retry_on: r
                    .retry_on
                    .iter()
                    .map(|o| match o {
                        RetryOn::Connect => modelgate_wire::RetryOn::Connect,
                        RetryOn::Timeout => modelgate_wire::RetryOn::Timeout,
                        RetryOn::RateLimited => modelgate_wire::RetryOn::RateLimited,
                        RetryOn::ServerError => modelgate_wire::RetryOn::ServerError,
                        RetryOn::ContextLength => modelgate_wire::RetryOn::ContextLength,
                    })
                    .collect(),
                backoff: r.backoff.clone().unwrap_or_else(|| "100ms".into()),
                max_backoff: "2s".into(),
            }),
            outlier_detection: s.outlier_detection.as_ref().map(|o| OutlierSpec {
                consecutive_failures: o.consecutive_failures.map_or(5, |n| n.max(0) as u32),
                ejection_time: o.ejection_time.clone().unwrap_or_else(|| "30s".into()),
                max_ejection_time: "300s".into(),
            }),
            // The schema admits 1..=u32::MAX; clamped like the other numbers.
            max_output_tokens: s
                .max_output_tokens
                .map(|n| n.clamp(1, u32::MAX.into()) as u64),
            stream_idle_timeout: s.stream_idle_timeout.clone(),
            stream_timeout: s.stream_timeout.clone(),
            max_cost_per_request: s.max_cost_per_request,
            shadow,
            cache: s.cache.as_ref().map(|c| modelgate_wire::CacheSpec {
                ttl: c.ttl.clone(),
                max_entry_bytes: c.max_entry_bytes.map(|n| n.max(1) as u64),
                per_key: c.per_key.unwrap_or(false),
                cache_sampled: c.cache_sampled.unwrap_or(false),
                hit_cost_fraction: c.hit_cost_fraction.unwrap_or(0.0),
            }),
            masking: s.masking.as_ref().map(|m| modelgate_wire::MaskingSpec {
                rules: m
                    .rules
                    .iter()
                    .map(|r| modelgate_wire::MaskRuleSpec {
                        name: r.name.clone(),
                        detector: r.detector.map(|d| d.as_str().to_owned()),
                        pattern: r.pattern.clone(),
                        action: match r.action {
                            None | Some(modelgate_crds::MaskingAction::Redact) => {
                                modelgate_wire::MaskAction::Redact
                            }
                            Some(modelgate_crds::MaskingAction::Mask) => {
                                modelgate_wire::MaskAction::Mask
                            }
                            Some(modelgate_crds::MaskingAction::Block) => {
                                modelgate_wire::MaskAction::Block
                            }
                        },
                        keep_last: r.keep_last.map(|n| n.clamp(0, i32::MAX) as u32),
                        replacement: r.replacement.clone(),
                    })
                    .collect(),
                answers: m.answers.unwrap_or(false),
            }),
            backends,
        })
    }

    /// One backend (a route's, or its shadow's: `what` says which, for messages) on the
    /// wire: URL policy, ambient identity and credentials from opted-in Secrets checked.
    fn backend_spec(&self, ns: &str, what: &str, b: &RouteBackend) -> Result<BackendSpec, Failure> {
        let provider = match b.provider {
            Provider::Openai => ProviderKind::Openai,
            Provider::OpenaiCompatible => ProviderKind::OpenaiCompatible,
            Provider::Mock => ProviderKind::Mock,
            Provider::Anthropic => ProviderKind::Anthropic,
            Provider::AzureOpenai => ProviderKind::AzureOpenai,
            Provider::Bedrock => ProviderKind::Bedrock,
            Provider::Gemini => ProviderKind::Gemini,
            Provider::Vertex => ProviderKind::Vertex,
        };
        let url = b
            .url
            .clone()
            .or_else(|| provider.default_url().map(str::to_owned))
            .or_else(|| match (&b.bedrock, &b.vertex) {
                (Some(s), _) if provider == ProviderKind::Bedrock => {
                    Some(modelgate_wire::bedrock_url(&s.region))
                }
                (_, Some(s)) if provider == ProviderKind::Vertex => {
                    Some(modelgate_wire::vertex_url(&s.location))
                }
                _ => None,
            });
        if let Some(url) = &url
            && provider != ProviderKind::Mock
            && let Err(why) = self.policy.check(url)
        {
            return Err((
                "UpstreamNotAllowed",
                format!("{what} {}: {why}", b.name),
                None,
            ));
        }
        let ambient = b.bedrock.as_ref().is_some_and(|s| {
            matches!(
                s.auth,
                Some(
                    modelgate_crds::BedrockAuth::WebIdentity
                        | modelgate_crds::BedrockAuth::PodIdentity
                )
            )
        }) || b
            .vertex
            .as_ref()
            .is_some_and(|s| s.auth == Some(modelgate_crds::VertexAuth::WorkloadIdentity));
        if ambient && !self.ambient_identity {
            return Err((
                "AmbientIdentityNotAllowed",
                format!(
                    "{what} {}: signing with the proxies' own cloud identity (bedrock webIdentity or podIdentity, vertex workloadIdentity) is not enabled in this cluster; use credentialsRef, or ask the cluster admin to set proxy.allowAmbientIdentity",
                    b.name
                ),
                None,
            ));
        }
        let credentials = match &b.credentials_ref {
            None => None,
            Some(c) => {
                let raw =
                    self.secret_value(ns, &c.name, &c.key)
                        .map_err(|(reason, msg, secret)| {
                            (reason, format!("{what} {}: {msg}", b.name), secret)
                        })?;
                Some(CredentialSpec {
                    value: Some(String::from_utf8_lossy(raw).trim().to_owned()),
                    ..Default::default()
                })
            }
        };
        let weight = b.weight.unwrap_or(1);
        let priority = b.priority.unwrap_or(0);
        if weight < 0 || priority < 0 {
            return Err((
                "Invalid",
                format!(
                    "{what} {}: weight and priority must not be negative",
                    b.name
                ),
                None,
            ));
        }
        Ok(BackendSpec {
            name: b.name.clone(),
            provider,
            url: b.url.clone(),
            model: b.model.clone(),
            weight: weight as u32,
            priority: priority as u32,
            credentials,
            timeout: b.timeout.clone(),
            pricing: b.pricing.as_ref().map(|p| PricingSpec {
                input_per_million: p.input_per_million,
                output_per_million: p.output_per_million,
                cache_read_per_million: p.cache_read_per_million,
                cache_write_per_million: p.cache_write_per_million,
            }),
            anthropic: b.anthropic.as_ref().map(|a| AnthropicSpec {
                version: a.version.clone(),
                beta: a.beta.iter().map(|f| f.0.clone()).collect(),
                default_max_tokens: a.default_max_tokens.map(|n| n.max(0) as u64),
            }),
            azure: b.azure.as_ref().map(|a| AzureSpec {
                deployment: a.deployment.clone(),
                api_version: a.api_version.clone(),
                auth: match a.auth {
                    None | Some(modelgate_crds::AzureAuth::ApiKey) => AzureAuth::ApiKey,
                    Some(modelgate_crds::AzureAuth::Bearer) => AzureAuth::Bearer,
                },
            }),
            bedrock: b.bedrock.as_ref().map(|s| BedrockSpec {
                region: s.region.clone(),
                auth: match s.auth {
                    None | Some(modelgate_crds::BedrockAuth::Credentials) => {
                        BedrockAuth::Credentials
                    }
                    Some(modelgate_crds::BedrockAuth::WebIdentity) => BedrockAuth::WebIdentity,
                    Some(modelgate_crds::BedrockAuth::PodIdentity) => BedrockAuth::PodIdentity,
                },
                role_arn: s.role_arn.clone(),
                // The proxy's own token, and where it goes: not a tenant's to choose.
                web_identity_token_file: None,
                sts_url: None,
                credentials_uri: None,
                authorization_token_file: None,
            }),
            vertex: b.vertex.as_ref().map(|s| VertexSpec {
                project: s.project.clone(),
                location: s.location.clone(),
                publisher: match s.publisher {
                    None | Some(modelgate_crds::VertexPublisher::Google) => VertexPublisher::Google,
                    Some(modelgate_crds::VertexPublisher::Anthropic) => VertexPublisher::Anthropic,
                },
                auth: match s.auth {
                    None | Some(modelgate_crds::VertexAuth::ServiceAccountKey) => {
                        VertexAuth::ServiceAccountKey
                    }
                    Some(modelgate_crds::VertexAuth::WorkloadIdentity) => {
                        VertexAuth::WorkloadIdentity
                    }
                },
                // The metadata server is the node's: not a tenant's to choose.
                metadata_url: None,
            }),
            mock: b.mock.as_ref().map(|m| {
                let d = MockSpec::default();
                MockSpec {
                    latency: m.latency.clone().unwrap_or(d.latency),
                    output_tokens: m.output_tokens.map_or(d.output_tokens, |n| n.max(0) as u32),
                    chunk_delay: m.chunk_delay.clone().unwrap_or(d.chunk_delay),
                    dimensions: d.dimensions,
                }
            }),
        })
    }
}

fn key_spec(k: &ApiKey, ns: &str, name: &str, hash: String, ctx: &Context) -> KeySpec {
    let s = &k.spec;
    let serving = ctx.serving.get(ns).copied().unwrap_or(0).max(1);
    let share = |v: Option<i64>| v.map(|v| (v.max(1) as u64).div_ceil(u64::from(serving)));
    KeySpec {
        name: name.to_owned(),
        namespace: ns.to_owned(),
        sha256: hash,
        models: s.models.clone(),
        limits: s.limits.as_ref().map(|l| LimitsSpec {
            requests_per_minute: share(l.requests_per_minute),
            tokens_per_minute: share(l.tokens_per_minute),
            max_concurrent: l.max_concurrent.map(|c| c.max(1) as u32),
        }),
        budget: s.budget.as_ref().map(|b| BudgetSpec {
            tokens: b.tokens.map(|t| t.max(0) as u64),
            usd: b.usd,
            period: match b.period {
                modelgate_crds::BudgetPeriod::Day => BudgetPeriod::Day,
                modelgate_crds::BudgetPeriod::Month => BudgetPeriod::Month,
            },
        }),
        expires_at: s.expires_at.clone(),
        disabled: s.disabled.unwrap_or(false),
        exhausted: ctx.exhausted.contains(&format!("{ns}/{name}")),
        max_cost_per_request: s.max_cost_per_request,
    }
}

/// The content version of a snapshot: a hash of everything in it but the version.
pub fn version_of(spec: &SnapshotSpec) -> String {
    spec.content_version()
}

impl Compiled {
    /// What a proxy with this view receives: only objects of the namespaces it serves,
    /// with a version of its own (so other namespaces' changes are invisible to it).
    pub fn view(&self, view: &View) -> (SnapshotSpec, HashMap<ObjKey, i64>) {
        let mut spec = SnapshotSpec {
            version: None,
            routes: self
                .spec
                .routes
                .iter()
                .filter(|r| view.covers(&r.namespace))
                .cloned()
                .collect(),
            keys: self
                .spec
                .keys
                .iter()
                .filter(|k| view.covers(&k.namespace))
                .cloned()
                .collect(),
        };
        spec.version = Some(version_of(&spec));
        let generations = self
            .generations
            .iter()
            .filter(|(k, _)| view.covers(&k.namespace))
            .map(|(k, g)| (k.clone(), *g))
            .collect();
        (spec, generations)
    }
}

fn secret_data(s: &Secret) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> = s
        .data
        .as_ref()
        .map(|d| d.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect())
        .unwrap_or_default();
    if let Some(sd) = &s.string_data {
        for (k, v) in sd {
            out.insert(k.clone(), v.clone().into_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use modelgate_crds::{ApiKeySpec, Limits, ModelRouteSpec, RouteBackend, SecretKeyRef};

    fn route(
        ns: &str,
        name: &str,
        model: &str,
        backends: Vec<RouteBackend>,
        age: i64,
    ) -> ModelRoute {
        let mut r = ModelRoute::new(
            name,
            ModelRouteSpec {
                model: model.into(),
                aliases: vec![],
                backends,
                strategy: None,
                timeout: None,
                retries: None,
                outlier_detection: None,
                max_output_tokens: None,
                stream_idle_timeout: None,
                stream_timeout: None,
                max_cost_per_request: None,
                shadow: None,
                cache: None,
                masking: None,
            },
        );
        r.metadata.namespace = Some(ns.into());
        r.metadata.generation = Some(1);
        r.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::from_second(1_700_000_000 + age).unwrap(),
        ));
        r
    }

    fn backend(name: &str, provider: Provider, cred: Option<(&str, &str)>) -> RouteBackend {
        RouteBackend {
            name: name.into(),
            provider,
            url: Some("http://127.0.0.1:9/v1".into()),
            model: None,
            weight: None,
            priority: None,
            credentials_ref: cred.map(|(n, k)| SecretKeyRef {
                name: n.into(),
                key: k.into(),
            }),
            timeout: None,
            pricing: None,
            mock: None,
            anthropic: None,
            azure: None,
            bedrock: None,
            vertex: None,
        }
    }

    fn secret(ns: &str, name: &str, key: &str, value: &str) -> Secret {
        let mut s = Secret::default();
        s.metadata.namespace = Some(ns.into());
        s.metadata.name = Some(name.into());
        s.data = Some([(key.to_owned(), ByteString(value.as_bytes().to_vec()))].into());
        s
    }

    fn apikey(ns: &str, name: &str, secret: Option<(&str, &str)>) -> ApiKey {
        let mut k = ApiKey::new(
            name,
            ApiKeySpec {
                secret_ref: secret.map(|(n, k)| SecretKeyRef {
                    name: n.into(),
                    key: k.into(),
                }),
                models: vec![],
                limits: Some(Limits {
                    requests_per_minute: Some(100),
                    tokens_per_minute: Some(1001),
                    max_concurrent: None,
                }),
                budget: None,
                expires_at: None,
                disabled: None,
                max_cost_per_request: None,
            },
        );
        k.metadata.namespace = Some(ns.into());
        k.metadata.generation = Some(3);
        k
    }

    #[test]
    fn bad_routes_are_left_out_with_a_reason_and_good_ones_kept() {
        let mut idx = Index {
            policy: UpstreamPolicy::new(&["127.0.0.1/32".into()], &[]).unwrap(),
            ..Index::default()
        };
        idx.apply_route(route(
            "a",
            "good",
            "m1",
            vec![backend("b", Provider::OpenaiCompatible, None)],
            0,
        ));
        idx.apply_route(route(
            "a",
            "nosecret",
            "m2",
            vec![backend("b", Provider::Openai, Some(("creds", "token")))],
            0,
        ));
        idx.apply_route(route(
            "a",
            "younger-dup",
            "m1",
            vec![backend("b", Provider::Mock, None)],
            10,
        ));
        idx.apply_route(route(
            "b",
            "other-ns",
            "m1",
            vec![backend("b", Provider::Mock, None)],
            10,
        ));
        idx.apply_route(route(
            "a",
            "anthropic",
            "m3",
            vec![backend("b", Provider::Anthropic, None)],
            0,
        ));
        let c = idx.compile(&Context::default());
        let v = |ns: &str, n: &str| c.verdicts[&ObjKey::route(ns, n)].clone();
        assert!(v("a", "good").accepted);
        assert!(
            v("b", "other-ns").accepted,
            "the same model in another namespace is fine"
        );
        assert_eq!(v("a", "nosecret").reason, "SecretNotFound");
        assert!(
            v("a", "nosecret")
                .message
                .contains("Secret a/creds does not exist")
        );
        assert_eq!(v("a", "younger-dup").reason, "DuplicateModel");
        assert!(v("a", "younger-dup").message.contains("ModelRoute good"));
        // Supported since the Anthropic provider landed: refused only for its missing key.
        assert_eq!(v("a", "anthropic").reason, "Invalid");
        assert!(
            v("a", "anthropic").message.contains("needs credentials"),
            "{}",
            v("a", "anthropic").message
        );
        let names: Vec<_> = c
            .spec
            .routes
            .iter()
            .map(|r| format!("{}/{}", r.namespace, r.name))
            .collect();
        assert_eq!(names, vec!["a/good", "b/other-ns"]);
        assert!(v("a", "nosecret").refs_unresolved());
        assert!(
            !v("a", "nosecret").message.contains("token"),
            "never what the Secret holds"
        );

        // A proxy that serves namespace b sees nothing of a, with a version of its own.
        let (only_b, gens) = c.view(&View::Only(["b".to_owned()].into()));
        assert_eq!(only_b.routes.len(), 1);
        assert!(only_b.routes.iter().all(|r| r.namespace == "b"));
        assert!(gens.keys().all(|k| k.namespace == "b"));
        assert_ne!(only_b.version, c.spec.version);
        let (all, _) = c.view(&View::All);
        assert_eq!(all.version, c.spec.version);

        // Metadata: refused with its reason; an unlabelled Secret is invisible (not cached).
        let mut meta = backend("m", Provider::OpenaiCompatible, None);
        meta.url = Some("http://169.254.169.254/latest".into());
        idx.apply_route(route("a", "metadata", "m9", vec![meta], 0));
        let strict = Index {
            policy: UpstreamPolicy::default(),
            ..Index::default()
        };
        let mut loopback = route(
            "a",
            "loop",
            "m8",
            vec![backend("b", Provider::OpenaiCompatible, None)],
            0,
        );
        loopback.metadata.generation = Some(2);
        let mut strict = strict;
        strict.apply_route(loopback);
        let c = idx.compile(&Context::default());
        assert_eq!(
            c.verdicts[&ObjKey::route("a", "metadata")].reason,
            "UpstreamNotAllowed"
        );
        assert!(
            c.verdicts[&ObjKey::route("a", "good")].accepted,
            "the others keep working"
        );
        let c = strict.compile(&Context::default());
        assert_eq!(
            c.verdicts[&ObjKey::route("a", "loop")].reason,
            "UpstreamNotAllowed",
            "loopback is refused by default"
        );

        // The Secret appears: the route is accepted with the credential inline.
        idx.apply_secret(secret("a", "creds", "token", "sk-provider\n"));
        let c = idx.compile(&Context::default());
        assert!(c.verdicts[&ObjKey::route("a", "nosecret")].accepted);
        let r = c.spec.routes.iter().find(|r| r.name == "nosecret").unwrap();
        assert_eq!(
            r.backends[0].credentials.as_ref().unwrap().value.as_deref(),
            Some("sk-provider")
        );
    }

    #[test]
    fn a_routes_cache_reaches_the_wire_with_its_defaults() {
        let mut idx = Index::default();
        let mut r = route(
            "a",
            "chat",
            "chat",
            vec![backend("m", Provider::Mock, None)],
            0,
        );
        r.spec.cache = Some(modelgate_crds::Cache {
            ttl: Some("10m".into()),
            max_entry_bytes: None,
            per_key: Some(true),
            cache_sampled: None,
            hit_cost_fraction: Some(0.5),
        });
        idx.apply_route(r);
        let c = idx.compile(&Context::default());
        assert!(c.verdicts[&ObjKey::route("a", "chat")].accepted);
        assert_eq!(
            c.spec.routes[0].cache,
            Some(modelgate_wire::CacheSpec {
                ttl: Some("10m".into()),
                max_entry_bytes: None,
                per_key: true,
                cache_sampled: false,
                hit_cost_fraction: 0.5,
            })
        );
    }

    #[test]
    fn shadows_and_spend_guards_reach_the_wire_through_the_backends_rules() {
        use modelgate_crds::{Pricing, Shadow};
        let mut idx = Index {
            policy: UpstreamPolicy::new(&["127.0.0.1/32".into()], &[]).unwrap(),
            ..Index::default()
        };
        let mut primary = backend("gpt", Provider::OpenaiCompatible, None);
        primary.pricing = Some(Pricing {
            input_per_million: 2.5,
            output_per_million: 10.0,
            cache_read_per_million: None,
            cache_write_per_million: None,
        });
        let shadowed = |candidate: RouteBackend, percent: Option<f64>| {
            let mut r = route("a", "chat", "gpt", vec![primary.clone()], 0);
            r.spec.max_cost_per_request = Some(0.25);
            r.spec.shadow = Some(Shadow {
                backend: candidate,
                percent,
                timeout: Some("20s".into()),
                max_in_flight: Some(8),
            });
            r
        };
        // The candidate's credential comes from a Secret like any backend's.
        idx.apply_route(shadowed(
            backend("next", Provider::Openai, Some(("candidate", "token"))),
            Some(10.0),
        ));
        let c = idx.compile(&Context::default());
        let v = &c.verdicts[&ObjKey::route("a", "chat")];
        assert_eq!(v.reason, "SecretNotFound");
        assert!(
            v.message
                .starts_with("shadow backend next: Secret a/candidate"),
            "{}",
            v.message
        );
        assert!(v.refs_unresolved());
        idx.apply_secret(secret("a", "candidate", "token", "sk-candidate\n"));
        let c = idx.compile(&Context::default());
        assert!(c.verdicts[&ObjKey::route("a", "chat")].accepted);
        let r = &c.spec.routes[0];
        assert_eq!(r.max_cost_per_request, Some(0.25));
        let sh = r.shadow.as_ref().unwrap();
        assert_eq!(
            sh.backend.credentials.as_ref().unwrap().value.as_deref(),
            Some("sk-candidate")
        );
        assert_eq!(
            (sh.percent, sh.timeout.as_deref(), sh.max_in_flight),
            (10.0, Some("20s"), Some(8))
        );

        // The upstream policy holds for the candidate too.
        let mut inward = backend("next", Provider::OpenaiCompatible, None);
        inward.url = Some("http://169.254.169.254/v1".into());
        idx.apply_route(shadowed(inward, None));
        let v = &idx.compile(&Context::default()).verdicts[&ObjKey::route("a", "chat")];
        assert_eq!(v.reason, "UpstreamNotAllowed");
        assert!(
            v.message.starts_with("shadow backend next:"),
            "{}",
            v.message
        );

        // The proxy's rules, with a message a person can act on; the default percent is 100.
        let mut weighted = backend("gpt", Provider::OpenaiCompatible, None);
        weighted.weight = Some(5);
        idx.apply_route(shadowed(weighted, None));
        let c = idx.compile(&Context::default());
        let v = &c.verdicts[&ObjKey::route("a", "chat")];
        assert_eq!(v.reason, "Invalid");
        assert!(
            v.message
                .contains("shadow.backend (gpt): the shadow backend needs a name of its own")
                && v.message.contains("weight and priority do not apply"),
            "{}",
            v.message
        );
        idx.apply_route(shadowed(backend("next", Provider::Mock, None), None));
        let c = idx.compile(&Context::default());
        assert_eq!(c.spec.routes[0].shadow.as_ref().unwrap().percent, 100.0);
        let mut unpriced = shadowed(backend("next", Provider::Mock, None), None);
        unpriced.spec.backends[0].pricing = None;
        idx.apply_route(unpriced);
        let v = &idx.compile(&Context::default()).verdicts[&ObjKey::route("a", "chat")];
        assert!(
            v.message
                .contains("maxCostPerRequest: no backend of this route has pricing"),
            "{}",
            v.message
        );

        // A key's guard.
        idx.apply_secret(secret("a", "raw", "key", "sk-a-long-enough-raw-key"));
        let mut k = apikey("a", "team", Some(("raw", "key")));
        k.spec.max_cost_per_request = Some(0.05);
        idx.apply_key(k);
        let c = idx.compile(&Context::default());
        assert_eq!(c.spec.keys[0].max_cost_per_request, Some(0.05));
    }

    #[test]
    fn masking_rules_reach_the_wire_and_bad_ones_are_named_with_their_path() {
        use modelgate_crds::{Masking, MaskingAction, MaskingDetector, MaskingRule};
        let mut idx = Index::default();
        let rule = |name: &str, detector, pattern: Option<&str>, action| MaskingRule {
            name: name.into(),
            detector,
            pattern: pattern.map(Into::into),
            action,
            keep_last: None,
            replacement: None,
        };
        let masked = |rules: Vec<MaskingRule>| {
            let mut r = route(
                "a",
                "chat",
                "gpt",
                vec![backend("m", Provider::Mock, None)],
                0,
            );
            r.spec.masking = Some(Masking {
                rules,
                answers: Some(true),
            });
            r
        };
        idx.apply_route(masked(vec![
            rule(
                "cards",
                Some(MaskingDetector::CreditCard),
                None,
                Some(MaskingAction::Block),
            ),
            rule("mail", Some(MaskingDetector::Email), None, None),
        ]));
        let c = idx.compile(&Context::default());
        let m = c.spec.routes[0].masking.as_ref().unwrap();
        assert!(m.answers);
        assert_eq!(m.rules[0].detector.as_deref(), Some("credit-card"));
        assert_eq!(m.rules[0].action, modelgate_wire::MaskAction::Block);
        assert_eq!(m.rules[1].action, modelgate_wire::MaskAction::Redact);

        idx.apply_route(masked(vec![rule("bad", None, Some("(open"), None)]));
        let v = &idx.compile(&Context::default()).verdicts[&ObjKey::route("a", "chat")];
        assert_eq!(v.reason, "Invalid");
        assert!(
            v.message
                .contains("masking.rules[0] (bad).pattern: is not a valid regular expression"),
            "{}",
            v.message
        );
    }
    #[test]
    fn cloud_backends_are_checked_before_any_proxy_sees_them() {
        use modelgate_crds::{BedrockAuth as CrdBedrockAuth, BedrockSettings, VertexSettings};
        let mut idx = Index {
            policy: UpstreamPolicy::new(&["127.0.0.1/32".into()], &[]).unwrap(),
            ..Index::default()
        };
        idx.apply_secret(secret(
            "a",
            "aws",
            "keys",
            r#"{"Version":1,"AccessKeyId":"AKIDEXAMPLE","SecretAccessKey":"s3cr3t-value"}"#,
        ));
        idx.apply_secret(secret("a", "aws-bad", "keys", "AKIDEXAMPLE:s3cr3t-value"));
        idx.apply_secret(secret(
            "a",
            "sa",
            "key.json",
            r#"{"type":"service_account","client_email":"x@y","private_key":"not a key"}"#,
        ));
        let bedrock = |name: &str, secret: Option<(&str, &str)>, auth: Option<CrdBedrockAuth>| {
            let mut b = backend(name, Provider::Bedrock, secret);
            b.url = Some("http://127.0.0.1:9".into());
            b.bedrock = Some(BedrockSettings {
                region: "us-east-1".into(),
                auth,
                role_arn: (auth == Some(CrdBedrockAuth::WebIdentity))
                    .then(|| "arn:aws:iam::1:role/r".into()),
            });
            b
        };
        idx.apply_route(route(
            "a",
            "keys",
            "m1",
            vec![bedrock("b", Some(("aws", "keys")), None)],
            0,
        ));
        idx.apply_route(route(
            "a",
            "badkeys",
            "m2",
            vec![bedrock("b", Some(("aws-bad", "keys")), None)],
            0,
        ));
        idx.apply_route(route(
            "a",
            "irsa",
            "m3",
            vec![bedrock("b", None, Some(CrdBedrockAuth::WebIdentity))],
            0,
        ));
        idx.apply_route(route(
            "a",
            "podid",
            "m5",
            vec![bedrock("b", None, Some(CrdBedrockAuth::PodIdentity))],
            0,
        ));
        let mut vertex = backend("v", Provider::Vertex, Some(("sa", "key.json")));
        vertex.url = Some("http://127.0.0.1:9".into());
        vertex.vertex = Some(VertexSettings {
            project: "p".into(),
            location: "us-central1".into(),
            publisher: None,
            auth: None,
        });
        idx.apply_route(route("a", "badsa", "m4", vec![vertex], 0));
        let c = idx.compile(&Context::default());
        let v = |n: &str| c.verdicts[&ObjKey::route("a", n)].clone();
        assert!(v("keys").accepted, "{}", v("keys").message);
        for (name, reason, says) in [
            ("badkeys", "Invalid", "AccessKeyId and SecretAccessKey"),
            (
                "irsa",
                "AmbientIdentityNotAllowed",
                "proxy.allowAmbientIdentity",
            ),
            (
                "podid",
                "AmbientIdentityNotAllowed",
                "bedrock webIdentity or podIdentity",
            ),
            ("badsa", "Invalid", "'private_key' is not a PEM PKCS#8 key"),
        ] {
            assert_eq!(v(name).reason, reason, "{}", v(name).message);
            assert!(v(name).message.contains(says), "{}", v(name).message);
            assert!(!v(name).message.contains("s3cr3t"), "{}", v(name).message);
        }
        // What is sent builds in the proxy.
        modelgate_dataplane::config::compile(
            c.spec,
            Source::Operator,
            &modelgate_dataplane::snapshot::StateRegistry::default(),
            None,
        )
        .unwrap();
    }

    #[test]
    fn azure_backends_map_to_the_wire_with_their_settings_and_checks() {
        use modelgate_crds::{AzureAuth as CrdAuth, AzureSettings};
        let mut idx = Index {
            policy: UpstreamPolicy::new(&["127.0.0.1/32".into()], &[]).unwrap(),
            ..Index::default()
        };
        idx.apply_secret(secret("a", "azure", "key", "azure-key-0123\n"));
        let azure = |url: &str, settings: Option<AzureSettings>| {
            let mut b = backend("az", Provider::AzureOpenai, Some(("azure", "key")));
            b.url = Some(url.into());
            b.azure = settings;
            b
        };
        let settings = |d: Option<&str>, v: Option<&str>, auth: Option<CrdAuth>| {
            Some(AzureSettings {
                deployment: d.map(str::to_owned),
                api_version: v.map(str::to_owned),
                auth,
            })
        };
        idx.apply_route(route(
            "a",
            "classic",
            "m1",
            vec![azure(
                "http://127.0.0.1:9",
                settings(Some("gpt-4o"), Some("2024-10-21"), None),
            )],
            0,
        ));
        let mut v1 = azure(
            "http://127.0.0.1:9/openai/v1",
            settings(None, None, Some(CrdAuth::Bearer)),
        );
        v1.model = Some("gpt-4o-deployment".into());
        idx.apply_route(route("a", "v1", "m2", vec![v1], 0));
        idx.apply_route(route(
            "a",
            "nodeployment",
            "m3",
            vec![azure("http://127.0.0.1:9", None)],
            0,
        ));
        idx.apply_route(route(
            "a",
            "v1-with-version",
            "m4",
            vec![azure(
                "http://127.0.0.1:9/openai/v1",
                settings(None, Some("2024-10-21"), None),
            )],
            0,
        ));
        let mut elsewhere = azure(
            "http://10.0.0.1/openai/v1",
            settings(None, None, Some(CrdAuth::ApiKey)),
        );
        elsewhere.name = "far".into();
        idx.apply_route(route("a", "far", "m5", vec![elsewhere], 0));
        let c = idx.compile(&Context::default());
        let v = |n: &str| c.verdicts[&ObjKey::route("a", n)].clone();
        assert!(v("classic").accepted, "{}", v("classic").message);
        assert!(v("v1").accepted, "{}", v("v1").message);
        let b = |name: &str| {
            c.spec
                .routes
                .iter()
                .find(|r| r.name == name)
                .unwrap()
                .backends[0]
                .clone()
        };
        let classic = b("classic");
        assert_eq!(classic.provider, ProviderKind::AzureOpenai);
        assert_eq!(classic.url.as_deref(), Some("http://127.0.0.1:9"));
        assert_eq!(
            classic.azure,
            Some(AzureSpec {
                deployment: Some("gpt-4o".into()),
                api_version: Some("2024-10-21".into()),
                auth: AzureAuth::ApiKey,
            })
        );
        assert_eq!(
            classic.credentials.as_ref().unwrap().value.as_deref(),
            Some("azure-key-0123")
        );
        let v1 = b("v1");
        assert_eq!(v1.azure.as_ref().unwrap().auth, AzureAuth::Bearer);
        assert_eq!(v1.azure.as_ref().unwrap().deployment, None);
        assert_eq!(v1.model.as_deref(), Some("gpt-4o-deployment"));

        assert_eq!(v("nodeployment").reason, "Invalid");
        assert!(
            v("nodeployment").message.contains(
                "backends[0] (az).azure.deployment: is required unless url ends in /openai/v1"
            ),
            "{}",
            v("nodeployment").message
        );
        assert_eq!(v("v1-with-version").reason, "Invalid");
        assert!(
            v("v1-with-version")
                .message
                .contains("azure.apiVersion: must be absent when url ends in /openai/v1"),
            "{}",
            v("v1-with-version").message
        );
        assert_eq!(v("far").reason, "UpstreamNotAllowed");
        // The compiled snapshot builds in the proxy, Azure backends included.
        modelgate_dataplane::config::compile(
            c.spec,
            Source::Operator,
            &modelgate_dataplane::snapshot::StateRegistry::default(),
            None,
        )
        .unwrap();
    }

    #[test]
    fn keys_are_hashed_divided_and_minted() {
        let mut idx = Index::default();
        idx.apply_secret(secret("a", "raw", "k", "sk-0123456789abcdef"));
        idx.apply_key(apikey("a", "team", Some(("raw", "k"))));
        idx.apply_key(apikey("a", "twin", Some(("raw", "k"))));
        idx.apply_key(apikey("a", "minted", None));
        let c = idx.compile(&Context {
            serving: [("a".to_owned(), 2)].into(),
            exhausted: ["a/team".to_owned()].into(),
        });
        assert_eq!(c.spec.keys.len(), 1);
        let k = &c.spec.keys[0];
        assert_eq!(k.sha256, modelgate_wire::hash_key("sk-0123456789abcdef"));
        assert!(
            !serde_json::to_string(&c.spec)
                .unwrap()
                .contains("sk-0123456789abcdef")
        );
        assert_eq!(k.limits.as_ref().unwrap().requests_per_minute, Some(50));
        assert_eq!(k.limits.as_ref().unwrap().tokens_per_minute, Some(501));
        assert!(k.exhausted);
        assert_eq!(c.verdicts[&ObjKey::key("a", "twin")].reason, "DuplicateKey");
        assert_eq!(c.verdicts[&ObjKey::key("a", "minted")].reason, "Minting");
        assert_eq!(c.to_mint, vec![ObjKey::key("a", "minted")]);

        idx.apply_secret(secret(
            "a",
            &minted_secret_name("minted"),
            MINTED_KEY,
            "sk-minted-0123456789",
        ));
        let c = idx.compile(&Context::default());
        assert!(c.verdicts[&ObjKey::key("a", "minted")].accepted);
        assert!(c.to_mint.is_empty());
    }

    #[test]
    fn version_changes_only_with_content() {
        let mut idx = Index::default();
        idx.apply_route(route(
            "a",
            "r",
            "m",
            vec![backend("b", Provider::Mock, None)],
            0,
        ));
        let v1 = idx.compile(&Context::default()).spec.version;
        assert_eq!(v1, idx.compile(&Context::default()).spec.version);
        idx.apply_route(route(
            "a",
            "r",
            "m2",
            vec![backend("b", Provider::Mock, None)],
            0,
        ));
        assert_ne!(v1, idx.compile(&Context::default()).spec.version);
        // The compiled snapshot passes the proxy's validation as a whole.
        let c = idx.compile(&Context::default());
        modelgate_dataplane::config::compile(
            c.spec,
            Source::Operator,
            &modelgate_dataplane::snapshot::StateRegistry::default(),
            None,
        )
        .unwrap();
    }
}
