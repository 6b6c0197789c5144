//! Grants live in the store: a restart keeps active grants and never revives expired ones.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use jitgate_tests::jitgate::model::AccessLevel;
use jitgate_tests::Harness;

#[tokio::test(flavor = "multi_thread")]
async fn grants_survive_restart_and_expired_stay_expired() {
    let mut h = Harness::start().await;
    let alice = h.user("alice", &["dev"]);
    let bob = h.user("bob", &["dev"]);
    let long = h
        .grant("alice", "prod-db", AccessLevel::Read, Duration::from_secs(3600))
        .await;
    let short = h
        .grant("bob", "prod-db", AccessLevel::Read, Duration::from_secs(3))
        .await;
    let revoked = h
        .grant("alice", "md5-db", AccessLevel::Read, Duration::from_secs(3600))
        .await;
    h.admin().revoke_grant(revoked.id.as_str()).await.unwrap();
    h.stop_proxy().await.unwrap();

    // The short grant runs out while the proxy is down.
    tokio::time::sleep(Duration::from_secs(4)).await;
    h.start_proxy().await;

    let ids: Vec<String> = h
        .admin()
        .list_grants()
        .await
        .unwrap()
        .into_iter()
        .map(|g| g.id.to_string())
        .collect();
    assert_eq!(ids, vec![long.id.to_string()]);
    let out = h.psql(&alice, "prod-db", "SELECT 1").await;
    assert!(out.success, "{out:?}");
    assert!(!h.psql(&bob, "prod-db", "SELECT 1").await.success);
    assert!(!h.psql(&alice, "md5-db", "SELECT 1").await.success);
    let expired = h.audit_events("grant.expired");
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0]["grant_id"], short.id.as_str());

    // And once more: the expiry was stored, so it is not re-announced.
    h.restart_proxy().await;
    assert_eq!(h.audit_events("grant.expired").len(), 1);
    assert_eq!(h.admin().list_grants().await.unwrap().len(), 1);
}
