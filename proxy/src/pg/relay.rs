//! The relay: bytes both ways as they come, with the target's message boundaries followed so
//! the proxy can cut a session between two server messages and say why.
//!
//! One task drives both directions from a single poll function that also polls the cut
//! signal, so a cut is noticed while either side is blocked reading or writing.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Duration;

use jitgate_protocol::postgres::frame::FrameTracker;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::audit::SessionEndReason;
use crate::sessions::SessionHandle;

/// Buffer per direction. Memory per session is bounded by these two buffers.
const BUF: usize = 8 * 1024;
/// How long a cut waits to finish the server message in flight and deliver the FATAL.
const CUT_FLUSH: Duration = Duration::from_secs(1);

/// How the relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    /// Ended by a side closing or failing.
    Closed(SessionEndReason),
    /// Cut by the proxy; the client has been told why (best effort).
    Cut(SessionEndReason),
}

struct Half {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    need_flush: bool,
}

impl Half {
    fn new() -> Self {
        Self {
            buf: vec![0; BUF].into_boxed_slice(),
            start: 0,
            end: 0,
            need_flush: false,
        }
    }
    fn is_empty(&self) -> bool {
        self.start == self.end
    }
    fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }
}

/// Iterations of the copy loop before yielding to other tasks.
const BUDGET: usize = 32;

/// Relays until a side closes or `cut` resolves; on a cut, completes the server message in
/// flight, sends `fatal(reason)` to the client and returns.
pub async fn relay<C, U, F>(
    client: &mut C,
    upstream: &mut U,
    session: &SessionHandle,
    cut: F,
    fatal: impl Fn(SessionEndReason) -> Vec<u8>,
) -> RelayEnd
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
    F: Future<Output = SessionEndReason>,
{
    let mut up = Half::new(); // client -> upstream
    let mut down = Half::new(); // upstream -> client
    let mut frames = FrameTracker::new();
    let mut cut = std::pin::pin!(cut);
    let step = poll_fn(|cx| {
        if let Poll::Ready(reason) = cut.as_mut().poll(cx) {
            return Poll::Ready(Err(reason));
        }
        for _ in 0..BUDGET {
            let mut progress = false;
            // client -> upstream
            if up.is_empty() {
                let mut rb = ReadBuf::new(&mut up.buf[..]);
                match Pin::new(&mut *client).poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        if n == 0 {
                            return Poll::Ready(Ok(SessionEndReason::ClientClosed));
                        }
                        up.start = 0;
                        up.end = n;
                        session.bytes_from_client.fetch_add(n as u64, Ordering::Relaxed);
                        progress = true;
                    }
                    Poll::Ready(Err(_)) => return Poll::Ready(Ok(SessionEndReason::ClientClosed)),
                    Poll::Pending => {}
                }
            }
            if !up.is_empty() {
                match Pin::new(&mut *upstream).poll_write(cx, up.pending()) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                        return Poll::Ready(Ok(SessionEndReason::UpstreamClosed))
                    }
                    Poll::Ready(Ok(n)) => {
                        up.start += n;
                        up.need_flush = true;
                        progress = true;
                    }
                    Poll::Pending => {}
                }
            }
            if up.is_empty() && up.need_flush {
                match Pin::new(&mut *upstream).poll_flush(cx) {
                    Poll::Ready(Ok(())) => up.need_flush = false,
                    Poll::Ready(Err(_)) => return Poll::Ready(Ok(SessionEndReason::UpstreamClosed)),
                    Poll::Pending => {}
                }
            }
            // upstream -> client
            if down.is_empty() {
                let mut rb = ReadBuf::new(&mut down.buf[..]);
                match Pin::new(&mut *upstream).poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        if n == 0 {
                            return Poll::Ready(Ok(SessionEndReason::UpstreamClosed));
                        }
                        if frames.observe(&down.buf[..n]).is_err() {
                            return Poll::Ready(Ok(SessionEndReason::Error));
                        }
                        down.start = 0;
                        down.end = n;
                        progress = true;
                    }
                    Poll::Ready(Err(_)) => return Poll::Ready(Ok(SessionEndReason::UpstreamClosed)),
                    Poll::Pending => {}
                }
            }
            if !down.is_empty() {
                match Pin::new(&mut *client).poll_write(cx, down.pending()) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Ok(SessionEndReason::ClientClosed)),
                    Poll::Ready(Ok(n)) => {
                        down.start += n;
                        down.need_flush = true;
                        session.bytes_to_client.fetch_add(n as u64, Ordering::Relaxed);
                        progress = true;
                    }
                    Poll::Pending => {}
                }
            }
            if down.is_empty() && down.need_flush {
                match Pin::new(&mut *client).poll_flush(cx) {
                    Poll::Ready(Ok(())) => down.need_flush = false,
                    Poll::Ready(Err(_)) => return Poll::Ready(Ok(SessionEndReason::ClientClosed)),
                    Poll::Pending => {}
                }
            }
            if !progress {
                return Poll::Pending;
            }
        }
        // Busy stream: let other sessions run, then continue.
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await;
    match step {
        Ok(reason) => RelayEnd::Closed(reason),
        Err(reason) => {
            let msg = fatal(reason);
            let _ = tokio::time::timeout(
                CUT_FLUSH,
                finish(client, upstream, &mut down, &mut frames, session, &msg),
            )
            .await;
            RelayEnd::Cut(reason)
        }
    }
}

/// Delivers what was already read from the target, reads and delivers the rest of the server
/// message in flight (never past its end), then the FATAL message.
async fn finish<C, U>(
    client: &mut C,
    upstream: &mut U,
    down: &mut Half,
    frames: &mut FrameTracker,
    session: &SessionHandle,
    fatal: &[u8],
) -> std::io::Result<()>
where
    C: AsyncWrite + Unpin,
    U: AsyncRead + Unpin,
{
    client.write_all(down.pending()).await?;
    session
        .bytes_to_client
        .fetch_add(down.pending().len() as u64, Ordering::Relaxed);
    down.start = down.end;
    while !frames.at_boundary() {
        let want = frames.bytes_to_boundary().min(down.buf.len());
        let n = upstream.read(&mut down.buf[..want]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        frames.observe(&down.buf[..n]).map_err(std::io::Error::other)?;
        client.write_all(&down.buf[..n]).await?;
        session.bytes_to_client.fetch_add(n as u64, Ordering::Relaxed);
    }
    client.write_all(fatal).await?;
    session.bytes_to_client.fetch_add(fatal.len() as u64, Ordering::Relaxed);
    client.flush().await?;
    client.shutdown().await
}
