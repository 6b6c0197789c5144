//! Durable grant storage behind a trait, so the embedded SQLite store can be joined by a
//! shared PostgreSQL store for scale-out. The in-memory grant table is rebuilt from
//! [`GrantStore::active`] at start-up.

mod sqlite;

use std::time::SystemTime;

pub use sqlite::SqliteStore;

use crate::grants::{Grant, GrantEnd};
use crate::types::GrantId;

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
#[error("grant store: {0}")]
pub struct StoreError(pub String);

/// Where grants persist.
pub trait GrantStore: Send + Sync + 'static {
    /// Records a new active grant.
    fn insert(&self, grant: &Grant) -> Result<(), StoreError>;
    /// Marks a grant ended; returns false when it was not active.
    fn end(&self, id: &GrantId, end: GrantEnd, at: SystemTime) -> Result<bool, StoreError>;
    /// Moves an active grant's expiry; returns false when it was not active.
    fn extend(&self, id: &GrantId, expires_at: SystemTime) -> Result<bool, StoreError>;
    /// Every grant not yet ended (some may be past their expiry time).
    fn active(&self) -> Result<Vec<Grant>, StoreError>;
}
