//! SQL classification (`jitgate_protocol::sql::classify`, called for every `Query` and
//! `Parse`) and redaction (`sql::redact`, called for every recorded statement) on typical
//! pgbench statements and on worst cases: long, deeply nested, many CTEs, big IN lists and
//! long operator chains.
#![allow(clippy::unwrap_used)]

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use jitgate_protocol::sql;
use std::hint::black_box;

fn typical() -> Vec<(&'static str, String)> {
    vec![
        (
            "select_pgbench",
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1;".into(),
        ),
        (
            "update_tpcb",
            "UPDATE pgbench_accounts SET abalance = abalance + -4321 WHERE aid = 73421;".into(),
        ),
        (
            "insert_tpcb",
            "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (7, 1, 73421, -4321, CURRENT_TIMESTAMP);"
                .into(),
        ),
        ("begin", "BEGIN;".into()),
        (
            "select_join",
            "SELECT o.id, o.total, c.name FROM orders o JOIN customers c ON c.id = o.customer_id \
             WHERE o.created_at > now() - interval '1 day' AND c.region = 'eu' ORDER BY o.total DESC LIMIT 50"
                .into(),
        ),
    ]
}

fn worst() -> Vec<(&'static str, String)> {
    let columns: Vec<String> = (0..2000).map(|i| format!("column_{i}")).collect();
    let long = format!("SELECT {} FROM wide_table WHERE id = 1", columns.join(", "));
    let rows: Vec<String> = (0..1000).map(|i| format!("({i}, 'name {i}', {i}.5, now())")).collect();
    let bulk_insert = format!("INSERT INTO t (a, b, c, d) VALUES {}", rows.join(", "));
    let nest = |depth: usize| {
        let mut s = "SELECT 1".to_owned();
        for i in 0..depth {
            s = format!("SELECT * FROM ({s}) AS t{i}");
        }
        s
    };
    let ctes: Vec<String> = (0..200)
        .map(|i| {
            if i == 0 {
                "c0 AS (SELECT 1 AS x)".to_owned()
            } else {
                format!("c{i} AS (SELECT x + 1 AS x FROM c{})", i - 1)
            }
        })
        .collect();
    let many_ctes = format!("WITH {} SELECT x FROM c199", ctes.join(", "));
    let ids: Vec<String> = (0..10_000).map(|i| i.to_string()).collect();
    let big_in = format!("SELECT * FROM accounts WHERE id IN ({})", ids.join(", "));
    let chain = format!("SELECT {}", vec!["1"; 5000].join(" + "));
    vec![
        ("long_select_2000_columns", long),
        ("bulk_insert_1000_rows", bulk_insert),
        ("nested_subqueries_30", nest(30)),
        ("nested_subqueries_500_over_limit", nest(500)),
        ("ctes_200", many_ctes),
        ("in_list_10000", big_in),
        ("operator_chain_5000", chain),
    ]
}

fn bench(c: &mut Criterion) {
    for (group, cases) in [("classify/typical", typical()), ("classify/worst", worst())] {
        let mut g = c.benchmark_group(group);
        if group.ends_with("worst") {
            g.sample_size(20);
        }
        for (name, sql_text) in &cases {
            g.throughput(Throughput::Bytes(sql_text.len() as u64));
            g.bench_function(*name, |b| b.iter(|| sql::classify(black_box(sql_text))));
        }
        g.finish();
    }
    let mut g = c.benchmark_group("redact");
    for (name, sql_text) in typical().iter().chain(worst().iter().take(2)) {
        g.throughput(Throughput::Bytes(sql_text.len() as u64));
        g.bench_function(*name, |b| b.iter(|| sql::redact(black_box(sql_text))));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
