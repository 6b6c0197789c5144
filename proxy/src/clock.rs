//! The wall clock the access core reads, so tests can move it.
//!
//! Deadlines are kept on tokio's monotonic clock (`tokio::time::Instant`), which a test pauses
//! and advances with `tokio::time::pause` / `advance`. Wall-clock times (a grant's `expires_at`,
//! a request's `lapses_at`) come from a [`Clock`]: the [`SystemClock`] in production, and in
//! tests a [`TokioClock`], whose wall time moves with tokio's clock, so one `advance` moves both
//! and nothing has to sleep in real time.

use std::sync::Arc;
use std::time::SystemTime;

use tokio::time::Instant;

/// Where the access core reads the time of day.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// The current wall-clock time.
    fn now(&self) -> SystemTime;

    /// The instant on tokio's clock at which wall-clock time `at` comes (now when it has passed).
    fn instant_at(&self, at: SystemTime) -> Instant {
        Instant::now() + at.duration_since(self.now()).unwrap_or_default()
    }
}

/// The operating system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A wall clock that follows tokio's clock from a starting point: paused and advanced with it.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    wall: SystemTime,
    start: Instant,
}

impl TokioClock {
    /// Starts at the system's current time.
    pub fn new() -> Self {
        Self {
            wall: SystemTime::now(),
            start: Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now(&self) -> SystemTime {
        self.wall + Instant::now().saturating_duration_since(self.start)
    }
}

/// The clock services share.
pub type SharedClock = Arc<dyn Clock>;

/// The system clock, shared.
pub fn system() -> SharedClock {
    Arc::new(SystemClock)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_tokio_clock_moves_with_tokio_time() {
        let clock = TokioClock::new();
        let t0 = clock.now();
        let soon = clock.instant_at(t0 + Duration::from_secs(30));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(clock.now().duration_since(t0).unwrap(), Duration::from_secs(10));
        assert_eq!(soon - Instant::now(), Duration::from_secs(20));
        assert_eq!(clock.instant_at(t0), Instant::now(), "a past time is due now");
    }
}
