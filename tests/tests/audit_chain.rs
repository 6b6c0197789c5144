//! The audit log as a hash chain, end to end: sessions and grant changes through a real proxy
//! and psql, a restart and rotation, then the real `jitgate audit verify` and `audit tail`
//! on the files, untouched and tampered with.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use jitgate_tests::jitgate::model::AccessLevel;
use jitgate_tests::{eventually, run_jitgate, CliRun, Harness};
use serde_json::Value;

async fn jitgate(args: &[&str]) -> CliRun {
    run_jitgate(args, &[]).await
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The log's files in chain order: rotated files (`audit.jsonl.<seq>`), then the active one.
fn log_files(dir: &Path) -> Vec<PathBuf> {
    let mut rotated: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_str().unwrap();
            name.strip_prefix("audit.jsonl.")
                .is_some_and(|d| d.len() == 20 && d.bytes().all(|b| b.is_ascii_digit()))
        })
        .collect();
    rotated.sort();
    rotated.push(dir.join("audit.jsonl"));
    rotated
}

/// Every line of the log, in order. (A file renamed while this runs reads as empty.)
fn log_lines(dir: &Path) -> Vec<String> {
    log_files(dir)
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap_or_default()
                .lines()
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .collect()
}

fn count_events(dir: &Path, kind: &str) -> usize {
    log_lines(dir)
        .iter()
        .filter(|l| l.contains(&format!("\"event\":\"{kind}\"")))
        .count()
}

fn user_of(v: &Value) -> Option<&str> {
    v.get("user")
        .or_else(|| v.get("grant").and_then(|g| g.get("user")))
        .and_then(Value::as_str)
}

/// Runs `sql` as `user` and waits for the session's end record.
async fn session(h: &Harness, user: &jitgate_tests::UserCert, sql: &str) {
    let ends = count_events(h.data_dir(), "session.end");
    let out = h.psql(user, "prod-db", sql).await;
    assert!(out.success, "{out:?}");
    eventually("session.end written", Duration::from_secs(10), || async {
        count_events(h.data_dir(), "session.end") > ends
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_log_is_a_verifiable_chain_across_restarts_and_rotation() {
    let mut h = Harness::start().await;
    let dir = h.data_dir().to_owned();
    let alice = h.user("alice", &["dev"]);
    let bob = h.user("bob", &["dev"]);
    h.grant("alice", "prod-db", AccessLevel::Read, Duration::from_secs(3600))
        .await;
    let bobs = h
        .grant("bob", "prod-db", AccessLevel::Read, Duration::from_secs(3600))
        .await;
    session(&h, &alice, "SELECT 1").await;
    session(&h, &bob, "SELECT 2").await;
    h.admin().revoke_grant(bobs.id.as_str()).await.unwrap();
    assert!(!h.psql(&bob, "prod-db", "SELECT 3").await.success);

    // A restart continues the chain; a small max_file_bytes makes the log rotate.
    h.reconfigure("[audit]\nmax_file_bytes = 4096\nfsync_interval = \"100ms\"")
        .await;
    for i in 0..16 {
        session(&h, &alice, &format!("SELECT {i}")).await;
    }
    h.grant("bob", "prod-db", AccessLevel::Read, Duration::from_secs(3600))
        .await;
    session(&h, &bob, "SELECT 4").await;
    h.stop_proxy().await.unwrap();

    let files = log_files(&dir);
    assert!(files.len() >= 3, "expected rotated files: {files:?}");
    let lines = log_lines(&dir);
    let n = lines.len();
    let records: Vec<Value> = lines.iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r["seq"], i as u64 + 1, "{r}");
    }

    // Untouched: verify passes, found through the data directory or the config file.
    let r = jitgate(&["audit", "verify", "--data-dir", s(&dir)]).await;
    assert!(r.ok, "{} {}", r.stdout, r.stderr);
    assert!(
        r.stdout.starts_with(&format!("ok: {n} records, seq 1..{n}\n")),
        "{}",
        r.stdout
    );
    let last_hash = records[n - 1]["hash"].as_str().unwrap();
    assert!(r.stdout.contains(&format!("last hash: {last_hash}")), "{}", r.stdout);
    let r = jitgate(&["audit", "verify", "--config", s(h.config_path())]).await;
    assert!(r.ok, "{}", r.stderr);
    // Files given as a shell glob would give them (active file first) are put in order.
    let mut glob: Vec<&str> = files.iter().map(|f| s(f)).collect();
    glob.sort();
    let mut args = vec!["audit", "verify"];
    args.extend(&glob);
    let r = jitgate(&args).await;
    assert!(r.ok, "{}", r.stderr);

    // A rotated file missing from the middle is named.
    let mut gap: Vec<&str> = files.iter().map(|f| s(f)).collect();
    let dropped = gap.remove(1);
    let mut args = vec!["audit", "verify"];
    args.extend(&gap);
    let r = jitgate(&args).await;
    assert_eq!(r.code, Some(1), "{}", r.stdout);
    assert!(r.stderr.contains(&format!("{}: line 1", gap[1])), "{}", r.stderr);
    assert!(r.stderr.contains("truncated or removed"), "{}", r.stderr);
    assert!(!r.stderr.contains(dropped), "{}", r.stderr);

    // Tampered copies of the whole log as one file: each names its first bad record.
    let tmp = tempfile::tempdir().unwrap();
    let tampered = |name: &str, lines: Vec<String>, cut_last: bool| {
        let path = tmp.path().join(name);
        let mut text = lines.join("\n") + "\n";
        if cut_last {
            text.truncate(text.len() - lines.last().unwrap().len() / 2);
        }
        std::fs::write(&path, text).unwrap();
        path
    };
    let alice_line = records.iter().position(|r| user_of(r) == Some("alice")).unwrap();
    let mut edited = lines.clone();
    edited[alice_line] = edited[alice_line].replacen("\"alice\"", "\"alicf\"", 1);
    let mut removed = lines.clone();
    removed.remove(4);
    let mut reordered = lines.clone();
    reordered.swap(5, 6);
    let cases = [
        (
            tampered("edited.jsonl", edited, false),
            alice_line + 1,
            alice_line + 1,
            "edited",
        ),
        (tampered("removed.jsonl", removed, false), 5, 6, "removed"),
        (tampered("reordered.jsonl", reordered, false), 6, 7, "reordered"),
        (tampered("truncated.jsonl", lines.clone(), true), n, n, "truncated"),
    ];
    for (path, line, seq, why) in cases {
        let r = jitgate(&["audit", "verify", s(&path)]).await;
        assert_eq!(r.code, Some(1), "{}: {}", path.display(), r.stdout);
        let expected = format!("{}: line {line}, seq {seq}: {why}", path.display());
        assert!(r.stderr.contains(&expected), "want {expected:?} in {}", r.stderr);
    }
    let whole = tampered("whole.jsonl", lines.clone(), false);
    assert!(jitgate(&["audit", "verify", s(&whole)]).await.ok);

    // tail --json --user alice: alice's records only, as written.
    let r = jitgate(&["audit", "tail", "--json", "--user", "alice", "--data-dir", s(&dir)]).await;
    assert!(r.ok, "{}", r.stderr);
    let shown: Vec<&str> = r.stdout.lines().collect();
    // Records without a user (statement.end) belong to alice when their session does.
    let alice_sessions: Vec<&Value> = records
        .iter()
        .filter(|r| user_of(r) == Some("alice"))
        .filter_map(|r| r.get("session_id"))
        .collect();
    let expected: Vec<&str> = lines
        .iter()
        .zip(&records)
        .filter(|(_, r)| match user_of(r) {
            Some(user) => user == "alice",
            None => r.get("session_id").is_some_and(|s| alice_sessions.contains(&s)),
        })
        .map(|(l, _)| l.as_str())
        .collect();
    assert!(expected.len() >= 10, "{expected:?}");
    assert_eq!(shown, expected);

    // tail (text): one line per record, in order.
    let r = jitgate(&["audit", "tail", "--data-dir", s(&dir)]).await;
    assert!(r.ok, "{}", r.stderr);
    let text: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(text.len(), n, "{}", r.stdout);
    for (line, record) in text.iter().zip(&records) {
        let head = format!(
            "{} {} ",
            record["ts"].as_str().unwrap(),
            record["event"].as_str().unwrap()
        );
        assert!(line.starts_with(&head), "{line} / {record}");
    }
    let start = text.iter().find(|l| l.contains(" session.start alice ")).unwrap();
    assert!(start.contains(" prod-db s-") && start.contains(" grant g-"), "{start}");

    // --session and --target narrow the same way.
    let sid = records
        .iter()
        .find(|r| r["event"] == "session.start" && r["user"] == "bob")
        .unwrap()["session_id"]
        .as_str()
        .unwrap();
    let r = jitgate(&["audit", "tail", "--session", sid, "--data-dir", s(&dir)]).await;
    assert!(r.ok, "{}", r.stderr);
    let of_session = records.iter().filter(|r| r["session_id"] == sid).count();
    assert!(of_session >= 2);
    assert_eq!(r.stdout.lines().count(), of_session, "{}", r.stdout);
    let r = jitgate(&["audit", "tail", "--target", "md5-db", "--data-dir", s(&dir)]).await;
    assert!(r.ok && r.stdout.is_empty(), "{}", r.stdout);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_log_from_before_chaining_is_set_aside() {
    let mut h = Harness::start().await;
    let dir = h.data_dir().to_owned();
    h.stop_proxy().await.unwrap();
    let legacy = "{\"v\":1,\"ts\":\"2026-11-22T04:52:01.482Z\",\"event\":\"grant.expired\",\"grant_id\":\"g-1\",\"user\":\"alice\",\"target\":\"prod-db\",\"access\":\"read\"}\n";
    std::fs::write(dir.join("audit.jsonl"), legacy).unwrap();
    h.start_proxy().await;
    h.grant("alice", "prod-db", AccessLevel::Read, Duration::from_secs(3600))
        .await;
    h.stop_proxy().await.unwrap();
    let r = jitgate(&["audit", "verify", "--data-dir", s(&dir)]).await;
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stdout.starts_with("ok: 1 records, seq 1..1"), "{}", r.stdout);
    let aside: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("audit.jsonl.unchained-"))
        .collect();
    assert_eq!(aside.len(), 1);
    assert_eq!(std::fs::read_to_string(dir.join(&aside[0])).unwrap(), legacy);
}
