//! The gRPC listeners' accept loop: a cap on connections held at once, TCP
//! keepalive, a deadline for a new connection's opening bytes, and a
//! back-off when accepting fails (at the open-file limit `accept` fails at
//! once, every time: retrying at once spins a core and starves the calls
//! already connected).

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::Stream;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Sleep,
};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Bytes a connection must send before its handshake deadline: the HTTP/2
/// preface (24) and a SETTINGS frame header (9); with TLS, at least a
/// ClientHello's worth comes first, which is more.
const OPENING_BYTES: u64 = 24 + 9;

/// How a listener treats its connections.
#[derive(Debug, Clone, Copy)]
pub struct ListenerLimits {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    /// `None`: TCP keepalive off.
    pub tcp_keepalive: Option<Duration>,
    /// Connection age plus its grace: past it the connection is cut, calls
    /// on it or not (`None`: never). The GOAWAY at the age itself is tonic's.
    pub lifetime: Option<Duration>,
}

/// Accepted connections, as tonic's `serve_with_incoming` takes them.
pub fn incoming(
    listener: TcpListener,
    limits: ListenerLimits,
) -> impl Stream<Item = io::Result<Connection>> + Send + 'static {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    futures::stream::unfold(
        (listener, slots, Duration::ZERO),
        move |(listener, slots, mut backoff)| async move {
            let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                return None;
            };
            loop {
                match listener.accept().await {
                    Ok((stream, peer)) => {
                        let connection = Connection::new(stream, peer, slot, &limits);
                        return Some((Ok(connection), (listener, slots, Duration::ZERO)));
                    }
                    Err(err) if is_per_connection(&err) => continue,
                    Err(err) => {
                        // Out of descriptors or memory: wait, doubling up
                        // to a second, so calls in flight can finish and
                        // free some.
                        backoff =
                            (backoff * 2).clamp(Duration::from_millis(5), Duration::from_secs(1));
                        crate::metrics::decision("accept", "backoff");
                        if let Some(left_out) = ACCEPT_ERRORS.admit() {
                            tracing::warn!(error = %err, ?backoff, left_out, "accept failed; backing off");
                        }
                        tokio::time::sleep(backoff).await;
                    }
                }
            }
        },
    )
}

static ACCEPT_ERRORS: crate::telemetry::Sampled = crate::telemetry::Sampled::new();

/// Errors that concern only the connection being accepted (it was reset
/// before we took it): take the next one at once.
fn is_per_connection(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// One accepted connection: holds its slot until dropped, and fails its
/// reads if the opening bytes do not arrive in time.
pub struct Connection {
    stream: TcpStream,
    info: TcpConnectInfo,
    _slot: OwnedSemaphorePermit,
    /// Until the opening bytes are read.
    opening: Option<Pin<Box<Sleep>>>,
    read: u64,
    /// When the connection is cut.
    ends: Option<Pin<Box<Sleep>>>,
}

impl Connection {
    fn new(
        stream: TcpStream,
        peer: SocketAddr,
        slot: OwnedSemaphorePermit,
        limits: &ListenerLimits,
    ) -> Self {
        let _ = stream.set_nodelay(true);
        if let Some(idle) = limits.tcp_keepalive {
            let keepalive = socket2::TcpKeepalive::new()
                .with_time(idle)
                .with_interval(idle / 4);
            let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
        }
        let info = TcpConnectInfo {
            local_addr: stream.local_addr().ok(),
            remote_addr: Some(peer),
        };
        Self {
            stream,
            info,
            _slot: slot,
            opening: Some(Box::pin(tokio::time::sleep(limits.handshake_timeout))),
            read: 0,
            ends: limits
                .lifetime
                .map(|life| Box::pin(tokio::time::sleep(life))),
        }
    }
}

impl Connected for Connection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(ends) = &mut this.ends {
            if ends.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connection older than server.max_connection_age_ms plus its grace",
                )));
            }
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        if let Some(deadline) = &mut this.opening {
            this.read += (buf.filled().len() - before) as u64;
            if this.read >= OPENING_BYTES {
                this.opening = None;
            } else if polled.is_pending() && deadline.as_mut().poll(cx).is_ready() {
                crate::metrics::decision("accept", "handshake_timeout");
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connection sent no opening bytes in time",
                )));
            }
        }
        polled
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
