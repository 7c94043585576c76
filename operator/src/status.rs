//! Status, written only by the Lease holder.
//!
//! For every ModelRoute and ApiKey: `observedGeneration`, `Accepted` (the compiler's
//! verdict) and `Programmed` (true when every connected proxy acknowledged a snapshot
//! containing this generation), plus proxy counts, and for keys the usage in the current
//! budget period. Written with server-side apply on the status subresource, and only when
//! it differs from what this replica last wrote. The leader also mints Secrets for ApiKeys
//! without `secretRef`, and records Events when an object stops being accepted.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client, Resource, ResourceExt};
use modelgate_crds::{ApiKey, Condition, ModelRoute};
use modelgate_dataplane::admission::unix_now;
use serde_json::json;

use crate::controller::{Shared, lock};
use crate::index::{Kind, MINTED_KEY, ObjKey, Verdict, minted_secret_name};
use crate::usage::period_label;

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

/// How many connected proxies run a snapshot that has `key` at `generation` or newer.
fn programmed(shared: &Shared, key: &ObjKey, generation: i64) -> (i32, i32) {
    let connected = shared.fleet();
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

/// `Accepted` and `Programmed` for an object's verdict and its proxy counts.
fn conditions(old: &[Condition], v: &Verdict, connected: i32, done: i32) -> [Condition; 2] {
    [
        condition(
            old,
            "Accepted",
            v.accepted,
            v.reason,
            &v.message,
            v.generation,
        ),
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
            "no proxy is connected to the operator".to_owned(),
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

/// The status writer loop: wakes on changes (and every few seconds), writes when leader.
pub async fn run(shared: Arc<Shared>, client: Client, reporter: Reporter) {
    let recorder = Recorder::new(client.clone(), reporter);
    let mut written: HashMap<ObjKey, serde_json::Value> = HashMap::new();
    let mut rejected: HashSet<ObjKey> = HashSet::new();
    let mut was_leader = false;
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
            // A new term: write everything again, whatever an earlier leader wrote.
            written.clear();
            was_leader = true;
        }
        let compiled = lock(&shared.compiled).clone();
        mint(&shared, &client, &compiled.to_mint).await;
        rotate(&shared, &client).await;
        for (key, v) in &compiled.verdicts {
            let body = match key.kind {
                Kind::ModelRoute => {
                    route_status(&shared, key, v, compiled.backends.get(key).copied())
                }
                Kind::ApiKey => key_status(&shared, key, v),
            };
            let Some(body) = body else { continue };
            if written.get(key) == Some(&body) {
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
                Err(kube::Error::Api(s)) if s.code == 404 => {}
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
    let [accepted, prog] = conditions(&old, v, connected, done);
    Some(json!({
        "apiVersion": "modelgate.dev/v1alpha1", "kind": "ModelRoute",
        "status": {
            "observedGeneration": v.generation,
            "conditions": [accepted, prog],
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
        let (usage, last_used) = match book.get(&key.id()) {
            Some(u) if u.period == period_label(k, now) => (
                Some(
                    json!({"period": u.period, "tokens": u.tokens, "costUsd": format!("{:.6}", u.usd)}),
                ),
                (u.last_used > 0).then(|| {
                    let t = std::time::UNIX_EPOCH + Duration::from_secs(u.last_used / 60 * 60);
                    humantime::format_rfc3339_seconds(t).to_string()
                }),
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
    let [accepted, prog] = conditions(&old, v, connected, done);
    let mut status = json!({"observedGeneration": v.generation, "conditions": [accepted, prog]});
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
    if let Err(e) = recorder.publish(&ev, &reference).await {
        shared.metrics.error("event");
        tracing::warn!(object = %key.id(), error = %e, "could not record an Event");
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
    s.metadata.labels = Some([("modelgate.dev/apikey".to_owned(), owner.name_any())].into());
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
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => {
                shared.metrics.error("mint");
                tracing::warn!(apikey = %key.id(), error = %e, "could not mint the key Secret");
            }
        }
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
