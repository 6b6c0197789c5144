//! The relay: client messages go up a batch at a time, each batch forwarded only once the
//! records of the statements in it are written; server bytes come down as they arrive, with
//! message boundaries followed so the proxy can swap a sentinel's error, learn how each
//! statement ended, and cut a session between two server messages.
//!
//! One task drives both directions from a single poll function that also polls the cut signal,
//! so a cut is noticed while either side is blocked reading or writing.
//!
//! Client messages are framed by `messages::peek_frontend`: a type byte no client may send
//! after startup ends the session at once, before any length is trusted.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use bytes::BytesMut;
use jitgate_protocol::postgres::messages::peek_frontend;
use jitgate_protocol::postgres::scanner::{Piece, Scanner};
use jitgate_protocol::postgres::ProtocolError;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

use super::close::CLOSE_BOUND;
use super::statements::{Batch, Disposition, Tracker};
use crate::access::Notice;
use crate::audit::{AuditLog, AuditTicket, SessionEndReason, Written};
use crate::metrics::Metrics;
use crate::model::Deadline;
use crate::sessions::SessionHandle;
use prometheus::IntCounter;

/// Read size per direction.
const BUF: usize = 8 * 1024;
/// Iterations of the copy loop before yielding to other tasks.
const BUDGET: usize = 32;
/// Server messages whose bodies the tracker reads.
const OBSERVED: &[u8] = b"CES";

/// How the relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    /// Ended by a side closing or failing.
    Closed(SessionEndReason),
    /// Cut by the proxy; the client has been told why (best effort). `in_flight`: the server
    /// had not answered everything sent to it, so a statement may still be running there.
    Cut { reason: SessionEndReason, in_flight: bool },
    /// The client broke the protocol; it has been told.
    ProtocolViolation,
}

/// How the relay ended, and by when the client connection must be closed: [`CLOSE_BOUND`]
/// after the relay decided to end it. A cut's last server message and FATAL count against
/// the same bound as the close that follows.
pub struct Relayed {
    pub end: RelayEnd,
    pub close_by: Instant,
}

/// What the relay needs besides the two streams.
pub struct RelayContext<'a> {
    pub session: &'a SessionHandle,
    pub tracker: &'a mut Tracker,
    pub audit: &'a AuditLog,
    pub metrics: &'a Metrics,
    pub target: &'a str,
    pub max_message_bytes: usize,
    /// Client bytes already read (pipelined behind the startup message).
    pub initial: BytesMut,
    /// A NOTICE to send a while before the grant ends.
    pub notice: Option<ExpiryNotice>,
}

/// The NOTICE a session gets when the lease's pre-expiry notice comes due.
pub struct ExpiryNotice {
    pub notice: Notice,
    /// The NoticeResponse bytes for a deadline.
    pub render: Box<dyn Fn(Deadline) -> Vec<u8> + Send + Sync>,
}

struct Out {
    bytes: Vec<u8>,
    pos: usize,
    need_flush: bool,
}

impl Out {
    fn new() -> Self {
        Self {
            bytes: Vec::new(),
            pos: 0,
            need_flush: false,
        }
    }
    fn is_empty(&self) -> bool {
        self.pos == self.bytes.len()
    }
    fn pending(&self) -> &[u8] {
        &self.bytes[self.pos..]
    }
    fn set(&mut self, bytes: Vec<u8>) {
        self.bytes = bytes;
        self.pos = 0;
    }
}

/// Relays until a side closes or `cut` resolves; on a cut, completes the server message in
/// flight and sends `fatal(reason)` to the client, by the returned `close_by`. The caller
/// closes the client connection by then.
pub async fn relay<C, U, F>(
    client: &mut C,
    upstream: &mut U,
    cx: RelayContext<'_>,
    cut: F,
    fatal: impl Fn(SessionEndReason) -> Vec<u8>,
) -> Relayed
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
    F: Future<Output = SessionEndReason>,
{
    let RelayContext {
        session,
        tracker,
        audit,
        metrics,
        target,
        max_message_bytes,
        initial,
        mut notice,
    } = cx;
    let mut notice_due: Option<Deadline> = None;
    let mut inbuf = initial;
    let mut readbuf = vec![0u8; BUF].into_boxed_slice();
    let mut up = Out::new();
    let mut waiting: Option<(AuditTicket, Batch)> = None;
    let mut down = Out::new();
    let mut scanner = Scanner::new(OBSERVED);
    let mut dropping = false;
    let mut cut = std::pin::pin!(cut);
    let mut counters = Counters::new(metrics, target);

    let step = poll_fn(|cx: &mut Context<'_>| {
        if let Poll::Ready(reason) = cut.as_mut().poll(cx) {
            return Poll::Ready(Err(reason));
        }
        if let Some(n) = notice.as_mut() {
            // The cut future watches the deadline too, so a move wakes this task.
            if let Poll::Ready(d) = n.notice.poll_due(cx) {
                notice_due = Some(d);
            }
        }
        for _ in 0..BUDGET {
            let mut progress = false;

            // Client -> upstream: one batch in flight at a time, in order.
            if let Some((ticket, _)) = waiting.as_mut() {
                if let Poll::Ready(result) = Pin::new(ticket).poll(cx) {
                    if let Some((_, batch)) = waiting.take() {
                        let bytes = match result {
                            Ok(()) => {
                                tracker.mark_forwarded(&batch);
                                counters.forwarded(&batch);
                                batch.forward
                            }
                            Err(_) => {
                                tracker.use_fallback(&batch);
                                counters.unaudited(&batch);
                                batch.fallback
                            }
                        };
                        up.set(bytes);
                        progress = true;
                    }
                }
            }
            if waiting.is_none() && up.is_empty() {
                match complete_prefix(&inbuf, max_message_bytes) {
                    Err(e) => return Poll::Ready(Ok(Step::BadFrame(e))),
                    Ok(0) => {
                        let mut rb = ReadBuf::new(&mut readbuf[..]);
                        match Pin::new(&mut *client).poll_read(cx, &mut rb) {
                            Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                                return Poll::Ready(Ok(Step::Closed(SessionEndReason::ClientClosed)))
                            }
                            Poll::Ready(Ok(())) => {
                                let n = rb.filled().len();
                                session.bytes_from_client.fetch_add(n as u64, Ordering::Relaxed);
                                inbuf.extend_from_slice(rb.filled());
                                progress = true;
                            }
                            Poll::Ready(Err(_)) => {
                                return Poll::Ready(Ok(Step::Closed(SessionEndReason::ClientClosed)))
                            }
                            Poll::Pending => {}
                        }
                    }
                    Ok(n) => {
                        let msgs = inbuf.split_to(n);
                        let mut batch = match tracker.client_batch(&msgs) {
                            Ok(b) => b,
                            Err(_) => return Poll::Ready(Ok(Step::Malformed)),
                        };
                        for reason in &batch.denials {
                            counters.denial(reason, 1);
                        }
                        if batch.records.is_empty() {
                            up.set(batch.forward);
                        } else {
                            match audit.write_or_enqueue(std::mem::take(&mut batch.records)) {
                                Ok(Written::Now) => {
                                    tracker.mark_forwarded(&batch);
                                    counters.forwarded(&batch);
                                    up.set(batch.forward);
                                }
                                Ok(Written::Later(ticket)) => waiting = Some((ticket, batch)),
                                Err(_) => {
                                    tracker.use_fallback(&batch);
                                    counters.unaudited(&batch);
                                    up.set(batch.fallback);
                                }
                            }
                        }
                        progress = true;
                    }
                }
            }
            if !up.is_empty() {
                match Pin::new(&mut *upstream).poll_write(cx, up.pending()) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                        return Poll::Ready(Ok(Step::Closed(SessionEndReason::UpstreamClosed)))
                    }
                    Poll::Ready(Ok(n)) => {
                        up.pos += n;
                        up.need_flush = true;
                        progress = true;
                    }
                    Poll::Pending => {}
                }
            }
            if up.is_empty() && up.need_flush {
                match Pin::new(&mut *upstream).poll_flush(cx) {
                    Poll::Ready(Ok(())) => up.need_flush = false,
                    Poll::Ready(Err(_)) => return Poll::Ready(Ok(Step::Closed(SessionEndReason::UpstreamClosed))),
                    Poll::Pending => {}
                }
            }

            // The expiry notice goes out between two server messages.
            if down.is_empty() && scanner.at_boundary() {
                if let (Some(d), Some(n)) = (notice_due.take(), notice.as_ref()) {
                    down.set((n.render)(d));
                    progress = true;
                }
            }
            // Upstream -> client: observed, passed through, a sentinel's error swapped.
            if down.is_empty() {
                let mut rb = ReadBuf::new(&mut readbuf[..]);
                match Pin::new(&mut *upstream).poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                        return Poll::Ready(Ok(Step::Closed(SessionEndReason::UpstreamClosed)))
                    }
                    Poll::Ready(Ok(())) => {
                        // The previous chunk is fully written: reuse its buffer.
                        down.bytes.clear();
                        down.pos = 0;
                        if observe(&mut scanner, tracker, &mut dropping, rb.filled(), &mut down.bytes).is_err() {
                            return Poll::Ready(Ok(Step::Closed(SessionEndReason::Error)));
                        }
                        flush_ends(tracker, audit, metrics);
                        if tracker.unsafe_parameter().is_some() {
                            // Deliver what came, then end the session: later statements could
                            // not be read the way the server reads them.
                            return Poll::Ready(Ok(Step::UnsafeSetting));
                        }
                        progress = true;
                    }
                    Poll::Ready(Err(_)) => return Poll::Ready(Ok(Step::Closed(SessionEndReason::UpstreamClosed))),
                    Poll::Pending => {}
                }
            }
            if !down.is_empty() {
                match Pin::new(&mut *client).poll_write(cx, down.pending()) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                        return Poll::Ready(Ok(Step::Closed(SessionEndReason::ClientClosed)))
                    }
                    Poll::Ready(Ok(n)) => {
                        down.pos += n;
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
                    Poll::Ready(Err(_)) => return Poll::Ready(Ok(Step::Closed(SessionEndReason::ClientClosed))),
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

    let close_by = Instant::now() + CLOSE_BOUND;
    let (end, last) = match step {
        Ok(Step::Closed(reason)) => (RelayEnd::Closed(reason), None),
        Ok(Step::BadFrame(e)) => (RelayEnd::ProtocolViolation, Some(protocol_fatal(&frame_error(&e)))),
        Ok(Step::Malformed) => (
            RelayEnd::ProtocolViolation,
            Some(protocol_fatal("jitgate: malformed message")),
        ),
        Ok(Step::UnsafeSetting) => {
            let message = format!(
                "jitgate: the server now reports {}; the session ends because its statements could no longer be audited reliably",
                tracker.unsafe_parameter().unwrap_or("an unsafe setting")
            );
            (RelayEnd::ProtocolViolation, Some(protocol_fatal(&message)))
        }
        Err(reason) => (
            RelayEnd::Cut {
                reason,
                in_flight: true,
            },
            Some(fatal(reason)),
        ),
    };
    if let Some(last) = last {
        let flush = finish(
            client,
            upstream,
            &mut down,
            &mut scanner,
            tracker,
            &mut dropping,
            session,
            &last,
        );
        let _ = tokio::time::timeout_at(close_by, flush).await;
    }
    let end = match end {
        RelayEnd::Cut { reason, .. } => RelayEnd::Cut {
            reason,
            in_flight: tracker.awaiting_answers(),
        },
        other => other,
    };
    tracker.abandon();
    flush_ends(tracker, audit, metrics);
    Relayed { end, close_by }
}

/// What the client is told about a message the relay cannot frame.
fn frame_error(e: &ProtocolError) -> String {
    match e {
        ProtocolError::TooLong { max, .. } => format!("jitgate: message larger than {max} bytes"),
        ProtocolError::UnknownType(t) => format!("jitgate: invalid frontend message type {t}"),
        ProtocolError::TooShort { len, min } => {
            format!("jitgate: malformed message: length {len} is below {min}")
        }
        other => format!("jitgate: malformed message: {other}"),
    }
}

/// A FATAL for a session the proxy ends on its own account (08P01).
fn protocol_fatal(message: &str) -> Vec<u8> {
    use jitgate_protocol::postgres::backend::{error_response, Report, Severity};
    error_response(
        Severity::Fatal,
        &Report {
            sqlstate: "08P01",
            message,
            detail: None,
            hint: None,
        },
    )
}

enum Step {
    Closed(SessionEndReason),
    UnsafeSetting,
    /// A client message that cannot be framed: unknown type, length below 4 or above the
    /// maximum.
    BadFrame(ProtocolError),
    Malformed,
}

/// A session's statement counters, each label set resolved once per session rather than on
/// every batch (a session sees a handful of classes and reasons, so a short list is enough).
struct Counters<'a> {
    metrics: &'a Metrics,
    target: &'a str,
    statements: Vec<(&'static str, IntCounter)>,
    denials: Vec<(&'static str, IntCounter)>,
}

impl<'a> Counters<'a> {
    fn new(metrics: &'a Metrics, target: &'a str) -> Self {
        Self {
            metrics,
            target,
            statements: Vec::new(),
            denials: Vec::new(),
        }
    }

    fn forwarded(&mut self, batch: &Batch) {
        for &class in &batch.classes {
            let (metrics, target) = (self.metrics, self.target);
            resolved(&mut self.statements, class, || {
                metrics.statements_total.with_label_values(&[target, class])
            })
            .inc();
        }
    }

    fn denial(&mut self, reason: &'static str, n: u64) {
        let metrics = self.metrics;
        resolved(&mut self.denials, reason, || {
            metrics.statement_denials_total.with_label_values(&[reason])
        })
        .inc_by(n);
    }

    /// Every statement of a batch whose records could not be written is refused.
    fn unaudited(&mut self, batch: &Batch) {
        let refused = batch.classes.len() as u64;
        self.denial("audit_unavailable", refused.max(1));
    }
}

/// The counter for `key` in `cache`, resolved with `make` the first time.
fn resolved<'c>(
    cache: &'c mut Vec<(&'static str, IntCounter)>,
    key: &'static str,
    make: impl FnOnce() -> IntCounter,
) -> &'c IntCounter {
    let at = match cache.iter().position(|(k, _)| *k == key) {
        Some(at) => at,
        None => {
            cache.push((key, make()));
            cache.len() - 1
        }
    };
    &cache[at].1
}

/// Length of the longest prefix of whole messages in `buf`; `Err` when a message has a type
/// no client may send, or announces fewer than 4 or more than `max` bytes.
fn complete_prefix(buf: &[u8], max: usize) -> Result<usize, ProtocolError> {
    let mut at = 0;
    while let Some((_, len)) = peek_frontend(&buf[at..], max)? {
        if buf.len() - at < len {
            break;
        }
        at += len;
    }
    Ok(at)
}

/// Feeds server bytes through the scanner and tracker into `out`.
fn observe(
    scanner: &mut Scanner,
    tracker: &mut Tracker,
    dropping: &mut bool,
    chunk: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), jitgate_protocol::postgres::ProtocolError> {
    scanner.feed(chunk, |piece| match piece {
        Piece::Start { tag, len } => *dropping = tracker.backend_start(tag, len) == Disposition::Replace,
        Piece::Bytes(b) => {
            if !*dropping {
                out.extend_from_slice(b);
            }
        }
        Piece::End { tag, body } => {
            if let Some(replacement) = tracker.backend_end(tag, body) {
                out.extend_from_slice(&replacement);
            }
            *dropping = false;
        }
    })
}

/// Writes finished statements' records without waiting for them (the statements already ran;
/// their `statement` records were written before they were forwarded).
fn flush_ends(tracker: &mut Tracker, audit: &AuditLog, metrics: &Metrics) {
    for d in tracker.take_durations() {
        metrics.statement_duration_seconds.observe(d);
    }
    let ends = tracker.take_ends();
    if !ends.is_empty() {
        // A full queue is counted by the audit log; the statement already ran.
        let _ = audit.write_or_enqueue(ends);
    }
}

/// Delivers what was already read from the target, reads and delivers the rest of the server
/// message in flight (never past its end), then `last`.
#[allow(clippy::too_many_arguments)]
async fn finish<C, U>(
    client: &mut C,
    upstream: &mut U,
    down: &mut Out,
    scanner: &mut Scanner,
    tracker: &mut Tracker,
    dropping: &mut bool,
    session: &SessionHandle,
    last: &[u8],
) -> std::io::Result<()>
where
    C: AsyncWrite + Unpin,
    U: AsyncRead + Unpin,
{
    client.write_all(down.pending()).await?;
    session
        .bytes_to_client
        .fetch_add(down.pending().len() as u64, Ordering::Relaxed);
    down.pos = down.bytes.len();
    let mut buf = vec![0u8; BUF];
    while !scanner.at_boundary() {
        let want = scanner.bytes_to_boundary().min(buf.len());
        let n = upstream.read(&mut buf[..want]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let mut out = Vec::with_capacity(n);
        observe(scanner, tracker, dropping, &buf[..n], &mut out).map_err(std::io::Error::other)?;
        client.write_all(&out).await?;
        session.bytes_to_client.fetch_add(out.len() as u64, Ordering::Relaxed);
    }
    client.write_all(last).await?;
    session.bytes_to_client.fetch_add(last.len() as u64, Ordering::Relaxed);
    client.flush().await
}

#[cfg(test)]
mod tests {
    use super::{complete_prefix, frame_error};
    use jitgate_protocol::postgres::ProtocolError;

    #[test]
    fn complete_prefix_stops_at_partial_messages_and_refuses_bad_frames() {
        let mut b = b"Q\0\0\0\x09abcd\0".to_vec();
        assert_eq!(complete_prefix(&b, 1024), Ok(10));
        b.extend_from_slice(b"S\0\0");
        assert_eq!(complete_prefix(&b, 1024), Ok(10));
        assert!(matches!(
            complete_prefix(b"Q\x7f\0\0\0", 1024),
            Err(ProtocolError::TooLong { .. })
        ));
        // Behind a whole message, a second StartupMessage is refused by its first byte.
        let mut b = b"S\0\0\0\x04".to_vec();
        b.push(0);
        assert_eq!(complete_prefix(&b, 1024), Err(ProtocolError::UnknownType(0)));
        assert_eq!(
            frame_error(&ProtocolError::UnknownType(0)),
            "jitgate: invalid frontend message type 0"
        );
    }
}
