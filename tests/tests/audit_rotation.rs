//! The audit log moved, removed or truncated behind the proxy's back, as logrotate, people
//! and scripts do it: no committed row is ever without its record on disk, statements in
//! flight fail closed (58030), the chain continues in a new file that starts with an
//! `audit.reopened` record, across restarts, and `jitgate audit verify` over all the files
//! passes. Also SIGHUP, `jitgate audit reopen` and the logrotate example in deploy/.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use jitgate_tests::jitgate::audit::siblings;
use jitgate_tests::jitgate::model::AccessLevel;
use jitgate_tests::jitgate::sandbox::free_port;
use jitgate_tests::raw::{self, error_of, read_until_ready, send_query};
use jitgate_tests::{client_command, eventually, jitgate_bin, run_jitgate, wait_until_serving, Harness};
use serde_json::Value;
use tokio::io::AsyncWriteExt as _;

fn p(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Every file of the log in `dir` (the active file and anything named `audit.jsonl.*` or
/// `audit.jsonl-*`), in no particular order.
fn log_files(dir: &Path) -> Vec<PathBuf> {
    let active = dir.join("audit.jsonl");
    let mut files = siblings::find(&active).unwrap();
    if active.exists() {
        files.push(active);
    }
    files
}

/// Every record in the files of the log in `dir`, read through gzip where needed.
fn records(dir: &Path) -> Vec<Value> {
    records_in(&log_files(dir))
}

fn records_in(files: &[PathBuf]) -> Vec<Value> {
    let mut out = Vec::new();
    for f in files {
        let Ok(reader) = siblings::open(f) else { continue };
        for line in reader.lines() {
            if let Ok(v) = serde_json::from_str::<Value>(&line.unwrap()) {
                out.push(v);
            }
        }
    }
    out
}

/// Statement texts recorded anywhere in the log.
fn audited_texts(dir: &Path) -> HashSet<String> {
    texts_in(&log_files(dir))
}

fn texts_in(files: &[PathBuf]) -> HashSet<String> {
    records_in(files)
        .into_iter()
        .filter(|r| r["event"] == "statement")
        .filter_map(|r| r["text"].as_str().map(str::to_owned))
        .collect()
}

/// First record of the active file.
fn first_record(dir: &Path) -> Value {
    let text = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap();
    serde_json::from_str(text.lines().next().expect("the active file has a record")).unwrap()
}

/// Rows of `items` with `id >= from`, as the database has them.
fn committed_rows(h: &Harness, from: u64) -> Vec<String> {
    h.pg.sql("app", &format!("SELECT id FROM items WHERE id >= {from} ORDER BY id"))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Waits until every `statement` record in the active file has its `statement.end`, so no
/// record is on its way to the file while a test moves it.
async fn settle(dir: &Path) {
    eventually("statement.end records written", Duration::from_secs(10), || async {
        let text = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap_or_default();
        text.matches("\"event\":\"statement\"").count() == text.matches("\"event\":\"statement.end\"").count()
    })
    .await;
}

/// Waits until the writer has finished its last append, the check after it included: every
/// line in the (never rotated) active file is counted in `jitgate_audit_records_total`, which
/// the writer bumps only once the path check after the write passed. A record can be readable in
/// the file while that check is still to come; a file changed in that window fails the record
/// the test did not mean to fail.
async fn writer_idle(h: &Harness, dir: &Path) {
    eventually("the writer's last append checked", Duration::from_secs(10), || async {
        let lines = std::fs::read_to_string(dir.join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .count();
        let (_, text) = h.metrics_get("/metrics").await;
        jitgate_tests::metric(&text, "jitgate_audit_records_total") as usize == lines
    })
    .await;
}

/// Panics naming the committed rows of `items` (id >= `from`) with no `statement` record.
fn assert_every_row_audited(h: &Harness, dir: &Path, from: u64) -> usize {
    assert_rows_audited_in(h, &log_files(dir), from)
}

fn assert_rows_audited_in(h: &Harness, files: &[PathBuf], from: u64) -> usize {
    let rows = committed_rows(h, from);
    let texts = texts_in(files);
    let missing: Vec<&String> = rows
        .iter()
        .filter(|id| !texts.contains(&format!("INSERT INTO items VALUES ({id}, 'r')")))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} committed rows have no audit record on disk, e.g. {:?}",
        missing.len(),
        rows.len(),
        &missing[..missing.len().min(5)]
    );
    rows.len()
}

/// `jitgate audit verify --data-dir DIR`: the verdict's first line, asserting success.
async fn verify_all(dir: &Path) -> String {
    let r = run_jitgate(&["audit", "verify", "--data-dir", p(dir)], &[]).await;
    assert!(r.ok, "audit verify failed: {} {}", r.stdout, r.stderr);
    r.stdout.lines().next().unwrap().to_owned()
}

/// One INSERT through a raw session: `None` when it ran, else the SQLSTATE it got.
async fn insert(s: &mut (impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin), id: u64) -> Option<String> {
    send_query(s, &format!("INSERT INTO items VALUES ({id}, 'r')")).await;
    let msgs = read_until_ready(s).await;
    assert_eq!(msgs.last().unwrap().tag, b'Z', "the session stays usable: {msgs:?}");
    error_of(&msgs).map(|(code, _)| code)
}

#[tokio::test(flavor = "multi_thread")]
async fn removing_the_live_log_refuses_the_statement_in_flight_and_continues_the_chain() {
    let h = Harness::start().await;
    let dir = h.data_dir().to_owned();
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "prod-db", AccessLevel::Write, Duration::from_secs(3600))
        .await;
    let mut s = raw::session(&h, &alice, "prod-db").await;
    for id in 1000..1005 {
        assert_eq!(insert(&mut s, id).await, None);
    }
    settle(&dir).await;
    let last_before = records(&dir).iter().map(|r| r["seq"].as_u64().unwrap()).max().unwrap();
    std::fs::remove_file(dir.join("audit.jsonl")).unwrap();

    // The write that finds its file unlinked is refused: its record is in no file on disk.
    assert_eq!(insert(&mut s, 1005).await.as_deref(), Some("58030"));
    for id in 1006..1010 {
        assert_eq!(insert(&mut s, id).await, None, "statements run again in the new file");
    }
    assert_eq!(committed_rows(&h, 1005).first().map(String::as_str), Some("1006"));
    assert_every_row_audited(&h, &dir, 1005);

    // The new file continues the chain after the last record acknowledged.
    let first = first_record(&dir);
    assert_eq!(first["event"], "audit.reopened", "{first}");
    assert_eq!(first["reason"], "deleted");
    assert_eq!(first["seq"], last_before + 1);
    let verdict = verify_all(&dir).await;
    assert!(
        verdict.starts_with("ok: ") && verdict.contains(&format!("seq {}..", last_before + 1)),
        "{verdict}"
    );
    let (_, metrics) = h.metrics_get("/metrics").await;
    assert_eq!(
        jitgate_tests::metric(&metrics, "jitgate_audit_reopens_total{reason=\"deleted\"}"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_renamed_log_continues_its_chain_across_restarts_whatever_the_files_are_called() {
    let mut h = Harness::start().await;
    let dir = h.data_dir().to_owned();
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "prod-db", AccessLevel::Write, Duration::from_secs(3600))
        .await;
    let mut s = raw::session(&h, &alice, "prod-db").await;
    for id in 2000..2005 {
        assert_eq!(insert(&mut s, id).await, None);
    }
    settle(&dir).await;
    std::fs::rename(dir.join("audit.jsonl"), dir.join("audit.jsonl.1")).unwrap();
    let renamed_len = std::fs::metadata(dir.join("audit.jsonl.1")).unwrap().len();
    assert_eq!(insert(&mut s, 2005).await.as_deref(), Some("58030"));
    // The refused record was cut back out of the renamed file.
    assert_eq!(std::fs::metadata(dir.join("audit.jsonl.1")).unwrap().len(), renamed_len);
    for id in 2006..2010 {
        assert_eq!(insert(&mut s, id).await, None);
    }
    assert_eq!(first_record(&dir)["reason"], "renamed");
    drop(s);

    // A restart continues the chain from the active file.
    h.restart_proxy().await;
    let mut s = raw::session(&h, &alice, "prod-db").await;
    assert_eq!(insert(&mut s, 2010).await, None);
    drop(s);
    h.stop_proxy().await.unwrap();

    // Renamed and compressed while the proxy was down, with a dated name it does not know.
    std::fs::rename(dir.join("audit.jsonl"), dir.join("audit.jsonl-20261201")).unwrap();
    assert!(std::process::Command::new("gzip")
        .arg(dir.join("audit.jsonl-20261201"))
        .status()
        .unwrap()
        .success());
    h.start_proxy().await;
    let mut s = raw::session(&h, &alice, "prod-db").await;
    assert_eq!(insert(&mut s, 2011).await, None);
    drop(s);
    h.stop_proxy().await.unwrap();

    // Every file moved out of the directory while the proxy was down (logrotate's olddir):
    // the tip file in the data directory still continues the chain.
    let old = tempfile::tempdir().unwrap();
    let mut moved = Vec::new();
    for f in log_files(&dir) {
        let to = old.path().join(f.file_name().unwrap());
        std::fs::rename(&f, &to).unwrap();
        moved.push(to);
    }
    h.start_proxy().await;
    let mut s = raw::session(&h, &alice, "prod-db").await;
    assert_eq!(insert(&mut s, 2012).await, None);
    drop(s);
    h.stop_proxy().await.unwrap();

    let mut every_file = moved.clone();
    every_file.push(dir.join("audit.jsonl"));
    assert_rows_audited_in(&h, &every_file, 2000);
    let remaining = records(&dir);
    assert!(
        remaining[0]["seq"].as_u64().unwrap() > 1,
        "the chain never restarts at seq 1"
    );
    let n = remaining.last().unwrap()["seq"].as_u64().unwrap();
    // All the files, given in any order, verify as one chain from seq 1.
    let mut args = vec!["audit", "verify"];
    args.extend(every_file.iter().rev().map(|f| p(f)));
    let r = run_jitgate(&args, &[]).await;
    assert!(r.ok, "{} {}", r.stdout, r.stderr);
    assert!(
        r.stdout.starts_with(&format!("ok: {n} records, seq 1..{n}\n")),
        "{}",
        r.stdout
    );
    // The data directory alone now holds the chain's end: a clear verdict, not a failure.
    let r = run_jitgate(&["audit", "verify", "--data-dir", p(&dir)], &[]).await;
    assert!(r.ok, "{} {}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains("earlier records are not in these files"),
        "{}",
        r.stdout
    );
    // Reasons of every reopening, in chain order.
    let all = records_in(&every_file);
    let reasons: Vec<&str> = all
        .iter()
        .filter(|r| r["event"] == "audit.reopened")
        .map(|r| r["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons, ["renamed"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_log_truncated_behind_the_proxys_back_is_noticed_and_never_extended() {
    let h = Harness::start().await;
    let dir = h.data_dir().to_owned();
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "prod-db", AccessLevel::Write, Duration::from_secs(3600))
        .await;
    let mut s = raw::session(&h, &alice, "prod-db").await;
    for id in 3000..3005 {
        assert_eq!(insert(&mut s, id).await, None);
    }
    settle(&dir).await;
    writer_idle(&h, &dir).await;
    // copytruncate: copy, then truncate the file the proxy holds open.
    let active = dir.join("audit.jsonl");
    std::fs::copy(&active, dir.join("audit.jsonl.1")).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&active)
        .unwrap()
        .set_len(0)
        .unwrap();
    assert_eq!(insert(&mut s, 3005).await.as_deref(), Some("58030"));
    for id in 3006..3010 {
        assert_eq!(insert(&mut s, id).await, None);
    }
    // The file holds whole records from its first byte: no hole, no refused record.
    let text = std::fs::read_to_string(&active).unwrap();
    assert!(text.starts_with("{\"seq\":"), "{:?}", &text[..text.len().min(80)]);
    assert!(!text.contains("(3005, 'r')"));
    assert_eq!(first_record(&dir)["reason"], "truncated");
    assert_every_row_audited(&h, &dir, 3000);
    let verdict = verify_all(&dir).await;
    let n = records(&dir).iter().map(|r| r["seq"].as_u64().unwrap()).max().unwrap();
    assert!(
        verdict.starts_with(&format!("ok: {n} records, seq 1..{n}")),
        "{verdict}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_reopen_switches_to_a_new_file_for_admins_only() {
    let h = Harness::start().await;
    let dir = h.data_dir().to_owned();
    let alice = h.user("alice", &["dev"]);
    let root = h.user("root", &["admin"]);
    h.grant("alice", "prod-db", AccessLevel::Write, Duration::from_secs(3600))
        .await;
    let mut s = raw::session(&h, &alice, "prod-db").await;
    assert_eq!(insert(&mut s, 4000).await, None);

    let r = h.cli_as(&alice, &["audit", "reopen"]).await;
    assert_eq!(r.code, Some(1), "{}", r.stdout);
    assert!(r.stderr.contains("lacks the admin role"), "{}", r.stderr);

    settle(&dir).await;
    std::fs::rename(dir.join("audit.jsonl"), dir.join("audit.jsonl.1")).unwrap();
    let r = h.cli_as(&root, &["audit", "reopen"]).await;
    assert!(r.ok, "{} {}", r.stdout, r.stderr);
    assert!(r.stdout.contains("new file"), "{}", r.stdout);
    // Reopened before the next write: nothing is refused.
    for id in 4001..4005 {
        assert_eq!(insert(&mut s, id).await, None);
    }
    let first = first_record(&dir);
    assert_eq!(
        (first["reason"].as_str(), first["new_file"].as_bool()),
        (Some("command"), Some(true))
    );
    // Nothing moved: still recorded, in the same file.
    let r = h.cli_as(&root, &["audit", "reopen", "--json"]).await;
    assert!(r.ok, "{}", r.stderr);
    let answer: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(answer["new_file"], false);
    let last = records(&dir)
        .into_iter()
        .max_by_key(|r| r["seq"].as_u64().unwrap())
        .unwrap();
    assert_eq!(last["event"], "audit.reopened");
    assert_eq!(last["seq"], answer["seq"]);
    assert_every_row_audited(&h, &dir, 4000);
    let verdict = verify_all(&dir).await;
    assert!(verdict.contains("seq 1.."), "{verdict}");
}

/// `jitgate serve` as its own process (so it can get signals), on fixed ports.
struct Proxy {
    child: tokio::process::Child,
    port: u16,
}

impl Proxy {
    async fn start(h: &Harness, user: &jitgate_tests::UserCert) -> Proxy {
        let text = std::fs::read_to_string(h.config_path()).unwrap();
        let port = match text.split("postgres = \"127.0.0.1:").nth(1) {
            Some(rest) if !rest.starts_with("0\"") => rest.split('"').next().unwrap().parse().unwrap(),
            _ => {
                let (pg, api, metrics) = (free_port().unwrap(), free_port().unwrap(), free_port().unwrap());
                h.edit_config(|c| {
                    c.replacen(
                        "postgres = \"127.0.0.1:0\"",
                        &format!("postgres = \"127.0.0.1:{pg}\""),
                        1,
                    )
                    .replacen("api = \"127.0.0.1:0\"", &format!("api = \"127.0.0.1:{api}\""), 1)
                    .replacen(
                        "metrics = \"127.0.0.1:0\"",
                        &format!("metrics = \"127.0.0.1:{metrics}\""),
                        1,
                    )
                });
                pg
            }
        };
        // Its log goes next to the data directory, for a failing test to show.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(h.data_dir().with_extension("proxy.log"))
            .unwrap();
        let child = tokio::process::Command::new(jitgate_bin())
            .args(["serve", "--config"])
            .arg(h.config_path())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        wait_until_serving(&h.conninfo_at(user, "prod-db", port)).await;
        Proxy { child, port }
    }

    fn pid(&self) -> u32 {
        self.child.id().unwrap()
    }

    /// SIGTERM, and waits for a clean exit.
    async fn stop(mut self) {
        let pid = self.pid().to_string();
        assert!(std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        let status = tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success(), "{status:?}");
    }
}

/// A psql reading INSERTs (ids from `from`, one statement per row) from a pipe, as fast as
/// it goes; errors are ignored, so refused statements leave gaps.
fn writer(conninfo: &str, from: u64) -> tokio::process::Child {
    let mut child = client_command("psql")
        .arg(conninfo)
        .args(["-X", "-q"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    tokio::spawn(async move {
        for id in from..from + 100_000 {
            let line = format!("INSERT INTO items VALUES ({id}, 'r');\n");
            if stdin.write_all(line.as_bytes()).await.is_err() {
                break;
            }
        }
    });
    child
}

#[tokio::test(flavor = "multi_thread")]
async fn the_logrotate_example_rotates_a_live_log_and_loses_no_record() {
    assert!(
        Path::new("/usr/sbin/logrotate").exists(),
        "logrotate missing (scripts/test installs the Debian package)"
    );
    let mut h = Harness::start().await;
    let dir = h.data_dir().to_owned();
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "prod-db", AccessLevel::Write, Duration::from_secs(3600))
        .await;
    h.stop_proxy().await.unwrap();
    let proxy = Proxy::start(&h, &alice).await;

    // The example as shipped, with this test's paths, and the reload sent straight to the
    // process instead of through systemd.
    let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/logrotate/jitgate")).unwrap();
    let reload = "systemctl reload jitgate.service >/dev/null 2>&1 || true";
    assert!(
        example.contains(reload),
        "the example's postrotate changed: update this test"
    );
    let conf_path = dir.join("logrotate.conf");
    let configure = |pid: u32| {
        let conf = example
            .replace("/var/lib/jitgate", p(&dir))
            .replace(reload, &format!("kill -HUP {pid}"));
        std::fs::write(&conf_path, conf).unwrap();
    };
    configure(proxy.pid());
    let state = dir.join("logrotate.state");
    let logrotate = || {
        let out = std::process::Command::new("/usr/sbin/logrotate")
            .args(["--force", "--state"])
            .arg(&state)
            .arg(&conf_path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "logrotate: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };

    let conninfo = h.conninfo_at(&alice, "prod-db", proxy.port);
    let mut writers = vec![writer(&conninfo, 100_000), writer(&conninfo, 200_000)];
    let rows = |h: &Harness| -> usize { committed_rows(h, 100_000).len() };
    let mut seen = 0;
    for _ in 0..3 {
        eventually("rows flowing", Duration::from_secs(30), || {
            let n = rows(&h);
            async move { n > seen + 200 }
        })
        .await;
        seen = rows(&h);
        logrotate();
    }
    eventually("rows flowing after the last rotation", Duration::from_secs(30), || {
        let n = rows(&h);
        async move { n > seen + 200 }
    })
    .await;
    for w in &mut writers {
        w.start_kill().unwrap();
        let _ = w.wait().await;
    }
    proxy.stop().await;

    // rotate, compress and delaycompress did their part.
    for name in ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2.gz", "audit.jsonl.3.gz"] {
        assert!(dir.join(name).exists(), "{name} missing: {:?}", log_files(&dir));
    }
    let n = assert_every_row_audited(&h, &dir, 100_000);
    assert!(n > 800, "{n}");
    // One record per SIGHUP, whether or not a write noticed the rename first.
    let signals = records(&dir)
        .into_iter()
        .filter(|r| r["event"] == "audit.reopened" && r["reason"] == "signal")
        .count();
    assert_eq!(signals, 3);
    let verdict = verify_all(&dir).await;
    assert!(verdict.contains("seq 1.."), "{verdict}");

    // And after a restart.
    let proxy = Proxy::start(&h, &alice).await;
    configure(proxy.pid());
    logrotate();
    let out = h
        .psql_conninfo(
            &h.conninfo_at(&alice, "prod-db", proxy.port),
            "INSERT INTO items VALUES (99999, 'after')",
        )
        .await;
    assert!(out.success, "{out:?}");
    proxy.stop().await;
    assert!(audited_texts(&dir).contains("INSERT INTO items VALUES (99999, 'after')"));
    let verdict = verify_all(&dir).await;
    let total = records(&dir).iter().map(|r| r["seq"].as_u64().unwrap()).max().unwrap();
    assert!(
        verdict.starts_with(&format!("ok: {total} records, seq 1..{total}")),
        "{verdict}"
    );
}
