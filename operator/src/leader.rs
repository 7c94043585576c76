//! Leader election on a `coordination.k8s.io/v1` Lease.
//!
//! Every replica serves proxy streams; only the Lease holder writes status, mints Secrets
//! and sums usage. The holder renews every `renew` and others take over once the Lease has
//! not been renewed for its duration. Updates go through `replace` with the object's
//! resourceVersion, so two replicas racing for an expired Lease cannot both win. The
//! holder's config URL rides in an annotation so other replicas can forward usage to it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};

use crate::controller::{Shared, lock};

pub const URL_ANNOTATION: &str = "modelgate.dev/config-url";

#[derive(Debug, Clone)]
pub struct Election {
    pub name: String,
    pub namespace: String,
    pub identity: String,
    pub url: String,
    pub duration: Duration,
    pub renew: Duration,
}

pub async fn run(shared: Arc<Shared>, client: Client, e: Election) {
    let api: Api<Lease> = Api::namespaced(client, &e.namespace);
    let mut renewed: Option<std::time::Instant> = None;
    loop {
        // A leader must renew before its Lease runs out; a renewal that hangs past that
        // point (a slow or partitioned API server) means stepping down, not leading on
        // while another replica takes over. A fifth of the duration is the safety margin
        // for clock skew between replicas.
        let budget = match (shared.leader.load(Ordering::Relaxed), renewed) {
            (true, Some(at)) => (e.duration - e.duration / 5).saturating_sub(at.elapsed()),
            _ => e.duration,
        };
        let leader = match tokio::time::timeout(budget, try_acquire(&api, &e)).await {
            Ok(Ok((leader, url))) => {
                *lock(&shared.leader_url) = url;
                if leader {
                    renewed = Some(std::time::Instant::now());
                }
                leader
            }
            Ok(Err(err)) => {
                shared.metrics.error("lease");
                tracing::warn!(error = %err, "lease update failed");
                // Without a renewal we cannot be sure we still lead.
                false
            }
            Err(_) => {
                shared.metrics.error("lease");
                tracing::warn!(
                    "lease renewal did not finish before the lease would expire; stepping down"
                );
                false
            }
        };
        let was = shared.leader.swap(leader, Ordering::Relaxed);
        if leader != was {
            tracing::info!(identity = %e.identity, leader, "leadership changed");
            shared.metrics.leader.set(i64::from(leader));
            shared.status_wake.notify_one();
        }
        tokio::time::sleep(e.renew).await;
    }
}

fn lease(
    e: &Election,
    resource_version: Option<String>,
    transitions: i32,
    acquired: Option<MicroTime>,
) -> Lease {
    let now = MicroTime(Timestamp::now());
    let mut l = Lease::default();
    l.metadata.name = Some(e.name.clone());
    l.metadata.namespace = Some(e.namespace.clone());
    l.metadata.resource_version = resource_version;
    l.metadata.annotations = Some([(URL_ANNOTATION.to_owned(), e.url.clone())].into());
    l.spec = Some(LeaseSpec {
        holder_identity: Some(e.identity.clone()),
        lease_duration_seconds: Some(e.duration.as_secs() as i32),
        acquire_time: Some(acquired.unwrap_or_else(|| now.clone())),
        renew_time: Some(now),
        lease_transitions: Some(transitions),
        ..Default::default()
    });
    l
}

/// One round: returns whether we hold the Lease, and the holder's URL.
async fn try_acquire(
    api: &Api<Lease>,
    e: &Election,
) -> Result<(bool, Option<String>), kube::Error> {
    let current = match api.get_opt(&e.name).await? {
        None => {
            return match api
                .create(&PostParams::default(), &lease(e, None, 0, None))
                .await
            {
                Ok(_) => Ok((true, Some(e.url.clone()))),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok((false, None)),
                Err(err) => Err(err),
            };
        }
        Some(l) => l,
    };
    let spec = current.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let holder_url = current
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(URL_ANNOTATION).cloned());
    let duration = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(15).max(1) as u64);
    let renewed = spec.renew_time.as_ref().map(|t| t.0);
    let expired = renewed.is_none_or(|t| {
        let age = Timestamp::now().duration_since(t);
        age.as_secs() as u64 >= duration.as_secs()
    });
    let ours = holder == e.identity;
    if !ours && !expired && !holder.is_empty() {
        return Ok((false, holder_url));
    }
    let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!ours);
    let acquired = if ours {
        spec.acquire_time.clone()
    } else {
        None
    };
    let next = lease(
        e,
        current.metadata.resource_version.clone(),
        transitions,
        acquired,
    );
    match api.replace(&e.name, &PostParams::default(), &next).await {
        Ok(_) => Ok((true, Some(e.url.clone()))),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok((false, holder_url)),
        Err(err) => Err(err),
    }
}

/// On shutdown: hand the Lease back (no holder, expired), so another replica leads at once
/// instead of after a full lease duration.
pub async fn release(client: Client, e: &Election) {
    let api: Api<Lease> = Api::namespaced(client, &e.namespace);
    let Ok(Some(current)) = api.get_opt(&e.name).await else {
        return;
    };
    let spec = current.spec.clone().unwrap_or_default();
    if spec.holder_identity.as_deref() != Some(e.identity.as_str()) {
        return;
    }
    let mut released = current.clone();
    released.spec = Some(LeaseSpec {
        holder_identity: None,
        lease_duration_seconds: Some(1),
        renew_time: Some(MicroTime(
            Timestamp::now()
                .checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(3600))
                .unwrap_or_else(|_| Timestamp::now()),
        )),
        ..spec
    });
    match api
        .replace(&e.name, &PostParams::default(), &released)
        .await
    {
        Ok(_) => tracing::info!(identity = %e.identity, "released the leader Lease"),
        Err(err) => tracing::warn!(error = %err, "could not release the leader Lease"),
    }
}
