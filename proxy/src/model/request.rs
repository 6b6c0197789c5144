//! Access requests as stored, shown and audited: the request, its state and votes, and the
//! bodies of the API calls that make or list them. Plain data: the workflow is
//! `crate::requests`.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::{AccessLevel, GrantId, RequestId, Role, TargetName, UserName};

/// Where a request is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestState {
    /// Waiting for approvals.
    Pending,
    /// Granted: the grant in `grant_id` was created (or, for an extension, extended).
    Approved,
    /// An approver said no.
    Denied,
    /// The requester took it back.
    Withdrawn,
    /// Nobody decided it within `[requests] lapse_after`, or the grant to extend ended first.
    Lapsed,
}

impl RequestState {
    /// Stored and displayed form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Approved => "approved",
            Self::Denied => "denied",
            Self::Withdrawn => "withdrawn",
            Self::Lapsed => "lapsed",
        }
    }
}

impl std::fmt::Display for RequestState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// One approval given to a pending request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vote {
    pub by: UserName,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub comment: Option<String>,
    #[serde(with = "crate::timefmt::serde_rfc3339")]
    pub at: SystemTime,
}

/// A request as stored, audited and shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub id: RequestId,
    pub state: RequestState,
    /// The requester, from their certificate.
    pub user: UserName,
    /// The requester's roles when they asked.
    pub roles: Vec<Role>,
    pub target: TargetName,
    pub access: AccessLevel,
    /// Lifetime of the grant asked for, or (extensions) how much later the grant should end.
    pub duration_secs: u64,
    /// The requester's justification.
    pub reason: String,
    /// Extension requests: the live grant whose end moves `duration_secs` later.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub extends: Option<GrantId>,
    /// Break-glass access: granted at once, flagged for review.
    #[serde(default)]
    pub break_glass: bool,
    /// The policy that decided it.
    pub policy: String,
    /// Distinct approvals needed (0 when granted at once).
    pub approvals_needed: u32,
    /// Roles whose holders may approve or deny it.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub approver_roles: Vec<Role>,
    /// Approvals given so far.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub approvals: Vec<Vote>,
    #[serde(with = "crate::timefmt::serde_rfc3339")]
    pub created_at: SystemTime,
    /// When it lapses if still pending.
    #[serde(with = "crate::timefmt::serde_rfc3339")]
    pub lapses_at: SystemTime,
    #[serde(with = "crate::timefmt::serde_rfc3339_opt", default)]
    pub decided_at: Option<SystemTime>,
    /// Who decided: the last approver, the denier, or the requester for a withdrawal. `None`
    /// for decisions made by policy (auto, break-glass) and for lapses.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub decided_by: Option<UserName>,
    /// Why it ended as it did, in words (the denial reason, "approved automatically by
    /// policy X", ...).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub note: Option<String>,
    /// The grant created (or extended) on approval.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub grant_id: Option<GrantId>,
}

impl Request {
    /// Ends the request in `state` at `at`, decided by `by` (none for policy and lapse), with
    /// `note`.
    pub fn close(&mut self, state: RequestState, by: Option<&UserName>, note: String, at: SystemTime) {
        self.state = state;
        self.decided_at = Some(at);
        self.decided_by = by.cloned();
        self.note = Some(note);
    }
}

/// Body of `POST /v1/requests`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewRequest {
    pub target: String,
    pub access: AccessLevel,
    pub duration_secs: u64,
    pub reason: String,
    #[serde(default)]
    pub break_glass: bool,
}

/// Body of `POST /v1/grants/{id}/extensions`: ask for the grant to end `duration_secs` later.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewExtension {
    pub duration_secs: u64,
    pub reason: String,
}

/// Which requests to list. Without flags: every request the caller may see.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListFilter {
    /// Only the caller's own requests.
    pub mine: bool,
    /// Only pending requests.
    pub pending: bool,
    /// Only break-glass requests.
    pub break_glass: bool,
}
