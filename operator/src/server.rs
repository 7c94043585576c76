//! The config server proxies talk to, and the admin port.
//!
//! ```text
//!  proxy ── GET  /v1/stream?proxy=ID ──► newline-delimited JSON: the full snapshot at
//!                                        connect and after every change, heartbeats between
//!        ── POST /v1/ack  {proxy, version, error} ──► Programmed status
//!        ── POST /v1/usage {proxy, keys:{id:{tokens,costUsd,lastUsed}}} ──► budgets
//! ```
//!
//! Every request carries `Authorization: Bearer <token>` (a Secret shared with the proxies),
//! compared in constant time: the stream carries upstream credentials, so it is never open.
//! Any replica serves streams; usage reports reaching a non-leader are forwarded to the
//! leader, which alone writes status.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::controller::{RemoteProxy, Shared, lock};
use crate::usage::Report;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A response body fed from a channel (the stream) or held whole.
pub enum OutBody {
    Full(Option<Bytes>),
    Channel(mpsc::Receiver<Bytes>),
}

impl Body for OutBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Self::Channel(rx) => rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Self::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Self::Full(None) => SizeHint::with_exact(0),
            Self::Channel(_) => SizeHint::default(),
        }
    }
}

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<OutBody> {
    let mut r = Response::new(OutBody::Full(Some(body.into())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn error(status: StatusCode, msg: &str) -> Response<OutBody> {
    reply(
        status,
        "application/json",
        serde_json::json!({"error": {"message": msg}}).to_string(),
    )
}

fn authorized(shared: &Shared, req: &Request<Incoming>) -> bool {
    let Some(v) = req.headers().get(header::AUTHORIZATION) else {
        return false;
    };
    let Some(presented) = v.as_bytes().strip_prefix(b"Bearer ") else {
        return false;
    };
    let want = shared.token.as_bytes();
    // Constant time for equal lengths; the length of a random token is no secret.
    presented.len() == want.len()
        && presented
            .iter()
            .zip(want)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// Serve the config API until the process ends.
pub async fn serve_config(listener: TcpListener, shared: Arc<Shared>, heartbeat: Duration) {
    serve(listener, move |req| {
        let shared = shared.clone();
        async move { config_api(shared, req, heartbeat).await }
    })
    .await
}

/// Serve /healthz, /readyz and /metrics.
pub async fn serve_admin(listener: TcpListener, shared: Arc<Shared>) {
    serve(listener, move |req: Request<Incoming>| {
        let shared = shared.clone();
        async move {
            match req.uri().path() {
                "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n"),
                "/readyz" if shared.is_synced() => reply(StatusCode::OK, "text/plain", "ready\n"),
                "/readyz" => reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "initial lists not complete\n",
                ),
                "/metrics" => reply(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    shared.metrics.encode(),
                ),
                _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
            }
        }
    })
    .await
}

async fn serve<F, Fut>(listener: TcpListener, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<OutBody>> + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let service = service_fn(move |req| {
            let handler = handler.clone();
            async move { Ok::<_, Infallible>(handler(req).await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        tokio::spawn(conn);
    }
}

fn query_param<'a>(req: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    req.uri()
        .query()?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn valid_proxy_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 253
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':'))
}

async fn read_json<T: for<'de> Deserialize<'de>>(
    req: Request<Incoming>,
) -> Result<T, Response<OutBody>> {
    let body = Limited::new(req.into_body(), 4 * 1024 * 1024)
        .collect()
        .await
        .map_err(|e| error(StatusCode::BAD_REQUEST, &format!("cannot read body: {e}")))?
        .to_bytes();
    serde_json::from_slice(&body)
        .map_err(|e| error(StatusCode::BAD_REQUEST, &format!("invalid JSON: {e}")))
}

/// A non-leader replica's proxies, sent to the leader.
#[derive(Deserialize, serde::Serialize)]
struct ReplicaReport {
    replica: String,
    proxies: Vec<RemoteProxy>,
}

#[derive(Deserialize)]
struct Ack {
    proxy: String,
    version: String,
    #[serde(default)]
    error: Option<String>,
}

async fn config_api(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    heartbeat: Duration,
) -> Response<OutBody> {
    if !authorized(&shared, &req) {
        shared.metrics.error("unauthorized_proxy");
        return error(StatusCode::UNAUTHORIZED, "missing or wrong proxy token");
    }
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/v1/stream") => {
            let Some(id) = query_param(&req, "proxy").filter(|id| valid_proxy_id(id)) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "query parameter proxy=<id> is required",
                );
            };
            stream(shared, id.to_owned(), heartbeat)
        }
        (&Method::POST, "/v1/ack") => {
            let ack: Ack = match read_json(req).await {
                Ok(a) => a,
                Err(r) => return r,
            };
            record_ack(&shared, ack);
            reply(StatusCode::NO_CONTENT, "text/plain", "")
        }
        (&Method::POST, "/v1/replicas") => {
            let report: ReplicaReport = match read_json(req).await {
                Ok(r) => r,
                Err(r) => return r,
            };
            if !shared.leader.load(Ordering::Relaxed) {
                return error(StatusCode::CONFLICT, "not the leader");
            }
            let total = shared.record_remote(&report.replica, report.proxies);
            reply(
                StatusCode::OK,
                "application/json",
                serde_json::json!({"totalProxies": total}).to_string(),
            )
        }
        (&Method::POST, "/v1/usage") => {
            let report: Report = match read_json(req).await {
                Ok(r) => r,
                Err(r) => return r,
            };
            usage(&shared, report).await
        }
        _ => error(StatusCode::NOT_FOUND, "unknown path"),
    }
}

fn record_ack(shared: &Shared, ack: Ack) {
    match &ack.error {
        None => {
            if let Some(at) = shared.publish_time(&ack.version) {
                shared
                    .metrics
                    .push_to_ack_seconds
                    .observe(at.elapsed().as_secs_f64());
            }
            tracing::debug!(proxy = %ack.proxy, version = %ack.version, "proxy applied snapshot");
        }
        Some(e) => {
            shared.metrics.error("proxy_rejected_snapshot");
            tracing::warn!(proxy = %ack.proxy, version = %ack.version, error = %e, "proxy rejected snapshot");
        }
    }
    {
        let mut proxies = lock(&shared.proxies);
        let p = proxies.entry(ack.proxy).or_default();
        if ack.error.is_none() {
            p.acked = Some(ack.version);
        }
        p.error = ack.error;
    }
    shared.status_wake.notify_one();
    shared.proxies_changed.notify_one();
}

async fn usage(shared: &Arc<Shared>, report: Report) -> Response<OutBody> {
    if shared.leader.load(Ordering::Relaxed) {
        let applied = {
            let index = lock(&shared.index);
            let key_of = |id: &str| {
                let (ns, name) = id.split_once('/')?;
                index.key(ns, name)
            };
            lock(&shared.book).add(&report, key_of)
        };
        if applied > 0 {
            shared.status_wake.notify_one();
        }
        return reply(StatusCode::NO_CONTENT, "text/plain", "");
    }
    // Not the leader: hand the report to the one that is.
    let Some(url) = lock(&shared.leader_url).clone() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no leader known yet; retry",
        );
    };
    match forward(&url, &shared.token, &report).await {
        Ok(()) => reply(StatusCode::NO_CONTENT, "text/plain", ""),
        Err(e) => {
            shared.metrics.error("usage_forward");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("forwarding to the leader failed: {e}"),
            )
        }
    }
}

async fn forward(url: &str, token: &str, report: &Report) -> anyhow::Result<()> {
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let req = Request::post(format!("{}/v1/usage", url.trim_end_matches('/')))
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(report)?)))?;
    let resp = tokio::time::timeout(Duration::from_secs(5), client.request(req)).await??;
    anyhow::ensure!(
        resp.status().is_success(),
        "leader answered {}",
        resp.status()
    );
    Ok(())
}

/// Marks a proxy connected while its stream lives.
struct Connected {
    shared: Arc<Shared>,
    id: String,
}

impl Drop for Connected {
    fn drop(&mut self) {
        let remaining = {
            let mut proxies = lock(&self.shared.proxies);
            let left = proxies.get_mut(&self.id).map(|p| {
                p.streams = p.streams.saturating_sub(1);
                p.streams
            });
            if left == Some(0) {
                proxies.remove(&self.id);
            }
            proxies.values().filter(|p| p.streams > 0).count()
        };
        self.shared.metrics.connected_proxies.set(remaining as i64);
        tracing::info!(proxy = %self.id, "proxy disconnected");
        // Fewer proxies: per-proxy shares of key limits grow, and Programmed may change.
        self.shared.changed.notify_one();
        self.shared.status_wake.notify_one();
        self.shared.proxies_changed.notify_one();
    }
}

fn stream(shared: Arc<Shared>, id: String, heartbeat: Duration) -> Response<OutBody> {
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let connected = {
        let mut proxies = lock(&shared.proxies);
        let p = proxies.entry(id.clone()).or_default();
        p.streams += 1;
        p.connected_at = Some(std::time::Instant::now());
        let n = proxies.values().filter(|p| p.streams > 0).count();
        shared.metrics.connected_proxies.set(n as i64);
        Connected {
            shared: shared.clone(),
            id: id.clone(),
        }
    };
    tracing::info!(proxy = %id, "proxy connected");
    shared.changed.notify_one();
    shared.proxies_changed.notify_one();
    let mut updates = shared.published.subscribe();
    tokio::spawn(async move {
        let _connected = connected;
        let beat = Bytes::from_static(b"{\"type\":\"heartbeat\"}\n");
        let mut ticker = tokio::time::interval(heartbeat);
        ticker.tick().await;
        // The current snapshot at connect (if any yet), then every change.
        let first = updates.borrow_and_update().clone();
        if let Some(p) = first
            && tx.send(p.line.clone()).await.is_err()
        {
            return;
        }
        loop {
            tokio::select! {
                changed = updates.changed() => {
                    if changed.is_err() { return; }
                    let next = updates.borrow_and_update().clone();
                    if let Some(p) = next && tx.send(p.line.clone()).await.is_err() {
                        return;
                    }
                }
                _ = ticker.tick() => {
                    if tx.send(beat.clone()).await.is_err() { return; }
                }
                _ = tx.closed() => return,
            }
        }
    });
    let mut r = Response::new(OutBody::Channel(rx));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// While not leading, tell the leader about our proxies (on every change and every 2 s),
/// and learn the fleet size from its answer.
pub async fn sync_to_leader(shared: Arc<Shared>) {
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    loop {
        tokio::select! {
            _ = shared.proxies_changed.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
        if shared.leader.load(Ordering::Relaxed) {
            continue;
        }
        let Some(url) = lock(&shared.leader_url).clone() else {
            continue;
        };
        let report = ReplicaReport {
            replica: shared.identity.clone(),
            proxies: shared.local_proxies(),
        };
        let Ok(body) = serde_json::to_vec(&report) else {
            continue;
        };
        let Ok(req) = Request::post(format!("{}/v1/replicas", url.trim_end_matches('/')))
            .header(header::AUTHORIZATION, format!("Bearer {}", shared.token))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
        else {
            continue;
        };
        let answer = async {
            let resp = client.request(req).await.ok()?;
            if !resp.status().is_success() {
                return None;
            }
            let body = resp.into_body().collect().await.ok()?.to_bytes();
            serde_json::from_slice::<serde_json::Value>(&body).ok()?["totalProxies"].as_u64()
        };
        match tokio::time::timeout(Duration::from_secs(5), answer).await {
            Ok(Some(total)) => shared.learn_total(total as u32),
            _ => shared.metrics.error("replica_sync"),
        }
    }
}
