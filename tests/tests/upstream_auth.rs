//! The proxy logs in to targets itself: SCRAM-SHA-256, md5, TLS. The engineer supplies no
//! database password and never sees one, nor the target's own cancel key.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use jitgate_protocol::postgres::backend::BackendMessage;
use jitgate_tests::jitgate::model::AccessLevel;
use jitgate_tests::raw::{self, error_of, read_until_ready, send_query, send_startup};
use jitgate_tests::{Harness, Options, MD5_PASSWORD, READER_PASSWORD};

const HOUR: Duration = Duration::from_secs(3600);

#[tokio::test(flavor = "multi_thread")]
async fn scram_upstream_login() {
    let h = Harness::start().await;
    assert_eq!(
        h.pg.sql(
            "postgres",
            "SELECT left(rolpassword, 13) FROM pg_authid WHERE rolname = 'jit_reader'"
        )
        .unwrap(),
        "SCRAM-SHA-256"
    );
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "prod-db", AccessLevel::Read, HOUR).await;
    let out = h.psql(&alice, "prod-db", "SELECT current_user").await;
    assert!(out.success, "{out:?}");
    assert_eq!(out.stdout, "jit_reader");

    // The client's cancel key is the proxy's, not the target backend's.
    let cfg = raw::client_config(h.data_dir(), Some(&alice), None);
    let mut s = raw::ssl_request_tls(h.addrs().postgres, cfg).await.unwrap();
    send_startup(&mut s, &[("user", "alice"), ("database", "prod-db")]).await;
    let login = read_until_ready(&mut s).await;
    let pid = login
        .iter()
        .find_map(|m| match m.decoded {
            BackendMessage::BackendKeyData { process_id, .. } => Some(process_id),
            _ => None,
        })
        .expect("BackendKeyData");
    send_query(&mut s, "SELECT pg_backend_pid()").await;
    let rows = read_until_ready(&mut s).await;
    let row = rows.iter().find(|m| m.tag == b'D').unwrap();
    let backend_pid: i32 = String::from_utf8_lossy(&row.raw[11..]).parse().unwrap();
    assert_ne!(pid, backend_pid);
    for m in login.iter().chain(rows.iter()) {
        assert!(!String::from_utf8_lossy(&m.raw).contains(READER_PASSWORD));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn md5_upstream_login() {
    let h = Harness::start().await;
    assert!(h
        .pg
        .sql(
            "postgres",
            "SELECT rolpassword FROM pg_authid WHERE rolname = 'jit_md5'"
        )
        .unwrap()
        .starts_with("md5"));
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "md5-db", AccessLevel::Read, HOUR).await;
    let out = h
        .psql(&alice, "md5-db", "SELECT current_user, count(*) FROM items")
        .await;
    assert!(out.success, "{out:?}");
    assert_eq!(out.stdout, "jit_md5|100");
    assert!(!out.stderr.contains(MD5_PASSWORD));
}

#[tokio::test(flavor = "multi_thread")]
async fn trust_upstream_login() {
    let h = Harness::start().await;
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "trust-db", AccessLevel::Read, HOUR).await;
    let out = h.psql(&alice, "trust-db", "SELECT current_user").await;
    assert!(out.success, "{out:?}");
    assert_eq!(out.stdout, "jit_trust");
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_upstream_password_is_reported_without_secrets() {
    let mut h = Harness::start().await;
    std::fs::write(h.data_dir().join("reader.password"), "not-the-password").unwrap();
    h.restart_proxy().await;
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "prod-db", AccessLevel::Read, HOUR).await;
    let out = h.psql(&alice, "prod-db", "SELECT 1").await;
    assert!(!out.success);
    assert!(
        out.stderr.contains("jitgate could not log in to prod-db"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("not-the-password"));
    let cfg = raw::client_config(h.data_dir(), Some(&alice), None);
    let mut s = raw::ssl_request_tls(h.addrs().postgres, cfg).await.unwrap();
    send_startup(&mut s, &[("user", "alice"), ("database", "prod-db")]).await;
    assert_eq!(error_of(&read_until_ready(&mut s).await).unwrap().0, "08001");
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_verify_full_upstream() {
    let h = Harness::start_with(Options {
        upstream_tls: true,
        ..Default::default()
    })
    .await;
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "tls-db", AccessLevel::Read, HOUR).await;
    let out = h
        .psql(
            &alice,
            "tls-db",
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        )
        .await;
    assert!(out.success, "{out:?}");
    assert_eq!(out.stdout, "t", "the proxy's connection to the target must be TLS");
    // The plain target on the same server shows the difference.
    h.grant("alice", "prod-db", AccessLevel::Read, HOUR).await;
    let out = h
        .psql(
            &alice,
            "prod-db",
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        )
        .await;
    assert_eq!(out.stdout, "f");
}
