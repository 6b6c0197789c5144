//! Grants as stored, shown and audited: what a grant is, how it ended, what an admin asks
//! for, and when it ends. Plain data: the live table is `crate::grants`.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::{AccessLevel, GrantId, TargetName, UserName};

/// A grant as stored and shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub id: GrantId,
    pub user: UserName,
    pub target: TargetName,
    pub access: AccessLevel,
    pub reason: String,
    pub created_by: UserName,
    #[serde(with = "crate::timefmt::serde_rfc3339")]
    pub created_at: SystemTime,
    #[serde(with = "crate::timefmt::serde_rfc3339")]
    pub expires_at: SystemTime,
}

/// How a grant ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantEnd {
    Expired,
    Revoked,
}

impl GrantEnd {
    /// Stored and displayed form.
    pub fn as_str(self) -> &'static str {
        match self {
            GrantEnd::Expired => "expired",
            GrantEnd::Revoked => "revoked",
        }
    }
}

/// When a grant ends, as a monotonic instant (for timers) and as wall-clock time (for people
/// and the store). An extension replaces it; sessions and the reaper watch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    pub instant: Instant,
    pub at: SystemTime,
}

/// What an admin asks for when creating a grant directly.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewGrant {
    pub user: UserName,
    pub target: TargetName,
    pub access: AccessLevel,
    /// Lifetime in seconds.
    pub duration_secs: u64,
    pub reason: String,
}
