//! The active snapshot and the state that outlives snapshots.
//!
//! `Live` holds the current `Snapshot` behind `arc-swap`: every request loads it once and
//! keeps that `Arc` to its end, so in-flight requests finish on the snapshot they started
//! with while a reload swaps in the next one. `StateRegistry` keeps per-key counters and
//! per-backend health by name, so a reload carries them over. Metric series are kept by name
//! too (in `metrics`); every swap first tells them which names the new snapshot holds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwapOption;

use crate::admission::KeyState;
use crate::keys::KeyStore;
use crate::metrics::Metrics;
use crate::routes::{BackendState, RouteTable};
use crate::shadow::ShadowState;

#[derive(Debug)]
pub struct Snapshot {
    pub version: String,
    pub routes: RouteTable,
    pub keys: KeyStore,
    /// Redacted description of the routes for `/config` (a JSON array).
    pub routes_summary: String,
}

#[derive(Debug, Default)]
pub struct StateRegistry {
    keys: Mutex<HashMap<Arc<str>, Arc<KeyState>, foldhash::fast::RandomState>>,
    backends: Mutex<HashMap<(String, String), Arc<BackendState>>>,
    /// Shadow calls under way, by route id.
    shadows: Mutex<HashMap<String, Arc<ShadowState>>>,
    /// Whether routes may sign with the proxy's own cloud identity (AWS web identity, GKE
    /// workload identity): set once at start-up, read when snapshots are compiled.
    pub ambient_identity: std::sync::atomic::AtomicBool,
}

impl StateRegistry {
    /// The counters of key `id`, made when it has none yet.
    pub fn key_state(&self, id: &Arc<str>) -> Arc<KeyState> {
        let mut m = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(id.clone()).or_default().clone()
    }

    /// Every key's counters (keys that were used; others have none).
    pub fn key_states(&self) -> Vec<(Arc<str>, Arc<KeyState>)> {
        let m = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        m.iter().map(|(id, s)| (id.clone(), s.clone())).collect()
    }

    /// The counters of key `id` if it has any (a compile links these, and makes none).
    pub fn existing_key_state(&self, id: &str) -> Option<Arc<KeyState>> {
        let m = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        m.get(id).cloned()
    }

    pub fn backend_state(&self, route: &str, backend: &str) -> Arc<BackendState> {
        let mut m = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        m.entry((route.to_owned(), backend.to_owned()))
            .or_default()
            .clone()
    }

    /// The shadow calls of route `route` under way, counted across snapshots.
    pub fn shadow_state(&self, route: &str) -> Arc<ShadowState> {
        let mut m = self.shadows.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(route.to_owned()).or_default().clone()
    }

    /// Forget state of objects the active snapshot no longer has. Only entries nobody else
    /// holds are dropped, so a request still running on an older snapshot keeps counting.
    pub fn prune(&self) {
        self.keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, s| Arc::strong_count(s) > 1);
        self.backends
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, s| Arc::strong_count(s) > 1);
        self.shadows
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, s| Arc::strong_count(s) > 1);
    }
}

/// The proxy's view of its configuration: the snapshot in force (if any yet) and the
/// registry it was compiled against.
#[derive(Debug, Default)]
pub struct Live {
    current: ArcSwapOption<Snapshot>,
    pub registry: StateRegistry,
    /// Told which names each snapshot holds; None keeps no metrics in step (benchmarks).
    metrics: Option<Arc<Metrics>>,
}

impl Live {
    /// A `Live` whose swaps keep `metrics` in step: series of the names a snapshot drops
    /// leave `/metrics` after a grace period.
    pub fn metered(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics: Some(metrics),
            ..Self::default()
        }
    }

    pub fn load(&self) -> Option<Arc<Snapshot>> {
        self.current.load_full()
    }

    /// Swap in a snapshot; returns the previous one so the caller decides where the
    /// (possibly large) deallocation happens.
    pub fn store(&self, snapshot: Snapshot) -> Option<Arc<Snapshot>> {
        if let Some(m) = &self.metrics {
            take_census(m, &snapshot, Instant::now());
        }
        let old = self.current.swap(Some(Arc::new(snapshot)));
        self.registry.prune();
        old
    }
}

/// Tell `metrics` the names `snapshot` holds before it goes live, so its backends start with
/// the handles their names have and nothing it keeps starts a grace period.
fn take_census(metrics: &Metrics, snapshot: &Snapshot, now: Instant) {
    let census = metrics.census();
    for route in snapshot.routes.routes() {
        census.route(&route.id);
        for rule in route.masking.iter().flat_map(|m| m.rule_names()) {
            census.masking_rule(&route.id, rule);
        }
        let shadow = route.shadow.as_ref().map(|s| &s.backend);
        for b in route.backends().chain(shadow) {
            if let Some(series) = census.backend(&b.route_id, &b.name) {
                b.link_series(series);
            }
        }
    }
    for key in snapshot.keys.iter() {
        census.key(&key.id);
    }
    census.finish(now);
}
