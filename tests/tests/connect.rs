//! `jitgate connect`: a loopback port for clients without a certificate (psql and psycopg with
//! `sslmode=disable`), tunnelled to the proxy over mTLS as the certificate's user: audited
//! under that user, cut at expiry with the same FATAL; only loopback; bad input refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::time::Duration;

use jitgate_tests::jitgate::model::AccessLevel;
use jitgate_tests::jitgate::sandbox::free_port;
use jitgate_tests::{client_command, eventually, jitgate_bin, poke_and_collect, run_jitgate, Harness, UserCert};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::{Child, Command};

const HOUR: Duration = Duration::from_secs(3600);

/// A running `jitgate connect` and what it printed first.
struct Connect {
    _child: Child,
    port: u16,
    stdout: String,
    stderr: String,
}

async fn connect(h: &Harness, user: &UserCert, target: &str) -> Connect {
    let port = free_port().unwrap();
    let mut child = Command::new(jitgate_bin())
        .args(["connect", target, "--port", &port.to_string()])
        .args(["--proxy", &format!("127.0.0.1:{}", h.addrs().postgres.port())])
        .args(["--api", &h.addrs().api.to_string()])
        .arg("--cert")
        .arg(&user.cert)
        .arg("--key")
        .arg(&user.key)
        .arg("--ca")
        .arg(&user.ca)
        .env_remove("JITGATE_CERT")
        .env_remove("JITGATE_API")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut stdout = String::new();
    // Two lines (where it listens, how to connect), then the grant line or a warning.
    for _ in 0..2 {
        tokio::time::timeout(Duration::from_secs(20), out.read_line(&mut stdout))
            .await
            .expect("jitgate connect prints where it listens")
            .unwrap();
    }
    let stderr = std::sync::Arc::new(tokio::sync::Mutex::new(String::new()));
    let mut err = child.stderr.take().unwrap();
    let sink = std::sync::Arc::clone(&stderr);
    tokio::spawn(async move {
        let mut buf = [0u8; 1024];
        while let Ok(n) = err.read(&mut buf).await {
            if n == 0 {
                break;
            }
            sink.lock().await.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let mut rest = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), out.read_line(&mut rest)).await;
    stdout.push_str(&rest);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stderr = stderr.lock().await.clone();
    Connect {
        _child: child,
        port,
        stdout,
        stderr,
    }
}

fn plain(port: u16, dbname: &str) -> String {
    format!("host=127.0.0.1 port={port} dbname={dbname} user=whoever sslmode=disable connect_timeout=10")
}

async fn psql(conninfo: &str, sql: &str) -> jitgate_tests::PsqlOutput {
    client_command("psql")
        .arg(conninfo)
        .args(["-X", "-A", "-t", "-c", sql])
        .output()
        .await
        .unwrap()
        .into()
}

#[tokio::test(flavor = "multi_thread")]
async fn psql_without_a_certificate_gets_in_as_the_tunnels_user_and_is_audited() {
    let h = Harness::start().await;
    let alice = h.user("alice", &["dev"]);
    let grant = h.grant("alice", "prod-db", AccessLevel::Read, HOUR).await;
    let c = connect(&h, &alice, "prod-db").await;
    assert!(c.stdout.contains("listening on 127.0.0.1:"), "{}", c.stdout);
    assert!(
        c.stdout.contains(&format!(
            "host=127.0.0.1 port={} dbname=prod-db sslmode=disable",
            c.port
        )),
        "{}",
        c.stdout
    );
    assert!(
        c.stdout.contains(&format!("grant {} (read access) ends in", grant.id)),
        "{}",
        c.stdout
    );

    let out = psql(&plain(c.port, "prod-db"), "SELECT count(*) FROM items").await;
    assert!(out.success, "{}", out.stderr);
    assert_eq!(out.stdout, "100");
    // Another database on the target, named alone.
    let out = psql(&plain(c.port, "other"), "SELECT current_database()").await;
    assert_eq!(out.stdout, "other", "{}", out.stderr);
    // The proxy saw alice, not the client's user name, and audits her statements.
    let statements = h.audit_events("statement");
    assert!(statements
        .iter()
        .any(|s| s["user"] == "alice" && s["text"] == "SELECT count(*) FROM items"));
    assert!(h.audit_events("session.start").iter().all(|s| s["user"] == "alice"));
    // The read grant is enforced as for any client.
    let out = psql(&plain(c.port, "prod-db"), "DELETE FROM items").await;
    assert!(!out.success);
    assert!(out.stderr.contains("read"), "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread")]
async fn psycopg_without_tls_works_and_the_cut_at_expiry_reaches_it_and_psql() {
    let python = std::env::var("JITGATE_PYTHON").unwrap_or_else(|_| {
        format!(
            "{}/.cache/jitgate-tools/venv/bin/python",
            std::env::var("HOME").unwrap()
        )
    });
    assert!(
        std::path::Path::new(&python).exists(),
        "{python} missing: scripts/test installs psycopg in its virtualenv"
    );
    let h = Harness::start().await;
    let alice = h.user("alice", &["dev"]);
    let grant = h
        .grant("alice", "prod-db", AccessLevel::Read, Duration::from_secs(8))
        .await;
    let c = connect(&h, &alice, "prod-db").await;
    assert!(
        c.stderr.contains("ends in") && c.stderr.contains("warning"),
        "a short grant is warned about: {}",
        c.stderr
    );

    // psycopg: one query, then it waits, then queries again after the grant ended.
    let script = r#"
import sys, time, psycopg
conn = psycopg.connect(sys.argv[1], autocommit=True)
print(conn.execute("SELECT count(*) FROM items").fetchone()[0], flush=True)
time.sleep(float(sys.argv[2]))
try:
    conn.execute("SELECT 1")
    print("still open")
except psycopg.Error as e:
    print("cut:", e)
"#;
    let left = grant
        .expires_at
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default()
        .as_secs_f64()
        + 1.0;
    let py = Command::new(&python)
        .args(["-c", script, &plain(c.port, "prod-db"), &left.to_string()])
        .output();
    let psql_live = client_command("psql")
        .arg(plain(c.port, "prod-db"))
        .args(["-X", "-A", "-t"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    eventually("two sessions through the tunnel", Duration::from_secs(10), || async {
        h.audit_events("session.start").len() >= 2
    })
    .await;
    let py = tokio::time::timeout(Duration::from_secs(60), py)
        .await
        .unwrap()
        .unwrap();
    let printed = String::from_utf8_lossy(&py.stdout).into_owned();
    assert!(
        printed.starts_with("100\n"),
        "{printed}{}",
        String::from_utf8_lossy(&py.stderr)
    );
    assert!(
        printed.contains("cut:") && printed.contains(&format!("grant {} expired", grant.id)),
        "{printed}"
    );
    let stderr = poke_and_collect(psql_live).await;
    assert!(stderr.contains("expired"), "{stderr}");
    let ends = h.audit_events("session.end");
    assert!(
        ends.iter().filter(|e| e["reason"] == "grant_expired").count() >= 2,
        "{ends:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn only_loopback_is_listened_on_and_a_missing_grant_is_warned_about() {
    let h = Harness::start().await;
    let alice = h.user("alice", &["dev"]);
    let (cert, key, ca) = (
        alice.cert.to_str().unwrap(),
        alice.key.to_str().unwrap(),
        alice.ca.to_str().unwrap(),
    );
    for listen in ["0.0.0.0", "::", "10.1.2.3"] {
        let run = run_jitgate(
            &[
                "connect", "prod-db", "--listen", listen, "--cert", cert, "--key", key, "--ca", ca,
            ],
            &[],
        )
        .await;
        assert!(!run.ok, "--listen {listen} was accepted");
        assert!(run.stderr.contains("loopback only"), "{}", run.stderr);
    }
    let c = connect(&h, &alice, "prod-db").await;
    assert!(
        c.stderr.contains("warning: no active grant for alice on prod-db"),
        "{}",
        c.stderr
    );
    let out = psql(&plain(c.port, "prod-db"), "SELECT 1").await;
    assert!(!out.success);
    assert!(
        out.stderr.contains("no active grant for alice on prod-db"),
        "{}",
        out.stderr
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_startup_bytes_get_a_fatal_and_a_closed_connection() {
    let h = Harness::start().await;
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "prod-db", AccessLevel::Read, HOUR).await;
    let c = connect(&h, &alice, "prod-db").await;
    for garbage in [
        &[0u8, 0, 0, 4, 0, 0, 0, 0][..],           // length below 8
        &[0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0][..], // length over the limit
        &[0, 0, 0, 8, 0x12, 0x34, 0x56, 0x78][..], // unknown protocol code
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", c.port)).await.unwrap();
        s.write_all(garbage).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer))
            .await
            .expect("the connection is closed")
            .unwrap();
        assert_eq!(answer.first(), Some(&b'E'), "{garbage:?}: {answer:?}");
        let text = String::from_utf8_lossy(&answer);
        assert!(text.contains("08P01") && text.contains("jitgate connect"), "{text}");
    }
    // The listener still serves.
    assert!(psql(&plain(c.port, "prod-db"), "SELECT 1").await.success);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_request_to_the_local_port_cancels_the_query_on_the_target() {
    use jitgate_tests::raw::{error_of, read_until_ready, send_query, send_startup};
    let h = Harness::start().await;
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "prod-db", AccessLevel::Read, HOUR).await;
    let c = connect(&h, &alice, "prod-db").await;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", c.port)).await.unwrap();
    send_startup(&mut s, &[("user", "gui"), ("database", "prod-db")]).await;
    let hello = read_until_ready(&mut s).await;
    let key = hello
        .iter()
        .find(|m| m.tag == b'K')
        .expect("BackendKeyData through the tunnel");
    // 'K', the length, then the process id and the secret.
    let (pid, secret) = (&key.raw[5..9], &key.raw[9..13]);
    send_query(&mut s, "SELECT pg_sleep(30)").await;
    eventually("the query runs", Duration::from_secs(10), || async {
        jitgate_tests::sleeping(&h) == 1
    })
    .await;
    let mut cancel = tokio::net::TcpStream::connect(("127.0.0.1", c.port)).await.unwrap();
    let mut msg = vec![0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e];
    msg.extend_from_slice(pid);
    msg.extend_from_slice(secret);
    cancel.write_all(&msg).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(15), read_until_ready(&mut s))
        .await
        .expect("the cancel reached the target");
    assert_eq!(error_of(&answer).map(|(code, _)| code).as_deref(), Some("57014"));
}
