//! TLS for the config port, from a CA the operator manages itself.
//!
//! ```text
//!  Secret <ca-secret> (operator namespace)          ConfigMap <ca-configmap> (operator namespace
//!    ca.crt/ca.key     active signer                  and every namespace that opted in to
//!    next.crt/next.key during a rotation             sidecars): ca.crt = the trust bundle
//!    previous.crt      retired, still trusted            │
//!        │                                               ▼ mounted into proxy pods
//!        ▼ every replica                             proxy verifies the operator's certificate
//!    serving certificate (in memory only) ──TLS──►
//!    replica client certificate (in memory) ──mTLS──► another replica (/v1/replicas, usage)
//! ```
//!
//! The CA key never leaves the Secret and the operator's memory; leaf keys never leave the
//! process. Only holders of the CA key can mint a client certificate, so a client certificate
//! that chains to the CA proves an operator replica. Rotation is two-phase so no proxy ever
//! meets a certificate it cannot verify: annotating the Secret with
//! `modelgate.dev/rotate-ca=<new value>` adds a new CA to the bundle at once and makes it the
//! signer only after the rotation delay (time for kubelets to refresh mounted ConfigMaps).
//! Established streams are never cut: a rotation changes what new handshakes see.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::controller::{Shared, lock};

const CA_CERT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
const NEXT_CERT: &str = "next.crt";
const NEXT_KEY: &str = "next.key";
const PREVIOUS_CERT: &str = "previous.crt";
/// Set to a new value to rotate the CA.
pub const ROTATE_ANNOTATION: &str = "modelgate.dev/rotate-ca";
const ROTATED_FOR: &str = "modelgate.dev/ca-rotated-for";
const ACTIVATE_AT: &str = "modelgate.dev/ca-next-activate-at";
const MANAGER: &str = "modelgate-operator";
/// The subject of the replicas' client certificates.
const REPLICA_CN: &str = "modelgate-operator-replica";
/// Leaf certificates live this long and are renewed at half their life.
const LEAF_LIFETIME: Duration = Duration::from_secs(48 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration failed: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("the CA Secret is unusable: {0}")]
    BadSecret(String),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

/// The CA material as the Secret holds it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CaSecret {
    pub cert: String,
    key: String,
    next: Option<(String, String)>,
    previous: Option<String>,
    activate_at: Option<u64>,
    rotate_wanted: Option<String>,
    rotated_for: Option<String>,
    resource_version: Option<String>,
}

impl CaSecret {
    fn from_secret(s: &Secret) -> Result<Self, TlsError> {
        let data = s.data.clone().unwrap_or_default();
        let text = |k: &str| {
            data.get(k)
                .map(|v| String::from_utf8_lossy(&v.0).into_owned())
        };
        let ann = s.metadata.annotations.clone().unwrap_or_default();
        let (Some(cert), Some(key)) = (text(CA_CERT), text(CA_KEY)) else {
            return Err(TlsError::BadSecret(format!(
                "it needs the data keys {CA_CERT} and {CA_KEY}"
            )));
        };
        Ok(Self {
            cert,
            key,
            next: text(NEXT_CERT).zip(text(NEXT_KEY)),
            previous: text(PREVIOUS_CERT),
            activate_at: ann.get(ACTIVATE_AT).and_then(|v| v.parse().ok()),
            rotate_wanted: ann.get(ROTATE_ANNOTATION).cloned(),
            rotated_for: ann.get(ROTATED_FOR).cloned(),
            resource_version: s.metadata.resource_version.clone(),
        })
    }

    fn to_secret(&self, namespace: &str, name: &str) -> Secret {
        let mut data = BTreeMap::new();
        let mut put = |k: &str, v: &str| {
            data.insert(k.to_owned(), ByteString(v.as_bytes().to_vec()));
        };
        put(CA_CERT, &self.cert);
        put(CA_KEY, &self.key);
        if let Some((c, k)) = &self.next {
            put(NEXT_CERT, c);
            put(NEXT_KEY, k);
        }
        if let Some(p) = &self.previous {
            put(PREVIOUS_CERT, p);
        }
        let mut ann = BTreeMap::new();
        if let Some(t) = self.activate_at {
            ann.insert(ACTIVATE_AT.to_owned(), t.to_string());
        }
        if let Some(w) = &self.rotate_wanted {
            ann.insert(ROTATE_ANNOTATION.to_owned(), w.clone());
        }
        if let Some(r) = &self.rotated_for {
            ann.insert(ROTATED_FOR.to_owned(), r.clone());
        }
        let mut s = Secret::default();
        s.metadata.name = Some(name.to_owned());
        s.metadata.namespace = Some(namespace.to_owned());
        s.metadata.resource_version = self.resource_version.clone();
        s.metadata.annotations = Some(ann);
        s.metadata.labels = Some(
            [(
                "app.kubernetes.io/part-of".to_owned(),
                "modelgate".to_owned(),
            )]
            .into(),
        );
        s.type_ = Some("Opaque".into());
        s.data = Some(data);
        s
    }

    /// Every CA a proxy should trust now: the signer, the one about to sign, the retired one.
    pub fn bundle(&self) -> String {
        let mut out = self.cert.trim_end().to_owned();
        out.push('\n');
        for extra in [self.next.as_ref().map(|n| &n.0), self.previous.as_ref()]
            .into_iter()
            .flatten()
        {
            out.push_str(extra.trim_end());
            out.push('\n');
        }
        out
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A new self-signed CA: (certificate PEM, key PEM).
pub fn new_ca() -> Result<(String, String), TlsError> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(
        DnType::CommonName,
        format!("modelgate config CA {}", unix_now()),
    );
    p.distinguished_name
        .push(DnType::OrganizationName, "modelgate");
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(3650);
    let cert = p.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A leaf certificate signed by the CA: the chain and its private key.
fn issue(
    ca_cert: &str,
    ca_key: &str,
    sans: &[String],
    client: bool,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let ca_key = KeyPair::from_pem(ca_key)?;
    let issuer = Issuer::from_ca_cert_pem(ca_cert, ca_key)?;
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(if client { vec![] } else { sans.to_vec() })?;
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(
        DnType::CommonName,
        if client {
            REPLICA_CN
        } else {
            "modelgate-operator"
        },
    );
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![if client {
        ExtendedKeyUsagePurpose::ClientAuth
    } else {
        ExtendedKeyUsagePurpose::ServerAuth
    }];
    p.use_authority_key_identifier_extension = true;
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::seconds(LEAF_LIFETIME.as_secs() as i64);
    let cert = p.signed_by(&key, &issuer)?;
    let key_der = PrivateKeyDer::try_from(key.serialize_der())
        .map_err(|e| TlsError::BadSecret(e.to_owned()))?;
    let ca_der = CertificateDer::from_pem_slice(ca_cert.as_bytes())
        .map_err(|e| TlsError::BadSecret(format!("{CA_CERT} is not a PEM certificate: {e}")))?;
    Ok((vec![cert.der().clone(), ca_der], key_der))
}

/// Parse a PEM bundle into a root store.
pub fn roots(bundle: &str) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(bundle.as_bytes()) {
        let c =
            c.map_err(|e| TlsError::BadSecret(format!("bad certificate in the bundle: {e}")))?;
        roots.add(c)?;
    }
    if roots.is_empty() {
        return Err(TlsError::BadSecret(
            "the CA bundle holds no certificate".into(),
        ));
    }
    Ok(roots)
}

/// An HTTPS client that presents this replica's client certificate.
pub type ReplicaClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Full<bytes::Bytes>,
>;

fn replica_client(config: rustls::ClientConfig) -> ReplicaClient {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only()
        .enable_http1()
        .build();
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(https)
}

/// The configs in force, swapped whole when the CA changes or leaves are renewed.
pub struct Tls {
    server: ArcSwap<rustls::ServerConfig>,
    /// The client for calls to other replicas (its client certificate), kept across calls
    /// so connections are reused until the certificates change.
    client: ArcSwap<ReplicaClient>,
    bundle: ArcSwap<String>,
    /// The CA content the configs were built from, and when.
    built: std::sync::Mutex<(CaSecret, std::time::Instant)>,
    sans: Vec<String>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("sans", &self.sans).finish()
    }
}

fn configs(
    ca: &CaSecret,
    sans: &[String],
) -> Result<(rustls::ServerConfig, rustls::ClientConfig), TlsError> {
    let bundle = ca.bundle();
    let roots = Arc::new(roots(&bundle)?);
    let (chain, key) = issue(&ca.cert, &ca.key, sans, false)?;
    let verifier = rustls::server::WebPkiClientVerifier::builder(roots.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::BadSecret(format!("client verifier: {e}")))?;
    let mut server = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let (cchain, ckey) = issue(&ca.cert, &ca.key, &[], true)?;
    let client = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(cchain, ckey)?;
    Ok((server, client))
}

impl Tls {
    pub fn new(ca: CaSecret, sans: Vec<String>) -> Result<Self, TlsError> {
        let (server, client) = configs(&ca, &sans)?;
        Ok(Self {
            server: ArcSwap::from_pointee(server),
            client: ArcSwap::from_pointee(replica_client(client)),
            bundle: ArcSwap::from_pointee(ca.bundle()),
            built: std::sync::Mutex::new((ca, std::time::Instant::now())),
            sans,
        })
    }

    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.server.load_full()
    }

    pub fn replica_client(&self) -> Arc<ReplicaClient> {
        self.client.load_full()
    }

    pub fn bundle(&self) -> Arc<String> {
        self.bundle.load_full()
    }

    /// Rebuild when the CA material changed or the leaves reached half their life.
    fn refresh(&self, ca: &CaSecret) -> Result<bool, TlsError> {
        let mut built = lock(&self.built);
        let same =
            built.0.cert == ca.cert && built.0.key == ca.key && built.0.bundle() == ca.bundle();
        if same && built.1.elapsed() < LEAF_LIFETIME / 2 {
            return Ok(false);
        }
        let (server, client) = configs(ca, &self.sans)?;
        self.server.store(Arc::new(server));
        self.client.store(Arc::new(replica_client(client)));
        self.bundle.store(Arc::new(ca.bundle()));
        *built = (ca.clone(), std::time::Instant::now());
        Ok(true)
    }
}

/// Where the CA lives and how it is handed out.
#[derive(Debug, Clone)]
pub struct Pki {
    pub namespace: String,
    pub secret: String,
    pub configmap: String,
    pub rotation_delay: Duration,
}

/// Read the CA Secret, creating it (with a new CA) when it does not exist yet. Replicas
/// starting together race on the create; the loser reads the winner's.
pub async fn load_or_create(client: &Client, pki: &Pki) -> Result<CaSecret, TlsError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &pki.namespace);
    for _ in 0..3 {
        if let Some(s) = api.get_opt(&pki.secret).await? {
            return CaSecret::from_secret(&s);
        }
        let (cert, key) = new_ca()?;
        let ca = CaSecret {
            cert,
            key,
            ..Default::default()
        };
        match api
            .create(
                &PostParams::default(),
                &ca.to_secret(&pki.namespace, &pki.secret),
            )
            .await
        {
            Ok(s) => {
                tracing::info!(secret = %format!("{}/{}", pki.namespace, pki.secret), "created the config CA");
                return CaSecret::from_secret(&s);
            }
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(TlsError::BadSecret(
        "the CA Secret keeps appearing and disappearing".into(),
    ))
}

/// What a leader does to the CA Secret this round (pure, for tests): start a rotation that
/// was asked for, or finish one whose delay has passed.
pub fn next_step(ca: &CaSecret, now: u64, delay: Duration) -> Result<Option<CaSecret>, TlsError> {
    if let Some((cert, key)) = &ca.next {
        if ca.activate_at.is_none_or(|t| now >= t) {
            return Ok(Some(CaSecret {
                previous: Some(ca.cert.clone()),
                cert: cert.clone(),
                key: key.clone(),
                next: None,
                activate_at: None,
                ..ca.clone()
            }));
        }
        return Ok(None);
    }
    match &ca.rotate_wanted {
        Some(w) if ca.rotated_for.as_ref() != Some(w) => {
            let next = new_ca()?;
            Ok(Some(CaSecret {
                next: Some(next),
                activate_at: Some(now + delay.as_secs()),
                rotated_for: Some(w.clone()),
                ..ca.clone()
            }))
        }
        _ => Ok(None),
    }
}

/// Keep the configs in step with the Secret; while leading, drive rotations and publish
/// the bundle ConfigMap wherever proxies need it.
pub async fn run(shared: Arc<Shared>, client: Client, tls: Arc<Tls>, pki: Pki) {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &pki.namespace);
    // Namespace -> the bundle last seen in its ConfigMap. Forgotten for namespaces that
    // leave the targets (deleted, or opted out) and, all of it, every BUNDLE_RECHECK: a
    // namespace deleted and created again between two ticks, or a ConfigMap somebody
    // deleted, gets its bundle back (one GET per namespace per recheck when nothing changed).
    let mut published: BTreeMap<String, String> = BTreeMap::new();
    let mut checked = tokio::time::Instant::now();
    let mut was_leader = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = shared.namespaces_changed.notified() => {}
        }
        let ca = match load_or_create(&client, &pki).await {
            Ok(ca) => ca,
            Err(e) => {
                shared.metrics.error("tls");
                tracing::warn!(error = %e, "cannot read the config CA; keeping the current certificates");
                continue;
            }
        };
        match tls.refresh(&ca) {
            Ok(true) => tracing::info!("config server certificates issued from the current CA"),
            Ok(false) => {}
            Err(e) => {
                shared.metrics.error("tls");
                tracing::warn!(error = %e, "cannot issue certificates; keeping the current ones");
            }
        }
        let leader = shared.leader.load(std::sync::atomic::Ordering::Relaxed);
        if leader && !was_leader {
            published.clear();
        }
        was_leader = leader;
        if !leader {
            continue;
        }
        match next_step(&ca, unix_now(), pki.rotation_delay) {
            Ok(Some(step)) => {
                let body = step.to_secret(&pki.namespace, &pki.secret);
                match secrets
                    .replace(&pki.secret, &PostParams::default(), &body)
                    .await
                {
                    Ok(_) => tracing::info!(
                        phase = if step.next.is_some() {
                            "new CA added to the bundle"
                        } else {
                            "new CA signs"
                        },
                        "config CA rotation"
                    ),
                    Err(kube::Error::Api(s)) if s.code == 409 => {}
                    Err(e) => {
                        shared.metrics.error("tls");
                        tracing::warn!(error = %e, "cannot update the CA Secret");
                    }
                }
                continue;
            }
            Ok(None) => {}
            Err(e) => {
                shared.metrics.error("tls");
                tracing::warn!(error = %e, "cannot prepare the CA rotation");
            }
        }
        let bundle = tls.bundle();
        let mut targets = shared.sidecar_namespaces();
        targets.insert(pki.namespace.clone());
        published.retain(|ns, _| targets.contains(ns));
        if checked.elapsed() >= BUNDLE_RECHECK {
            published.clear();
            checked = tokio::time::Instant::now();
        }
        for ns in targets {
            if published.get(&ns) == Some(&*bundle) {
                continue;
            }
            match ensure_bundle(&client, &ns, &pki.configmap, &bundle).await {
                Ok(()) => {
                    published.insert(ns, bundle.to_string());
                }
                Err(kube::Error::Api(s)) if crate::status::terminating(&s) => {}
                Err(e) => {
                    shared.metrics.error("ca_bundle");
                    tracing::warn!(namespace = %ns, error = %e, "cannot publish the CA bundle");
                }
            }
        }
    }
}

/// How often the leader checks that every bundle ConfigMap is still there and current.
const BUNDLE_RECHECK: Duration = Duration::from_secs(30);

/// Make `ns`'s bundle ConfigMap hold `bundle`: read it, and create or patch it only when it
/// is missing or different.
async fn ensure_bundle(
    client: &Client,
    ns: &str,
    name: &str,
    bundle: &str,
) -> Result<(), kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    match api.get_opt(name).await? {
        Some(cm)
            if cm
                .data
                .as_ref()
                .and_then(|d| d.get(CA_CERT))
                .map(String::as_str)
                == Some(bundle) =>
        {
            Ok(())
        }
        _ => publish_bundle(&api, ns, name, bundle).await,
    }
}

async fn publish_bundle(
    api: &Api<ConfigMap>,
    ns: &str,
    name: &str,
    bundle: &str,
) -> Result<(), kube::Error> {
    let mut cm = ConfigMap::default();
    cm.metadata.name = Some(name.to_owned());
    cm.metadata.namespace = Some(ns.to_owned());
    cm.metadata.labels = Some(
        [(
            "app.kubernetes.io/part-of".to_owned(),
            "modelgate".to_owned(),
        )]
        .into(),
    );
    cm.data = Some([(CA_CERT.to_owned(), bundle.to_owned())].into());
    match api.create(&PostParams::default(), &cm).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let body = serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "data": {"ca.crt": bundle}});
            api.patch(
                name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await
            .map(|_| ())
        }
        Err(e) => Err(e),
    }
}

/// Does a peer certificate chain prove an operator replica? (The chain was verified
/// against the CA bundle during the handshake; only CA-key holders can mint one.)
pub fn is_replica(peer: Option<&[CertificateDer<'_>]>) -> bool {
    peer.is_some_and(|c| !c.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca() -> CaSecret {
        let (cert, key) = new_ca().unwrap();
        CaSecret {
            cert,
            key,
            ..Default::default()
        }
    }

    #[test]
    fn leaves_verify_against_the_bundle_and_the_secret_round_trips() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mine = ca();
        let back = CaSecret::from_secret(&mine.to_secret("ns", "ca")).unwrap();
        assert_eq!(back.cert, mine.cert);
        let tls = Tls::new(back, vec!["127.0.0.1".into(), "op.ns.svc".into()]).unwrap();
        assert!(tls.bundle().contains("BEGIN CERTIFICATE"));
        let (chain, _) = issue(&mine.cert, &mine.key, &["op.ns.svc".into()], false).unwrap();
        let trusted = Arc::new(roots(&mine.bundle()).unwrap());
        let verifier = rustls::client::WebPkiServerVerifier::builder(trusted)
            .build()
            .unwrap();
        use rustls::client::danger::ServerCertVerifier;
        let name = rustls::pki_types::ServerName::try_from("op.ns.svc").unwrap();
        verifier
            .verify_server_cert(
                &chain[0],
                &chain[1..],
                &name,
                &[],
                rustls::pki_types::UnixTime::now(),
            )
            .expect("the leaf verifies");
        let other = ca();
        let foreign = Arc::new(roots(&other.bundle()).unwrap());
        let verifier = rustls::client::WebPkiServerVerifier::builder(foreign)
            .build()
            .unwrap();
        assert!(
            verifier
                .verify_server_cert(
                    &chain[0],
                    &[],
                    &name,
                    &[],
                    rustls::pki_types::UnixTime::now()
                )
                .is_err(),
            "another CA does not vouch for it"
        );
    }

    #[test]
    fn rotation_adds_the_new_ca_first_and_signs_with_it_after_the_delay() {
        let mut ca = ca();
        assert!(
            next_step(&ca, 100, Duration::from_secs(60))
                .unwrap()
                .is_none()
        );
        ca.rotate_wanted = Some("1".into());
        let phase1 = next_step(&ca, 100, Duration::from_secs(60))
            .unwrap()
            .unwrap();
        assert_eq!(phase1.cert, ca.cert, "the old CA still signs");
        assert!(phase1.bundle().contains(&phase1.next.as_ref().unwrap().0));
        assert!(
            next_step(&phase1, 159, Duration::from_secs(60))
                .unwrap()
                .is_none()
        );
        let phase2 = next_step(&phase1, 160, Duration::from_secs(60))
            .unwrap()
            .unwrap();
        assert_eq!(phase2.cert, phase1.next.as_ref().unwrap().0);
        assert_eq!(phase2.previous.as_deref(), Some(ca.cert.as_str()));
        assert!(
            phase2.bundle().contains(&ca.cert),
            "the old CA is still trusted"
        );
        assert!(
            next_step(&phase2, 1000, Duration::from_secs(60))
                .unwrap()
                .is_none(),
            "done"
        );
    }
}
