//! Agents: the join tokens admins create, and the agents that joined with them.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::{AgentName, TargetName, UserName};

/// A one-time join token as stored: the hash of its secret, never the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentToken {
    pub id: String,
    pub agent: AgentName,
    /// The targets the agent is admitted for.
    pub targets: Vec<TargetName>,
    /// SHA-256 of the secret part, hex.
    pub secret_sha256: String,
    pub created_by: UserName,
    pub created_at: SystemTime,
    pub expires_at: SystemTime,
}

/// An agent that joined: its name and the targets it was admitted for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub name: AgentName,
    pub targets: Vec<TargetName>,
    #[serde(with = "crate::timefmt::serde_rfc3339")]
    pub joined_at: SystemTime,
    /// The id of the token it joined with.
    pub token: String,
}

/// Why a join token was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRefusal {
    /// No such token, or the secret does not match.
    Unknown,
    /// The token was used before (a replay).
    Used,
    /// The token's time ran out.
    Expired,
}

impl TokenRefusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown join token",
            Self::Used => "join token already used",
            Self::Expired => "join token expired",
        }
    }
}

/// A one-time invite code as stored: whom it enrolls, with which roles, and the hash of its
/// secret, never the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invite {
    pub id: String,
    pub user: UserName,
    pub roles: Vec<super::Role>,
    /// SHA-256 of the secret part, hex.
    pub secret_sha256: String,
    pub created_by: UserName,
    pub created_at: SystemTime,
    pub expires_at: SystemTime,
}

/// A Slack account linked to a jitgate user: its clicks on Approve and Deny act as `user`
/// with `roles` (those of the certificate that asked for the link) until `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SlackLink {
    /// Slack's user ID (`U...`), within `team`.
    pub slack_user: String,
    pub team: String,
    pub user: UserName,
    pub roles: Vec<super::Role>,
    pub linked_at: SystemTime,
    pub expires_at: SystemTime,
}
