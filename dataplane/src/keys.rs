//! Virtual keys: who may call, which models, under which limits.
//!
//! The snapshot carries only SHA-256 hashes. A presented key is hashed once and looked up in
//! a hash map (O(1)); the matching entry is confirmed with a constant-time comparison, so
//! timing says nothing about how close a guess came. Raw keys are never stored or logged.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::admission::KeyState;
use crate::admission::{BudgetRule, Limits};
use crate::snapshot::StateRegistry;

#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeyHash(pub [u8; 32]);

impl std::hash::Hash for KeyHash {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let mut prefix = [0; 8];
        prefix.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(prefix));
    }
}

/// Hashing for maps keyed by [`KeyHash`]: a SHA-256 is already uniform, so its first eight
/// bytes are the hash. Nobody can place colliding entries: the table holds the admin's keys,
/// and a presented key is looked up by its SHA-256, confirmed over all 32 bytes.
#[derive(Clone, Copy, Default, Debug)]
pub struct ByPrefix;

#[derive(Default)]
pub struct PrefixHasher(u64);

impl std::hash::BuildHasher for ByPrefix {
    type Hasher = PrefixHasher;
    fn build_hasher(&self) -> PrefixHasher {
        PrefixHasher(0)
    }
}

impl std::hash::Hasher for PrefixHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Not reached for `KeyHash` (it writes one u64); kept total for any other input.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

impl KeyHash {
    pub fn of(raw: &[u8]) -> Self {
        Self(Sha256::digest(raw).into())
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyHash(<redacted>)")
    }
}

/// A model-name pattern: `*` matches any run of characters, everything else literally.
#[derive(Debug, Clone)]
pub struct Glob(String);

impl Glob {
    pub fn new(pattern: &str) -> Self {
        Self(pattern.to_owned())
    }

    pub fn matches(&self, name: &str) -> bool {
        glob_match(self.0.as_bytes(), name.as_bytes())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    // Iterative matcher with single-star backtracking: linear in practice, no recursion.
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|c| *c == b'*')
}

/// One key of a snapshot. A fleet may hold 100k of them, so it is kept small: the id is
/// shared with the state registry, namespaces are shared between keys, a budget is boxed,
/// and the counters exist only once the key was used (or carried over from a snapshot
/// in which it was).
#[derive(Debug)]
pub struct Key {
    /// `namespace/name`: the metrics label and log field.
    pub id: Arc<str>,
    pub namespace: Arc<str>,
    /// Empty = every route of the namespace.
    pub models: Box<[Glob]>,
    pub limits: Limits,
    pub budget: Option<Box<BudgetRule>>,
    pub expires_at: Option<SystemTime>,
    pub disabled: bool,
    pub exhausted: bool,
    /// Spend guard: the most a request's worst case may cost, USD.
    pub max_cost_per_request: Option<f64>,
    pub state: OnceLock<Arc<KeyState>>,
}

impl Key {
    /// The key's counters: from the registry (made there at first use), so every snapshot
    /// that holds the key counts into the same ones.
    pub fn state(&self, registry: &StateRegistry) -> &Arc<KeyState> {
        self.state.get_or_init(|| registry.key_state(&self.id))
    }

    pub fn allows(&self, route_model: &str, asked: &str) -> bool {
        self.models.is_empty()
            || self
                .models
                .iter()
                .any(|g| g.matches(route_model) || g.matches(asked))
    }

    /// Whether this key is what `spec` (with its expiry, limits and budget already read)
    /// compiles to, so a new snapshot can share it instead of building it again.
    pub fn same_as(
        &self,
        spec: &modelgate_wire::KeySpec,
        expires_at: Option<SystemTime>,
        limits: &Limits,
        budget: Option<&BudgetRule>,
    ) -> bool {
        let (ns, name) = self.id.split_once('/').unwrap_or(("", &self.id));
        ns == spec.namespace
            && name == spec.name
            && self.limits == *limits
            && self.budget.as_deref() == budget
            && self.expires_at == expires_at
            && self.disabled == spec.disabled
            && self.exhausted == spec.exhausted
            && self.max_cost_per_request == spec.max_cost_per_request
            && self.models.len() == spec.models.len()
            && self
                .models
                .iter()
                .zip(&spec.models)
                .all(|(g, m)| g.as_str() == m)
    }

    pub fn expired(&self, now: SystemTime) -> bool {
        self.expires_at.is_some_and(|at| now >= at)
    }
}

#[derive(Debug, Default)]
pub struct KeyStore {
    by_hash: HashMap<KeyHash, Arc<Key>, ByPrefix>,
}

impl KeyStore {
    pub fn with_capacity(n: usize) -> Self {
        Self {
            by_hash: HashMap::with_capacity_and_hasher(n, ByPrefix),
        }
    }

    /// Add a key; false (and nothing changed) when another key has the same hash.
    pub fn insert(&mut self, hash: KeyHash, key: Arc<Key>) -> bool {
        match self.by_hash.entry(hash) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(key);
                true
            }
        }
    }

    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Key>> {
        self.by_hash.values()
    }

    /// Up to `limit` keys for `/config`, sorted by id: names, scopes and limits, never hashes.
    pub fn describe(&self, limit: usize) -> Vec<serde_json::Value> {
        let mut keys: Vec<&Arc<Key>> = self.iter().collect();
        keys.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        keys.into_iter()
            .take(limit)
            .map(|k| {
                let (namespace, name) = k.id.split_once('/').unwrap_or(("", &k.id));
                serde_json::json!({
                    "name": name, "namespace": namespace,
                    "models": k.models.iter().map(Glob::as_str).collect::<Vec<_>>(),
                    "limits": k.limits, "budget": k.budget,
                    "expiresAt": k.expires_at.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
                    "disabled": k.disabled, "exhausted": k.exhausted,
                    "maxCostPerRequest": k.max_cost_per_request,
                })
            })
            .collect()
    }

    pub fn get(&self, hash: &KeyHash) -> Option<&Arc<Key>> {
        self.by_hash.get(hash)
    }

    pub fn authenticate(&self, raw: &[u8]) -> Option<&Arc<Key>> {
        let presented = KeyHash::of(raw);
        let (stored, key) = self.by_hash.get_key_value(&presented)?;
        bool::from(stored.0.ct_eq(&presented.0)).then_some(key)
    }
}

/// Is a presented token the expected one? Constant time for equal lengths (the length of a
/// random token is no secret).
pub use modelgate_wire::same_token;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(Glob::new("*").matches("anything"));
        assert!(Glob::new("gpt-*").matches("gpt-4o"));
        assert!(!Glob::new("gpt-*").matches("claude"));
        assert!(Glob::new("*-mini").matches("gpt-4o-mini"));
        assert!(Glob::new("a*b*c").matches("aXXbYYc"));
        assert!(!Glob::new("a*b*c").matches("aXXbYY"));
        assert!(Glob::new("exact").matches("exact"));
        assert!(!Glob::new("exact").matches("exact2"));
    }

    #[test]
    fn authenticates_by_hash_only() {
        let key = Arc::new(Key {
            id: "default/k".into(),
            namespace: "default".into(),
            models: Box::default(),
            limits: Limits::default(),
            budget: None,
            expires_at: None,
            disabled: false,
            exhausted: false,
            max_cost_per_request: None,
            state: OnceLock::new(),
        });
        let mut store = KeyStore::with_capacity(1);
        assert!(store.insert(KeyHash::of(b"sk-right"), key));
        assert!(store.authenticate(b"sk-right").is_some());
        assert!(store.authenticate(b"sk-wrong").is_none());
        assert!(!format!("{store:?}").contains("sk-right"));
    }
}
