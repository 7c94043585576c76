//! Status, written only by the Lease holder.
//!
//! For every ModelRoute and ApiKey: `observedGeneration`, `Accepted` (the compiler's
//! verdict), `ResolvedRefs` (its Secret references resolve to opted-in Secrets) and
//! `Programmed` (true when every connected proxy serving its namespace acknowledged a
//! snapshot containing this generation), plus proxy counts, and for keys the usage in the
//! current budget period. Messages name only objects of the object's own namespace and
//! never what a Secret holds. Written with server-side apply on the status subresource, and only when
//! it differs from what this replica last wrote. The leader also mints Secrets for ApiKeys
//! without `secretRef`, and records Events when an object stops being accepted.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client, Resource, ResourceExt};
use modelgate_crds::{ApiKey, Condition, ModelRoute};
use modelgate_wire::clock::unix_now;
use serde_json::json;

use crate::controller::{Shared, lock};
use crate::index::{CREDENTIAL_LABEL, Kind, MINTED_KEY, ObjKey, Verdict, minted_secret_name};

/// The ConfigMap (operator namespace) where the leader persists spent budgets.
pub const USAGE_CONFIGMAP: &str = "modelgate-usage";

const MANAGER: &str = "modelgate-operator";
pub const ROTATE_ANNOTATION: &str = "modelgate.dev/rotate";
const ROTATION_DONE: &str = "modelgate.dev/rotated-for";

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// A condition, keeping the old transition time when the status did not change.
fn condition(
    old: &[Condition],
    type_: &str,
    ok: bool,
    reason: &str,
    message: &str,
    generation: i64,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let last = old
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(now_rfc3339);
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: Some(generation),
        last_transition_time: last,
    }
}

/// How many connected proxies serving the object's namespace run a snapshot that has `key`
/// at `generation` or newer.
fn programmed(shared: &Shared, key: &ObjKey, generation: i64) -> (i32, i32) {
    let fleet = shared.fleet();
    let connected: Vec<_> = {
        let index = lock(&shared.index);
        fleet
            .into_iter()
            .filter_map(|p| {
                let view = p.scope.resolve(&index.namespaces);
                view.covers(&key.namespace).then_some((p, view))
            })
            .collect()
    };
    // A replica learns what a view's version holds when it renders that view for a proxy.
    // Behind a Service every proxy may stream from another replica, leaving the leader with
    // none of its own: render the fleet's views of the current release here too, so their
    // acknowledged versions can be read.
    let release = shared.published.borrow().clone();
    if let Some(release) = release {
        for (_, view) in &connected {
            release.view(view, shared);
        }
    }
    let connected: Vec<_> = connected.into_iter().map(|(p, _)| p).collect();
    let done = connected
        .iter()
        .filter(|p| {
            p.acked
                .as_deref()
                .and_then(|v| shared.generations_of(v))
                .and_then(|g| g.get(key).copied())
                .is_some_and(|g| g >= generation)
        })
        .count();
    (connected.len() as i32, done as i32)
}

/// `Accepted`, `ResolvedRefs` and `Programmed` for an object's verdict and its proxy counts.
fn conditions(old: &[Condition], v: &Verdict, connected: i32, done: i32) -> [Condition; 3] {
    let refs = if v.refs_unresolved() {
        condition(
            old,
            "ResolvedRefs",
            false,
            v.reason,
            &v.message,
            v.generation,
        )
    } else {
        condition(
            old,
            "ResolvedRefs",
            true,
            "ResolvedRefs",
            "every referenced Secret resolves",
            v.generation,
        )
    };
    [
        condition(
            old,
            "Accepted",
            v.accepted,
            v.reason,
            &v.message,
            v.generation,
        ),
        refs,
        programmed_condition(old, v, connected, done),
    ]
}

fn programmed_condition(old: &[Condition], v: &Verdict, connected: i32, done: i32) -> Condition {
    let (ok, reason, msg) = if !v.accepted {
        (
            false,
            "Invalid",
            "not sent to proxies until it is accepted".to_owned(),
        )
    } else if connected == 0 {
        (
            false,
            "NoProxies",
            "no connected proxy serves this namespace".to_owned(),
        )
    } else if done == connected {
        (
            true,
            "Programmed",
            format!(
                "all {connected} connected proxies applied generation {}",
                v.generation
            ),
        )
    } else {
        (
            false,
            "Pending",
            format!(
                "{done} of {connected} connected proxies applied generation {}",
                v.generation
            ),
        )
    };
    condition(old, "Programmed", ok, reason, &msg, v.generation)
}

/// Tell a Secret that does not exist from one that exists without the opt-in label (a
/// metadata-only read: the operator never reads an unlabelled Secret's data).
struct OptInCheck {
    api_client: Client,
    seen: HashMap<(String, String), (bool, std::time::Instant)>,
}

impl OptInCheck {
    async fn refine(&mut self, key: &ObjKey, v: &Verdict) -> Verdict {
        let Some(secret) = v
            .unresolved_secret
            .clone()
            .filter(|_| v.reason == "SecretNotFound")
        else {
            return v.clone();
        };
        let id = (key.namespace.clone(), secret.clone());
        let fresh = self
            .seen
            .get(&id)
            .filter(|(_, at)| at.elapsed() < Duration::from_secs(30))
            .map(|(exists, _)| *exists);
        let exists = match fresh {
            Some(e) => e,
            None => {
                let api: Api<Secret> = Api::namespaced(self.api_client.clone(), &key.namespace);
                match api.get_metadata_opt(&secret).await {
                    Ok(m) => {
                        let e = m.is_some();
                        self.seen.insert(id, (e, std::time::Instant::now()));
                        e
                    }
                    Err(_) => return v.clone(),
                }
            }
        };
        if !exists {
            return Verdict {
                message: v.message.replace(
                    &format!(" does not exist or does not carry the label {CREDENTIAL_LABEL}=true (only labelled Secrets are read)"),
                    " does not exist",
                ),
                ..v.clone()
            };
        }
        Verdict {
            reason: "SecretNotOptedIn",
            message: format!(
                "{}Secret {}/{secret} exists but is not labelled {CREDENTIAL_LABEL}=true; the operator reads only Secrets that opted in: kubectl label secret {secret} -n {} {CREDENTIAL_LABEL}=true",
                v.message
                    .split_once("Secret ")
                    .map(|(prefix, _)| prefix)
                    .unwrap_or_default(),
                key.namespace,
                key.namespace
            ),
            ..v.clone()
        }
    }
}

/// Load the persisted usage sums into the book (a new term, or a replica following).
async fn load_usage(shared: &Shared, client: &Client, namespace: &str) -> bool {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    match api.get_opt(USAGE_CONFIGMAP).await {
        Ok(cm) => {
            let data = cm.and_then(|c| c.data).unwrap_or_default();
            lock(&shared.book).load(&data);
            shared.usage_loaded();
            shared.changed.notify_one();
            true
        }
        Err(e) => {
            shared.metrics.error("usage_load");
            tracing::warn!(error = %e, "cannot read the persisted usage; will retry");
            false
        }
    }
}

async fn persist_usage(shared: &Shared, client: &Client, namespace: &str) {
    let data = {
        let mut book = lock(&shared.book);
        if !book.dirty {
            return;
        }
        book.dirty = false;
        book.to_data(unix_now())
    };
    let body = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": USAGE_CONFIGMAP, "labels": {"app.kubernetes.io/part-of": "modelgate"}},
        "data": data,
    });
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    if let Err(e) = api
        .patch(
            USAGE_CONFIGMAP,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
    {
        lock(&shared.book).dirty = true;
        shared.metrics.error("usage_persist");
        tracing::warn!(error = %e, "cannot persist usage; will retry");
    }
}

/// Every replica reads the persisted usage before it publishes anything, and replicas that
/// do not lead keep reading it: a budget the leader saw used up is exhausted in every
/// replica's snapshots, even for a key whose status was lost (deleted and recreated).
pub async fn follow_usage(shared: Arc<Shared>, client: Client, namespace: String) {
    loop {
        if !shared.leader.load(Ordering::Relaxed) || !shared.is_synced() {
            load_usage(&shared, &client, &namespace).await;
        }
        tokio::time::sleep(Duration::from_secs(if shared.is_synced() { 3 } else { 1 })).await;
    }
}

/// The status writer loop: wakes on changes (and every few seconds), writes when leader.
pub async fn run(shared: Arc<Shared>, client: Client, reporter: Reporter, namespace: String) {
    let recorder = Recorder::new(client.clone(), reporter);
    let mut written: HashMap<ObjKey, serde_json::Value> = HashMap::new();
    let mut rejected: HashSet<ObjKey> = HashSet::new();
    let mut was_leader = false;
    let mut opt_in = OptInCheck {
        api_client: client.clone(),
        seen: HashMap::new(),
    };
    loop {
        tokio::select! {
            _ = shared.status_wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let leader = shared.leader.load(Ordering::Relaxed);
        if !leader {
            was_leader = false;
            continue;
        }
        if !was_leader {
            // A new term: take in the spent budgets, then write everything again, whatever
            // an earlier leader wrote.
            if !load_usage(&shared, &client, &namespace).await {
                continue;
            }
            shared.changed.notify_one();
            written.clear();
            was_leader = true;
        }
        persist_usage(&shared, &client, &namespace).await;
        let compiled = lock(&shared.compiled).clone();
        mint(&shared, &client, &compiled.to_mint).await;
        rotate(&shared, &client).await;
        for (key, v) in &compiled.verdicts {
            let refined = opt_in.refine(key, v).await;
            let v = &refined;
            let body = match key.kind {
                Kind::ModelRoute => {
                    route_status(&shared, key, v, compiled.backends.get(key).copied())
                }
                Kind::ApiKey => key_status(&shared, key, v),
            };
            let Some(body) = body else { continue };
            if written.get(key) == Some(&body) && !usage_drifted(&shared, key, &body) {
                continue;
            }
            let params = PatchParams::apply(MANAGER).force();
            let result = match key.kind {
                Kind::ModelRoute => Api::<ModelRoute>::namespaced(client.clone(), &key.namespace)
                    .patch_status(&key.name, &params, &Patch::Apply(&body))
                    .await
                    .map(|_| ()),
                Kind::ApiKey => Api::<ApiKey>::namespaced(client.clone(), &key.namespace)
                    .patch_status(&key.name, &params, &Patch::Apply(&body))
                    .await
                    .map(|_| ()),
            };
            match result {
                Ok(()) => {
                    shared
                        .metrics
                        .status_writes
                        .get_or_create(&crate::metrics::KindLabels {
                            kind: match key.kind {
                                Kind::ModelRoute => "ModelRoute",
                                Kind::ApiKey => "ApiKey",
                            },
                        })
                        .inc();
                    written.insert(key.clone(), body);
                }
                // The object or its namespace is going away: nothing to report to.
                Err(kube::Error::Api(s)) if s.code == 404 || terminating(&s) => {}
                Err(e) => {
                    shared.metrics.error("status_write");
                    tracing::warn!(object = %key.id(), error = %e, "status write failed");
                }
            }
            // An Event when an object stops being accepted (or first shows up invalid).
            // Minting is a normal, passing state: no Warning for it.
            if !v.accepted && v.reason != "Minting" && rejected.insert(key.clone()) {
                event(&recorder, &shared, key, v).await;
            } else if v.accepted {
                rejected.remove(key);
            }
        }
        written.retain(|k, _| compiled.verdicts.contains_key(k));
        rejected.retain(|k| compiled.verdicts.contains_key(k));
    }
}

/// Did someone else change a key's usage in its status (a status write by hand, an old
/// backup restored)? The leader's sums win: they are written again.
fn usage_drifted(shared: &Shared, key: &ObjKey, body: &serde_json::Value) -> bool {
    if key.kind != Kind::ApiKey {
        return false;
    }
    let Some(want) = body["status"].get("usage") else {
        return false;
    };
    let index = lock(&shared.index);
    let live = index
        .key(&key.namespace, &key.name)
        .and_then(|k| k.status.as_ref())
        .and_then(|s| s.usage.as_ref())
        .map(|u| serde_json::to_value(u).unwrap_or_default());
    live.as_ref() != Some(want)
}

fn route_status(
    shared: &Shared,
    key: &ObjKey,
    v: &Verdict,
    backends: Option<i32>,
) -> Option<serde_json::Value> {
    let old = {
        let index = lock(&shared.index);
        index.route_conditions(&key.namespace, &key.name)?
    };
    let (connected, done) = programmed(shared, key, v.generation);
    let [accepted, refs, prog] = conditions(&old, v, connected, done);
    Some(json!({
        "apiVersion": "modelgate.dev/v1alpha1", "kind": "ModelRoute",
        "status": {
            "observedGeneration": v.generation,
            "conditions": [accepted, refs, prog],
            "backends": backends,
            "proxies": connected,
            "programmedProxies": done,
        }
    }))
}

fn key_status(shared: &Shared, key: &ObjKey, v: &Verdict) -> Option<serde_json::Value> {
    let (old, usage, last_used, secret_name) = {
        let index = lock(&shared.index);
        let k = index.key(&key.namespace, &key.name)?;
        let old = k
            .status
            .as_ref()
            .map(|s| s.conditions.clone())
            .unwrap_or_default();
        let now = unix_now();
        let book = lock(&shared.book);
        let (usage, last_used) = match book.current(k, now) {
            Some(u) => (
                Some(
                    json!({"period": u.period, "tokens": u.tokens, "costUsd": format!("{:.6}", u.usd)}),
                ),
                (u.last_used > 0)
                    .then(|| {
                        let t = std::time::UNIX_EPOCH + Duration::from_secs(u.last_used / 60 * 60);
                        humantime::format_rfc3339_seconds(t).to_string()
                    })
                    .or_else(|| k.status.as_ref().and_then(|s| s.last_used.clone())),
            ),
            // Nothing new: keep what the status says (editing the spec never resets usage).
            _ => (
                k.status
                    .as_ref()
                    .and_then(|s| s.usage.as_ref())
                    .map(|u| serde_json::to_value(u).unwrap_or_default()),
                k.status.as_ref().and_then(|s| s.last_used.clone()),
            ),
        };
        let secret_name = k
            .spec
            .secret_ref
            .is_none()
            .then(|| minted_secret_name(&key.name));
        (old, usage, last_used, secret_name)
    };
    let (connected, done) = programmed(shared, key, v.generation);
    let [accepted, refs, prog] = conditions(&old, v, connected, done);
    let mut status =
        json!({"observedGeneration": v.generation, "conditions": [accepted, refs, prog]});
    if let Some(u) = usage {
        status["usage"] = u;
    }
    if let Some(l) = last_used {
        status["lastUsed"] = json!(l);
    }
    if let Some(s) = secret_name {
        status["secretName"] = json!(s);
    }
    Some(json!({"apiVersion": "modelgate.dev/v1alpha1", "kind": "ApiKey", "status": status}))
}

/// The API server refuses new content in a namespace that is being deleted.
pub fn terminating(s: &kube::core::Status) -> bool {
    s.code == 403
        && s.details
            .as_ref()
            .is_some_and(|d| d.causes.iter().any(|c| c.reason == "NamespaceTerminating"))
}

async fn event(recorder: &Recorder, shared: &Shared, key: &ObjKey, v: &Verdict) {
    let reference = {
        let index = lock(&shared.index);
        match key.kind {
            Kind::ModelRoute => index
                .route(&key.namespace, &key.name)
                .map(|r| r.object_ref(&())),
            Kind::ApiKey => index
                .key(&key.namespace, &key.name)
                .map(|k| k.object_ref(&())),
        }
    };
    let Some(reference) = reference else { return };
    let ev = Event {
        type_: EventType::Warning,
        reason: v.reason.to_owned(),
        note: Some(v.message.chars().take(1000).collect()),
        action: "Validate".into(),
        secondary: None,
    };
    match recorder.publish(&ev, &reference).await {
        Ok(()) => {}
        Err(kube::Error::Api(s)) if terminating(&s) => {}
        Err(e) => {
            shared.metrics.error("event");
            tracing::warn!(object = %key.id(), error = %e, "could not record an Event");
        }
    }
}

/// A random key from the kernel's CSPRNG.
fn random_key() -> std::io::Result<String> {
    let mut bytes = [0u8; 24];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(format!(
        "sk-mg-{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}

fn minted_secret(owner: &ApiKey, raw: &str, rotation: &str) -> Secret {
    let mut s = Secret::default();
    s.metadata.name = Some(minted_secret_name(&owner.name_any()));
    s.metadata.namespace = owner.namespace();
    s.metadata.labels = Some(
        [
            ("modelgate.dev/apikey".to_owned(), owner.name_any()),
            (CREDENTIAL_LABEL.to_owned(), "true".to_owned()),
        ]
        .into(),
    );
    s.metadata.annotations = Some([(ROTATION_DONE.to_owned(), rotation.to_owned())].into());
    s.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "modelgate.dev/v1alpha1".into(),
        kind: "ApiKey".into(),
        name: owner.name_any(),
        uid: owner.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }]);
    s.data = Some(
        [(
            MINTED_KEY.to_owned(),
            k8s_openapi::ByteString(raw.as_bytes().to_vec()),
        )]
        .into(),
    );
    s.type_ = Some("Opaque".into());
    s
}

async fn mint(shared: &Shared, client: &Client, keys: &[ObjKey]) {
    for key in keys {
        let Some(owner) = lock(&shared.index).key(&key.namespace, &key.name).cloned() else {
            continue;
        };
        let raw = match random_key() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot read /dev/urandom");
                return;
            }
        };
        let rotation = owner
            .annotations()
            .get(ROTATE_ANNOTATION)
            .cloned()
            .unwrap_or_default();
        let secret = minted_secret(&owner, &raw, &rotation);
        match Api::<Secret>::namespaced(client.clone(), &key.namespace)
            .create(&PostParams::default(), &secret)
            .await
        {
            Ok(_) => tracing::info!(apikey = %key.id(), "minted a key Secret"),
            Err(kube::Error::Api(s)) if s.code == 409 => {
                // Minted before Secrets needed the opt-in label (an upgrade): label ours.
                adopt_minted(shared, client, &owner, &key.namespace).await;
            }
            Err(kube::Error::Api(s)) if terminating(&s) => {}
            Err(e) => {
                shared.metrics.error("mint");
                tracing::warn!(apikey = %key.id(), error = %e, "could not mint the key Secret");
            }
        }
    }
}

/// Add the opt-in label to a minted Secret that lacks it, if the ApiKey owns it.
async fn adopt_minted(shared: &Shared, client: &Client, owner: &ApiKey, ns: &str) {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let name = minted_secret_name(&owner.name_any());
    let Ok(Some(meta)) = api.get_metadata_opt(&name).await else {
        return;
    };
    let owned = meta
        .metadata
        .owner_references
        .unwrap_or_default()
        .iter()
        .any(|o| o.kind == "ApiKey" && Some(&o.uid) == owner.uid().as_ref());
    if !owned {
        return;
    }
    let body = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "labels": {CREDENTIAL_LABEL: "true"}}});
    if let Err(e) = api
        .patch(&name, &PatchParams::apply(MANAGER), &Patch::Apply(&body))
        .await
    {
        shared.metrics.error("mint");
        tracing::warn!(error = %e, "could not label a minted key Secret");
    }
}

/// Replace minted keys whose ApiKey asks for a rotation (a new `modelgate.dev/rotate` value).
async fn rotate(shared: &Shared, client: &Client) {
    let due: Vec<(ApiKey, String)> = {
        let index = lock(&shared.index);
        index
            .keys()
            .filter(|k| k.spec.secret_ref.is_none())
            .filter_map(|k| {
                let want = k.annotations().get(ROTATE_ANNOTATION)?.clone();
                let ns = k.namespace().unwrap_or_default();
                let done =
                    index.secret_annotation(&ns, &minted_secret_name(&k.name_any()), ROTATION_DONE);
                (done.is_some() && done.as_deref() != Some(want.as_str()))
                    .then(|| (k.clone(), want))
            })
            .collect()
    };
    for (owner, rotation) in due {
        let Ok(raw) = random_key() else { return };
        let secret = minted_secret(&owner, &raw, &rotation);
        let ns = owner.namespace().unwrap_or_default();
        let patch = Patch::Apply(&secret);
        match Api::<Secret>::namespaced(client.clone(), &ns)
            .patch(
                &minted_secret_name(&owner.name_any()),
                &PatchParams::apply(MANAGER).force(),
                &patch,
            )
            .await
        {
            Ok(_) => {
                tracing::info!(apikey = %format!("{ns}/{}", owner.name_any()), "rotated a minted key")
            }
            Err(e) => {
                shared.metrics.error("rotate");
                tracing::warn!(error = %e, "could not rotate a minted key");
            }
        }
    }
}
