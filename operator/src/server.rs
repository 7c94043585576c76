//! The config server proxies talk to (TLS only), and the admin port (plain: health, metrics).
//!
//! ```text
//!  proxy ── GET  /v1/stream?proxy=ID ──► newline-delimited JSON: the proxy's view of the
//!                                        snapshot at connect and after every change it can
//!                                        see, heartbeats between, and a
//!                                        `reconnect` when the stream has lived long enough
//!        ── POST /v1/ack  {proxy, version, error} ──► Programmed status
//!        ── POST /v1/usage {proxy, keys:{id:{tokens,costUsd,lastUsed}}} ──► budgets
//!  replica ── POST /v1/replicas, /v1/replica/usage (client certificate) ──► leader
//! ```
//!
//! Every proxy request carries `Authorization: Bearer <ServiceAccount token>` (or the shared
//! token in development mode). The operator learns the proxy's identity from the token and
//! from it what the proxy may receive (`tenancy`); a proxy's id is scoped by its identity, so
//! acks and usage only ever count for the proxy's own stream and the keys it serves. Proxies
//! speak HTTP/2, so a proxy's stream, acks and reports share one connection and reach the
//! same replica even behind a Service. Replica-to-leader calls are authenticated by a client
//! certificate only operator replicas can mint (`tls`). Only the leader writes status; usage
//! reaching another replica is validated there and forwarded to the leader.

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

use crate::controller::{ProxyInfo, RemoteProxy, Shared, lock, proxy_key};
use crate::tenancy::{Identity, Refusal, Scope};
use crate::tls::Tls;
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

/// How streams behave.
#[derive(Debug, Clone, Copy)]
pub struct Streams {
    /// A heartbeat this often keeps idle streams visibly alive.
    pub heartbeat: Duration,
    /// A stream is asked to reconnect after about this long (±10%), so its proxy proves its
    /// identity again with a fresh token: a revoked ServiceAccount loses its stream.
    pub max_age: Duration,
    /// Open streams one identity may hold on this replica (each costs a task and a
    /// connection): a tenant's pods cannot exhaust the operator.
    pub max_per_identity: u32,
}

/// Serve the config API over TLS until the process ends. Each connection is handshaken
/// with the configuration in force (so a new certificate applies to new connections and
/// established streams keep theirs); whether the peer showed a replica certificate is
/// fixed per connection.
pub async fn serve_config(
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: Arc<Tls>,
    streams: Streams,
) {
    let heartbeat = streams.heartbeat;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(heartbeat.max(Duration::from_secs(1))))
        .keep_alive_timeout(Duration::from_secs(20));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
        let (shared, tls, builder) = (shared.clone(), tls.clone(), builder.clone());
        tokio::spawn(async move {
            let conn = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream))
                .await
            {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    shared.metrics.refused("tls_handshake");
                    tracing::debug!(error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    shared.metrics.refused("tls_handshake");
                    return;
                }
            };
            let replica = crate::tls::is_replica(conn.get_ref().1.peer_certificates());
            let service = service_fn(move |req| {
                let (shared, tls) = (shared.clone(), tls.clone());
                async move { Ok::<_, Infallible>(config_api(shared, tls, req, replica, streams).await) }
            });
            let _ = builder.serve_connection(TokioIo::new(conn), service).await;
        });
    }
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

fn refuse(shared: &Shared, r: &Refusal) -> Response<OutBody> {
    shared.metrics.refused(r.metric_label());
    let status = match r {
        Refusal::Missing | Refusal::Invalid(_) => StatusCode::UNAUTHORIZED,
        Refusal::NotServiceAccount(_) | Refusal::NotOptedIn(_) => StatusCode::FORBIDDEN,
        Refusal::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    tracing::info!(reason = r.metric_label(), detail = %r, "config API request refused");
    error(status, &r.to_string())
}

fn reject(
    shared: &Shared,
    status: StatusCode,
    reason: &'static str,
    msg: &str,
) -> Response<OutBody> {
    shared.metrics.rejected(reason);
    tracing::warn!(reason, detail = msg, "report rejected");
    error(status, msg)
}

async fn config_api(
    shared: Arc<Shared>,
    tls: Arc<Tls>,
    req: Request<Incoming>,
    replica: bool,
    streams: Streams,
) -> Response<OutBody> {
    let path = req.uri().path().to_owned();
    // Operator replicas among themselves: a client certificate from the CA, nothing else.
    if path.starts_with("/v1/replica") {
        if !replica {
            return reject(
                &shared,
                StatusCode::FORBIDDEN,
                "not_a_replica",
                "replica calls need an operator replica's client certificate",
            );
        }
        return match (req.method(), path.as_str()) {
            (&Method::POST, "/v1/replicas") => {
                let report: ReplicaReport = match read_json(req).await {
                    Ok(r) => r,
                    Err(r) => return r,
                };
                if !shared.leader.load(Ordering::Relaxed) {
                    return error(StatusCode::CONFLICT, "not the leader");
                }
                let fleet = shared.record_remote(&report.replica, report.proxies);
                reply(
                    StatusCode::OK,
                    "application/json",
                    serde_json::json!({"totalProxies": fleet.len(), "fleet": fleet}).to_string(),
                )
            }
            (&Method::POST, "/v1/replica/usage") => {
                let report: Report = match read_json(req).await {
                    Ok(r) => r,
                    Err(r) => return r,
                };
                if !shared.leader.load(Ordering::Relaxed) {
                    return error(StatusCode::CONFLICT, "not the leader");
                }
                apply_usage(&shared, &report);
                reply(StatusCode::NO_CONTENT, "text/plain", "")
            }
            _ => error(StatusCode::NOT_FOUND, "unknown path"),
        };
    }

    // Proxies: who is it, and what may it receive?
    let identity = match shared
        .auth
        .authenticate(
            req.headers()
                .get(header::AUTHORIZATION)
                .map(|v| v.as_bytes()),
        )
        .await
    {
        Ok(id) => id,
        Err(r) => return refuse(&shared, &r),
    };
    let scope = {
        let index = lock(&shared.index);
        shared.tenancy.scope_of(&identity, &index.namespaces)
    };
    let scope = match scope {
        Ok(s) => s,
        Err(r) => return refuse(&shared, &r),
    };
    match (req.method(), path.as_str()) {
        (&Method::GET, "/v1/stream") => {
            let Some(id) = query_param(&req, "proxy").filter(|id| valid_proxy_id(id)) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "query parameter proxy=<id> is required",
                );
            };
            let open = lock(&shared.proxies)
                .values()
                .filter(|p| p.identity == identity)
                .map(|p| p.streams)
                .sum::<u32>();
            if open >= streams.max_per_identity {
                shared.metrics.refused("too_many_streams");
                return error(
                    StatusCode::TOO_MANY_REQUESTS,
                    &format!(
                        "{identity} already holds {open} config streams on this replica (--max-streams-per-identity)"
                    ),
                );
            }
            stream(shared, identity, id.to_owned(), scope, streams)
        }
        (&Method::POST, "/v1/ack") => {
            let ack: Ack = match read_json(req).await {
                Ok(a) => a,
                Err(r) => return r,
            };
            record_ack(&shared, &identity, ack)
        }
        (&Method::POST, "/v1/usage") => {
            let report: Report = match read_json(req).await {
                Ok(r) => r,
                Err(r) => {
                    shared.metrics.rejected("unreadable");
                    return r;
                }
            };
            usage(&shared, &tls, &identity, &scope, report).await
        }
        _ => error(StatusCode::NOT_FOUND, "unknown path"),
    }
}

fn record_ack(shared: &Shared, identity: &Identity, ack: Ack) -> Response<OutBody> {
    let key = proxy_key(identity, &ack.proxy);
    {
        let mut proxies = lock(&shared.proxies);
        let Some(p) = proxies.get_mut(&key).filter(|p| p.streams > 0) else {
            drop(proxies);
            return reject(
                shared,
                StatusCode::CONFLICT,
                "unknown_proxy",
                "no config stream of this proxy is open on this replica",
            );
        };
        if ack.error.is_none() {
            p.acked = Some(ack.version.clone());
        }
        p.error = ack.error.clone();
    }
    match &ack.error {
        None => {
            if let Some(at) = shared.publish_time(&ack.version) {
                shared
                    .metrics
                    .push_to_ack_seconds
                    .observe(at.elapsed().as_secs_f64());
            }
            tracing::debug!(proxy = %key, version = %ack.version, "proxy applied snapshot");
        }
        Some(e) => {
            shared.metrics.error("proxy_rejected_snapshot");
            tracing::warn!(proxy = %key, version = %ack.version, error = %e, "proxy rejected snapshot");
        }
    }
    shared.status_wake.notify_one();
    shared.proxies_changed.notify_one();
    reply(StatusCode::NO_CONTENT, "text/plain", "")
}

/// Add a validated report to the leader's book.
fn apply_usage(shared: &Shared, report: &Report) {
    let applied = {
        let index = lock(&shared.index);
        let key_of = |id: &str| {
            let (ns, name) = id.split_once('/')?;
            index.key(ns, name)
        };
        lock(&shared.book).add(report, key_of)
    };
    if applied > 0 {
        shared.status_wake.notify_one();
        shared.changed.notify_one();
    }
}

async fn usage(
    shared: &Arc<Shared>,
    tls: &Tls,
    identity: &Identity,
    scope: &Scope,
    report: Report,
) -> Response<OutBody> {
    let key = proxy_key(identity, &report.proxy);
    let streaming = lock(&shared.proxies)
        .get(&key)
        .is_some_and(|p| p.streams > 0);
    if !streaming {
        return reject(
            shared,
            StatusCode::FORBIDDEN,
            "unknown_proxy",
            "usage is accepted only from a proxy with an open config stream on this replica",
        );
    }
    let view = {
        let index = lock(&shared.index);
        scope.resolve(&index.namespaces)
    };
    if let Err(e) = report.validate(|ns| view.covers(ns)) {
        return reject(
            shared,
            StatusCode::BAD_REQUEST,
            e.metric_label(),
            &e.to_string(),
        );
    }
    if shared.leader.load(Ordering::Relaxed) {
        apply_usage(shared, &report);
        return reply(StatusCode::NO_CONTENT, "text/plain", "");
    }
    // Not the leader: hand the validated report to the one that is.
    let Some(url) = lock(&shared.leader_url).clone() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no leader known yet; retry",
        );
    };
    match forward(&url, tls, "/v1/replica/usage", &report).await {
        Ok(_) => reply(StatusCode::NO_CONTENT, "text/plain", ""),
        Err(e) => {
            shared.metrics.error("usage_forward");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("forwarding to the leader failed: {e}"),
            )
        }
    }
}

/// POST JSON to another replica over mutual TLS; returns the answer's body.
async fn forward<T: serde::Serialize>(
    url: &str,
    tls: &Tls,
    path: &str,
    body: &T,
) -> anyhow::Result<Bytes> {
    let client = tls.replica_client();
    let req = Request::post(format!("{}{path}", url.trim_end_matches('/')))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(body)?)))?;
    let answer = async {
        let resp = client.request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::ensure!(status.is_success(), "replica answered {status}");
        Ok(body)
    };
    tokio::time::timeout(Duration::from_secs(5), answer).await?
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

fn stream(
    shared: Arc<Shared>,
    identity: Identity,
    id: String,
    scope: Scope,
    streams: Streams,
) -> Response<OutBody> {
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let key = proxy_key(&identity, &id);
    let connected = {
        let mut proxies = lock(&shared.proxies);
        let p = proxies.entry(key.clone()).or_insert_with(|| ProxyInfo {
            identity: identity.clone(),
            scope: scope.clone(),
            streams: 0,
            connected_at: std::time::Instant::now(),
            acked: None,
            error: None,
        });
        p.streams += 1;
        p.scope = scope.clone();
        p.connected_at = std::time::Instant::now();
        let n = proxies.values().filter(|p| p.streams > 0).count();
        shared.metrics.connected_proxies.set(n as i64);
        Connected {
            shared: shared.clone(),
            id: key.clone(),
        }
    };
    tracing::info!(proxy = %key, scope = ?scope, "proxy connected");
    shared.changed.notify_one();
    shared.proxies_changed.notify_one();
    let mut updates = shared.published.subscribe();
    tokio::spawn(async move {
        let _connected = connected;
        let beat = Bytes::from_static(b"{\"type\":\"heartbeat\"}\n");
        let mut ticker = tokio::time::interval(streams.heartbeat);
        let age = streams.max_age.mul_f64(0.9 + fastrand::f64() * 0.2);
        let retire = tokio::time::sleep(age);
        tokio::pin!(retire);
        ticker.tick().await;
        let mut sent: Option<String> = None;
        // This proxy's view of the current release: only what changed for it goes out.
        let next_line = |sent: &mut Option<String>,
                         release: Option<Arc<crate::controller::Release>>|
         -> Option<Bytes> {
            let release = release?;
            let view = {
                let index = lock(&shared.index);
                scope.resolve(&index.namespaces)
            };
            let p = release.view(&view, &shared);
            if sent.as_deref() == Some(p.version.as_str()) {
                return None;
            }
            *sent = Some(p.version.clone());
            let usage = {
                let index = lock(&shared.index);
                let book = lock(&shared.book);
                let keys = index
                    .keys()
                    .filter(|k| view.covers(k.metadata.namespace.as_deref().unwrap_or_default()));
                crate::usage::fleet_usage(keys, &book, modelgate_wire::clock::unix_now())
            };
            if usage.is_empty() {
                return Some(p.line.clone());
            }
            // The fleet's spending first, so the snapshot's keys start from it.
            let mut line = serde_json::to_vec(&serde_json::json!({"type": "usage", "keys": usage}))
                .unwrap_or_default();
            line.push(b'\n');
            line.extend_from_slice(&p.line);
            Some(Bytes::from(line))
        };
        let first = updates.borrow_and_update().clone();
        if let Some(line) = next_line(&mut sent, first)
            && tx.send(line).await.is_err()
        {
            return;
        }
        loop {
            tokio::select! {
                changed = updates.changed() => {
                    if changed.is_err() { return; }
                    let next = updates.borrow_and_update().clone();
                    if let Some(line) = next_line(&mut sent, next)
                        && tx.send(line).await.is_err()
                    {
                        return;
                    }
                }
                _ = ticker.tick() => {
                    if tx.send(beat.clone()).await.is_err() { return; }
                }
                _ = &mut retire => {
                    let _ = tx.send(Bytes::from_static(b"{\"type\":\"reconnect\"}\n")).await;
                    return;
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
/// and learn the whole fleet from its answer.
pub async fn sync_to_leader(shared: Arc<Shared>, tls: Arc<Tls>) {
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
        #[derive(Deserialize)]
        struct Answer {
            fleet: Vec<RemoteProxy>,
        }
        match forward(&url, &tls, "/v1/replicas", &report).await {
            Ok(body) => match serde_json::from_slice::<Answer>(&body) {
                Ok(a) => shared.learn_fleet(a.fleet),
                Err(_) => shared.metrics.error("replica_sync"),
            },
            Err(e) => {
                shared.metrics.error("replica_sync");
                tracing::debug!(error = %e, "replica sync failed");
            }
        }
    }
}
