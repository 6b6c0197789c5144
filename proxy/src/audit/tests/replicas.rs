//! Replicas: the writer names its replica in every record (and only then touches the bytes),
//! `verify` checks each replica's files as a chain of its own and names the replica of a bad
//! one, and a file never mixes replicas.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde_json::Value;

use super::super::chain::{self, Problem, Verifier, GENESIS};
use super::super::files::chain_files;
use super::super::{replica, AuditEvent, AuditLog, AuditRecord, ReopenReason, SCHEMA_VERSION};
use super::super::{Decision, Outcome, RecordingRef, SessionEndReason, StatementPath};
use super::{config, event};
use crate::config::AuditConfig;
use crate::metrics::Metrics;
use crate::model::{AccessLevel, GrantId, SessionId, SessionMeta, TargetName, UserName};

fn replica_config(dir: &Path, replica: Option<&str>) -> AuditConfig {
    AuditConfig {
        replica: replica.map(String::from),
        ..config(dir)
    }
}

fn meta() -> SessionMeta {
    SessionMeta {
        id: SessionId::from_string("s-1"),
        grant_id: GrantId::from_string("g-1"),
        user: UserName::new("alice").unwrap(),
        roles: Vec::new(),
        target: TargetName::new("prod-db").unwrap(),
        database: "app".into(),
        access: AccessLevel::Read,
        client_addr: "127.0.0.1:5555".parse().unwrap(),
        upstream_role: "jit_reader".into(),
    }
}

/// Events of several shapes: flattened fields, nested objects, skipped empty fields, text
/// that needs escaping.
fn events() -> Vec<AuditEvent> {
    vec![
        event("1"),
        AuditEvent::SessionStart { session: meta() },
        AuditEvent::Statement {
            session_id: meta().id,
            statement: 1,
            grant_id: meta().grant_id,
            user: meta().user,
            target: meta().target,
            access: AccessLevel::Read,
            protocol: StatementPath::Extended,
            text: "SELECT \"replica\": 1, '\\n' -- é".into(),
            params: vec![Some("x".into()), None],
            class: "read".into(),
            kind: "select".into(),
            tables: Vec::new(),
            upstream_role: "".into(),
            effective_role: None,
            decision: Decision::Allowed,
            denied_by: None,
        },
        AuditEvent::StatementEnd {
            session_id: meta().id,
            statement: 1,
            outcome: Outcome::Ok {
                tag: "SELECT 1".into(),
                rows: Some(1),
            },
            duration_us: 80,
            copy_bytes: None,
        },
        AuditEvent::SessionEnd {
            session: meta(),
            reason: SessionEndReason::ClientClosed,
            bytes_from_client: 25,
            bytes_to_client: 129,
            duration_ms: 2940,
            recordings: vec![RecordingRef {
                file: "/var/lib/jitgate/recordings/s-1-1.cast".into(),
                sha256: "0".repeat(64),
                bytes: 10,
            }],
        },
        event("2"),
    ]
}

/// Writes `events` through every path of the writer (record, write_or_enqueue, defer, a
/// reopen's own record) and returns the events in the order they are in the file.
fn write_every_way(log: &AuditLog, events: Vec<AuditEvent>) -> Vec<AuditEvent> {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let [e0, e1, e2, e3, e4, e5]: [AuditEvent; 6] = events.try_into().unwrap();
    log.record_blocking(e0.clone()).unwrap();
    match log.write_or_enqueue(vec![e1.clone(), e2.clone()]).unwrap() {
        super::super::Written::Now => {}
        super::super::Written::Later(ticket) => rt.block_on(ticket).unwrap(),
    }
    // Deferred: goes out first with the next append.
    log.defer(vec![e3.clone()]);
    log.record_blocking(e4.clone()).unwrap();
    let admin = UserName::new("admin").unwrap();
    let reopened = log.reopen(ReopenReason::Command, Some(admin.clone())).unwrap();
    assert!(reopened.seq.is_some() && !reopened.new_file, "{reopened:?}");
    log.record_blocking(e5.clone()).unwrap();
    log.close();
    let by_reopen = AuditEvent::AuditReopened {
        reason: ReopenReason::Command,
        new_file: false,
        by: Some(admin),
    };
    vec![e0, e1, e2, e3, e4, by_reopen, e5]
}

fn lines_of(path: &Path) -> Vec<Vec<u8>> {
    std::fs::read(path)
        .unwrap()
        .split_inclusive(|&b| b == b'\n')
        .map(<[u8]>::to_vec)
        .collect()
}

/// What the line would be were the record serialized as an [`AuditRecord`] with `extra`
/// after `ts`, chained with the line's own `seq` and `prev`.
fn expected_line(line: &[u8], event: &AuditEvent, extra: &str) -> Vec<u8> {
    let v: Value = serde_json::from_slice(line).unwrap();
    let ts: SystemTime = humantime::parse_rfc3339_weak(v["ts"].as_str().unwrap()).unwrap();
    let record = AuditRecord {
        v: SCHEMA_VERSION,
        ts,
        event: event.clone(),
    };
    let mut body = String::from_utf8(serde_json::to_vec(&record).unwrap()).unwrap();
    let after_ts = body.find(",\"event\":").unwrap();
    body.insert_str(after_ts, extra);
    let prev = chain::parse_hash(v["prev"].as_str().unwrap().as_bytes()).unwrap();
    let mut out = Vec::new();
    chain::encode(v["seq"].as_u64().unwrap(), &prev, body.as_bytes(), &mut out);
    out
}

#[test]
fn without_a_replica_records_are_the_bytes_of_the_audit_record() {
    let dir = tempfile::tempdir().unwrap();
    let config = replica_config(dir.path(), None);
    let log = AuditLog::open(&config, Metrics::new()).unwrap();
    let written = write_every_way(&log, events());
    let lines = lines_of(&config.path);
    assert_eq!(lines.len(), written.len());
    for (line, event) in lines.iter().zip(&written) {
        assert_eq!(
            String::from_utf8_lossy(line),
            String::from_utf8_lossy(&expected_line(line, event, ""))
        );
        assert!(
            !line.windows(9).any(|w| w == b"\"replica\""),
            "{}",
            String::from_utf8_lossy(line)
        );
    }
    let verified = replica::verify(chain_files(&config.path).unwrap());
    assert_eq!(verified.len(), 1);
    assert_eq!(verified[0].chain.replica, None);
    assert_eq!(verified[0].result.as_ref().unwrap().records, written.len() as u64);
}

#[test]
fn a_replica_names_itself_in_every_record_after_ts() {
    let dir = tempfile::tempdir().unwrap();
    let config = replica_config(dir.path(), Some("east-1"));
    let log = AuditLog::open(&config, Metrics::new()).unwrap();
    let written = write_every_way(&log, events());
    let lines = lines_of(&config.path);
    assert_eq!(lines.len(), written.len());
    for (line, event) in lines.iter().zip(&written) {
        // The same bytes with the field after `ts`, and the hash covers it.
        assert_eq!(
            String::from_utf8_lossy(line),
            String::from_utf8_lossy(&expected_line(line, event, r#","replica":"east-1""#))
        );
        let v: Value = serde_json::from_slice(line).unwrap();
        assert_eq!(v["replica"], "east-1");
        let bare = line.strip_suffix(b"\n").unwrap();
        assert_eq!(replica::of_line(bare).unwrap().as_deref(), Some("east-1"));
    }
    let verified = replica::verify(chain_files(&config.path).unwrap());
    assert_eq!(verified.len(), 1);
    assert_eq!(verified[0].chain.replica.as_deref(), Some("east-1"));
    let summary = verified[0].result.as_ref().unwrap();
    assert_eq!(summary.seqs, Some((1, written.len() as u64)));
}

/// Writes `n` records as replica `id` into `dir`, rotating every few records.
fn replica_log(dir: &Path, id: &str, n: usize) -> Vec<PathBuf> {
    let mut config = replica_config(dir, Some(id));
    config.max_file_bytes = 4096;
    let log = AuditLog::open(&config, Metrics::new()).unwrap();
    for i in 0..n {
        log.record_blocking(event(&format!("{id}-{i}"))).unwrap();
    }
    log.close();
    chain_files(&config.path).unwrap()
}

#[test]
fn two_replicas_verify_as_two_chains_and_an_edit_names_its_replica() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a_files = replica_log(a.path(), "a", 40);
    let b_files = replica_log(b.path(), "b", 7);
    assert!(a_files.len() > 2, "{a_files:?}");
    // Given in any order, mixed.
    let mut all: Vec<PathBuf> = b_files.iter().chain(a_files.iter().rev()).cloned().collect();
    all.swap(0, 2);
    let verified = replica::verify(all.clone());
    let seen: Vec<_> = verified
        .iter()
        .map(|v| {
            let s = v.result.as_ref().unwrap();
            (v.chain.replica.as_deref(), s.records, s.seqs)
        })
        .collect();
    assert_eq!(seen, [(Some("a"), 40, Some((1, 40))), (Some("b"), 7, Some((1, 7)))]);
    assert_eq!(verified[0].chain.files, a_files);

    // One byte of b's third record.
    let b_active = b_files.last().unwrap();
    let mut lines = lines_of(b_active);
    let at = lines[2].windows(5).position(|w| w == b"alice").unwrap();
    lines[2][at] = b'A';
    std::fs::write(b_active, lines.concat()).unwrap();
    let verified = replica::verify(all);
    assert!(verified[0].result.is_ok());
    assert_eq!(verified[1].chain.replica.as_deref(), Some("b"));
    let e = verified[1].result.as_ref().unwrap_err();
    assert_eq!((e.file.as_path(), e.line, e.seq), (b_active.as_path(), 3, Some(3)));
    assert!(matches!(e.problem, Problem::Edited), "{e}");
}

/// Chained lines of `bodies`, from seq 1.
fn chained(bodies: &[String]) -> Vec<u8> {
    let mut prev = GENESIS;
    let mut out = Vec::new();
    for (i, body) in bodies.iter().enumerate() {
        prev = chain::encode(i as u64 + 1, &prev, body.as_bytes(), &mut out);
    }
    out
}

fn body(replica: Option<&str>, id: u32) -> String {
    let replica = replica.map_or_else(String::new, |r| format!(r#","replica":"{r}""#));
    format!(r#"{{"v":1,"ts":"2026-11-22T05:40:01.123Z"{replica},"event":"grant.expired","grant_id":"g-{id}"}}"#)
}

#[test]
fn a_record_of_another_replica_in_a_file_is_refused() {
    let cases = [(Some("a"), Some("b")), (None, Some("a")), (Some("a"), None)];
    for (before, this) in cases {
        // Each record well chained: only the replica is wrong.
        let bytes = chained(&[body(before, 1), body(before, 2), body(this, 3), body(before, 4)]);
        let mut v = Verifier::new();
        let e = v.check_reader(Path::new("audit.jsonl"), &bytes[..]).unwrap_err();
        assert_eq!((e.line, e.seq), (3, Some(3)));
        match &e.problem {
            Problem::OtherReplica { before: b, this: t } => {
                assert_eq!((b.as_deref(), t.as_deref()), (before, this));
            }
            other => panic!("{other:?}"),
        }
        assert!(
            e.to_string()
                .starts_with("audit.jsonl: line 3, seq 3: mixed replicas: "),
            "{e}"
        );
    }
    // A nested object's `replica` is not the record's.
    let nested = r#"{"v":1,"ts":"2026-11-22T05:40:01.123Z","event":"x","grant":{"replica":"b"}}"#;
    let bytes = chained(&[body(None, 1), nested.to_owned()]);
    Verifier::new()
        .check_reader(Path::new("audit.jsonl"), &bytes[..])
        .unwrap();
}

#[test]
fn files_are_grouped_by_the_replica_their_first_record_names() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    };
    let single = write("single", &chained(&[body(None, 1)]));
    let a = write("a", &chained(&[body(Some("a"), 1)]));
    let empty = write("empty", b"");
    let cut = write("cut", &chained(&[body(Some("b"), 1)])[..40]);
    // One chain: everything in it, as before replicas.
    let chains = replica::chains(vec![empty.clone(), single.clone()]);
    assert_eq!(
        chains,
        [replica::Chain {
            replica: None,
            files: vec![single.clone(), empty.clone()]
        }]
    );
    let chains = replica::chains(vec![cut.clone(), a.clone()]);
    assert_eq!(chains.len(), 1);
    assert_eq!(chains[0].files, [cut.clone(), a.clone()]);
    // Several: the single node's first; a file that tells no replica goes with it.
    let chains = replica::chains(vec![a.clone(), cut.clone(), empty.clone(), single.clone()]);
    let got: Vec<(Option<&str>, &[PathBuf])> = chains
        .iter()
        .map(|c| (c.replica.as_deref(), c.files.as_slice()))
        .collect();
    assert_eq!(
        got,
        [
            (None, &[cut.clone(), single.clone(), empty.clone()][..]),
            (Some("a"), &[a.clone()][..])
        ]
    );
    assert_eq!(replica::first_record(&a), Some((1, Some("a".to_owned()))));
    assert_eq!(replica::first_record(&cut), None);
}

#[test]
fn a_log_of_another_replica_goes_on_in_a_new_file() {
    let dir = tempfile::tempdir().unwrap();
    let single = replica_config(dir.path(), None);
    let log = AuditLog::open(&single, Metrics::new()).unwrap();
    log.record_blocking(event("1")).unwrap();
    log.record_blocking(event("2")).unwrap();
    log.close();
    // The node joins a cluster: its chain goes on, in a file of its own.
    let joined = replica_config(dir.path(), Some("a"));
    let log = AuditLog::open(&joined, Metrics::new()).unwrap();
    log.record_blocking(event("3")).unwrap();
    log.close();
    let files = chain_files(&joined.path).unwrap();
    assert_eq!(files.len(), 2, "{files:?}");
    let verified = replica::verify(files);
    let seen: Vec<_> = verified
        .iter()
        .map(|v| (v.chain.replica.as_deref(), v.result.as_ref().unwrap().seqs))
        .collect();
    assert_eq!(seen, [(None, Some((1, 2))), (Some("a"), Some((3, 3)))]);
    let last_single = verified[0].result.as_ref().unwrap().last_hash.unwrap();
    let first_a: Value = serde_json::from_slice(&lines_of(&joined.path)[0]).unwrap();
    assert_eq!(first_a["prev"], chain::hex(&last_single).as_str());
}
