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
