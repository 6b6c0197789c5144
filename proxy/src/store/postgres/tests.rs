//! The shared store against a real PostgreSQL: two stores on one database act as two
//! replicas. Migrations at a concurrent start, compare-and-set across them, and the change
//! feed every replica follows (in order, with a resync on a gap).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, SystemTime};

use super::*;
use crate::model::{AccessLevel, RequestState};
use crate::sandbox::{LocalPostgres, PgOptions};

async fn cluster() -> (LocalPostgres, StoreConfig) {
    let pg = tokio::task::spawn_blocking(|| LocalPostgres::start(&PgOptions { tls: None }))
        .await
        .unwrap()
        .expect("PostgreSQL (scripts/test installs it)");
    pg.sql("postgres", "CREATE ROLE jitgate LOGIN PASSWORD 'pw'").unwrap();
    pg.sql("postgres", "CREATE DATABASE jitgate OWNER jitgate").unwrap();
    let config = StoreConfig {
        url: format!("postgresql://jitgate@{}/jitgate", pg.address()),
        password: Some("pw".into()),
        tls: UpstreamTls::Disable,
        replica_id: "test".into(),
    };
    (pg, config)
}

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

async fn next(rx: &mut broadcast::Receiver<Change>) -> Change {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a change within 10s")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_migrate_once_and_end_a_grant_exactly_once() {
    let (pg, config) = cluster().await;
    let stop = CancellationToken::new();
    // Both start at once: the advisory lock lets one migrate, the other then finds it done.
    let (a, b) = tokio::join!(
        PgStore::connect(&config, stop.clone()),
        PgStore::connect(&config, stop.clone())
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(
        pg.sql("jitgate", "SELECT version FROM jitgate_schema").unwrap().trim(),
        super::MIGRATIONS.len().to_string()
    );
    let g = grant(Duration::from_secs(60));
    a.insert_grant(&g).await.unwrap();
    assert_eq!(b.live_grants().await.unwrap(), vec![g.clone()]);
    let mut tasks = Vec::new();
    for i in 0..8 {
        let store = if i % 2 == 0 { Arc::clone(&a) } else { Arc::clone(&b) };
        let id = g.id.clone();
        tasks.push(tokio::spawn(async move {
            store.end_grant(&id, GrantEnd::Expired, SystemTime::now()).await
        }));
    }
    let mut won = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => won += 1,
            Err(StoreError::Conflict) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(won, 1, "exactly one replica ends the grant");
    assert!(a.live_grants().await.unwrap().is_empty());
    assert_eq!(
        a.end_grant(&GrantId::generate(), GrantEnd::Revoked, SystemTime::now())
            .await,
        Err(StoreError::NotFound)
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_replica_sees_every_change_in_commit_order_and_a_gap_asks_for_a_resync() {
    let (pg, config) = cluster().await;
    let stop = CancellationToken::new();
    let a = PgStore::connect(&config, stop.clone()).await.unwrap();
    let b = PgStore::connect(&config, stop.clone()).await.unwrap();
    let (mut at_a, mut at_b) = (a.changes(), b.changes());
    let g = grant(Duration::from_secs(60));
    a.insert_grant(&g).await.unwrap();
    let later = g.expires_at + Duration::from_secs(60);
    b.extend_grant(&g.id, g.expires_at, later).await.unwrap();
    assert_eq!(
        a.extend_grant(&g.id, g.expires_at, later).await,
        Err(StoreError::Conflict),
        "from an expiry no longer current"
    );
    a.end_grant(&g.id, GrantEnd::Revoked, SystemTime::now()).await.unwrap();
    let want = vec![
        Change::GrantCreated(g.clone()),
        Change::GrantExtended {
            id: g.id.clone(),
            expires_at: later,
        },
        Change::GrantEnded {
            id: g.id.clone(),
            end: GrantEnd::Revoked,
        },
    ];
    for rx in [&mut at_a, &mut at_b] {
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(next(rx).await);
        }
        assert_eq!(got, want, "the writer sees its own changes through the same feed");
    }
    // A request and its approval's grant in one transaction.
    let now = from_millis(to_millis(SystemTime::now()));
    let r = Request {
        id: RequestId::generate(),
        state: RequestState::Pending,
        user: UserName::new("alice").unwrap(),
        roles: Vec::new(),
        target: TargetName::new("prod-db").unwrap(),
        access: AccessLevel::Read,
        duration_secs: 60,
        reason: "INC-2".into(),
        extends: None,
        break_glass: false,
        policy: "p".into(),
        approvals_needed: 1,
        approver_roles: Vec::new(),
        approvals: Vec::new(),
        created_at: now,
        lapses_at: now + Duration::from_secs(600),
        decided_at: None,
        decided_by: None,
        note: None,
        grant_id: None,
    };
    a.insert_request(&r).await.unwrap();
    let approved = Request {
        state: RequestState::Approved,
        ..r.clone()
    };
    let g2 = grant(Duration::from_secs(60));
    let (x, y) = tokio::join!(
        a.update_request(&approved, 1, Some(GrantWrite::Insert(&g2))),
        b.update_request(&approved, 1, Some(GrantWrite::Insert(&g2)))
    );
    assert_eq!(
        [x.is_ok(), y.is_ok()].iter().filter(|ok| **ok).count(),
        1,
        "one approval wins: {x:?} {y:?}"
    );
    assert_eq!(b.request(&r.id).await.unwrap().unwrap().version, 2);
    assert_eq!(b.live_grants().await.unwrap(), vec![g2.clone()]);
    for _ in 0..3 {
        next(&mut at_b).await;
    }
    // A gap in the log (trimmed rows): the follower asks for a resync, then goes on.
    let last: i64 = pg
        .sql("jitgate", "SELECT max(seq) FROM changes")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let body = serde_json::to_string(&Logged::GrantEnded {
        id: g2.id.clone(),
        end: GrantEnd::Revoked,
    })
    .unwrap();
    pg.sql(
        "jitgate",
        &format!("INSERT INTO changes (seq, body) VALUES ({}, '{body}')", last + 5),
    )
    .unwrap();
    assert_eq!(next(&mut at_b).await, Change::Resync);
    assert_eq!(
        next(&mut at_b).await,
        Change::GrantEnded {
            id: g2.id.clone(),
            end: GrantEnd::Revoked
        }
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_advertise_their_agent_listeners_and_an_agent_removal_reaches_every_replica() {
    let (_pg, config) = cluster().await;
    let stop = CancellationToken::new();
    let with_id = |id: &str| StoreConfig {
        replica_id: id.into(),
        ..config.clone()
    };
    let a = PgStore::connect(&with_id("a"), stop.clone()).await.unwrap();
    let b = PgStore::connect(&with_id("b"), stop.clone()).await.unwrap();
    let c = PgStore::connect(&with_id("c"), stop.clone()).await.unwrap();
    a.advertise_agents("jg-1.internal:8444".into());
    b.advertise_agents("10.0.0.2:8444".into());
    // Set once: a later call changes nothing.
    b.advertise_agents("elsewhere:1".into());
    // C advertises nothing; its row still says it is alive.
    for s in [&a, &b, &c] {
        s.publish_sessions(&[]).await.unwrap();
    }
    let want = vec!["10.0.0.2:8444".to_owned(), "jg-1.internal:8444".to_owned()];
    assert_eq!(a.agent_addresses().await.unwrap(), want);
    assert_eq!(
        c.agent_addresses().await.unwrap(),
        want,
        "the same list on every replica"
    );

    // The agent's record goes, and every replica's feed says so.
    let now = SystemTime::now();
    let token = AgentToken {
        id: "at-1".into(),
        agent: AgentName::new("db-east").unwrap(),
        targets: vec![TargetName::new("prod-db").unwrap()],
        secret_sha256: "h".into(),
        created_by: UserName::new("admin").unwrap(),
        created_at: now,
        expires_at: now + Duration::from_secs(60),
    };
    a.insert_agent_token(&token).await.unwrap();
    a.redeem_agent_token("at-1", "h", now).await.unwrap().unwrap();
    let mut at_c = c.changes();
    b.remove_agent(&token.agent).await.unwrap();
    assert_eq!(
        next(&mut at_c).await,
        Change::AgentRemoved {
            name: token.agent.clone()
        }
    );
    assert!(c.agents().await.unwrap().is_empty());
    assert_eq!(b.remove_agent(&token.agent).await, Err(StoreError::NotFound));
    stop.cancel();
}
