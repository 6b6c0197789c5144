//! The two phases of a cut across sessions.
//!
//! One revoke or expiry can end 10,000 sessions at the same instant. Each session first tells
//! its client (a protocol's last message and close: PostgreSQL's FATAL, close_notify and FIN),
//! then tears down (upstream close, audit record, log line, socket close). Run one session
//! after another, the teardowns of the first sessions would delay the telling of the last
//! ones, on the same workers: on two cores, tearing down is more than half the work.
//!
//! So a session cut tells its client, calls [`CutWave::told`], and waits in
//! [`CutWave::settled`] until no session has told a client for [`QUIET`]: the wave is over,
//! every session it cut has told its client, and the teardowns run. One watcher task per wave
//! measures the quiet; the waiting sessions sleep on one `Notify`. A wait is bounded by its
//! caller (a session's close deadline), so a steady trickle of single cuts delays nothing by
//! more than that bound. The order only ever changes when teardown work runs, never whether:
//! nothing here can keep a session from ending.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// How long no session may have told its client before a wave counts as over.
pub const QUIET: Duration = Duration::from_millis(2);

/// Sessions cut together wait for each other before tearing down.
#[derive(Debug)]
pub struct CutWave {
    /// When the last session told its client, in nanoseconds after `base`.
    last_told: AtomicU64,
    /// Whether a watcher is measuring the quiet of a wave.
    watching: AtomicBool,
    over: Notify,
    base: Instant,
}

impl Default for CutWave {
    fn default() -> Self {
        Self {
            last_told: AtomicU64::new(0),
            watching: AtomicBool::new(false),
            over: Notify::new(),
            base: Instant::now(),
        }
    }
}

impl CutWave {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// A session has told its client of its cut. Starts the wave's watcher unless one runs.
    pub fn told(self: &Arc<Self>) {
        self.last_told.fetch_max(self.now_ns(), Ordering::AcqRel);
        if self
            .watching
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            tokio::spawn(Arc::clone(self).watch());
        }
    }

    /// Ends the wave once no session has told a client for [`QUIET`].
    async fn watch(self: Arc<Self>) {
        let quiet = u64::try_from(QUIET.as_nanos()).unwrap_or(u64::MAX);
        loop {
            let last = self.last_told.load(Ordering::Acquire);
            let now = self.now_ns();
            if now.saturating_sub(last) >= quiet {
                break;
            }
            tokio::time::sleep(Duration::from_nanos(quiet - (now - last))).await;
        }
        self.watching.store(false, Ordering::Release);
        self.over.notify_waiters();
    }

    /// Waits until the wave this session's cut belongs to is over, or until `by`.
    pub async fn settled(&self, by: Instant) {
        let over = self.over.notified();
        let mut over = std::pin::pin!(over);
        // Registered before the check, so a wave that ends right after it still wakes us.
        over.as_mut().enable();
        if !self.watching.load(Ordering::Acquire) {
            return;
        }
        let _ = tokio::time::timeout_at(by, over).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn teardowns_wait_until_no_session_has_told_its_client_for_the_quiet_time() {
        let wave = CutWave::new();
        let far = Instant::now() + Duration::from_secs(10);
        // Three sessions tell their clients 1 ms apart: one wave.
        wave.told();
        let first = tokio::spawn({
            let wave = Arc::clone(&wave);
            async move {
                wave.settled(far).await;
                Instant::now()
            }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        wave.told();
        tokio::time::sleep(Duration::from_millis(1)).await;
        let last = Instant::now();
        wave.told();
        let ended = first.await.unwrap();
        // The first session's teardown waited for the last one's telling, plus the quiet.
        assert!(ended >= last + QUIET, "{:?}", ended - last);
        assert!(ended < last + QUIET + Duration::from_millis(1), "{:?}", ended - last);
        // After the wave, a wait returns at once.
        let before = Instant::now();
        wave.settled(far).await;
        assert_eq!(Instant::now(), before);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_never_outlasts_its_bound() {
        let wave = CutWave::new();
        let start = Instant::now();
        let by = start + Duration::from_millis(20);
        // A steady trickle of cuts, 1 ms apart, never leaves the quiet time.
        let trickle = tokio::spawn({
            let wave = Arc::clone(&wave);
            async move {
                for _ in 0..100 {
                    wave.told();
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        });
        tokio::time::sleep(Duration::from_micros(10)).await;
        wave.settled(by).await;
        assert_eq!(Instant::now(), by);
        trickle.abort();
    }
}
