//! The audit log: typed, versioned events appended as JSON lines to a file in the data
//! directory. Each record is written with one `write` call on a file opened in append mode,
//! so concurrent writers never interleave within a line. A failed write is reported to the
//! caller, which refuses the action it was about to take (fail closed).

use std::fs::File;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::grants::Grant;
use crate::metrics::Metrics;
use crate::types::{AccessLevel, GrantId, Role, SessionId, TargetName, UserName};

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
        }
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
    #[serde(rename = "grant.expired")]
    GrantExpired {
        grant_id: GrantId,
        user: UserName,
        target: TargetName,
        access: AccessLevel,
    },
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
        session_id: SessionId,
        grant_id: GrantId,
        user: UserName,
        roles: Vec<Role>,
        target: TargetName,
        database: String,
        access: AccessLevel,
        client_addr: SocketAddr,
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
        class: String,
        kind: String,
        #[serde(skip_serializing_if = "Vec::is_empty", default)]
        tables: Vec<String>,
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
        session_id: SessionId,
        grant_id: GrantId,
        user: UserName,
        roles: Vec<Role>,
        target: TargetName,
        access: AccessLevel,
        client_addr: SocketAddr,
        reason: SessionEndReason,
        bytes_from_client: u64,
        bytes_to_client: u64,
        duration_ms: u64,
    },
}

impl AuditEvent {
    fn kind(&self) -> &'static str {
        match self {
            Self::GrantCreated { .. } => "grant.created",
            Self::GrantRevoked { .. } => "grant.revoked",
            Self::GrantExpired { .. } => "grant.expired",
            Self::SessionDenied { .. } => "session.denied",
            Self::SessionStart { .. } => "session.start",
            Self::Statement { .. } => "statement",
            Self::StatementEnd { .. } => "statement.end",
            Self::SessionEnd { .. } => "session.end",
        }
    }
}

/// One line of the audit file.
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

/// The audit file could not be written.
#[derive(Debug, thiserror::Error)]
#[error("audit log {path} is not writable: {source}")]
pub struct AuditError {
    path: PathBuf,
    source: std::io::Error,
}

/// Appends audit records to one file.
pub struct AuditLog {
    path: PathBuf,
    file: Mutex<File>,
    metrics: Arc<Metrics>,
}

impl AuditLog {
    /// Opens (creating if needed) the audit file in append mode.
    pub fn open(path: &Path, metrics: Arc<Metrics>) -> Result<Self, AuditError> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o640)
            .open(path)
            .map_err(|source| AuditError {
                path: path.to_owned(),
                source,
            })?;
        Ok(Self {
            path: path.to_owned(),
            file: Mutex::new(file),
            metrics,
        })
    }

    /// Writes one event, stamped now. The record has reached the operating system when this
    /// returns `Ok`.
    pub fn record(&self, event: AuditEvent) -> Result<(), AuditError> {
        let kind = event.kind();
        let record = AuditRecord {
            v: SCHEMA_VERSION,
            ts: SystemTime::now(),
            event,
        };
        let mut line = match serde_json::to_vec(&record) {
            Ok(line) => line,
            Err(e) => return Err(self.fail(kind, std::io::Error::other(e))),
        };
        line.push(b'\n');
        let mut file = match self.file.lock() {
            Ok(file) => file,
            Err(poisoned) => poisoned.into_inner(),
        };
        file.write_all(&line).map_err(|e| self.fail(kind, e))
    }

    fn fail(&self, kind: &'static str, source: std::io::Error) -> AuditError {
        self.metrics.audit_write_errors_total.with_label_values(&[kind]).inc();
        tracing::error!(path = %self.path.display(), error = %source, "audit write failed");
        AuditError {
            path: self.path.clone(),
            source,
        }
    }
}
