//! Durable grant and request storage behind traits, so the embedded SQLite store can be joined
//! by a shared PostgreSQL store for scale-out. The in-memory grant table is rebuilt from
//! [`GrantStore::active`] at start-up; requests are read from the store when asked for.

mod sqlite;

use std::time::SystemTime;

pub use sqlite::SqliteStore;

use crate::model::{Grant, GrantEnd, GrantId, Request, RequestId, RequestState, UserName};

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

/// Which requests [`RequestStore::requests`] returns, newest first.
#[derive(Debug, Clone, Default)]
pub struct RequestQuery {
    /// Only this requester's.
    pub user: Option<UserName>,
    /// Only requests in this state.
    pub state: Option<RequestState>,
    /// Only break-glass requests.
    pub break_glass: bool,
    /// At most this many (0: no limit).
    pub limit: usize,
}

/// Where access requests persist. Every change of a request rewrites its whole record.
pub trait RequestStore: Send + Sync + 'static {
    /// Records a new request.
    fn insert_request(&self, request: &Request) -> Result<(), StoreError>;
    /// Replaces a stored request with `request` (same id).
    fn update_request(&self, request: &Request) -> Result<(), StoreError>;
    /// The request with id `id`.
    fn request(&self, id: &RequestId) -> Result<Option<Request>, StoreError>;
    /// Requests matching `query`, newest first.
    fn requests(&self, query: &RequestQuery) -> Result<Vec<Request>, StoreError>;
    /// Pending requests whose lapse time is at or before `now`.
    fn pending_due(&self, now: SystemTime) -> Result<Vec<Request>, StoreError>;
}
