//! Watch → index → compile → publish.
//!
//! Three watchers (ModelRoute, ApiKey, Secret) feed the index; any change wakes the compile
//! loop, which debounces briefly, compiles, and publishes the snapshot on a
//! `tokio::sync::watch` channel only when its version (a content hash) changed, so nothing
//! wakes when nothing changed. Proxy streams subscribe to that channel.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use modelgate_crds::{ApiKey, ModelRoute};
use modelgate_dataplane::admission::unix_now;
use tokio::sync::{Notify, watch};

use crate::index::{Compiled, Context, Index, ObjKey};
use crate::metrics::Metrics;
use crate::usage::{self, Book};

/// How long the compile loop waits for more changes before compiling.
const DEBOUNCE: Duration = Duration::from_millis(20);
/// Published versions remembered, to tell which generations a proxy's ack covers.
const HISTORY: usize = 64;

/// One published snapshot, serialized once for every stream.
#[derive(Debug)]
pub struct Published {
    pub version: String,
    /// The stream message: `{"type":"snapshot",...}\n`.
    pub line: Bytes,
    pub generations: Arc<HashMap<ObjKey, i64>>,
    pub at: Instant,
}

#[derive(Debug, Clone, Default)]
pub struct ProxyInfo {
    pub streams: u32,
    pub connected_at: Option<Instant>,
    pub acked: Option<String>,
    pub error: Option<String>,
}

pub struct Shared {
    pub index: Mutex<Index>,
    pub compiled: Mutex<Arc<Compiled>>,
    pub published: watch::Sender<Option<Arc<Published>>>,
    history: Mutex<VecDeque<Arc<Published>>>,
    pub proxies: Mutex<HashMap<String, ProxyInfo>>,
    pub book: Mutex<Book>,
    pub metrics: Metrics,
    /// Wakes the compile loop.
    pub changed: Notify,
    /// Wakes the status writer.
    pub status_wake: Notify,
    pub leader: AtomicBool,
    /// The current leader's config URL, for forwarding usage reports.
    pub leader_url: Mutex<Option<String>>,
    /// Bit per kind whose initial list has arrived (routes 1, keys 2, secrets 4).
    synced: AtomicU8,
    pub token: String,
    /// This replica's name (its Lease identity).
    pub identity: String,
    /// Proxies connected to other replicas, as they reported to us while we lead.
    remote: Mutex<HashMap<String, Remote>>,
    /// The fleet-wide proxy count the leader told us (when we do not lead).
    learned_total: std::sync::atomic::AtomicU32,
    /// Wakes the task that tells the leader about our proxies.
    pub proxies_changed: Notify,
}

/// What another replica reported about its proxies.
#[derive(Debug, Clone)]
struct Remote {
    at: Instant,
    proxies: Vec<RemoteProxy>,
}

/// A proxy as replicas tell each other: its id and the version it applied.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct RemoteProxy {
    pub id: String,
    #[serde(default)]
    pub acked: Option<String>,
}

/// How long a replica's report counts.
const REMOTE_TTL: Duration = Duration::from_secs(10);

impl Shared {
    pub fn new(token: String, identity: String) -> Arc<Self> {
        let (published, _) = watch::channel(None);
        Arc::new(Self {
            index: Mutex::default(),
            compiled: Mutex::default(),
            published,
            history: Mutex::default(),
            proxies: Mutex::default(),
            book: Mutex::default(),
            metrics: Metrics::new(),
            changed: Notify::new(),
            status_wake: Notify::new(),
            leader: AtomicBool::new(false),
            leader_url: Mutex::new(None),
            synced: AtomicU8::new(0),
            token,
            identity,
            remote: Mutex::default(),
            learned_total: std::sync::atomic::AtomicU32::new(0),
            proxies_changed: Notify::new(),
        })
    }

    /// Proxies connected to this replica, with the version each applied.
    pub fn local_proxies(&self) -> Vec<RemoteProxy> {
        lock(&self.proxies)
            .iter()
            .filter(|(_, p)| p.streams > 0)
            .map(|(id, p)| RemoteProxy {
                id: id.clone(),
                acked: p.acked.clone(),
            })
            .collect()
    }

    /// Every proxy of the fleet this replica knows of: its own, plus (when leading) those
    /// other replicas reported recently.
    pub fn fleet(&self) -> Vec<RemoteProxy> {
        let mut all = self.local_proxies();
        if self.leader.load(Ordering::Relaxed) {
            let remote = lock(&self.remote);
            for r in remote.values().filter(|r| r.at.elapsed() < REMOTE_TTL) {
                all.extend(r.proxies.iter().cloned());
            }
        }
        all
    }

    /// Record another replica's proxies (leader side); returns the fleet size.
    pub fn record_remote(&self, replica: &str, proxies: Vec<RemoteProxy>) -> u32 {
        let changed = {
            let mut remote = lock(&self.remote);
            let old = remote.insert(
                replica.to_owned(),
                Remote {
                    at: Instant::now(),
                    proxies: proxies.clone(),
                },
            );
            old.is_none_or(|o| o.proxies != proxies)
        };
        if changed {
            self.changed.notify_one();
            self.status_wake.notify_one();
        }
        self.fleet().len() as u32
    }

    /// Learn the fleet size from the leader (non-leader side).
    pub fn learn_total(&self, total: u32) {
        if self.learned_total.swap(total, Ordering::Relaxed) != total {
            self.changed.notify_one();
        }
    }

    /// Proxies across all replicas: per-key limits are divided by this number.
    pub fn proxy_total(&self) -> u32 {
        let local = self.connected();
        if self.leader.load(Ordering::Relaxed) {
            self.fleet().len() as u32
        } else {
            local.max(self.learned_total.load(Ordering::Relaxed))
        }
    }

    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed) == 7
    }

    pub fn connected(&self) -> u32 {
        lock(&self.proxies)
            .values()
            .filter(|p| p.streams > 0)
            .count() as u32
    }

    /// Generations that a published version contained, if still remembered.
    pub fn generations_of(&self, version: &str) -> Option<Arc<HashMap<ObjKey, i64>>> {
        lock(&self.history)
            .iter()
            .rev()
            .find(|p| p.version == version)
            .map(|p| p.generations.clone())
    }

    pub fn publish_time(&self, version: &str) -> Option<Instant> {
        lock(&self.history)
            .iter()
            .rev()
            .find(|p| p.version == version)
            .map(|p| p.at)
    }

    /// Compile now and publish if the version changed. Returns the version in force.
    pub fn compile_and_publish(&self) -> Option<String> {
        let started = Instant::now();
        let ctx = {
            let index = lock(&self.index);
            let now = unix_now();
            Context {
                proxies: self.proxy_total(),
                exhausted: index
                    .keys()
                    .filter(|k| usage::exhausted(k, now))
                    .map(|k| {
                        format!(
                            "{}/{}",
                            k.metadata.namespace.clone().unwrap_or_default(),
                            k.metadata.name.clone().unwrap_or_default()
                        )
                    })
                    .collect(),
            }
        };
        let compiled = lock(&self.index).compile(&ctx);
        self.metrics.compiles.inc();
        self.metrics
            .compile_seconds
            .observe(started.elapsed().as_secs_f64());
        let invalid = |kind: crate::index::Kind| {
            compiled
                .verdicts
                .iter()
                .filter(|(k, v)| k.kind == kind && !v.accepted)
                .count() as i64
        };
        for (kind, label) in [
            (crate::index::Kind::ModelRoute, "ModelRoute"),
            (crate::index::Kind::ApiKey, "ApiKey"),
        ] {
            self.metrics
                .invalid_objects
                .get_or_create(&crate::metrics::KindLabels { kind: label })
                .set(invalid(kind));
        }
        let version = compiled.spec.version.clone().unwrap_or_default();
        let changed = self
            .published
            .borrow()
            .as_ref()
            .is_none_or(|p| p.version != version);
        if changed {
            let mut line = serde_json::to_vec(&serde_json::json!({
                "type": "snapshot", "version": version, "snapshot": compiled.spec,
            }))
            .unwrap_or_default();
            line.push(b'\n');
            self.metrics.snapshot_bytes.set(line.len() as i64);
            self.metrics.snapshots_published.inc();
            let published = Arc::new(Published {
                version: version.clone(),
                line: Bytes::from(line),
                generations: Arc::new(compiled.generations.clone()),
                at: Instant::now(),
            });
            {
                let mut h = lock(&self.history);
                h.push_back(published.clone());
                while h.len() > HISTORY {
                    h.pop_front();
                }
            }
            self.published.send_replace(Some(published));
            tracing::info!(
                version = %version,
                routes = compiled.spec.routes.len(),
                keys = compiled.spec.keys.len(),
                took_ms = started.elapsed().as_secs_f64() * 1e3,
                "snapshot published"
            );
        }
        *lock(&self.compiled) = Arc::new(compiled);
        self.status_wake.notify_one();
        Some(version)
    }
}

pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Compile whenever something changed, after a short debounce.
pub async fn compile_loop(shared: Arc<Shared>) {
    loop {
        shared.changed.notified().await;
        tokio::time::sleep(DEBOUNCE).await;
        if shared.is_synced() {
            shared.compile_and_publish();
        }
    }
}

/// Recompile now and then so time-based facts (budget periods) move on.
pub async fn tick(shared: Arc<Shared>) {
    let mut t = tokio::time::interval(Duration::from_secs(30));
    loop {
        t.tick().await;
        shared.changed.notify_one();
    }
}

trait Indexed: Sized {
    const BIT: u8;
    fn apply(index: &mut Index, o: Self);
    fn delete(index: &mut Index, o: &Self);
    fn reset(index: &mut Index, all: Vec<Self>);
}

impl Indexed for ModelRoute {
    const BIT: u8 = 1;
    fn apply(i: &mut Index, o: Self) {
        i.apply_route(o)
    }
    fn delete(i: &mut Index, o: &Self) {
        i.delete_route(o)
    }
    fn reset(i: &mut Index, all: Vec<Self>) {
        i.reset_routes(all)
    }
}

impl Indexed for ApiKey {
    const BIT: u8 = 2;
    fn apply(i: &mut Index, o: Self) {
        i.apply_key(o)
    }
    fn delete(i: &mut Index, o: &Self) {
        i.delete_key(o)
    }
    fn reset(i: &mut Index, all: Vec<Self>) {
        i.reset_keys(all)
    }
}

impl Indexed for Secret {
    const BIT: u8 = 4;
    fn apply(i: &mut Index, o: Self) {
        i.apply_secret(o)
    }
    fn delete(i: &mut Index, o: &Self) {
        i.delete_secret(o)
    }
    fn reset(i: &mut Index, all: Vec<Self>) {
        i.reset_secrets(all)
    }
}

async fn watch_kind<K>(shared: Arc<Shared>, api: Api<K>)
where
    K: Indexed
        + kube::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + 'static,
{
    let mut buffer: Vec<K> = Vec::new();
    let mut stream = watcher::watcher(api, watcher::Config::default()).boxed();
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::Init) => buffer.clear(),
            Ok(Event::InitApply(o)) => buffer.push(o),
            Ok(Event::InitDone) => {
                K::reset(&mut lock(&shared.index), std::mem::take(&mut buffer));
                shared.synced.fetch_or(K::BIT, Ordering::Relaxed);
                shared.changed.notify_one();
            }
            Ok(Event::Apply(o)) => {
                K::apply(&mut lock(&shared.index), o);
                shared.changed.notify_one();
            }
            Ok(Event::Delete(o)) => {
                K::delete(&mut lock(&shared.index), &o);
                shared.changed.notify_one();
            }
            Err(e) => {
                shared.metrics.error("watch");
                tracing::warn!(error = %e, kind = std::any::type_name::<K>(), "watch failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Start the three watchers.
pub fn spawn_watchers(shared: &Arc<Shared>, client: &Client) {
    tokio::spawn(watch_kind(
        shared.clone(),
        Api::<ModelRoute>::all(client.clone()),
    ));
    tokio::spawn(watch_kind(
        shared.clone(),
        Api::<ApiKey>::all(client.clone()),
    ));
    tokio::spawn(watch_kind(
        shared.clone(),
        Api::<Secret>::all(client.clone()),
    ));
}

/// Fail early, with a message a person can act on, when the CRDs are missing or the
/// operator may not read what it needs.
pub async fn preflight(client: &Client) -> anyhow::Result<()> {
    use kube::api::ListParams;
    let lp = ListParams::default().limit(1);
    let check = |what: &'static str, r: Result<(), kube::Error>| -> anyhow::Result<()> {
        match r {
            Ok(()) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => anyhow::bail!(
                "the {what} CRD is not installed: kubectl apply -f crds/manifests/ (or install the Helm chart)"
            ),
            Err(kube::Error::Api(s)) if s.code == 403 => anyhow::bail!(
                "no permission to list {what} cluster-wide: {}; check the operator's ClusterRole",
                s.message
            ),
            Err(e) => anyhow::bail!("cannot reach the Kubernetes API to list {what}: {e}"),
        }
    };
    check(
        "modelroutes.modelgate.dev",
        Api::<ModelRoute>::all(client.clone())
            .list(&lp)
            .await
            .map(|_| ()),
    )?;
    check(
        "apikeys.modelgate.dev",
        Api::<ApiKey>::all(client.clone())
            .list(&lp)
            .await
            .map(|_| ()),
    )?;
    check(
        "secrets",
        Api::<Secret>::all(client.clone())
            .list(&lp)
            .await
            .map(|_| ()),
    )?;
    Ok(())
}
