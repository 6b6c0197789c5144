//! Why the proxy refuses a session or a statement, without any wire protocol in it. Each data
//! path renders a [`Refusal`] natively: PostgreSQL as an `ErrorResponse` whose SQLSTATE comes
//! from the reason (`pg::sqlstate`), later SSH as a disconnect, MySQL as an ERR packet.

use std::fmt;

/// The bounded label of a refusal: the `reason` of `jitgate_sessions_denied_total` and of
/// audit `session.denied`, and the `denied_by` of a refused statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    // Connection limits.
    MaxConnections,
    MaxSessionsPerUser,
    // Startup, before admission.
    StartupParam,
    UserMismatch,
    // Admission.
    UnknownTarget,
    NoGrant,
    CertExpired,
    AuditUnavailable,
    /// The replica is re-reading its grants (after a store outage or a gap in the log).
    Resyncing,
    // After admission, while logging in upstream.
    Upstream,
    UnsafeSetting,
    // Statements.
    ReadOnly,
    DenyKind,
    UnfilteredWrite,
    Unclassifiable,
    SettingDependent,
    LoginRole,
    SameMessage,
}

impl Reason {
    /// The label as it appears in metrics and audit records.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::MaxConnections => "max_connections",
            Reason::MaxSessionsPerUser => "max_sessions_per_user",
            Reason::StartupParam => "startup_param",
            Reason::UserMismatch => "user_mismatch",
            Reason::UnknownTarget => "unknown_target",
            Reason::NoGrant => "no_grant",
            Reason::CertExpired => "cert_expired",
            Reason::AuditUnavailable => "audit_unavailable",
            Reason::Resyncing => "resyncing",
            Reason::Upstream => "upstream",
            Reason::UnsafeSetting => "unsafe_setting",
            Reason::ReadOnly => "read_only",
            Reason::DenyKind => "deny_kind",
            Reason::UnfilteredWrite => "unfiltered_write",
            Reason::Unclassifiable => "unclassifiable",
            Reason::SettingDependent => "setting_dependent",
            Reason::LoginRole => "login_role",
            Reason::SameMessage => "same_message",
        }
    }

    /// Refusals for lack of room (connection or per-user limits) rather than of access: counted
    /// in `jitgate_connections_refused_total` instead of `jitgate_sessions_denied_total`.
    pub fn is_limit(self) -> bool {
        matches!(self, Reason::MaxConnections | Reason::MaxSessionsPerUser)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refusal: its reason, what the user is told, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: Reason,
    pub message: String,
    pub hint: Option<String>,
}

impl Refusal {
    /// The one constructor; add a hint with [`Refusal::hint`].
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
            hint: None,
        }
    }

    /// The same refusal with a hint.
    #[must_use]
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}
