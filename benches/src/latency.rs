//! Latency measurements of `benches/e2e.sh`: how long a session takes to start, and what one
//! simple query costs, per target.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use jitgate_protocol::postgres::frontend::encode_tagged;
use tokio::io::AsyncWriteExt as _;

use crate::sessions::{self, Target};
use crate::stats;

/// Opens `t.n` sessions one after another, each timed from the TCP connect to its first
/// `ReadyForQuery` (TLS handshake, startup, the upstream's login), then closed with a
/// `Terminate`. Prints `connect TARGET N=.. p50_ms=.. p99_ms=.. max_ms=..`.
pub async fn session_start(t: &Target, label: &str) -> Result<()> {
    let tls = sessions::connector(t)?;
    let mut ms = Vec::with_capacity(t.n);
    for i in 0..t.n {
        let start = Instant::now();
        let mut s = sessions::open_one(t, tls.clone())
            .await
            .with_context(|| format!("session {i} of {label}"))?;
        ms.push(start.elapsed().as_secs_f64() * 1e3);
        // Terminate ('X'), then close: the server ends the backend, as psql does.
        let _ = s.write_all(&encode_tagged(b'X', &[])).await;
        let _ = s.shutdown().await;
    }
    let s = stats::Summary::of(&mut ms);
    println!(
        "connect {label} N={} p50_ms={:.3} p99_ms={:.3} max_ms={:.3}",
        t.n, s.p50, s.p99, s.max
    );
    Ok(())
}

/// Transaction latencies, in µs, of pgbench per-transaction logs (`--log`): the third field of
/// each line (`client_id transaction_no time script_no time_epoch time_us`).
pub fn pgbench_log_latencies(text: &str) -> Result<Vec<f64>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 6 {
                bail!("not a pgbench log line: {l:?}");
            }
            f[2].parse::<f64>().with_context(|| format!("latency of {l:?}"))
        })
        .collect()
}

/// Reads pgbench logs of one target and prints `qlat TARGET n=.. p50_us=.. p99_us=..`.
pub fn query_latency(label: &str, files: &[PathBuf]) -> Result<()> {
    let mut us = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        us.extend(pgbench_log_latencies(&text)?);
    }
    if us.is_empty() {
        bail!("no transactions in the logs of {label}");
    }
    let n = us.len();
    let s = stats::Summary::of(&mut us);
    println!("qlat {label} n={n} p50_us={:.1} p99_us={:.1}", s.p50, s.p99);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pgbench_logs_give_each_transactions_latency() {
        let log = "0 1 412 0 1764700000 123456\n0 2 398 0 1764700000 124000\n\n";
        assert_eq!(pgbench_log_latencies(log).unwrap(), vec![412.0, 398.0]);
        assert!(pgbench_log_latencies("0 1 x 0 1 2\n").is_err());
        assert!(pgbench_log_latencies("garbage\n").is_err());
    }
}
