//! Busy time: the proxy's own cost of a request, measured where it is spent.
//!
//! Two kinds of work are timed while they happen. The task serving an API connection is
//! timed for every poll: reading and parsing requests, the gateway's own code (keys, limits,
//! routing, metering), writing answers, the system calls of all of it. Each upstream
//! connection is timed for every read and write on its socket. Waiting costs nothing: no
//! poll runs while the upstream thinks.
//!
//! A request is charged what its connections spent since the previous request on them took
//! its share (a [`BusyClock::take`] at the request's start, when its answer is ready, and
//! when it ends). The shares add up to the connections' whole busy time, so their mean is
//! the proxy's cost per request; `make bench` compares it with the CPU time per request of
//! the process and prints the ratio. Per request the split is approximate: what an answer's
//! last write costs lands on the next request of the same connection (the figure is fixed
//! before that write), and on multiplexed HTTP/2 connections requests share the time of the
//! connection as they come. Not counted anywhere: the runtime's own work between tasks
//! (waiting for events, timers), the access-log thread, and hyper's parsing of upstream
//! answers outside socket reads.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection};

/// `since` when no timed work is running.
const IDLE: u64 = u64::MAX;

/// Nanoseconds since the first call: one monotonic clock read.
fn stamp() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// The busy time of one connection, shared by the code that times it and the requests that
/// read it.
#[derive(Clone, Debug, Default)]
pub struct BusyClock(Arc<Times>);

#[derive(Debug)]
struct Times {
    /// Finished work not taken yet.
    spent: AtomicU64,
    /// When the running work started (or was last taken), IDLE when none runs.
    since: AtomicU64,
}

impl Default for Times {
    fn default() -> Self {
        Self {
            spent: AtomicU64::new(0),
            since: AtomicU64::new(IDLE),
        }
    }
}

impl BusyClock {
    fn begin(&self) {
        self.0.since.store(stamp(), Relaxed);
    }

    fn end(&self) {
        let started = self.0.since.swap(IDLE, Relaxed);
        if started != IDLE {
            self.0
                .spent
                .fetch_add(stamp().saturating_sub(started), Relaxed);
        }
    }

    /// The time spent since the last take, the running work's so far included.
    pub fn take(&self) -> Duration {
        let mut ns = self.0.spent.swap(0, Relaxed);
        let started = self.0.since.load(Relaxed);
        if started != IDLE {
            let now = stamp();
            // Lost to an `end` in between: that one counts the time into `spent`.
            if self
                .0
                .since
                .compare_exchange(started, now, Relaxed, Relaxed)
                .is_ok()
            {
                ns += now.saturating_sub(started);
            }
        }
        Duration::from_nanos(ns)
    }

    /// Runs `work` (a connection's task), timing each of its polls.
    pub fn time<F: Future>(&self, work: F) -> Timed<F> {
        Timed {
            work: Box::pin(work),
            clock: self.clone(),
        }
    }
}

/// Spawns tasks timed on a connection's clock: an HTTP/2 connection serves each of its
/// streams in a task of its own. With several workers, tasks of one connection polled at the
/// same time on different threads share one running stamp, and the figure undercounts.
#[derive(Clone, Debug)]
pub struct TimedExecutor(pub BusyClock);

impl<F> hyper::rt::Executor<F> for TimedExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, work: F) {
        tokio::spawn(self.0.time(work));
    }
}

/// A future timed for each poll (see [`BusyClock::time`]).
pub struct Timed<F> {
    work: Pin<Box<F>>,
    clock: BusyClock,
}

impl<F: Future> Future for Timed<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.clock.begin();
        let out = self.work.as_mut().poll(cx);
        self.clock.end();
        out
    }
}

/// An upstream socket timed for each read and write. Its clock reaches the requests it
/// serves in their responses' extensions (hyper's `Connected::extra`).
pub struct TimedIo<T> {
    io: T,
    clock: BusyClock,
    flush_writes: bool,
}

/// Whether flushing a connection writes to its socket (TLS) or not (plain TCP).
pub trait FlushWrites {
    fn flush_writes(&self) -> bool;
}

impl<T> FlushWrites for hyper_rustls::MaybeHttpsStream<T> {
    fn flush_writes(&self) -> bool {
        matches!(self, Self::Https(_))
    }
}

impl<T> TimedIo<T> {
    fn timed<R>(&mut self, op: impl FnOnce(Pin<&mut T>) -> R) -> R
    where
        T: Unpin,
    {
        self.clock.begin();
        let out = op(Pin::new(&mut self.io));
        self.clock.end();
        out
    }
}

impl<T: Read + Unpin> Read for TimedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        self.get_mut().timed(|io| io.poll_read(cx, buf))
    }
}

impl<T: Write + Unpin> Write for TimedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().timed(|io| io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().timed(|io| io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    /// Timed on TLS only, where a flush writes records to the socket; on plain TCP it is no
    /// system call. A shutdown happens once per connection and is not timed.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.flush_writes {
            this.timed(|io| io.poll_flush(cx))
        } else {
            Pin::new(&mut this.io).poll_flush(cx)
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl<T: Connection> Connection for TimedIo<T> {
    fn connected(&self) -> Connected {
        self.io.connected().extra(self.clock.clone())
    }
}

/// A connector whose connections are [`TimedIo`].
#[derive(Clone, Debug)]
pub struct TimedConnector<C>(pub C);

type Connecting<T, E> = Pin<Box<dyn Future<Output = Result<TimedIo<T>, E>> + Send>>;

impl<C> tower_service::Service<Uri> for TimedConnector<C>
where
    C: tower_service::Service<Uri>,
    C::Response: FlushWrites,
    C::Future: Send + 'static,
{
    type Response = TimedIo<C::Response>;
    type Error = C::Error;
    type Future = Connecting<C::Response, C::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), C::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.0.call(uri);
        Box::pin(async move {
            let io = connecting.await?;
            Ok(TimedIo {
                flush_writes: io.flush_writes(),
                io,
                clock: BusyClock::default(),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn polls_are_charged_and_waiting_is_not() {
        let clock = BusyClock::default();
        let spin = |d: Duration| {
            let until = Instant::now() + d;
            while Instant::now() < until {}
        };
        clock
            .time(async {
                spin(Duration::from_millis(20));
                tokio::time::sleep(Duration::from_millis(200)).await;
                spin(Duration::from_millis(20));
            })
            .await;
        let spent = clock.take();
        assert!(spent >= Duration::from_millis(40), "{spent:?}");
        assert!(
            spent < Duration::from_millis(200),
            "the sleep was charged: {spent:?}"
        );
        assert_eq!(clock.take(), Duration::ZERO, "taken once");
    }

    #[tokio::test]
    async fn a_take_inside_a_poll_counts_the_poll_so_far_once() {
        let clock = BusyClock::default();
        let inner = clock.clone();
        let t0 = Instant::now();
        let first = clock
            .time(async move {
                std::thread::sleep(Duration::from_millis(10));
                let first = inner.take();
                std::thread::sleep(Duration::from_millis(10));
                first
            })
            .await;
        let wall = t0.elapsed();
        let rest = clock.take();
        assert!(first >= Duration::from_millis(10), "{first:?}");
        assert!(rest >= Duration::from_millis(10), "{rest:?}");
        assert!(first + rest <= wall, "{first:?} + {rest:?} > {wall:?}");
    }
}
