//! The audit logs of two replicas, written through `AuditLog` as `jitgate serve` writes them
//! with a `[store]`, read by the real `jitgate` binary: every record names its replica,
//! `audit verify` checks each replica's chain on its own and names the replica of a bad one,
//! and `audit tail` merges the logs by time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use jitgate_tests::jitgate::audit::{AuditEvent, AuditLog};
use jitgate_tests::jitgate::config::AuditConfig;
use jitgate_tests::jitgate::metrics::Metrics;
use jitgate_tests::jitgate::model::{AccessLevel, GrantId, TargetName, UserName};
use jitgate_tests::{run_jitgate, CliRun};
use serde_json::Value;
use tokio::io::AsyncBufReadExt as _;

async fn jitgate(args: &[&str]) -> CliRun {
    run_jitgate(args, &[]).await
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `[audit]` as `jitgate serve` builds it for replica `id`, in `dir`; small files, so the
/// log rotates.
fn config(dir: &Path, id: &str) -> AuditConfig {
    AuditConfig {
        path: dir.join("audit.jsonl"),
        tip_path: dir.join("audit.tip"),
        max_file_bytes: 4096,
        fsync_interval: Duration::from_millis(20),
        queue_depth: 1024,
        max_statement_bytes: 65_536,
        max_param_bytes: 256,
        redact_params_matching: Vec::new(),
        replica: Some(id.to_owned()),
    }
}

fn expired(id: &str) -> AuditEvent {
    AuditEvent::GrantExpired {
        grant_id: GrantId::from_string(format!("g-{id}")),
        user: UserName::new("alice").unwrap(),
        target: TargetName::new("prod-db").unwrap(),
        access: AccessLevel::Read,
    }
}

/// Two replicas, `a` and `b`, each with its own data directory, writing in turns (`a` 30
/// records, `b` 12), each record a few milliseconds after the one before. Returns the
/// directories and the grant ids in the order written.
fn two_replicas() -> (tempfile::TempDir, tempfile::TempDir, Vec<String>) {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = AuditLog::open(&config(a_dir.path(), "a"), Metrics::new()).unwrap();
    let b = AuditLog::open(&config(b_dir.path(), "b"), Metrics::new()).unwrap();
    let mut order = Vec::new();
    for i in 0..30 {
        for (log, name) in [(&a, "a"), (&b, "b")] {
            if name == "b" && i % 5 > 1 {
                continue;
            }
            let id = format!("{name}-{i}");
            log.record_blocking(expired(&id)).unwrap();
            order.push(format!("g-{id}"));
            std::thread::sleep(Duration::from_millis(3));
        }
    }
    a.close();
    b.close();
    (a_dir, b_dir, order)
}

/// The log's files: the rotated ones (`audit.jsonl.<seq>`) in order, then the active one.
fn log_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with("audit.jsonl."))
        .collect();
    files.sort();
    files.push(dir.join("audit.jsonl"));
    files
}

fn records(dir: &Path) -> Vec<Value> {
    log_files(dir)
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect::<Vec<Value>>()
        })
        .collect()
}

/// `replica ID: ok: N records, seq 1..N, last hash H` for the log in `dir`.
fn summary_line(dir: &Path, id: &str) -> String {
    let records = records(dir);
    let n = records.len();
    let hash = records[n - 1]["hash"].as_str().unwrap();
    format!("replica {id}: ok: {n} records, seq 1..{n}, last hash {hash}")
}

#[tokio::test]
async fn verify_checks_each_replicas_chain_and_names_the_replica_of_an_edit() {
    let (a, b, _) = two_replicas();
    assert!(log_files(a.path()).len() > 2, "a's log should have rotated");
    for r in records(a.path()) {
        assert_eq!(r["replica"], "a", "{r}");
    }
    for r in records(b.path()) {
        assert_eq!(r["replica"], "b", "{r}");
    }
    let expected = format!("{}\n{}\n", summary_line(a.path(), "a"), summary_line(b.path(), "b"));

    // Both logs' files as a shell glob gives them, b's first.
    let files: Vec<PathBuf> = log_files(b.path()).into_iter().chain(log_files(a.path())).collect();
    let mut args = vec!["audit", "verify"];
    args.extend(files.iter().map(|f| s(f)));
    let r = jitgate(&args).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(r.stdout, expected);
    // The same, found through each replica's data directory.
    let r = jitgate(&["audit", "verify", "--data-dir", s(a.path()), "--data-dir", s(b.path())]).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(r.stdout, expected);

    // One byte of b's second record.
    let active = b.path().join("audit.jsonl");
    let text = std::fs::read_to_string(&active).unwrap();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    assert!(lines[1].contains("\"seq\":2,"), "{}", lines[1]);
    lines[1] = lines[1].replacen("alice", "alicf", 1);
    std::fs::write(&active, lines.join("\n") + "\n").unwrap();
    let r = jitgate(&args).await;
    assert_eq!(r.code, Some(1), "{r:?}");
    assert_eq!(
        r.stderr.trim_end(),
        format!(
            "error: replica b: {}: line 2, seq 2: edited: the hash does not match the record",
            active.display()
        )
    );
    // The good chain is still reported.
    assert_eq!(r.stdout, format!("{}\n", summary_line(a.path(), "a")));
}

#[tokio::test]
async fn tail_merges_the_replicas_logs_by_time() {
    let (a, b, order) = two_replicas();
    let a_log = a.path().join("audit.jsonl");
    let b_log = b.path().join("audit.jsonl");
    let r = jitgate(&["audit", "tail", "--json", "--file", s(&a_log), "--file", s(&b_log)]).await;
    assert!(r.ok, "{r:?}");
    // Every record once, as written, oldest first.
    let printed: Vec<Value> = r.stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let ids: Vec<&str> = printed.iter().map(|v| v["grant_id"].as_str().unwrap()).collect();
    assert_eq!(ids, order);
    let mut written: Vec<String> = [a.path(), b.path()]
        .iter()
        .flat_map(|d| log_files(d))
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .collect();
    let mut lines: Vec<String> = r.stdout.lines().map(String::from).collect();
    written.sort();
    lines.sort();
    assert_eq!(lines, written);

    // Text shows each record's replica; the filters apply to both logs.
    let r = jitgate(&[
        "audit",
        "tail",
        "--data-dir",
        s(a.path()),
        "--data-dir",
        s(b.path()),
        "--user",
        "alice",
    ])
    .await;
    assert!(r.ok, "{r:?}");
    let text: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(text.len(), order.len());
    assert!(
        text[0].ends_with(" [a] grant.expired alice prod-db g-a-0 read"),
        "{}",
        text[0]
    );
    assert!(
        text[1].ends_with(" [b] grant.expired alice prod-db g-b-0 read"),
        "{}",
        text[1]
    );
    let r = jitgate(&[
        "audit",
        "tail",
        "--file",
        s(&a_log),
        "--file",
        s(&b_log),
        "--user",
        "bob",
    ])
    .await;
    assert!(r.ok && r.stdout.is_empty(), "{r:?}");
}

/// The grant id of the next record `tail -f --json` prints.
async fn next_id(lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>) -> String {
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("a line within 10s")
        .unwrap()
        .expect("tail -f keeps running");
    serde_json::from_str::<Value>(&line).unwrap()["grant_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn tail_follow_prints_what_every_log_gains() {
    let (a, b, order) = two_replicas();
    let mut child = tokio::process::Command::new(jitgate_tests::jitgate_bin())
        .args([
            "audit",
            "tail",
            "-f",
            "--json",
            "--data-dir",
            s(a.path()),
            "--data-dir",
            s(b.path()),
        ])
        .env_remove("JITGATE_CONFIG")
        .env_remove("JITGATE_DATA_DIR")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    for id in &order {
        assert_eq!(&next_id(&mut lines).await, id);
    }
    // Both replicas go on writing (b first, then a): each new record comes out once.
    let b_log = AuditLog::open(&config(b.path(), "b"), Metrics::new()).unwrap();
    b_log.record_blocking(expired("b-late")).unwrap();
    assert_eq!(next_id(&mut lines).await, "g-b-late");
    let a_log = AuditLog::open(&config(a.path(), "a"), Metrics::new()).unwrap();
    for i in 0..20 {
        // Past max_file_bytes: a's log rotates under the follower.
        a_log.record_blocking(expired(&format!("a-late-{i}"))).unwrap();
    }
    for i in 0..20 {
        assert_eq!(next_id(&mut lines).await, format!("g-a-late-{i}"));
    }
    child.kill().await.unwrap();
}
