//! Watch → index → compile → publish.
//!
//! Three watchers (ModelRoute, ApiKey, Secret) feed the index; any change wakes the compile
//! loop, which debounces briefly, compiles, and publishes the snapshot on a
//! `tokio::sync::watch` channel only when its version (a content hash) changed, so nothing
//! wakes when nothing changed. Proxy streams subscribe to that channel.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::core::PartialObjectMeta;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use modelgate_crds::{ApiKey, ModelRoute};
use modelgate_wire::clock::unix_now;
use tokio::sync::{Notify, watch};

use crate::index::{CREDENTIAL_LABEL, Compiled, Context, Index, ObjKey};
use crate::metrics::Metrics;
use crate::tenancy::{Authenticator, Identity, SIDECAR_LABEL, Scope, Tenancy, View};
use crate::usage::{self, Book};

/// How long the compile loop waits for more changes before compiling.
const DEBOUNCE: Duration = Duration::from_millis(20);
/// Published views remembered, to tell which generations a proxy's ack covers.
const HISTORY: usize = 256;

/// One view of a release, serialized once for every stream with that view.
#[derive(Debug)]
pub struct Published {
    pub version: String,
    /// The stream message: `{"type":"snapshot",...}\n`.
    pub line: Bytes,
    pub generations: Arc<HashMap<ObjKey, i64>>,
    pub at: Instant,
}

/// A compiled snapshot of every namespace. Proxies never receive it whole: each stream
/// takes the view of the namespaces its proxy serves (memoized per view).
#[derive(Debug)]
pub struct Release {
    pub version: String,
    /// Bumped when namespace labels change: views may then differ at the same version.
    pub namespaces_epoch: u64,
    compiled: Arc<Compiled>,
    at: Instant,
    views: Mutex<HashMap<View, Arc<Published>>>,
}

impl Release {
    /// The snapshot a proxy with this view receives.
    pub fn view(&self, view: &View, shared: &Shared) -> Arc<Published> {
        if let Some(p) = lock(&self.views).get(view) {
            return p.clone();
        }
        let (spec, generations) = self.compiled.view(view);
        let version = spec.version.clone().unwrap_or_default();
        let mut line = serde_json::to_vec(&serde_json::json!({
            "type": "snapshot", "version": version, "snapshot": spec,
        }))
        .unwrap_or_default();
        line.push(b'\n');
        shared.metrics.snapshot_bytes.set(line.len() as i64);
        let published = Arc::new(Published {
            version,
            line: Bytes::from(line),
            generations: Arc::new(generations),
            at: self.at,
        });
        {
            // A version seen before (a change reverted, or a spec edit that compiles to the
            // same snapshot) now stands for newer generations: the newest entry wins.
            let mut h = lock(&shared.history);
            h.retain(|p| p.version != published.version);
            h.push_back(published.clone());
            while h.len() > HISTORY {
                h.pop_front();
            }
        }
        lock(&self.views).insert(view.clone(), published.clone());
        published
    }
}

/// A proxy with an open stream to this replica.
#[derive(Debug, Clone)]
pub struct ProxyInfo {
    pub identity: Identity,
    pub scope: Scope,
    pub streams: u32,
    pub connected_at: Instant,
    pub acked: Option<String>,
    pub error: Option<String>,
}

/// A proxy's fleet-wide name: its proven identity and the id it chose. Two identities can
/// never collide, so one tenant cannot ack or report for another's proxy.
pub fn proxy_key(identity: &Identity, id: &str) -> String {
    format!("{identity}/{id}")
}

pub struct Shared {
    pub index: Mutex<Index>,
    pub compiled: Mutex<Arc<Compiled>>,
    pub published: watch::Sender<Option<Arc<Release>>>,
    history: Mutex<VecDeque<Arc<Published>>>,
    pub proxies: Mutex<HashMap<String, ProxyInfo>>,
    pub book: Mutex<Book>,
    pub metrics: Metrics,
    /// Wakes the compile loop.
    pub changed: Notify,
    /// Wakes the status writer.
    pub status_wake: Notify,
    /// Wakes the CA bundle publisher (a namespace opted in or out).
    pub namespaces_changed: Notify,
    namespaces_epoch: AtomicU64,
    pub leader: AtomicBool,
    /// The current leader's config URL, for forwarding usage reports.
    pub leader_url: Mutex<Option<String>>,
    /// Bit per kind whose initial list has arrived (routes 1, keys 2, secrets 4, namespaces 8),
    /// and 16 once the persisted usage was read (so no snapshot forgets a spent budget).
    synced: AtomicU8,
    pub auth: Authenticator,
    pub tenancy: Tenancy,
    /// This replica's name (its Lease identity).
    pub identity: String,
    /// Proxies connected to other replicas, as they reported to us while we lead.
    remote: Mutex<HashMap<String, Remote>>,
    /// The fleet the leader told us about (when we do not lead).
    learned: Mutex<Vec<RemoteProxy>>,
    /// Wakes the task that tells the leader about our proxies.
    pub proxies_changed: Notify,
}

/// What another replica reported about its proxies.
#[derive(Debug, Clone)]
struct Remote {
    at: Instant,
    proxies: Vec<RemoteProxy>,
}

/// A proxy as replicas tell each other: its fleet-wide key, what it serves, the version
/// it applied.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct RemoteProxy {
    pub id: String,
    pub scope: Scope,
    #[serde(default)]
    pub acked: Option<String>,
}

/// How long a replica's report counts.
const REMOTE_TTL: Duration = Duration::from_secs(10);

impl Shared {
    pub fn new(auth: Authenticator, tenancy: Tenancy, identity: String) -> Arc<Self> {
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
            namespaces_changed: Notify::new(),
            namespaces_epoch: AtomicU64::new(0),
            leader: AtomicBool::new(false),
            leader_url: Mutex::new(None),
            synced: AtomicU8::new(0),
            auth,
            tenancy,
            identity,
            remote: Mutex::default(),
            learned: Mutex::default(),
            proxies_changed: Notify::new(),
        })
    }

    /// Proxies connected to this replica, with what they serve and the version each applied.
    pub fn local_proxies(&self) -> Vec<RemoteProxy> {
        lock(&self.proxies)
            .iter()
            .filter(|(_, p)| p.streams > 0)
            .map(|(id, p)| RemoteProxy {
                id: id.clone(),
                scope: p.scope.clone(),
                acked: p.acked.clone(),
            })
            .collect()
    }

    /// Every proxy of the fleet this replica knows of: its own, plus those other replicas
    /// reported recently (when leading) or the leader told us about (otherwise).
    pub fn fleet(&self) -> Vec<RemoteProxy> {
        let mut all = self.local_proxies();
        let mut seen: HashSet<String> = all.iter().map(|p| p.id.clone()).collect();
        let others: Vec<RemoteProxy> = if self.leader.load(Ordering::Relaxed) {
            let remote = lock(&self.remote);
            remote
                .values()
                .filter(|r| r.at.elapsed() < REMOTE_TTL)
                .flat_map(|r| r.proxies.iter().cloned())
                .collect()
        } else {
            lock(&self.learned).clone()
        };
        for p in others {
            if seen.insert(p.id.clone()) {
                all.push(p);
            }
        }
        all
    }

    /// Record another replica's proxies (leader side); returns the whole fleet.
    pub fn record_remote(&self, replica: &str, proxies: Vec<RemoteProxy>) -> Vec<RemoteProxy> {
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
        self.fleet()
    }

    /// Learn the fleet from the leader (non-leader side).
    pub fn learn_fleet(&self, fleet: Vec<RemoteProxy>) {
        let mut learned = lock(&self.learned);
        if *learned != fleet {
            *learned = fleet;
            self.changed.notify_one();
        }
    }

    /// How many proxies of the fleet serve each namespace that has keys.
    fn serving(&self, index: &Index) -> HashMap<String, u32> {
        let namespaces: BTreeSet<String> = index
            .keys()
            .map(|k| k.metadata.namespace.clone().unwrap_or_default())
            .collect();
        // Resolve each distinct scope once: a fleet has many proxies but few scopes.
        let mut scopes: HashMap<Scope, u32> = HashMap::new();
        for p in self.fleet() {
            *scopes.entry(p.scope).or_default() += 1;
        }
        let mut out: HashMap<String, u32> = HashMap::new();
        for (scope, proxies) in scopes {
            let view = scope.resolve(&index.namespaces);
            for ns in namespaces.iter().filter(|ns| view.covers(ns)) {
                *out.entry(ns.clone()).or_default() += proxies;
            }
        }
        out
    }

    /// Namespaces whose sidecars may connect: they need the CA bundle.
    pub fn sidecar_namespaces(&self) -> BTreeSet<String> {
        lock(&self.index)
            .namespaces
            .iter()
            .filter(|(_, l)| l.get(SIDECAR_LABEL).map(String::as_str) == Some("true"))
            .map(|(n, _)| n.clone())
            .collect()
    }

    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed) == 31
    }

    /// The persisted usage is in the book.
    pub fn usage_loaded(&self) {
        if self.synced.fetch_or(16, Ordering::Relaxed) & 16 == 0 {
            self.changed.notify_one();
        }
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
        // Compile a copy: watchers keep applying events meanwhile, never waiting on a compile,
        // and the context is computed from the same copy the compile reads.
        let index = {
            let index = lock(&self.index);
            self.metrics.cached_secrets.set(index.secret_count() as i64);
            index.clone()
        };
        let ctx = {
            let now = unix_now();
            let book = lock(&self.book);
            Context {
                serving: self.serving(&index),
                exhausted: index
                    .keys()
                    .filter(|k| usage::exhausted(k, now) || book.exhausted(k, now))
                    .map(usage::key_id)
                    .collect(),
            }
        };
        let compiled = index.compile(&ctx);
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
        let epoch = self.namespaces_epoch.load(Ordering::Relaxed);
        // Also when only generations moved (an edit that compiles to the same snapshot, or a
        // change reverted): proxies already run that version and get nothing new, but the
        // release then says which generations it holds, so status can say Programmed.
        let (new_version, changed) = match self.published.borrow().as_ref() {
            None => (true, true),
            Some(p) => (
                p.version != version,
                p.version != version
                    || p.namespaces_epoch != epoch
                    || p.compiled.generations != compiled.generations,
            ),
        };
        let compiled = Arc::new(compiled);
        if changed {
            let release = Arc::new(Release {
                version: version.clone(),
                namespaces_epoch: epoch,
                compiled: compiled.clone(),
                at: Instant::now(),
                views: Mutex::default(),
            });
            self.published.send_replace(Some(release));
            if new_version {
                self.metrics.snapshots_published.inc();
                tracing::info!(
                    version = %version,
                    routes = compiled.spec.routes.len(),
                    keys = compiled.spec.keys.len(),
                    took_ms = started.elapsed().as_secs_f64() * 1e3,
                    "snapshot published"
                );
            }
        }
        *lock(&self.compiled) = compiled;
        self.status_wake.notify_one();
        Some(version)
    }
}

pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Compile whenever something changed, after a short debounce, on a blocking thread (a
/// large index takes a while; the runtime's threads keep serving streams meanwhile).
pub async fn compile_loop(shared: Arc<Shared>) {
    loop {
        shared.changed.notified().await;
        tokio::time::sleep(DEBOUNCE).await;
        if shared.is_synced() {
            let s = shared.clone();
            let _ = tokio::task::spawn_blocking(move || s.compile_and_publish()).await;
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

impl Indexed for PartialObjectMeta<Namespace> {
    const BIT: u8 = 8;
    fn apply(i: &mut Index, o: Self) {
        i.apply_namespace(
            o.metadata.name.unwrap_or_default(),
            o.metadata.labels.unwrap_or_default(),
        )
    }
    fn delete(i: &mut Index, o: &Self) {
        i.delete_namespace(o.metadata.name.as_deref().unwrap_or_default())
    }
    fn reset(i: &mut Index, all: Vec<Self>) {
        i.reset_namespaces(
            all.into_iter()
                .map(|o| {
                    (
                        o.metadata.name.unwrap_or_default(),
                        o.metadata.labels.unwrap_or_default(),
                    )
                })
                .collect(),
        )
    }
}

/// Feed one kind's watch events into the index.
async fn index_events<K, S>(shared: Arc<Shared>, stream: S)
where
    K: Indexed + Send + 'static,
    S: futures_util::Stream<Item = Result<Event<K>, watcher::Error>> + Send,
{
    let mut buffer: Vec<K> = Vec::new();
    let mut stream = std::pin::pin!(stream);
    let namespaces = K::BIT == 8;
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::Init) => buffer.clear(),
            Ok(Event::InitApply(o)) => buffer.push(o),
            Ok(Event::InitDone) => {
                K::reset(&mut lock(&shared.index), std::mem::take(&mut buffer));
                shared.synced.fetch_or(K::BIT, Ordering::Relaxed);
            }
            Ok(Event::Apply(o)) => K::apply(&mut lock(&shared.index), o),
            Ok(Event::Delete(o)) => K::delete(&mut lock(&shared.index), &o),
            Err(e) => {
                shared.metrics.error("watch");
                tracing::warn!(error = %e, kind = std::any::type_name::<K>(), "watch failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        }
        if namespaces {
            shared.namespaces_epoch.fetch_add(1, Ordering::Relaxed);
            shared.namespaces_changed.notify_one();
        }
        shared.changed.notify_one();
    }
}

/// Start the watchers. Secrets are watched with a label selector, so the API server sends
/// only opted-in ones and nothing else (Helm releases, tokens, TLS keys) is ever cached.
/// Namespaces are watched for their labels only.
pub fn spawn_watchers(shared: &Arc<Shared>, client: &Client) {
    let all = watcher::Config::default;
    tokio::spawn(index_events(
        shared.clone(),
        watcher::watcher(Api::<ModelRoute>::all(client.clone()), all()),
    ));
    tokio::spawn(index_events(
        shared.clone(),
        watcher::watcher(Api::<ApiKey>::all(client.clone()), all()),
    ));
    tokio::spawn(index_events(
        shared.clone(),
        watcher::watcher(
            Api::<Secret>::all(client.clone()),
            all().labels(&format!("{CREDENTIAL_LABEL}=true")),
        ),
    ));
    tokio::spawn(index_events(
        shared.clone(),
        watcher::watcher(
            Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
            all(),
        ),
    ));
}

/// The cluster's Service range(s), refused as upstreams by default. Kubernetes 1.33+ lists
/// them as ServiceCIDR objects; older clusters do not publish the range, so only the API
/// server's own ClusterIP (the `kubernetes` Service) is known, and `--service-cidr` should
/// name the rest.
pub async fn service_ranges(client: &Client) -> Vec<String> {
    use k8s_openapi::api::networking::v1::ServiceCIDR;
    use kube::api::ListParams;
    match Api::<ServiceCIDR>::all(client.clone())
        .list(&ListParams::default())
        .await
    {
        Ok(list) => {
            let ranges: Vec<String> = list
                .items
                .into_iter()
                .filter_map(|c| c.spec)
                .flat_map(|s| s.cidrs.unwrap_or_default())
                .collect();
            if !ranges.is_empty() {
                tracing::info!(ranges = ?ranges, "refusing the cluster's Service ranges as upstreams");
                return ranges;
            }
        }
        Err(e) => tracing::debug!(error = %e, "no ServiceCIDR API"),
    }
    match Api::<k8s_openapi::api::core::v1::Service>::namespaced(client.clone(), "default")
        .get_opt("kubernetes")
        .await
    {
        Ok(Some(svc)) => {
            let ips: Vec<String> = svc
                .spec
                .and_then(|s| s.cluster_ips.or(s.cluster_ip.map(|ip| vec![ip])))
                .unwrap_or_default()
                .into_iter()
                .filter(|ip| ip.parse::<std::net::IpAddr>().is_ok())
                .collect();
            tracing::warn!(
                refused = ?ips,
                "this cluster does not publish its Service range (ServiceCIDR needs Kubernetes 1.33); refusing the API server's ClusterIP as upstream; name the whole range with --service-cidr"
            );
            ips
        }
        Ok(None) => vec![],
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the kubernetes Service; name the cluster's Service range with --service-cidr");
            vec![]
        }
    }
}

/// Fail early, with a message a person can act on, when the CRDs are missing or the
/// operator may not read what it needs.
pub async fn preflight(client: &Client, namespace: &str) -> anyhow::Result<()> {
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
            .list(&lp.clone().labels(&format!("{CREDENTIAL_LABEL}=true")))
            .await
            .map(|_| ()),
    )?;
    if let Err(kube::Error::Api(s)) =
        Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client.clone(), namespace)
            .get_opt(crate::status::USAGE_CONFIGMAP)
            .await
        && s.code == 403
    {
        anyhow::bail!(
            "no permission to read ConfigMap {namespace}/{}: {}; the operator keeps spent budgets there (see the chart's Role)",
            crate::status::USAGE_CONFIGMAP,
            s.message
        );
    }
    check(
        "namespaces",
        Api::<Namespace>::all(client.clone())
            .list_metadata(&lp)
            .await
            .map(|_| ()),
    )?;
    Ok(())
}
