//! Connection exhaustion against the real proxy: per-user session limits, the session budget
//! of a listener, and floods of connections that never present a certificate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use jitgate_tests::jitgate::model::AccessLevel;
use jitgate_tests::raw::{self, error_of, read_to_end, send_startup};
use jitgate_tests::{eventually, metric, Harness, Options};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};

const HOUR: Duration = Duration::from_secs(3600);

async fn metric_now(h: &Harness, name: &str) -> f64 {
    let (_, body) = h.metrics_get("/metrics").await;
    metric(&body, name)
}

/// The first ErrorResponse a raw client gets for a startup as `user`.
async fn startup_error(h: &Harness, user: &jitgate_tests::UserCert) -> Option<(String, String)> {
    let cfg = raw::client_config(h.data_dir(), Some(user), None);
    let mut s = raw::ssl_request_tls(h.addrs().postgres, cfg).await.unwrap();
    send_startup(&mut s, &[("user", user.user.as_str()), ("database", "prod-db")]).await;
    error_of(&read_to_end(&mut s).await.msgs)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_over_the_session_limit_gets_53300_and_others_still_get_in() {
    let h = Harness::start_with(Options {
        limits: "max_sessions_per_user = 2",
        ..Default::default()
    })
    .await;
    let alice = h.user("alice", &["dev"]);
    let bob = h.user("bob", &["dev"]);
    h.grant("alice", "prod-db", AccessLevel::Read, HOUR).await;
    h.grant("bob", "prod-db", AccessLevel::Read, HOUR).await;
    let first = raw::session(&h, &alice, "prod-db").await;
    let _second = raw::session(&h, &alice, "prod-db").await;

    // The third: a protocol-native refusal naming the limit, at once.
    let (code, message) = startup_error(&h, &alice).await.expect("an ErrorResponse");
    assert_eq!(code, "53300");
    assert!(message.contains("limits.max_sessions_per_user"), "{message}");
    let out = h.psql(&alice, "prod-db", "SELECT 1").await;
    assert!(!out.success);
    assert!(out.stderr.contains("too many sessions for alice"), "{}", out.stderr);

    // Another user is not affected.
    let out = h.psql(&bob, "prod-db", "SELECT current_user").await;
    assert!(out.success, "{out:?}");

    // A slot comes back when a session ends.
    drop(first);
    let admin = h.admin().clone();
    eventually("alice down to one session", Duration::from_secs(10), || {
        let admin = admin.clone();
        async move { admin.list_sessions().await.map(|s| s.len() == 1).unwrap_or(false) }
    })
    .await;
    assert!(h.psql(&alice, "prod-db", "SELECT 1").await.success);

    assert_eq!(
        metric_now(
            &h,
            "jitgate_connections_refused_total{listener=\"postgres\",reason=\"max_sessions_per_user\"}"
        )
        .await,
        2.0
    );
    let denied = h.audit_events("session.denied");
    assert_eq!(
        denied.iter().filter(|e| e["code"] == "max_sessions_per_user").count(),
        2,
        "{denied:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_listener_answers_53300_not_silence() {
    let h = Harness::start_with(Options {
        limits: "max_connections = 2",
        ..Default::default()
    })
    .await;
    let alice = h.user("alice", &["dev"]);
    let bob = h.user("bob", &["dev"]);
    h.grant("alice", "prod-db", AccessLevel::Read, HOUR).await;
    h.grant("bob", "prod-db", AccessLevel::Read, HOUR).await;
    let _a = raw::session(&h, &alice, "prod-db").await;
    let _b = raw::session(&h, &alice, "prod-db").await;
    // psql's connect_timeout is 10 s: a silent listener would show as a timeout.
    let out = h.psql(&bob, "prod-db", "SELECT 1").await;
    assert!(!out.success);
    assert!(out.stderr.contains("sorry, too many clients already"), "{}", out.stderr);
    assert!(out.stderr.contains("limits.max_connections"), "{}", out.stderr);
    let (code, _) = startup_error(&h, &bob).await.expect("an ErrorResponse");
    assert_eq!(code, "53300");
    assert_eq!(
        metric_now(
            &h,
            "jitgate_connections_refused_total{listener=\"postgres\",reason=\"max_connections\"}"
        )
        .await,
        2.0
    );
}

/// Holds `n` bare TCP connections to `addr` from `source`, opening a new one whenever one is
/// closed, until `stop`; then leaves the last ones open (abandoned) and returns them.
async fn flood(
    addr: SocketAddr,
    source: &str,
    n: usize,
    stop: Arc<AtomicBool>,
    opened: Arc<AtomicU64>,
) -> Vec<TcpStream> {
    let source: std::net::IpAddr = source.parse().unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (stop, opened) = (Arc::clone(&stop), Arc::clone(&opened));
        tasks.spawn(async move {
            loop {
                let socket = TcpSocket::new_v4().unwrap();
                socket.bind(SocketAddr::new(source, 0)).unwrap();
                let Ok(mut tcp) = socket.connect(addr).await else {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                opened.fetch_add(1, Ordering::Relaxed);
                if stop.load(Ordering::Relaxed) {
                    return tcp;
                }
                // Sends nothing; waits to be dropped (or for the flood to end), then renews.
                let mut b = [0u8; 1];
                loop {
                    tokio::select! {
                        r = tcp.read(&mut b) => if !matches!(r, Ok(1..)) { break },
                        () = tokio::time::sleep(Duration::from_millis(100)) => {
                            if stop.load(Ordering::Relaxed) {
                                return tcp;
                            }
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
    }
    let mut held = Vec::new();
    while let Some(r) = tasks.join_next().await {
        held.push(r.unwrap());
    }
    held
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_bare_connections_does_not_keep_users_out_and_leaves_no_slots_behind() {
    let h = Harness::start_with(Options {
        handshake_timeout: Some("2s"),
        limits: "max_unauthenticated = 16\nmax_connections = 64",
        ..Default::default()
    })
    .await;
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "prod-db", AccessLevel::Read, HOUR).await;
    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicU64::new(0));
    // 100 connections on each listener from 127.0.0.2, renewed as soon as they are dropped;
    // the users connect from 127.0.0.1.
    let pg_flood = tokio::spawn(flood(
        h.addrs().postgres,
        "127.0.0.2",
        100,
        Arc::clone(&stop),
        Arc::clone(&opened),
    ));
    let api_flood = tokio::spawn(flood(
        h.addrs().api,
        "127.0.0.2",
        100,
        Arc::clone(&stop),
        Arc::clone(&opened),
    ));
    eventually("the flood fills the budget", Duration::from_secs(20), || async {
        opened.load(Ordering::Relaxed) > 400
    })
    .await;
    for i in 0..8 {
        let out = h.psql(&alice, "prod-db", "SELECT 1").await;
        assert!(out.success, "try {i}: {out:?}");
        h.admin().whoami().await.expect("the API answers during the flood");
    }
    assert!(
        metric_now(
            &h,
            "jitgate_connections_refused_total{listener=\"postgres\",reason=\"evicted\"}"
        )
        .await
            > 0.0
    );

    // The flood stops renewing and abandons its last connections, open and silent.
    stop.store(true, Ordering::Relaxed);
    let abandoned = pg_flood.await.unwrap();
    let abandoned_api = api_flood.await.unwrap();
    assert_eq!(abandoned.len(), 100);
    // Their slots are free by the handshake deadline, with their sockets still open.
    for listener in ["postgres", "api"] {
        let gauge = format!("jitgate_connections_unauthenticated{{listener=\"{listener}\"}}");
        eventually("unauthenticated slots freed", Duration::from_secs(10), || async {
            metric_now(&h, &gauge).await == 0.0
        })
        .await;
    }
    assert!(h.psql(&alice, "prod-db", "SELECT 1").await.success);
    drop((abandoned, abandoned_api));
}
