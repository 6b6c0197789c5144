//! Sessions live only as long as their grant, their certificate and the admin's patience:
//! expiry, revocation, kill and certificate expiry cut them, whatever they are doing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use jitgate_tests::jitgate::model::AccessLevel;
use jitgate_tests::raw::{self, error_of, read_until_ready, send_query, send_startup};
use jitgate_tests::{eventually, poke_and_collect, Harness};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const HOUR: Duration = Duration::from_secs(3600);

/// Session-end audit records for `grant_id`.
fn ends_of(h: &Harness, grant_id: &str) -> Vec<serde_json::Value> {
    h.audit_events("session.end")
        .into_iter()
        .filter(|e| e["grant_id"] == grant_id)
        .collect()
}

/// Waits until `n` sessions are live for the grant.
async fn wait_sessions(h: &Harness, n: usize) {
    let admin = h.admin().clone();
    eventually("sessions live", Duration::from_secs(20), || {
        let admin = admin.clone();
        async move { admin.list_sessions().await.map(|s| s.len() == n).unwrap_or(false) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn expiry_cuts_busy_and_idle_sessions() {
    let h = Harness::start().await;
    let alice = h.user("alice", &["dev"]);
    let grant = h
        .grant("alice", "prod-db", AccessLevel::Read, Duration::from_secs(6))
        .await;

    let idle = h.psql_interactive(&alice, "prod-db");
    let busy = {
        let conninfo = h.conninfo(&alice, "prod-db");
        tokio::spawn(async move {
            jitgate_tests::client_command("psql")
                .arg(conninfo)
                .args(["-X", "-c", "SELECT pg_sleep(60)"])
                .output()
                .await
                .unwrap()
        })
    };
    wait_sessions(&h, 2).await;
    assert_eq!(h.backends_of("jit_reader"), 2);

    // The statement would run for a minute; the grant ends after a few seconds.
    let out = tokio::time::timeout(Duration::from_secs(30), busy)
        .await
        .expect("pg_sleep(60) must be cut")
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("access to prod-db ended: grant {} expired", grant.id)),
        "{stderr}"
    );

    let stderr = poke_and_collect(idle).await;
    assert!(stderr.contains("expired"), "idle psql must print the reason: {stderr}");

    eventually("both session.end records", Duration::from_secs(10), || async {
        ends_of(&h, grant.id.as_str()).len() == 2
    })
    .await;
    for end in ends_of(&h, grant.id.as_str()) {
        assert_eq!(end["reason"], "grant_expired", "{end}");
        assert_eq!(end["user"], "alice");
        assert!(end["bytes_to_client"].as_u64().unwrap() > 0);
    }
    // Sessions watch the deadline themselves; the reaper records the expiry independently.
    eventually("grant.expired recorded", Duration::from_secs(10), || async {
        h.audit_events("grant.expired").len() == 1
    })
    .await;
    // The upstream connections are gone, and the running statement was cancelled.
    eventually("upstream backends closed", Duration::from_secs(10), || async {
        h.backends_of("jit_reader") == 0
    })
    .await;
    // A new session is refused now.
    assert!(!h.psql(&alice, "prod-db", "SELECT 1").await.success);
}

#[tokio::test(flavor = "multi_thread")]
async fn revoke_cuts_live_session() {
    let h = Harness::start().await;
    let alice = h.user("alice", &["dev"]);
    let grant = h.grant("alice", "prod-db", AccessLevel::Read, HOUR).await;
    let other = h.grant("bob", "prod-db", AccessLevel::Read, HOUR).await;
    let bob = h.user("bob", &["dev"]);
    let idle = h.psql_interactive(&alice, "prod-db");
    let bob_idle = h.psql_interactive(&bob, "prod-db");
    let busy = {
        let conninfo = h.conninfo(&alice, "prod-db");
        tokio::spawn(async move {
            jitgate_tests::client_command("psql")
                .arg(conninfo)
                .args(["-X", "-c", "SELECT pg_sleep(60)"])
                .output()
                .await
                .unwrap()
        })
    };
    wait_sessions(&h, 3).await;

    h.admin().revoke_grant(grant.id.as_str()).await.unwrap();
    let out = tokio::time::timeout(Duration::from_secs(30), busy)
        .await
        .expect("revocation must cut")
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("was revoked"), "{out:?}");
    let stderr = poke_and_collect(idle).await;
    assert!(stderr.contains("was revoked"), "{stderr}");
    eventually("session.end records", Duration::from_secs(10), || async {
        ends_of(&h, grant.id.as_str()).len() == 2
    })
    .await;
    assert!(ends_of(&h, grant.id.as_str())
        .iter()
        .all(|e| e["reason"] == "grant_revoked"));
    let revoked = h.audit_events("grant.revoked");
    assert_eq!(revoked.len(), 1);
    assert_eq!(revoked[0]["by"], "admin");

    // Bob's session under his own grant is untouched.
    assert!(ends_of(&h, other.id.as_str()).is_empty());
    wait_sessions(&h, 1).await;
    let mut bob_idle = bob_idle;
    let mut stdin = bob_idle.stdin.take().unwrap();
    stdin.write_all(b"SELECT 'still here';\n").await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(20), bob_idle.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "still here");
    // Revoking twice is an error, not a silent success.
    assert!(h.admin().revoke_grant(grant.id.as_str()).await.is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn session_kill_cuts_live_session() {
    let h = Harness::start().await;
    let alice = h.user("alice", &["dev"]);
    let grant = h.grant("alice", "prod-db", AccessLevel::Read, HOUR).await;
    let idle = h.psql_interactive(&alice, "prod-db");
    wait_sessions(&h, 1).await;
    let sessions = h.admin().list_sessions().await.unwrap();
    assert_eq!(sessions[0].user.as_str(), "alice");
    assert_eq!(sessions[0].grant_id, grant.id);
    h.admin().kill_session(sessions[0].id.as_str()).await.unwrap();
    let stderr = poke_and_collect(idle).await;
    assert!(
        stderr.contains(&format!(
            "session {} was terminated by an administrator",
            sessions[0].id
        )),
        "{stderr}"
    );
    eventually("session.end", Duration::from_secs(10), || async {
        ends_of(&h, grant.id.as_str()).len() == 1
    })
    .await;
    assert_eq!(ends_of(&h, grant.id.as_str())[0]["reason"], "killed");
    // The grant itself lives on: a new session works.
    assert!(h.psql(&alice, "prod-db", "SELECT 1").await.success);
    assert!(h.admin().kill_session("s-doesnotexist").await.is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn cert_expiry_cuts_session() {
    let h = Harness::start().await;
    let alice = h.user_with_ttl("alice", &["dev"], Duration::from_secs(8));
    let grant = h.grant("alice", "prod-db", AccessLevel::Read, HOUR).await;
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        h.psql(&alice, "prod-db", "SELECT pg_sleep(60)"),
    )
    .await
    .expect("certificate expiry must cut the session");
    assert!(!out.success);
    assert!(out.stderr.contains("your client certificate expired"), "{}", out.stderr);
    eventually("session.end", Duration::from_secs(10), || async {
        ends_of(&h, grant.id.as_str()).len() == 1
    })
    .await;
    assert_eq!(ends_of(&h, grant.id.as_str())[0]["reason"], "cert_expired");
}

#[tokio::test(flavor = "multi_thread")]
async fn revoke_cuts_session_streaming_a_result() {
    let h = Harness::start().await;
    let alice = h.user("alice", &["dev"]);
    let grant = h.grant("alice", "prod-db", AccessLevel::Read, HOUR).await;
    let stream = {
        let conninfo = h.conninfo(&alice, "prod-db");
        tokio::spawn(async move {
            // Streams for minutes unless cut; stdout is discarded as it arrives.
            jitgate_tests::client_command("psql")
                .arg(conninfo)
                .args([
                    "-X",
                    "-o",
                    "/dev/null",
                    "-c",
                    "COPY (SELECT repeat('x', 200) FROM generate_series(1, 100000000)) TO STDOUT",
                ])
                .output()
                .await
                .unwrap()
        })
    };
    let admin = h.admin().clone();
    eventually("result streaming through the proxy", Duration::from_secs(30), || {
        let admin = admin.clone();
        async move {
            admin
                .list_sessions()
                .await
                .map(|s| s.first().is_some_and(|s| s.bytes_to_client > 4 << 20))
                .unwrap_or(false)
        }
    })
    .await;
    h.admin().revoke_grant(grant.id.as_str()).await.unwrap();
    let out = tokio::time::timeout(Duration::from_secs(30), stream)
        .await
        .expect("streaming must be cut")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The FATAL arrives whole, between two server messages, so psql can print it.
    assert!(stderr.contains(&format!("grant {} was revoked", grant.id)), "{stderr}");
    eventually("session.end", Duration::from_secs(10), || async {
        ends_of(&h, grant.id.as_str()).len() == 1
    })
    .await;
    assert_eq!(ends_of(&h, grant.id.as_str())[0]["reason"], "grant_revoked");
    eventually("upstream backend closed", Duration::from_secs(10), || async {
        h.backends_of("jit_reader") == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_reader_gets_nothing_past_the_cut_bound() {
    let h = Harness::start().await;
    let alice = h.user("alice", &["dev"]);
    let grant = h
        .grant("alice", "prod-db", AccessLevel::Read, Duration::from_secs(4))
        .await;
    // A client with a 64 KiB receive buffer that reads a large COPY slowly: the proxy's
    // kernel send queue toward it grows to megabytes.
    let cfg = raw::client_config(h.data_dir(), Some(&alice), None);
    let tcp = raw::tcp_with_rcvbuf(h.addrs().postgres, 64 << 10).await.unwrap();
    let mut s = raw::ssl_request_tls_over(tcp, cfg).await.unwrap();
    send_startup(&mut s, &[("user", "alice"), ("database", "prod-db")]).await;
    let login = read_until_ready(&mut s).await;
    assert!(error_of(&login).is_none(), "{login:?}");
    // generate_series in the select list streams (in FROM it would be materialized first).
    send_query(
        &mut s,
        "COPY (SELECT repeat('x', 200), generate_series(1, 100000000)) TO STDOUT",
    )
    .await;
    // 16 KiB every 25 ms (at most 640 KiB/s) until the connection ends, reset or closed.
    let mut received = 0u64;
    let mut buf = vec![0u8; 16 << 10];
    let ended = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return "eof".to_owned(),
                Ok(n) => received += n as u64,
                Err(e) => return format!("{:?}", e.kind()),
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    })
    .await
    .expect("the connection must end after the cut");
    eventually("session.end", Duration::from_secs(10), || async {
        ends_of(&h, grant.id.as_str()).len() == 1
    })
    .await;
    let end = &ends_of(&h, grant.id.as_str())[0];
    assert_eq!(end["reason"], "grant_expired", "{end}");
    let sent = end["bytes_to_client"].as_u64().unwrap();
    eprintln!("ended by {ended}: the proxy wrote {sent} bytes, the client read {received}");
    // What the proxy had handed to the kernel but the client had not read when the bound
    // passed was discarded (RST), not delivered for seconds after the cut. (Without the reset
    // the client reads every byte the proxy wrote: megabytes, for seconds after the cut.)
    assert!(
        sent.saturating_sub(received) > 256 << 10,
        "the client read {received} of the {sent} bytes the proxy wrote (ended by {ended})"
    );
}
