//! The gateway's HTTP/1 serve loop: `axum::serve` with the limits a server facing the internet
//! needs before any authentication runs.
//!
//! - **Header timeout.** A connection must send a complete request head within
//!   [`Limits::header_timeout`], counted from when it connects or, on a keep-alive connection,
//!   from the first byte of its next request. Slower (a client trickling one header line every
//!   few seconds), it is closed without an answer.
//! - **Idle timeout.** A connection with no request in flight for [`Limits::idle_timeout`] is
//!   closed gracefully. Only time without a request counts: a request in flight (its handler
//!   working, its body arriving, its response being written) is never cut by this timer; the
//!   router's own request timeout bounds it.
//! - **Connection cap.** At most [`Limits::max_connections`] connections are open at once. One
//!   more is accepted, answered `503` with `Connection: close` when its socket takes the bytes
//!   without waiting, and closed at once (see [`serve`] for why it is not left in the kernel's
//!   backlog).
//!
//! hyper's own `header_read_timeout` is not used: since hyper 1.4 it also runs while a
//! keep-alive connection waits for its next request, so it would close idle connections after
//! the header timeout and make a longer idle timeout meaningless. One small watchdog per
//! connection keeps both timers instead, and is woken only when the connection changes phase.
//!
//! Shutdown keeps `axum::serve`'s graceful behaviour: stop accepting, close idle connections,
//! let requests in flight finish, and return once every connection is closed.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use cmdflow_shared::Config;

/// Connections the gateway holds open (a gauge).
pub const OPEN_CONNECTIONS: &str = "cmdflow_http_connections";
/// Connections refused because [`Limits::max_connections`] were open (a counter).
pub const REFUSED_CONNECTIONS: &str = "cmdflow_http_connections_refused_total";

/// What a refused connection is told, when its socket takes it at once.
const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\nretry-after: 1\r\ncontent-type: application/json\r\ncontent-length: 109\r\n\r\n{\"code\":\"too_many_connections\",\"detail\":\"the gateway holds as many connections as it may; try again shortly\"}";

/// The limits of the serve loop, from [`Config`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// How long a client may take to send a complete request head.
    pub header_timeout: Duration,
    /// How long a connection may stay open with no request in flight.
    pub idle_timeout: Duration,
    /// The most connections open at once.
    pub max_connections: usize,
}

impl Limits {
    /// `CMDFLOW_HTTP_HEADER_TIMEOUT`, `CMDFLOW_HTTP_IDLE_TIMEOUT`, `CMDFLOW_HTTP_MAX_CONNECTIONS`.
    pub fn from_config(config: &Config) -> Limits {
        Limits {
            header_timeout: config.http_header_timeout,
            idle_timeout: config.http_idle_timeout,
            max_connections: config.http_max_connections,
        }
    }
}

/// Serves `router` on `listener` within `limits` until `signal` completes, then stops accepting,
/// closes idle connections, lets the requests in flight finish and returns when every
/// connection is closed.
///
/// When [`Limits::max_connections`] are open, a new connection is accepted and closed at once
/// (with a `503` if its socket takes it without waiting) rather than left unaccepted: a server
/// that stops accepting lets the kernel's backlog fill in silence, and its clients hang until
/// their own connect timeout with nothing in the logs or metrics. Refused at once, a client or
/// load balancer sees the answer and tries elsewhere, and [`REFUSED_CONNECTIONS`] counts it.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    signal: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    // Before the first connection, so the gauge counts every one (idempotent).
    cmdflow_shared::metrics::install();
    describe_metrics();
    // A semaphore cannot hold more permits than this; no machine holds that many sockets.
    let permits = Arc::new(Semaphore::new(
        limits.max_connections.clamp(1, Semaphore::MAX_PERMITS),
    ));
    let connections = TaskTracker::new();
    let closing = CancellationToken::new();
    let mut signal = pin!(signal);
    let mut warned_full: Option<Instant> = None;
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            () = &mut signal => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    // Out of file descriptors, say: wait for some to close, as hyper and axum do.
                    tracing::error!(error = %e, "Cannot accept a connection; trying again in 1s.");
                    tokio::select! {
                        () = &mut signal => break,
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            refuse(&stream);
            metrics::counter!(REFUSED_CONNECTIONS).increment(1);
            if warned_full.is_none_or(|at| at.elapsed() > Duration::from_secs(60)) {
                tracing::warn!(
                    max = limits.max_connections,
                    %peer,
                    "Connection cap reached: refusing new connections (503) until some close."
                );
                warned_full = Some(Instant::now());
            }
            continue;
        };
        connections.spawn(connection(
            stream,
            peer,
            router.clone(),
            limits,
            permit,
            closing.clone(),
        ));
    }
    drop(listener);
    closing.cancel();
    connections.close();
    connections.wait().await;
    Ok(())
}

/// Errors of one connection that the listener can ignore (as `axum::serve` does).
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Answers a connection over the cap with a 503 if its socket takes the bytes at once; the
/// caller then drops (closes) it.
fn refuse(stream: &TcpStream) {
    // Never waits on the client: a full socket buffer just means no answer, only the close.
    drop(stream.try_write(REFUSAL));
}

fn describe_metrics() {
    metrics::describe_gauge!(OPEN_CONNECTIONS, "HTTP connections the gateway holds open.");
    metrics::describe_counter!(
        REFUSED_CONNECTIONS,
        "HTTP connections refused (503, closed) because the gateway held CMDFLOW_HTTP_MAX_CONNECTIONS."
    );
}

/// Counts one open connection in [`OPEN_CONNECTIONS`] while it lives.
struct OpenConnection;

impl OpenConnection {
    fn new() -> OpenConnection {
        metrics::gauge!(OPEN_CONNECTIONS).increment(1.0);
        OpenConnection
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        metrics::gauge!(OPEN_CONNECTIONS).decrement(1.0);
    }
}

/// Serves one connection until it closes, its client is too slow or idle, or the server stops.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    limits: Limits,
    _permit: OwnedSemaphorePermit,
    closing: CancellationToken,
) {
    let _open = OpenConnection::new();
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        inner: stream,
        activity: activity.clone(),
    });
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let in_flight = activity.begin();
            let response = router.clone().oneshot(request.map(Body::new));
            async move {
                let response = response.await?;
                Ok::<_, Infallible>(response.map(|body| TrackedBody {
                    inner: body,
                    _in_flight: in_flight,
                }))
            }
        })
    };
    // No upgrades: no route takes one, and an upgraded socket would escape these limits.
    let mut conn = pin!(
        http1::Builder::new()
            // Kept by the watchdog instead (see the module's documentation).
            .header_read_timeout(None)
            .serve_connection(io, service)
    );
    let mut shutting_down = false;
    loop {
        tokio::select! {
            served = conn.as_mut() => {
                if let Err(e) = served {
                    tracing::trace!(%peer, error = %e, "Connection ended with an error.");
                }
                break;
            }
            expired = activity.expired(limits) => match expired {
                Expired::Head => {
                    tracing::debug!(
                        %peer,
                        timeout = ?limits.header_timeout,
                        "Closing a connection that sent no complete request head in time."
                    );
                    break;
                }
                Expired::Idle if shutting_down => break,
                Expired::Idle => {
                    tracing::trace!(%peer, "Closing an idle connection.");
                    conn.as_mut().graceful_shutdown();
                    shutting_down = true;
                    // Closing an idle connection is immediate; should it not be, it gets one
                    // more idle timeout before it is dropped.
                    activity.rearm();
                }
            },
            () = closing.cancelled(), if !shutting_down => {
                conn.as_mut().graceful_shutdown();
                shutting_down = true;
            }
        }
    }
}

/// What a connection is doing, for its timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Receiving a request head, since then (its first byte, or the connection's start).
    Head(Instant),
    /// This many requests in flight (read, handled or being answered).
    Busy(usize),
    /// No request in flight since then, and no byte of the next one.
    Idle(Instant),
}

/// Which timer ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expired {
    Head,
    Idle,
}

/// One connection's phase, shared by its socket, its service, its response bodies and its
/// watchdog (all polled by the connection's one task).
struct Activity {
    phase: Mutex<Phase>,
    /// Told on every change of phase; only the watchdog waits on it.
    changed: Notify,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            phase: Mutex::new(Phase::Head(Instant::now())),
            changed: Notify::new(),
        }
    }

    fn phase(&self) -> MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set(&self, mut phase: MutexGuard<'_, Phase>, to: Phase) {
        *phase = to;
        drop(phase);
        self.changed.notify_one();
    }

    /// Bytes arrived: on an idle connection, the next request head has started.
    fn read(&self) {
        let phase = self.phase();
        if matches!(*phase, Phase::Idle(_)) {
            self.set(phase, Phase::Head(Instant::now()));
        }
    }

    /// A request head was read: the connection is busy until its response is written.
    fn begin(self: &Arc<Self>) -> InFlight {
        let phase = self.phase();
        let next = match *phase {
            Phase::Busy(n) => Phase::Busy(n + 1),
            Phase::Head(_) | Phase::Idle(_) => Phase::Busy(1),
        };
        self.set(phase, next);
        InFlight(self.clone())
    }

    fn end(&self) {
        let phase = self.phase();
        let next = match *phase {
            Phase::Busy(n) if n > 1 => Phase::Busy(n - 1),
            _ => Phase::Idle(Instant::now()),
        };
        self.set(phase, next);
    }

    /// Restarts an idle connection's timer.
    fn rearm(&self) {
        let phase = self.phase();
        if matches!(*phase, Phase::Idle(_)) {
            self.set(phase, Phase::Idle(Instant::now()));
        }
    }

    /// When the current phase's timer runs out, if it does.
    fn deadline(&self, limits: Limits) -> Option<(Instant, Expired)> {
        match *self.phase() {
            Phase::Head(since) => Some((since + limits.header_timeout, Expired::Head)),
            Phase::Idle(since) => Some((since + limits.idle_timeout, Expired::Idle)),
            Phase::Busy(_) => None,
        }
    }

    /// Completes when a head takes longer than the header timeout, or the connection is idle
    /// for the idle timeout. Never while a request is in flight.
    async fn expired(&self, limits: Limits) -> Expired {
        loop {
            let notified = self.changed.notified();
            match self.deadline(limits) {
                None => notified.await,
                Some((at, which)) => {
                    tokio::select! {
                        () = notified => {}
                        () = tokio::time::sleep_until(at) => {
                            if self.deadline(limits) == Some((at, which)) {
                                return which;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// One request in flight; dropped when its response body is written (or abandoned).
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// A response body that keeps its request in flight until it is written.
struct TrackedBody {
    inner: Body,
    _in_flight: InFlight,
}

impl HttpBody for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A socket that tells its connection's [`Activity`] when bytes arrive.
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.read();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Short, so the test runs on the real clock in about a second.
    const LIMITS: Limits = Limits {
        header_timeout: Duration::from_millis(200),
        idle_timeout: Duration::from_millis(300),
        max_connections: 1,
    };

    #[test]
    fn the_refusal_is_a_complete_response() {
        let text = std::str::from_utf8(REFUSAL).unwrap_or_default();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or_default();
        assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        assert!(
            serde_json::from_str::<serde_json::Value>(body).is_ok(),
            "{body}"
        );
    }

    #[tokio::test]
    async fn a_connection_times_out_only_while_no_request_is_in_flight() {
        let activity = Arc::new(Activity::new());
        let start = Instant::now();
        // A head that never completes: the header timeout.
        assert_eq!(activity.expired(LIMITS).await, Expired::Head);
        assert!(start.elapsed() >= LIMITS.header_timeout);

        // A request in flight longer than both timeouts, then idle: only the idle time counts.
        let in_flight = activity.begin();
        let held = Duration::from_millis(700);
        let released = tokio::spawn(async move {
            tokio::time::sleep(held).await;
            drop(in_flight);
        });
        let start = Instant::now();
        assert_eq!(activity.expired(LIMITS).await, Expired::Idle);
        assert!(start.elapsed() >= held + LIMITS.idle_timeout);
        assert!(released.await.is_ok());

        // A byte of the next request: the header timer, from that byte.
        activity.read();
        let start = Instant::now();
        assert_eq!(activity.expired(LIMITS).await, Expired::Head);
        assert!(start.elapsed() >= LIMITS.header_timeout);
    }

    #[test]
    fn overlapping_requests_keep_the_connection_busy_until_the_last_ends() {
        let activity = Arc::new(Activity::new());
        let first = activity.begin();
        let second = activity.begin();
        drop(first);
        assert_eq!(*activity.phase(), Phase::Busy(1));
        drop(second);
        assert!(matches!(*activity.phase(), Phase::Idle(_)));
    }
}
