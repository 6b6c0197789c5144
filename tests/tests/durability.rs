//! No statement runs unaudited: a crash loses no record of a statement that reached the
//! database, and a full disk refuses statements until space returns.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::time::Duration;

use jitgate_tests::jitgate::model::AccessLevel;
use jitgate_tests::jitgate::sandbox::free_port;
use jitgate_tests::raw::{self, error_of, read_until_ready, send_query};
use jitgate_tests::{client_command, eventually, jitgate_bin, wait_until_serving, Harness};
use tokio::io::AsyncWriteExt;

/// Statement texts in an audit file, tolerating a torn last line.
fn audited_texts(path: &std::path::Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["event"] == "statement")
        .filter_map(|e| e["text"].as_str().map(str::to_owned))
        .collect()
}

/// Listener ports of a proxy started by [`serve_in_own_process`].
struct Ports {
    postgres: u16,
    metrics: u16,
}

/// Stops the harness's in-process proxy and starts `jitgate serve` on its config as a
/// process of its own, on free ports, with `env` and its stderr going to `stderr`.
async fn serve_in_own_process(h: &mut Harness, env: &[(&str, &str)], stderr: Stdio) -> (tokio::process::Child, Ports) {
    h.stop_proxy().await.unwrap();
    let (pg_port, api_port, metrics_port) = (free_port().unwrap(), free_port().unwrap(), free_port().unwrap());
    h.edit_config(|c| {
        c.replacen(
            "postgres = \"127.0.0.1:0\"",
            &format!("postgres = \"127.0.0.1:{pg_port}\""),
            1,
        )
        .replacen("api = \"127.0.0.1:0\"", &format!("api = \"127.0.0.1:{api_port}\""), 1)
        .replacen(
            "metrics = \"127.0.0.1:0\"",
            &format!("metrics = \"127.0.0.1:{metrics_port}\""),
            1,
        )
    });
    let proxy = tokio::process::Command::new(jitgate_bin())
        .args(["serve", "--config"])
        .arg(h.config_path())
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let ports = Ports {
        postgres: pg_port,
        metrics: metrics_port,
    };
    (proxy, ports)
}

/// The server's log lines never block its workers: with stderr a pipe nobody reads (a
/// stalled journald or log shipper) and every line logged, sessions still open, run and end,
/// and `/healthz` answers. Written straight from the workers, the first full pipe buffer
/// (64 KiB: a few sessions at trace level) would freeze the proxy.
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_stderr_freezes_no_session() {
    let mut h = Harness::start().await;
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "prod-db", AccessLevel::Read, Duration::from_secs(3600))
        .await;
    let (mut proxy, ports) = serve_in_own_process(&mut h, &[("RUST_LOG", "trace")], Stdio::piped()).await;
    // Held open and never read.
    let _stderr = proxy.stderr.take().unwrap();
    let conninfo = h.conninfo_at(&alice, "prod-db", ports.postgres);
    wait_until_serving(&conninfo).await;
    for i in 0..40 {
        let out = tokio::time::timeout(
            Duration::from_secs(20),
            client_command("psql")
                .arg(&conninfo)
                .args(["-X", "-A", "-t", "-c", &format!("SELECT {i} + 1")])
                .output(),
        )
        .await
        .unwrap_or_else(|_| panic!("session {i} hangs while stderr is not read"))
        .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), (i + 1).to_string());
    }
    let (status, body) = tokio::time::timeout(
        Duration::from_secs(10),
        jitgate_tests::http_get(([127, 0, 0, 1], ports.metrics).into(), "/healthz"),
    )
    .await
    .expect("/healthz does not answer while stderr is not read");
    assert!(status.contains("200"), "{status} {body}");
    assert!(proxy.try_wait().unwrap().is_none(), "the proxy exited");
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_loses_no_statement_that_reached_the_database() {
    let mut h = Harness::start().await;
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "prod-db", AccessLevel::Write, Duration::from_secs(3600))
        .await;
    // The proxy runs as its own process here, so it can be killed for real.
    let (mut proxy, ports) = serve_in_own_process(&mut h, &[], Stdio::null()).await;
    let conninfo = h.conninfo_at(&alice, "prod-db", ports.postgres);
    wait_until_serving(&conninfo).await;

    // Two writers, one statement per row, as fast as they go.
    let mut writers = Vec::new();
    for w in 0..2 {
        let mut child = client_command("psql")
            .arg(&conninfo)
            .args(["-X", "-q"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        tokio::spawn(async move {
            for i in 0..20_000 {
                let id = 100_000 + w * 100_000 + i;
                if stdin
                    .write_all(format!("INSERT INTO items VALUES ({id}, 'w');\n").as_bytes())
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        writers.push(child);
    }
    eventually("rows flowing", Duration::from_secs(30), || async {
        h.pg.sql("app", "SELECT count(*) FROM items WHERE id >= 100000")
            .unwrap()
            .parse::<u64>()
            .unwrap()
            > 300
    })
    .await;
    proxy.start_kill().unwrap();
    proxy.wait().await.unwrap();
    for mut w in writers {
        let _ = tokio::time::timeout(Duration::from_secs(20), w.wait()).await;
    }

    let rows: Vec<String> =
        h.pg.sql("app", "SELECT id FROM items WHERE id >= 100000 ORDER BY id")
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect();
    assert!(rows.len() > 300);
    let texts: std::collections::HashSet<String> =
        audited_texts(&h.data_dir().join("audit.jsonl")).into_iter().collect();
    let missing: Vec<&String> = rows
        .iter()
        .filter(|id| !texts.contains(&format!("INSERT INTO items VALUES ({id}, 'w')")))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} rows have no audit record, e.g. {:?}",
        missing.len(),
        rows.len(),
        &missing[..missing.len().min(5)]
    );
}

/// A small tmpfs, unmounted when dropped.
struct SmallDisk {
    dir: std::path::PathBuf,
}

impl SmallDisk {
    fn mount(dir: std::path::PathBuf, size: &str) -> SmallDisk {
        std::fs::create_dir_all(&dir).unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(
            st.success(),
            "mounting a tmpfs needs root (the test suite runs as root)"
        );
        SmallDisk { dir }
    }

    fn fill(&self) {
        let _ = std::process::Command::new("dd")
            .args(["if=/dev/zero", "bs=4096"])
            .arg(format!("of={}", self.dir.join("filler").display()))
            .stderr(Stdio::null())
            .status();
    }

    fn free(&self) {
        std::fs::remove_file(self.dir.join("filler")).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn full_disk_refuses_statements_until_space_returns() {
    let mut h = Harness::start().await;
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "prod-db", AccessLevel::Write, Duration::from_secs(3600))
        .await;
    h.stop_proxy().await.unwrap();
    let disk = SmallDisk::mount(h.data_dir().join("auditfs"), "1m");
    let path = disk.dir.join("audit.jsonl");
    h.edit_config(|c| format!("{c}\n[audit]\npath = \"{}\"\n", path.display()));
    h.start_proxy().await;

    let mut s = raw::session(&h, &alice, "prod-db").await;
    disk.fill();
    // The audit file's last page may still take a few small records; keep writing until the
    // disk refuses one.
    let mut refused = None;
    for id in 5000..5100 {
        send_query(&mut s, &format!("INSERT INTO items VALUES ({id}, 'while full')")).await;
        let msgs = read_until_ready(&mut s).await;
        assert_eq!(msgs.last().unwrap().tag, b'Z', "the session stays usable");
        if let Some((code, message)) = error_of(&msgs) {
            assert_eq!(code, "58030");
            assert!(message.contains("cannot write its audit log"), "{message}");
            refused = Some(id);
            break;
        }
    }
    let refused = refused.expect("a statement refused while the audit log cannot be written");
    assert_eq!(
        h.pg.sql("app", &format!("SELECT count(*) FROM items WHERE id = {refused}"))
            .unwrap(),
        "0"
    );

    disk.free();
    send_query(&mut s, "INSERT INTO items VALUES (6001, 'after')").await;
    let msgs = read_until_ready(&mut s).await;
    assert!(error_of(&msgs).is_none(), "{msgs:?}");
    assert_eq!(
        h.pg.sql("app", "SELECT count(*) FROM items WHERE id = 6001").unwrap(),
        "1"
    );
    assert!(audited_texts(&path)
        .iter()
        .any(|t| t == "INSERT INTO items VALUES (6001, 'after')"));
    assert!(!audited_texts(&path).iter().any(|t| t.contains(&format!("({refused},"))));
    let (_, body) = h.metrics_get("/metrics").await;
    assert!(jitgate_tests::metric(&body, "jitgate_statement_denials_total{reason=\"audit_unavailable\"}") >= 1.0);
    drop(s);
    h.stop_proxy().await.unwrap();
}

/// Makes the audit log of `h` (proxy stopped) a pipe read by a thread the test controls: while
/// `reading` is false nobody reads, so a record larger than the pipe's buffer cannot be
/// written. What was read collects in the returned buffer.
fn pipe_audit_log(
    h: &Harness,
) -> (
    std::path::PathBuf,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
) {
    use std::io::Read as _;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    let fifo = h.data_dir().join("audit.fifo");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let reading = Arc::new(AtomicBool::new(true));
    let seen = Arc::new(Mutex::new(Vec::<u8>::new()));
    {
        let (fifo, reading, seen) = (fifo.clone(), Arc::clone(&reading), Arc::clone(&seen));
        std::thread::spawn(move || {
            let mut f = std::fs::File::open(&fifo).unwrap();
            let mut buf = [0u8; 8192];
            loop {
                if !reading.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                match f.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => seen.lock().unwrap().extend_from_slice(&buf[..n]),
                }
            }
        });
    }
    (fifo, reading, seen)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_statement_waits_for_its_audit_record() {
    use std::sync::atomic::Ordering;

    let mut h = Harness::start().await;
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "prod-db", AccessLevel::Write, Duration::from_secs(3600))
        .await;
    h.stop_proxy().await.unwrap();
    // The audit log is a pipe whose reader the test controls.
    let (fifo, reading, seen) = pipe_audit_log(&h);
    h.edit_config(|c| {
        format!(
            "{c}\n[audit]\npath = \"{}\"\nmax_statement_bytes = 1048576\n",
            fifo.display()
        )
    });
    h.start_proxy().await;
    let mut s = raw::session(&h, &alice, "prod-db").await;

    reading.store(false, Ordering::Release);
    let big = "x".repeat(256 * 1024);
    send_query(&mut s, &format!("INSERT INTO items VALUES (7000, '{big}')")).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        h.pg.sql("app", "SELECT count(*) FROM items WHERE id = 7000").unwrap(),
        "0",
        "the statement reached the database before its record was written"
    );
    reading.store(true, Ordering::Release);
    let msgs = read_until_ready(&mut s).await;
    assert!(error_of(&msgs).is_none(), "{msgs:?}");
    assert_eq!(
        h.pg.sql("app", "SELECT count(*) FROM items WHERE id = 7000").unwrap(),
        "1"
    );
    let seen = String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();
    assert!(seen.contains("INSERT INTO items VALUES (7000, 'xxx"));
}

/// A stalled audit log (a pipe nobody reads) freezes nothing else: grants still expire on
/// time and cut their sessions, and `/healthz` still answers. Two grants expire at once, so a
/// runtime whose two workers each blocked on an expiry's audit record would freeze.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_audit_log_freezes_neither_expiry_nor_health() {
    use std::sync::atomic::Ordering;

    let mut h = Harness::start().await;
    let alice = h.user("alice", &["dev"]);
    let (bob, carol) = (h.user("bob", &["dev"]), h.user("carol", &["dev"]));
    h.stop_proxy().await.unwrap();
    let (fifo, reading, _seen) = pipe_audit_log(&h);
    h.edit_config(|c| {
        format!(
            "{c}\n[audit]\npath = \"{}\"\nmax_statement_bytes = 1048576\nqueue_depth = 64\n",
            fifo.display()
        )
    });
    h.start_proxy().await;
    h.grant("alice", "prod-db", AccessLevel::Write, Duration::from_secs(3600))
        .await;
    let lasts = Duration::from_secs(8);
    h.grant("bob", "prod-db", AccessLevel::Read, lasts).await;
    h.grant("carol", "prod-db", AccessLevel::Read, lasts).await;
    let granted = tokio::time::Instant::now();
    let mut b = raw::session(&h, &bob, "prod-db").await;
    let mut c = raw::session(&h, &carol, "prod-db").await;
    let mut a = raw::session(&h, &alice, "prod-db").await;

    // Stall the log: nobody reads, and a record larger than the pipe's buffer is on its way.
    reading.store(false, Ordering::Release);
    let big = "x".repeat(256 * 1024);
    send_query(&mut a, &format!("INSERT INTO items VALUES (7001, '{big}')")).await;

    // Both grants end while the writer is stuck; their sessions are cut all the same. The
    // bound only stops a frozen proxy from hanging the test.
    let bound = lasts + Duration::from_secs(20);
    for (who, s) in [("bob", &mut b), ("carol", &mut c)] {
        let left = bound.saturating_sub(granted.elapsed());
        let ending = tokio::time::timeout(left, raw::read_to_end(s))
            .await
            .unwrap_or_else(|_| panic!("{who}'s session was not cut while the audit log is stalled"));
        let (code, message) = error_of(&ending.msgs).expect("a FATAL before the close");
        assert_eq!(code, "57P01", "{message}");
        assert!(message.contains("expired"), "{message}");
    }
    let (status, body) = tokio::time::timeout(
        Duration::from_secs(10),
        jitgate_tests::http_get(h.addrs().metrics, "/healthz"),
    )
    .await
    .expect("/healthz does not answer while the audit log is stalled");
    assert!(status.contains("200"), "{status} {body}");
    assert_eq!(
        h.pg.sql("app", "SELECT count(*) FROM items WHERE id = 7001").unwrap(),
        "0",
        "the statement ran without its record"
    );

    // Reading again, everything the stall held back is written.
    reading.store(true, Ordering::Release);
    let msgs = read_until_ready(&mut a).await;
    assert!(error_of(&msgs).is_none(), "{msgs:?}");
}
