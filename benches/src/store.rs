//! The shared store's numbers (issue 14): how long a change committed through one replica's
//! store takes to reach another replica's change feed, and how long a replica takes to read
//! and apply 1,000,000 live grants (its resync and restart cost).
//!
//! Starts its own throwaway PostgreSQL cluster (as `jitgate::sandbox` does for the tests) and
//! two `PgStore`s on it, as two replicas would hold.

use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result};
use jitgate::config::{StoreConfig, UpstreamTls};
use jitgate::model::{AccessLevel, Grant, GrantEnd, GrantId, TargetName, UserName};
use jitgate::sandbox::{LocalPostgres, PgOptions};
use jitgate::store::{Change, PgStore, Store};
use tokio_util::sync::CancellationToken;

use crate::stats::Summary;

fn grant(i: usize) -> Result<Grant> {
    let now = jitgate::grants::whole_millis(SystemTime::now());
    Ok(Grant {
        id: GrantId::generate(),
        user: UserName::new(format!("user{i}"))?,
        target: TargetName::new("prod-db")?,
        access: AccessLevel::Read,
        reason: "bench".into(),
        created_by: UserName::new("admin")?,
        created_at: now,
        expires_at: now + Duration::from_secs(3600),
    })
}

/// Runs both measurements; prints one line each.
pub async fn run(changes: usize, resync_grants: usize) -> Result<()> {
    let pg = tokio::task::spawn_blocking(|| LocalPostgres::start(&PgOptions { tls: None }))
        .await?
        .context("start PostgreSQL")?;
    pg.sql("postgres", "CREATE ROLE jitgate LOGIN PASSWORD 'bench'")?;
    pg.sql("postgres", "CREATE DATABASE jitgate OWNER jitgate")?;
    let config = StoreConfig {
        url: format!("postgresql://jitgate@{}/jitgate", pg.address()),
        password: Some("bench".into()),
        tls: UpstreamTls::Disable,
        replica_id: "bench".into(),
    };
    let stop = CancellationToken::new();
    let a = PgStore::connect(&config, stop.clone()).await?;
    let b = PgStore::connect(&config, stop.clone()).await?;
    let mut feed = b.changes();
    // One change at a time: committed on A (insert, then end), seen on B.
    let mut ms = Vec::with_capacity(changes);
    for i in 0..changes {
        let g = grant(i)?;
        let t = Instant::now();
        if i % 2 == 0 {
            a.insert_grant(&g).await?;
        } else {
            a.insert_grant(&g).await?;
            let t2 = Instant::now();
            // Skip the insert's entry, time the end's.
            wait_for(&mut feed, |c| matches!(c, Change::GrantCreated(x) if x.id == g.id)).await?;
            a.end_grant(&g.id, GrantEnd::Revoked, SystemTime::now()).await?;
            wait_for(&mut feed, |c| matches!(c, Change::GrantEnded { id, .. } if *id == g.id)).await?;
            ms.push(t2.elapsed().as_secs_f64() * 1e3);
            continue;
        }
        wait_for(&mut feed, |c| matches!(c, Change::GrantCreated(x) if x.id == g.id)).await?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let s = Summary::of(&mut ms);
    println!(
        "propagation: {changes} changes, commit on A to B's feed p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        s.p50, s.p99, s.max
    );
    // Resync: N live grants in the store, read and applied to a fresh table.
    if resync_grants > 0 {
        let now = jitgate::timefmt::to_millis(SystemTime::now());
        pg.sql(
            "jitgate",
            &format!(
                "INSERT INTO grants (id, \"user\", target, access, reason, created_by, created_at, expires_at)
                 SELECT 'g-' || lpad(to_hex(g), 16, '0'), 'user' || (g % 5000), 'prod-db', 'read', 'bench',
                        'admin', {now}, {now} + 3600000 + g
                 FROM generate_series(1, {resync_grants}) g"
            ),
        )?;
        let t = Instant::now();
        let live = a.live_grants().await?;
        let read = t.elapsed();
        let clock = jitgate::clock::system();
        let (table, _expired) = jitgate::access::table::GrantTable::start(
            clock,
            CancellationToken::new(),
            jitgate::metrics::Metrics::new(),
        );
        let t2 = Instant::now();
        for g in live.iter() {
            table.apply(&Change::GrantCreated(g.clone()));
        }
        let applied = t2.elapsed();
        println!(
            "resync: {} live grants read in {:.2} s, applied to the table in {:.2} s, {:.2} s in all",
            live.len(),
            read.as_secs_f64(),
            applied.as_secs_f64(),
            (read + applied).as_secs_f64()
        );
    }
    stop.cancel();
    Ok(())
}

async fn wait_for(feed: &mut tokio::sync::broadcast::Receiver<Change>, want: impl Fn(&Change) -> bool) -> Result<()> {
    loop {
        let c = tokio::time::timeout(Duration::from_secs(10), feed.recv())
            .await
            .context("no change within 10s")??;
        if want(&c) {
            return Ok(());
        }
    }
}
