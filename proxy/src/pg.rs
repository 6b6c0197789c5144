//! The PostgreSQL listener: TLS negotiation (`SSLRequest` and direct TLS), connection budgets,
//! startup checks, grant lookup, upstream login, the relay and the bounded close.

mod admit;
mod close;
mod connection;
mod guard;
mod negotiate;
mod relay;
mod startup;
mod statements;
mod stream;
mod upstream;

use std::sync::Arc;

pub use admit::serve_connection;

/// Internals the criterion benches in `benches/` drive directly (the per-message statement
/// tracker and its guard). Not a stable API.
#[doc(hidden)]
pub mod bench_support {
    pub use super::guard::Guard;
    pub use super::statements::{Batch, Disposition, SessionFacts, TextLimits, Tracker};
}

use crate::audit::AuditLog;
use crate::budget::{Authenticated, UserSessions};
use crate::config::Config;
use crate::grants::Grants;
use crate::metrics::Metrics;
use crate::sessions::Sessions;

/// Why the proxy refuses a session or a statement: what the client is told, and a bounded
/// label for metrics and audit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// SQLSTATE for the client (28000, 42501, 58030, ...).
    pub sqlstate: &'static str,
    pub message: String,
    pub hint: Option<String>,
    /// Bounded label: startup refusals (`no_grant`, `startup_param`, ...) and statement
    /// refusals (`read_only`, `deny_kind`, `unfiltered_write`, `unclassifiable`,
    /// `unsafe_setting`, `setting_dependent`, `login_role`, `same_message`, `audit_unavailable`).
    pub reason: &'static str,
}

/// Everything a PostgreSQL connection task needs.
pub struct PgContext {
    pub config: Config,
    pub tls: Arc<rustls::ServerConfig>,
    pub grants: Arc<Grants>,
    pub sessions: Arc<Sessions>,
    pub audit: Arc<AuditLog>,
    pub metrics: Arc<Metrics>,
    pub shutdown: tokio_util::sync::CancellationToken,
    /// Connections past the TLS handshake (`limits.max_connections`).
    pub connections: Authenticated,
    /// Sessions per user (`limits.max_sessions_per_user`).
    pub users: Arc<UserSessions>,
}
