//! The audit event types: a typed, versioned [`AuditEvent`] per thing that happens, and the
//! [`AuditRecord`] that stamps it with the schema version and time. How records are chained
//! and written lives in the sibling modules.

use std::net::SocketAddr;
use std::time::SystemTime;

use std::borrow::Cow;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::model::{
    AccessLevel, AgentName, Grant, GrantId, Request, Role, SessionId, SessionMeta, TargetName, UserName,
};

/// Version of the record schema; bumped on incompatible changes.
pub const SCHEMA_VERSION: u32 = 1;

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionEndReason {
    /// The client closed the connection (Terminate or EOF).
    ClientClosed,
    /// The target closed the connection.
    UpstreamClosed,
    /// The grant reached its expiry time.
    GrantExpired,
    /// An admin revoked the grant.
    GrantRevoked,
    /// An admin killed the session.
    Killed,
    /// The client certificate expired.
    CertExpired,
    /// The proxy shut down.
    Shutdown,
    /// A network or protocol error on either side.
    Error,
    /// The link to the agent that reaches the target was lost (the agent was killed or
    /// stopped, or its link stopped answering keepalives).
    AgentLost,
}

impl SessionEndReason {
    /// The reason as a metric label and audit value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientClosed => "client_closed",
            Self::UpstreamClosed => "upstream_closed",
            Self::GrantExpired => "grant_expired",
            Self::GrantRevoked => "grant_revoked",
            Self::Killed => "killed",
            Self::CertExpired => "cert_expired",
            Self::Shutdown => "shutdown",
            Self::Error => "error",
            Self::AgentLost => "agent_lost",
        }
    }
}

/// Why the audit log was reopened (`audit.reopened`): what the writer found when it checked
/// the file after a write, or who asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReopenReason {
    /// The file was removed (no name links it any more).
    Deleted,
    /// The path names another file, or none, while the old one still exists elsewhere.
    Renamed,
    /// The file is shorter than what the proxy wrote to it (copytruncate, `> file`).
    Truncated,
    /// SIGHUP to `jitgate serve`.
    Signal,
    /// `jitgate audit reopen` (`POST /v1/audit/reopen`).
    Command,
}

impl ReopenReason {
    /// The reason as a metric label and audit value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deleted => "deleted",
            Self::Renamed => "renamed",
            Self::Truncated => "truncated",
            Self::Signal => "signal",
            Self::Command => "command",
        }
    }
}

impl std::fmt::Display for ReopenReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a statement reached the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StatementPath {
    /// A simple `Query` message (one record per statement in it).
    Simple,
    /// The extended protocol: the text from `Parse`, executed by `Execute`.
    Extended,
    /// Data of a `COPY ... FROM STDIN` / `TO STDOUT` (its statement came by one of the above).
    Copy,
    /// A `FunctionCall` message.
    FunctionCall,
}

/// Whether the proxy let a statement through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Allowed,
    Denied,
}

/// How a statement ended on the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    /// `CommandComplete` (or an empty query): the tag and the row count it carries.
    Ok { tag: String, rows: Option<u64> },
    /// `ErrorResponse`.
    Error { sqlstate: String, message: String },
    /// Skipped by the server after an earlier error in the same batch, or the session ended
    /// before an answer came.
    NotExecuted,
    /// `PortalSuspended`: the row limit of `Execute` was reached; more `Execute`s may follow.
    Suspended { rows: u64 },
    /// The session ended (cut or closed) before the server answered: the statement may or may
    /// not have run.
    Interrupted,
}

/// A shell recording named by `session.end`: its file, the SHA-256 of its bytes and their count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordingRef {
    pub file: String,
    pub sha256: String,
    pub bytes: u64,
}

/// One audit event. The `event` field names the variant.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event")]
pub enum AuditEvent {
    #[serde(rename = "grant.created")]
    GrantCreated { grant: Grant },
    #[serde(rename = "grant.revoked")]
    GrantRevoked {
        grant_id: GrantId,
        user: UserName,
        target: TargetName,
        access: AccessLevel,
        by: UserName,
    },
    #[serde(rename = "grant.extended")]
    GrantExtended {
        grant_id: GrantId,
        user: UserName,
        target: TargetName,
        access: AccessLevel,
        /// The new expiry.
        #[serde(with = "crate::timefmt::serde_rfc3339")]
        expires_at: SystemTime,
        by: UserName,
    },
    #[serde(rename = "grant.expired")]
    GrantExpired {
        grant_id: GrantId,
        user: UserName,
        target: TargetName,
        access: AccessLevel,
    },
    /// A request was filed (pending, or about to be granted by policy).
    #[serde(rename = "request.created")]
    RequestCreated { request: Request },
    /// No policy allows a request: it was refused at once and never stored.
    #[serde(rename = "request.refused")]
    RequestRefused {
        user: UserName,
        roles: Vec<Role>,
        target: String,
        access: AccessLevel,
        duration_secs: u64,
        break_glass: bool,
        /// The requester's justification.
        reason: String,
        /// Why it was refused.
        refusal: String,
    },
    /// One approver approved a pending request (`approvals` of `approvals_needed` so far).
    #[serde(rename = "request.approval")]
    RequestApproval {
        request_id: crate::model::RequestId,
        /// The requester.
        user: UserName,
        by: UserName,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        comment: Option<String>,
        approvals: u32,
        approvals_needed: u32,
    },
    /// Granted: `request.grant_id` names the grant created or extended.
    #[serde(rename = "request.approved")]
    RequestApproved { request: Request },
    #[serde(rename = "request.denied")]
    RequestDenied { request: Request },
    #[serde(rename = "request.withdrawn")]
    RequestWithdrawn { request: Request },
    #[serde(rename = "request.lapsed")]
    RequestLapsed { request: Request },
    #[serde(rename = "session.denied")]
    SessionDenied {
        user: UserName,
        target: String,
        client_addr: SocketAddr,
        /// Bounded reason code, as in the `jitgate_sessions_denied_total` metric.
        code: String,
        /// The message the client was given.
        reason: String,
    },
    #[serde(rename = "session.start")]
    SessionStart {
        #[serde(flatten)]
        session: SessionMeta,
    },
    /// Written, and handed to the operating system, before the statement is forwarded.
    #[serde(rename = "statement")]
    Statement {
        session_id: SessionId,
        /// Per-session sequence number; `statement.end` refers to it.
        statement: u64,
        grant_id: GrantId,
        user: UserName,
        target: TargetName,
        access: AccessLevel,
        protocol: StatementPath,
        /// Statement text, secrets redacted, capped in length.
        text: String,
        /// Bound parameters: text as sent, binary as hex, capped; `null` for SQL NULL.
        #[serde(skip_serializing_if = "Vec::is_empty", default)]
        params: Vec<Option<String>>,
        /// Borrowed from the classifier's names when written (no allocation per statement).
        class: Cow<'static, str>,
        kind: Cow<'static, str>,
        #[serde(skip_serializing_if = "Vec::is_empty", default)]
        tables: Vec<String>,
        /// The role the proxy logged in to the target as: the level's role, or the grant's
        /// temporary role (`credentials.mode = "ephemeral"`). Shared with the session.
        #[serde(skip_serializing_if = "str::is_empty", default)]
        upstream_role: Arc<str>,
        /// The role statements run as, when changed with SET ROLE / SET SESSION AUTHORIZATION.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        effective_role: Option<String>,
        decision: Decision,
        /// Why the proxy refused it (only with `decision = denied`).
        #[serde(skip_serializing_if = "Option::is_none", default)]
        denied_by: Option<String>,
    },
    /// How a statement ended: written when the server answers.
    #[serde(rename = "statement.end")]
    StatementEnd {
        session_id: SessionId,
        statement: u64,
        outcome: Outcome,
        /// Time from forwarding to the server's answer, in microseconds.
        duration_us: u64,
        /// COPY only: data bytes and rows moved.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        copy_bytes: Option<u64>,
    },
    #[serde(rename = "session.end")]
    SessionEnd {
        #[serde(flatten)]
        session: SessionMeta,
        reason: SessionEndReason,
        bytes_from_client: u64,
        bytes_to_client: u64,
        duration_ms: u64,
        /// SSH shells: the recordings of the session, each with its SHA-256, so the chain
        /// covers them (`jitgate audit verify` checks them).
        #[serde(skip_serializing_if = "Vec::is_empty", default)]
        recordings: Vec<RecordingRef>,
    },
    /// One file operation over SFTP (`sftp`, `scp`): `open` (with its mode), `close` (with the
    /// bytes read and written through the handle; `not_closed` when the channel ended with
    /// the file open), `remove`, `rename`, `mkdir`, `rmdir`, `setstat`, `symlink`,
    /// `hardlink`, `copy`, or `extended` for an extension the proxy does not know (its name
    /// in `path`), with the server's status.
    #[serde(rename = "ssh.sftp")]
    SshSftp {
        #[serde(flatten)]
        session: SessionMeta,
        op: String,
        path: String,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        to: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        mode: Option<String>,
        status: String,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        bytes_read: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        bytes_written: Option<u64>,
    },
    /// A port forward over SSH (`ssh -L`, `ssh -W`, ProxyJump): where to, and either how it
    /// ended (bytes each way, duration) or why it was refused.
    #[serde(rename = "ssh.forward")]
    SshForward {
        #[serde(flatten)]
        session: SessionMeta,
        host: String,
        port: u32,
        allowed: bool,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        refused: Option<String>,
        duration_ms: u64,
        bytes_in: u64,
        bytes_out: u64,
    },
    /// One command run over SSH (`ssh host command`, scp's remote side): the command line,
    /// its exit status (none when the channel ended without one), how long it ran and the
    /// bytes each way; `cut` when the session was cut under it.
    #[serde(rename = "ssh.exec")]
    SshExec {
        #[serde(flatten)]
        session: SessionMeta,
        command: String,
        exit_status: Option<u32>,
        duration_ms: u64,
        bytes_in: u64,
        bytes_out: u64,
        cut: bool,
    },
    /// A certificate was given to an engineer: by an OIDC login (`subject` is the provider's
    /// `sub`), an invite (`subject` is the invite's id) or a renewal. Written before the
    /// certificate is returned.
    #[serde(rename = "login.succeeded")]
    LoginSucceeded {
        /// `oidc`, `invite`, `renew`, or `console` (a web console sign-in: no certificate;
        /// `cert_expires_at` is then when the console session ends).
        method: String,
        user: UserName,
        roles: Vec<Role>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        subject: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        remote_addr: Option<SocketAddr>,
        #[serde(with = "crate::timefmt::serde_rfc3339")]
        cert_expires_at: SystemTime,
    },
    /// A login was refused, with the reason (the user when the refusal came after the ID token
    /// or certificate named one).
    #[serde(rename = "login.refused")]
    LoginRefused {
        method: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<UserName>,
        reason: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        remote_addr: Option<SocketAddr>,
    },
    /// A Slack account was linked to a jitgate user (the Slack user confirmed in Slack).
    #[serde(rename = "slack.linked")]
    SlackLinked {
        user: UserName,
        roles: Vec<Role>,
        team: String,
        slack_user: String,
        #[serde(with = "crate::timefmt::serde_rfc3339")]
        expires_at: SystemTime,
    },
    /// A Slack interaction was refused: a bad or old signature, a replay, an unlinked
    /// account, or an approval the rules refuse.
    #[serde(rename = "slack.refused")]
    SlackRefused {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        slack_user: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<UserName>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request_id: Option<String>,
        reason: String,
    },
    /// An admin created an invite code (the code itself is never recorded).
    #[serde(rename = "invite.created")]
    InviteCreated {
        invite_id: String,
        user: UserName,
        roles: Vec<Role>,
        by: UserName,
        #[serde(with = "crate::timefmt::serde_rfc3339")]
        expires_at: SystemTime,
    },
    /// An admin created a join token for an agent (the token itself is never recorded).
    #[serde(rename = "agent.token_created")]
    AgentTokenCreated {
        token_id: String,
        agent: AgentName,
        targets: Vec<TargetName>,
        by: UserName,
        #[serde(with = "crate::timefmt::serde_rfc3339")]
        expires_at: SystemTime,
    },
    /// An agent joined with a token and got its first certificate.
    #[serde(rename = "agent.joined")]
    AgentJoined {
        agent: AgentName,
        targets: Vec<TargetName>,
        token_id: String,
        remote_addr: SocketAddr,
        #[serde(with = "crate::timefmt::serde_rfc3339")]
        cert_expires_at: SystemTime,
    },
    /// An agent renewed its certificate.
    #[serde(rename = "agent.renewed")]
    AgentRenewed {
        agent: AgentName,
        remote_addr: SocketAddr,
        #[serde(with = "crate::timefmt::serde_rfc3339")]
        cert_expires_at: SystemTime,
    },
    /// An agent's link is up: sessions to its targets go through it.
    #[serde(rename = "agent.connected")]
    AgentConnected {
        agent: AgentName,
        targets: Vec<TargetName>,
        remote_addr: SocketAddr,
        version: String,
    },
    /// An agent's link ended (`reason`: closed, keepalive_timeout, shutdown, cert_expired,
    /// removed, error).
    #[serde(rename = "agent.disconnected")]
    AgentDisconnected {
        agent: AgentName,
        remote_addr: SocketAddr,
        reason: String,
        duration_ms: u64,
    },
    /// An admin removed an agent: its link ended, and it can connect again only after a new
    /// join.
    #[serde(rename = "agent.removed")]
    AgentRemoved { agent: AgentName, by: UserName },
    /// The agent listener refused a connection: a bad, spent or expired token, a user
    /// certificate, a target the agent was not admitted for.
    #[serde(rename = "agent.refused")]
    AgentRefused {
        #[serde(skip_serializing_if = "Option::is_none", default)]
        agent: Option<AgentName>,
        remote_addr: SocketAddr,
        reason: String,
    },
    /// A temporary database role was made for a grant (`credentials.mode = "ephemeral"`). The
    /// password is never recorded.
    #[serde(rename = "credential.created")]
    CredentialCreated {
        role: String,
        grant_id: GrantId,
        user: UserName,
        target: TargetName,
        access: AccessLevel,
        /// The role's `VALID UNTIL`: the grant's end.
        #[serde(with = "crate::timefmt::serde_rfc3339")]
        valid_until: SystemTime,
    },
    /// A temporary database role was dropped: its backends terminated, its objects dealt with
    /// by the target's `on_end`.
    #[serde(rename = "credential.dropped")]
    CredentialDropped {
        role: String,
        grant_id: GrantId,
        target: TargetName,
        /// `reassigned to ROLE` or `dropped owned`.
        objects: String,
        /// Backends of the role that were still there and were terminated.
        terminated: u64,
        /// `grant ended` when the end was seen, `reconciled` when a later pass found it.
        reason: String,
    },
    /// The audit log continues in the file its path names now: the first record written
    /// there after the old file was renamed, removed or truncated from outside, or after a
    /// reopen on request. `seq` and `prev` carry on from the old file's last record.
    #[serde(rename = "audit.reopened")]
    AuditReopened {
        reason: ReopenReason,
        /// Whether the path named another file than the one written before (false when a
        /// requested reopen found the same file, or after a truncation).
        new_file: bool,
        /// The admin who asked (`jitgate audit reopen`).
        #[serde(skip_serializing_if = "Option::is_none", default)]
        by: Option<UserName>,
    },
}

impl AuditEvent {
    /// The event name, as in the `event` field and the `kind` label of
    /// `jitgate_audit_write_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::GrantCreated { .. } => "grant.created",
            Self::GrantRevoked { .. } => "grant.revoked",
            Self::GrantExtended { .. } => "grant.extended",
            Self::GrantExpired { .. } => "grant.expired",
            Self::RequestCreated { .. } => "request.created",
            Self::RequestRefused { .. } => "request.refused",
            Self::RequestApproval { .. } => "request.approval",
            Self::RequestApproved { .. } => "request.approved",
            Self::RequestDenied { .. } => "request.denied",
            Self::RequestWithdrawn { .. } => "request.withdrawn",
            Self::RequestLapsed { .. } => "request.lapsed",
            Self::SessionDenied { .. } => "session.denied",
            Self::SessionStart { .. } => "session.start",
            Self::Statement { .. } => "statement",
            Self::StatementEnd { .. } => "statement.end",
            Self::SessionEnd { .. } => "session.end",
            Self::AuditReopened { .. } => "audit.reopened",
            Self::CredentialCreated { .. } => "credential.created",
            Self::CredentialDropped { .. } => "credential.dropped",
            Self::SshExec { .. } => "ssh.exec",
            Self::SshSftp { .. } => "ssh.sftp",
            Self::SshForward { .. } => "ssh.forward",
            Self::LoginSucceeded { .. } => "login.succeeded",
            Self::LoginRefused { .. } => "login.refused",
            Self::InviteCreated { .. } => "invite.created",
            Self::SlackLinked { .. } => "slack.linked",
            Self::SlackRefused { .. } => "slack.refused",
            Self::AgentTokenCreated { .. } => "agent.token_created",
            Self::AgentJoined { .. } => "agent.joined",
            Self::AgentRenewed { .. } => "agent.renewed",
            Self::AgentConnected { .. } => "agent.connected",
            Self::AgentDisconnected { .. } => "agent.disconnected",
            Self::AgentRefused { .. } => "agent.refused",
            Self::AgentRemoved { .. } => "agent.removed",
        }
    }
}

/// One line of the audit file. With replicas the writer adds a `replica` field after `ts`
/// ([`record_head`]); this type, used by readers and benches, ignores it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Schema version.
    pub v: u32,
    /// When the event happened.
    #[serde(with = "crate::timefmt::serde_rfc3339")]
    pub ts: SystemTime,
    #[serde(flatten)]
    pub event: AuditEvent,
}

/// The fields every record starts with, as [`AuditRecord`] serializes them.
#[derive(Serialize)]
struct Stamp {
    v: u32,
    #[serde(with = "crate::timefmt::serde_rfc3339")]
    ts: SystemTime,
}

/// The start of every record stamped `ts`, before the event's fields: `{"v":1,"ts":"..."`
/// and then `extra`, fields encoded once by the caller (`,"replica":"<id>"`, or nothing).
/// Made once per batch; [`encode_record`] completes each record.
pub(crate) fn record_head(ts: SystemTime, extra: &[u8]) -> serde_json::Result<Vec<u8>> {
    let mut head = serde_json::to_vec(&Stamp { v: SCHEMA_VERSION, ts })?;
    // Reopened for the fields that follow.
    head.pop();
    head.extend_from_slice(extra);
    Ok(head)
}

/// Appends one record to `out`: `head` (from [`record_head`]), then `event`'s fields. With
/// no `extra` in the head, these are the bytes `serde_json` makes of the [`AuditRecord`]
/// (`audit::tests::replicas::without_a_replica_records_are_the_bytes_of_the_audit_record`).
pub(crate) fn encode_record(head: &[u8], event: &AuditEvent, out: &mut Vec<u8>) -> serde_json::Result<()> {
    out.extend_from_slice(head);
    let at = out.len();
    serde_json::to_writer(&mut *out, event)?;
    // The event's own `{` (an internally tagged enum is an object) becomes the comma after
    // the head's fields.
    debug_assert_eq!(out.get(at), Some(&b'{'));
    if let Some(brace) = out.get_mut(at) {
        *brace = b',';
    }
    Ok(())
}
