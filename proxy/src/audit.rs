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
