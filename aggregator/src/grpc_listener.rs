//! The gRPC port's connections: accepted here and handed to tonic, so that their number is
//! capped and a connection that carries no stream cannot stay open.
//!
//! Why a bounded TLS handshake (`grpc.handshake_timeout`, in `tls_reload.rs`) is not enough:
//! nothing bounds what comes after it, so a peer could
//! finish TCP and TLS (or, with `tls.insecure`, just TCP) and then sit there, answering
//! HTTP/2 pings, for ever; a few thousand of those would use up the process's file
//! descriptors and lock agents out. So here:
//!
//! - every connection counts against `grpc.max_connections`;
//! - a connection with no stream open for `grpc.idle_connection_timeout` (from its accept,
//!   or from the end of its last stream) is closed, whatever state its TLS or HTTP/2 is in;
//!   the ingest service reports streams by the peer's address ([`GrpcConnections::stream_opened`]);
//! - at the cap, the *oldest connection without a stream* is closed to make room for the new
//!   one, and only when every connection carries a stream is the new one refused. Agents that
//!   stream are never pushed out by newcomers, while a flood of idle connections only pushes
//!   out its own older members.
//!
//! Closing works from inside the connection's I/O: [`GuardedStream`] fails its next read once
//! its connection is evicted or timed out, which ends the TLS handshake or the HTTP/2
//! connection that reads from it.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use picket_core::model::{Family, Labels, MetricType, now_ms};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};

/// After an accept error that is not about one connection (out of file descriptors, say),
/// wait this long before accepting again rather than spinning on the error.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// At most one warning per this long about failing accepts.
const ACCEPT_WARNING_EVERY: Duration = Duration::from_secs(10);

/// The connection limits, from `[grpc]`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub idle_connection_timeout: Duration,
}

/// Why a connection ended, for `picket_aggregator_grpc_connections_closed_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Closed {
    /// Closed to make room for a newer connection at `max_connections`.
    Evicted,
    /// No stream open for `idle_connection_timeout`.
    IdleTimeout,
    /// Ended by either side before it ever carried a stream: a failed or timed-out TLS
    /// handshake, bytes that are not HTTP/2, a port scan.
    BeforeStream,
    /// Ended after carrying streams: an agent reconnecting or shutting down, keepalive loss.
    AfterStream,
}

impl Closed {
    fn label(self) -> &'static str {
        match self {
            Closed::Evicted => "evicted",
            Closed::IdleTimeout => "idle_timeout",
            Closed::BeforeStream => "before_stream",
            Closed::AfterStream => "after_stream",
        }
    }
}

/// One accepted connection's shared state.
struct Conn {
    id: u64,
    peer: Option<SocketAddr>,
    state: Mutex<ConnState>,
}

struct ConnState {
    /// Streams the ingest service has open on this connection.
    streams: usize,
    ever_streamed: bool,
    /// Since when the connection has had no stream (meaningful while `streams == 0`).
    idle_since: Instant,
    evicted: bool,
    timed_out: bool,
    /// The task reading the connection, woken when it must look at the state again.
    waker: Option<Waker>,
}

impl Conn {
    fn state(&self) -> MutexGuard<'_, ConnState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Default)]
struct Table {
    next_id: u64,
    /// Open connections in accept order, so the oldest idle one is found first.
    by_id: BTreeMap<u64, Arc<Conn>>,
    by_peer: HashMap<SocketAddr, u64>,
    /// Connections that count against the cap: open and not evicted.
    counted: usize,
}

/// The gRPC port's open connections, their limits and counters.
pub struct GrpcConnections {
    limits: Limits,
    table: Mutex<Table>,
    accepted: AtomicU64,
    refused: AtomicU64,
    accept_errors: AtomicU64,
    closed: Mutex<BTreeMap<Closed, u64>>,
    /// Set at shutdown: connections without a stream close at once rather than hold up the
    /// server's graceful shutdown (tonic waits for every connection to end).
    shutting_down: AtomicBool,
}

impl GrpcConnections {
    pub fn new(limits: Limits) -> Arc<GrpcConnections> {
        Arc::new(GrpcConnections {
            limits,
            table: Mutex::new(Table::default()),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            accept_errors: AtomicU64::new(0),
            closed: Mutex::new(BTreeMap::new()),
            shutting_down: AtomicBool::new(false),
        })
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Accepts from `incoming` in a task of its own and yields the admitted connections, for
    /// tonic's `serve_with_incoming_shutdown`. The task ends when tonic drops the stream (at
    /// shutdown), closing the listener.
    pub fn incoming(
        self: &Arc<Self>,
        incoming: TcpIncoming,
    ) -> ReceiverStream<io::Result<GuardedStream>> {
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(self.clone().accept_loop(incoming, tx));
        ReceiverStream::new(rx)
    }

    async fn accept_loop(
        self: Arc<Self>,
        mut incoming: TcpIncoming,
        tx: mpsc::Sender<io::Result<GuardedStream>>,
    ) {
        let mut last_warning: Option<Instant> = None;
        loop {
            let next = tokio::select! {
                _ = tx.closed() => return,
                next = incoming.next() => next,
            };
            let stream = match next {
                None => return,
                Some(Ok(stream)) => stream,
                Some(Err(e)) => {
                    self.accept_errors.fetch_add(1, Ordering::Relaxed);
                    if is_connection_error(&e) {
                        tracing::debug!(error = %e, "gRPC accept: connection failed before it was accepted");
                    } else {
                        if last_warning.is_none_or(|t| t.elapsed() >= ACCEPT_WARNING_EVERY) {
                            tracing::warn!(error = %e, "cannot accept gRPC connections (out of file descriptors? see grpc.max_connections and the process's open-file limit)");
                            last_warning = Some(Instant::now());
                        }
                        tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    }
                    continue;
                }
            };
            let Some(guarded) = self.admit(stream) else {
                continue;
            };
            if tx.send(Ok(guarded)).await.is_err() {
                return;
            }
        }
    }

    /// Counts `stream` in, making room by evicting the oldest connection without a stream
    /// if the cap is reached; `None` (and the stream closed) when every connection streams.
    fn admit(self: &Arc<Self>, stream: TcpStream) -> Option<GuardedStream> {
        let peer = stream.peer_addr().ok();
        let mut table = self.table();
        if table.counted >= self.limits.max_connections {
            let victim = table
                .by_id
                .values()
                .find(|c| {
                    let s = c.state();
                    s.streams == 0 && !s.evicted
                })
                .cloned();
            match victim {
                Some(conn) => {
                    let mut s = conn.state();
                    s.evicted = true;
                    if let Some(waker) = s.waker.take() {
                        waker.wake();
                    }
                    tracing::debug!(peer = ?conn.peer, "closing a connection without a stream to make room (grpc.max_connections)");
                    drop(s);
                    table.counted = table.counted.saturating_sub(1);
                }
                None => {
                    drop(table);
                    self.refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        ?peer,
                        max = self.limits.max_connections,
                        "refusing a gRPC connection: grpc.max_connections reached and every connection carries a stream"
                    );
                    return None;
                }
            }
        }
        table.next_id += 1;
        let conn = Arc::new(Conn {
            id: table.next_id,
            peer,
            state: Mutex::new(ConnState {
                streams: 0,
                ever_streamed: false,
                idle_since: Instant::now(),
                evicted: false,
                timed_out: false,
                waker: None,
            }),
        });
        table.by_id.insert(conn.id, conn.clone());
        if let Some(peer) = peer {
            table.by_peer.insert(peer, conn.id);
        }
        table.counted += 1;
        drop(table);
        self.accepted.fetch_add(1, Ordering::Relaxed);
        let deadline = Instant::now() + self.limits.idle_connection_timeout;
        Some(GuardedStream {
            inner: stream,
            conn,
            owner: self.clone(),
            idle_timer: Box::pin(tokio::time::sleep_until(deadline)),
            timer_deadline: deadline,
        })
    }

    fn release(&self, conn: &Conn) {
        let reason = {
            let s = conn.state();
            if s.evicted {
                Closed::Evicted
            } else if s.timed_out {
                Closed::IdleTimeout
            } else if s.ever_streamed {
                Closed::AfterStream
            } else {
                Closed::BeforeStream
            }
        };
        {
            let mut table = self.table();
            table.by_id.remove(&conn.id);
            if let Some(peer) = conn.peer
                && table.by_peer.get(&peer) == Some(&conn.id)
            {
                table.by_peer.remove(&peer);
            }
            if reason != Closed::Evicted {
                table.counted = table.counted.saturating_sub(1);
            }
        }
        let mut closed = self.closed.lock().unwrap_or_else(|e| e.into_inner());
        *closed.entry(reason).or_default() += 1;
    }

    /// Closes every connection that carries no stream, now and as their streams end: the
    /// server is shutting down.
    pub fn shut_down(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
        let conns: Vec<Arc<Conn>> = self.table().by_id.values().cloned().collect();
        for conn in conns {
            if let Some(waker) = conn.state().waker.take() {
                waker.wake();
            }
        }
    }

    /// Marks a stream open on the connection from `peer` until the guard is dropped; while
    /// a connection has a stream it is neither evicted nor timed out. `None` when the
    /// connection is unknown (already closed).
    pub fn stream_opened(self: &Arc<Self>, peer: Option<SocketAddr>) -> Option<StreamGuard> {
        let conn = {
            let table = self.table();
            let id = table.by_peer.get(&peer?)?;
            table.by_id.get(id)?.clone()
        };
        let mut s = conn.state();
        s.streams += 1;
        s.ever_streamed = true;
        drop(s);
        Some(StreamGuard { conn })
    }

    /// `picket_aggregator_grpc_connections*`.
    pub fn families(&self) -> Vec<Family> {
        let ts = now_ms();
        let mut open = Family::new(
            "picket_aggregator_grpc_connections",
            MetricType::Gauge,
            "Open connections on the gRPC port.",
        );
        open.push(Labels::new(), ts, self.table().by_id.len() as f64);
        let mut accepted = Family::new(
            "picket_aggregator_grpc_connections_accepted_total",
            MetricType::Counter,
            "Connections accepted on the gRPC port.",
        );
        accepted.push(
            Labels::new(),
            ts,
            self.accepted.load(Ordering::Relaxed) as f64,
        );
        let mut refused = Family::new(
            "picket_aggregator_grpc_connections_refused_total",
            MetricType::Counter,
            "Connections closed at once because grpc.max_connections was reached and every connection carried a stream.",
        );
        refused.push(
            Labels::new(),
            ts,
            self.refused.load(Ordering::Relaxed) as f64,
        );
        let mut errors = Family::new(
            "picket_aggregator_grpc_accept_errors_total",
            MetricType::Counter,
            "Failed accepts on the gRPC port (a peer gone before the accept, or no file descriptors left).",
        );
        errors.push(
            Labels::new(),
            ts,
            self.accept_errors.load(Ordering::Relaxed) as f64,
        );
        let mut closed = Family::new(
            "picket_aggregator_grpc_connections_closed_total",
            MetricType::Counter,
            "Closed gRPC connections by reason: evicted (made room for a new one), idle_timeout (no stream for grpc.idle_connection_timeout), before_stream (ended before opening a stream: failed TLS, garbage), after_stream.",
        );
        let counts = self.closed.lock().unwrap_or_else(|e| e.into_inner());
        for reason in [
            Closed::Evicted,
            Closed::IdleTimeout,
            Closed::BeforeStream,
            Closed::AfterStream,
        ] {
            let n = counts.get(&reason).copied().unwrap_or(0);
            closed.push(
                Labels::from_pairs([("reason", reason.label())]),
                ts,
                n as f64,
            );
        }
        vec![open, accepted, refused, errors, closed]
    }
}

/// Errors that concern the one connection being accepted, not the listener.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::TimedOut
    )
}

/// A stream open on a connection; dropping it starts the connection's idle clock when it
/// was the last one.
pub struct StreamGuard {
    conn: Arc<Conn>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let mut s = self.conn.state();
        s.streams = s.streams.saturating_sub(1);
        if s.streams == 0 {
            s.idle_since = Instant::now();
            // The reader re-arms its timer for the new deadline.
            if let Some(waker) = s.waker.take() {
                waker.wake();
            }
        }
    }
}

/// An admitted TCP connection: reads fail once it is evicted or idle too long, which ends
/// whatever (TLS handshake, HTTP/2) is reading it. Dropping it releases its place.
pub struct GuardedStream {
    inner: TcpStream,
    conn: Arc<Conn>,
    owner: Arc<GrpcConnections>,
    idle_timer: Pin<Box<Sleep>>,
    timer_deadline: Instant,
}

impl GuardedStream {
    /// `Err` when the connection must close; otherwise registers the reader's waker and the
    /// idle timer with `cx`.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let conn = self.conn.clone();
        let mut s = conn.state();
        if s.evicted {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "closed to make room for a new connection (grpc.max_connections)",
            ));
        }
        if s.timed_out {
            return Err(idle_error());
        }
        if s.streams == 0 && self.owner.shutting_down.load(Ordering::Relaxed) {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the aggregator is shutting down",
            ));
        }
        if s.streams == 0 {
            let deadline = s.idle_since + self.owner.limits.idle_connection_timeout;
            if deadline != self.timer_deadline {
                self.idle_timer.as_mut().reset(deadline);
                self.timer_deadline = deadline;
            }
            if self.idle_timer.as_mut().poll(cx).is_ready() {
                s.timed_out = true;
                tracing::debug!(peer = ?conn.peer, "closing a gRPC connection without a stream (grpc.idle_connection_timeout)");
                return Err(idle_error());
            }
        }
        if !s.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            s.waker = Some(cx.waker().clone());
        }
        Ok(())
    }

    fn closing(&self) -> Option<io::Error> {
        let s = self.conn.state();
        (s.evicted || s.timed_out).then(|| {
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "gRPC connection closed by its limits",
            )
        })
    }
}

fn idle_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "no stream opened within grpc.idle_connection_timeout",
    )
}

impl Drop for GuardedStream {
    fn drop(&mut self) {
        self.owner.release(&self.conn);
    }
}

impl Connected for GuardedStream {
    // The plain TCP info, so tonic's `remote_addr()` and `peer_certs()` (which look for
    // exactly this type, wrapped in TLS info) keep working.
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Err(e) = this.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(e) = this.closing() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(e) = this.closing() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    async fn pair(listener: &tokio::net::TcpListener) -> (TcpStream, TcpStream) {
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    fn value(families: &[Family], name: &str, reason: Option<&str>) -> f64 {
        let family = families.iter().find(|f| f.name == name).unwrap();
        let point = family
            .points
            .iter()
            .find(|p| reason.is_none_or(|r| p.labels.get("reason") == Some(r)))
            .unwrap();
        match point.value {
            picket_core::model::Value::Number(v) => v,
            _ => panic!("not a number"),
        }
    }

    #[tokio::test]
    async fn idle_connections_make_room_and_streaming_ones_stay() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let conns = GrpcConnections::new(Limits {
            max_connections: 2,
            idle_connection_timeout: Duration::from_secs(60),
        });
        let (_c1, s1) = pair(&listener).await;
        let (_c2, s2) = pair(&listener).await;
        let (_c3, s3) = pair(&listener).await;
        let peer1 = s1.peer_addr().ok();
        let _g1 = conns.admit(s1).unwrap();
        let mut g2 = conns.admit(s2).unwrap();
        // The first one streams; the second is idle and makes room for the third.
        let _stream = conns.stream_opened(peer1).unwrap();
        let _g3 = conns.admit(s3).unwrap();
        let mut buf = [0u8; 8];
        let e = g2.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted);
        drop(g2);
        let families = conns.families();
        assert_eq!(
            value(&families, "picket_aggregator_grpc_connections", None),
            2.0
        );
        assert_eq!(
            value(
                &families,
                "picket_aggregator_grpc_connections_closed_total",
                Some("evicted")
            ),
            1.0
        );
    }

    #[tokio::test]
    async fn a_connection_without_a_stream_times_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let conns = GrpcConnections::new(Limits {
            max_connections: 8,
            idle_connection_timeout: Duration::from_millis(200),
        });
        let (_client, server) = pair(&listener).await;
        let mut guarded = conns.admit(server).unwrap();
        let mut buf = [0u8; 8];
        let started = std::time::Instant::now();
        let e = guarded.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(5));
        drop(guarded);
        let families = conns.families();
        assert_eq!(
            value(
                &families,
                "picket_aggregator_grpc_connections_closed_total",
                Some("idle_timeout")
            ),
            1.0
        );
        assert_eq!(
            value(&families, "picket_aggregator_grpc_connections", None),
            0.0
        );
    }

    #[tokio::test]
    async fn every_connection_streaming_means_refusal() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let conns = GrpcConnections::new(Limits {
            max_connections: 1,
            idle_connection_timeout: Duration::from_secs(60),
        });
        let (_c1, s1) = pair(&listener).await;
        let (_c2, s2) = pair(&listener).await;
        let peer = s1.peer_addr().ok();
        let _g1 = conns.admit(s1).unwrap();
        let _stream = conns.stream_opened(peer).unwrap();
        assert!(conns.admit(s2).is_none());
        assert_eq!(conns.refused.load(Ordering::Relaxed), 1);
    }
}
