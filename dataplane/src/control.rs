//! The operator's config stream: the proxy's second config source, beside the file.
//!
//! ```text
//!  proxy ── GET /v1/stream?proxy=ID (Bearer token) ──► operator
//!        ◄── {"type":"snapshot","version",...}\n  at connect and after every change
//!        ◄── {"type":"heartbeat"}\n               between them
//!        ── POST /v1/ack {proxy, version, error}
//!        ── POST /v1/usage {proxy, keys:{id:{tokens,costUsd,lastUsed}}}  every few seconds
//! ```
//!
//! Snapshots go through the same `Runtime::apply` as file reloads: validated, swapped
//! atomically, or rejected with the last good one kept. A stream that stays silent past
//! three heartbeats is dead; the proxy reconnects with backoff and keeps serving its last
//! snapshot meanwhile (a proxy that never had one stays not-ready).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

use crate::config::{SnapshotSpec, Source};
use crate::source::Runtime;

type PlainClient = Client<HttpConnector, Full<Bytes>>;

/// Where the operator is and how to prove who we are.
#[derive(Clone)]
pub struct Operator {
    pub url: String,
    pub token: String,
    pub proxy_id: String,
    /// A stream silent for this long is considered dead.
    pub idle_timeout: Duration,
    pub usage_interval: Duration,
}

impl std::fmt::Debug for Operator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Operator")
            .field("url", &self.url)
            .field("token", &"<redacted>")
            .field("proxy_id", &self.proxy_id)
            .finish()
    }
}

#[derive(Deserialize)]
struct Message {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    snapshot: Option<SnapshotSpec>,
}

fn client() -> PlainClient {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    c.set_connect_timeout(Some(Duration::from_secs(5)));
    Client::builder(TokioExecutor::new()).build(c)
}

impl Operator {
    fn request(
        &self,
        method: http::Method,
        path: &str,
        body: Bytes,
    ) -> Result<Request<Full<Bytes>>, http::Error> {
        Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.url.trim_end_matches('/')))
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
    }

    async fn post(
        &self,
        client: &PlainClient,
        path: &str,
        body: serde_json::Value,
    ) -> Result<(), String> {
        let req = self
            .request(http::Method::POST, path, Bytes::from(body.to_string()))
            .map_err(|e| e.to_string())?;
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
    let client = client();
    let mut backoff = Duration::from_millis(100);
    loop {
        match stream_once(&rt, &op, &client).await {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) => {
                tracing::warn!(operator = %op.url, error = %e, retry_in_ms = backoff.as_millis() as u64, "config stream lost; serving the last good snapshot");
            }
        }
        let jitter = Duration::from_millis(fastrand::u64(0..=backoff.as_millis() as u64 / 2));
        tokio::time::sleep(backoff + jitter).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn stream_once(rt: &Arc<Runtime>, op: &Operator, client: &PlainClient) -> Result<(), String> {
    let req = op
        .request(
            http::Method::GET,
            &format!("/v1/stream?proxy={}", op.proxy_id),
            Bytes::new(),
        )
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(op.idle_timeout, client.request(req))
        .await
        .map_err(|_| "no answer from the operator".to_owned())?
        .map_err(|e| format!("cannot connect: {e}"))?;
    match resp.status() {
        StatusCode::OK => {}
        StatusCode::UNAUTHORIZED => return Err("the operator refused our token (401)".into()),
        s => return Err(format!("operator answered {s}")),
    }
    tracing::info!(operator = %op.url, "config stream connected");
    let mut body = resp.into_body();
    let mut buf = BytesMut::new();
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
            let line = buf.split_to(end + 1);
            handle_line(rt, op, client, &line[..end]).await;
        }
        if buf.len() > 256 * 1024 * 1024 {
            return Err("snapshot message larger than 256 MiB".into());
        }
    }
}

async fn handle_line(rt: &Arc<Runtime>, op: &Operator, client: &PlainClient, line: &[u8]) {
    if line.is_empty() {
        return;
    }
    let msg: Message = match serde_json::from_slice(line) {
        Ok(m) => m,
        Err(e) => {
            rt.gateway.metrics.record_reload(None, false);
            tracing::error!(error = %e, "unreadable message on the config stream; keeping the last good snapshot");
            let version = serde_json::from_slice::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v["version"].as_str().map(str::to_owned))
                .unwrap_or_default();
            let _ = op
                .post(client, "/v1/ack", serde_json::json!({"proxy": op.proxy_id, "version": version, "error": e.to_string()}))
                .await;
            return;
        }
    };
    if msg.kind != "snapshot" {
        return;
    }
    let Some(spec) = msg.snapshot else { return };
    let version = spec.version.clone().unwrap_or_default();
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
}

/// Report per-key usage to the operator every `usage_interval`.
pub async fn report_usage(rt: Arc<Runtime>, op: Operator) {
    let client = client();
    let mut tick = tokio::time::interval(op.usage_interval);
    loop {
        tick.tick().await;
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
