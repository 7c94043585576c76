//! Short-lived credentials a provider fetches for itself (an OAuth2 access token from a
//! service-account grant or the metadata server, AWS keys from STS), cached and refreshed
//! before they expire.
//!
//! ```text
//!  request ─► Cached::get ─► fresh? ─yes─► the value (lock-free read)
//!                              └─no──► one fetch at a time (others wait for it) ─► swap in
//! ```
//!
//! A value is refreshed once less than [`REFRESH_BEFORE`] of its life is left, so no request
//! goes out with a token about to lapse in flight. A failed fetch is the attempt's failure
//! (the route's retries and fallbacks apply); the old value is kept while it is still valid.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;

/// How long before its expiry a value is replaced.
pub const REFRESH_BEFORE: Duration = Duration::from_secs(300);

/// A value and when it stops being valid (`None`: never).
#[derive(Debug)]
pub struct Expiring<T> {
    pub value: T,
    pub expires_at: Option<SystemTime>,
}

impl<T> Expiring<T> {
    fn fresh(&self, now: SystemTime) -> bool {
        self.expires_at.is_none_or(|at| {
            at.duration_since(now)
                .is_ok_and(|left| left > REFRESH_BEFORE)
        })
    }

    fn valid(&self, now: SystemTime) -> bool {
        self.expires_at.is_none_or(|at| at > now)
    }
}

/// One cached credential of one backend.
#[derive(Debug)]
pub struct Cached<T> {
    current: ArcSwapOption<Expiring<T>>,
    /// Held while a fetch is under way, so a burst of requests makes one fetch.
    fetching: tokio::sync::Mutex<()>,
}

impl<T> Default for Cached<T> {
    fn default() -> Self {
        Self {
            current: ArcSwapOption::empty(),
            fetching: tokio::sync::Mutex::new(()),
        }
    }
}

/// Why a credential could not be fetched: its endpoint could not be reached (or answered
/// nonsense), or it answered and refused (a revoked key, a bad token): the backend's
/// credentials are wrong, as with a 401 from the backend itself.
#[derive(Debug)]
pub enum FetchError {
    Unreachable(String),
    Refused {
        status: http::StatusCode,
        /// A short name of the refusal (`invalid_grant`, `InvalidIdentityToken`): letters,
        /// digits and `_` only, safe to show a client.
        reason: String,
    },
}

impl FetchError {
    /// The attempt's failure; `what` names the credential for the log line and the message.
    pub fn into_failure(self, what: &str) -> super::Failure {
        match self {
            Self::Unreachable(e) => super::Failure::Connect(format!("{what}: {e}")),
            Self::Refused { status, reason } => {
                tracing::warn!(credential = what, %status, %reason, "the credential endpoint refused");
                super::Failure::CredentialsRefused(status, Some(reason))
            }
        }
    }
}

/// A refusal's name, kept only if it is a plain word (`invalid_grant`).
pub fn reason_word(s: &str) -> Option<String> {
    let s = s.trim();
    (!s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        .then(|| s.to_owned())
}

impl<T> Cached<T> {
    /// The cached value if fresh, else the one `fetch` brings (one fetch at a time).
    pub async fn get<F, Fut, E>(&self, fetch: F) -> Result<Arc<Expiring<T>>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Expiring<T>, E>>,
    {
        if let Some(v) = self.current.load_full()
            && v.fresh(SystemTime::now())
        {
            return Ok(v);
        }
        let _turn = self.fetching.lock().await;
        // Another request may have fetched while this one waited.
        let old = self.current.load_full();
        if let Some(v) = &old
            && v.fresh(SystemTime::now())
        {
            return Ok(v.clone());
        }
        match fetch().await {
            Ok(v) => {
                let v = Arc::new(v);
                self.current.store(Some(v.clone()));
                Ok(v)
            }
            // Still usable for a while: a refresh that failed early costs nothing yet.
            Err(_) if old.as_ref().is_some_and(|v| v.valid(SystemTime::now())) => {
                Ok(old.expect("checked"))
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn a_value_is_fetched_once_and_again_only_near_its_expiry() {
        let cache = Cached::<u32>::default();
        let fetches = AtomicU32::new(0);
        let fetch = |life: Duration| {
            let n = fetches.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                Ok::<_, String>(Expiring {
                    value: n,
                    expires_at: Some(SystemTime::now() + life),
                })
            }
        };
        let long = Duration::from_secs(3600);
        assert_eq!(cache.get(|| fetch(long)).await.unwrap().value, 1);
        assert_eq!(cache.get(|| fetch(long)).await.unwrap().value, 1);
        // Replace it with one about to expire: the next get refreshes it.
        cache.current.store(Some(Arc::new(Expiring {
            value: 9,
            expires_at: Some(SystemTime::now() + Duration::from_secs(10)),
        })));
        assert_eq!(cache.get(|| fetch(long)).await.unwrap().value, 2);
        // A failed refresh keeps a value that is still valid, and fails once none is.
        cache.current.store(Some(Arc::new(Expiring {
            value: 7,
            expires_at: Some(SystemTime::now() + Duration::from_secs(10)),
        })));
        let failing = || async { Err::<Expiring<u32>, _>("down".to_owned()) };
        assert_eq!(cache.get(failing).await.unwrap().value, 7);
        cache.current.store(Some(Arc::new(Expiring {
            value: 7,
            expires_at: Some(SystemTime::now() - Duration::from_secs(1)),
        })));
        assert_eq!(cache.get(failing).await.unwrap_err(), "down");
    }
}
