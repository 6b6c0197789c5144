//! Query cancel through the proxy: psql's Ctrl-C works, forged keys do nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use jitgate_protocol::postgres::backend::BackendMessage;
use jitgate_protocol::postgres::frontend::encode_cancel;
use jitgate_tests::jitgate::model::AccessLevel;
use jitgate_tests::raw::{self, error_of, read_until_ready, send_query, send_startup};
use jitgate_tests::{client_command, eventually, metric, sleeping, Harness};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

async fn send_cancel(h: &Harness, process_id: i32, secret_key: i32) {
    let mut tcp = TcpStream::connect(h.addrs().postgres).await.unwrap();
    tcp.write_all(&encode_cancel(process_id, secret_key)).await.unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut sink),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn psql_ctrl_c_cancels_through_the_proxy() {
    let h = Harness::start().await;
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "prod-db", AccessLevel::Read, Duration::from_secs(3600))
        .await;
    let psql = client_command("psql")
        .arg(h.conninfo(&alice, "prod-db"))
        .args(["-X", "-c", "SELECT pg_sleep(60)"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    eventually("pg_sleep running", Duration::from_secs(20), || async {
        sleeping(&h) == 1
    })
    .await;
    std::process::Command::new("kill")
        .args(["-INT", &psql.id().unwrap().to_string()])
        .status()
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(30), psql.wait_with_output())
        .await
        .expect("cancelled at once")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("canceling statement due to user request"), "{stderr}");
    // The proxy counts the cancel once the target has closed the cancel connection, which may
    // be just after psql has seen the error.
    eventually("cancel counted", Duration::from_secs(10), || async {
        let (_, body) = h.metrics_get("/metrics").await;
        metric(&body, "jitgate_cancel_requests_total{outcome=\"forwarded\"}") == 1.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn forged_cancel_keys_cancel_nothing() {
    let h = Harness::start().await;
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "prod-db", AccessLevel::Read, Duration::from_secs(3600))
        .await;
    let cfg = raw::client_config(h.data_dir(), Some(&alice), None);
    let mut s = raw::ssl_request_tls(h.addrs().postgres, cfg).await.unwrap();
    send_startup(&mut s, &[("user", "alice"), ("database", "prod-db")]).await;
    let (pid, secret) = read_until_ready(&mut s)
        .await
        .iter()
        .find_map(|m| match m.decoded {
            BackendMessage::BackendKeyData { process_id, secret_key } => Some((process_id, secret_key)),
            _ => None,
        })
        .unwrap();
    send_query(&mut s, "SELECT pg_sleep(60)").await;
    eventually("pg_sleep running", Duration::from_secs(20), || async {
        sleeping(&h) == 1
    })
    .await;

    // Right process id, wrong secret; unknown process id; the target's own key shape.
    send_cancel(&h, pid, secret.wrapping_add(1)).await;
    send_cancel(&h, pid.wrapping_add(1), secret).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sleeping(&h), 1, "a forged key must not cancel anything");
    let (_, body) = h.metrics_get("/metrics").await;
    assert_eq!(metric(&body, "jitgate_cancel_requests_total{outcome=\"unknown\"}"), 2.0);

    send_cancel(&h, pid, secret).await;
    let msgs = tokio::time::timeout(Duration::from_secs(20), read_until_ready(&mut s))
        .await
        .expect("cancelled");
    assert_eq!(error_of(&msgs).expect("an ErrorResponse").0, "57014", "{msgs:?}");
    // The session stays usable after a cancel.
    send_query(&mut s, "SELECT 1").await;
    let after = read_until_ready(&mut s).await;
    assert!(after.iter().any(|m| m.tag == b'D'), "{after:?}");
}
