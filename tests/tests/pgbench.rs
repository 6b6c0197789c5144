//! pgbench through the proxy: initialisation (DDL, COPY) and the TPC-B-like workload in every
//! query mode, with no failed transactions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use jitgate_tests::jitgate::model::AccessLevel;
use jitgate_tests::{client_command, Harness};

async fn pgbench(args: &[&str], conninfo: &str) -> (bool, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(300),
        client_command("pgbench").args(args).arg(conninfo).output(),
    )
    .await
    .expect("pgbench finished")
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread")]
async fn pgbench_simple_extended_prepared_complete() {
    let h = Harness::start().await;
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "prod-db", AccessLevel::Write, Duration::from_secs(3600))
        .await;
    let conninfo = h.conninfo(&alice, "prod-db");
    let (ok, text) = pgbench(&["-i", "-s", "1", "-q"], &conninfo).await;
    assert!(ok, "pgbench -i through the proxy: {text}");
    for mode in ["simple", "extended", "prepared"] {
        let (ok, text) = pgbench(&["-M", mode, "-c", "4", "-j", "2", "-t", "100", "-n"], &conninfo).await;
        assert!(ok, "pgbench -M {mode}: {text}");
        assert!(
            text.contains("number of transactions actually processed: 400/400"),
            "-M {mode}: {text}"
        );
        assert!(text.contains("number of failed transactions: 0 "), "-M {mode}: {text}");
    }
    // Every transaction really reached the target: 3 x 400 history rows.
    assert_eq!(h.pg.sql("app", "SELECT count(*) FROM pgbench_history").unwrap(), "1200");
}
