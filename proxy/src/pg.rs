//! The PostgreSQL listener: TLS negotiation (`SSLRequest` and direct TLS), startup checks,
//! grant lookup, upstream login and the relay.

mod connection;
mod guard;
mod negotiate;
mod relay;
mod startup;
mod statements;
mod stream;
mod upstream;

use std::sync::Arc;

pub use connection::serve_connection;

use crate::audit::AuditLog;
use crate::config::Config;
use crate::grants::Grants;
use crate::metrics::Metrics;
use crate::sessions::Sessions;

/// Everything a PostgreSQL connection task needs.
pub struct PgContext {
    pub config: Config,
    pub tls: Arc<rustls::ServerConfig>,
    pub grants: Arc<Grants>,
    pub sessions: Arc<Sessions>,
    pub audit: Arc<AuditLog>,
    pub metrics: Arc<Metrics>,
    pub shutdown: tokio_util::sync::CancellationToken,
}
