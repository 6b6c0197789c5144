//! Connection budgets: how many connections a listener holds, and whose.
//!
//! - [`Unauthenticated`]: connections that have not yet presented a valid client certificate,
//!   per listener (`limits.max_unauthenticated`). When it is full, a new connection is
//!   admitted anyway and an older one is closed ([`Unauthenticated::admit`]), so the accept
//!   loop never stops accepting and a flood cannot keep anyone out by holding slots.
//! - [`Authenticated`]: connections past the TLS handshake with a valid certificate, per
//!   listener (`limits.max_connections`). A full budget is refused in the listener's own
//!   protocol (`53300` on the postgres listener), never with silence.
//! - [`UserSessions`]: live PostgreSQL sessions per user (`limits.max_sessions_per_user`).
//!
//! Every refusal is counted in `jitgate_connections_refused_total{listener, reason}`. The
//! budgets only count; the connection tasks decide what to tell the client.

mod unauthenticated;
mod users;

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use unauthenticated::{Ticket, Unauthenticated};
pub use users::{UserSessions, UserSlot};

/// Connections past the TLS handshake with a valid certificate on one listener.
pub struct Authenticated {
    permits: Arc<Semaphore>,
    max: usize,
}

impl Authenticated {
    /// A budget of `max` connections.
    pub fn new(max: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// A slot, held until the permit drops; `None` when all `max` are taken.
    pub fn try_take(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.permits).try_acquire_owned().ok()
    }

    /// The configured size (`limits.max_connections`).
    pub fn max(&self) -> usize {
        self.max
    }
}
