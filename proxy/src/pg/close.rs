//! Ending a client connection within a bound.
//!
//! Whatever ends a connection (normal end, refusal, cut, protocol error, deadline), the
//! proxy writes its last bytes (a FATAL), shuts the stream down (TLS `close_notify`, then
//! FIN) and waits for the client to close its side, all by one deadline. The kernel may hold
//! megabytes for a client that reads slowly, and a normal close would let it keep
//! delivering them for as long as the client takes; so when the deadline passes first, the
//! socket is reset (`SO_LINGER` 0): the kernel sends RST and discards what the client has
//! not read. Nothing reaches the client later than the deadline.
//!
//! Not covered: a client that half-closes its side and goes on reading still sees the rest of
//! the queue at its own pace (its FIN reads as "closed").

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::error::Elapsed;
use tokio::time::{timeout_at, Instant};
use tokio_rustls::server::TlsStream;

/// How long a connection the proxy ends may take to deliver its last bytes and see the client
/// close, counted from the moment the proxy decides to end it (for a cut: the cut).
pub const CLOSE_BOUND: Duration = Duration::from_secs(1);

/// A client stream and the TCP socket under it.
pub trait ClientStream: AsyncRead + AsyncWrite + Unpin {
    fn tcp(&self) -> &TcpStream;
}

impl ClientStream for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl ClientStream for TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

/// A stream whose last writes can leave as one segment.
pub trait LastWrites {
    /// From now on, holds written bytes back until the shutdown, so a FATAL, the TLS
    /// close_notify and the FIN leave as one TCP segment: a cut of 10,000 sessions sends
    /// 10,000 segments, not 30,000 (each of which also costs the receiving side on loopback).
    /// Call it only when nothing follows but the last message and the shutdown.
    fn hold_until_shutdown(&self);
}

impl LastWrites for TcpStream {
    fn hold_until_shutdown(&self) {
        // TCP_CORK: the kernel sends what is queued when it has a full segment, at the FIN
        // (which joins the queued data) or after 200 ms. Best effort: without it, the same
        // bytes go out in more segments.
        let _ = socket2::SockRef::from(self).set_tcp_cork(true);
    }
}

impl LastWrites for TlsStream<TcpStream> {
    fn hold_until_shutdown(&self) {
        self.get_ref().0.hold_until_shutdown();
    }
}

/// In-memory streams (tests, the replay) have no segments.
impl LastWrites for tokio::io::DuplexStream {
    fn hold_until_shutdown(&self) {}
}

/// Writes `last`, shuts `stream` down and waits for the client's EOF, by `by`; resets the
/// socket if that does not finish in time. Drop the stream afterwards.
pub async fn close<S: ClientStream>(stream: &mut S, last: &[u8], by: Instant) {
    let graceful = async {
        if !last.is_empty() {
            stream.write_all(last).await?;
        }
        // Flushes what is buffered, sends close_notify (TLS), then FIN.
        stream.shutdown().await?;
        until_eof(stream.tcp()).await
    };
    let done = timeout_at(by, graceful).await;
    reset_unless_closed(stream, done);
}

/// Waits for the client's EOF on a stream already shut down (a cut sends its FATAL,
/// close_notify and FIN first, before the session's teardown), by `by`; resets the socket if
/// the client has not closed by then.
pub async fn close_shut<S: ClientStream>(stream: &S, by: Instant) {
    let done = timeout_at(by, until_eof(stream.tcp())).await;
    reset_unless_closed(stream, done);
}

/// Resets the connection unless the graceful close `done` finished in time.
fn reset_unless_closed<S: ClientStream>(stream: &S, done: Result<io::Result<()>, Elapsed>) {
    match done {
        Ok(Ok(())) => return,
        Ok(Err(error)) => tracing::debug!(%error, "client gone before the close finished; connection reset"),
        Err(_) => tracing::debug!("client had not read to the end by the close deadline; connection reset"),
    }
    // Zero linger makes the close send RST and drop the send queue; it never blocks.
    let _ = stream.tcp().set_zero_linger();
}

/// Reads and discards what the client still sends until it closes its side.
async fn until_eof(tcp: &TcpStream) -> io::Result<()> {
    let mut buf = [0u8; 4096];
    loop {
        tcp.readable().await?;
        match tcp.try_read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}
