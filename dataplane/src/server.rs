//! Listeners: the API port, the admin port, connection limits and graceful drain.
//!
//! Accepted sockets get `TCP_NODELAY` (without it, small responses stall ~40 ms on Nagle and
//! delayed ACKs). Connections beyond `maxConnections` are closed at accept. On SIGTERM or
//! SIGINT the proxy reports not-ready, stops accepting, lets in-flight requests and streams
//! finish up to the drain deadline, then exits.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::busy::{BusyClock, TimedExecutor};
use crate::error::json_response;
use crate::proxy::{self, Gateway};
use crate::source::Runtime;
use crate::stream::ProxyBody;

fn builder<E: Clone>(executor: E, header_read_timeout: Duration) -> auto::Builder<E> {
    let mut b = auto::Builder::new(executor);
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .keep_alive(true);
    // HTTP/2 clients that vanish without closing are found by pings.
    b.http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20));
    b
}

/// Accept and serve until `shutdown` flips, then drain for at most `drain`.
pub async fn serve_api(
    listener: TcpListener,
    gw: Arc<Gateway>,
    max_connections: usize,
    header_read_timeout: Duration,
    drain: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(max_connections));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.changed() => break,
            a = listener.accept() => a,
        };
        let (stream, _peer) = match accepted {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            gw.metrics.connections_refused.inc();
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let gw = gw.clone();
        // The connection's task is timed while it works: its requests are charged for it.
        let clock = BusyClock::default();
        let service = {
            let clock = clock.clone();
            service_fn(move |req: Request<Incoming>| {
                let gw = gw.clone();
                let clock = clock.clone();
                async move { Ok::<_, Infallible>(proxy::handle(gw, req, Some(clock)).await) }
            })
        };
        // A socket that sends nothing would sit in protocol detection (before HTTP/1's
        // header timeout applies) holding a slot forever: it gets the same deadline for its
        // first byte.
        let graceful_watch = graceful.watcher();
        // HTTP/2 streams run in tasks of their own, timed on the connection's clock too.
        let builder = builder(TimedExecutor(clock.clone()), header_read_timeout);
        tokio::spawn(clock.time(async move {
            let mut first = [0u8; 1];
            match tokio::time::timeout(header_read_timeout, stream.peek(&mut first)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => {
                    drop(permit);
                    return;
                }
            }
            let conn = builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned();
            let _ = graceful_watch.watch(conn).await;
            drop(permit);
        }));
    }
    drop(listener);
    tracing::info!(
        deadline_s = drain.as_secs_f64(),
        "draining: no new connections, waiting for in-flight requests"
    );
    match tokio::time::timeout(drain, graceful.shutdown()).await {
        Ok(()) => tracing::info!("drained"),
        Err(_) => tracing::warn!("drain deadline reached; closing remaining connections"),
    }
}

/// The admin port: health, readiness, metrics and the active config. `/config` (route
/// names, backends, key names and limits) answers loopback clients, and remote ones only
/// with the admin token; health and metrics stay open for probes and Prometheus.
pub async fn serve_admin(
    listener: TcpListener,
    rt: Arc<Runtime>,
    token: Option<String>,
    mut shutdown: watch::Receiver<bool>,
) {
    let token: Option<Arc<str>> = token.map(Into::into);
    let builder = builder(TokioExecutor::new(), Duration::from_secs(10));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.changed() => break,
            a = listener.accept() => a,
        };
        let Ok((stream, peer)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let rt = rt.clone();
        let token = token.clone();
        let local = peer.ip().is_loopback();
        let service = service_fn(move |req: Request<Incoming>| {
            let rt = rt.clone();
            let may_see_config = may_see_config(
                local,
                token.as_deref(),
                req.headers()
                    .get(header::AUTHORIZATION)
                    .map(|v| v.as_bytes()),
            );
            async move { Ok::<_, Infallible>(admin(&rt, &req, may_see_config)) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        tokio::spawn(conn);
    }
}

fn text(status: StatusCode, body: impl Into<bytes::Bytes>) -> Response<ProxyBody> {
    let mut r = Response::new(ProxyBody::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// `/config` for loopback peers, or for a request with `Authorization: Bearer <admin
/// token>` (compared in constant time) when one is configured.
fn may_see_config(loopback: bool, token: Option<&str>, authorization: Option<&[u8]>) -> bool {
    loopback
        || token.is_some_and(|token| {
            authorization
                .and_then(|v| v.strip_prefix(b"Bearer "))
                .is_some_and(|p| crate::keys::same_token(p, token.as_bytes()))
        })
}

fn admin(rt: &Runtime, req: &Request<Incoming>, may_see_config: bool) -> Response<ProxyBody> {
    let gw = &rt.gateway;
    match req.uri().path() {
        "/healthz" | "/livez" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            if rt.draining.load(Ordering::Relaxed) {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else if gw.live.load().is_none() {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no valid config snapshot yet\n",
                )
            } else {
                text(StatusCode::OK, "ready\n")
            }
        }
        "/metrics" => {
            let openmetrics = req
                .headers()
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("application/openmetrics-text"));
            let (body, content_type) = if openmetrics {
                (
                    gw.metrics.encode_openmetrics(),
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )
            } else {
                (
                    gw.metrics.encode_prometheus(),
                    "text/plain; version=0.0.4; charset=utf-8",
                )
            };
            let mut r = text(StatusCode::OK, body);
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
            r
        }
        "/config" if may_see_config => json_response(StatusCode::OK, &rt.describe()),
        "/config" => text(
            StatusCode::FORBIDDEN,
            "/config answers loopback clients, or remote ones with the admin token (--admin-token-file)\n",
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /healthz, /readyz, /metrics or /config\n",
        ),
    }
}

/// Bind a listener; a clear message names the setting when the address is taken or invalid.
pub async fn bind(addr: &str, what: &str) -> anyhow::Result<TcpListener> {
    let parsed: SocketAddr = addr
        .parse()
        .map_err(|e| anyhow::anyhow!("{what} address {addr:?} is not host:port ({e})"))?;
    TcpListener::bind(parsed)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} for the {what} port: {e}"))
}

#[cfg(test)]
mod tests {
    use super::may_see_config;

    #[test]
    fn config_needs_loopback_or_the_admin_token() {
        let t = Some("admin-token-0123456789");
        assert!(may_see_config(true, None, None));
        assert!(!may_see_config(false, None, None));
        assert!(!may_see_config(false, None, Some(b"Bearer anything")));
        assert!(may_see_config(
            false,
            t,
            Some(b"Bearer admin-token-0123456789")
        ));
        assert!(!may_see_config(
            false,
            t,
            Some(b"Bearer admin-token-012345678X")
        ));
        assert!(!may_see_config(false, t, Some(b"admin-token-0123456789")));
        assert!(!may_see_config(false, t, None));
    }
}
