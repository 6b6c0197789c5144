//! PostgreSQL framing on pgbench traffic (synthesized per transaction, and recorded from real
//! pgbench sessions by `benches/record-traffic.sh`), as the relay does it per read: split the client's
//! bytes into whole messages and decode each (`peek_tagged` + `decode_frontend`), follow the
//! server's message boundaries (`Scanner`), and the whole per-statement work of the session's
//! statement tracker (classification, guard, record building, answer matching), with and
//! without serializing the audit records it produces (which `AuditLog::write_or_enqueue` does on the
//! relay's thread).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::SystemTime;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use jitgate::audit::{AuditEvent, AuditRecord, SCHEMA_VERSION};
use jitgate::model::{AccessLevel, GrantId, SessionId, SessionMeta, TargetName, UserName};
use jitgate::pg::bench_support::{Disposition, Guard, TextLimits, Tracker};
use jitgate_benches::traffic::{self, Exchange, Mode, Read};
use jitgate_protocol::postgres::backend::peek_tagged;
use jitgate_protocol::postgres::messages::decode_frontend;
use jitgate_protocol::postgres::scanner::{Piece, Scanner};
use std::hint::black_box;

const TXNS: usize = 1000;

/// A stream: what runs once after login (`Parse` of the prepared statement) and the
/// transactions that follow.
struct Workload {
    name: String,
    setup: Option<Exchange>,
    xs: Vec<Exchange>,
}

fn workloads() -> Vec<Workload> {
    let mut w: Vec<_> = Mode::ALL
        .iter()
        .map(|&m| Workload {
            name: format!("select-{}", m.as_str()),
            setup: (m == Mode::Prepared).then(|| Exchange {
                frontend: traffic::prepare_once(),
                backend: traffic::prepare_once_answer(),
            }),
            xs: traffic::select_only(m, TXNS),
        })
        .collect();
    w.push(Workload {
        name: "tpcb-simple-statement".into(),
        setup: None,
        xs: traffic::tpcb_simple(TXNS / 7),
    });
    w
}

fn split_and_decode(buf: &[u8]) -> usize {
    let mut at = 0;
    let mut n = 0;
    while let Some((_, len)) = peek_tagged(&buf[at..], 16 << 20).unwrap() {
        if buf.len() - at < len {
            break;
        }
        black_box(decode_frontend(&buf[at..at + len]).unwrap());
        at += len;
        n += 1;
    }
    n
}

fn tracker() -> Tracker {
    let user = UserName::new("bench").unwrap();
    let target = TargetName::new("bench-db").unwrap();
    let session = SessionMeta {
        id: SessionId::generate(),
        grant_id: GrantId::generate(),
        user: user.clone(),
        roles: Vec::new(),
        target: target.clone(),
        database: "bench".into(),
        access: AccessLevel::Write,
        client_addr: "127.0.0.1:5555".parse().unwrap(),
        upstream_role: "jit_reader".into(),
    };
    let guard = Guard::new(AccessLevel::Write, target.as_str(), &[]);
    let limits = TextLimits {
        max_statement_bytes: 65_536,
        max_param_bytes: 256,
        redact_params_matching: vec!["password".into(), "secret".into(), "token".into()],
    };
    Tracker::new(session, guard, limits)
}

/// One exchange through the tracker as the relay drives it; returns the records made.
fn track(t: &mut Tracker, sc: &mut Scanner, out: &mut Vec<u8>, x: &Exchange) -> Vec<AuditEvent> {
    let mut batch = t.client_batch(&x.frontend).unwrap();
    t.mark_forwarded(&batch);
    let mut records = std::mem::take(&mut batch.records);
    out.clear();
    let mut dropping = false;
    sc.feed(&x.backend, |p| match p {
        Piece::Start { tag, len } => dropping = t.backend_start(tag, len) == Disposition::Replace,
        Piece::Bytes(b) => {
            if !dropping {
                out.extend_from_slice(b)
            }
        }
        Piece::End { tag, body } => {
            if let Some(r) = t.backend_end(tag, body) {
                out.extend_from_slice(&r);
            }
            dropping = false;
        }
    })
    .unwrap();
    black_box(t.take_durations());
    records.extend(t.take_ends());
    records
}

/// Replays a recorded session read by read, as the relay would: client bytes are
/// buffered until whole messages are in, which go through the tracker; server reads go
/// through the scanner and the tracker's answer matching. Returns the records made.
fn replay(reads: &[Read]) -> usize {
    let mut t = tracker();
    let mut sc = Scanner::new(b"CES");
    let mut inbuf: Vec<u8> = Vec::new();
    let mut out = Vec::with_capacity(8192);
    let mut records = 0;
    for read in reads {
        match read {
            Read::Client(b) => {
                inbuf.extend_from_slice(b);
                let mut whole = 0;
                while let Some((_, len)) = peek_tagged(&inbuf[whole..], usize::MAX).unwrap() {
                    whole += len;
                }
                if whole > 0 {
                    let mut batch = t.client_batch(&inbuf[..whole]).unwrap();
                    t.mark_forwarded(&batch);
                    records += std::mem::take(&mut batch.records).len();
                    inbuf.drain(..whole);
                }
            }
            Read::Server(b) => {
                let x = Exchange {
                    frontend: Vec::new(),
                    backend: b.clone(),
                };
                out.clear();
                records += track(&mut t, &mut sc, &mut out, &x).len();
            }
        }
    }
    records
}

fn bench_recorded(c: &mut Criterion) {
    for name in traffic::RECORDED {
        let reads = traffic::recorded(name);
        let client: Vec<u8> = reads
            .iter()
            .filter_map(|r| match r {
                Read::Client(b) => Some(b.as_slice()),
                Read::Server(_) => None,
            })
            .collect::<Vec<_>>()
            .concat();
        let mut g = c.benchmark_group(format!("recorded/{name}"));
        // 200 pgbench transactions per recording.
        g.throughput(Throughput::Elements(200));
        g.bench_function("frontend_split_decode", |b| b.iter(|| split_and_decode(&client)));
        g.bench_function("backend_scan", |b| {
            let mut sc = Scanner::new(b"CES");
            let mut out = Vec::with_capacity(65536);
            b.iter(|| {
                out.clear();
                for r in &reads {
                    if let Read::Server(bytes) = r {
                        sc.feed(bytes, |p| {
                            if let Piece::Bytes(b) = p {
                                out.extend_from_slice(b)
                            }
                        })
                        .unwrap();
                    }
                }
                out.len()
            })
        });
        g.bench_function("tracker", |b| b.iter(|| replay(&reads)));
        g.finish();
    }
}

fn bench(c: &mut Criterion) {
    for Workload { name, setup, xs } in workloads() {
        let mut g = c.benchmark_group(format!("frames/{name}"));
        g.throughput(Throughput::Elements(xs.len() as u64));

        g.bench_function("frontend_split_decode", |b| {
            b.iter(|| xs.iter().map(|x| split_and_decode(&x.frontend)).sum::<usize>())
        });

        g.bench_function("backend_scan", |b| {
            let mut sc = Scanner::new(b"CES");
            let mut out = Vec::with_capacity(8192);
            b.iter(|| {
                for x in &xs {
                    out.clear();
                    sc.feed(&x.backend, |p| {
                        if let Piece::Bytes(b) = p {
                            out.extend_from_slice(b)
                        }
                    })
                    .unwrap();
                }
                out.len()
            })
        });

        let fresh = || {
            let mut t = tracker();
            let mut sc = Scanner::new(b"CES");
            if let Some(x) = &setup {
                track(&mut t, &mut sc, &mut Vec::new(), x);
            }
            (t, sc)
        };
        g.bench_function("tracker", |b| {
            b.iter_batched_ref(
                fresh,
                |(t, sc)| {
                    let mut out = Vec::with_capacity(8192);
                    xs.iter().map(|x| track(t, sc, &mut out, x).len()).sum::<usize>()
                },
                BatchSize::LargeInput,
            )
        });
        g.bench_function("tracker_and_record_serialize", |b| {
            b.iter_batched_ref(
                fresh,
                |(t, sc)| {
                    let mut out = Vec::with_capacity(8192);
                    let mut bytes = 0;
                    for x in &xs {
                        let ts = SystemTime::now();
                        for event in track(t, sc, &mut out, x) {
                            let r = AuditRecord {
                                v: SCHEMA_VERSION,
                                ts,
                                event,
                            };
                            bytes += serde_json::to_vec(&r).unwrap().len();
                        }
                    }
                    bytes
                },
                BatchSize::LargeInput,
            )
        });
        g.finish();
    }
}

criterion_group!(benches, bench, bench_recorded);
criterion_main!(benches);
