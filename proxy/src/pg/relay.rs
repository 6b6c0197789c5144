//! The relay: client messages go up a batch at a time, each batch forwarded only once the
//! records of the statements in it are written; server bytes come down as they arrive, with
//! message boundaries followed so the proxy can swap a sentinel's error, learn how each
//! statement ended, and cut a session between two server messages.
//!
//! Each direction is a small state machine with its own buffers: [`Upward`] (client to
//! server) and [`Downward`] (server to client). One task drives both from a single poll
//! function that also polls the cut signal, so a cut is noticed while either side is blocked
//! reading or writing.
//!
//! Client messages are framed by `messages::peek_frontend`: a type byte no client may send
//! after startup ends the session at once, before any length is trusted.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::BytesMut;
use jitgate_protocol::postgres::messages::peek_frontend;
use jitgate_protocol::postgres::scanner::{Piece, Scanner};
use jitgate_protocol::postgres::ProtocolError;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

use super::close::{LastWrites, CLOSE_BOUND};
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
    /// The relay already wrote its last bytes and shut the client stream down (a cut or a
    /// protocol error); the caller only waits for the client's EOF.
    pub shut_down: bool,
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

/// Bytes on their way to one side, written in as many calls as that side takes.
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

    /// Writes what is pending to `to`, then flushes it once everything is written. `Ok(true)`
    /// when a byte moved or the flush completed; `closed` is the step a failed write is.
    fn poll_drain<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        to: &mut W,
        closed: SessionEndReason,
        written: Option<&AtomicU64>,
    ) -> Result<bool, Step> {
        let mut progress = false;
        if !self.is_empty() {
            match Pin::new(&mut *to).poll_write(cx, self.pending()) {
                Poll::Ready(Ok(0)) => return Err(Step::Closed(closed)),
                Poll::Ready(Err(e)) => return Err(failed(closed, &e)),
                Poll::Ready(Ok(n)) => {
                    self.pos += n;
                    self.need_flush = true;
                    if let Some(written) = written {
                        written.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    progress = true;
                }
                Poll::Pending => {}
            }
        }
        if self.is_empty() && self.need_flush {
            match Pin::new(&mut *to).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.need_flush = false,
                Poll::Ready(Err(e)) => return Err(failed(closed, &e)),
                Poll::Pending => {}
            }
        }
        Ok(progress)
    }
}

/// What both halves of the relay use: the session, its statement tracker (fed client batches
/// by one half and server answers by the other), the audit log and the session's counters,
/// and one scratch buffer for reads (each read is consumed before the next).
struct Shared<'a> {
    session: &'a SessionHandle,
    tracker: &'a mut Tracker,
    audit: &'a AuditLog,
    metrics: &'a Metrics,
    counters: Counters<'a>,
    scratch: Box<[u8]>,
    /// Times the relay was polled: a batch waiting for its write since an earlier poll has
    /// let the other sessions run.
    polls: u64,
}

/// Client to server. Whole client messages are cut into a batch; the batch's records are
/// written (at once, or by the writer thread while the half waits for its ticket); then the
/// batch, or its fallback when the records could not be written, goes upstream. One batch is in
/// flight at a time, in order.
struct Upward {
    /// Client bytes not yet part of a batch.
    inbuf: BytesMut,
    /// A batch whose records are not written yet, and the poll of the relay it joined the
    /// audit log's waiting list in.
    waiting: Option<(AuditTicket, Batch, u64)>,
    /// The batch being written upstream.
    out: Out,
    max_message_bytes: usize,
}

impl Upward {
    fn new(initial: BytesMut, max_message_bytes: usize) -> Self {
        Self {
            inbuf: initial,
            waiting: None,
            out: Out::new(),
            max_message_bytes,
        }
    }

    /// One turn: resolves a written batch, reads or cuts the next one, writes upstream.
    /// `Ok(false)` when it can do nothing more until woken.
    fn poll_step<C, U>(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut C,
        upstream: &mut U,
        sh: &mut Shared<'_>,
    ) -> Result<bool, Step>
    where
        C: AsyncRead + Unpin,
        U: AsyncWrite + Unpin,
    {
        let mut progress = false;
        if let Some((ticket, _, joined)) = self.waiting.as_mut() {
            let mut result = Pin::new(&mut *ticket).poll(cx);
            if result.is_pending() && *joined < sh.polls {
                // The other sessions that were ready have run and added their records:
                // write them all, now, with one write.
                sh.audit.write_waiting();
                *joined = u64::MAX;
                result = Pin::new(&mut *ticket).poll(cx);
            }
            if let Poll::Ready(result) = result {
                if let Some((_, batch, _)) = self.waiting.take() {
                    let forward = result.is_ok();
                    self.out.set(sh.release(batch, forward));
                    progress = true;
                }
            }
        }
        if self.waiting.is_none() && self.out.is_empty() {
            progress |= self.next_batch(cx, client, sh)?;
        }
        progress |= self
            .out
            .poll_drain(cx, upstream, SessionEndReason::UpstreamClosed, None)?;
        Ok(progress)
    }

    /// Cuts the next batch from whole buffered messages, or reads more client bytes.
    fn next_batch<C: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut C,
        sh: &mut Shared<'_>,
    ) -> Result<bool, Step> {
        let n = complete_prefix(&self.inbuf, self.max_message_bytes).map_err(Step::BadFrame)?;
        if n == 0 {
            let mut rb = ReadBuf::new(&mut sh.scratch[..]);
            return match Pin::new(&mut *client).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if rb.filled().is_empty() => Err(Step::Closed(SessionEndReason::ClientClosed)),
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    sh.session.bytes_from_client.fetch_add(n as u64, Ordering::Relaxed);
                    self.inbuf.extend_from_slice(rb.filled());
                    Ok(true)
                }
                Poll::Ready(Err(_)) => Err(Step::Closed(SessionEndReason::ClientClosed)),
                Poll::Pending => Ok(false),
            };
        }
        let msgs = self.inbuf.split_to(n);
        let mut batch = sh.tracker.client_batch(&msgs).map_err(|_| Step::Malformed)?;
        for reason in &batch.denials {
            sh.counters.denial(reason, 1);
        }
        let statements = batch.classes.len() + batch.denials.len();
        if statements > 0 {
            sh.session.statements.fetch_add(statements as u64, Ordering::Relaxed);
        }
        if batch.records.is_empty() {
            self.out.set(batch.forward);
        } else {
            match sh.audit.write_in_group(std::mem::take(&mut batch.records)) {
                Ok(Written::Now) => self.out.set(sh.release(batch, true)),
                Ok(Written::Later(ticket)) => {
                    // Let the other ready sessions run first, so their records join this write.
                    cx.waker().wake_by_ref();
                    self.waiting = Some((ticket, batch, sh.polls));
                }
                Err(_) => self.out.set(sh.release(batch, false)),
            }
        }
        Ok(true)
    }
}

/// Server to client. Server bytes are followed message by message through the scanner: the
/// tracker learns how each statement ended and may swap a sentinel's error; finished
/// statements' records are written; the pre-expiry notice goes out between two messages.
struct Downward {
    scanner: Scanner,
    /// Inside a server message the tracker replaces: its bytes are not passed on.
    dropping: bool,
    /// The bytes being written to the client.
    out: Out,
    notice: Option<ExpiryNotice>,
    notice_due: Option<Deadline>,
}

impl Downward {
    fn new(notice: Option<ExpiryNotice>) -> Self {
        Self {
            scanner: Scanner::new(OBSERVED),
            dropping: false,
            out: Out::new(),
            notice,
            notice_due: None,
        }
    }

    /// Notes the pre-expiry notice when it comes due; sent at the next message boundary.
    fn poll_notice(&mut self, cx: &mut Context<'_>) {
        if let Some(n) = self.notice.as_mut() {
            // The cut future watches the deadline too, so a move wakes this task.
            if let Poll::Ready(d) = n.notice.poll_due(cx) {
                self.notice_due = Some(d);
            }
        }
    }

    /// One turn: the notice when due, a read from the server when nothing is pending, a write
    /// to the client. `Ok(false)` when it can do nothing more until woken.
    fn poll_step<C, U>(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut C,
        upstream: &mut U,
        sh: &mut Shared<'_>,
    ) -> Result<bool, Step>
    where
        C: AsyncWrite + Unpin,
        U: AsyncRead + Unpin,
    {
        let mut progress = false;
        if self.out.is_empty() && self.scanner.at_boundary() {
            if let (Some(d), Some(n)) = (self.notice_due.take(), self.notice.as_ref()) {
                self.out.set((n.render)(d));
                progress = true;
            }
        }
        if self.out.is_empty() {
            let mut rb = ReadBuf::new(&mut sh.scratch[..]);
            match Pin::new(&mut *upstream).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                    return Err(Step::Closed(SessionEndReason::UpstreamClosed))
                }
                Poll::Ready(Ok(())) => {
                    // The previous chunk is fully written: reuse its buffer.
                    self.out.bytes.clear();
                    self.out.pos = 0;
                    let chunk = rb.filled();
                    observe(
                        &mut self.scanner,
                        sh.tracker,
                        &mut self.dropping,
                        chunk,
                        &mut self.out.bytes,
                    )
                    .map_err(|_| Step::Closed(SessionEndReason::Error))?;
                    flush_ends(sh.tracker, sh.audit, sh.metrics);
                    if sh.tracker.unsafe_parameter().is_some() {
                        // Deliver what came, then end the session: later statements could not
                        // be read the way the server reads them.
                        return Err(Step::UnsafeSetting);
                    }
                    progress = true;
                }
                Poll::Ready(Err(e)) => return Err(failed(SessionEndReason::UpstreamClosed, &e)),
                Poll::Pending => {}
            }
        }
        let written = Some(&sh.session.bytes_to_client);
        progress |= self
            .out
            .poll_drain(cx, client, SessionEndReason::ClientClosed, written)?;
        Ok(progress)
    }

    /// The end of a relay the proxy ends: delivers what was already read from the server,
    /// reads and delivers the rest of the server message in flight (never past its end), then
    /// `last`, then shuts the client stream down (TLS close_notify, FIN).
    async fn finish<C, U>(
        &mut self,
        client: &mut C,
        upstream: &mut U,
        sh: &mut Shared<'_>,
        last: &[u8],
    ) -> io::Result<()>
    where
        C: AsyncWrite + LastWrites + Unpin,
        U: AsyncRead + Unpin,
    {
        client.hold_until_shutdown();
        let written = &sh.session.bytes_to_client;
        client.write_all(self.out.pending()).await?;
        written.fetch_add(self.out.pending().len() as u64, Ordering::Relaxed);
        self.out.pos = self.out.bytes.len();
        while !self.scanner.at_boundary() {
            let want = self.scanner.bytes_to_boundary().min(sh.scratch.len());
            let n = upstream.read(&mut sh.scratch[..want]).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.out.bytes.clear();
            self.out.pos = 0;
            observe(
                &mut self.scanner,
                sh.tracker,
                &mut self.dropping,
                &sh.scratch[..n],
                &mut self.out.bytes,
            )
            .map_err(io::Error::other)?;
            client.write_all(&self.out.bytes).await?;
            written.fetch_add(self.out.bytes.len() as u64, Ordering::Relaxed);
            self.out.pos = self.out.bytes.len();
        }
        client.write_all(last).await?;
        written.fetch_add(last.len() as u64, Ordering::Relaxed);
        // Flushes, then close_notify and FIN: the client learns of the end now, before the
        // session's teardown runs.
        client.shutdown().await
    }
}

impl Shared<'_> {
    /// The bytes to send upstream for a batch whose records were written (`forward`) or could
    /// not be (its fallback, which refuses every statement in it), counted either way.
    fn release(&mut self, batch: Batch, written: bool) -> Vec<u8> {
        if written {
            self.tracker.mark_forwarded(&batch);
            self.counters.forwarded(&batch);
            batch.forward
        } else {
            self.tracker.use_fallback(&batch);
            self.counters.unaudited(&batch);
            batch.fallback
        }
    }
}

/// Relays until a side closes or `cut` resolves; on a cut, completes the server message in
/// flight, sends `fatal(reason)` and shuts the client stream down, by the returned `close_by`.
/// The caller then waits for the client's EOF until `close_by`.
pub async fn relay<C, U, F>(
    client: &mut C,
    upstream: &mut U,
    cx: RelayContext<'_>,
    cut: F,
    fatal: impl Fn(SessionEndReason) -> Vec<u8>,
) -> Relayed
where
    C: AsyncRead + AsyncWrite + LastWrites + Unpin,
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
        notice,
    } = cx;
    let mut sh = Shared {
        session,
        tracker,
        audit,
        metrics,
        counters: Counters::new(metrics, target),
        scratch: vec![0u8; BUF].into_boxed_slice(),
        polls: 0,
    };
    let mut upward = Upward::new(initial, max_message_bytes);
    let mut downward = Downward::new(notice);
    let mut cut = std::pin::pin!(cut);

    let step = poll_fn(|cx: &mut Context<'_>| {
        sh.polls += 1;
        if let Poll::Ready(reason) = cut.as_mut().poll(cx) {
            return Poll::Ready(Step::Cut(reason));
        }
        downward.poll_notice(cx);
        for _ in 0..BUDGET {
            let up = match upward.poll_step(cx, client, upstream, &mut sh) {
                Ok(progress) => progress,
                Err(step) => return Poll::Ready(step),
            };
            let down = match downward.poll_step(cx, client, upstream, &mut sh) {
                Ok(progress) => progress,
                Err(step) => return Poll::Ready(step),
            };
            if !(up || down) {
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
        Step::Closed(reason) => (RelayEnd::Closed(reason), None),
        Step::Lost => (
            RelayEnd::Closed(SessionEndReason::AgentLost),
            Some(fatal(SessionEndReason::AgentLost)),
        ),
        Step::BadFrame(e) => (RelayEnd::ProtocolViolation, Some(protocol_fatal(&frame_error(&e)))),
        Step::Malformed => (
            RelayEnd::ProtocolViolation,
            Some(protocol_fatal("jitgate: malformed message")),
        ),
        Step::UnsafeSetting => {
            let message = format!(
                "jitgate: the server now reports {}; the session ends because its statements could no longer be audited reliably",
                sh.tracker.unsafe_parameter().unwrap_or("an unsafe setting")
            );
            (RelayEnd::ProtocolViolation, Some(protocol_fatal(&message)))
        }
        Step::Cut(reason) => (
            RelayEnd::Cut {
                reason,
                in_flight: true,
            },
            Some(fatal(reason)),
        ),
    };
    let shut_down = match last {
        Some(last) => {
            let finish = downward.finish(client, upstream, &mut sh, &last);
            matches!(tokio::time::timeout_at(close_by, finish).await, Ok(Ok(())))
        }
        None => false,
    };
    let end = match end {
        RelayEnd::Cut { reason, .. } => RelayEnd::Cut {
            reason,
            in_flight: sh.tracker.awaiting_answers(),
        },
        other => other,
    };
    sh.tracker.abandon();
    flush_ends(sh.tracker, audit, metrics);
    Relayed {
        end,
        close_by,
        shut_down,
    }
}

/// How an I/O error ends the session: a lost agent link is told to the client, anything else
/// ends it as `closed`.
fn failed(closed: SessionEndReason, e: &io::Error) -> Step {
    if jitgate_protocol::tunnel::link_lost(e).is_some() {
        Step::Lost
    } else {
        Step::Closed(closed)
    }
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

/// Why the relay loop stopped.
enum Step {
    /// The proxy cut the session.
    Cut(SessionEndReason),
    /// The link to the target's agent failed: the client is told so, at a message boundary.
    Lost,
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
        audit.defer(ends);
    }
}

#[cfg(test)]
mod tests;
