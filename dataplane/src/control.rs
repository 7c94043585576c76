//! The operator's config stream: the proxy's second config source, beside the file.
//!
//! ```text
//!  proxy ── HTTP/2 over TLS (operator verified against --operator-ca) ──► operator
//!        ── GET /v1/stream?proxy=ID (Bearer ServiceAccount token) ──►
//!        ◄── {"type":"snapshot","version",...}\n  at connect and after every change
//!        ◄── {"type":"heartbeat"}\n               between them
//!        ◄── {"type":"reconnect"}\n               now and then: reconnect, new token
//!        ── POST /v1/ack {proxy, version, error}
//!        ── POST /v1/usage {proxy, keys:{id:{tokens,costUsd,lastUsed}}}  every few seconds
//! ```
//!
//! Snapshots go through the same `Runtime::apply` as file reloads: validated, swapped
//! atomically, or rejected with the last good one kept. A stream that stays silent past
//! three heartbeats is dead; the proxy reconnects with backoff and keeps serving its last
//! snapshot meanwhile (a proxy that never had one stays not-ready).
//!
//! The token and the CA bundle are files, read again at every connect (and the token at
//! every request): projected ServiceAccount tokens and mounted ConfigMaps are rotated by
//! the kubelet in place. A proxy that cannot verify the operator's certificate does not
//! connect at all. Stream, acks and usage reports share one HTTP/2 connection, so they
//! reach the same operator replica.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde::Deserialize;

use crate::config::{SnapshotSpec, Source};
use crate::source::Runtime;

type TlsClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Where the operator is, how to recognise it, and how to prove who we are.
#[derive(Clone)]
pub struct Operator {
    /// `https://host:port`.
    pub url: String,
    /// The token file (a projected ServiceAccount token, or the shared development token).
    pub token_file: Option<PathBuf>,
    /// A token given in the environment instead (development).
    pub token_env: Option<String>,
    /// PEM bundle of the CAs that may vouch for the operator.
    pub ca_file: PathBuf,
    pub proxy_id: String,
    /// The client of the current connection, shared by the stream, acks and usage reports.
    pub connection: Arc<Mutex<Option<TlsClient>>>,
    /// A stream silent for this long is considered dead.
    pub idle_timeout: Duration,
    pub usage_interval: Duration,
}

impl std::fmt::Debug for Operator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Operator")
            .field("url", &self.url)
            .field("token_file", &self.token_file)
            .field("ca_file", &self.ca_file)
            .field("proxy_id", &self.proxy_id)
            .finish()
    }
}

#[derive(Deserialize)]
struct Message {
    #[serde(rename = "type")]
    kind: String,
    /// The snapshot's version, also outside it (for acks of a snapshot that does not parse).
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    snapshot: Option<SnapshotSpec>,
    /// `usage` messages: what the fleet spent per budgeted key (sent before a snapshot).
    #[serde(default)]
    keys: Vec<modelgate_wire::KeyUsage>,
}

/// The CAs of a PEM bundle (`what` names it in errors): at least one, every one usable.
pub(crate) fn ca_roots(
    file: &std::path::Path,
    what: &str,
) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(file)
        .map_err(|e| format!("cannot read the {what} {}: {e}", file.display()))?;
    for c in certs {
        let c = c.map_err(|e| format!("bad certificate in {}: {e}", file.display()))?;
        roots
            .add(c)
            .map_err(|e| format!("unusable CA certificate in {}: {e}", file.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{} holds no CA certificate", file.display()));
    }
    Ok(roots)
}

/// A client that trusts only the CAs in `ca_file` and speaks HTTP/2 (one connection).
fn client(ca_file: &std::path::Path) -> Result<TlsClient, String> {
    let roots = ca_roots(ca_file, "operator CA bundle")?;
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    http.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only()
        .enable_http2()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .http2_only(true)
        .timer(TokioTimer::new())
        .http2_keep_alive_interval(Duration::from_secs(10))
        .http2_keep_alive_timeout(Duration::from_secs(20))
        .build(https))
}

impl Operator {
    fn token(&self) -> Result<String, String> {
        let token = match (&self.token_file, &self.token_env) {
            (Some(f), _) => std::fs::read_to_string(f)
                .map_err(|e| format!("cannot read the token file {}: {e}", f.display()))?,
            (None, Some(t)) => t.clone(),
            (None, None) => return Err("no operator token configured".into()),
        };
        let token = token.trim().to_owned();
        if token.is_empty() {
            return Err("the operator token is empty".into());
        }
        Ok(token)
    }

    fn request(
        &self,
        method: http::Method,
        path: &str,
        body: Bytes,
    ) -> Result<Request<Full<Bytes>>, String> {
        let token = self.token()?;
        Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.url.trim_end_matches('/')))
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| e.to_string())
    }

    /// The client of the live connection (none between connections).
    fn current(&self) -> Option<TlsClient> {
        self.connection
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    async fn post(
        &self,
        client: &TlsClient,
        path: &str,
        body: serde_json::Value,
    ) -> Result<(), String> {
        let req = self.request(http::Method::POST, path, Bytes::from(body.to_string()))?;
        let resp = tokio::time::timeout(Duration::from_secs(5), client.request(req))
            .await
            .map_err(|_| "timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(format!("operator answered {}", resp.status()))
        }
    }
}

/// Follow the operator's stream forever, reconnecting with backoff.
pub async fn follow(rt: Arc<Runtime>, op: Operator) {
    let mut backoff = Duration::from_millis(100);
    loop {
        // A fresh client (CA bundle read again) for every connection attempt.
        let outcome = match client(&op.ca_file) {
            Ok(client) => {
                *op.connection.lock().unwrap_or_else(|e| e.into_inner()) = Some(client.clone());
                let r = stream_once(&rt, &op, &client).await;
                *op.connection.lock().unwrap_or_else(|e| e.into_inner()) = None;
                r
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) => {
                rt.gateway.metrics.record_operator_connect_failure();
                tracing::warn!(operator = %op.url, error = %e, retry_in_ms = backoff.as_millis() as u64, "config stream lost; serving the last good snapshot");
            }
        }
        let jitter = Duration::from_millis(fastrand::u64(0..=backoff.as_millis() as u64 / 2));
        tokio::time::sleep(backoff + jitter).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn stream_once(rt: &Arc<Runtime>, op: &Operator, client: &TlsClient) -> Result<(), String> {
    let req = op.request(
        http::Method::GET,
        &format!("/v1/stream?proxy={}", op.proxy_id),
        Bytes::new(),
    )?;
    let resp = tokio::time::timeout(op.idle_timeout, client.request(req))
        .await
        .map_err(|_| "no answer from the operator".to_owned())?
        // The TLS verdict, deep in the error chain, is the interesting part of a failed connect.
        .map_err(|e| format!("cannot connect: {}", crate::providers::describe(&e)))?;
    match resp.status() {
        StatusCode::OK => {}
        s @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => {
            let body = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let why = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
                .unwrap_or_default();
            return Err(format!("the operator refused this proxy ({s}): {why}"));
        }
        s => return Err(format!("operator answered {s}")),
    }
    tracing::info!(operator = %op.url, "config stream connected");
    let mut body = resp.into_body();
    let mut buf = BytesMut::new();
    // The states the last usage message seeded, held until the next one so that a snapshot
    // swap in between cannot drop a seeded state before a key uses it.
    let mut seeded: Vec<Arc<crate::admission::KeyState>> = Vec::new();
    loop {
        let frame = match tokio::time::timeout(op.idle_timeout, body.frame()).await {
            Err(_) => return Err("no heartbeat from the operator; reconnecting".into()),
            Ok(None) => return Err("the operator closed the stream".into()),
            Ok(Some(Err(e))) => return Err(format!("stream broke: {e}")),
            Ok(Some(Ok(f))) => f,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(end) = memchr::memchr(b'\n', &buf) {
            let line = buf.split_to(end + 1).freeze().slice(..end);
            if handle_line(rt, op, client, line, &mut seeded).await == Next::Reconnect {
                tracing::info!(
                    "the operator asked for a reconnect (a fresh token proves who we are)"
                );
                return Ok(());
            }
        }
        if buf.len() > 256 * 1024 * 1024 {
            return Err("snapshot message larger than 256 MiB".into());
        }
    }
}

/// What the stream should do after a message.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    Continue,
    Reconnect,
}

async fn handle_line(
    rt: &Arc<Runtime>,
    op: &Operator,
    client: &TlsClient,
    line: Bytes,
    seeded: &mut Vec<Arc<crate::admission::KeyState>>,
) -> Next {
    if line.is_empty() {
        return Next::Continue;
    }
    // A snapshot message can be tens of MB (100k keys: ~25 MB, ~0.4 s to parse): every
    // message is read on the apply thread, never on the threads serving requests (with one
    // worker, the only one), and so is the version of one that cannot be read. Messages are
    // rare (config changes, heartbeats): the hand-over costs nothing that matters.
    let parsed = rt
        .off_runtime(move || {
            modelgate_wire::parse_tolerant::<Message>(&line).map_err(|e| {
                let version = serde_json::from_slice::<serde_json::Value>(&line)
                    .ok()
                    .and_then(|v| v["version"].as_str().map(str::to_owned))
                    .unwrap_or_default();
                (e.to_string(), version)
            })
        })
        .await
        .unwrap_or_else(|| Err(("the message reading task failed".into(), String::new())));
    let msg: Message = match parsed {
        Ok((m, ignored)) => {
            if !ignored.is_empty() {
                // A newer operator (a rolling upgrade): what this proxy does not know is
                // left out, and said once per message so it can be noticed.
                tracing::warn!(
                    fields = %ignored.join(", "),
                    "the config stream carries fields this proxy version does not know; ignoring them (upgrade the proxy to use them)"
                );
            }
            m
        }
        Err((e, version)) => {
            rt.gateway.metrics.record_reload(None, false);
            tracing::error!(error = %e, "unreadable message on the config stream; keeping the last good snapshot");
            let _ = op
                .post(
                    client,
                    "/v1/ack",
                    serde_json::json!({"proxy": op.proxy_id, "version": version, "error": e}),
                )
                .await;
            return Next::Continue;
        }
    };
    match msg.kind.as_str() {
        "snapshot" => {}
        "usage" => {
            let registry = &rt.gateway.live.registry;
            let now = crate::admission::unix_now();
            *seeded = msg
                .keys
                .iter()
                .map(|u| {
                    let state = registry.key_state(&Arc::from(u.key.as_str()));
                    state.seed_budget(u.period, u.tokens, u.usd, now);
                    state
                })
                .collect();
            tracing::debug!(keys = seeded.len(), "fleet usage taken in");
            return Next::Continue;
        }
        "reconnect" => return Next::Reconnect,
        _ => return Next::Continue,
    }
    let Some(spec) = msg.snapshot else {
        return Next::Continue;
    };
    let version = spec.version.clone().or(msg.version).unwrap_or_default();
    let ack = match rt.apply_off_runtime(spec, Source::Operator).await {
        Ok(v) => serde_json::json!({"proxy": op.proxy_id, "version": v, "error": null}),
        Err(e) => {
            serde_json::json!({"proxy": op.proxy_id, "version": version, "error": e.to_string()})
        }
    };
    // Acks go out in the background so a slow operator never holds up the stream.
    let (op, client) = (op.clone(), client.clone());
    tokio::spawn(async move {
        if let Err(e) = op.post(&client, "/v1/ack", ack).await {
            tracing::warn!(error = %e, "could not acknowledge the snapshot");
        }
    });
    Next::Continue
}

/// Report per-key usage to the operator every `usage_interval`.
pub async fn report_usage(rt: Arc<Runtime>, op: Operator) {
    let mut tick = tokio::time::interval(op.usage_interval);
    loop {
        tick.tick().await;
        // Only over the live connection: the replica that holds our stream knows us.
        let Some(client) = op.current() else {
            continue;
        };
        // From the registry, not the snapshot: it holds the counters of every key that was
        // used, whichever snapshot the request ran on.
        let mut taken = Vec::new();
        let mut keys = HashMap::new();
        for (id, state) in rt.gateway.live.registry.key_states() {
            if let Some(u) = state.take_unreported() {
                keys.insert(
                    id.to_string(),
                    serde_json::json!({"tokens": u.tokens, "costUsd": u.usd, "lastUsed": u.last_used}),
                );
                taken.push((state, u));
            }
        }
        if keys.is_empty() {
            continue;
        }
        let body = serde_json::json!({"proxy": op.proxy_id, "keys": keys});
        if let Err(e) = op.post(&client, "/v1/usage", body).await {
            tracing::warn!(error = %e, "usage report failed; will resend");
            for (state, u) in taken {
                state.restore_unreported(u);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rolling upgrade: the operator is newer and writes fields (and a message type) this
    /// proxy does not know. The snapshot is taken, with what is unknown left out and named.
    #[test]
    fn a_newer_operators_snapshot_is_taken_without_what_this_proxy_does_not_know() {
        let line = br#"{"type":"snapshot","version":"v2","wireRevision":7,"snapshot":{
            "version":"v2","routes":[{"name":"chat","namespace":"team-a","model":"gpt-x",
            "responseCache":{"ttl":"5m"},"backends":[{"name":"primary","provider":"mock",
            "weight":1,"priority":0,"shadow":{"share":0.1}}]}],
            "keys":[{"name":"k","namespace":"team-a","sha256":"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            "masking":["email"]}]}}"#;
        let (msg, ignored): (Message, _) = modelgate_wire::parse_tolerant(line).unwrap();
        assert_eq!(
            ignored,
            [
                "wireRevision",
                "snapshot.routes.0.responseCache",
                "snapshot.routes.0.backends.0.shadow",
                "snapshot.keys.0.masking"
            ]
        );
        let spec = msg.snapshot.expect("a snapshot");
        let snap = crate::config::compile(
            spec,
            Source::Operator,
            &crate::snapshot::StateRegistry::default(),
            None,
        )
        .expect("the known part compiles");
        assert_eq!(snap.version, "v2");
        assert!(snap.routes.get("team-a", "gpt-x").is_some());
        assert!(snap.keys.authenticate(b"abc").is_some());

        // A message type from the future is read (and skipped by `handle_line`).
        let (msg, _): (Message, _) =
            modelgate_wire::parse_tolerant(br#"{"type":"drain","after":"30s"}"#).unwrap();
        assert_eq!(msg.kind, "drain");
    }

    #[test]
    fn fleet_usage_messages_are_read() {
        let line = br#"{"type":"usage","keys":[{"key":"team-a/k","period":24324,"tokens":165,"usd":0.5}]}"#;
        let (msg, ignored): (Message, _) = modelgate_wire::parse_tolerant(line).unwrap();
        assert!(ignored.is_empty());
        assert_eq!(msg.kind, "usage");
        assert_eq!(msg.keys[0].key, "team-a/k");
        assert_eq!(msg.keys[0].tokens, 165);
    }
}
