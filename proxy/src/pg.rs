//! The PostgreSQL listener: TLS negotiation (`SSLRequest` and direct TLS), connection budgets,
//! startup checks, grant lookup, upstream login, the relay and the bounded close.

mod admit;
mod close;
mod connection;
mod guard;
mod negotiate;
mod relay;
mod replay;
pub mod sqlstate;
mod startup;
mod statements;
mod stream;
pub mod upstream;

use std::sync::Arc;

pub(crate) use admit::forward_cancel;
pub use admit::serve_connection;

/// Internals the criterion benches in `benches/` drive directly (the per-message statement
/// tracker and its guard). Not a stable API.
#[doc(hidden)]
pub mod bench_support {
    pub use super::guard::Guard;
    pub use super::replay::{replay, Read, Replayed};
    pub use super::statements::{Batch, Disposition, TextLimits, Tracker};
}

use crate::access::Admission;
use crate::audit::AuditLog;
use crate::budget::Authenticated;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::sessions::Sessions;

/// Everything a PostgreSQL connection task needs.
pub struct PgContext {
    pub config: Config,
    pub tls: Arc<rustls::ServerConfig>,
    /// Where every session is admitted (and later cut, through its lease).
    pub admission: Arc<Admission>,
    /// Opens upstream connections, TLS built once per target.
    pub connector: upstream::Connector,
    /// How sessions log in: the level's role, or the grant's temporary role.
    pub credentials: Arc<crate::credentials::Credentials>,
    pub sessions: Arc<Sessions>,
    pub audit: Arc<AuditLog>,
    pub metrics: Arc<Metrics>,
    pub shutdown: tokio_util::sync::CancellationToken,
    /// Connections past the TLS handshake (`limits.max_connections`).
    pub connections: Authenticated,
    /// The shared store, when replicas share one: where CancelRequests for another
    /// replica's keys go.
    pub cluster: Option<Arc<dyn crate::store::Store>>,
}
