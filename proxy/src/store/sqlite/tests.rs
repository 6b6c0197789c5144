//! The SQLite store: durability across reopen, and compare-and-set under racing writers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::*;
use crate::model::AccessLevel;

fn grant(expires_in: Duration) -> Grant {
    let now = from_millis(to_millis(SystemTime::now()));
    Grant {
        id: GrantId::generate(),
        user: UserName::new("alice").unwrap(),
        target: TargetName::new("prod-db").unwrap(),
        access: AccessLevel::Read,
        reason: "INC-1".into(),
        created_by: UserName::new("admin").unwrap(),
        created_at: now,
        expires_at: now + expires_in,
    }
}

fn request() -> Request {
    let now = from_millis(to_millis(SystemTime::now()));
    Request {
        id: RequestId::generate(),
        state: RequestState::Pending,
        user: UserName::new("alice").unwrap(),
        roles: Vec::new(),
        target: TargetName::new("prod-db").unwrap(),
        access: AccessLevel::Read,
        duration_secs: 60,
        reason: "INC-1".into(),
        extends: None,
        break_glass: false,
        policy: "p".into(),
        approvals_needed: 1,
        approver_roles: Vec::new(),
        approvals: Vec::new(),
        created_at: now,
        lapses_at: now + Duration::from_secs(3600),
        decided_at: None,
        decided_by: None,
        note: None,
        grant_id: None,
    }
}

#[tokio::test]
async fn grants_survive_reopen_and_end_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jitgate.db");
    let g = grant(Duration::from_secs(60));
    SqliteStore::open(&path).unwrap().insert_grant(&g).await.unwrap();
    let store = SqliteStore::open(&path).unwrap();
    let live = store.live_grants().await.unwrap();
    assert_eq!(live, std::slice::from_ref(&g));
    store.end_grant(&g.id, GrantEnd::Revoked, g.created_at).await.unwrap();
    assert_eq!(
        store.end_grant(&g.id, GrantEnd::Expired, g.created_at).await,
        Err(StoreError::Conflict)
    );
    assert_eq!(
        store
            .end_grant(&GrantId::generate(), GrantEnd::Expired, g.created_at)
            .await,
        Err(StoreError::NotFound)
    );
    assert!(SqliteStore::open(&path)
        .unwrap()
        .live_grants()
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_writers_end_a_grant_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("jitgate.db")).unwrap());
    for _ in 0..20 {
        let g = grant(Duration::from_secs(60));
        store.insert_grant(&g).await.unwrap();
        let racers: Vec<_> = [
            GrantEnd::Expired,
            GrantEnd::Revoked,
            GrantEnd::Expired,
            GrantEnd::Revoked,
        ]
        .into_iter()
        .map(|end| {
            let (store, id) = (Arc::clone(&store), g.id.clone());
            tokio::spawn(async move { store.end_grant(&id, end, SystemTime::now()).await })
        })
        .collect();
        let mut won = 0;
        for r in racers {
            match r.await.unwrap() {
                Ok(()) => won += 1,
                Err(StoreError::Conflict) => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(won, 1, "exactly one writer ends the grant");
    }
}

#[tokio::test]
async fn an_extension_applies_only_from_the_expiry_it_saw() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("jitgate.db")).unwrap();
    let g = grant(Duration::from_secs(60));
    store.insert_grant(&g).await.unwrap();
    let later = g.expires_at + Duration::from_secs(60);
    store.extend_grant(&g.id, g.expires_at, later).await.unwrap();
    // A second extension based on the old expiry lost the race.
    assert_eq!(
        store
            .extend_grant(&g.id, g.expires_at, later + Duration::from_secs(1))
            .await,
        Err(StoreError::Conflict)
    );
    assert_eq!(store.live_grants().await.unwrap()[0].expires_at, later);
    store
        .end_grant(&g.id, GrantEnd::Revoked, SystemTime::now())
        .await
        .unwrap();
    assert_eq!(
        store.extend_grant(&g.id, later, later + Duration::from_secs(1)).await,
        Err(StoreError::Conflict)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_changes_only_at_the_version_read_and_its_grant_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("jitgate.db")).unwrap());
    let r = request();
    store.insert_request(&r).await.unwrap();
    let read = store.request(&r.id).await.unwrap().unwrap();
    assert_eq!(read.version, 1);
    // Two approvers approve at once, each creating a grant: one wins, and only its grant exists.
    let racers: Vec<_> = (0..4)
        .map(|_| {
            let (store, mut approved) = (Arc::clone(&store), r.clone());
            tokio::spawn(async move {
                let g = grant(Duration::from_secs(60));
                approved.state = RequestState::Approved;
                approved.grant_id = Some(g.id.clone());
                store
                    .update_request(&approved, 1, Some(GrantWrite::Insert(&g)))
                    .await
                    .map(|v| (v, g.id))
            })
        })
        .collect();
    let mut winners = Vec::new();
    for r in racers {
        match r.await.unwrap() {
            Ok(won) => winners.push(won),
            Err(StoreError::Conflict) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one approval lands");
    let (version, grant_id) = winners.remove(0);
    assert_eq!(version, 2);
    let live = store.live_grants().await.unwrap();
    assert_eq!(live.len(), 1, "the losers' grants were rolled back");
    assert_eq!(live[0].id, grant_id);
    let stored = store.request(&r.id).await.unwrap().unwrap();
    assert_eq!((stored.version, stored.value.grant_id.clone()), (2, Some(grant_id)));
    // A grant write that conflicts rolls the request change back too.
    let mut denied = stored.value.clone();
    denied.state = RequestState::Denied;
    let gone = GrantId::generate();
    let t = SystemTime::now();
    assert_eq!(
        store
            .update_request(
                &denied,
                2,
                Some(GrantWrite::Extend {
                    id: &gone,
                    from: t,
                    to: t
                })
            )
            .await,
        Err(StoreError::NotFound)
    );
    assert_eq!(store.request(&r.id).await.unwrap().unwrap().version, 2);
}

#[tokio::test]
async fn every_committed_change_is_published() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("jitgate.db")).unwrap();
    let mut changes = store.changes();
    let g = grant(Duration::from_secs(60));
    store.insert_grant(&g).await.unwrap();
    let later = g.expires_at + Duration::from_secs(5);
    store.extend_grant(&g.id, g.expires_at, later).await.unwrap();
    let _ = store.end_grant(&g.id, GrantEnd::Revoked, later).await;
    let _ = store.end_grant(&g.id, GrantEnd::Expired, later).await;
    assert_eq!(changes.recv().await.unwrap(), Change::GrantCreated(g.clone()));
    assert_eq!(
        changes.recv().await.unwrap(),
        Change::GrantExtended {
            id: g.id.clone(),
            expires_at: later
        }
    );
    assert_eq!(
        changes.recv().await.unwrap(),
        Change::GrantEnded {
            id: g.id.clone(),
            end: GrantEnd::Revoked
        }
    );
    // The refused second end published nothing.
    assert!(changes.try_recv().is_err());
}

#[tokio::test]
async fn a_store_from_before_request_versions_is_upgraded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jitgate.db");
    let r = request();
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        conn.execute(
            "INSERT INTO requests (id, user, state, break_glass, created_at, lapses_at, body)
             VALUES (?1, 'alice', 'pending', 0, 0, 0, ?2)",
            params![r.id.as_str(), serde_json::to_string(&r).unwrap()],
        )
        .unwrap();
    }
    let store = SqliteStore::open(&path).unwrap();
    let read = store.request(&r.id).await.unwrap().unwrap();
    assert_eq!((read.value, read.version), (r, 1));
}
