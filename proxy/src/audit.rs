//! The audit log: typed, versioned events ([`AuditEvent`]) appended as hash-chained JSON
//! lines ([`chain`]) ([`AuditLog`]: written by the session that submits them when the file is
//! free, else by one writer thread that commits them in groups), in a file that rotates at a
//! size limit ([`files`]). A log renamed, removed or truncated from outside is noticed at the
//! next write and reopened, the chain continuing ([`siblings`] finds its files again, the tip
//! file remembers where it ends). `jitgate audit verify` checks the chain;
//! `jitgate audit tail` ([`tail`]) prints records for people.
//!
//! Fail closed: a record that cannot be written is reported to its submitter, which refuses
//! the action it was about to take. The log never holds part of a line, and every record
//! acknowledged as written is in the file (on stable storage within `audit.fsync_interval`).
//!
//! Not here: what is audited and when (the callers), and the statement-level redaction rules
//! (`audit.redact_params_matching` is only carried in [`crate::config::AuditConfig`]).

mod active;
pub mod chain;
pub(crate) mod command;
mod event;
pub mod files;
pub mod replica;
pub mod siblings;
pub mod tail;
mod tip;
mod writer;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use event::{
    AuditEvent, AuditRecord, Decision, Outcome, RecordingRef, ReopenReason, SessionEndReason, StatementPath,
    SCHEMA_VERSION,
};
pub use writer::{AuditLog, AuditTicket, Reopened, Written};

/// An audit record was not written.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    /// The file could not be opened, written or rotated.
    #[error("audit log {path} is not writable: {source}")]
    Io { path: PathBuf, source: Arc<std::io::Error> },
    /// More submissions are waiting than `audit.queue_depth` allows.
    #[error("audit queue is full ({depth} submissions waiting)")]
    QueueFull { depth: usize },
    /// The file was renamed, removed or truncated by something else while the batch was
    /// written: the batch is refused (and cut back out where the old file still exists), and
    /// the log continues in the file the path names now.
    #[error("audit log {path} was {reason} while being written; the batch is refused and the log reopened")]
    Moved { path: PathBuf, reason: ReopenReason },
    /// The log was closed (the proxy is shutting down) or its writer stopped.
    #[error("audit log is closed")]
    Closed,
    /// The record could not be serialized.
    #[error("audit record cannot be encoded: {0}")]
    Encode(Arc<serde_json::Error>),
}

impl AuditError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            source: Arc::new(source),
        }
    }
}
