//! The grant table on tokio's paused clock: expiry, extension, revocation and lookups, with no
//! real-time sleep.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc::error::TryRecvError;

use super::*;
use crate::clock::{Clock, TokioClock};
use crate::model::AccessLevel;

fn table() -> (
    Arc<GrantTable>,
    mpsc::UnboundedReceiver<Grant>,
    Arc<TokioClock>,
    CancellationToken,
) {
    let clock = Arc::new(TokioClock::new());
    let root = CancellationToken::new();
    let (t, expired) = GrantTable::start(clock.clone(), root.clone(), crate::metrics::Metrics::new());
    (t, expired, clock, root)
}

fn grant(clock: &TokioClock, user: &str, access: AccessLevel, secs: u64) -> Grant {
    let now = clock.now();
    Grant {
        id: GrantId::generate(),
        user: UserName::new(user).unwrap(),
        target: TargetName::new("prod-db").unwrap(),
        access,
        reason: "test".into(),
        created_by: UserName::new("admin").unwrap(),
        created_at: now,
        expires_at: now + Duration::from_secs(secs),
    }
}

fn alice() -> UserName {
    UserName::new("alice").unwrap()
}

fn prod() -> TargetName {
    TargetName::new("prod-db").unwrap()
}

/// Lets the expiry loop run.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_grant_is_cut_and_handed_over_exactly_at_its_deadline() {
    let (t, mut expired, clock, _root) = table();
    let g = grant(&clock, "alice", AccessLevel::Read, 60);
    assert_eq!(t.apply(&Change::GrantCreated(g.clone())), Applied::Created);
    assert_eq!(
        t.apply(&Change::GrantCreated(g.clone())),
        Applied::Unchanged,
        "idempotent"
    );
    let permit = t.lookup(&alice(), &prod()).unwrap();
    tokio::time::advance(Duration::from_secs(59)).await;
    settle().await;
    assert!(!permit.cut_token().is_cancelled());
    assert!(t.lookup(&alice(), &prod()).is_some());
    tokio::time::advance(Duration::from_secs(1)).await;
    settle().await;
    assert!(permit.cut_token().is_cancelled());
    assert_eq!(permit.ended(), Some(GrantEnd::Expired));
    assert!(t.lookup(&alice(), &prod()).is_none());
    assert_eq!(expired.try_recv().unwrap().id, g.id);
    assert_eq!(expired.try_recv(), Err(TryRecvError::Empty), "handed over once");
    assert!(t.is_empty());
}

#[tokio::test(start_paused = true)]
async fn an_extension_moves_the_cut_and_a_revocation_cuts_at_once() {
    let (t, mut expired, clock, _root) = table();
    let g = grant(&clock, "alice", AccessLevel::Read, 60);
    t.apply(&Change::GrantCreated(g.clone()));
    let permit = t.lookup(&alice(), &prod()).unwrap();
    let mut watch = permit.deadline_watch();
    let later = g.expires_at + Duration::from_secs(60);
    let Applied::Extended(extended) = t.apply(&Change::GrantExtended {
        id: g.id.clone(),
        expires_at: later,
    }) else {
        panic!("not extended");
    };
    assert_eq!(extended.expires_at, later);
    assert!(watch.has_changed().unwrap());
    assert_eq!(watch.borrow_and_update().at, later);
    tokio::time::advance(Duration::from_secs(90)).await;
    settle().await;
    assert!(!permit.cut_token().is_cancelled(), "the old deadline passed harmlessly");
    assert_eq!(t.get(&g.id).unwrap().expires_at, later);
    let Applied::Ended(ended) = t.apply(&Change::GrantEnded {
        id: g.id.clone(),
        end: GrantEnd::Revoked,
    }) else {
        panic!("not ended");
    };
    assert_eq!(ended.expires_at, later);
    assert!(permit.cut_token().is_cancelled());
    assert_eq!(permit.ended(), Some(GrantEnd::Revoked));
    // The deadline of a revoked grant passes without a second ending.
    tokio::time::advance(Duration::from_secs(60)).await;
    settle().await;
    assert_eq!(expired.try_recv(), Err(TryRecvError::Empty));
    assert_eq!(
        t.apply(&Change::GrantEnded {
            id: g.id.clone(),
            end: GrantEnd::Expired
        }),
        Applied::Unchanged
    );
}

#[tokio::test(start_paused = true)]
async fn lookups_take_the_highest_level_then_the_latest_expiry() {
    let (t, _expired, clock, _root) = table();
    let read_long = grant(&clock, "alice", AccessLevel::Read, 600);
    let write_short = grant(&clock, "alice", AccessLevel::Write, 60);
    let write_long = grant(&clock, "alice", AccessLevel::Write, 120);
    for g in [&read_long, &write_short, &write_long] {
        t.apply(&Change::GrantCreated(g.clone()));
    }
    assert_eq!(t.lookup(&alice(), &prod()).unwrap().grant().id, write_long.id);
    assert!(t.lookup(&UserName::new("bob").unwrap(), &prod()).is_none());
    tokio::time::advance(Duration::from_secs(121)).await;
    settle().await;
    assert_eq!(t.lookup(&alice(), &prod()).unwrap().grant().id, read_long.id);
    assert_eq!(t.list().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn shutdown_cuts_every_grant_token() {
    let (t, _expired, clock, root) = table();
    t.apply(&Change::GrantCreated(grant(&clock, "alice", AccessLevel::Read, 60)));
    let permit = t.lookup(&alice(), &prod()).unwrap();
    root.cancel();
    assert!(permit.cut_token().is_cancelled());
    assert_eq!(
        permit.ended(),
        None,
        "shut down, not ended: the grant comes back at restart"
    );
}

#[tokio::test(start_paused = true)]
async fn ten_thousand_grants_expiring_at_once_are_all_cut() {
    let (t, mut expired, clock, _root) = table();
    let at = clock.now() + Duration::from_secs(30);
    let mut permits = Vec::new();
    for i in 0..10_000 {
        let mut g = grant(&clock, &format!("u{i}"), AccessLevel::Read, 30);
        g.expires_at = at;
        t.apply(&Change::GrantCreated(g.clone()));
        permits.push(t.lookup(&g.user, &g.target).unwrap());
    }
    tokio::time::advance(Duration::from_secs(30)).await;
    for _ in 0..100 {
        settle().await;
    }
    assert!(permits.iter().all(|p| p.cut_token().is_cancelled()));
    let mut n = 0;
    while expired.try_recv().is_ok() {
        n += 1;
    }
    assert_eq!(n, 10_000);
    assert!(t.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_grant_already_past_due_is_cut_at_once() {
    let (t, mut expired, clock, _root) = table();
    let mut g = grant(&clock, "alice", AccessLevel::Read, 0);
    g.expires_at = SystemTime::UNIX_EPOCH;
    t.apply(&Change::GrantCreated(g.clone()));
    settle().await;
    assert_eq!(expired.try_recv().unwrap().id, g.id);
}

#[tokio::test(start_paused = true)]
async fn a_creation_that_arrives_after_the_end_does_not_bring_the_grant_back() {
    // The shared store's feed may deliver a grant's creation after this replica applied its
    // revocation (the revoke applies locally first).
    let (t, _expired, clock, _root) = table();
    let g = grant(&clock, "alice", AccessLevel::Read, 60);
    assert_eq!(t.apply(&Change::GrantCreated(g.clone())), Applied::Created);
    assert!(matches!(
        t.apply(&Change::GrantEnded {
            id: g.id.clone(),
            end: GrantEnd::Revoked
        }),
        Applied::Ended(_)
    ));
    assert_eq!(t.apply(&Change::GrantCreated(g.clone())), Applied::Unchanged);
    assert!(t.lookup(&alice(), &prod()).is_none());
    assert!(t.get(&g.id).is_none());
}
