//! SQLSTATE codes the proxy sends, and the one mapping from a refusal's reason to its code.

use crate::access::Reason;

/// A five-character SQLSTATE (PostgreSQL Appendix A).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sqlstate(&'static str);

impl Sqlstate {
    pub const WARNING: Self = Self("01000");
    pub const CONNECTION_FAILURE: Self = Self("08001");
    pub const PROTOCOL_VIOLATION: Self = Self("08P01");
    pub const INVALID_AUTHORIZATION: Self = Self("28000");
    pub const INVALID_CATALOG_NAME: Self = Self("3D000");
    pub const INSUFFICIENT_PRIVILEGE: Self = Self("42501");
    pub const TOO_MANY_CONNECTIONS: Self = Self("53300");
    pub const ADMIN_SHUTDOWN: Self = Self("57P01");
    pub const CANNOT_CONNECT_NOW: Self = Self("57P03");
    pub const IO_ERROR: Self = Self("58030");

    pub fn as_str(self) -> &'static str {
        self.0
    }

    /// The code a PostgreSQL client gets for a refusal with `reason`.
    pub fn of(reason: Reason) -> Self {
        match reason {
            Reason::MaxConnections | Reason::MaxSessionsPerUser => Self::TOO_MANY_CONNECTIONS,
            Reason::UserMismatch | Reason::NoGrant | Reason::CertExpired => Self::INVALID_AUTHORIZATION,
            Reason::UnknownTarget => Self::INVALID_CATALOG_NAME,
            Reason::AuditUnavailable => Self::IO_ERROR,
            Reason::Resyncing => Self::CANNOT_CONNECT_NOW,
            Reason::Upstream => Self::CONNECTION_FAILURE,
            Reason::StartupParam
            | Reason::UnsafeSetting
            | Reason::ReadOnly
            | Reason::DenyKind
            | Reason::UnfilteredWrite
            | Reason::Unclassifiable
            | Reason::SettingDependent
            | Reason::LoginRole
            | Reason::SameMessage => Self::INSUFFICIENT_PRIVILEGE,
        }
    }
}
