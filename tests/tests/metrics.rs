//! The metrics listener reflects what happened.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use jitgate_tests::jitgate::model::AccessLevel;
use jitgate_tests::{eventually, metric, Harness};
use tokio::io::AsyncWriteExt;

#[tokio::test(flavor = "multi_thread")]
async fn metrics_reflect_sessions_opened_and_cut() {
    let h = Harness::start().await;
    assert_eq!(h.metrics_get("/healthz").await.0, "HTTP/1.1 200 OK");
    assert_eq!(h.metrics_get("/readyz").await.0, "HTTP/1.1 200 OK");
    let alice = h.user("alice", &["dev"]);
    let grant = h
        .grant("alice", "prod-db", AccessLevel::Read, Duration::from_secs(3600))
        .await;
    assert!(h.psql(&alice, "prod-db", "SELECT 1").await.success);
    assert!(h.psql(&alice, "prod-db", "SELECT 2").await.success);
    let mut idle = h.psql_interactive(&alice, "prod-db");
    // Wait for the idle session itself: the previous psql's session may still be ending.
    eventually("third session live", Duration::from_secs(20), || async {
        let (_, body) = h.metrics_get("/metrics").await;
        metric(
            &body,
            "jitgate_sessions_total{protocol=\"postgres\",target=\"prod-db\"}",
        ) == 3.0
            && metric(
                &body,
                "jitgate_sessions_active{protocol=\"postgres\",target=\"prod-db\"}",
            ) == 1.0
    })
    .await;
    let (_, body) = h.metrics_get("/metrics").await;
    assert_eq!(
        metric(
            &body,
            "jitgate_sessions_total{protocol=\"postgres\",target=\"prod-db\"}"
        ),
        3.0,
        "{body}"
    );
    assert_eq!(
        metric(
            &body,
            "jitgate_sessions_active{protocol=\"postgres\",target=\"prod-db\"}"
        ),
        1.0
    );
    assert_eq!(metric(&body, "jitgate_grants_active"), 1.0);
    assert_eq!(
        metric(&body, "jitgate_upstream_connect_seconds_count{target=\"prod-db\"}"),
        3.0
    );
    assert!(metric(&body, "jitgate_bytes_total{direction=\"target_to_client\"}") > 0.0);
    // Counted through each session's resolved counters, one per class.
    assert!(
        metric(&body, "jitgate_statements_total{class=\"read\",target=\"prod-db\"}") >= 2.0,
        "{body}"
    );

    h.admin().revoke_grant(grant.id.as_str()).await.unwrap();
    let mut stdin = idle.stdin.take().unwrap();
    let _ = stdin.write_all(b"SELECT 1;\n").await;
    drop(stdin);
    let _ = idle.wait().await;
    eventually("cut counted", Duration::from_secs(10), || async {
        let (_, body) = h.metrics_get("/metrics").await;
        metric(&body, "jitgate_session_cuts_total{reason=\"grant_revoked\"}") == 1.0
            && metric(
                &body,
                "jitgate_sessions_active{protocol=\"postgres\",target=\"prod-db\"}",
            ) == 0.0
    })
    .await;
    let (_, body) = h.metrics_get("/metrics").await;
    assert_eq!(metric(&body, "jitgate_grants_active"), 0.0);
    assert!(!h.psql(&alice, "prod-db", "SELECT 1").await.success);
    let (_, body) = h.metrics_get("/metrics").await;
    assert_eq!(metric(&body, "jitgate_sessions_denied_total{reason=\"no_grant\"}"), 1.0);
}
