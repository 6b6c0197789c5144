//! Who gets in: certificates, TLS negotiation, startup checks, grants.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use jitgate_protocol::postgres::backend::BackendMessage;
use jitgate_protocol::postgres::frontend::{encode_ssl_request, encode_startup};
use jitgate_tests::jitgate::model::{AccessLevel, Role, UserName};
use jitgate_tests::jitgate::pki::Authority;
use jitgate_tests::raw::{self, error_of, read_until_ready, send_query, send_startup};
use jitgate_tests::{metric, Harness, READER_PASSWORD};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HOUR: Duration = Duration::from_secs(3600);

/// Waits until the handshake-failure counter for `reason` reaches `expected`. The client sees
/// the TLS alert before the proxy counts the failure, so the count may lag a moment.
async fn assert_handshake_failures(h: &Harness, reason: &str, expected: f64) {
    let name = format!("jitgate_tls_handshake_failures_total{{listener=\"postgres\",reason=\"{reason}\"}}");
    let mut seen = 0.0;
    for _ in 0..100 {
        let (_, body) = h.metrics_get("/metrics").await;
        seen = metric(&body, &name);
        if seen == expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{name} is {seen}, expected {expected}");
}

#[tokio::test(flavor = "multi_thread")]
async fn valid_cert_and_grant_runs_queries() {
    let h = Harness::start().await;
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "prod-db", AccessLevel::Read, HOUR).await;
    let out = h
        .psql(&alice, "prod-db", "SELECT current_user, count(*) FROM items")
        .await;
    assert!(out.success, "{out:?}");
    assert_eq!(out.stdout, "jit_reader|100");
    // Another database on the same server: dbname=prod-db/other.
    let out = h.psql(&alice, "prod-db/other", "SELECT current_database()").await;
    assert!(out.success, "{out:?}");
    assert_eq!(out.stdout, "other");
    // The upstream password never reaches the client: psql was given none, and the session's
    // own view of its settings holds nothing of it.
    assert!(!out.stdout.contains(READER_PASSWORD) && !out.stderr.contains(READER_PASSWORD));
}

#[tokio::test(flavor = "multi_thread")]
async fn no_grant_gets_28000_with_hint() {
    let h = Harness::start().await;
    let alice = h.user("alice", &["dev"]);
    let out = h.psql(&alice, "prod-db", "SELECT 1").await;
    assert!(!out.success);
    assert!(
        out.stderr.contains("no active grant for alice on prod-db"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("HINT:") && out.stderr.contains("jitgate request prod-db --access read"),
        "{}",
        out.stderr
    );
    // The SQLSTATE, seen by a protocol client.
    let cfg = raw::client_config(h.data_dir(), Some(&alice), None);
    let mut s = raw::ssl_request_tls(h.addrs().postgres, cfg).await.unwrap();
    send_startup(&mut s, &[("user", "alice"), ("database", "prod-db")]).await;
    let (code, _) = error_of(&read_until_ready(&mut s).await).expect("an ErrorResponse");
    assert_eq!(code, "28000");
    assert_eq!(
        h.backends_of("jit_reader"),
        0,
        "nothing may reach the target without a grant"
    );
    let denied = h.audit_events("session.denied");
    assert_eq!(denied.len(), 2);
    assert_eq!(denied[0]["user"], "alice");
    // A grant for someone else, or another target, does not help.
    h.grant("bob", "prod-db", AccessLevel::Read, HOUR).await;
    h.grant("alice", "md5-db", AccessLevel::Read, HOUR).await;
    assert!(!h.psql(&alice, "prod-db", "SELECT 1").await.success);
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_certificate_fails_handshake() {
    let h = Harness::start().await;
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "prod-db", AccessLevel::Read, HOUR).await;
    let conninfo = format!(
        "host=127.0.0.1 port={} dbname=prod-db user=alice sslmode=verify-full sslrootcert={} sslcert=/nonexistent sslkey=/nonexistent",
        h.addrs().postgres.port(),
        alice.ca.display()
    );
    let out = h.psql_conninfo(&conninfo, "SELECT 1").await;
    assert!(!out.success);
    assert!(out.stderr.to_lowercase().contains("certificate"), "{}", out.stderr);
    assert_handshake_failures(&h, "no_certificate", 1.0).await;
    assert!(h.audit_events("session.start").is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn foreign_ca_certificate_fails_handshake() {
    let h = Harness::start().await;
    h.grant("alice", "prod-db", AccessLevel::Read, HOUR).await;
    let other = Authority::generate().unwrap();
    let (cert, key) = other
        .issue_client(&UserName::new("alice").unwrap(), &[Role::new("admin").unwrap()], HOUR)
        .unwrap();
    let mallory = h.user_from_pem("alice", &cert, &key);
    let out = h.psql(&mallory, "prod-db", "SELECT 1").await;
    assert!(!out.success, "{out:?}");
    assert_handshake_failures(&h, "unknown_issuer", 1.0).await;
    assert!(h.audit_events("session.start").is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_certificate_fails_handshake() {
    let h = Harness::start().await;
    h.grant("alice", "prod-db", AccessLevel::Read, HOUR).await;
    let ca = Authority::load(h.data_dir()).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let (cert, key) = ca
        .issue_client_between(
            &UserName::new("alice").unwrap(),
            &[],
            now - time::Duration::hours(2),
            now - time::Duration::hours(1),
        )
        .unwrap();
    let expired = h.user_from_pem("alice", &cert, &key);
    let out = h.psql(&expired, "prod-db", "SELECT 1").await;
    assert!(!out.success, "{out:?}");
    assert_handshake_failures(&h, "expired_certificate", 1.0).await;
    assert!(h.audit_events("session.start").is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn plaintext_startup_is_refused() {
    let h = Harness::start().await;
    h.grant("alice", "prod-db", AccessLevel::Read, HOUR).await;
    let conninfo = format!(
        "host=127.0.0.1 port={} dbname=prod-db user=alice sslmode=disable",
        h.addrs().postgres.port()
    );
    let out = h.psql_conninfo(&conninfo, "SELECT 1").await;
    assert!(!out.success);
    assert!(
        out.stderr
            .contains("jitgate accepts only TLS connections with a client certificate"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("sslmode=verify-full"), "{}", out.stderr);
    assert_eq!(h.backends_of("jit_reader"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn bytes_after_ssl_request_are_refused() {
    let h = Harness::start().await;
    h.grant("alice", "prod-db", AccessLevel::Read, HOUR).await;
    let mut tcp = TcpStream::connect(h.addrs().postgres).await.unwrap();
    // SSLRequest with a plaintext startup glued behind it: the injection CVE-2021-23214 shape.
    let mut bytes = encode_ssl_request().to_vec();
    bytes.extend_from_slice(&encode_startup(&[("user", "alice"), ("database", "prod-db")]));
    tcp.write_all(&bytes).await.unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut reply))
        .await
        .expect("connection closed")
        .unwrap();
    assert_eq!(reply.first(), Some(&b'E'), "expected an ErrorResponse, got {reply:?}");
    assert!(String::from_utf8_lossy(&reply).contains("unencrypted data after SSL request"));
    assert!(h.audit_events("session.start").is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn startup_user_must_match_certificate() {
    let h = Harness::start().await;
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "prod-db", AccessLevel::Read, HOUR).await;
    h.grant("bob", "prod-db", AccessLevel::Write, HOUR).await;
    let conninfo = h.conninfo(&alice, "prod-db").replace("user=alice", "user=bob");
    let out = h.psql_conninfo(&conninfo, "SELECT 1").await;
    assert!(!out.success);
    assert!(
        out.stderr
            .contains("user \"bob\" does not match the certificate's user \"alice\""),
        "{}",
        out.stderr
    );
    assert_eq!(h.backends_of("jit_writer"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn options_and_unknown_parameters_are_refused() {
    let h = Harness::start().await;
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "prod-db", AccessLevel::Read, HOUR).await;
    let conninfo = format!("{} options='-c role=jit_writer'", h.conninfo(&alice, "prod-db"));
    let out = h.psql_conninfo(&conninfo, "SELECT current_user").await;
    assert!(!out.success);
    assert!(
        out.stderr.contains("startup parameter \"options\" is not allowed"),
        "{}",
        out.stderr
    );
    let cfg = raw::client_config(h.data_dir(), Some(&alice), None);
    for (param, value) in [
        ("replication", "database"),
        ("session_authorization", "jit_writer"),
        ("_pq_.x", "1"),
    ] {
        let mut s = raw::ssl_request_tls(h.addrs().postgres, cfg.clone()).await.unwrap();
        send_startup(&mut s, &[("user", "alice"), ("database", "prod-db"), (param, value)]).await;
        let (code, message) = error_of(&read_until_ready(&mut s).await).expect("an ErrorResponse");
        assert_eq!(code, "42501", "{param}: {message}");
    }
    // Allowlisted parameters pass through (application_name with jitgate's attribution after it).
    let conninfo = format!("{} application_name=jit-test", h.conninfo(&alice, "prod-db"));
    let out = h.psql_conninfo(&conninfo, "SHOW application_name").await;
    assert!(out.success, "{out:?}");
    assert!(out.stdout.starts_with("jit-test jitgate:alice:s-"), "{}", out.stdout);
    assert_eq!(h.backends_of("jit_writer"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn direct_tls_with_alpn_works() {
    let h = Harness::start().await;
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "prod-db", AccessLevel::Read, HOUR).await;
    let cfg = raw::client_config(h.data_dir(), Some(&alice), Some(b"postgresql"));
    let mut s = raw::direct_tls(h.addrs().postgres, cfg).await.unwrap();
    send_startup(&mut s, &[("user", "alice"), ("database", "prod-db")]).await;
    let login = read_until_ready(&mut s).await;
    assert!(error_of(&login).is_none(), "{login:?}");
    assert!(matches!(login[0].decoded, BackendMessage::AuthenticationOk));
    assert!(login
        .iter()
        .any(|m| matches!(m.decoded, BackendMessage::BackendKeyData { .. })));
    send_query(&mut s, "SELECT 40 + 2").await;
    let rows = read_until_ready(&mut s).await;
    let data = rows.iter().find(|m| m.tag == b'D').expect("a DataRow");
    assert!(data.raw.ends_with(b"42"), "{data:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn direct_tls_without_alpn_is_refused() {
    let h = Harness::start().await;
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "prod-db", AccessLevel::Read, HOUR).await;
    let cfg = raw::client_config(h.data_dir(), Some(&alice), None);
    let mut s = raw::direct_tls(h.addrs().postgres, cfg).await.unwrap();
    send_startup(&mut s, &[("user", "alice"), ("database", "prod-db")]).await;
    let msgs = read_until_ready(&mut s).await;
    let (code, message) = error_of(&msgs).expect("an ErrorResponse");
    assert_eq!(code, "08P01");
    assert!(message.contains("ALPN"), "{message}");
    // Another protocol's ALPN fails the handshake itself.
    let cfg = raw::client_config(h.data_dir(), Some(&alice), Some(b"http/1.1"));
    let r = raw::direct_tls(h.addrs().postgres, cfg).await;
    if let Ok(mut s) = r {
        // TLS 1.3 client may see the alert only on first read.
        let mut b = [0u8; 1];
        assert!(!matches!(s.read(&mut b).await, Ok(1)));
    }
    assert!(h.audit_events("session.start").is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_client_is_dropped_at_handshake_deadline() {
    let h = Harness::start_with(jitgate_tests::Options {
        handshake_timeout: Some("1s"),
        ..Default::default()
    })
    .await;
    let mut tcp = TcpStream::connect(h.addrs().postgres).await.unwrap();
    // Half a startup packet, then silence.
    tcp.write_all(&[0, 0, 0, 40, 0, 3]).await.unwrap();
    let mut buf = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(15), tcp.read_to_end(&mut buf)).await;
    assert!(
        r.is_ok(),
        "the proxy must close a connection that never finishes its handshake"
    );
    assert!(buf.is_empty());
    // Counted as the connection task ends, which may be just after the client saw the close.
    jitgate_tests::eventually("the timeout counted", Duration::from_secs(10), || async {
        let (_, body) = h.metrics_get("/metrics").await;
        metric(
            &body,
            "jitgate_tls_handshake_failures_total{listener=\"postgres\",reason=\"timeout\"}",
        ) == 1.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_startup_is_refused() {
    let h = Harness::start().await;
    let mut tcp = TcpStream::connect(h.addrs().postgres).await.unwrap();
    // Claims 1 GiB; the proxy must refuse before buffering anything.
    tcp.write_all(&[0x40, 0, 0, 0, 0, 3, 0, 0]).await.unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut reply))
        .await
        .expect("closed")
        .unwrap();
    assert_eq!(reply.first(), Some(&b'E'));
    assert!(String::from_utf8_lossy(&reply).contains("invalid startup packet"));
    // Garbage is refused the same way, and the listener keeps serving.
    let mut tcp = TcpStream::connect(h.addrs().postgres).await.unwrap();
    tcp.write_all(&[0, 0, 0, 8, 1, 2, 3, 4]).await.unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut reply))
        .await
        .expect("closed")
        .unwrap();
    assert_eq!(reply.first(), Some(&b'E'));
    let alice = h.user("alice", &[]);
    h.grant("alice", "prod-db", AccessLevel::Read, HOUR).await;
    assert!(h.psql(&alice, "prod-db", "SELECT 1").await.success);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resumed_tls_session_does_not_outlive_its_certificate() {
    let h = Harness::start().await;
    h.grant("alice", "prod-db", AccessLevel::Read, HOUR).await;
    let ca = Authority::load(h.data_dir()).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let not_after = now + time::Duration::seconds(2);
    let (cert, key) = ca
        .issue_client_between(
            &UserName::new("alice").unwrap(),
            &[],
            now - time::Duration::hours(1),
            not_after,
        )
        .unwrap();
    let alice = h.user_from_pem("alice", &cert, &key);
    // One client configuration for both connections: rustls resumes the first one's session
    // for the second when the server lets it.
    let cfg = raw::client_config(h.data_dir(), Some(&alice), None);
    let mut s = raw::ssl_request_tls(h.addrs().postgres, cfg.clone()).await.unwrap();
    send_startup(&mut s, &[("user", "alice"), ("database", "prod-db")]).await;
    let login = read_until_ready(&mut s).await;
    assert!(error_of(&login).is_none(), "{login:?}");
    drop(s);
    // Two seconds past notAfter.
    let wait = (not_after - time::OffsetDateTime::now_utc()) + time::Duration::seconds(2);
    tokio::time::sleep(Duration::try_from(wait).unwrap_or_default()).await;
    match raw::ssl_request_tls(h.addrs().postgres, cfg).await {
        Err(_) => {}
        Ok(mut s) => {
            // TLS 1.3: the client sees the server's alert on its first read.
            send_startup(&mut s, &[("user", "alice"), ("database", "prod-db")]).await;
            let ending = raw::read_to_end(&mut s).await;
            assert!(ending.end.is_err(), "the handshake must fail: {ending:?}");
            assert!(error_of(&ending.msgs).is_none(), "refused only at startup: {ending:?}");
        }
    }
    assert_handshake_failures(&h, "expired_certificate", 1.0).await;
    assert_eq!(h.audit_events("session.start").len(), 1);
}
