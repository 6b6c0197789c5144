//! The writer. Records are chained and appended under one lock (the [`Core`]: the file and the
//! chain's tip), by whichever thread holds it:
//!
//! - [`AuditLog::write_or_enqueue`], the relay's path: when the lock is free and the log is a
//!   healthy regular file, the caller chains and writes its records itself (one `write` to
//!   the page cache, no thread hand-off); otherwise (another writer, an `fsync`, a pipe or
//!   device, a failed file) the records are queued and a ticket resolves when they are
//!   written, so a session task never waits on the lock.
//!   When another thread holds the lock, the records join the [`Waiting`] list and the
//!   holder writes them with its own before it lets go (group commit: one `write` for
//!   everyone's records); the caller's ticket resolves then.
//! - [`AuditLog::defer`], for records of what already happened (`statement.end`): they join
//!   the waiting list without a write of their own and go out with the next append, whoever
//!   makes it, or with the writer thread's next look at the list, [`DEFER_TICK`] at most.
//! - The writer thread takes queued submissions in batches, chains the waiting records and
//!   theirs, writes each batch with one `write`, then acknowledges every submitter.
//!
//! `fsync` runs on the writer thread on a timer (`audit.fsync_interval`), at rotation and at
//! shutdown, never per batch and never on a session task: records that would rotate the file
//! go through the queue. The periodic `fsync` runs with the lock released (on a second handle
//! of the file), so statements keep appending meanwhile. With `fsync_interval = 0s` (sync
//! after every batch) everything goes through the writer thread.
//!
//! Whoever appends checks, before acknowledging, that the path still names the file written
//! to ([`ActiveFile::append`]). When it does not (renamed, removed or truncated from
//! outside), the batch fails, the log is reopened at the path at once and the chain goes on
//! there, its first record an `audit.reopened` event with the reason; seq and prev carry
//! over. [`AuditLog::reopen`] does the same on request (SIGHUP, `jitgate audit reopen`).
//! The chain's tip is also kept in the tip file ([`super::tip`]), so a restart continues it
//! whatever happened to the files.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::oneshot;

use super::active::{self, ActiveFile, AppendError, Ident};
use super::chain;
use super::event::{encode_record, record_head, AuditEvent, ReopenReason};
use super::tip::{Tip, TipFile};
use super::{replica, siblings, AuditError};
use crate::config::AuditConfig;
use crate::metrics::Metrics;
use crate::model::UserName;

/// Most records the writer puts in one batch.
const MAX_BATCH_RECORDS: usize = 4096;
/// Most bytes in one batch (also capped at `max_file_bytes`, so rotation stays close to it).
const MAX_BATCH_BYTES: usize = 4 << 20;
/// Bytes the chain fields add to a record: `{"seq":N,"prev":"..",` and `,"hash":".."}\n`.
const CHAIN_BYTES: usize = 180;
/// How often the writer thread looks at the waiting list while records are deferred: the
/// longest a deferred record waits for its write when no other append comes.
pub const DEFER_TICK: Duration = Duration::from_millis(5);
/// Looks at an empty list before the writer thread stops looking (until the next deferral).
const IDLE_TICKS: u32 = 200;
/// Times a caller that just wrote helps with records queued meanwhile before leaving the rest
/// to the next holder or the writer thread.
const HELPS: usize = 4;

/// The audit log. Cheap to share (`Arc`); dropping the last handle, or [`AuditLog::close`],
/// writes what is queued, syncs and stops the writer thread.
pub struct AuditLog {
    path: PathBuf,
    /// `,"replica":"<id>"` after `ts` in every record (empty without replicas).
    replica: Arc<[u8]>,
    queue_depth: usize,
    core: Arc<Mutex<Core>>,
    waiting: Arc<Waiting>,
    /// Whether callers may write under the lock themselves (not with `fsync_interval = 0`).
    inline: bool,
    closed: AtomicBool,
    tx: RwLock<Option<SyncSender<Submission>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    metrics: Arc<Metrics>,
    /// Unix second of the last logged refusal, so a full queue logs once a second.
    last_refusal_log: AtomicU64,
}

/// Resolves once the records handed to [`AuditLog::write_or_enqueue`] are in the file (the `write`
/// returned), or failed. Dropping it does not cancel anything.
#[derive(Debug)]
pub struct AuditTicket {
    rx: oneshot::Receiver<Result<(), AuditError>>,
}

impl Future for AuditTicket {
    type Output = Result<(), AuditError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(AuditError::Closed)))
    }
}

/// What [`AuditLog::write_or_enqueue`] did with the records.
#[derive(Debug)]
pub enum Written {
    /// They are in the file.
    Now,
    /// They are queued; the ticket resolves when they are written.
    Later(AuditTicket),
}

/// What [`AuditLog::reopen`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reopened {
    /// Seq of the `audit.reopened` record (`None` for a device or pipe, which is reopened
    /// without a record).
    pub seq: Option<u64>,
    /// Whether the path named another file than the one the log was writing.
    pub new_file: bool,
}

/// One serialized record (`{"v":1,"ts":...,"event":...}`), not yet chained.
struct Encoded {
    kind: &'static str,
    body: Vec<u8>,
}

struct Submission {
    records: Vec<Encoded>,
    ack: Ack,
}

enum Ack {
    Ticket(oneshot::Sender<Result<(), AuditError>>),
    /// `record()` waits on a std channel: it may run on a tokio worker thread.
    Blocking(SyncSender<Result<(), AuditError>>),
    /// Nobody waits: the wake-up that makes the writer thread watch the waiting list.
    Nobody,
}

impl Ack {
    fn send(self, result: Result<(), AuditError>) {
        // A submitter that stopped waiting is fine: the record's fate is already decided.
        match self {
            Ack::Ticket(tx) => drop(tx.send(result)),
            Ack::Blocking(tx) => drop(tx.send(result)),
            Ack::Nobody => {}
        }
    }
}

/// Records waiting for the next append, whoever makes it: those of callers that found the
/// lock held (each with the ticket that resolves when they are written) and deferred ones
/// (nobody waits for them). In the order they came, so a session's records keep theirs.
struct Waiting {
    list: Mutex<WaitingList>,
    /// The writer thread looks at the list every [`DEFER_TICK`] while this is set.
    watched: AtomicBool,
}

#[derive(Default)]
struct WaitingList {
    records: Vec<Encoded>,
    acks: Vec<oneshot::Sender<Result<(), AuditError>>>,
    /// Entries (a caller's records, or one deferral), for the queue-depth gauge.
    entries: i64,
    bytes: usize,
    /// Set by [`AuditLog::close`]: the writer thread's last look takes what is here.
    closed: bool,
}

impl WaitingList {
    fn has_waiters(&self) -> bool {
        !self.acks.is_empty()
    }
}

impl Waiting {
    fn lock(&self) -> std::sync::MutexGuard<'_, WaitingList> {
        self.list.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn take(&self) -> WaitingList {
        std::mem::take(&mut *self.lock())
    }
}

impl AuditLog {
    /// Opens the log (repairing a crash-cut last line, continuing the chain where the files
    /// end) and starts the writer thread.
    pub fn open(config: &AuditConfig, metrics: Arc<Metrics>) -> Result<Arc<AuditLog>, AuditError> {
        Self::open_with_tick(config, metrics, DEFER_TICK)
    }

    /// [`AuditLog::open`] with the writer thread looking at deferred records every `tick`.
    pub(crate) fn open_with_tick(
        config: &AuditConfig,
        metrics: Arc<Metrics>,
        tick: Duration,
    ) -> Result<Arc<AuditLog>, AuditError> {
        let path = config.path.clone();
        let replica = replica::field(config.replica.as_deref());
        let (mut file, own_tip) = ActiveFile::open(&path).map_err(|e| AuditError::io(&path, e))?;
        if own_tip.is_some() {
            // A file holds one replica's records (`audit verify` refuses a mix): after a
            // change of `store.replica_id`, or to or from a `[store]`, the chain goes on in a
            // new file.
            rotate_other_replica(&mut file, config.replica.as_deref()).map_err(|e| AuditError::io(&path, e))?;
        }
        let (tip, tip_file) = if file.is_regular() {
            let tip_file = TipFile::open(&config.tip_path).map_err(|e| AuditError::io(&config.tip_path, e))?;
            (start_tip(&path, own_tip, &tip_file)?, Some(tip_file))
        } else {
            // A device keeps no chain to read back: it starts one.
            (Tip::GENESIS, None)
        };
        let (tx, rx) = mpsc::sync_channel(config.queue_depth);
        let core = Arc::new(Mutex::new(Core {
            path: path.clone(),
            replica: Arc::clone(&replica),
            ident: file.ident(),
            file: Some(file),
            tip,
            max_file_bytes: config.max_file_bytes,
            metrics: Arc::clone(&metrics),
            scratch: Vec::new(),
            stale: None,
            pending: None,
            pending_by: None,
            tip_file,
        }));
        let waiting = Arc::new(Waiting {
            list: Mutex::new(WaitingList::default()),
            watched: AtomicBool::new(false),
        });
        let writer = Writer {
            path: path.clone(),
            rx,
            core: Arc::clone(&core),
            waiting: Arc::clone(&waiting),
            tick,
            max_file_bytes: config.max_file_bytes,
            fsync_interval: config.fsync_interval,
            last_sync: Instant::now(),
            metrics: Arc::clone(&metrics),
        };
        let thread = std::thread::Builder::new()
            .name("jitgate-audit".into())
            .spawn(move || writer.run())
            .map_err(|e| AuditError::io(&path, e))?;
        tracing::debug!(path = %path.display(), next_seq = tip.next_seq, "audit log open");
        Ok(Arc::new(AuditLog {
            path,
            replica,
            queue_depth: config.queue_depth,
            core,
            waiting,
            inline: !config.fsync_interval.is_zero(),
            closed: AtomicBool::new(false),
            tx: RwLock::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            metrics,
            last_refusal_log: AtomicU64::new(0),
        }))
    }

    /// Queues `events` (stamped now) without waiting. Fails at once when the queue is full or
    /// the writer has stopped. The ticket resolves when the batch holding them is written.
    /// Only the queue path; the relay uses [`AuditLog::write_or_enqueue`].
    #[cfg(test)]
    pub(crate) fn enqueue(&self, events: Vec<AuditEvent>) -> Result<AuditTicket, AuditError> {
        let (tx, rx) = oneshot::channel();
        if events.is_empty() {
            drop(tx.send(Ok(())));
        } else {
            self.submit_with(events, Ack::Ticket(tx))?;
        }
        Ok(AuditTicket { rx })
    }

    /// Writes `events` (stamped now) at once when no one else is writing, else queues them.
    /// Never waits for the lock: the relay calls it on its task for every batch of statements.
    pub fn write_or_enqueue(&self, events: Vec<AuditEvent>) -> Result<Written, AuditError> {
        if events.is_empty() {
            return Ok(Written::Now);
        }
        let records = self.encode(events)?;
        if !self.inline || self.closed.load(Ordering::Acquire) {
            return self.through_writer(records);
        }
        let records = match self.core.try_lock() {
            Ok(mut core) => match self.append_here(&mut core, records) {
                Ok(result) => {
                    drop(core);
                    self.help();
                    return result.map(|()| Written::Now);
                }
                Err(records) => {
                    drop(core);
                    return self.through_writer(records);
                }
            },
            Err(_) => records,
        };
        // Another thread holds the file: it writes these with its own before it lets go.
        let (tx, rx) = oneshot::channel();
        let records = {
            let mut list = self.waiting.lock();
            if list.closed || list.records.len() + records.len() > self.queue_depth {
                records
            } else {
                list.bytes += records.iter().map(|r| r.body.len() + CHAIN_BYTES).sum::<usize>();
                list.records.extend(records);
                list.acks.push(tx);
                list.entries += 1;
                self.metrics.audit_queue_depth.inc();
                drop(list);
                self.watch();
                // The holder may have let go before these joined the list.
                self.help();
                return Ok(Written::Later(AuditTicket { rx }));
            }
        };
        self.through_writer(records)
    }

    /// The relay's path with group commit: `events` join the waiting list with a ticket and
    /// nothing is written yet, so the records of every session that runs before this one is
    /// polled again go out in one `write`. The relay lets the other ready sessions run once,
    /// then calls [`AuditLog::write_waiting`] if nobody wrote them meanwhile. A pipe, a device,
    /// a failed file or records that would rotate it go to the writer thread instead.
    pub fn write_in_group(&self, events: Vec<AuditEvent>) -> Result<Written, AuditError> {
        if events.is_empty() {
            return Ok(Written::Now);
        }
        let records = self.encode(events)?;
        if !self.inline || self.closed.load(Ordering::Acquire) {
            return self.through_writer(records);
        }
        if let Ok(core) = self.core.try_lock() {
            let bytes = self.waiting.lock().bytes + records.iter().map(|r| r.body.len() + CHAIN_BYTES).sum::<usize>();
            if !core.file.as_ref().is_some_and(ActiveFile::is_regular) || core.would_rotate(bytes) {
                drop(core);
                return self.through_writer(records);
            }
        }
        let (tx, rx) = oneshot::channel();
        let mut list = self.waiting.lock();
        if list.closed || list.records.len() + records.len() > self.queue_depth {
            drop(list);
            return self.through_writer(records);
        }
        list.bytes += records.iter().map(|r| r.body.len() + CHAIN_BYTES).sum::<usize>();
        list.records.extend(records);
        list.acks.push(tx);
        list.entries += 1;
        self.metrics.audit_queue_depth.inc();
        drop(list);
        self.watch();
        Ok(Written::Later(AuditTicket { rx }))
    }

    /// Writes the waiting list now, on this thread, when the file is free (else its holder or
    /// the writer thread does).
    pub fn write_waiting(&self) {
        if let Ok(mut core) = self.core.try_lock() {
            let _ = self.append_here(&mut core, Vec::new());
            drop(core);
            self.help();
        }
    }

    /// Appends records of what already happened (`statement.end`) without a write of their
    /// own: they go out with the next append, whoever makes it, and within [`DEFER_TICK`]
    /// when none comes. Before any record submitted later by any path. A full list or a
    /// failed write is counted by the log.
    pub fn defer(&self, events: Vec<AuditEvent>) {
        if events.is_empty() {
            return;
        }
        let Ok(records) = self.encode(events) else {
            return;
        };
        if self.inline && !self.closed.load(Ordering::Acquire) {
            let mut list = self.waiting.lock();
            if !list.closed && list.records.len() + records.len() <= self.queue_depth {
                list.bytes += records.iter().map(|r| r.body.len() + CHAIN_BYTES).sum::<usize>();
                list.records.extend(records);
                list.entries += 1;
                self.metrics.audit_queue_depth.inc();
                drop(list);
                self.watch();
                return;
            }
        }
        let (tx, _) = oneshot::channel();
        let _ = self.send(Submission {
            records,
            ack: Ack::Ticket(tx),
        });
    }

    /// Writes the waiting records and `records` under the held lock with one write, on the
    /// caller's thread, and acknowledges the waiters. `Err(records)` when that cannot be done
    /// here (the writer thread's work: a pipe or device, a failed file, a rotation).
    fn append_here(&self, core: &mut Core, records: Vec<Encoded>) -> Result<Result<(), AuditError>, Vec<Encoded>> {
        // Only a regular file, open and healthy: a pipe or device may block for as long as
        // its reader likes, and a blocked tokio worker stalls the runtime. Nor when the
        // records would rotate the file: rotation syncs, and an `fsync` never runs on a
        // session task.
        let mut list = self.waiting.lock();
        let bytes = list.bytes + records.iter().map(|r| r.body.len() + CHAIN_BYTES).sum::<usize>();
        if !core.file.as_ref().is_some_and(ActiveFile::is_regular) || core.would_rotate(bytes) {
            return Err(records);
        }
        let waiting = std::mem::take(&mut *list);
        drop(list);
        self.metrics.audit_queue_depth.sub(waiting.entries);
        let all = || waiting.records.iter().chain(&records);
        let result = match core.append_all(all(), waiting.records.len() + records.len(), WhenMoved::LeaveToWriter) {
            Ok(()) => Ok(()),
            Err(e) => Err(core.failed(all(), e)),
        };
        for ack in waiting.acks {
            drop(ack.send(result.clone()));
        }
        Ok(result)
    }

    /// Writes what callers left waiting while this thread held the lock, when the lock is
    /// free now; a holder that took it meanwhile does it instead.
    fn help(&self) {
        for _ in 0..HELPS {
            if !self.waiting.lock().has_waiters() {
                return;
            }
            let Ok(mut core) = self.core.try_lock() else {
                return;
            };
            if self.append_here(&mut core, Vec::new()).is_err() {
                // The writer thread's work; it watches the list.
                return;
            }
        }
    }

    /// Makes sure the writer thread looks at the waiting list within [`DEFER_TICK`].
    fn watch(&self) {
        if !self.waiting.watched.swap(true, Ordering::SeqCst) {
            // A full queue is a busy writer thread, which takes the list with its batch.
            let tx = self.tx.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(tx) = tx.as_ref() {
                // Counted as a submission: the writer thread uncounts it when it takes it.
                self.metrics.audit_queue_depth.inc();
                let wake = Submission {
                    records: Vec::new(),
                    ack: Ack::Nobody,
                };
                if tx.try_send(wake).is_err() {
                    self.metrics.audit_queue_depth.dec();
                }
            }
        }
    }

    /// Queues records for the writer thread; the ticket resolves when they are written.
    fn through_writer(&self, records: Vec<Encoded>) -> Result<Written, AuditError> {
        let (tx, rx) = oneshot::channel();
        self.send(Submission {
            records,
            ack: Ack::Ticket(tx),
        })?;
        Ok(Written::Later(AuditTicket { rx }))
    }

    /// Holds the file as a writer would, for tests of the queued path.
    #[cfg(test)]
    pub(crate) fn hold_file(&self) -> impl Sized + '_ {
        self.core.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes one event, stamped now, and waits until it is in the file, without blocking the
    /// calling task's thread (the writer thread writes it; the task awaits its ticket).
    pub async fn record(&self, event: AuditEvent) -> Result<(), AuditError> {
        let (tx, rx) = oneshot::channel();
        self.submit_with(vec![event], Ack::Ticket(tx))?;
        AuditTicket { rx }.await
    }

    /// Like [`AuditLog::record`], blocking the calling thread: for code off the runtime (the
    /// CLI, start-up).
    pub fn record_blocking(&self, event: AuditEvent) -> Result<(), AuditError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit_with(vec![event], Ack::Blocking(tx))?;
        rx.recv().unwrap_or(Err(AuditError::Closed))
    }

    /// Hands `event` to the writer thread and returns at once: for records nobody waits for
    /// (what already happened). A full queue or a failed write is counted by the log.
    pub fn submit(&self, event: AuditEvent) {
        let (tx, _) = oneshot::channel();
        let _ = self.submit_with(vec![event], Ack::Ticket(tx));
    }

    /// Reopens the log at its path (SIGHUP, `jitgate audit reopen`, logrotate's postrotate):
    /// the chain continues in whatever file the path names now (a new one after a rename or
    /// removal, the same one when nothing moved), after an `audit.reopened` record with
    /// `reason`. Blocks for the length of one batch: call it off the tokio workers.
    /// `by` is the admin who asked, recorded in the event.
    pub fn reopen(&self, reason: ReopenReason, by: Option<UserName>) -> Result<Reopened, AuditError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(AuditError::Closed);
        }
        let mut core = self.core.lock().unwrap_or_else(PoisonError::into_inner);
        core.pending = Some(reason);
        core.pending_by = by;
        if let Some(mut old) = core.file.take() {
            // What was written to the old file goes to disk before it is let go.
            core.sync_file(&mut old);
            core.stale = Some(old);
        }
        match core.reopen() {
            Ok((file, reopened)) => {
                core.file = Some(file);
                Ok(reopened)
            }
            Err(e) => Err(core.failed(std::iter::empty(), e)),
        }
    }

    /// Writes what is queued, syncs and stops the writer thread. Later submissions fail with
    /// [`AuditError::Closed`]. Idempotent.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.waiting.lock().closed = true;
        drop(self.tx.write().unwrap_or_else(PoisonError::into_inner).take());
        let thread = self.thread.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(thread) = thread {
            if thread.join().is_err() {
                tracing::error!(path = %self.path.display(), "audit writer thread panicked");
            }
        }
    }

    fn submit_with(&self, events: Vec<AuditEvent>, ack: Ack) -> Result<(), AuditError> {
        let records = self.encode(events)?;
        self.send(Submission { records, ack })
    }

    /// Serializes events stamped now; on failure counts them all as refused. The fields
    /// every record starts with (`v`, `ts`, the replica) are encoded once for all of them.
    fn encode(&self, events: Vec<AuditEvent>) -> Result<Vec<Encoded>, AuditError> {
        let head = match record_head(SystemTime::now(), &self.replica) {
            Ok(head) => head,
            Err(e) => {
                return Err(self.refuse(events.iter().map(AuditEvent::kind), AuditError::Encode(Arc::new(e))));
            }
        };
        let mut records = Vec::with_capacity(events.len());
        let mut events = events.into_iter();
        while let Some(event) = events.next() {
            let kind = event.kind();
            let mut body = Vec::with_capacity(head.len() + 256);
            match encode_record(&head, &event, &mut body) {
                Ok(()) => records.push(Encoded { kind, body }),
                Err(e) => {
                    let kinds = records
                        .iter()
                        .map(|r| r.kind)
                        .chain([kind])
                        .chain(events.map(|e| e.kind()));
                    return Err(self.refuse(kinds, AuditError::Encode(Arc::new(e))));
                }
            }
        }
        Ok(records)
    }

    /// Queues a submission for the writer thread; never blocks.
    fn send(&self, submission: Submission) -> Result<(), AuditError> {
        let tx = self.tx.read().unwrap_or_else(PoisonError::into_inner);
        let Some(tx) = tx.as_ref() else {
            return Err(self.refuse(submission.records.iter().map(|r| r.kind), AuditError::Closed));
        };
        self.metrics.audit_queue_depth.inc();
        let refused = match tx.try_send(submission) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Full(s)) => (
                s,
                AuditError::QueueFull {
                    depth: self.queue_depth,
                },
            ),
            Err(TrySendError::Disconnected(s)) => (s, AuditError::Closed),
        };
        self.metrics.audit_queue_depth.dec();
        let (s, error) = refused;
        Err(self.refuse(s.records.iter().map(|r| r.kind), error))
    }

    /// Counts records refused before reaching the writer; logs at most once a second.
    fn refuse<'a>(&self, kinds: impl Iterator<Item = &'a str>, error: AuditError) -> AuditError {
        for kind in kinds {
            self.metrics.audit_write_errors_total.with_label_values(&[kind]).inc();
        }
        let now = crate::timefmt::to_millis(SystemTime::now()).unsigned_abs() / 1000;
        if self.last_refusal_log.swap(now, Ordering::Relaxed) != now {
            tracing::error!(path = %self.path.display(), %error, "audit records refused");
        }
        error
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        self.close();
    }
}

/// Where the chain continues at start-up: after the highest `seq` found in the active file,
/// the files beside it (whatever logrotate named them) and the tip file, so a log renamed,
/// compressed, moved away or removed while the proxy was down never restarts the chain.
fn start_tip(path: &std::path::Path, own: Option<Tip>, tip_file: &TipFile) -> Result<Tip, AuditError> {
    let beside = siblings::newest_tip(path).map_err(|e| AuditError::io(path, e))?;
    let remembered = tip_file.read();
    let tip = Tip::GENESIS.max(beside).max(remembered).max(own);
    match own {
        Some(own) if own != tip => tracing::warn!(
            path = %path.display(),
            file_seq = own.next_seq - 1,
            seq = tip.next_seq - 1,
            "the active audit file ends before the chain's last record; the chain continues after that record"
        ),
        None if tip.next_seq > 1 => tracing::info!(
            path = %path.display(),
            seq = tip.next_seq - 1,
            "active audit file is new or empty; the chain continues after its last record elsewhere"
        ),
        _ => {}
    }
    Ok(tip)
}

/// Rotates `file` when its last record names another replica than `replica` (or one when
/// `replica` is `None`, or none when it is not), so that no file mixes replicas.
fn rotate_other_replica(file: &mut ActiveFile, replica: Option<&str>) -> std::io::Result<()> {
    let Some(last) = file.last_line()? else {
        return Ok(());
    };
    let Ok(theirs) = replica::of_line(&last) else {
        // Not a record to tell by; `audit verify` names it.
        return Ok(());
    };
    if theirs.as_deref() == replica {
        return Ok(());
    }
    let to = file.rotate()?;
    tracing::info!(
        to = %to.display(),
        was = theirs.as_deref().unwrap_or("none"),
        replica = replica.unwrap_or("none"),
        "audit log's records are of another replica; the chain continues in a new file"
    );
    Ok(())
}

/// Why an append failed, before it becomes an [`AuditError`] for the submitters.
type Failure = AppendError;

/// The file and the chain's tip: whoever holds the lock appends.
struct Core {
    path: PathBuf,
    /// As [`AuditLog`]'s, for the `audit.reopened` records written here.
    replica: Arc<[u8]>,
    /// `None` after a failed write: the next append reopens (and repairs) the file.
    file: Option<ActiveFile>,
    /// (device, inode) of the last regular file opened: whether a reopen finds a new file.
    ident: Option<Ident>,
    /// The file of a failed write, kept until the reopen has asked whether it was moved.
    stale: Option<ActiveFile>,
    /// Why the next file opened starts with an `audit.reopened` record.
    pending: Option<ReopenReason>,
    /// Who asked for the pending reopen.
    pending_by: Option<UserName>,
    tip: Tip,
    /// `None` for devices and pipes.
    tip_file: Option<TipFile>,
    max_file_bytes: u64,
    metrics: Arc<Metrics>,
    /// The chained lines of one append, reused (appends run on the relay's path).
    scratch: Vec<u8>,
}

/// What an append does when the path no longer names the file it wrote to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WhenMoved {
    /// Open the file the path names now (the writer thread).
    ReopenNow,
    /// Leave the file closed, so the writer thread opens it (a session task: opening repairs
    /// the file's tail, which reads it, and writes the tip file).
    LeaveToWriter,
}

impl Core {
    /// Chains `records` after the tip and appends them with one write, rotating first when
    /// they would take the file past `max_file_bytes`. Counts them when written.
    fn append_all<'a>(
        &mut self,
        records: impl Iterator<Item = &'a Encoded>,
        count: usize,
        when_moved: WhenMoved,
    ) -> Result<(), Failure> {
        let mut file = match self.file.take() {
            Some(file) => file,
            None => self.reopen()?.0,
        };
        let mut buf = std::mem::take(&mut self.scratch);
        buf.clear();
        let mut tip = self.tip;
        for r in records {
            buf.reserve(r.body.len() + CHAIN_BYTES);
            tip.prev = chain::encode(tip.next_seq, &tip.prev, &r.body, &mut buf);
            tip.next_seq += 1;
        }
        debug_assert_eq!(tip.next_seq - self.tip.next_seq, count as u64);
        let written = self.write_out(&mut file, &buf);
        // Big batches (rotation-sized) are not kept around.
        if buf.capacity() <= 1 << 20 {
            self.scratch = buf;
        }
        match written {
            Ok(()) => {
                self.tip = tip;
                self.file = Some(file);
                self.metrics.audit_records_total.inc_by(count as u64);
                self.metrics.audit_batch_records.observe(count as f64);
                Ok(())
            }
            Err(AppendError::Io(e)) => {
                self.stale = Some(file);
                Err(AppendError::Io(e))
            }
            Err(AppendError::Moved(reason)) => {
                self.pending = Some(reason);
                drop(file);
                if when_moved == WhenMoved::LeaveToWriter {
                    // With no file open, every later batch queues, and the writer thread's
                    // next one opens the new file.
                    return Err(AppendError::Moved(reason));
                }
                // Switch now, so the new file exists and the next batch goes there.
                match self.reopen() {
                    Ok((file, _)) => self.file = Some(file),
                    Err(e) => {
                        tracing::error!(path = %self.path.display(), error = ?e, "cannot reopen the audit log; the next batch tries again");
                    }
                }
                Err(AppendError::Moved(reason))
            }
        }
    }

    /// Whether appending records of `bytes` (their size bound) would rotate the file first.
    fn would_rotate(&self, bytes: usize) -> bool {
        self.file
            .as_ref()
            .is_some_and(|f| f.needs_rotation(bytes as u64, self.max_file_bytes))
    }

    /// Appends chained lines, rotating first when they would take the file past
    /// `max_file_bytes`.
    fn write_out(&mut self, file: &mut ActiveFile, buf: &[u8]) -> Result<(), Failure> {
        if file.needs_rotation(buf.len() as u64, self.max_file_bytes) {
            // Never rename whatever now sits at the path: only the file the log was writing.
            if let Some(reason) = file.moved() {
                return Err(AppendError::Moved(reason));
            }
            self.sync_file(file);
            let to = file.rotate()?;
            self.ident = file.ident();
            self.write_tip();
            tracing::info!(path = %self.path.display(), to = %to.display(), "audit log rotated");
        }
        file.append(buf, self.tip.next_seq)
    }

    /// Opens the file at the path after a failed write, a move or on request. The chain goes
    /// on from the writer's tip (or from the file's own last record if that is later: lines
    /// of a failed batch that could not be cut back). When a reason is pending, or the path
    /// names another file than the one written last, the first record is `audit.reopened`.
    fn reopen(&mut self) -> Result<(ActiveFile, Reopened), Failure> {
        if let Some(stale) = self.stale.take() {
            if self.pending.is_none() {
                self.pending = stale.moved();
            }
        }
        let (mut file, own_tip) = ActiveFile::open(&self.path)?;
        if !file.is_regular() {
            self.pending = None;
            return Ok((
                file,
                Reopened {
                    seq: None,
                    new_file: false,
                },
            ));
        }
        let new_file = file.ident() != self.ident;
        self.ident = file.ident();
        self.tip = self.tip.max(own_tip);
        let Some(reason) = self.pending.or(new_file.then_some(ReopenReason::Renamed)) else {
            return Ok((file, Reopened { seq: None, new_file }));
        };
        let event = AuditEvent::AuditReopened {
            reason,
            new_file,
            by: self.pending_by.clone(),
        };
        let mut body = Vec::new();
        record_head(SystemTime::now(), &self.replica)
            .and_then(|head| encode_record(&head, &event, &mut body))
            .map_err(|e| AppendError::Io(std::io::Error::other(e)))?;
        let mut buf = Vec::with_capacity(body.len() + CHAIN_BYTES);
        let seq = self.tip.next_seq;
        let hash = chain::encode(seq, &self.tip.prev, &body, &mut buf);
        file.append(&buf, seq)?;
        self.tip = Tip::after(seq, hash);
        self.pending = None;
        self.pending_by = None;
        self.metrics.audit_records_total.inc();
        self.metrics
            .audit_reopens_total
            .with_label_values(&[reason.as_str()])
            .inc();
        self.write_tip();
        tracing::warn!(path = %self.path.display(), reason = reason.as_str(), new_file, seq, "audit log reopened");
        Ok((
            file,
            Reopened {
                seq: Some(seq),
                new_file,
            },
        ))
    }

    /// Logs and counts a failed append of `records`; the error for their submitters.
    fn failed<'a>(&self, records: impl Iterator<Item = &'a Encoded> + Clone, e: Failure) -> AuditError {
        let error = match e {
            AppendError::Io(e) => AuditError::io(&self.path, e),
            AppendError::Moved(reason) => AuditError::Moved {
                path: self.path.clone(),
                reason,
            },
        };
        tracing::error!(path = %self.path.display(), %error, records = records.clone().count(), "audit batch not written");
        for r in records {
            self.metrics.audit_write_errors_total.with_label_values(&[r.kind]).inc();
        }
        error
    }

    /// The periodic sync's first half, under the lock: a handle to sync the file with after
    /// the lock is released, and the tip that sync makes durable. Falls back to syncing here
    /// when the handle cannot be had.
    fn begin_sync(&mut self) -> (Option<(std::fs::File, u64)>, Tip) {
        let handle = match self.file.as_mut().map(ActiveFile::sync_handle) {
            Some(Ok(handle)) => handle,
            Some(Err(error)) => {
                tracing::warn!(%error, "cannot open a handle to sync the audit log with; syncing under the lock");
                self.sync_file_now();
                None
            }
            None => None,
        };
        (handle, self.tip)
    }

    fn sync_file_now(&mut self) {
        if let Some(mut file) = self.file.take() {
            self.sync_file(&mut file);
            self.file = Some(file);
        }
    }

    /// Syncs the file, then records the tip in the tip file.
    fn sync(&mut self) {
        if let Some(mut file) = self.file.take() {
            self.sync_file(&mut file);
            self.file = Some(file);
        }
        self.write_tip();
    }

    /// Records the chain's tip in the tip file (a `pwrite`; nothing when unchanged).
    fn write_tip(&mut self) {
        self.write_tip_at(self.tip);
    }

    /// Records `tip` (a tip this writer reached) in the tip file.
    fn write_tip_at(&mut self, tip: Tip) {
        if let Some(tip_file) = self.tip_file.as_mut() {
            if let Err(error) = tip_file.write(tip) {
                tracing::warn!(%error, "cannot record the audit chain's tip");
            }
        }
    }

    /// At close: the file and the tip file on stable storage.
    fn close(&mut self) {
        self.sync();
        if let Some(Err(error)) = self.tip_file.as_ref().map(TipFile::sync) {
            tracing::warn!(%error, "cannot sync the audit tip file");
        }
    }

    fn sync_file(&self, file: &mut ActiveFile) {
        let start = Instant::now();
        observe_sync(&self.metrics, &self.path, start, file.sync());
    }
}

/// Counts one `fsync` that started at `start`: its duration when it ran, an error when it
/// failed (`Ok(false)`: nothing to sync).
fn observe_sync(metrics: &Metrics, path: &std::path::Path, start: Instant, result: std::io::Result<bool>) {
    match result {
        Ok(true) => metrics.audit_fsync_seconds.observe(start.elapsed().as_secs_f64()),
        Ok(false) => {}
        Err(error) => {
            metrics.audit_write_errors_total.with_label_values(&["fsync"]).inc();
            tracing::error!(path = %path.display(), %error, "audit log fsync failed");
        }
    }
}

struct Writer {
    path: PathBuf,
    rx: Receiver<Submission>,
    core: Arc<Mutex<Core>>,
    waiting: Arc<Waiting>,
    /// How often it looks at the waiting list while watched ([`DEFER_TICK`]).
    tick: Duration,
    max_file_bytes: u64,
    fsync_interval: Duration,
    last_sync: Instant,
    metrics: Arc<Metrics>,
}

impl Writer {
    fn core(&self) -> std::sync::MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn run(mut self) {
        let byte_cap = usize::try_from(self.max_file_bytes)
            .unwrap_or(usize::MAX)
            .min(MAX_BATCH_BYTES);
        let mut batch = Vec::new();
        let mut idle_ticks = 0;
        loop {
            // Callers may have written under the lock since the last sync: wake on the timer
            // whether or not anything was queued; and every DEFER_TICK while the waiting list
            // is watched.
            // (With `fsync_interval = 0` every write goes through here and is synced at once.)
            let watched = self.waiting.watched.load(Ordering::SeqCst);
            let next = if self.fsync_interval.is_zero() && !watched {
                self.rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
            } else {
                let mut wait = self.fsync_interval.saturating_sub(self.last_sync.elapsed());
                if watched || self.fsync_interval.is_zero() {
                    wait = wait.min(self.tick);
                }
                self.rx.recv_timeout(wait)
            };
            let first = match next {
                Ok(s) => s,
                Err(RecvTimeoutError::Timeout) => {
                    if watched {
                        self.look(&mut idle_ticks);
                    }
                    if self.last_sync.elapsed() >= self.fsync_interval {
                        self.sync();
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let mut records = first.records.len();
            let mut bytes = size(&first);
            batch.push(first);
            while records < MAX_BATCH_RECORDS && bytes < byte_cap {
                let Ok(s) = self.rx.try_recv() else {
                    break;
                };
                records += s.records.len();
                bytes += size(&s);
                batch.push(s);
            }
            self.metrics.audit_queue_depth.sub(batch.len() as i64);
            if records == 0 {
                // Only wake-ups: deferred records wait for the next append or the next look.
                batch.clear();
                continue;
            }
            self.write(&mut batch, records);
            if self.last_sync.elapsed() >= self.fsync_interval {
                self.sync();
            }
        }
        // Closed: nothing joins the waiting list any more; what is there goes out last.
        self.write(&mut batch, 0);
        self.core().close();
    }

    /// The look at the waiting list every DEFER_TICK: writes what waits; after IDLE_TICKS
    /// looks at an empty list, stops looking until the next deferral.
    fn look(&mut self, idle_ticks: &mut u32) {
        if !self.waiting.lock().records.is_empty() {
            *idle_ticks = 0;
            let mut batch = Vec::new();
            self.write(&mut batch, 0);
            return;
        }
        *idle_ticks += 1;
        if *idle_ticks >= IDLE_TICKS {
            *idle_ticks = 0;
            self.waiting.watched.store(false, Ordering::SeqCst);
            // A deferral that saw the flag still set sent no wake-up: look once more.
            if !self.waiting.lock().records.is_empty() {
                self.waiting.watched.store(true, Ordering::SeqCst);
            }
        }
    }

    /// Writes the waiting records, then every submission in `batch`, with one write, and
    /// acknowledges (or fails) them all, leaving `batch` empty.
    fn write(&mut self, batch: &mut Vec<Submission>, records: usize) {
        let mut core = self.core();
        let waiting = self.waiting.take();
        self.metrics.audit_queue_depth.sub(waiting.entries);
        let count = waiting.records.len() + records;
        let all = || waiting.records.iter().chain(batch.iter().flat_map(|s| &s.records));
        let result = if count == 0 {
            Ok(())
        } else {
            core.append_all(all(), count, WhenMoved::ReopenNow)
                .map_err(|e| core.failed(all(), e))
        };
        drop(core);
        for ack in waiting.acks {
            drop(ack.send(result.clone()));
        }
        for s in batch.drain(..) {
            s.ack.send(result.clone());
        }
    }

    /// The periodic sync. The `fsync` itself runs with the lock released, on a second handle,
    /// so statements keep appending (inline, on their own tasks) while the disk catches up;
    /// then the tip it made durable goes to the tip file.
    fn sync(&mut self) {
        let (handle, tip) = self.core().begin_sync();
        if let Some((handle, synced)) = handle {
            let start = Instant::now();
            let result = handle.sync_data().map(|()| true);
            let synced_ok = result.is_ok();
            // Counted before the advice, so the metric times the fsync alone.
            observe_sync(&self.metrics, &self.path, start, result);
            if synced_ok {
                active::drop_cached(&handle, synced);
            }
        }
        self.core().write_tip_at(tip);
        self.last_sync = Instant::now();
    }
}

fn size(s: &Submission) -> usize {
    s.records.iter().map(|r| r.body.len() + CHAIN_BYTES).sum()
}
