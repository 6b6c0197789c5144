//! Durable grants and requests behind one async trait, so the embedded SQLite store can be
//! joined by a shared PostgreSQL store for several replicas.
//!
//! Every state change is a compare-and-set: a grant is ended only while it is live, extended
//! only from the expiry the caller saw, and a request is replaced only at the version the
//! caller read. With several writers exactly one wins; the others get [`StoreError::Conflict`]
//! and re-read (or give up). Each committed change is also published on [`Store::changes`],
//! which the grant table applies, so changes from any writer (another replica later) reach
//! the in-memory table the same way ([`PgStore`]: through its change log, on every replica).
//! Errors say what the caller does next: retry or degrade
//! (`Unavailable`), re-read (`Conflict`), or report (`NotFound`).

mod postgres;
mod sqlite;

use std::time::SystemTime;

use async_trait::async_trait;
use tokio::sync::broadcast;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

use crate::model::{
    AgentName, AgentRecord, AgentToken, Grant, GrantEnd, GrantId, Invite, Request, RequestId, RequestState, SessionId,
    SlackLink, TokenRefusal, UserName,
};
use crate::sessions::{CancelKey, SessionInfo};

/// Why a store operation did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached or failed; nothing changed. Retry later, or degrade.
    #[error("the store is unreachable: {0}")]
    Unavailable(String),
    /// Someone else changed it first: the grant is no longer live or moved, or the request is
    /// not at the version read. Read it again.
    #[error("changed by someone else first")]
    Conflict,
    /// No such grant or request.
    #[error("not found")]
    NotFound,
}

/// A committed change, as [`Store::changes`] publishes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    GrantCreated(Grant),
    GrantExtended {
        id: GrantId,
        expires_at: SystemTime,
    },
    GrantEnded {
        id: GrantId,
        end: GrantEnd,
    },
    RequestChanged {
        id: RequestId,
        version: u64,
    },
    /// An admin killed this session on some replica: whichever replica holds it cuts it.
    SessionKilled {
        id: SessionId,
    },
    /// An agent was removed on some replica: every replica ends its link.
    AgentRemoved {
        name: AgentName,
    },
    /// Changes may have been missed (the shared store's log had a gap): re-read everything.
    Resync,
}

/// A stored value and the version a compare-and-set must name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned<T> {
    pub value: T,
    pub version: u64,
}

/// A grant change made in the same transaction as a request change.
#[derive(Debug, Clone, Copy)]
pub enum GrantWrite<'a> {
    /// The request's approval creates this grant.
    Insert(&'a Grant),
    /// The request's approval moves a live grant's expiry from `from` to `to`.
    Extend {
        id: &'a GrantId,
        from: SystemTime,
        to: SystemTime,
    },
}

/// Which requests [`Store::requests`] returns, newest first.
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

/// Where grants and requests persist. Implementations never block the caller's thread.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Records a new live grant.
    async fn insert_grant(&self, grant: &Grant) -> Result<(), StoreError>;
    /// Ends a live grant: `Conflict` when it had already ended, `NotFound` when unknown.
    async fn end_grant(&self, id: &GrantId, end: GrantEnd, at: SystemTime) -> Result<(), StoreError>;
    /// Moves a live grant's expiry from `from` to `to`: `Conflict` when it is no longer live or
    /// its expiry is no longer `from`.
    async fn extend_grant(&self, id: &GrantId, from: SystemTime, to: SystemTime) -> Result<(), StoreError>;
    /// Every grant not yet ended (some may be past their expiry).
    async fn live_grants(&self) -> Result<Vec<Grant>, StoreError>;

    /// Records a new request at version 1.
    async fn insert_request(&self, request: &Request) -> Result<(), StoreError>;
    /// Replaces a request stored at `version` (and makes `grant`, in the same transaction);
    /// returns the new version. `Conflict` when the request or the grant changed meanwhile.
    async fn update_request(
        &self,
        request: &Request,
        version: u64,
        grant: Option<GrantWrite<'_>>,
    ) -> Result<u64, StoreError>;
    /// The request `id` and its version.
    async fn request(&self, id: &RequestId) -> Result<Option<Versioned<Request>>, StoreError>;
    /// Requests matching `query`, newest first.
    async fn requests(&self, query: &RequestQuery) -> Result<Vec<Request>, StoreError>;
    /// Pending requests whose lapse time is at or before `now`.
    async fn pending_due(&self, now: SystemTime) -> Result<Vec<Versioned<Request>>, StoreError>;

    /// Records a new agent join token.
    async fn insert_agent_token(&self, token: &AgentToken) -> Result<(), StoreError>;
    /// Spends the join token `id` if its secret hashes to `secret_sha256`, it is unused and
    /// not expired at `now`, and records (or replaces) its agent, in one transaction. A
    /// refused token changes nothing but is told apart (unknown, used, expired).
    async fn redeem_agent_token(
        &self,
        id: &str,
        secret_sha256: &str,
        now: SystemTime,
    ) -> Result<Result<AgentRecord, TokenRefusal>, StoreError>;
    /// Records a new invite code.
    async fn insert_invite(&self, invite: &Invite) -> Result<(), StoreError>;
    /// Spends the invite `id` if its secret hashes to `secret_sha256`, it is unused and not
    /// expired at `now`, in one compare-and-set: of two redemptions, one wins.
    async fn redeem_invite(
        &self,
        id: &str,
        secret_sha256: &str,
        now: SystemTime,
    ) -> Result<Result<Invite, TokenRefusal>, StoreError>;
    /// Records (or replaces) the link of a Slack account to a jitgate user.
    async fn upsert_slack_link(&self, link: &SlackLink) -> Result<(), StoreError>;
    /// The link of Slack user `slack_user` in `team`, expired or not.
    async fn slack_link(&self, team: &str, slack_user: &str) -> Result<Option<SlackLink>, StoreError>;
    /// Every agent that joined, by name.
    async fn agents(&self) -> Result<Vec<AgentRecord>, StoreError>;
    /// Forgets an agent (its links and renewals are refused from then on) and publishes
    /// [`Change::AgentRemoved`], so every replica ends its link; `NotFound` when it had not
    /// joined.
    async fn remove_agent(&self, name: &AgentName) -> Result<(), StoreError>;

    /// Every change committed from now on, in commit order. A receiver that falls behind gets
    /// `Lagged` and must re-read what it follows.
    fn changes(&self) -> broadcast::Receiver<Change>;

    // The cluster: what several replicas on one shared store tell each other. A store of one
    // replica (SQLite) has no others, and these do nothing.

    /// This replica's id when replicas share the store; `None` alone.
    fn replica(&self) -> Option<&str> {
        None
    }
    /// Why the store is degraded (it did not answer the last time it was used), or `None`.
    fn degraded(&self) -> Option<String> {
        None
    }
    /// Publishes this replica's established sessions for the others' listings; also says
    /// that this replica is alive.
    async fn publish_sessions(&self, _sessions: &[SessionInfo]) -> Result<(), StoreError> {
        Ok(())
    }
    /// The sessions every other replica alive in the last [`PEER_SEEN`] published, by
    /// replica id.
    async fn peer_sessions(&self) -> Result<Vec<(String, Vec<SessionInfo>)>, StoreError> {
        Ok(Vec::new())
    }
    /// Asks every replica to kill session `id`: a [`Change::SessionKilled`] in the log, so a
    /// replica that reconnects later still applies it.
    async fn kill_session(&self, _id: &SessionId) -> Result<(), StoreError> {
        Ok(())
    }
    /// Passes a CancelRequest this replica cannot route to the others. Not logged: a cancel
    /// is for the query running now, never for one a late replica would run into.
    async fn send_cancel(&self, _key: CancelKey) -> Result<(), StoreError> {
        Ok(())
    }
    /// CancelRequests other replicas passed on (`None` alone).
    fn cancels(&self) -> Option<broadcast::Receiver<CancelKey>> {
        None
    }
    /// Where agents reach the replicas alive in the last [`PEER_SEEN`] (each one's
    /// `[agents] advertise`, this one's included), sorted, each once. Empty alone.
    async fn agent_addresses(&self) -> Result<Vec<String>, StoreError> {
        Ok(Vec::new())
    }
}

/// How recently a replica must have published its sessions to be listed.
pub const PEER_SEEN: std::time::Duration = std::time::Duration::from_secs(15);
