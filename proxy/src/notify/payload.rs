//! What a notification says: the closed set of [`EventKind`]s, the [`Notification`] payload
//! and its two renderings (signed JSON and a Slack text line).

use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::model::{AccessLevel, Grant, GrantEnd, GrantId, Request, TargetName, UserName};

/// The kinds of events a webhook can subscribe to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum EventKind {
    #[serde(rename = "request.created")]
    RequestCreated,
    #[serde(rename = "request.decided")]
    RequestDecided,
    #[serde(rename = "grant.started")]
    GrantStarted,
    #[serde(rename = "grant.ended")]
    GrantEnded,
    #[serde(rename = "break_glass")]
    BreakGlass,
}

impl EventKind {
    /// Every kind, in documentation order.
    pub const ALL: [EventKind; 5] = [
        EventKind::RequestCreated,
        EventKind::RequestDecided,
        EventKind::GrantStarted,
        EventKind::GrantEnded,
        EventKind::BreakGlass,
    ];

    /// The name used in config, in the payload's `kind` and in `X-Jitgate-Event`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::RequestCreated => "request.created",
            EventKind::RequestDecided => "request.decided",
            EventKind::GrantStarted => "grant.started",
            EventKind::GrantEnded => "grant.ended",
            EventKind::BreakGlass => "break_glass",
        }
    }

    /// The kind named `s`, if any.
    pub fn parse(s: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The names, comma-separated, for error messages.
    pub fn names() -> String {
        EventKind::ALL.map(EventKind::as_str).join(", ")
    }
}

/// An access request as notifications describe it. The request workflow fills it in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RequestInfo {
    pub id: String,
    pub user: UserName,
    pub target: TargetName,
    pub access: AccessLevel,
    /// Requested lifetime, in seconds.
    pub duration_secs: u64,
    /// The requester's justification.
    pub reason: String,
    /// `pending`, `approved`, `denied`, `withdrawn` or `lapsed`.
    pub state: String,
    /// Who decided (approved or denied), once someone has.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<UserName>,
    /// The grant that resulted, once approved (or at once for break-glass).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grant_id: Option<GrantId>,
    /// The deciding policy (for the Slack channel; not in webhook payloads).
    #[serde(skip)]
    pub policy: String,
    /// Approvals given so far, and needed (for the Slack message).
    #[serde(skip)]
    pub approvals: (usize, u32),
}

impl RequestInfo {
    /// How `request` appears in notifications.
    pub fn of(request: &Request) -> Self {
        RequestInfo {
            id: request.id.to_string(),
            user: request.user.clone(),
            target: request.target.clone(),
            access: request.access,
            duration_secs: request.duration_secs,
            reason: request.reason.clone(),
            state: request.state.as_str().to_owned(),
            decided_by: request.decided_by.clone(),
            grant_id: request.grant_id.clone(),
            policy: request.policy.clone(),
            approvals: (request.approvals.len(), request.approvals_needed),
        }
    }
}

/// The `data` of a grant notification: the grant, and how it ended for `grant.ended`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GrantData {
    #[serde(flatten)]
    pub grant: Grant,
    /// `revoked` or `expired` (`grant.ended` only). Named `end_reason` because `reason` is
    /// the grant's own justification.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_reason: Option<GrantEnd>,
    /// Who revoked it (`grant.ended` by revocation only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoked_by: Option<UserName>,
}

/// The event-specific part of a notification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum NotificationData {
    Grant(GrantData),
    Request(RequestInfo),
}

/// One notification: `{"kind": ..., "ts": ..., "data": {...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Notification {
    pub kind: EventKind,
    #[serde(with = "crate::timefmt::serde_rfc3339")]
    pub ts: SystemTime,
    pub data: NotificationData,
}

impl Notification {
    /// A grant became active.
    pub fn grant_started(grant: &Grant) -> Self {
        Self::grant(EventKind::GrantStarted, grant, None, None)
    }

    /// A grant ended; `by` is the revoker (`None` for expiry).
    pub fn grant_ended(grant: &Grant, end: GrantEnd, by: Option<&UserName>) -> Self {
        Self::grant(EventKind::GrantEnded, grant, Some(end), by.cloned())
    }

    /// A request was filed and waits for a decision (or an automatic one).
    pub fn request_created(request: RequestInfo) -> Self {
        Self::request(EventKind::RequestCreated, request)
    }

    /// A request was approved or denied (`request.state` says which).
    pub fn request_decided(request: RequestInfo) -> Self {
        Self::request(EventKind::RequestDecided, request)
    }

    /// Access was taken through break-glass: granted at once, to be reviewed afterwards.
    pub fn break_glass(request: RequestInfo) -> Self {
        Self::request(EventKind::BreakGlass, request)
    }

    fn grant(kind: EventKind, grant: &Grant, end_reason: Option<GrantEnd>, revoked_by: Option<UserName>) -> Self {
        Self {
            kind,
            ts: SystemTime::now(),
            data: NotificationData::Grant(GrantData {
                grant: grant.clone(),
                end_reason,
                revoked_by,
            }),
        }
    }

    fn request(kind: EventKind, request: RequestInfo) -> Self {
        Self {
            kind,
            ts: SystemTime::now(),
            data: NotificationData::Request(request),
        }
    }

    /// The JSON body of `format = "json"`.
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain structs with string keys cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// One readable line for chat (`format = "slack"`), user text escaped for Slack.
    pub fn slack_text(&self) -> String {
        match &self.data {
            NotificationData::Grant(g) => {
                let gr = &g.grant;
                let length = gr.expires_at.duration_since(gr.created_at).unwrap_or_default();
                match (self.kind, g.end_reason) {
                    (EventKind::GrantEnded, end) => {
                        let how = match (end, &g.revoked_by) {
                            (Some(GrantEnd::Revoked), Some(by)) => format!("revoked by {}", esc(by.as_str())),
                            (Some(end), _) => end.as_str().to_owned(),
                            (None, _) => "ended".to_owned(),
                        };
                        format!(
                            ":lock: {}'s {} access to {} ended: {how} (grant {})",
                            esc(gr.user.as_str()),
                            gr.access,
                            gr.target,
                            gr.id
                        )
                    }
                    _ => format!(
                        ":unlock: {} got {} access to {} for {} (grant {}): {}",
                        esc(gr.user.as_str()),
                        gr.access,
                        gr.target,
                        human(length),
                        gr.id,
                        esc(&gr.reason)
                    ),
                }
            }
            NotificationData::Request(r) => {
                let what = format!(
                    "{} access to {} for {}",
                    r.access,
                    r.target,
                    human(Duration::from_secs(r.duration_secs))
                );
                let user = esc(r.user.as_str());
                let id = esc(&r.id);
                let reason = esc(&r.reason);
                match self.kind {
                    EventKind::BreakGlass => {
                        format!(":rotating_light: BREAK-GLASS: {user} took {what} (request {id}): {reason}")
                    }
                    EventKind::RequestDecided => {
                        let by = r
                            .decided_by
                            .as_ref()
                            .map(|u| format!(" by {}", esc(u.as_str())))
                            .unwrap_or_default();
                        let icon = if r.state == "approved" {
                            ":white_check_mark:"
                        } else {
                            ":no_entry:"
                        };
                        format!(
                            "{icon} {user}'s request for {what} was {}{by} (request {id})",
                            esc(&r.state)
                        )
                    }
                    _ => format!(":inbox_tray: {user} requests {what} (request {id}): {reason}"),
                }
            }
        }
    }

    /// The JSON body of `format = "slack"`.
    pub fn to_slack(&self) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({ "text": self.slack_text() })).unwrap_or_default()
    }
}

/// Whole seconds, humantime style ("30m", "1h 30m").
fn human(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

/// Slack's control characters in user-supplied text.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
