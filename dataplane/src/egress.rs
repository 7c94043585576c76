//! The proxy's half of the upstream policy (`modelgate_wire::egress`): its resolver admits
//! only addresses the policy admits, so a name that resolves to a refused address (DNS
//! rebinding, `*.nip.io`-style names) is refused at connect time.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::dns::{GaiResolver, Name};

pub use modelgate_wire::egress::{Rule, UpstreamPolicy};

/// The upstream client's resolver: `getaddrinfo`, then only addresses the policy admits
/// (all of them when there is no policy, as in standalone mode).
#[derive(Clone, Default)]
pub struct GuardedResolver {
    policy: Option<Arc<UpstreamPolicy>>,
}

impl GuardedResolver {
    pub fn new(policy: Option<Arc<UpstreamPolicy>>) -> Self {
        Self { policy }
    }
}

impl tower_service::Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addrs: Vec<SocketAddr> = GaiResolver::new().call(name).await?.collect();
            let Some(policy) = policy else {
                return Ok(addrs.into_iter());
            };
            let admitted: Vec<SocketAddr> = addrs
                .iter()
                .copied()
                .filter(|a| policy.admits(&host, a.ip()))
                .collect();
            if admitted.is_empty() && !addrs.is_empty() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!(
                        "upstream host {host:?} resolves only to addresses the upstream policy refuses"
                    ),
                ));
            }
            Ok(admitted.into_iter())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower_service::Service;

    #[tokio::test]
    async fn names_resolving_to_refused_addresses_are_refused_at_connect() {
        let strict = Arc::new(UpstreamPolicy::default());
        let mut guarded = GuardedResolver::new(Some(strict));
        let err = guarded
            .call("localhost".parse().unwrap())
            .await
            .expect_err("localhost resolves to loopback");
        assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
        let allowed = Arc::new(UpstreamPolicy::new(&["localhost".into()], &[]).unwrap());
        let addrs: Vec<_> = GuardedResolver::new(Some(allowed))
            .call("localhost".parse().unwrap())
            .await
            .unwrap()
            .collect();
        assert!(!addrs.is_empty(), "an explicit allow of the name wins");
        let open: Vec<_> = GuardedResolver::default()
            .call("localhost".parse().unwrap())
            .await
            .unwrap()
            .collect();
        assert!(
            !open.is_empty(),
            "no policy: standalone mode resolves as before"
        );
        let p = UpstreamPolicy::default();
        assert!(p.admits("api.openai.com", "162.159.140.245".parse().unwrap()));
        assert!(!p.admits("rebind.example", "169.254.169.254".parse().unwrap()));
    }
}
