//! Extending a grant moves the deadline of its live sessions without reconnecting, and a
//! session is told before its grant ends.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, SystemTime};

use jitgate_protocol::postgres::backend::BackendMessage;
use jitgate_tests::jitgate::model::AccessLevel;
use jitgate_tests::raw::{self, read_until_ready};
use jitgate_tests::{eventually, run_jitgate, Harness};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread")]
async fn expiry_notice_arrives_before_the_grant_ends() {
    let mut h = Harness::start().await;
    h.reconfigure("[sessions]\nexpiry_notice = \"4s\"").await;
    let alice = h.user("alice", &["dev"]);
    let grant = h
        .grant("alice", "prod-db", AccessLevel::Read, Duration::from_secs(7))
        .await;
    let mut s = raw::session(&h, &alice, "prod-db").await;
    // Idle: the first thing the server side sends is the notice, then, at the deadline, the FATAL.
    let msgs = tokio::time::timeout(Duration::from_secs(20), read_until_ready(&mut s))
        .await
        .unwrap();
    let notice = msgs
        .iter()
        .find_map(|m| match &m.decoded {
            BackendMessage::NoticeResponse(f) => Some(f.clone()),
            _ => None,
        })
        .expect("a NOTICE before expiry");
    assert!(notice.message().contains("access to prod-db ends in"), "{notice:?}");
    assert!(notice
        .0
        .get(&b'H')
        .unwrap()
        .contains(&format!("jitgate extend {} --for", grant.id)));
    let (code, message) = raw::error_of(&msgs).expect("then the FATAL at expiry");
    assert_eq!(code, "57P01");
    assert!(message.contains("expired"), "{message}");
    let notice_at = msgs.iter().position(|m| m.tag == b'N').unwrap();
    let fatal_at = msgs.iter().position(|m| m.tag == b'E').unwrap();
    assert!(notice_at < fatal_at);

    // psql shows it.
    let grant = h
        .grant("alice", "prod-db", AccessLevel::Read, Duration::from_secs(30))
        .await;
    let mut psql = h.psql_interactive(&alice, "prod-db");
    let mut stdin = psql.stdin.take().unwrap();
    stdin.write_all(b"SELECT 1;\n").await.unwrap();
    drop(stdin);
    let mut stderr = String::new();
    psql.stderr.take().unwrap().read_to_string(&mut stderr).await.unwrap();
    let _ = psql.wait().await;
    // A 30 s grant with a 4 s notice: no notice yet.
    assert!(!stderr.contains("ends in"), "{stderr}");
    h.admin().revoke_grant(grant.id.as_str()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn extension_keeps_live_sessions_going_until_the_new_deadline() {
    let mut h = Harness::start().await;
    let alice = h.user("alice", &["dev"]);
    let grant = h
        .grant("alice", "prod-db", AccessLevel::Read, Duration::from_secs(5))
        .await;
    let original = grant.expires_at;
    let mut s = raw::session(&h, &alice, "prod-db").await;

    let d = h.data_dir();
    let api = h.addrs().api.to_string();
    let (cert, key, ca) = (d.join("admin.crt"), d.join("admin.key"), d.join("ca.crt"));
    let env = [
        ("JITGATE_API", api.as_str()),
        ("JITGATE_CERT", cert.to_str().unwrap()),
        ("JITGATE_KEY", key.to_str().unwrap()),
        ("JITGATE_CA", ca.to_str().unwrap()),
    ];
    let r = run_jitgate(&["grant", "extend", grant.id.as_str(), "--for", "8s", "--json"], &env).await;
    assert!(r.ok, "{}", r.stderr);
    let extended: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(extended["id"], grant.id.as_str());

    // Past the original deadline the same session still runs statements.
    let wait = original.duration_since(SystemTime::now()).unwrap_or_default() + Duration::from_secs(1);
    tokio::time::sleep(wait).await;
    raw::send_query(&mut s, "SELECT 'still here'").await;
    let msgs = read_until_ready(&mut s).await;
    assert_eq!(raw::first_column(&msgs), ["still here"], "{msgs:?}");

    // And it is cut at the new one.
    let msgs = tokio::time::timeout(Duration::from_secs(30), read_until_ready(&mut s))
        .await
        .unwrap();
    let (_, message) = raw::error_of(&msgs).expect("cut at the new deadline");
    assert!(message.contains("expired"), "{message}");
    let ended = SystemTime::now();
    assert!(
        ended >= original + Duration::from_secs(8),
        "cut before the extended deadline"
    );

    let extended = h.audit_events("grant.extended");
    assert_eq!(extended.len(), 1);
    assert_eq!(extended[0]["by"], "admin");
    eventually("session end recorded", Duration::from_secs(10), || async {
        h.audit_events("session.end")
            .iter()
            .any(|e| e["reason"] == "grant_expired")
    })
    .await;

    // The new deadline was stored: a restart keeps it (checked on a second grant).
    let g2 = h
        .grant("alice", "md5-db", AccessLevel::Read, Duration::from_secs(600))
        .await;
    h.admin()
        .extend_grant(g2.id.as_str(), Duration::from_secs(3600))
        .await
        .unwrap();
    h.restart_proxy().await;
    let listed = h.admin().list_grants().await.unwrap();
    let g2_now = listed.iter().find(|g| g.id == g2.id).unwrap();
    assert!(g2_now.expires_at >= g2.expires_at + Duration::from_secs(3599));
    // Extending a grant that is not active fails.
    assert!(h
        .admin()
        .extend_grant(grant.id.as_str(), Duration::from_secs(60))
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn zero_and_fractional_durations_are_refused_not_rounded() {
    let h = Harness::start().await;
    let grant = h
        .grant("alice", "prod-db", AccessLevel::Read, Duration::from_secs(600))
        .await;
    let d = h.data_dir();
    let api = h.addrs().api.to_string();
    let (cert, key, ca) = (d.join("admin.crt"), d.join("admin.key"), d.join("ca.crt"));
    let env = [
        ("JITGATE_API", api.as_str()),
        ("JITGATE_CERT", cert.to_str().unwrap()),
        ("JITGATE_KEY", key.to_str().unwrap()),
        ("JITGATE_CA", ca.to_str().unwrap()),
    ];
    let id = grant.id.as_str();
    for duration in ["0s", "0", "500ms", "1500ms"] {
        for args in [
            vec!["grant", "extend", id, "--for", duration],
            vec![
                "grant", "create", "--user", "alice", "--target", "prod-db", "--for", duration, "--reason", "x",
            ],
            vec!["request", "prod-db", "--for", duration, "--reason", "x"],
            vec!["extend", id, "--for", duration, "--reason", "x"],
        ] {
            let r = run_jitgate(&args, &env).await;
            assert!(!r.ok, "{args:?} succeeded: {}", r.stdout);
            assert_eq!(r.code, Some(2), "{args:?}: {}", r.stderr);
            assert!(r.stderr.contains("--for"), "{args:?}: {}", r.stderr);
            assert!(
                r.stderr.contains("must be at least 1s") || r.stderr.contains("must be whole seconds"),
                "{args:?}: {}",
                r.stderr
            );
        }
    }
    // The API refuses a zero extension as well.
    assert!(h.admin().extend_grant(id, Duration::ZERO).await.is_err());
    // Nothing moved, nothing was made.
    let grants = h.admin().list_grants().await.unwrap();
    assert_eq!(grants.len(), 1);
    assert_eq!(grants[0].expires_at, grant.expires_at);
    assert!(h.audit_events("grant.extended").is_empty());
}
