//! What identifies a session, whatever protocol carries it.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::{AccessLevel, GrantId, Role, SessionId, TargetName, UserName};

/// Who a session is, under which grant, to what: the one field list that the session
/// registry, the `session.start` and `session.end` records and every statement record take
/// their facts from. Serialized flat into audit records, with the id as `session_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionMeta {
    #[serde(rename = "session_id")]
    pub id: SessionId,
    pub grant_id: GrantId,
    pub user: UserName,
    pub roles: Vec<Role>,
    pub target: TargetName,
    /// The database the client asked for on the target (for PostgreSQL, the startup's
    /// `database` after the target name).
    pub database: String,
    pub access: AccessLevel,
    pub client_addr: SocketAddr,
    /// The role the proxy logs in to the target as (PostgreSQL; the login user for SSH): the
    /// access level's role, or the grant's temporary role in `credentials.mode = "ephemeral"`.
    #[serde(default, skip_serializing_if = "str::is_empty")]
    pub upstream_role: std::sync::Arc<str>,
}
