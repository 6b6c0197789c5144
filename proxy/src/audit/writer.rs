//! The writer. Records are chained and appended under one lock (the [`Core`]: the file and the
//! chain's tip), by whichever thread holds it:
//!
//! - [`AuditLog::write_or_enqueue`], the relay's path: when the lock is free and the log is a
//!   healthy regular file, the caller chains and writes its records itself (one `write` to
//!   the page cache, no thread hand-off); otherwise (another writer, an `fsync`, a pipe or
//!   device, a failed file) the records are queued and a ticket resolves when they are
//!   written, so a session task never waits on the lock.
//! - The writer thread takes queued submissions in batches, chains their records, writes each
//!   batch with one `write`, then acknowledges every submitter.
//!
//! `fsync` runs on the writer thread on a timer (`audit.fsync_interval`), at rotation and at
//! shutdown, never per batch. With `fsync_interval = 0s` (sync after every batch) everything
//! goes through the writer thread.

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

use super::active::{ActiveFile, Tip};
use super::chain;
use super::event::{AuditEvent, AuditRecord, SCHEMA_VERSION};
use super::AuditError;
use crate::config::AuditConfig;
use crate::metrics::Metrics;

/// Most records the writer puts in one batch.
const MAX_BATCH_RECORDS: usize = 4096;
/// Most bytes in one batch (also capped at `max_file_bytes`, so rotation stays close to it).
const MAX_BATCH_BYTES: usize = 4 << 20;
/// Bytes the chain fields add to a record: `{"seq":N,"prev":"..",` and `,"hash":".."}\n`.
const CHAIN_BYTES: usize = 180;

/// The audit log. Cheap to share (`Arc`); dropping the last handle, or [`AuditLog::close`],
/// writes what is queued, syncs and stops the writer thread.
pub struct AuditLog {
    path: PathBuf,
    queue_depth: usize,
    core: Arc<Mutex<Core>>,
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

/// One serialized record (`{"v":1,"ts":...}`), not yet chained.
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
}

impl Ack {
    fn send(self, result: Result<(), AuditError>) {
        // A submitter that stopped waiting is fine: the record's fate is already decided.
        match self {
            Ack::Ticket(tx) => drop(tx.send(result)),
            Ack::Blocking(tx) => drop(tx.send(result)),
        }
    }
}

impl AuditLog {
    /// Opens the log (repairing a crash-cut last line, continuing the chain where the files
    /// end) and starts the writer thread.
    pub fn open(config: &AuditConfig, metrics: Arc<Metrics>) -> Result<Arc<AuditLog>, AuditError> {
        let path = config.path.clone();
        let (file, tip) = ActiveFile::open(&path).map_err(|e| AuditError::io(&path, e))?;
        let (tx, rx) = mpsc::sync_channel(config.queue_depth);
        let core = Arc::new(Mutex::new(Core {
            path: path.clone(),
            file: Some(file),
            tip,
            max_file_bytes: config.max_file_bytes,
            metrics: Arc::clone(&metrics),
            scratch: Vec::new(),
        }));
        let writer = Writer {
            rx,
            core: Arc::clone(&core),
            path: path.clone(),
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
            queue_depth: config.queue_depth,
            core,
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
            self.submit(events, Ack::Ticket(tx))?;
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
        if self.inline && !self.closed.load(Ordering::Acquire) {
            if let Ok(mut core) = self.core.try_lock() {
                // Only a regular file, open and healthy: a pipe or device may block for as
                // long as its reader likes, and a blocked tokio worker stalls the runtime.
                if core.file.as_ref().is_some_and(ActiveFile::is_regular) {
                    return match core.append(&records) {
                        Ok(()) => Ok(Written::Now),
                        Err(e) => Err(core.failed(&records, e)),
                    };
                }
            }
        }
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

    /// Writes one event, stamped now, and waits until it is in the file. Safe to call from a
    /// tokio worker thread (it blocks that thread for the length of one batch).
    pub fn record(&self, event: AuditEvent) -> Result<(), AuditError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(vec![event], Ack::Blocking(tx))?;
        rx.recv().unwrap_or(Err(AuditError::Closed))
    }

    /// Writes what is queued, syncs and stops the writer thread. Later submissions fail with
    /// [`AuditError::Closed`]. Idempotent.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        drop(self.tx.write().unwrap_or_else(PoisonError::into_inner).take());
        let thread = self.thread.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(thread) = thread {
            if thread.join().is_err() {
                tracing::error!(path = %self.path.display(), "audit writer thread panicked");
            }
        }
    }

    fn submit(&self, events: Vec<AuditEvent>, ack: Ack) -> Result<(), AuditError> {
        let records = self.encode(events)?;
        self.send(Submission { records, ack })
    }

    /// Serializes events stamped now; on failure counts them all as refused.
    fn encode(&self, events: Vec<AuditEvent>) -> Result<Vec<Encoded>, AuditError> {
        let ts = SystemTime::now();
        let mut records = Vec::with_capacity(events.len());
        let mut events = events.into_iter();
        while let Some(event) = events.next() {
            let kind = event.kind();
            let record = AuditRecord {
                v: SCHEMA_VERSION,
                ts,
                event,
            };
            match serde_json::to_vec(&record) {
                Ok(body) => records.push(Encoded { kind, body }),
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

/// The file and the chain's tip: whoever holds the lock appends.
struct Core {
    path: PathBuf,
    /// `None` after a failed write: the next append reopens (and repairs) the file.
    file: Option<ActiveFile>,
    tip: Tip,
    max_file_bytes: u64,
    metrics: Arc<Metrics>,
    /// The chained lines of one append, reused (appends run on the relay's path).
    scratch: Vec<u8>,
}

impl Core {
    /// Chains `records` after the tip and appends them with one write, rotating first when
    /// they would take the file past `max_file_bytes`. Counts them when written.
    fn append(&mut self, records: &[Encoded]) -> std::io::Result<()> {
        self.append_all(records.iter(), records.len())
    }

    fn append_all<'a>(&mut self, records: impl Iterator<Item = &'a Encoded>, count: usize) -> std::io::Result<()> {
        let mut file = match self.file.take() {
            Some(file) => file,
            None => {
                let (file, tip) = ActiveFile::open(&self.path)?;
                // Only a regular file's chain can be read back; a device keeps the writer's.
                if file.is_regular() {
                    self.tip = tip;
                }
                file
            }
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
        written?;
        self.tip = tip;
        self.file = Some(file);
        self.metrics.audit_records_total.inc_by(count as u64);
        self.metrics.audit_batch_records.observe(count as f64);
        Ok(())
    }

    /// Appends chained lines, rotating first when they would take the file past
    /// `max_file_bytes`.
    fn write_out(&self, file: &mut ActiveFile, buf: &[u8]) -> std::io::Result<()> {
        if file.needs_rotation(buf.len() as u64, self.max_file_bytes) {
            self.sync_file(file);
            let to = file.rotate()?;
            tracing::info!(path = %self.path.display(), to = %to.display(), "audit log rotated");
        }
        file.append(buf, self.tip.next_seq)
    }

    /// Logs and counts a failed append of `records`; the error for their submitters.
    fn failed(&self, records: &[Encoded], e: std::io::Error) -> AuditError {
        let error = AuditError::io(&self.path, e);
        tracing::error!(path = %self.path.display(), %error, records = records.len(), "audit batch not written");
        for r in records {
            self.metrics.audit_write_errors_total.with_label_values(&[r.kind]).inc();
        }
        error
    }

    fn sync(&mut self) {
        if let Some(mut file) = self.file.take() {
            self.sync_file(&mut file);
            self.file = Some(file);
        }
    }

    fn sync_file(&self, file: &mut ActiveFile) {
        let start = Instant::now();
        match file.sync() {
            Ok(true) => self.metrics.audit_fsync_seconds.observe(start.elapsed().as_secs_f64()),
            Ok(false) => {}
            Err(error) => {
                self.metrics
                    .audit_write_errors_total
                    .with_label_values(&["fsync"])
                    .inc();
                tracing::error!(path = %self.path.display(), %error, "audit log fsync failed");
            }
        }
    }
}

struct Writer {
    rx: Receiver<Submission>,
    core: Arc<Mutex<Core>>,
    path: PathBuf,
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
        loop {
            // Callers may have written under the lock since the last sync: wake on the timer
            // whether or not anything was queued.
            // (With `fsync_interval = 0` every write goes through here and is synced at once.)
            let next = if self.fsync_interval.is_zero() {
                self.rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
            } else {
                self.rx
                    .recv_timeout(self.fsync_interval.saturating_sub(self.last_sync.elapsed()))
            };
            let first = match next {
                Ok(s) => s,
                Err(RecvTimeoutError::Timeout) => {
                    self.sync();
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
            self.write(&mut batch, records);
            if self.last_sync.elapsed() >= self.fsync_interval {
                self.sync();
            }
        }
        self.sync();
    }

    /// Writes and acknowledges (or fails) every submission in `batch`, leaving it empty.
    fn write(&mut self, batch: &mut Vec<Submission>, records: usize) {
        let mut core = self.core();
        match core.append_all(batch.iter().flat_map(|s| &s.records), records) {
            Ok(()) => {
                drop(core);
                for s in batch.drain(..) {
                    s.ack.send(Ok(()));
                }
            }
            Err(e) => {
                let error = AuditError::io(&self.path, e);
                tracing::error!(path = %self.path.display(), %error, records, "audit batch not written");
                for s in batch.drain(..) {
                    for r in &s.records {
                        core.metrics.audit_write_errors_total.with_label_values(&[r.kind]).inc();
                    }
                    s.ack.send(Err(error.clone()));
                }
            }
        }
    }

    fn sync(&mut self) {
        self.core().sync();
        self.last_sync = Instant::now();
    }
}

fn size(s: &Submission) -> usize {
    s.records.iter().map(|r| r.body.len() + CHAIN_BYTES).sum()
}
