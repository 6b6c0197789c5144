//! The e2e results table: reads the raw lines `benches/e2e.sh` collects and prints medians
//! over rounds as Markdown.
//!
//! Input lines, whitespace-separated:
//! - `pgbench WORKLOAD TARGET ROUND SECS TPS LAT_MS TXNS CPU_S AUDIT_RECORDS` (`-` where a
//!   value does not apply: CPU for direct targets, audit records for all but jitgate);
//! - `memory k=v ...` and `sever k=v ...` as printed by the `hold` and `sever` subcommands;
//! - `connect TARGET k=v ...` and `qlat TARGET k=v ...` as printed by `connect` and `qlat`;
//! - anything else is ignored.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::stats::median;

/// Targets in table order; ratios are taken against the two reference targets.
const TARGETS: &[&str] = &[
    "direct-tcp",
    "direct-tls",
    "pgbouncer",
    "pgbouncer-mtls",
    "jitgate",
    "jitgate-agent",
    "jitgate-base",
];
const VS_TLS: &str = "direct-tls";
const VS_BOUNCER: &str = "pgbouncer";
/// pgbouncer with client mTLS (verify-full, the same CA and server certificate as jitgate):
/// the fair comparison for a proxy that must terminate mTLS.
const VS_BOUNCER_MTLS: &str = "pgbouncer-mtls";
/// jitgate's direct path: what the path through an agent is compared with.
const VS_JITGATE: &str = "jitgate";

#[derive(Debug, Default)]
struct Runs {
    tps: Vec<f64>,
    lat_ms: Vec<f64>,
    cpu_per_1k: Vec<f64>,
    audit_per_s: Vec<f64>,
}

fn num(s: &str) -> Option<f64> {
    s.parse().ok()
}

fn fields(line: &str) -> BTreeMap<&str, &str> {
    line.split_whitespace().filter_map(|kv| kv.split_once('=')).collect()
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "-".into(),
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.digits$}"))
}

/// The values of `keys` in `f`, `-` where one is missing.
fn pick(f: &BTreeMap<&str, &str>, keys: &[&str]) -> Vec<String> {
    keys.iter()
        .map(|k| f.get(k).copied().unwrap_or("-").to_owned())
        .collect()
}

/// Appends a Markdown table after a blank line: its header and alignment rows, then a row of
/// cells for each of `rows`.
fn table(out: &mut String, header: &str, align: &str, rows: impl IntoIterator<Item = Vec<String>>) {
    let _ = writeln!(out);
    let _ = writeln!(out, "{header}");
    let _ = writeln!(out, "{align}");
    for cells in rows {
        let _ = writeln!(out, "| {} |", cells.join(" | "));
    }
}

/// Renders the Markdown report of `input`.
pub fn render(input: &str) -> String {
    let mut workloads: Vec<String> = Vec::new();
    let mut runs: BTreeMap<(String, String), Runs> = BTreeMap::new();
    let mut memory = Vec::new();
    let mut sever = Vec::new();
    let mut connect: Vec<(String, BTreeMap<&str, &str>)> = Vec::new();
    let mut qlat: Vec<(String, BTreeMap<&str, &str>)> = Vec::new();
    for line in input.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.first().copied() {
            Some("pgbench") if w.len() >= 10 => {
                let (workload, target) = (w[1].to_owned(), w[2].to_owned());
                if !workloads.contains(&workload) {
                    workloads.push(workload.clone());
                }
                let r = runs.entry((workload, target)).or_default();
                let (secs, tps, lat, txns) = (num(w[4]), num(w[5]), num(w[6]), num(w[7]));
                r.tps.extend(tps);
                r.lat_ms.extend(lat);
                if let (Some(cpu), Some(txns)) = (num(w[8]), txns) {
                    if txns > 0.0 {
                        r.cpu_per_1k.push(cpu / txns * 1000.0);
                    }
                }
                if let (Some(records), Some(secs)) = (num(w[9]), secs) {
                    if secs > 0.0 {
                        r.audit_per_s.push(records / secs);
                    }
                }
            }
            Some("memory") => memory.push(fields(line)),
            Some("sever") => sever.push(fields(line)),
            Some("connect") if w.len() >= 2 => connect.push((w[1].to_owned(), fields(line))),
            Some("qlat") if w.len() >= 2 => qlat.push((w[1].to_owned(), fields(line))),
            _ => {}
        }
    }

    let mut out = String::new();
    let _ = writeln!(
        out,
        "| workload | target | TPS | avg latency ms | TPS / direct TLS | TPS / pgbouncer | TPS / pgbouncer mTLS | TPS / jitgate | latency / direct TLS | latency / pgbouncer | proxy CPU s per 1k tx | CPU / pgbouncer mTLS | audit records/s |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for workload in &workloads {
        let med = |target: &str, pick: fn(&Runs) -> &Vec<f64>| {
            runs.get(&(workload.clone(), target.to_owned()))
                .and_then(|r| median(pick(r)))
        };
        for target in TARGETS {
            let Some(r) = runs.get(&(workload.clone(), (*target).to_owned())) else {
                continue;
            };
            let tps = median(&r.tps);
            let lat = median(&r.lat_ms);
            let cpu = median(&r.cpu_per_1k);
            let _ = writeln!(
                out,
                "| {workload} | {target} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                opt(tps, 0),
                opt(lat, 3),
                ratio(tps, med(VS_TLS, |r| &r.tps)),
                ratio(tps, med(VS_BOUNCER, |r| &r.tps)),
                ratio(tps, med(VS_BOUNCER_MTLS, |r| &r.tps)),
                ratio(tps, med(VS_JITGATE, |r| &r.tps)),
                ratio(lat, med(VS_TLS, |r| &r.lat_ms)),
                ratio(lat, med(VS_BOUNCER, |r| &r.lat_ms)),
                opt(cpu, 3),
                ratio(cpu, med(VS_BOUNCER_MTLS, |r| &r.cpu_per_1k)),
                opt(median(&r.audit_per_s), 0),
            );
        }
    }

    if !connect.is_empty() {
        table(
            &mut out,
            "| session start (one after another: TLS, startup, upstream login, first ReadyForQuery) | sessions | p50 ms | p99 ms | max ms |",
            "|---|---:|---:|---:|---:|",
            connect.iter().map(|(target, c)| {
                let mut row = vec![target.clone()];
                row.extend(pick(c, &["N", "p50_ms", "p99_ms", "max_ms"]));
                row
            }),
        );
    }
    if !qlat.is_empty() {
        let get = |c: &BTreeMap<&str, &str>, k: &str| c.get(k).and_then(|v| num(v));
        let base = qlat.iter().find(|(t, _)| t == VS_TLS).map(|(_, c)| c);
        table(
            &mut out,
            "| one simple query at -c 1 (pgbench -S -M simple) | transactions | p50 µs | p99 µs | added p50 µs (vs direct TLS) | added p99 µs |",
            "|---|---:|---:|---:|---:|---:|",
            qlat.iter().map(|(target, c)| {
                let added = |k: &str| match (get(c, k), base.and_then(|b| get(b, k))) {
                    (Some(a), Some(b)) => format!("{:.1}", a - b),
                    _ => "-".into(),
                };
                let mut row = vec![target.clone()];
                row.extend(pick(c, &["n"]));
                row.extend([
                    opt(get(c, "p50_us"), 1),
                    opt(get(c, "p99_us"), 1),
                    added("p50_us"),
                    added("p99_us"),
                ]);
                row
            }),
        );
    }
    if !memory.is_empty() {
        table(
            &mut out,
            "| idle mTLS sessions (fake upstream) | jitgate RSS before KiB | after KiB | KiB per session | open time s | opens/s |",
            "|---:|---:|---:|---:|---:|---:|",
            memory.iter().map(|m| {
                pick(
                    m,
                    &["N", "rss_before_kib", "rss_after_kib", "per_session_kib", "open_s", "opens_per_s"],
                )
            }),
        );
    }
    if !sever.is_empty() {
        table(
            &mut out,
            "| sessions under one grant (fake upstream) | path | cut by | sever p50 ms | p99 ms | max ms | ended early | still open | CLI alone ms |",
            "|---:|---|---|---:|---:|---:|---:|---:|---:|",
            sever.iter().map(|s| {
                let mut row = pick(s, &["N"]);
                row.push(s.get("via").map_or("direct", |v| v).to_owned());
                row.extend(pick(
                    s,
                    &["by", "p50_ms", "p99_ms", "max_ms", "early", "still_open", "cli_ms"],
                ));
                row
            }),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_ratios() {
        let input = "\
pgbench select-prepared direct-tls 1 10 100 0.5 1000 - -
pgbench select-prepared direct-tls 2 10 300 0.3 3000 - -
pgbench select-prepared pgbouncer 1 10 100 1.0 1000 2.0 -
pgbench select-prepared pgbouncer-mtls 1 10 40 1.2 400 0.2 -
pgbench select-prepared jitgate 1 10 50 2.0 500 1.0 1000
pgbench select-prepared jitgate-agent 1 10 45 2.2 450 1.35 900
memory N=10 rss_before_kib=1 rss_after_kib=11 per_session_kib=1.0 open_s=0.1 opens_per_s=100
sever N=100 by=revoke p50_ms=3.0 p99_ms=9.0 max_ms=9.5 early=0 still_open=0 open_s=0.50 cli_ms=20.0
sever via=agent N=100 by=expiry p50_ms=4.0 p99_ms=11.0 max_ms=12.0 early=0 still_open=0 open_s=0.50
connect jitgate N=2000 p50_ms=1.500 p99_ms=3.000 max_ms=9.000
qlat direct-tls n=100 p50_us=200.0 p99_us=400.0
qlat jitgate n=90 p50_us=260.5 p99_us=520.0
noise
";
        let out = render(input);
        assert!(
            out.contains("| select-prepared | direct-tls | 200 | 0.400 | 1.00 | 2.00 | 5.00 | 4.00 |"),
            "{out}"
        );
        assert!(
            out.contains(
                "| select-prepared | jitgate | 50 | 2.000 | 0.25 | 0.50 | 1.25 | 1.00 | 5.00 | 2.00 | 2.000 | 4.00 | 100 |"
            ),
            "{out}"
        );
        assert!(
            out.contains(
                "| select-prepared | jitgate-agent | 45 | 2.200 | 0.23 | 0.45 | 1.12 | 0.90 | 5.50 | 2.20 | 3.000 | 6.00 | 90 |"
            ),
            "{out}"
        );
        assert!(out.contains("| 10 | 1 | 11 | 1.0 | 0.1 | 100 |"), "{out}");
        assert!(out.contains("| jitgate | 2000 | 1.500 | 3.000 | 9.000 |"), "{out}");
        assert!(
            out.contains("| direct-tls | 100 | 200.0 | 400.0 | 0.0 | 0.0 |"),
            "{out}"
        );
        assert!(out.contains("| jitgate | 90 | 260.5 | 520.0 | 60.5 | 120.0 |"), "{out}");
        assert!(
            out.contains("| 100 | direct | revoke | 3.0 | 9.0 | 9.5 | 0 | 0 | 20.0 |"),
            "{out}"
        );
        assert!(
            out.contains("| 100 | agent | expiry | 4.0 | 11.0 | 12.0 | 0 | 0 | - |"),
            "{out}"
        );
    }
}
