//! The writer: one thread takes queued submissions in batches, chains their records, writes
//! each batch with one `write`, then acknowledges every submitter. `fsync` runs on a timer
//! (`audit.fsync_interval`), at rotation and at shutdown, never per batch.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
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
    tx: RwLock<Option<SyncSender<Submission>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    metrics: Arc<Metrics>,
    /// Unix second of the last logged refusal, so a full queue logs once a second.
    last_refusal_log: AtomicU64,
}

/// Resolves once the records handed to [`AuditLog::enqueue`] are in the file (the `write`
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
        let writer = Writer {
            rx,
            path: path.clone(),
            file: Some(file),
            tip,
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
            tx: RwLock::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            metrics,
            last_refusal_log: AtomicU64::new(0),
        }))
    }

    /// Queues `events` (stamped now) without waiting. Fails at once when the queue is full or
    /// the writer has stopped. The ticket resolves when the batch holding them is written.
    pub fn enqueue(&self, events: Vec<AuditEvent>) -> Result<AuditTicket, AuditError> {
        let (tx, rx) = oneshot::channel();
        if events.is_empty() {
            drop(tx.send(Ok(())));
        } else {
            self.submit(events, Ack::Ticket(tx))?;
        }
        Ok(AuditTicket { rx })
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
        drop(self.tx.write().unwrap_or_else(PoisonError::into_inner).take());
        let thread = self.thread.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(thread) = thread {
            if thread.join().is_err() {
                tracing::error!(path = %self.path.display(), "audit writer thread panicked");
            }
        }
    }

    fn submit(&self, events: Vec<AuditEvent>, ack: Ack) -> Result<(), AuditError> {
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
        let tx = self.tx.read().unwrap_or_else(PoisonError::into_inner);
        let Some(tx) = tx.as_ref() else {
            return Err(self.refuse(records.iter().map(|r| r.kind), AuditError::Closed));
        };
        self.metrics.audit_queue_depth.inc();
        let refused = match tx.try_send(Submission { records, ack }) {
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

struct Writer {
    rx: Receiver<Submission>,
    path: PathBuf,
    /// `None` after a failed write: the next batch reopens (and repairs) the file.
    file: Option<ActiveFile>,
    tip: Tip,
    max_file_bytes: u64,
    fsync_interval: Duration,
    last_sync: Instant,
    metrics: Arc<Metrics>,
}

impl Writer {
    fn run(mut self) {
        let byte_cap = usize::try_from(self.max_file_bytes)
            .unwrap_or(usize::MAX)
            .min(MAX_BATCH_BYTES);
        let mut batch = Vec::new();
        loop {
            let unsynced = self.file.as_ref().is_some_and(ActiveFile::is_unsynced);
            let first = if unsynced {
                let wait = self.fsync_interval.saturating_sub(self.last_sync.elapsed());
                match self.rx.recv_timeout(wait) {
                    Ok(s) => s,
                    Err(RecvTimeoutError::Timeout) => {
                        self.sync();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match self.rx.recv() {
                    Ok(s) => s,
                    Err(_) => break,
                }
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
        match self.append(batch, records) {
            Ok(()) => {
                self.metrics.audit_records_total.inc_by(records as u64);
                self.metrics.audit_batch_records.observe(records as f64);
                for s in batch.drain(..) {
                    s.ack.send(Ok(()));
                }
            }
            Err(e) => {
                let error = AuditError::io(&self.path, e);
                tracing::error!(path = %self.path.display(), %error, records, "audit batch not written");
                for s in batch.drain(..) {
                    for r in &s.records {
                        self.metrics.audit_write_errors_total.with_label_values(&[r.kind]).inc();
                    }
                    s.ack.send(Err(error.clone()));
                }
            }
        }
    }

    /// Chains the batch's records after the tip and appends them with one write, rotating
    /// first when they would take the file past `max_file_bytes`.
    fn append(&mut self, batch: &[Submission], records: usize) -> std::io::Result<()> {
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
        let mut buf = Vec::with_capacity(batch.iter().map(size).sum::<usize>());
        let mut tip = self.tip;
        for r in batch.iter().flat_map(|s| &s.records) {
            tip.prev = chain::encode(tip.next_seq, &tip.prev, &r.body, &mut buf);
            tip.next_seq += 1;
        }
        debug_assert_eq!(tip.next_seq - self.tip.next_seq, records as u64);
        if file.needs_rotation(buf.len() as u64, self.max_file_bytes) {
            self.sync_file(&mut file);
            let to = file.rotate()?;
            tracing::info!(path = %self.path.display(), to = %to.display(), "audit log rotated");
        }
        file.append(&buf, self.tip.next_seq)?;
        self.tip = tip;
        self.file = Some(file);
        Ok(())
    }

    fn sync(&mut self) {
        if let Some(mut file) = self.file.take() {
            self.sync_file(&mut file);
            self.file = Some(file);
        }
        self.last_sync = Instant::now();
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

fn size(s: &Submission) -> usize {
    s.records.iter().map(|r| r.body.len() + CHAIN_BYTES).sum()
}
