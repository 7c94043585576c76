//! Routes, backends and how one is picked.
//!
//! ```text
//!  RouteTable: namespace ─► model or alias ─► Route
//!  Route ─► tiers (by priority, lower first) ─► Backends (weight, provider, pricing)
//!  Backend ─► BackendState (EWMA latency, in-flight, consecutive failures, ejection)
//! ```
//!
//! `BackendState` outlives snapshots: a reload that keeps a backend's name keeps its health.
//! Its in-flight count is only ever raised through an [`InFlight`] guard, so an attempt whose
//! future is dropped (the client left mid-call) still takes itself out of the count.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::HeaderValue;

use crate::providers::mock::MockSettings;
use crate::providers::openai::Upstream;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Strategy {
    /// Random by weight.
    #[default]
    Weighted,
    /// Power of two choices over weighted picks, preferring the lower latency × load.
    LeastLatency,
    /// The cheapest backend by pricing; ties by weight.
    LowestCost,
}

/// Failures that may be retried (and fall through to the next tier).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryOn {
    /// Connection refused, reset or TLS failure before a response.
    Connect,
    /// The attempt ran past its timeout.
    Timeout,
    /// Upstream answered 429.
    RateLimited,
    /// Upstream answered 5xx.
    ServerError,
}

impl RetryOn {
    pub const ALL: [RetryOn; 4] = [
        Self::Connect,
        Self::Timeout,
        Self::RateLimited,
        Self::ServerError,
    ];
}

#[derive(Clone, Debug)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub on: Vec<RetryOn>,
    /// A prompt too long for a backend's window falls to the next tier (`contextLength`).
    pub context_length: bool,
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 2,
            on: RetryOn::ALL.to_vec(),
            context_length: false,
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
        }
    }
}

impl RetryPolicy {
    /// Exponential backoff with full jitter in its upper half.
    pub fn backoff(&self, retry: u32) -> Duration {
        let base = self
            .backoff
            .saturating_mul(1u32 << retry.min(16))
            .min(self.max_backoff);
        let half = base / 2;
        half + Duration::from_nanos(fastrand::u64(0..=half.as_nanos() as u64))
    }
}

#[derive(Clone, Debug)]
pub struct OutlierPolicy {
    pub consecutive_failures: u32,
    pub ejection_time: Duration,
    pub max_ejection_time: Duration,
}

impl Default for OutlierPolicy {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Pricing {
    pub input_per_million: f64,
    pub output_per_million: f64,
    /// Prompt tokens read from the provider's cache (the input price when not configured).
    pub cache_read_per_million: f64,
    /// Prompt tokens written to the provider's cache (the input price when not configured).
    pub cache_write_per_million: f64,
}

impl Pricing {
    /// Prices with both cache kinds at the input price.
    pub fn flat(input_per_million: f64, output_per_million: f64) -> Self {
        Self {
            input_per_million,
            output_per_million,
            cache_read_per_million: input_per_million,
            cache_write_per_million: input_per_million,
        }
    }

    /// What `input` uncached prompt tokens and `output` tokens cost.
    pub fn cost(&self, input: u64, output: u64) -> f64 {
        (input as f64 * self.input_per_million + output as f64 * self.output_per_million) / 1e6
    }

    /// The most `prompt` prompt tokens and `output` output tokens can cost: every prompt
    /// token at the dearest prompt price (uncached, read from or written to a cache).
    pub fn worst_case(&self, prompt: u64, output: u64) -> f64 {
        let prompt_price = self
            .input_per_million
            .max(self.cache_read_per_million)
            .max(self.cache_write_per_million);
        (prompt as f64 * prompt_price + output as f64 * self.output_per_million) / 1e6
    }

    /// What a reported usage costs, each kind at its price; reasoning is inside `output`.
    pub fn cost_of(&self, u: &crate::canonical::Usage) -> f64 {
        let n = |v: Option<u64>| v.unwrap_or(0) as f64;
        (n(u.input) * self.input_per_million
            + n(u.cache_read) * self.cache_read_per_million
            + n(u.cache_write) * self.cache_write_per_million
            + n(u.output) * self.output_per_million)
            / 1e6
    }
}

/// An upstream credential, ready to be injected. Redacted in `Debug`; never logged.
#[derive(Clone)]
pub struct Credential {
    bearer: HeaderValue,
    raw: HeaderValue,
}

impl Credential {
    /// A credential from the raw key; `None` if it cannot travel in a header.
    pub fn bearer(raw: &str) -> Option<Self> {
        let sensitive = |s: &str| {
            let mut v = HeaderValue::from_str(s).ok()?;
            v.set_sensitive(true);
            Some(v)
        };
        Some(Self {
            bearer: sensitive(&format!("Bearer {raw}"))?,
            raw: sensitive(raw)?,
        })
    }

    /// `Bearer <key>`, for `Authorization`.
    pub fn header(&self) -> &HeaderValue {
        &self.bearer
    }

    /// The key alone, for `x-api-key` or `api-key`.
    pub fn raw(&self) -> &HeaderValue {
        &self.raw
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Credential(<redacted>)")
    }
}

#[derive(Debug)]
pub enum Provider {
    /// OpenAI and every server that speaks its wire format.
    OpenAi(Box<Upstream>),
    /// Anthropic's Messages API: requests and answers translated.
    Anthropic(Box<crate::providers::anthropic::Upstream>),
    /// Azure OpenAI: OpenAI's chat format at Azure's URLs, with Azure's auth headers.
    Azure(Box<crate::providers::azure::Upstream>),
    /// AWS Bedrock's Converse API, SigV4-signed: requests and answers translated.
    Bedrock(Box<crate::providers::bedrock::Upstream>),
    /// Google's Gemini API with an API key: requests and answers translated.
    Gemini(Box<crate::providers::gemini::Upstream>),
    /// Google Vertex AI: Gemini's API or Anthropic's, with an OAuth2 token.
    Vertex(Box<crate::providers::vertex::Upstream>),
    /// The built-in mock model: no network.
    Mock(MockSettings),
}

impl Provider {
    /// The API the backend answers a client of `client`'s dialect in, for translation:
    /// OpenAI (and Azure's v1 API) answer Responses clients in kind, other OpenAI-shaped
    /// servers and the mock in chat.
    pub fn dialect(&self, client: crate::translate::Dialect) -> crate::translate::Dialect {
        use crate::translate::Dialect;
        match self {
            Self::OpenAi(u) if client == Dialect::OpenAiResponses && u.responses => client,
            Self::Azure(u) if client == Dialect::OpenAiResponses && u.responses => client,
            Self::OpenAi(_) | Self::Azure(_) | Self::Mock(_) => Dialect::OpenAiChat,
            Self::Anthropic(_) => crate::translate::Dialect::Anthropic,
            Self::Bedrock(_) => crate::translate::Dialect::Bedrock,
            Self::Gemini(_) => crate::translate::Dialect::Gemini,
            Self::Vertex(v) => match v.publisher {
                modelgate_wire::VertexPublisher::Anthropic => crate::translate::Dialect::Anthropic,
                _ => crate::translate::Dialect::Gemini,
            },
        }
    }
}

/// What a request asks of a backend, for `lowest-cost`: its prompt estimate and its
/// output reservation, in tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Demand {
    pub prompt: u64,
    pub output: u64,
}

/// Live health of one backend, shared across snapshots.
#[derive(Debug)]
pub struct BackendState {
    /// EWMA of time to the first bytes of a stream (or the whole answer), in microseconds, as f64 bits; 0 = no sample yet.
    ewma_us: AtomicU64,
    in_flight: AtomicU32,
    consecutive_failures: AtomicU32,
    ejections: AtomicU32,
    /// Milliseconds since `epoch` until which the backend is ejected; 0 = not ejected.
    ejected_until_ms: AtomicU64,
    epoch: Instant,
    /// EWMA of the shares of reported prompt tokens read from and written to the provider's
    /// cache, as f64 bits (`lowest-cost` prices a prompt by them); unset until a report.
    cache_read_share: AtomicU64,
    cache_write_share: AtomicU64,
    mix_sampled: std::sync::atomic::AtomicBool,
}

impl Default for BackendState {
    fn default() -> Self {
        Self {
            ewma_us: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            cache_read_share: AtomicU64::new(0),
            cache_write_share: AtomicU64::new(0),
            mix_sampled: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl BackendState {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub fn is_ejected(&self) -> bool {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        until != 0 && self.now_ms() < until
    }

    /// Attempts on their way to this backend right now.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Count one attempt in flight until the guard drops.
    pub fn start_attempt(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    pub fn ewma(&self) -> f64 {
        f64::from_bits(self.ewma_us.load(Ordering::Relaxed))
    }

    /// A successful attempt: record its latency and forgive earlier failures.
    pub fn record_success(&self, latency: Duration) {
        const ALPHA: f64 = 0.3;
        let sample = latency.as_micros() as f64;
        let old = self.ewma();
        let new = if old == 0.0 {
            sample
        } else {
            old + ALPHA * (sample - old)
        };
        self.ewma_us.store(new.to_bits(), Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        if self.ejected_until_ms.load(Ordering::Relaxed) != 0 && !self.is_ejected() {
            self.ejected_until_ms.store(0, Ordering::Relaxed);
            self.ejections.store(0, Ordering::Relaxed);
        }
    }

    /// A usage report: how its prompt split between uncached, cache-read and cache-written
    /// tokens moves the backend's expected mix. Concurrent reports may each miss the other's
    /// update; the mix is an estimate either way.
    pub fn record_prompt_mix(&self, u: &crate::canonical::Usage) {
        const ALPHA: f64 = 0.2;
        let n = |v: Option<u64>| v.unwrap_or(0) as f64;
        let total = n(u.input) + n(u.cache_read) + n(u.cache_write);
        if total <= 0.0 {
            return;
        }
        let first = !self.mix_sampled.swap(true, Ordering::Relaxed);
        for (share, v) in [
            (&self.cache_read_share, n(u.cache_read) / total),
            (&self.cache_write_share, n(u.cache_write) / total),
        ] {
            let old = f64::from_bits(share.load(Ordering::Relaxed));
            let new = if first { v } else { old + ALPHA * (v - old) };
            share.store(new.to_bits(), Ordering::Relaxed);
        }
    }

    /// The expected shares of a prompt read from and written to the cache (none before the
    /// first report).
    pub fn prompt_mix(&self) -> (f64, f64) {
        if !self.mix_sampled.load(Ordering::Relaxed) {
            return (0.0, 0.0);
        }
        let get = |a: &AtomicU64| f64::from_bits(a.load(Ordering::Relaxed)).clamp(0.0, 1.0);
        let read = get(&self.cache_read_share);
        (read, get(&self.cache_write_share).min(1.0 - read))
    }

    /// A failed attempt. Returns true when this failure ejected the backend.
    pub fn record_failure(&self, policy: &OutlierPolicy, may_eject: bool) -> bool {
        let n = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n < policy.consecutive_failures || !may_eject || self.is_ejected() {
            return false;
        }
        let times = self.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let span = policy
            .ejection_time
            .saturating_mul(times)
            .min(policy.max_ejection_time);
        self.ejected_until_ms.store(
            self.now_ms() + span.as_millis().max(1) as u64,
            Ordering::Relaxed,
        );
        self.consecutive_failures.store(0, Ordering::Relaxed);
        true
    }
}

/// One attempt counted in its backend's in-flight gauge (which `least-latency` weighs).
#[derive(Debug)]
#[must_use = "the attempt counts as in flight only while the guard lives"]
pub struct InFlight(Arc<BackendState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug)]
pub struct Backend {
    /// `namespace/route`, for metrics.
    pub route_id: String,
    pub name: String,
    pub provider: Provider,
    pub upstream_model: Option<String>,
    pub weight: u32,
    pub timeout: Option<Duration>,
    pub pricing: Pricing,
    pub state: Arc<BackendState>,
    /// Metric handles: linked to the existing ones when the snapshot goes live, else made at
    /// first use; shared with every snapshot in which the backend keeps its name.
    series: std::sync::OnceLock<Arc<crate::metrics::BackendSeries>>,
}

impl Backend {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        route_id: &str,
        name: &str,
        provider: Provider,
        upstream_model: Option<String>,
        weight: u32,
        timeout: Option<Duration>,
        pricing: Pricing,
        state: Arc<BackendState>,
    ) -> Self {
        Self {
            route_id: route_id.to_owned(),
            name: name.to_owned(),
            provider,
            upstream_model,
            weight,
            timeout,
            pricing,
            state,
            series: std::sync::OnceLock::new(),
        }
    }

    /// This backend's metric handles, resolved by name once per backend object.
    pub fn series(&self, metrics: &crate::metrics::Metrics) -> &crate::metrics::BackendSeries {
        self.series
            .get_or_init(|| metrics.backend(&self.route_id, &self.name))
    }

    /// This backend's metric handles, to hold beyond a borrow (a shadow call's task does).
    pub fn shared_series(
        &self,
        metrics: &crate::metrics::Metrics,
    ) -> Arc<crate::metrics::BackendSeries> {
        self.series
            .get_or_init(|| metrics.backend(&self.route_id, &self.name))
            .clone()
    }

    /// Hand the backend the handles its name already has (a snapshot swap does).
    pub fn link_series(&self, series: Arc<crate::metrics::BackendSeries>) {
        let _ = self.series.set(series);
    }

    /// What `demand` is expected to cost here: the prompt at each kind's price in the
    /// shares this backend's reports showed (all uncached before any), the output at the
    /// output price.
    pub fn expected_cost(&self, demand: Demand) -> f64 {
        let p = &self.pricing;
        let (read, write) = self.state.prompt_mix();
        let prompt_price = (1.0 - read - write) * p.input_per_million
            + read * p.cache_read_per_million
            + write * p.cache_write_per_million;
        (demand.prompt as f64 * prompt_price + demand.output as f64 * p.output_per_million) / 1e6
    }

    /// Identity within a snapshot, for "already tried" bookkeeping.
    pub fn id(&self) -> usize {
        std::ptr::from_ref(self) as usize
    }
}

#[derive(Debug)]
pub struct Tier {
    pub priority: u32,
    pub backends: Vec<Arc<Backend>>,
}

#[derive(Debug)]
pub struct Route {
    /// `namespace/name`, for metrics and logs.
    pub id: String,
    pub namespace: String,
    pub model: String,
    pub aliases: Vec<String>,
    pub strategy: Strategy,
    pub timeout: Option<Duration>,
    pub retry: RetryPolicy,
    pub outlier: OutlierPolicy,
    /// Largest `max_tokens` / `max_completion_tokens` a request may ask for.
    pub max_output_tokens: Option<u64>,
    /// A streamed answer ends with an error event after this long without upstream bytes.
    pub stream_idle_timeout: Option<Duration>,
    /// The longest a streamed answer may last after its headers.
    pub stream_timeout: Option<Duration>,
    /// Spend guard: the most a request's worst case may cost, USD.
    pub max_cost_per_request: Option<f64>,
    /// The candidate backend that sees a sampled copy of the traffic.
    /// The route's response cache (`cache`): None, off.
    pub cache: Option<Arc<crate::cache::Policy>>,
    pub shadow: Option<crate::shadow::Shadow>,
    /// Data masking rules for prompts (and answers, when the route asks).
    pub masking: Option<Arc<crate::mask::Masker>>,
    pub tiers: Vec<Tier>,
}

impl Route {
    pub fn backends(&self) -> impl Iterator<Item = &Arc<Backend>> {
        self.tiers.iter().flat_map(|t| t.backends.iter())
    }

    /// The most a request of `demand` can cost on any backend of the route (the shadow's
    /// calls are not the request's), and that backend: what admission reserves against a
    /// USD budget and holds to the spend guards.
    pub fn worst_case_cost(&self, demand: Demand) -> (f64, Option<&Backend>) {
        self.backends()
            .map(|b| (b.pricing.worst_case(demand.prompt, demand.output), b))
            .fold((0.0, None), |(max, at), (cost, b)| {
                if at.is_none() || cost > max {
                    (cost, Some(b.as_ref()))
                } else {
                    (max, at)
                }
            })
    }

    /// Outlier ejection never takes the last healthy backend of a route.
    pub fn may_eject(&self, which: &Backend) -> bool {
        self.backends()
            .any(|b| !std::ptr::eq(b.as_ref(), which) && !b.state.is_ejected())
    }

    /// Pick a backend of `tier`: healthy ones not `tried` yet first, then healthy ones again
    /// (a retry on the only backend), then ejected ones (better than failing outright).
    /// None only when the tier has no backend with a positive weight.
    pub fn pick(&self, tier: &Tier, tried: &[usize], demand: Demand) -> Option<Arc<Backend>> {
        let fresh = |b: &Arc<Backend>| !tried.contains(&b.id());
        let usable = || tier.backends.iter().filter(|b| b.weight > 0);
        let mut candidates: Vec<&Arc<Backend>> = usable()
            .filter(|b| !b.state.is_ejected() && fresh(b))
            .collect();
        if candidates.is_empty() {
            candidates = usable().filter(|b| !b.state.is_ejected()).collect();
        }
        if candidates.is_empty() {
            candidates = usable().collect();
        }
        if candidates.is_empty() {
            return None;
        }
        let chosen = match self.strategy {
            Strategy::Weighted => weighted(&candidates),
            Strategy::LeastLatency => {
                // Power of two choices: two distinct weighted draws, the cheaper one wins.
                let a = weighted(&candidates);
                let others: Vec<&Arc<Backend>> = candidates
                    .iter()
                    .copied()
                    .filter(|c| !Arc::ptr_eq(c, a))
                    .collect();
                if others.is_empty() {
                    a
                } else {
                    let b = weighted(&others);
                    let cost = |x: &Backend| {
                        let inflight = f64::from(x.state.in_flight());
                        // Unmeasured backends look fast, so they get probed.
                        x.state.ewma() * (inflight + 1.0)
                    };
                    if cost(b) < cost(a) { b } else { a }
                }
            }
            Strategy::LowestCost => {
                // This request's expected cost at each backend: a long prompt favours cheap
                // input, a long answer cheap output, a backend whose reports show cache
                // hits its cache-read price.
                let costs: Vec<f64> = candidates.iter().map(|b| b.expected_cost(demand)).collect();
                let min = costs.iter().copied().fold(f64::INFINITY, f64::min);
                let cheapest: Vec<&Arc<Backend>> = candidates
                    .into_iter()
                    .zip(costs)
                    .filter(|(_, c)| *c <= min)
                    .map(|(b, _)| b)
                    .collect();
                weighted(&cheapest)
            }
        };
        Some(chosen.clone())
    }
}

fn weighted<'a>(candidates: &[&'a Arc<Backend>]) -> &'a Arc<Backend> {
    let total: u64 = candidates.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return candidates[fastrand::usize(..candidates.len())];
    }
    let mut point = fastrand::u64(..total);
    for b in candidates {
        let w = u64::from(b.weight);
        if point < w {
            return b;
        }
        point -= w;
    }
    candidates[candidates.len() - 1]
}

/// namespace → public model name or alias → route.
#[derive(Debug, Default)]
pub struct RouteTable {
    by_namespace: HashMap<String, HashMap<String, Arc<Route>>>,
    /// Each route once (the map holds one under every name it answers to).
    routes: Vec<Arc<Route>>,
}

impl RouteTable {
    pub fn new(routes: Vec<Arc<Route>>) -> Self {
        let mut by_namespace: HashMap<String, HashMap<String, Arc<Route>>> = HashMap::new();
        for r in &routes {
            let ns = by_namespace.entry(r.namespace.clone()).or_default();
            for m in std::iter::once(&r.model).chain(r.aliases.iter()) {
                ns.insert(m.clone(), r.clone());
            }
        }
        Self {
            by_namespace,
            routes,
        }
    }

    pub fn routes(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.routes.iter()
    }

    pub fn get(&self, namespace: &str, model: &str) -> Option<&Arc<Route>> {
        self.by_namespace.get(namespace)?.get(model)
    }

    /// Every public name (models and aliases) of a namespace, sorted.
    pub fn names(&self, namespace: &str) -> Vec<&str> {
        let mut v: Vec<&str> = self
            .by_namespace
            .get(namespace)
            .map(|m| m.keys().map(String::as_str).collect())
            .unwrap_or_default();
        v.sort_unstable();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(name: &str, weight: u32) -> Arc<Backend> {
        Arc::new(Backend::new(
            "default/r",
            name,
            Provider::Mock(MockSettings::default()),
            None,
            weight,
            None,
            Pricing::default(),
            Arc::default(),
        ))
    }

    fn route(backends: Vec<Arc<Backend>>, strategy: Strategy) -> Route {
        Route {
            id: "default/r".into(),
            namespace: "default".into(),
            model: "m".into(),
            aliases: vec![],
            strategy,
            timeout: None,
            retry: RetryPolicy::default(),
            outlier: OutlierPolicy {
                consecutive_failures: 2,
                ejection_time: Duration::from_secs(60),
                max_ejection_time: Duration::from_secs(60),
            },
            max_output_tokens: None,
            stream_idle_timeout: None,
            stream_timeout: None,
            max_cost_per_request: None,
            shadow: None,
            cache: None,
            masking: None,
            tiers: vec![Tier {
                priority: 0,
                backends,
            }],
        }
    }

    #[test]
    fn weighted_split_follows_weights() {
        let r = route(vec![backend("a", 80), backend("b", 20)], Strategy::Weighted);
        let mut a = 0;
        for _ in 0..10_000 {
            if r.pick(&r.tiers[0], &[], Demand::default()).unwrap().name == "a" {
                a += 1;
            }
        }
        assert!((7_600..=8_400).contains(&a), "a picked {a} of 10000");
    }

    #[test]
    fn ejection_skips_a_backend_but_never_the_last() {
        let r = route(vec![backend("a", 1), backend("b", 1)], Strategy::Weighted);
        let (a, b) = (&r.tiers[0].backends[0], &r.tiers[0].backends[1]);
        assert!(!a.state.record_failure(&r.outlier, r.may_eject(a)));
        assert!(a.state.record_failure(&r.outlier, r.may_eject(a)));
        for _ in 0..100 {
            assert_eq!(
                r.pick(&r.tiers[0], &[], Demand::default()).unwrap().name,
                "b"
            );
        }
        b.state.record_failure(&r.outlier, r.may_eject(b));
        assert!(
            !b.state.record_failure(&r.outlier, r.may_eject(b)),
            "last healthy backend stays"
        );
        assert!(!b.state.is_ejected());
    }

    #[test]
    fn tried_backends_are_skipped_while_others_remain() {
        let r = route(
            vec![backend("a", 1), backend("b", 1)],
            Strategy::LeastLatency,
        );
        let first = r.pick(&r.tiers[0], &[], Demand::default()).unwrap();
        let second = r
            .pick(&r.tiers[0], &[first.id()], Demand::default())
            .unwrap();
        assert_ne!(first.name, second.name);
        // Once all were tried, retries may go to any of them again.
        assert!(
            r.pick(&r.tiers[0], &[first.id(), second.id()], Demand::default())
                .is_some()
        );
    }

    #[test]
    fn least_latency_prefers_the_faster_backend() {
        let r = route(
            vec![backend("slow", 1), backend("fast", 1)],
            Strategy::LeastLatency,
        );
        r.tiers[0].backends[0]
            .state
            .record_success(Duration::from_millis(50));
        r.tiers[0].backends[1]
            .state
            .record_success(Duration::from_millis(5));
        let fast = (0..1000)
            .filter(|_| r.pick(&r.tiers[0], &[], Demand::default()).unwrap().name == "fast")
            .count();
        // With two backends, two distinct draws always compare both.
        assert_eq!(fast, 1000, "fast picked {fast} of 1000");
    }

    fn priced(name: &str, pricing: Pricing) -> Arc<Backend> {
        Arc::new(Backend::new(
            "default/r",
            name,
            Provider::Mock(MockSettings::default()),
            None,
            1,
            None,
            pricing,
            Arc::default(),
        ))
    }

    #[test]
    fn lowest_cost_prices_the_requests_own_prompt_and_output() {
        // Summed per million (the old rule) cheap-out always wins: 7 against 11.
        let r = route(
            vec![
                priced("cheap-in", Pricing::flat(1.0, 10.0)),
                priced("cheap-out", Pricing::flat(5.0, 2.0)),
            ],
            Strategy::LowestCost,
        );
        let pick = |prompt, output| {
            r.pick(&r.tiers[0], &[], Demand { prompt, output })
                .unwrap()
                .name
                .clone()
        };
        // A long prompt and a short answer: 10000·1 + 100·10 against 10000·5 + 100·2.
        assert_eq!(pick(10_000, 100), "cheap-in");
        // A short prompt and a long answer: 100·1 + 4000·10 against 100·5 + 4000·2.
        assert_eq!(pick(100, 4_000), "cheap-out");
    }

    #[test]
    fn lowest_cost_prices_a_prompt_by_the_cache_hits_a_backend_reports() {
        let caching = Pricing {
            cache_read_per_million: 0.3,
            ..Pricing::flat(3.0, 10.0)
        };
        let r = route(
            vec![
                priced("caching", caching),
                priced("plain", Pricing::flat(2.0, 10.0)),
            ],
            Strategy::LowestCost,
        );
        let demand = Demand {
            prompt: 10_000,
            output: 100,
        };
        let pick = || r.pick(&r.tiers[0], &[], demand).unwrap().name.clone();
        // Before any report a prompt is priced uncached: 3 against 2 per million.
        assert_eq!(pick(), "plain");
        // Reports say nine tenths of its prompts are cache reads: 0.1·3 + 0.9·0.3 = 0.57.
        let state = &r.tiers[0].backends[0].state;
        state.record_prompt_mix(&crate::canonical::Usage {
            input: Some(100),
            cache_read: Some(900),
            output: Some(5),
            ..Default::default()
        });
        assert_eq!(state.prompt_mix(), (0.9, 0.0));
        assert_eq!(pick(), "caching");
        // Cache misses later move the mix back, a report at a time.
        for _ in 0..20 {
            state.record_prompt_mix(&crate::canonical::Usage {
                input: Some(1000),
                ..Default::default()
            });
        }
        assert_eq!(pick(), "plain");
    }

    #[test]
    fn the_worst_case_is_the_dearest_backend_at_its_dearest_prompt_price() {
        let writes_dear = Pricing {
            cache_write_per_million: 4.0,
            ..Pricing::flat(3.0, 15.0)
        };
        let r = route(
            vec![
                priced("a", Pricing::flat(5.0, 10.0)),
                priced("b", writes_dear),
            ],
            Strategy::Weighted,
        );
        // 1000 prompt + 100 output: a 5000 + 1000, b 1000·4 (cache writes) + 1500.
        let (cost, at) = r.worst_case_cost(Demand {
            prompt: 1000,
            output: 100,
        });
        assert_eq!(at.unwrap().name, "a");
        assert!((cost - 0.006).abs() < 1e-12, "{cost}");
        // 100 prompt + 1000 output: a 500 + 10000, b 400 + 15000.
        let (cost, at) = r.worst_case_cost(Demand {
            prompt: 100,
            output: 1000,
        });
        assert_eq!(at.unwrap().name, "b");
        assert!((cost - 0.0154).abs() < 1e-12, "{cost}");
        // Unpriced backends cost nothing, and a route of them too.
        let free = route(vec![backend("x", 1)], Strategy::Weighted);
        assert_eq!(free.worst_case_cost(Demand::default()).0, 0.0);
    }

    #[test]
    fn in_flight_guards_count_until_dropped() {
        let state = Arc::new(BackendState::default());
        let a = state.start_attempt();
        let b = state.start_attempt();
        assert_eq!(state.in_flight(), 2);
        drop(a);
        assert_eq!(state.in_flight(), 1);
        drop(b);
        assert_eq!(state.in_flight(), 0);
    }
}
