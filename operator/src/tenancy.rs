//! Who a proxy is and what it may receive.
//!
//! ```text
//!  Bearer token ─► Authenticator ─► Identity ─► Tenancy::scope_of ─► Scope ─► resolve(namespaces)
//!                  (TokenReview,     (namespace,   gateway ServiceAccount: the admin's selection
//!                   cached briefly)   SA name)     any other ServiceAccount: its own namespace,
//!                                                  only when the namespace opted in to sidecars
//! ```
//!
//! Proxies present a ServiceAccount token with the modelgate audience; the operator asks the
//! API server (TokenReview) who it belongs to. A shared token is only accepted when the
//! operator was started with `--proxy-auth shared-token` (standalone and development), and
//! then every proxy is a gateway proxy.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::PostParams;
use kube::{Api, Client};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::controller::lock;

/// The label a namespace carries to let sidecars in it receive its config.
pub const SIDECAR_LABEL: &str = "modelgate.dev/sidecars";

/// A proxy's proven identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Identity {
    ServiceAccount {
        namespace: String,
        name: String,
    },
    /// The development mode's shared token.
    SharedToken,
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ServiceAccount { namespace, name } => {
                write!(f, "system:serviceaccount:{namespace}:{name}")
            }
            Self::SharedToken => f.write_str("shared-token"),
        }
    }
}

/// What a proxy may receive, before resolving against the namespaces that exist now.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Scope {
    All,
    /// Namespaces whose labels match all of these pairs.
    Selector(Vec<(String, String)>),
    /// One namespace, while it carries the sidecar opt-in label.
    Sidecar(String),
}

/// A resolved scope: every namespace, or these. Sorted, so equal views compare equal.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum View {
    All,
    Only(BTreeSet<String>),
}

impl View {
    pub fn covers(&self, ns: &str) -> bool {
        match self {
            Self::All => true,
            Self::Only(set) => set.contains(ns),
        }
    }
}

/// Namespace labels, as the operator's namespace watch sees them.
pub type Namespaces = BTreeMap<String, BTreeMap<String, String>>;

fn opted_in(labels: Option<&BTreeMap<String, String>>) -> bool {
    labels
        .and_then(|l| l.get(SIDECAR_LABEL))
        .map(String::as_str)
        == Some("true")
}

impl Scope {
    pub fn resolve(&self, namespaces: &Namespaces) -> View {
        match self {
            Self::All => View::All,
            Self::Selector(pairs) => View::Only(
                namespaces
                    .iter()
                    .filter(|(_, labels)| {
                        pairs
                            .iter()
                            .all(|(k, v)| labels.get(k).is_some_and(|l| l == v))
                    })
                    .map(|(n, _)| n.clone())
                    .collect(),
            ),
            Self::Sidecar(ns) => View::Only(
                opted_in(namespaces.get(ns))
                    .then(|| ns.clone())
                    .into_iter()
                    .collect(),
            ),
        }
    }
}

/// Parse `all` or an equality selector `k=v[,k=v]`.
pub fn parse_selector(s: &str) -> Result<Scope, String> {
    let s = s.trim();
    if s.is_empty() || s == "all" {
        return Ok(Scope::All);
    }
    let mut pairs = Vec::new();
    for part in s.split(',') {
        let (k, v) = part.split_once('=').ok_or_else(|| {
            format!("{part:?} is not key=value (only equality selectors are supported)")
        })?;
        let (k, v) = (k.trim().trim_end_matches('='), v.trim());
        if k.is_empty() || k.contains('!') {
            return Err(format!("{part:?} is not key=value"));
        }
        pairs.push((k.to_owned(), v.to_owned()));
    }
    Ok(Scope::Selector(pairs))
}

/// Why a proxy is turned away.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("missing bearer token")]
    Missing,
    #[error("the token was not accepted: {0}")]
    Invalid(String),
    #[error("only ServiceAccount tokens are accepted, not {0}")]
    NotServiceAccount(String),
    #[error("namespace {0} has not opted in to modelgate sidecars (label it {SIDECAR_LABEL}=true)")]
    NotOptedIn(String),
    #[error("cannot verify the token now: {0}")]
    Unavailable(String),
}

impl Refusal {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Missing => "missing_token",
            Self::Invalid(_) => "invalid_token",
            Self::NotServiceAccount(_) => "not_service_account",
            Self::NotOptedIn(_) => "namespace_not_opted_in",
            Self::Unavailable(_) => "tokenreview_unavailable",
        }
    }
}

/// How proxies prove who they are.
pub enum Mode {
    ServiceAccount { client: Client, audience: String },
    SharedToken(String),
}

/// Verified tokens are remembered (by their SHA-256; never the token itself) for the
/// configured time (default 60 s), so acks, reports and reconnect storms do not become a
/// TokenReview storm. Refusals are remembered briefly too.
pub const DEFAULT_ACCEPTED_TTL: Duration = Duration::from_secs(60);
const REFUSED_TTL: Duration = Duration::from_secs(5);
const CACHE_MAX: usize = 10_000;

/// A review's outcome and when it was made, by the token's SHA-256.
type ReviewCache = HashMap<[u8; 32], (Result<Identity, Refusal>, Instant)>;

pub struct Authenticator {
    mode: Mode,
    accepted_ttl: Duration,
    cache: Mutex<ReviewCache>,
    /// At most this many TokenReviews in flight: strangers cannot turn the config port
    /// into a load generator against the API server.
    reviews: tokio::sync::Semaphore,
}

/// Does this look like a JWT at all (three base64url parts, of sane size)? Anything else is
/// refused without asking the API server.
fn jwt_shaped(token: &[u8]) -> bool {
    token.len() <= 16 * 1024
        && token.split(|b| *b == b'.').count() == 3
        && token.split(|b| *b == b'.').all(|part| {
            !part.is_empty()
                && part
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'='))
        })
}

impl Authenticator {
    pub fn new(mode: Mode) -> Self {
        Self::with_cache_ttl(mode, DEFAULT_ACCEPTED_TTL)
    }

    pub fn with_cache_ttl(mode: Mode, accepted_ttl: Duration) -> Self {
        Self {
            mode,
            accepted_ttl,
            cache: Mutex::default(),
            reviews: tokio::sync::Semaphore::new(16),
        }
    }

    pub fn shared_token_mode(&self) -> bool {
        matches!(self.mode, Mode::SharedToken(_))
    }

    /// The identity behind an `Authorization` header value.
    pub async fn authenticate(&self, header: Option<&[u8]>) -> Result<Identity, Refusal> {
        let token = header
            .and_then(|h| h.strip_prefix(b"Bearer "))
            .map(|t| t.trim_ascii())
            .filter(|t| !t.is_empty())
            .ok_or(Refusal::Missing)?;
        match &self.mode {
            Mode::SharedToken(want) => {
                if modelgate_wire::same_token(token, want.as_bytes()) {
                    Ok(Identity::SharedToken)
                } else {
                    Err(Refusal::Invalid("wrong shared token".into()))
                }
            }
            Mode::ServiceAccount { client, audience } => {
                let digest: [u8; 32] = Sha256::digest(token).into();
                if let Some((r, at)) = lock(&self.cache).get(&digest) {
                    let ttl = if r.is_ok() {
                        self.accepted_ttl
                    } else {
                        REFUSED_TTL
                    };
                    if at.elapsed() < ttl {
                        return r.clone();
                    }
                }
                if !jwt_shaped(token) {
                    return Err(Refusal::Invalid("not a ServiceAccount token".into()));
                }
                let token = String::from_utf8(token.to_vec())
                    .map_err(|_| Refusal::Invalid("the token is not text".into()))?;
                let r = {
                    let _slot = self.reviews.acquire().await.map_err(|_| {
                        Refusal::Unavailable("the authenticator is shutting down".into())
                    })?;
                    review(client, audience, token).await
                };
                if !matches!(r, Err(Refusal::Unavailable(_))) {
                    let mut cache = lock(&self.cache);
                    if cache.len() >= CACHE_MAX {
                        let ttl = self.accepted_ttl;
                        cache.retain(|_, (r, at)| {
                            at.elapsed() < if r.is_ok() { ttl } else { REFUSED_TTL }
                        });
                        if cache.len() >= CACHE_MAX {
                            cache.clear();
                        }
                    }
                    cache.insert(digest, (r.clone(), Instant::now()));
                }
                r
            }
        }
    }
}

async fn review(client: &Client, audience: &str, token: String) -> Result<Identity, Refusal> {
    let tr = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token),
            audiences: Some(vec![audience.to_owned()]),
        },
        ..Default::default()
    };
    let answer = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &tr)
        .await
        .map_err(|e| Refusal::Unavailable(e.to_string()))?;
    let status = answer.status.unwrap_or_default();
    if status.authenticated != Some(true) {
        return Err(Refusal::Invalid(
            status
                .error
                .unwrap_or_else(|| "not authenticated".into())
                .chars()
                .take(200)
                .collect(),
        ));
    }
    if let Some(auds) = &status.audiences
        && !auds.iter().any(|a| a == audience)
    {
        return Err(Refusal::Invalid(format!(
            "the token is not for audience {audience}"
        )));
    }
    let user = status.user.and_then(|u| u.username).unwrap_or_default();
    parse_service_account(&user).ok_or(Refusal::NotServiceAccount(user))
}

fn parse_service_account(user: &str) -> Option<Identity> {
    let rest = user.strip_prefix("system:serviceaccount:")?;
    let (namespace, name) = rest.split_once(':')?;
    (!namespace.is_empty() && !name.is_empty() && !name.contains(':')).then(|| {
        Identity::ServiceAccount {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    })
}

/// The admin's tenancy settings.
#[derive(Debug, Clone)]
pub struct Tenancy {
    /// ServiceAccounts (namespace, name) of the central gateway proxies.
    pub gateway_accounts: BTreeSet<(String, String)>,
    /// What gateway proxies serve.
    pub gateway_scope: Scope,
}

impl Tenancy {
    /// What an identity may receive; sidecars only from namespaces that opted in.
    pub fn scope_of(&self, id: &Identity, namespaces: &Namespaces) -> Result<Scope, Refusal> {
        match id {
            Identity::SharedToken => Ok(Scope::All),
            Identity::ServiceAccount { namespace, name } => {
                if self
                    .gateway_accounts
                    .contains(&(namespace.clone(), name.clone()))
                {
                    Ok(self.gateway_scope.clone())
                } else if opted_in(namespaces.get(namespace)) {
                    Ok(Scope::Sidecar(namespace.clone()))
                } else {
                    Err(Refusal::NotOptedIn(namespace.clone()))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn namespaces() -> Namespaces {
        [
            (
                "a".to_owned(),
                [(SIDECAR_LABEL.to_owned(), "true".to_owned())].into(),
            ),
            ("b".to_owned(), [("team".to_owned(), "x".to_owned())].into()),
            ("c".to_owned(), BTreeMap::new()),
        ]
        .into()
    }

    #[test]
    fn gateway_and_sidecar_scopes() {
        let t = Tenancy {
            gateway_accounts: [("mg".to_owned(), "proxy".to_owned())].into(),
            gateway_scope: parse_selector("team=x").unwrap(),
        };
        let ns = namespaces();
        let sa = |n: &str, s: &str| Identity::ServiceAccount {
            namespace: n.into(),
            name: s.into(),
        };
        let gw = t.scope_of(&sa("mg", "proxy"), &ns).unwrap();
        assert_eq!(gw.resolve(&ns), View::Only(["b".to_owned()].into()));
        let side = t.scope_of(&sa("a", "app"), &ns).unwrap();
        assert_eq!(side.resolve(&ns), View::Only(["a".to_owned()].into()));
        assert_eq!(
            t.scope_of(&sa("c", "app"), &ns),
            Err(Refusal::NotOptedIn("c".into()))
        );
        // Opting out later empties what the sidecar receives.
        let mut later = ns.clone();
        later.insert("a".into(), BTreeMap::new());
        assert_eq!(side.resolve(&later), View::Only(BTreeSet::new()));
        assert_eq!(Scope::All.resolve(&ns), View::All);
        assert_eq!(t.scope_of(&Identity::SharedToken, &ns), Ok(Scope::All));
    }

    #[test]
    fn parses_identities_and_selectors() {
        assert_eq!(
            parse_service_account("system:serviceaccount:ns:proxy"),
            Some(Identity::ServiceAccount {
                namespace: "ns".into(),
                name: "proxy".into()
            })
        );
        assert_eq!(parse_service_account("admin"), None);
        assert_eq!(parse_service_account("system:serviceaccount:ns"), None);
        assert_eq!(parse_selector("all"), Ok(Scope::All));
        assert_eq!(
            parse_selector("a=b, c=d"),
            Ok(Scope::Selector(vec![
                ("a".into(), "b".into()),
                ("c".into(), "d".into())
            ]))
        );
        assert!(parse_selector("a!=b").is_err());
        assert!(parse_selector("nolabel").is_err());
    }

    #[test]
    fn only_jwt_shaped_tokens_reach_the_api_server() {
        assert!(jwt_shaped(
            b"eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
        ));
        assert!(!jwt_shaped(b"not-a-token-at-all-0123456789"));
        assert!(!jwt_shaped(b"a.b"));
        assert!(!jwt_shaped(b"a..c"));
        assert!(!jwt_shaped(b"a.b.c d"));
        assert!(!jwt_shaped(&vec![b'a'; 20_000]));
    }

    #[tokio::test]
    async fn shared_token_mode_compares_the_token() {
        let a = Authenticator::new(Mode::SharedToken("0123456789abcdef".into()));
        assert_eq!(
            a.authenticate(Some(b"Bearer 0123456789abcdef")).await,
            Ok(Identity::SharedToken)
        );
        assert!(
            a.authenticate(Some(b"Bearer 0123456789abcdeX"))
                .await
                .is_err()
        );
        assert_eq!(a.authenticate(None).await, Err(Refusal::Missing));
    }
}
