//! The plain types every layer shares: identifiers, grants, requests and session metadata.
//! They carry no behaviour beyond validation and formatting, and depend on nothing else in the
//! crate, so the access core, the store, the audit log and the data paths all build on them
//! without import cycles.

mod agent;
mod grant;
mod ids;
mod request;
mod session;

pub use agent::{AgentRecord, AgentToken, Invite, SlackLink, TokenRefusal};
pub use grant::{Deadline, Grant, GrantEnd, NewGrant};
pub use ids::{AccessLevel, AgentName, GrantId, InvalidName, RequestId, Role, SessionId, TargetName, UserName};
pub use request::{ListFilter, NewExtension, NewRequest, Request, RequestState, Vote};
pub use session::SessionMeta;

/// `skip_serializing_if` for a shared string (`upstream_role`).
pub(crate) fn str_is_empty(s: &std::sync::Arc<str>) -> bool {
    s.is_empty()
}

/// The `upstream_role` of records written before it was recorded.
pub(crate) fn no_role() -> std::sync::Arc<str> {
    std::sync::Arc::from("")
}
