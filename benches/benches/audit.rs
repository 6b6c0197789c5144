//! Audit throughput on one core: encoding a `statement` record (serde_json, as
//! `AuditLog::write_or_enqueue` does on the relay's thread) and chaining it (`chain::encode`: the
//! SHA-256 line hash, as the writer thread does), separately and together; then the whole
//! `AuditLog` (enqueue, writer thread, one `write` per batch) into a file, and the `stat` that
//! checks after each batch that the path still names the file. Target: 100,000 statements
//! per second.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use jitgate::audit::chain;
use jitgate::audit::{AuditEvent, AuditLog, AuditRecord, Decision, Outcome, StatementPath, Written, SCHEMA_VERSION};
use jitgate::config::AuditConfig;
use jitgate::metrics::Metrics;
use jitgate::model::{AccessLevel, GrantId, SessionId, TargetName, UserName};
use std::hint::black_box;

fn statement(n: u64) -> AuditEvent {
    AuditEvent::Statement {
        session_id: SessionId::from_string("s-58189bf90145bd98"),
        statement: n,
        grant_id: GrantId::from_string("g-5f0c2a9d4e7b1c38"),
        user: UserName::new("alice").unwrap(),
        target: TargetName::new("prod-db").unwrap(),
        access: AccessLevel::Write,
        protocol: StatementPath::Extended,
        text: "SELECT abalance FROM pgbench_accounts WHERE aid = $1;".into(),
        params: vec![Some("731942".into())],
        class: "read".into(),
        kind: "select".into(),
        tables: vec!["pgbench_accounts".into()],
        upstream_role: "jit_reader".into(),
        effective_role: None,
        decision: Decision::Allowed,
        denied_by: None,
    }
}

fn statement_end(n: u64) -> AuditEvent {
    AuditEvent::StatementEnd {
        session_id: SessionId::from_string("s-58189bf90145bd98"),
        statement: n,
        outcome: Outcome::Ok {
            tag: "SELECT 1".into(),
            rows: Some(1),
        },
        duration_us: 87,
        copy_bytes: None,
    }
}

fn encode(event: AuditEvent) -> Vec<u8> {
    serde_json::to_vec(&AuditRecord {
        v: SCHEMA_VERSION,
        ts: SystemTime::now(),
        event,
    })
    .unwrap()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("audit");
    g.throughput(Throughput::Elements(1));
    let body = encode(statement(1));
    g.bench_function("encode_statement", |b| {
        let mut n = 0;
        b.iter(|| {
            n += 1;
            encode(statement(n))
        })
    });
    g.bench_function("chain_statement", |b| {
        let mut prev = chain::GENESIS;
        let mut out = Vec::with_capacity(1 << 20);
        let mut seq = 0;
        b.iter(|| {
            if out.len() > (1 << 20) - 2048 {
                out.clear();
            }
            seq += 1;
            prev = chain::encode(seq, &prev, black_box(&body), &mut out);
        })
    });
    // Per statement the proxy writes two records: `statement` before forwarding and
    // `statement.end` when the server answers.
    g.bench_function("encode_and_chain_statement_and_end", |b| {
        let mut prev = chain::GENESIS;
        let mut out = Vec::with_capacity(1 << 20);
        let mut seq = 0;
        b.iter(|| {
            if out.len() > (1 << 20) - 4096 {
                out.clear();
            }
            for body in [encode(statement(seq)), encode(statement_end(seq))] {
                seq += 1;
                prev = chain::encode(seq, &prev, &body, &mut out);
            }
        })
    });

    // The whole log as the relay uses it: one submission per statement (a relay batch) and
    // one for its end, each written on the caller's thread when the file is free, else
    // queued for the writer thread. Measured until the last record is written.
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(
        &AuditConfig {
            path: dir.path().join("audit.jsonl"),
            tip_path: dir.path().join("audit.tip"),
            max_file_bytes: 1 << 30,
            fsync_interval: Duration::from_secs(1),
            queue_depth: 1 << 16,
            max_statement_bytes: 65_536,
            max_param_bytes: 256,
            redact_params_matching: Vec::new(),
            replica: None,
        },
        Metrics::new(),
    )
    .unwrap();
    let log = Arc::clone(&log);
    // What the writer adds per batch to check that the path still names its file: one
    // `stat` of the path (next to one `write` of a record of the same size, for scale).
    let path = dir.path().join("audit.jsonl");
    g.bench_function("check_stat_of_the_audit_path", |b| {
        b.iter(|| std::fs::metadata(black_box(&path)).unwrap().len())
    });
    let scratch = dir.path().join("scratch");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&scratch)
        .unwrap();
    let line = {
        let mut out = Vec::new();
        chain::encode(1, &chain::GENESIS, &body, &mut out);
        out
    };
    g.bench_function("write_one_statement_line", |b| {
        use std::io::Write as _;
        b.iter(|| file.write_all(black_box(&line)).unwrap())
    });
    drop(file);
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    g.bench_function("audit_log_write_or_enqueue_statement_and_end", |b| {
        b.iter_custom(|iters| {
            let t0 = Instant::now();
            let mut tickets = Vec::with_capacity(4096);
            for i in 0..iters {
                for event in [statement(i), statement_end(i)] {
                    if let Written::Later(t) = log.write_or_enqueue(vec![event]).unwrap() {
                        tickets.push(t);
                    }
                }
                if tickets.len() == 4096 {
                    rt.block_on(async {
                        for t in tickets.drain(..) {
                            t.await.unwrap();
                        }
                    });
                }
            }
            rt.block_on(async {
                for t in tickets.drain(..) {
                    t.await.unwrap();
                }
            });
            t0.elapsed()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
