//! The response cache: a route's exact-match cache of whole and streamed answers.
//!
//! ```text
//!  request ─► key (sha256: namespace, route, [key id], endpoint, shape, normalized body)
//!     ─► memory tier (LRU by bytes, TTL on read) ─► Redis tier (optional, shared) ─► upstream
//!  answer (200, complete) ─► Fill: the bytes the client got, usage and cost ─► both tiers
//! ```
//!
//! A request is looked up after its key is authenticated and its route resolved (so a key
//! of another namespace can never reach an entry: the namespace is part of the hash) and
//! before limits: a hit makes no upstream call and charges only the route's
//! `hitCostFraction` of the original tokens and cost. What is stored is what the client got,
//! byte for byte, in its own dialect: a stream is replayed as the same events. The request's
//! shape (whole, stream, stream with usage) is part of the key, so a stream never answers a
//! whole request or the reverse.
//!
//! The Redis tier speaks just enough RESP2 (GET, SET PX) over a pooled TCP connection with a
//! short deadline, reads bounded replies, and trips a circuit on any failure: for a few
//! seconds after, Redis is skipped, so a dead Redis costs nothing and the proxy keeps serving.
//! Entries there are a versioned binary encoding, decoded as hostile input.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, header};
use http_body::{Body, Frame};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::canonical::Usage;
use crate::stream::MeteredStream;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The memory tier's budget when the proxy's config names none.
pub const DEFAULT_MEMORY_BYTES: u64 = 64 << 20;
/// How long one Redis command may take, connect included, when the config names nothing.
pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(50);
/// After a Redis failure, Redis is not asked for this long.
const REDIS_CIRCUIT_OPEN: Duration = Duration::from_secs(3);
/// Unreadable entries in Redis are logged at most this often.
const UNREADABLE_WARN_EVERY: Duration = Duration::from_secs(10);
/// Idle Redis connections kept for reuse.
const REDIS_POOL: usize = 16;
/// The longest status or error line a Redis reply may have.
const MAX_REPLY_LINE: usize = 4096;
/// What every entry costs the byte budget besides its body (its bookkeeping).
const ENTRY_OVERHEAD: usize = 160;
/// Request fields that do not change the answer (or are part of the shape instead).
const IGNORED_FIELDS: [&str; 5] = ["model", "stream", "stream_options", "user", "metadata"];
const ENTRY_MAGIC: &[u8; 4] = b"MGC\x01";

/// A route's cache settings, compiled from its `cache` spec.
#[derive(Debug)]
pub struct Policy {
    pub ttl: Duration,
    pub max_entry_bytes: usize,
    pub per_key: bool,
    pub cache_sampled: bool,
    pub hit_cost_fraction: f64,
    /// This route's metric handles, resolved at its first request; holding them keeps
    /// them in `/metrics` while this policy's snapshot is alive.
    series: OnceLock<Arc<crate::metrics::RouteSeries>>,
}

impl Policy {
    pub fn of(spec: &modelgate_wire::CacheSpec) -> Self {
        let ttl = spec
            .ttl
            .as_deref()
            .unwrap_or(modelgate_wire::DEFAULT_CACHE_TTL);
        Self {
            ttl: modelgate_wire::check::duration(ttl),
            max_entry_bytes: spec
                .max_entry_bytes
                .unwrap_or(modelgate_wire::DEFAULT_CACHE_MAX_ENTRY_BYTES)
                .min(modelgate_wire::MAX_CACHE_ENTRY_BYTES) as usize,
            per_key: spec.per_key,
            cache_sampled: spec.cache_sampled,
            hit_cost_fraction: if spec.hit_cost_fraction.is_finite() {
                spec.hit_cost_fraction.clamp(0.0, 1.0)
            } else {
                0.0
            },
            series: OnceLock::new(),
        }
    }

    pub fn series(&self, metrics: &crate::metrics::Metrics, route: &str) -> &Series {
        self.series.get_or_init(|| metrics.route(route)).cache()
    }
}

/// What the cache did for a request (`x-modelgate-cache`, the metric's `result`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Hit,
    Miss,
    Bypass,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Bypass => "bypass",
        }
    }
}

/// What the client's `Cache-Control` allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Directive {
    /// `no-cache`: answer from upstream (the fresh answer may still be stored).
    pub lookup: bool,
    /// `no-store`: do not keep this answer.
    pub store: bool,
}

pub fn directive(headers: &HeaderMap) -> Directive {
    let mut d = Directive {
        lookup: true,
        store: true,
    };
    for v in headers.get_all(header::CACHE_CONTROL) {
        let Ok(v) = v.to_str() else { continue };
        for token in v.split(',') {
            let token = token.trim();
            if token.eq_ignore_ascii_case("no-cache") {
                d.lookup = false;
            } else if token.eq_ignore_ascii_case("no-store") {
                d.store = false;
            }
        }
    }
    d
}

/// How the client asked for the answer: the bytes differ, so the key does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    Whole,
    Stream { usage: bool },
}

impl Shape {
    fn byte(self) -> u8 {
        match self {
            Self::Whole => 0,
            Self::Stream { usage: false } => 1,
            Self::Stream { usage: true } => 2,
        }
    }
}

/// An entry's address: SHA-256 of everything that decides the answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey(pub [u8; 32]);

impl CacheKey {
    fn redis_key(&self) -> Vec<u8> {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut k = b"modelgate:cache:v1:".to_vec();
        for b in self.0 {
            k.push(HEX[usize::from(b >> 4)]);
            k.push(HEX[usize::from(b & 15)]);
        }
        k
    }
}

/// What identifies a request's answer besides its body.
pub struct Scope<'a> {
    pub namespace: &'a str,
    /// The route the request resolved to (`namespace/name`): its aliases share entries.
    pub route: &'a str,
    /// The key's id when the route keeps entries per key.
    pub key_id: Option<&'a str>,
    pub endpoint: &'a str,
    pub shape: Shape,
}

/// The request's key, or None when its body is not a JSON object (never cached).
pub fn key_of(scope: &Scope<'_>, body: &serde_json::Value) -> Option<CacheKey> {
    let serde_json::Value::Object(fields) = body else {
        return None;
    };
    let mut h = Sha256::new();
    let mut field = |b: &[u8]| {
        h.update((b.len() as u64).to_le_bytes());
        h.update(b);
    };
    field(b"modelgate-cache-v1");
    field(scope.namespace.as_bytes());
    field(scope.route.as_bytes());
    field(scope.key_id.unwrap_or("").as_bytes());
    field(scope.endpoint.as_bytes());
    field(&[scope.shape.byte()]);
    let mut canon = Vec::with_capacity(256);
    let mut names: Vec<_> = fields
        .iter()
        .filter(|(k, _)| !IGNORED_FIELDS.contains(&k.as_str()))
        .collect();
    names.sort_by(|a, b| a.0.cmp(b.0));
    canon.push(b'{');
    for (i, (k, v)) in names.into_iter().enumerate() {
        if i > 0 {
            canon.push(b',');
        }
        write_canonical(&serde_json::Value::String(k.clone()), &mut canon);
        canon.push(b':');
        write_canonical(v, &mut canon);
    }
    canon.push(b'}');
    field(&canon);
    Some(CacheKey(h.finalize().into()))
}

/// JSON with object keys sorted, whatever order they came in. serde_json's parser bounds
/// the nesting, so the recursion is bounded too.
fn write_canonical(v: &serde_json::Value, out: &mut Vec<u8>) {
    match v {
        serde_json::Value::Object(m) => {
            let mut names: Vec<_> = m.iter().collect();
            names.sort_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (k, v)) in names.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                let _ = serde_json::to_writer(&mut *out, k);
                out.push(b':');
                write_canonical(v, out);
            }
            out.push(b'}');
        }
        serde_json::Value::Array(a) => {
            out.push(b'[');
            for (i, v) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(v, out);
            }
            out.push(b']');
        }
        other => {
            let _ = serde_json::to_writer(&mut *out, other);
        }
    }
}

/// Whether the request samples (`temperature > 0`): its answers vary by design. A request
/// without `temperature` counts as not sampled: the route opted in to caching.
pub fn sampled(body: &serde_json::Value) -> bool {
    body.get("temperature")
        .and_then(serde_json::Value::as_f64)
        .is_some_and(|t| t > 0.0)
}

/// A stored answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub status: u16,
    /// The answer was an event stream (replayed as one).
    pub stream: bool,
    pub content_type: String,
    /// The whole answer as the client got it (a stream's events included).
    pub body: Bytes,
    /// What the original answer used and cost, for the hit's savings and its charge.
    pub usage: Usage,
    pub cost_usd: f64,
    /// When the entry stops being served, in Unix milliseconds (also across proxies).
    pub expires_unix_ms: u64,
}

/// Why a stored entry could not be read back.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("not a cache entry of this version")]
    Version,
    #[error("the entry is cut short")]
    Truncated,
    #[error("the entry's {0} is invalid")]
    Invalid(&'static str),
    #[error("the entry's body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("the entry is not sealed, and this proxy reads only sealed entries")]
    Unsealed,
    #[error("the entry's seal does not hold (another key, another entry's place, or changed)")]
    Forged,
}

impl Entry {
    /// What the entry costs the memory tier's budget.
    pub fn size(&self) -> usize {
        self.body.len() + self.content_type.len() + ENTRY_OVERHEAD
    }

    /// Versioned binary form (Redis): magic, status, flags, expiry, cost, five usage
    /// counts (u64::MAX: none), content type, body; integers little-endian.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.body.len() + self.content_type.len() + 80);
        out.extend_from_slice(ENTRY_MAGIC);
        out.extend_from_slice(&self.status.to_le_bytes());
        out.push(u8::from(self.stream));
        out.extend_from_slice(&self.expires_unix_ms.to_le_bytes());
        out.extend_from_slice(&self.cost_usd.to_bits().to_le_bytes());
        let u = &self.usage;
        for v in [u.input, u.cache_read, u.cache_write, u.output, u.reasoning] {
            out.extend_from_slice(&v.unwrap_or(u64::MAX).to_le_bytes());
        }
        out.extend_from_slice(&(self.content_type.len() as u16).to_le_bytes());
        out.extend_from_slice(self.content_type.as_bytes());
        out.extend_from_slice(&(self.body.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.body);
        out
    }

    /// Read an entry written by [`Entry::encode`] — by this proxy or by anything that can
    /// write to Redis: every length and value is checked, nothing is allocated beyond
    /// `max_body` and the input's own size.
    pub fn decode(b: &[u8], max_body: usize) -> Result<Self, DecodeError> {
        let mut r = Reader(b);
        if r.take(4)? != ENTRY_MAGIC {
            return Err(DecodeError::Version);
        }
        let status = u16::from_le_bytes(r.array()?);
        if !(200..300).contains(&status) {
            return Err(DecodeError::Invalid("status"));
        }
        let stream = match r.take(1)?[0] {
            0 => false,
            1 => true,
            _ => return Err(DecodeError::Invalid("flags")),
        };
        let expires_unix_ms = u64::from_le_bytes(r.array()?);
        let cost_usd = f64::from_bits(u64::from_le_bytes(r.array()?));
        if !(cost_usd.is_finite() && cost_usd >= 0.0) {
            return Err(DecodeError::Invalid("cost"));
        }
        let mut counts = [None; 5];
        for c in &mut counts {
            let v = u64::from_le_bytes(r.array()?);
            *c = (v != u64::MAX).then_some(v);
        }
        let [input, cache_read, cache_write, output, reasoning] = counts;
        let ct_len = usize::from(u16::from_le_bytes(r.array()?));
        let ct = r.take(ct_len)?;
        // Visible ASCII only: a header value on every replay.
        if !ct.iter().all(|&b| b == b'\t' || (b' '..=b'~').contains(&b)) {
            return Err(DecodeError::Invalid("content type"));
        }
        let content_type = std::str::from_utf8(ct)
            .map_err(|_| DecodeError::Invalid("content type"))?
            .to_owned();
        let body_len = u32::from_le_bytes(r.array()?) as usize;
        if body_len > max_body {
            return Err(DecodeError::TooLarge(max_body));
        }
        let body = Bytes::copy_from_slice(r.take(body_len)?);
        if !r.0.is_empty() {
            return Err(DecodeError::Invalid("length"));
        }
        Ok(Self {
            status,
            stream,
            content_type,
            body,
            usage: Usage {
                input,
                cache_read,
                cache_write,
                output,
                reasoning,
            },
            cost_usd,
            expires_unix_ms,
        })
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The memory tier: least recently used entries go first when the byte budget is full.
/// Order is kept by a per-access tick in a BTreeMap (oldest first).
struct Memory {
    budget: usize,
    used: usize,
    tick: u64,
    map: HashMap<CacheKey, Slot>,
    order: BTreeMap<u64, CacheKey>,
}

struct Slot {
    entry: Arc<Entry>,
    expires: Instant,
    tick: u64,
}

impl Memory {
    fn get(&mut self, key: &CacheKey, now: Instant) -> Option<Arc<Entry>> {
        let slot = self.map.get_mut(key)?;
        if slot.expires <= now {
            self.remove(key);
            return None;
        }
        self.tick += 1;
        self.order.remove(&slot.tick);
        slot.tick = self.tick;
        self.order.insert(self.tick, *key);
        Some(slot.entry.clone())
    }

    fn remove(&mut self, key: &CacheKey) {
        if let Some(slot) = self.map.remove(key) {
            self.order.remove(&slot.tick);
            self.used -= slot.entry.size();
        }
    }

    fn put(&mut self, key: CacheKey, entry: Arc<Entry>, expires: Instant) {
        let size = entry.size();
        self.remove(&key);
        if size > self.budget {
            return;
        }
        while self.used + size > self.budget {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            if let Some(slot) = self.map.remove(&oldest) {
                self.used -= slot.entry.size();
            }
        }
        self.tick += 1;
        self.order.insert(self.tick, key);
        self.map.insert(
            key,
            Slot {
                entry,
                expires,
                tick: self.tick,
            },
        );
        self.used += size;
    }
}

/// The proxy's cache: the memory tier, and the shared Redis tier when configured.
pub struct Store {
    memory: Mutex<Memory>,
    redis: Option<Redis>,
    bytes: Gauge,
    entries: Gauge,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("redis", &self.redis.as_ref().map(|r| &r.addr))
            .finish_non_exhaustive()
    }
}

impl Store {
    pub fn new(budget: u64, redis: Option<Redis>, metrics: &CacheMetrics) -> Self {
        Self {
            memory: Mutex::new(Memory {
                budget: usize::try_from(budget).unwrap_or(usize::MAX),
                used: 0,
                tick: 0,
                map: HashMap::new(),
                order: BTreeMap::new(),
            }),
            redis,
            bytes: metrics.memory_bytes.clone(),
            entries: metrics.memory_entries.clone(),
        }
    }

    fn memory(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.memory.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What `/config` shows of the storage: the memory budget and use, and where Redis is,
    /// whether TLS and `AUTH` are on and whether its circuit is open (never a password or a
    /// file's content).
    pub fn describe(&self) -> serde_json::Value {
        let (budget, used, entries) = {
            let m = self.memory();
            (m.budget, m.used, m.map.len())
        };
        serde_json::json!({
            "memoryBytes": budget,
            "memoryUsedBytes": used,
            "memoryEntries": entries,
            "redis": self.redis.as_ref().map(|r| serde_json::json!({
                "addr": r.addr,
                "db": r.db,
                "tls": r.tls.is_some(),
                "username": r.username,
                "passwordFile": r.password_file,
                "sealed": r.sealer.is_some(),
                "timeout": humantime::format_duration(r.timeout).to_string(),
                // Set while the circuit is open after a failure.
                "skippedUntil": Some(r.open_until.load(Ordering::Relaxed))
                    .filter(|&ms| ms > unix_ms())
                    .map(|ms| humantime::format_rfc3339_millis(
                        UNIX_EPOCH + Duration::from_millis(ms),
                    ).to_string()),
            })),
        })
    }

    fn gauges(&self, m: &Memory) {
        self.bytes.set(m.used as i64);
        self.entries.set(m.map.len() as i64);
    }

    /// Memory first, then Redis (whose hit fills memory for the time the entry has left).
    pub async fn get(&self, key: &CacheKey, max_body: usize) -> Option<Arc<Entry>> {
        {
            let mut m = self.memory();
            let found = m.get(key, Instant::now());
            self.gauges(&m);
            if found.is_some() {
                return found;
            }
        }
        let redis = self.redis.as_ref()?;
        let redis_key = key.redis_key();
        let raw = redis.get(&redis_key).await?;
        let opened = match &redis.sealer {
            None => Ok(raw),
            Some(sealer) => sealer.open(&redis_key, &raw),
        };
        let entry = match opened.and_then(|plain| Entry::decode(&plain, max_body)) {
            Ok(e) => e,
            Err(e) => {
                // Whoever writes to Redis decides how often this happens: logged at most
                // once per interval, and the request goes on as a miss.
                static LAST_WARNED: AtomicU64 = AtomicU64::new(0);
                let now = unix_ms();
                let last = LAST_WARNED.load(Ordering::Relaxed);
                if now.saturating_sub(last) >= UNREADABLE_WARN_EVERY.as_millis() as u64
                    && LAST_WARNED
                        .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                {
                    tracing::warn!(error = %e,
                        "a cache entry in Redis could not be read; ignored (more within {UNREADABLE_WARN_EVERY:?} are not logged)");
                }
                return None;
            }
        };
        let left = entry.expires_unix_ms.checked_sub(unix_ms())?;
        let entry = Arc::new(entry);
        let mut m = self.memory();
        m.put(
            *key,
            entry.clone(),
            Instant::now() + Duration::from_millis(left),
        );
        self.gauges(&m);
        Some(entry)
    }

    /// Keep an answer in memory and (detached: the client never waits) in Redis.
    pub fn put(self: &Arc<Self>, key: CacheKey, entry: Entry, ttl: Duration) {
        let entry = Arc::new(entry);
        {
            let mut m = self.memory();
            m.put(key, entry.clone(), Instant::now() + ttl);
            self.gauges(&m);
        }
        if self.redis.is_some()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let store = self.clone();
            rt.spawn(async move {
                if let Some(r) = &store.redis {
                    let redis_key = key.redis_key();
                    let value = match &r.sealer {
                        None => Some(entry.encode()),
                        Some(sealer) => sealer.seal(&redis_key, &entry.encode()),
                    };
                    if let Some(value) = value {
                        r.set(&redis_key, &value, ttl).await;
                    }
                }
            });
        }
    }
}

/// The cache's own series. Route label values come from the snapshot only.
pub struct CacheMetrics {
    /// Reached through a route's `RouteSeries`, which removes them when the route is gone.
    pub(crate) routes: RouteFamilies,
    pub memory_bytes: Gauge,
    pub memory_entries: Gauge,
}

/// The cache's families labelled by route.
#[derive(Clone)]
pub(crate) struct RouteFamilies {
    requests: Family<OutcomeLabels, Counter>,
    tokens_saved: Family<crate::metrics::RouteLabels, Counter>,
    cost_saved: Family<crate::metrics::RouteLabels, Counter<f64, AtomicU64>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    route: String,
    result: &'static str,
}

/// One route's handles.
#[derive(Debug)]
pub struct Series {
    pub hit: Counter,
    pub miss: Counter,
    pub bypass: Counter,
    pub tokens_saved: Counter,
    pub cost_saved: Counter<f64, AtomicU64>,
}

impl Series {
    /// Label sets one route's handles resolve.
    pub(crate) const LABEL_SETS: u64 = 5;

    pub fn outcome(&self, o: Outcome) -> &Counter {
        match o {
            Outcome::Hit => &self.hit,
            Outcome::Miss => &self.miss,
            Outcome::Bypass => &self.bypass,
        }
    }
}

impl CacheMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            routes: RouteFamilies {
                requests: Family::default(),
                tokens_saved: Family::default(),
                cost_saved: Family::default(),
            },
            memory_bytes: Gauge::default(),
            memory_entries: Gauge::default(),
        };
        registry.register(
            "cache_requests",
            "Requests of routes with a response cache, by result (hit, miss, bypass)",
            m.routes.requests.clone(),
        );
        registry.register(
            "cache_tokens_saved",
            "Tokens (prompt and output) of the original answers that cache hits served",
            m.routes.tokens_saved.clone(),
        );
        registry.register(
            "cache_cost_saved_usd",
            "Cost in USD of the original answers that cache hits served, from the backend's pricing",
            m.routes.cost_saved.clone(),
        );
        registry.register(
            "cache_memory_bytes",
            "Bytes held by this proxy's memory cache tier",
            m.memory_bytes.clone(),
        );
        registry.register(
            "cache_memory_entries",
            "Entries held by this proxy's memory cache tier",
            m.memory_entries.clone(),
        );
        m
    }
}

impl RouteFamilies {
    pub(crate) fn series(&self, route: &str) -> Series {
        let outcome = |result| {
            self.requests
                .get_or_create(&OutcomeLabels {
                    route: route.to_owned(),
                    result,
                })
                .clone()
        };
        let labels = crate::metrics::RouteLabels {
            route: route.to_owned(),
        };
        Series {
            hit: outcome(Outcome::Hit.as_str()),
            miss: outcome(Outcome::Miss.as_str()),
            bypass: outcome(Outcome::Bypass.as_str()),
            tokens_saved: self.tokens_saved.get_or_create(&labels).clone(),
            cost_saved: self.cost_saved.get_or_create(&labels).clone(),
        }
    }

    pub(crate) fn remove(&self, route: &str) {
        for result in [Outcome::Hit, Outcome::Miss, Outcome::Bypass] {
            self.requests.remove(&OutcomeLabels {
                route: route.to_owned(),
                result: result.as_str(),
            });
        }
        let labels = crate::metrics::RouteLabels {
            route: route.to_owned(),
        };
        self.tokens_saved.remove(&labels);
        self.cost_saved.remove(&labels);
    }
}

/// A miss that may be stored once its answer is complete.
pub struct Pending {
    pub store: Arc<Store>,
    pub key: CacheKey,
    pub ttl: Duration,
    pub max_bytes: usize,
}

struct FillState {
    pending: Option<Pending>,
    content_type: Option<String>,
    stream: bool,
    buf: Vec<u8>,
    overflow: bool,
    /// From the meter: Some(Some(..)) a complete 200 answer with its usage and cost.
    verdict: Option<Option<(Usage, f64)>>,
    body_done: bool,
}

/// The answer of a miss on its way to the client: its bytes (up to the entry bound) and
/// the meter's verdict meet here; the entry is stored once both say it is complete.
#[derive(Clone)]
pub struct Fill(Arc<Mutex<FillState>>);

impl std::fmt::Debug for Fill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fill")
    }
}

impl Fill {
    pub fn new(pending: Pending) -> Self {
        Self(Arc::new(Mutex::new(FillState {
            pending: Some(pending),
            content_type: None,
            stream: false,
            buf: Vec::new(),
            overflow: false,
            verdict: None,
            body_done: false,
        })))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, FillState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The response head: what a replay says its body is.
    pub fn head(&self, headers: &HeaderMap, stream: bool) {
        let mut s = self.state();
        s.content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .filter(|v| v.len() <= 256)
            .map(str::to_owned);
        s.stream = stream;
    }

    pub fn record(&self, data: &[u8]) {
        let mut s = self.state();
        let Some(max) = s.pending.as_ref().map(|p| p.max_bytes) else {
            return;
        };
        if s.overflow || s.buf.len() + data.len() > max {
            // Too large to keep: let go of what was kept.
            s.overflow = true;
            s.buf = Vec::new();
            return;
        }
        s.buf.extend_from_slice(data);
    }

    /// The meter's word: `Some` for a complete 200 answer, with its usage and cost.
    pub fn verdict(&self, ok: Option<(Usage, f64)>) {
        let mut s = self.state();
        s.verdict = Some(ok);
        Self::settle(&mut s);
    }

    /// The body reached its end (`complete`) or failed.
    pub fn body_end(&self, complete: bool) {
        let mut s = self.state();
        if !complete {
            s.pending = None;
        }
        s.body_done = true;
        Self::settle(&mut s);
    }

    fn settle(s: &mut FillState) {
        if !s.body_done {
            return;
        }
        let Some(verdict) = s.verdict.take() else {
            return;
        };
        let Some(p) = s.pending.take() else { return };
        let (Some((usage, cost_usd)), false) = (verdict, s.overflow) else {
            return;
        };
        let Some(content_type) = s.content_type.take() else {
            return;
        };
        let entry = Entry {
            status: 200,
            stream: s.stream,
            content_type,
            body: Bytes::from(std::mem::take(&mut s.buf)),
            usage,
            cost_usd,
            expires_unix_ms: unix_ms().saturating_add(p.ttl.as_millis() as u64),
        };
        p.store.put(p.key, entry, p.ttl);
    }
}

/// A streamed answer of a miss: passed on untouched, its bytes kept for the entry.
pub struct Recording<B = MeteredStream> {
    inner: Box<B>,
    fill: Fill,
}

impl<B> Recording<B> {
    pub fn new(inner: Box<B>, fill: Fill) -> Self {
        Self { inner, fill }
    }
}

impl<B> Body for Recording<B>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(this.inner.as_mut()).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.fill.record(d);
                }
            }
            Poll::Ready(Some(Err(_))) => this.fill.body_end(false),
            Poll::Ready(None) => this.fill.body_end(true),
            Poll::Pending => {}
        }
        polled
    }
}

/// The largest Redis password or entry key file read.
const MAX_SECRET_FILE: u64 = 64 * 1024;
/// What a sealed entry starts with.
const SEALED_MAGIC: &[u8; 4] = b"MGS\x01";
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// Entries in Redis sealed with AES-256-GCM under a key the proxies share, each bound to its
/// Redis key: whoever can read Redis learns nothing of the answers, and whoever can write to
/// it can neither forge an entry nor move one to another key (another namespace's, say).
pub struct Sealer {
    key: ring::aead::LessSafeKey,
    rng: ring::rand::SystemRandom,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer")
    }
}

impl Sealer {
    /// The AES key is derived (HKDF-SHA256) from at least 32 bytes of secret, one trailing
    /// newline trimmed, such as `openssl rand -hex 32` writes.
    pub fn from_secret(secret: &[u8]) -> Result<Self, String> {
        let secret = without_newline(secret);
        if secret.len() < 32 {
            return Err(format!(
                "the entry key holds {} bytes; at least 32 are needed (`openssl rand -hex 32`)",
                secret.len()
            ));
        }
        let salt = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"modelgate cache entries v1");
        let prk = salt.extract(secret);
        let okm = prk
            .expand(&[b"aes-256-gcm"], &ring::aead::AES_256_GCM)
            .map_err(|_| "the entry key cannot be derived".to_owned())?;
        let key = ring::aead::UnboundKey::from(okm);
        Ok(Self {
            key: ring::aead::LessSafeKey::new(key),
            rng: ring::rand::SystemRandom::new(),
        })
    }

    /// `MGS\x01`, a random nonce, the ciphertext and its tag; `aad` (the Redis key) is
    /// authenticated. None only if the system's random source fails.
    pub fn seal(&self, aad: &[u8], plain: &[u8]) -> Option<Vec<u8>> {
        use ring::rand::SecureRandom;
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let head = SEALED_MAGIC.len() + NONCE_LEN;
        let mut out = Vec::with_capacity(head + plain.len() + TAG_LEN);
        out.extend_from_slice(SEALED_MAGIC);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let tag = self
            .key
            .seal_in_place_separate_tag(
                ring::aead::Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::from(aad),
                &mut out[head..],
            )
            .ok()?;
        out.extend_from_slice(tag.as_ref());
        Some(out)
    }

    /// The plain entry, if `sealed` was sealed by this key for this `aad`.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, DecodeError> {
        let head = SEALED_MAGIC.len() + NONCE_LEN;
        if sealed.len() < head + TAG_LEN || !sealed.starts_with(SEALED_MAGIC) {
            return Err(DecodeError::Unsealed);
        }
        let nonce = ring::aead::Nonce::try_assume_unique_for_key(&sealed[SEALED_MAGIC.len()..head])
            .map_err(|_| DecodeError::Unsealed)?;
        let mut buf = sealed[head..].to_vec();
        let len = self
            .key
            .open_in_place(nonce, ring::aead::Aad::from(aad), &mut buf)
            .map_err(|_| DecodeError::Forged)?
            .len();
        buf.truncate(len);
        Ok(buf)
    }
}

/// Settings of the shared tier.
#[derive(Clone, Debug)]
pub struct RedisConfig {
    /// `host:port`.
    pub addr: String,
    pub db: u32,
    pub timeout: Duration,
    /// `rediss://`: TLS, the server's certificate checked against `ca_file` (or the Mozilla
    /// roots) and the URL's host.
    pub tls: bool,
    /// A PEM bundle of the CAs that may sign the server's certificate (TLS only).
    pub ca_file: Option<PathBuf>,
    /// The ACL user to `AUTH` as (`default` when only a password is given).
    pub username: Option<String>,
    /// A file whose content (one trailing newline trimmed) is the password; read at every
    /// new connection, so a mounted Secret that changes is picked up without a restart.
    pub password_file: Option<PathBuf>,
    /// A file holding the secret entries are sealed with (read at start): see [`Sealer`].
    pub entry_key_file: Option<PathBuf>,
}

impl RedisConfig {
    /// `redis://host[:port][/db]` or `rediss://…` for TLS; no credentials in the URL (they
    /// would end up in logs and process listings: the password comes from a file).
    pub fn parse(url: &str, timeout: Duration) -> Result<Self, String> {
        let (tls, rest) = match (url.strip_prefix("redis://"), url.strip_prefix("rediss://")) {
            (Some(rest), _) => (false, rest),
            (_, Some(rest)) => (true, rest),
            _ => return Err(format!("{url:?} is not a redis:// or rediss:// URL")),
        };
        let (hostport, db) = match rest.split_once('/') {
            Some((h, "")) => (h, 0),
            Some((h, db)) => (
                h,
                db.parse::<u32>()
                    .map_err(|_| format!("database {db:?} is not a number"))?,
            ),
            None => (rest, 0),
        };
        if hostport.contains('@') {
            return Err("credentials in the URL are not supported (use a password file)".into());
        }
        if hostport.is_empty() {
            return Err("the URL names no host".into());
        }
        let has_port = match hostport.rsplit_once(':') {
            Some((h, p)) => !h.ends_with(':') && p.parse::<u16>().is_ok() && !h.is_empty(),
            None => false,
        };
        let addr = if has_port {
            hostport.to_owned()
        } else {
            format!("{hostport}:6379")
        };
        Ok(Self {
            addr,
            db,
            timeout,
            tls,
            ca_file: None,
            username: None,
            password_file: None,
            entry_key_file: None,
        })
    }

    /// The host the URL names, for the server's certificate (an IPv6 address unbracketed).
    fn host(&self) -> &str {
        let host = self
            .addr
            .rsplit_once(':')
            .map_or(self.addr.as_str(), |(h, _)| h);
        host.strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host)
    }
}

/// A minimal RESP2 client: GET and SET PX, bounded replies, a short deadline and a circuit;
/// TLS and `AUTH` when configured.
pub struct Redis {
    addr: String,
    db: u32,
    timeout: Duration,
    max_reply: usize,
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls_pki_types::ServerName<'static>,
    )>,
    username: Option<String>,
    password_file: Option<PathBuf>,
    sealer: Option<Sealer>,
    pool: Mutex<Vec<Conn>>,
    /// Unix ms until which Redis is skipped after a failure.
    open_until: AtomicU64,
}

/// One connection to Redis, in the clear or in TLS.
enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Conn {
    async fn call(&mut self, args: &[&[u8]], max_reply: usize) -> Result<Reply, RedisError> {
        match self {
            Conn::Plain(s) => call(s, args, max_reply).await,
            Conn::Tls(s) => call(s.as_mut(), args, max_reply).await,
        }
    }
}

/// Send one command, read its one reply.
async fn call<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut S,
    args: &[&[u8]],
    max_reply: usize,
) -> Result<Reply, RedisError> {
    conn.write_all(&command(args)).await?;
    conn.flush().await?;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some((reply, used)) = parse_reply(&buf, max_reply)? {
            if used != buf.len() {
                // More than one reply to one command: out of step, not reused.
                return Err(RespError::Malformed.into());
            }
            return Ok(reply);
        }
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Err(RedisError::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The TLS client of `rediss://`: the CAs of `ca_file`, or the Mozilla roots without one.
fn tls_client(ca_file: Option<&Path>) -> Result<tokio_rustls::TlsConnector, String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let roots = match ca_file {
        Some(f) => crate::control::ca_roots(f, "CA bundle")?,
        None => webpki_roots::TLS_SERVER_ROOTS.iter().cloned().collect(),
    };
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// `b` without one trailing `\n` or `\r\n` (what `echo` and editors leave in a file).
fn without_newline(b: &[u8]) -> &[u8] {
    match b.strip_suffix(b"\n") {
        Some(b) => b.strip_suffix(b"\r").unwrap_or(b),
        None => b,
    }
}

/// The password in `file`, one trailing newline trimmed (what `kubectl create secret
/// --from-file` and `echo` leave).
fn read_password(file: &Path) -> Result<Vec<u8>, RedisError> {
    let mut p = crate::config::read_small(file, MAX_SECRET_FILE).map_err(|e| {
        RedisError::Credentials(format!(
            "cannot read the password file {}: {}",
            file.display(),
            e.kind()
        ))
    })?;
    p.truncate(without_newline(&p).len());
    if p.is_empty() {
        return Err(RedisError::Credentials(format!(
            "the password file {} is empty",
            file.display()
        )));
    }
    Ok(p)
}

/// A Redis reply (arrays are never asked for).
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    Simple(Vec<u8>),
    Error(Vec<u8>),
    Integer(i64),
    Bulk(Option<Vec<u8>>),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RespError {
    #[error("the reply is not RESP2")]
    Malformed,
    #[error("the reply is larger than {0} bytes")]
    TooLarge(usize),
    #[error("unexpected reply type")]
    Unexpected,
}

/// Read one reply from the front of `buf`: `Ok(None)` when more bytes are needed, else the
/// reply and the bytes it took. A bulk string longer than `max_bulk` or a line longer than
/// [`MAX_REPLY_LINE`] is an error before anything is allocated for it.
pub fn parse_reply(buf: &[u8], max_bulk: usize) -> Result<Option<(Reply, usize)>, RespError> {
    let Some(&kind) = buf.first() else {
        return Ok(None);
    };
    let window = &buf[1..buf.len().min(1 + MAX_REPLY_LINE + 2)];
    let Some(eol) = memchr::memmem::find(window, b"\r\n") else {
        return if window.len() > MAX_REPLY_LINE {
            Err(RespError::TooLarge(MAX_REPLY_LINE))
        } else {
            Ok(None)
        };
    };
    let line = &window[..eol];
    let after = 1 + eol + 2;
    let number = || -> Result<i64, RespError> {
        std::str::from_utf8(line)
            .ok()
            .and_then(|s| s.parse::<i64>().ok())
            .ok_or(RespError::Malformed)
    };
    match kind {
        b'+' => Ok(Some((Reply::Simple(line.to_vec()), after))),
        b'-' => Ok(Some((Reply::Error(line.to_vec()), after))),
        b':' => Ok(Some((Reply::Integer(number()?), after))),
        b'$' => {
            let n = number()?;
            if n == -1 {
                return Ok(Some((Reply::Bulk(None), after)));
            }
            let n = usize::try_from(n).map_err(|_| RespError::Malformed)?;
            if n > max_bulk {
                return Err(RespError::TooLarge(max_bulk));
            }
            let end = after + n;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(RespError::Malformed);
            }
            Ok(Some((Reply::Bulk(Some(buf[after..end].to_vec())), end + 2)))
        }
        b'*' => Err(RespError::Unexpected),
        _ => Err(RespError::Malformed),
    }
}

fn command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

#[derive(Debug, thiserror::Error)]
enum RedisError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Resp(#[from] RespError),
    #[error("the connection closed")]
    Closed,
    #[error("Redis answered an error")]
    Refused,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("Redis refused the credentials (AUTH)")]
    AuthRefused,
    /// Names the file, never its content.
    #[error("{0}")]
    Credentials(String),
}

impl Redis {
    /// `max_entry`: the largest entry any route may store; larger replies are refused. Fails
    /// on a CA bundle or password file that cannot be read, or a host that cannot be a TLS
    /// server name, so a proxy with a broken cache setting never starts.
    pub fn new(config: RedisConfig, max_entry: usize) -> Result<Self, String> {
        let tls = match config.tls {
            false => None,
            true => {
                let name = rustls_pki_types::ServerName::try_from(config.host().to_owned())
                    .map_err(|_| {
                        format!(
                            "{:?} cannot be checked against a certificate",
                            config.host()
                        )
                    })?;
                Some((tls_client(config.ca_file.as_deref())?, name))
            }
        };
        if config.ca_file.is_some() && !config.tls {
            return Err("a CA bundle is given, but the URL is not rediss://".into());
        }
        if config.username.is_some() && config.password_file.is_none() {
            return Err("a username is given without a password file".into());
        }
        if let Some(f) = &config.password_file {
            read_password(f).map_err(|e| e.to_string())?;
        }
        let sealer = match &config.entry_key_file {
            None => None,
            Some(f) => {
                let secret = crate::config::read_small(f, MAX_SECRET_FILE).map_err(|e| {
                    format!(
                        "cannot read the entry key file {}: {}",
                        f.display(),
                        e.kind()
                    )
                })?;
                Some(Sealer::from_secret(&secret).map_err(|e| format!("{}: {e}", f.display()))?)
            }
        };
        Ok(Self {
            addr: config.addr,
            db: config.db,
            timeout: config.timeout,
            max_reply: max_entry + 1024 + SEALED_MAGIC.len() + NONCE_LEN + TAG_LEN,
            tls,
            username: config.username,
            password_file: config.password_file,
            sealer,
            pool: Mutex::new(Vec::new()),
            open_until: AtomicU64::new(0),
        })
    }

    fn pool(&self) -> std::sync::MutexGuard<'_, Vec<Conn>> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        match self.run(&[b"GET", key], self.timeout).await? {
            Reply::Bulk(v) => v,
            _ => None,
        }
    }

    async fn set(&self, key: &[u8], value: &[u8], ttl: Duration) {
        let ms = ttl.as_millis().max(1).to_string();
        // A large entry takes longer to send; it is off the request path anyway.
        let deadline = self.timeout + Duration::from_millis((value.len() >> 20) as u64 * 20);
        self.run(&[b"SET", key, value, b"PX", ms.as_bytes()], deadline)
            .await;
    }

    /// One command within the deadline; None (and the circuit opens) on any failure.
    async fn run(&self, args: &[&[u8]], deadline: Duration) -> Option<Reply> {
        let now = unix_ms();
        if self.open_until.load(Ordering::Relaxed) > now {
            return None;
        }
        let result = match tokio::time::timeout(deadline, self.exchange(args)).await {
            Ok(r) => r,
            Err(_) => Err(RedisError::Timeout(deadline)),
        };
        match result {
            Ok(reply) => Some(reply),
            Err(e) => {
                let until = now + REDIS_CIRCUIT_OPEN.as_millis() as u64;
                if self.open_until.swap(until, Ordering::Relaxed) <= now {
                    tracing::warn!(redis = %self.addr, error = %e,
                        "the cache's Redis failed; skipped for {REDIS_CIRCUIT_OPEN:?}");
                }
                None
            }
        }
    }

    /// A pooled connection (or a new one), one command, one reply; the connection goes
    /// back only after a whole reply (a cancelled exchange drops it, so none is left
    /// half-read).
    async fn exchange(&self, args: &[&[u8]]) -> Result<Reply, RedisError> {
        let pooled = self.pool().pop();
        let (conn, reply) = match pooled {
            Some(mut c) => match c.call(args, self.max_reply).await {
                Ok(reply) => (c, reply),
                // A pooled connection Redis closed (a restart, an idle timeout): once more
                // on a new one (GET and SET may be repeated).
                Err(RedisError::Io(_) | RedisError::Closed) => {
                    let mut c = self.connect().await?;
                    let reply = c.call(args, self.max_reply).await?;
                    (c, reply)
                }
                Err(e) => return Err(e),
            },
            None => {
                let mut c = self.connect().await?;
                let reply = c.call(args, self.max_reply).await?;
                (c, reply)
            }
        };
        if matches!(reply, Reply::Error(_)) {
            return Err(RedisError::Refused);
        }
        let mut pool = self.pool();
        if pool.len() < REDIS_POOL {
            pool.push(conn);
        }
        Ok(reply)
    }

    /// A new connection: TCP, then TLS, `AUTH` and `SELECT` as configured.
    async fn connect(&self) -> Result<Conn, RedisError> {
        let tcp = TcpStream::connect(&self.addr).await?;
        let _ = tcp.set_nodelay(true);
        let mut conn = match &self.tls {
            None => Conn::Plain(tcp),
            Some((connector, name)) => {
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| RedisError::Tls(e.to_string()))?;
                Conn::Tls(Box::new(tls))
            }
        };
        if let Some(file) = &self.password_file {
            let password = read_password(file)?;
            let mut args: Vec<&[u8]> = vec![b"AUTH"];
            if let Some(user) = &self.username {
                args.push(user.as_bytes());
            }
            args.push(&password);
            if let Reply::Error(_) = conn.call(&args, 1024).await? {
                return Err(RedisError::AuthRefused);
            }
        }
        if self.db != 0 {
            let db = self.db.to_string();
            if let Reply::Error(_) = conn.call(&[b"SELECT", db.as_bytes()], 1024).await? {
                return Err(RedisError::Refused);
            }
        }
        Ok(conn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(body: &str) -> Entry {
        Entry {
            status: 200,
            stream: false,
            content_type: "application/json".into(),
            body: Bytes::from(body.to_owned()),
            usage: Usage {
                input: Some(10),
                output: Some(5),
                ..Usage::default()
            },
            cost_usd: 0.25,
            expires_unix_ms: 1_700_000_000_000,
        }
    }

    fn scope(ns: &str, key: Option<&str>, shape: Shape) -> Scope<'static> {
        Scope {
            namespace: Box::leak(ns.to_owned().into_boxed_str()),
            route: "r",
            key_id: key.map(|k| &*Box::leak(k.to_owned().into_boxed_str())),
            endpoint: "chat",
            shape,
        }
    }

    fn key(s: &Scope<'_>, body: &str) -> CacheKey {
        key_of(s, &serde_json::from_str(body).unwrap()).unwrap()
    }

    #[test]
    fn the_key_ignores_order_and_fields_that_do_not_change_the_answer() {
        let s = scope("a", None, Shape::Whole);
        let base = key(
            &s,
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0}"#,
        );
        assert_eq!(
            base,
            key(
                &s,
                r#"{"temperature":0,"user":"u1","messages":[{"content":"hi","role":"user"}],"model":"alias","stream":false,"metadata":{"x":"y"}}"#
            )
        );
        for other in [
            r#"{"messages":[{"role":"user","content":"hi!"}],"temperature":0}"#,
            r#"{"messages":[{"role":"user","content":"hi"}],"temperature":0.5}"#,
            r#"{"messages":[{"role":"user","content":"hi"}],"temperature":0,"tools":[]}"#,
        ] {
            assert_ne!(base, key(&s, other), "{other}");
        }
        let body = r#"{"messages":[],"temperature":0}"#;
        let whole = key(&s, body);
        assert_ne!(whole, key(&scope("b", None, Shape::Whole), body));
        assert_ne!(whole, key(&scope("a", Some("k"), Shape::Whole), body));
        assert_ne!(
            whole,
            key(&scope("a", None, Shape::Stream { usage: false }), body)
        );
        assert!(key_of(&s, &serde_json::json!([1])).is_none());
    }

    #[test]
    fn sampled_means_a_positive_temperature() {
        let t = |v: serde_json::Value| sampled(&v);
        assert!(t(serde_json::json!({"temperature": 0.7})));
        assert!(!t(serde_json::json!({"temperature": 0})));
        assert!(!t(serde_json::json!({})));
        assert!(!t(serde_json::json!({"temperature": "hot"})));
    }

    #[test]
    fn cache_control_no_cache_and_no_store() {
        let d = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CACHE_CONTROL, v.parse().unwrap());
            directive(&h)
        };
        assert_eq!(
            d("No-Cache"),
            Directive {
                lookup: false,
                store: true
            }
        );
        assert_eq!(
            d("max-age=0, no-store"),
            Directive {
                lookup: true,
                store: false
            }
        );
        assert_eq!(
            directive(&HeaderMap::new()),
            Directive {
                lookup: true,
                store: true
            }
        );
    }

    #[test]
    fn entries_round_trip_and_hostile_ones_are_refused() {
        let mut e = entry("{\"id\":1}");
        e.usage.reasoning = Some(2);
        let bytes = e.encode();
        assert_eq!(Entry::decode(&bytes, 1024).unwrap(), e);
        for cut in 0..bytes.len() {
            assert!(Entry::decode(&bytes[..cut], 1024).is_err(), "{cut}");
        }
        assert_eq!(
            Entry::decode(&bytes, 4),
            Err(DecodeError::TooLarge(4)),
            "a body above the bound"
        );
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Entry::decode(&longer, 1024).is_err());
        let mut v2 = bytes.clone();
        v2[3] = 2;
        assert_eq!(Entry::decode(&v2, 1024), Err(DecodeError::Version));
        let mut nan = e.clone();
        nan.cost_usd = f64::NAN;
        assert_eq!(
            Entry::decode(&nan.encode(), 1024),
            Err(DecodeError::Invalid("cost"))
        );
        let mut ct = e.clone();
        ct.content_type = "text/plain\r\nx: y".into();
        assert!(Entry::decode(&ct.encode(), 1024).is_err());
    }

    #[test]
    fn the_memory_tier_evicts_the_least_recently_used_and_expires_on_read() {
        let size = entry("aaaa").size();
        let mut m = Memory {
            budget: size * 2,
            used: 0,
            tick: 0,
            map: HashMap::new(),
            order: BTreeMap::new(),
        };
        let now = Instant::now();
        let later = now + Duration::from_secs(60);
        let k = |i: u8| CacheKey([i; 32]);
        m.put(k(1), Arc::new(entry("aaaa")), later);
        m.put(k(2), Arc::new(entry("bbbb")), later);
        assert!(m.get(&k(1), now).is_some(), "1 is now the most recent");
        m.put(k(3), Arc::new(entry("cccc")), later);
        assert!(m.get(&k(2), now).is_none(), "2 was the least recently used");
        assert!(m.get(&k(1), now).is_some());
        assert!(m.get(&k(3), now).is_some());
        assert_eq!(m.used, size * 2);
        assert!(m.get(&k(1), later).is_none(), "expired");
        assert_eq!((m.used, m.map.len(), m.order.len()), (size, 1, 1));
        // An entry above the whole budget is never kept (and evicts nothing).
        m.put(k(4), Arc::new(entry(&"x".repeat(size * 2))), later);
        assert!(m.get(&k(4), now).is_none());
        assert!(m.get(&k(3), now).is_some());
    }

    #[test]
    fn resp_replies_are_read_whole_and_bounded() {
        assert_eq!(
            parse_reply(b"+OK\r\n", 10),
            Ok(Some((Reply::Simple(b"OK".to_vec()), 5)))
        );
        assert_eq!(
            parse_reply(b"$-1\r\n", 10),
            Ok(Some((Reply::Bulk(None), 5)))
        );
        assert_eq!(
            parse_reply(b"$3\r\nabc\r\n", 10),
            Ok(Some((Reply::Bulk(Some(b"abc".to_vec())), 9)))
        );
        assert_eq!(parse_reply(b"$3\r\nab", 10), Ok(None));
        assert_eq!(
            parse_reply(b"$3\r\nabcd\r\n", 10),
            Err(RespError::Malformed)
        );
        assert_eq!(
            parse_reply(b"$999999999999\r\n", 10),
            Err(RespError::TooLarge(10))
        );
        assert_eq!(parse_reply(b"$-2\r\n", 10), Err(RespError::Malformed));
        assert_eq!(
            parse_reply(b"-ERR no\r\n", 10),
            Ok(Some((Reply::Error(b"ERR no".to_vec()), 9)))
        );
        assert_eq!(
            parse_reply(b":42\r\n", 10),
            Ok(Some((Reply::Integer(42), 5)))
        );
        assert_eq!(parse_reply(b"*1\r\n", 10), Err(RespError::Unexpected));
        let long = [b"+".as_slice(), &[b'a'; MAX_REPLY_LINE + 10]].concat();
        assert!(matches!(
            parse_reply(&long, 10),
            Err(RespError::TooLarge(_))
        ));
        assert_eq!(
            command(&[b"GET", b"k"]),
            b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n".to_vec()
        );
    }

    #[test]
    fn redis_urls() {
        let t = Duration::from_millis(50);
        let c = RedisConfig::parse("redis://127.0.0.1:6380/2", t).unwrap();
        assert_eq!((c.addr.as_str(), c.db), ("127.0.0.1:6380", 2));
        let c = RedisConfig::parse("redis://redis.cache.svc", t).unwrap();
        assert_eq!(
            (c.addr.as_str(), c.db, c.tls),
            ("redis.cache.svc:6379", 0, false)
        );
        let c = RedisConfig::parse("rediss://redis.cache.svc:6380/1", t).unwrap();
        assert_eq!(
            (c.addr.as_str(), c.db, c.tls),
            ("redis.cache.svc:6380", 1, true)
        );
        assert_eq!(c.host(), "redis.cache.svc");
        let c = RedisConfig::parse("rediss://[::1]:6380", t).unwrap();
        assert_eq!((c.addr.as_str(), c.host()), ("[::1]:6380", "::1"));
        for bad in [
            "http://x:1",
            "redis://",
            "redis://u:p@x:1",
            "rediss://:p@x:1",
            "redis://x:1/zero",
            "redis:/x:1",
        ] {
            assert!(RedisConfig::parse(bad, t).is_err(), "{bad}");
        }
    }

    /// What `Redis::new` refuses, so a proxy with a broken cache setting never starts; an
    /// error about a password file names the file, never what is in it.
    #[test]
    fn broken_tls_and_credential_settings_are_refused_at_start() {
        let dir = std::env::temp_dir().join(format!("mg-redis-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let t = Duration::from_millis(50);
        let url = |u: &str| RedisConfig::parse(u, t).unwrap();
        let refused = |c: RedisConfig| Redis::new(c, 1024).err().expect("refused");
        let empty = dir.join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let no_ca = dir.join("no-ca.pem");
        std::fs::write(&no_ca, "not a certificate\n").unwrap();
        let missing = dir.join("missing");
        let e = refused(RedisConfig {
            password_file: Some(missing.clone()),
            ..url("redis://x:1")
        });
        assert!(e.contains("missing") && e.contains("cannot read"), "{e}");
        for device in ["/dev/zero", "/dev/urandom"] {
            let e = refused(RedisConfig {
                password_file: Some(device.into()),
                ..url("redis://x:1")
            });
            assert!(e.contains("cannot read the password file"), "{e}");
            let e = refused(RedisConfig {
                entry_key_file: Some(device.into()),
                ..url("redis://x:1")
            });
            assert!(e.contains("cannot read the entry key file"), "{e}");
        }
        let e = refused(RedisConfig {
            password_file: Some(empty),
            ..url("redis://x:1")
        });
        assert!(e.contains("is empty"), "{e}");
        let e = refused(RedisConfig {
            username: Some("cache".into()),
            ..url("redis://x:1")
        });
        assert!(e.contains("without a password"), "{e}");
        let e = refused(RedisConfig {
            ca_file: Some(no_ca.clone()),
            ..url("redis://x:1")
        });
        assert!(e.contains("not rediss://"), "{e}");
        let e = refused(RedisConfig {
            ca_file: Some(no_ca),
            ..url("rediss://x:1")
        });
        assert!(e.contains("no CA certificate"), "{e}");
        let e = refused(RedisConfig {
            ca_file: Some(missing),
            ..url("rediss://x:1")
        });
        assert!(e.contains("cannot read the CA bundle"), "{e}");
        // Without a CA bundle, the Mozilla roots; an IP address is a valid server name.
        assert!(Redis::new(url("rediss://127.0.0.1:1"), 1024).is_ok());
        let secret = dir.join("secret");
        std::fs::write(&secret, "s3cr3t-pa55\r\n").unwrap();
        assert_eq!(read_password(&secret).unwrap(), b"s3cr3t-pa55");
        std::fs::write(&secret, "two\nlines\n").unwrap();
        assert_eq!(read_password(&secret).unwrap(), b"two\nlines");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn sealed_entries_open_only_with_their_key_in_their_place() {
        let secret = b"0123456789abcdef0123456789abcdef\n";
        let a = Sealer::from_secret(secret).unwrap();
        let same = Sealer::from_secret(&secret[..32]).unwrap();
        let other = Sealer::from_secret(b"fedcba9876543210fedcba9876543210").unwrap();
        let plain = entry("the answer").encode();
        let sealed = a.seal(b"mg:cache:k1", &plain).unwrap();
        assert!(
            !sealed.windows(10).any(|w| w == b"the answer"),
            "not in the clear"
        );
        assert_ne!(
            a.seal(b"mg:cache:k1", &plain).unwrap(),
            sealed,
            "a new nonce each time"
        );
        assert_eq!(same.open(b"mg:cache:k1", &sealed).unwrap(), plain);
        // Another key, another place, a changed byte, a plain entry, a short one.
        assert_eq!(
            other.open(b"mg:cache:k1", &sealed),
            Err(DecodeError::Forged)
        );
        assert_eq!(a.open(b"mg:cache:k2", &sealed), Err(DecodeError::Forged));
        for i in [4, 20, sealed.len() - 1] {
            let mut changed = sealed.clone();
            changed[i] ^= 1;
            assert_eq!(
                a.open(b"mg:cache:k1", &changed),
                Err(DecodeError::Forged),
                "{i}"
            );
        }
        assert_eq!(a.open(b"mg:cache:k1", &plain), Err(DecodeError::Unsealed));
        assert_eq!(
            a.open(b"mg:cache:k1", &sealed[..20]),
            Err(DecodeError::Unsealed)
        );
        let e = Sealer::from_secret(b"short\n").unwrap_err();
        assert!(e.contains("holds 5 bytes"), "{e}");
    }

    /// A Redis that closes each connection after one reply (as a restarted one does to the
    /// pooled connections): the next command goes out once more on a new connection.
    #[tokio::test]
    async fn a_closed_pooled_connection_is_replaced_without_a_failure() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let mut buf = [0u8; 256];
                if conn.read(&mut buf).await.is_ok_and(|n| n > 0) {
                    let _ = conn.write_all(b"$1\r\na\r\n").await;
                }
                // Dropped: closed after one reply.
            }
        });
        let r = Redis::new(
            RedisConfig::parse(&format!("redis://{addr}"), Duration::from_secs(5)).unwrap(),
            1024,
        )
        .unwrap();
        for _ in 0..3 {
            assert_eq!(r.get(b"k").await, Some(b"a".to_vec()));
        }
        assert_eq!(r.open_until.load(Ordering::Relaxed), 0, "no failure");
    }

    /// A dead Redis answers nothing, quickly, and opens the circuit.
    #[tokio::test]
    async fn a_dead_redis_is_skipped() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        let r = Redis::new(
            RedisConfig::parse(&format!("redis://{addr}"), Duration::from_millis(50)).unwrap(),
            1024,
        )
        .unwrap();
        assert_eq!(r.get(b"k").await, None);
        assert!(r.open_until.load(Ordering::Relaxed) > unix_ms());
    }
}
