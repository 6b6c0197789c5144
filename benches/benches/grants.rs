//! Grant-table lookups (`GrantTable::lookup`, run at every session start) with 1k and 1M live
//! grants, from one thread and from several at once.
//!
//! The table is filled the way the proxy fills it, by applying `GrantCreated` changes. Its
//! expiry loop sits in a runtime that is never driven, so it costs memory but no time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use jitgate::access::table::GrantTable;
use jitgate::metrics::Metrics;
use jitgate::model::{AccessLevel, Grant, GrantId, TargetName, UserName};
use jitgate::store::Change;
use std::hint::black_box;
use tokio_util::sync::CancellationToken;

/// Targets per user; users = grants / TARGETS.
const TARGETS: usize = 10;

struct Table {
    grants: Arc<GrantTable>,
    keys: Vec<(UserName, TargetName)>,
    _rt: tokio::runtime::Runtime,
}

fn table(n: usize) -> Table {
    let now = SystemTime::now();
    let targets: Vec<TargetName> = (0..TARGETS)
        .map(|t| TargetName::new(format!("db-{t}")).unwrap())
        .collect();
    let mut grants = Vec::with_capacity(n);
    let mut keys = Vec::with_capacity(n);
    for i in 0..n {
        let user = UserName::new(format!("user{}@example.com", i / TARGETS)).unwrap();
        let target = targets[i % TARGETS].clone();
        keys.push((user.clone(), target.clone()));
        grants.push(Grant {
            id: GrantId::generate(),
            user,
            target,
            access: AccessLevel::Read,
            reason: "bench".into(),
            created_by: UserName::new("admin").unwrap(),
            created_at: now,
            expires_at: now + Duration::from_secs(86_400),
        });
    }
    // Visit keys in a scattered order, as sessions of many users would.
    let len = keys.len();
    let keys = (0..len).map(|i| keys[(i * 7919) % len].clone()).collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let table = {
        let _enter = rt.enter();
        let (table, _expired) = GrantTable::start(jitgate::clock::system(), CancellationToken::new(), Metrics::new());
        for g in grants {
            table.apply(&Change::GrantCreated(g));
        }
        table
    };
    Table {
        grants: table,
        keys,
        _rt: rt,
    }
}

fn bench(c: &mut Criterion) {
    for n in [1_000, 1_000_000] {
        let t = table(n);
        let mut g = c.benchmark_group(format!("grants/lookup/{n}"));
        g.throughput(Throughput::Elements(1));
        g.bench_function("hit_1_thread", |b| {
            let mut i = 0;
            b.iter(|| {
                let (u, tg) = &t.keys[i % t.keys.len()];
                i += 1;
                black_box(t.grants.lookup(u, tg)).is_some()
            })
        });
        let stranger = UserName::new("nobody").unwrap();
        g.bench_function("miss_1_thread", |b| {
            let mut i = 0;
            b.iter(|| {
                i += 1;
                black_box(t.grants.lookup(&stranger, &t.keys[i % t.keys.len()].1)).is_none()
            })
        });
        for threads in [2, 4, 8] {
            // One iteration is one lookup on each thread at once: elements/s is the total rate.
            g.throughput(Throughput::Elements(threads as u64));
            g.bench_function(format!("hit_{threads}_threads"), |b| {
                b.iter_custom(|iters| {
                    let start = Barrier::new(threads + 1);
                    std::thread::scope(|s| {
                        for k in 0..threads {
                            let (t, start) = (&t, &start);
                            s.spawn(move || {
                                start.wait();
                                let offset = k * t.keys.len() / threads;
                                for i in 0..iters as usize {
                                    let (u, tg) = &t.keys[(offset + i) % t.keys.len()];
                                    black_box(t.grants.lookup(u, tg));
                                }
                            });
                        }
                        start.wait();
                        let t0 = Instant::now();
                        // Threads join at the end of the scope.
                        t0
                    })
                    .elapsed()
                })
            });
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
