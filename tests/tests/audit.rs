//! The audit log fails closed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use jitgate_tests::jitgate::model::AccessLevel;
use jitgate_tests::raw::{self, error_of, read_until_ready, send_startup};
use jitgate_tests::{eventually, metric, Harness};

#[tokio::test(flavor = "multi_thread")]
async fn audit_failure_refuses_sessions() {
    let mut h = Harness::start().await;
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "prod-db", AccessLevel::Read, Duration::from_secs(3600))
        .await;
    // A device that accepts the open and refuses every write (ENOSPC).
    h.reconfigure("[audit]\npath = \"/dev/full\"").await;

    let out = h.psql(&alice, "prod-db", "SELECT 1").await;
    assert!(!out.success);
    assert!(out.stderr.contains("cannot write its audit log"), "{}", out.stderr);
    let cfg = raw::client_config(h.data_dir(), Some(&alice), None);
    let mut s = raw::ssl_request_tls(h.addrs().postgres, cfg).await.unwrap();
    send_startup(&mut s, &[("user", "alice"), ("database", "prod-db")]).await;
    assert_eq!(error_of(&read_until_ready(&mut s).await).unwrap().0, "58030");
    eventually("no backend left", Duration::from_secs(10), || async {
        h.backends_of("jit_reader") == 0
    })
    .await;
    let (_, body) = h.metrics_get("/metrics").await;
    assert!(
        metric(&body, "jitgate_audit_write_errors_total{kind=\"session.start\"}") >= 2.0,
        "{body}"
    );
    // Grant changes are refused too rather than going unrecorded.
    let req = jitgate_tests::jitgate::model::NewGrant {
        user: "bob".parse().unwrap(),
        target: "prod-db".parse().unwrap(),
        access: AccessLevel::Read,
        duration_secs: 60,
        reason: "x".into(),
    };
    assert!(h.admin().create_grant(&req).await.is_err());
}
