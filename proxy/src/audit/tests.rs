//! Unit tests of the audit log: the chain format and verifier, the writer (group commit,
//! rotation, restart, failures, files moved from outside and reopening), replicas' logs and
//! `audit tail`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod chain;
mod reopen;
mod replicas;
mod tail;
mod writer;

use std::path::Path;
use std::time::Duration;

use super::AuditEvent;
use crate::config::AuditConfig;
use crate::model::{AccessLevel, GrantId, TargetName, UserName};

/// A small event whose grant id tells records apart.
fn event(id: &str) -> AuditEvent {
    AuditEvent::GrantExpired {
        grant_id: GrantId::from_string(format!("g-{id}")),
        user: UserName::new("alice").unwrap(),
        target: TargetName::new("prod-db").unwrap(),
        access: AccessLevel::Read,
    }
}

/// `[audit]` defaults, with the log in `dir`.
fn config(dir: &Path) -> AuditConfig {
    AuditConfig {
        path: dir.join("audit.jsonl"),
        tip_path: dir.join("audit.tip"),
        max_file_bytes: 100 << 20,
        fsync_interval: Duration::from_millis(20),
        queue_depth: 65_536,
        max_statement_bytes: 65_536,
        max_param_bytes: 256,
        redact_params_matching: vec!["password".into()],
        replica: None,
    }
}
