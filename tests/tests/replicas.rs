//! Several replicas on one PostgreSQL store (issue 14): a real PostgreSQL cluster as the
//! store, separate from the target's, the harness's proxy as replica `a` and `jitgate serve`
//! processes as `b` and `c`, each with a data directory of its own (the same CA and keys) and
//! its own audit log.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use jitgate_tests::jitgate::client::ApiClient;
use jitgate_tests::jitgate::model::AccessLevel;
use jitgate_tests::jitgate::model::UserName;
use jitgate_tests::jitgate::pki;
use jitgate_tests::jitgate::sandbox::LocalPostgres;
use jitgate_tests::replicas::{store_cluster, store_table, Replica};
use jitgate_tests::{eventually, metric, raw, sleeping, Harness, Options};

const HOUR: Duration = Duration::from_secs(3600);
async fn cluster() -> (Harness, LocalPostgres, tempfile::TempDir) {
    cluster_with("").await
}

/// Production reads for developers, with two approvals (dba or lead).
const PROD_READ: &str = r#"
[[policies]]
name = "dev-prod-read"
roles = ["dev"]
targets = { env = "prod" }
access = ["read"]
max_duration = "1h"
approvers = ["dba", "lead"]
approvals = 2
"#;

/// A cluster whose config also has `extra` (top-level tables), on every replica.
async fn cluster_with(extra: &str) -> (Harness, LocalPostgres, tempfile::TempDir) {
    let (store, secrets) = store_cluster().await;
    let h = Harness::start_with(Options {
        store: Some(format!("{}{extra}", store_table(&store, secrets.path()))),
        ..Options::default()
    })
    .await;
    (h, store, secrets)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_grant_made_on_a_admits_on_b_and_a_revoke_on_a_cuts_a_session_on_c() {
    let (h, _store, _secrets) = cluster().await;
    let b = Replica::start(&h, "b").await;
    let c = Replica::start(&h, "c").await;
    let alice = h.user("alice", &["dev"]);
    // No grant yet: B refuses.
    let out = h
        .psql_conninfo(&h.conninfo_at(&alice, "prod-db", b.postgres), "SELECT 1")
        .await;
    assert!(!out.success);
    let made = Instant::now();
    let grant = h.grant("alice", "prod-db", AccessLevel::Read, HOUR).await;
    let at_b = h.conninfo_at(&alice, "prod-db", b.postgres);
    eventually("B admits under A's grant", Duration::from_secs(10), || async {
        h.psql_conninfo(&at_b, "SELECT 1").await.success
    })
    .await;
    eprintln!("grant on A to a session on B: {:?}", made.elapsed());
    // B and C list the grant.
    assert!(b.api.list_grants().await.unwrap().iter().any(|g| g.id == grant.id));
    // A long query on C, then a revoke on A.
    let at_c = h.conninfo_at(&alice, "prod-db", c.postgres);
    let long = {
        let at_c = at_c.clone();
        tokio::spawn(async move {
            jitgate_tests::client_command("psql")
                .arg(at_c)
                .args(["-X", "-c", "SELECT pg_sleep(60)"])
                .output()
                .await
                .unwrap()
        })
    };
    eventually("the session on C is running", Duration::from_secs(10), || async {
        c.audit()
            .iter()
            .any(|e| e["event"] == "statement" && e["text"] == "SELECT pg_sleep(60)")
    })
    .await;
    let revoked = Instant::now();
    h.admin().revoke_grant(grant.id.as_str()).await.unwrap();
    let out = tokio::time::timeout(Duration::from_secs(20), long)
        .await
        .expect("C cut the session")
        .unwrap();
    eprintln!("revoke on A to the cut on C: {:?}", revoked.elapsed());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("revoked"), "{stderr}");
    eventually("C audits the cut", Duration::from_secs(10), || async {
        c.audit()
            .iter()
            .any(|e| e["event"] == "session.end" && e["reason"] == "grant_revoked")
    })
    .await;
    // One grant.created and one grant.revoked, both on A; none on B or C.
    let count = |audit: &[serde_json::Value], kind: &str| audit.iter().filter(|e| e["event"] == kind).count();
    assert_eq!(count(&h.audit(), "grant.created"), 1);
    assert_eq!(count(&h.audit(), "grant.revoked"), 1);
    assert_eq!(
        count(&b.audit(), "grant.created") + count(&c.audit(), "grant.created"),
        0
    );
    // And C refuses new sessions.
    let out = h.psql_conninfo(&at_c, "SELECT 1").await;
    assert!(!out.success);
}

#[tokio::test(flavor = "multi_thread")]
async fn expiry_is_recorded_once_and_a_restarted_replica_catches_up() {
    let (h, _store, _secrets) = cluster().await;
    let b = Replica::start(&h, "b").await;
    let mut c = Replica::start(&h, "c").await;
    // C goes away (kill -9); grants change meanwhile.
    c.child.kill().unwrap();
    c.child.wait().unwrap();
    let short = h
        .grant("bob", "prod-db", AccessLevel::Read, Duration::from_secs(3))
        .await;
    let long = h.grant("carol", "prod-db", AccessLevel::Read, HOUR).await;
    let gone = h.grant("dave", "prod-db", AccessLevel::Read, HOUR).await;
    h.admin().revoke_grant(gone.id.as_str()).await.unwrap();
    // Every replica holds `short` and ends it at its expiry; the store lets one record it.
    eventually(
        "the short grant expired everywhere",
        Duration::from_secs(15),
        || async {
            h.admin().list_grants().await.unwrap().iter().all(|g| g.id != short.id)
                && b.api.list_grants().await.unwrap().iter().all(|g| g.id != short.id)
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let expired = |a: &[serde_json::Value]| {
        a.iter()
            .filter(|e| e["event"] == "grant.expired" && e["grant_id"] == short.id.as_str())
            .count()
    };
    assert_eq!(
        expired(&h.audit()) + expired(&b.audit()),
        1,
        "exactly one grant.expired"
    );
    // C restarts with the same data directory and catches up from the store.
    let c2 = Replica::start(&h, "c").await;
    drop(c);
    let listed = c2.api.list_grants().await.unwrap();
    assert!(listed.iter().any(|g| g.id == long.id), "{listed:?}");
    assert!(listed.iter().all(|g| g.id != gone.id && g.id != short.id), "{listed:?}");
    let carol = h.user("carol", &["dev"]);
    let out = h
        .psql_conninfo(&h.conninfo_at(&carol, "prod-db", c2.postgres), "SELECT 1")
        .await;
    assert!(out.success, "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread")]
async fn config_check_says_whether_the_store_answers() {
    let (h, store, _secrets) = cluster().await;
    let ok = jitgate_tests::run_jitgate(&["config", "check", &h.config_path().display().to_string()], &[]).await;
    assert!(ok.ok, "{ok:?}");
    assert!(ok.stdout.contains("store"), "{}", ok.stdout);
    // A wrong password: the check names the store.
    let bad = h.data_dir().join("bad.toml");
    let text = std::fs::read_to_string(h.config_path()).unwrap();
    let wrong = h.data_dir().join("wrong.password");
    pki::write_file(&wrong, "nope", true).unwrap();
    let text = text.replace(
        &format!(
            "password_file = \"{}\"",
            _secrets.path().join("store.password").display()
        ),
        &format!("password_file = \"{}\"", wrong.display()),
    );
    std::fs::write(&bad, text).unwrap();
    let out = jitgate_tests::run_jitgate(&["config", "check", &bad.display().to_string()], &[]).await;
    assert!(!out.ok);
    assert!(out.stderr.contains("store"), "{}", out.stderr);
    drop(store);
}

/// A raw mTLS session of `user` to `prod-db` on `port`, logged in: the stream and the
/// proxy-issued cancel key.
async fn raw_session(
    h: &Harness,
    user: &jitgate_tests::UserCert,
    port: u16,
) -> (impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin, (i32, i32)) {
    use jitgate_protocol::postgres::backend::BackendMessage;
    let cfg = raw::client_config(h.data_dir(), Some(user), None);
    let mut s = raw::ssl_request_tls(([127, 0, 0, 1], port).into(), cfg).await.unwrap();
    raw::send_startup(&mut s, &[("user", user.user.as_str()), ("database", "prod-db")]).await;
    let key = raw::read_until_ready(&mut s)
        .await
        .iter()
        .find_map(|m| match m.decoded {
            BackendMessage::BackendKeyData { process_id, secret_key } => Some((process_id, secret_key)),
            _ => None,
        })
        .expect("BackendKeyData");
    (s, key)
}

/// A CancelRequest to the replica listening on `port`, as psql sends it (plain TCP).
async fn send_cancel(port: u16, (process_id, secret_key): (i32, i32)) {
    use tokio::io::AsyncWriteExt as _;
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tcp.write_all(&jitgate_protocol::postgres::frontend::encode_cancel(
        process_id, secret_key,
    ))
    .await
    .unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut sink),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_sent_to_b_reaches_c_and_sessions_are_listed_and_killed_across_replicas() {
    let (h, _store, _secrets) = cluster().await;
    let b = Replica::start(&h, "b").await;
    let c = Replica::start(&h, "c").await;
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "prod-db", AccessLevel::Read, HOUR).await;
    eventually("C holds the grant", Duration::from_secs(10), || async {
        !c.api.list_grants().await.unwrap().is_empty()
    })
    .await;
    let (mut s, key) = raw_session(&h, &alice, c.postgres).await;
    raw::send_query(&mut s, "SELECT pg_sleep(60)").await;
    eventually("pg_sleep running", Duration::from_secs(20), || async {
        sleeping(&h) == 1
    })
    .await;
    // A forged secret sent to B cancels nothing, on any replica.
    send_cancel(b.postgres, (key.0, key.1.wrapping_add(1))).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(sleeping(&h), 1, "a forged key must not cancel anything");
    // The right key, sent to B (as a load balancer may route psql's cancel connection).
    send_cancel(b.postgres, key).await;
    let msgs = tokio::time::timeout(Duration::from_secs(20), raw::read_until_ready(&mut s))
        .await
        .expect("the query on C was cancelled");
    assert_eq!(raw::error_of(&msgs).expect("an ErrorResponse").0, "57014", "{msgs:?}");
    let (_, b_metrics) = b.metrics_get("/metrics").await;
    assert_eq!(
        metric(&b_metrics, "jitgate_cancel_requests_total{outcome=\"passed_on\"}"),
        2.0
    );
    eventually("C forwarded it", Duration::from_secs(10), || async {
        let (_, body) = c.metrics_get("/metrics").await;
        metric(&body, "jitgate_cancel_requests_total{outcome=\"forwarded\"}") == 1.0
    })
    .await;
    // The session is still usable, and A lists it with its replica.
    raw::send_query(&mut s, "SELECT 1").await;
    let after = raw::read_until_ready(&mut s).await;
    assert!(after.iter().any(|m| m.tag == b'D'), "{after:?}");
    let on_c = eventually_value("A lists the session on C", Duration::from_secs(10), || async {
        h.admin()
            .list_sessions()
            .await
            .unwrap()
            .into_iter()
            .find(|s| s.replica.as_deref() == Some("c") && s.user.as_str() == "alice")
    })
    .await;
    // The CLI shows the replica column.
    let root = h.user("root", &["admin"]);
    let listed = h.cli_as(&root, &["session", "list"]).await;
    assert!(listed.ok, "{listed:?}");
    assert!(listed.stdout.contains("REPLICA"), "{}", listed.stdout);
    let line = listed
        .stdout
        .lines()
        .find(|l| l.contains(on_c.id.as_str()))
        .unwrap_or_else(|| panic!("{}", listed.stdout));
    assert!(line.split_whitespace().nth(1) == Some("c"), "{line}");
    // A kill made on A cuts the session on C.
    let killed = h.admin().kill_session(on_c.id.as_str()).await.unwrap();
    assert_eq!(killed.replica.as_deref(), Some("c"));
    let cut = tokio::time::timeout(Duration::from_secs(10), raw::read_until_ready(&mut s))
        .await
        .expect("C cut the session");
    assert!(raw::error_of(&cut).is_some(), "{cut:?}");
    eventually("C audits the kill", Duration::from_secs(10), || async {
        c.audit()
            .iter()
            .any(|e| e["event"] == "session.end" && e["session_id"] == on_c.id.as_str() && e["reason"] == "killed")
    })
    .await;
    // An unknown session is not found anywhere.
    let err = h.admin().kill_session("s-0000000000000000").await.unwrap_err();
    assert!(err.to_string().contains("no live session"), "{err}");
}

/// Polls `check` until it gives a value.
async fn eventually_value<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_store_down_replicas_enforce_what_they_hold_and_converge_after() {
    let (h, mut store, _secrets) = cluster_with(PROD_READ).await;
    let b = Replica::start(&h, "b").await;
    let alice = h.user("alice", &["dev"]);
    let bob = h.user("bob", &["dev"]);
    h.grant("alice", "prod-db", AccessLevel::Read, HOUR).await;
    let short = h
        .grant("bob", "prod-db", AccessLevel::Read, Duration::from_secs(12))
        .await;
    eventually("B holds both grants", Duration::from_secs(10), || async {
        b.api.list_grants().await.unwrap().len() == 2
    })
    .await;
    let at_b = |u: &jitgate_tests::UserCert| h.conninfo_at(u, "prod-db", b.postgres);
    let long = {
        let conninfo = at_b(&bob);
        tokio::spawn(async move {
            jitgate_tests::client_command("psql")
                .arg(conninfo)
                .args(["-X", "-c", "SELECT pg_sleep(60)"])
                .output()
                .await
                .unwrap()
        })
    };
    eventually("bob's query runs on B", Duration::from_secs(10), || async {
        sleeping(&h) == 1
    })
    .await;
    let (_, ready) = b.metrics_get("/readyz").await;
    assert_eq!(ready.trim(), "ready");

    store.pause();
    eventually("B reports degraded", Duration::from_secs(15), || async {
        b.metrics_get("/readyz").await.1.starts_with("degraded: ")
    })
    .await;
    let (status, body) = b.metrics_get("/readyz").await;
    assert!(status.contains("200"), "{status}");
    assert!(body.contains("unreachable") || body.contains("no answer"), "{body}");
    let (_, m) = b.metrics_get("/metrics").await;
    assert_eq!(metric(&m, "jitgate_store_up"), 0.0);
    // New grants and requests are refused with the clear error; the CLI says so too.
    let err = b
        .api
        .create_grant(&jitgate_tests::jitgate::model::NewGrant {
            user: UserName::new("carol").unwrap(),
            target: jitgate_tests::jitgate::model::TargetName::new("prod-db").unwrap(),
            access: AccessLevel::Read,
            duration_secs: 600,
            reason: "during the outage".into(),
        })
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("503") && text.contains("the store is unreachable"),
        "{text}"
    );
    let cli = h
        .cli_as(
            &alice,
            &[
                "request", "prod-db", "--access", "read", "--for", "30m", "--reason", "outage",
            ],
        )
        .await;
    assert!(!cli.ok);
    assert!(cli.stderr.contains("the store is unreachable"), "{cli:?}");
    // A new session under a grant held in memory still works, on A and on B.
    let out = h.psql_conninfo(&at_b(&alice), "SELECT 1").await;
    assert!(out.success, "{}", out.stderr);
    let out = h.psql(&alice, "prod-db", "SELECT 1").await;
    assert!(out.success, "{}", out.stderr);
    // Bob's grant ends while the store is down: B still cuts his session at expiry.
    let out = tokio::time::timeout(Duration::from_secs(30), long)
        .await
        .expect("cut at expiry")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("expired"), "{stderr}");
    let out = h.psql_conninfo(&at_b(&bob), "SELECT 1").await;
    assert!(!out.success, "a session after expiry");

    // The store comes back: both replicas converge, one grant.expired is written.
    let resumed = Instant::now();
    let store = tokio::task::spawn_blocking(move || {
        store.resume().expect("the store starts again");
        store
    })
    .await
    .unwrap();
    eprintln!("store resumed on {} in {:?}", store.address(), resumed.elapsed());
    let deadline = Instant::now() + Duration::from_secs(20);
    while b.metrics_get("/readyz").await.1.trim() != "ready" {
        assert!(
            Instant::now() < deadline,
            "B not ready again: {:?}\n{}",
            b.metrics_get("/readyz").await,
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let expired = |a: &[serde_json::Value]| {
        a.iter()
            .filter(|e| e["event"] == "grant.expired" && e["grant_id"] == short.id.as_str())
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while expired(&h.audit()) + expired(&b.audit()) != 1 {
        assert!(
            Instant::now() < deadline,
            "no grant.expired stored: {:?} {:?}\n{}",
            store.sql("jitgate", "SELECT id, expires_at, ended_at, end_reason FROM grants"),
            h.audit()
                .iter()
                .filter(|e| e["event"] != "statement")
                .collect::<Vec<_>>(),
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        expired(&h.audit()) + expired(&b.audit()),
        1,
        "exactly one grant.expired"
    );
    // New grants work again and reach the other replica.
    let carol = h.grant("carol", "prod-db", AccessLevel::Read, HOUR).await;
    eventually("B holds carol's grant", Duration::from_secs(10), || async {
        b.api.list_grants().await.unwrap().iter().any(|g| g.id == carol.id)
    })
    .await;
    // Both audit logs verify.
    for file in [h.data_dir().join("audit.jsonl"), b.dir.path().join("audit.jsonl")] {
        let out = jitgate_tests::run_jitgate(&["audit", "verify", "--file", &file.display().to_string()], &[]).await;
        assert!(out.ok, "{out:?}");
    }
}

/// A webhook receiver on 127.0.0.1:0 that records the `X-Jitgate-Event` of every POST and
/// answers 200.
async fn webhook_receiver() -> (std::net::SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = std::sync::Arc::clone(&events);
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let seen = std::sync::Arc::clone(&seen);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let head_end = loop {
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap_or(0));
                while buf.len() < head_end + len {
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                if let Some(event) = head.lines().find_map(|l| l.strip_prefix("x-jitgate-event:")) {
                    seen.lock().unwrap().push(event.trim().to_owned());
                }
                let _ = conn
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
            });
        }
    });
    (addr, events)
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_racing_on_approve_and_lapse_produce_one_effect_each() {
    let (hook, events) = webhook_receiver().await;
    let hook_secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(hook_secret.path(), "hook-secret\n").unwrap();
    let extra = format!(
        "[requests]\nlapse_after = \"4s\"\n{PROD_READ}\n[[webhooks]]\nname = \"security\"\nurl = \"http://{hook}/hooks\"\nsecret_file = \"{}\"\n",
        hook_secret.path().display()
    );
    let (h, _store, _secrets) = cluster_with(&extra).await;
    let b = Replica::start(&h, "b").await;
    let alice = h.user("alice", &["dev"]);
    let dba = h.user("dana", &["dba"]);
    let lead = h.user("leo", &["lead"]);
    let new = |reason: &str| jitgate_tests::jitgate::model::NewRequest {
        target: "prod-db".into(),
        access: AccessLevel::Read,
        duration_secs: 1800,
        reason: reason.into(),
        break_glass: false,
    };
    let api_b = |u: &jitgate_tests::UserCert| ApiClient::from_files(&b.api_addr(), &u.cert, &u.key, &u.ca).unwrap();
    let approved = h.api_as(&alice).create_request(&new("race approve")).await.unwrap();
    let lapses = h.api_as(&alice).create_request(&new("left to lapse")).await.unwrap();
    // The first approval, then the second approver on A and on B at once, and again.
    h.api_as(&dba)
        .approve_request(approved.id.as_str(), None)
        .await
        .unwrap();
    let (lead_a, lead_b) = (h.api_as(&lead), api_b(&lead));
    let (on_a, on_b) = tokio::join!(
        lead_a.approve_request(approved.id.as_str(), None),
        lead_b.approve_request(approved.id.as_str(), None)
    );
    assert!(
        on_a.is_ok() != on_b.is_ok(),
        "exactly one approval wins: {on_a:?} {on_b:?}"
    );
    // Both lapsers see the other request due; one lapses it.
    eventually("the request lapsed", Duration::from_secs(20), || async {
        h.admin()
            .get_request(lapses.id.as_str())
            .await
            .unwrap()
            .state
            .to_string()
            == "lapsed"
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let count = |kind: &str, key: &str, id: &str| {
        h.audit()
            .iter()
            .chain(b.audit().iter())
            .filter(|e| e["event"] == kind && e.pointer(key).and_then(|v| v.as_str()) == Some(id))
            .count()
    };
    assert_eq!(count("request.lapsed", "/request/id", lapses.id.as_str()), 1);
    let grants: Vec<_> = h
        .admin()
        .list_grants()
        .await
        .unwrap()
        .into_iter()
        .filter(|g| g.user.as_str() == "alice")
        .collect();
    assert_eq!(grants.len(), 1, "{grants:?}");
    assert_eq!(count("grant.created", "/grant/id", grants[0].id.as_str()), 1);
    // One webhook delivery per event across the cluster (both replicas have the webhook).
    let sent = |kind: &str| events.lock().unwrap().iter().filter(|e| *e == kind).count();
    eventually("the webhooks arrived", Duration::from_secs(15), || async {
        sent("request.decided") >= 2 && sent("grant.started") >= 1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(sent("request.created"), 2, "{:?}", events.lock().unwrap());
    assert_eq!(sent("request.decided"), 2, "{:?}", events.lock().unwrap());
    assert_eq!(sent("grant.started"), 1, "{:?}", events.lock().unwrap());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_three_replica_example_checks_against_a_real_store() {
    let (h, store, secrets) = cluster().await;
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/replicas/jitgate.toml");
    let tmp = tempfile::tempdir().unwrap();
    let etc = tmp.path().join("etc");
    std::fs::create_dir_all(etc.join("secrets")).unwrap();
    let text = std::fs::read_to_string(&example)
        .unwrap()
        .replace("/var/lib/jitgate", &h.data_dir().display().to_string())
        .replace("/etc/jitgate", &etc.display().to_string())
        .replace("store.internal:5432", &store.address())
        .replace("tls = { mode = \"verify-full\", ca_file = ", "# tls = ");
    for line in text.lines().map(str::trim) {
        if let Some(file) = line
            .strip_prefix("password_file = \"")
            .and_then(|v| v.strip_suffix('"'))
        {
            std::fs::write(file, "secret\n").unwrap();
        }
        if let Some(file) = line.strip_prefix("ca_file = \"").and_then(|v| v.strip_suffix('"')) {
            std::fs::copy(h.data_dir().join("ca.crt"), file).unwrap();
        }
    }
    std::fs::copy(secrets.path().join("store.password"), etc.join("secrets/store")).unwrap();
    let copy = tmp.path().join("jitgate.toml");
    std::fs::write(&copy, &text).unwrap();
    let out = jitgate_tests::run_jitgate(&["config", "check", &copy.display().to_string()], &[]).await;
    assert!(out.ok, "{out:?}\n{text}");
    assert!(out.stdout.contains("store"), "{}", out.stdout);
}

/// A TCP relay to `upstream` that can be frozen: while frozen it moves no bytes either way
/// and forwards no new connection, as a partition that drops packets would (connections stay
/// open, nothing answers).
async fn freezable_relay(upstream: String) -> (u16, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let frozen = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let f = std::sync::Arc::clone(&frozen);
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let f = std::sync::Arc::clone(&f);
            let upstream = upstream.clone();
            tokio::spawn(async move {
                while f.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let pipe = |f: std::sync::Arc<std::sync::atomic::AtomicBool>| {
                    move |mut r: tokio::net::tcp::OwnedReadHalf, mut w: tokio::net::tcp::OwnedWriteHalf| async move {
                        let mut buf = vec![0u8; 16384];
                        loop {
                            let n = match r.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            while f.load(Ordering::Relaxed) {
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                            if w.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                };
                let up = pipe(std::sync::Arc::clone(&f));
                let down = pipe(f);
                tokio::join!(up(cr, sw), down(sr, cw));
            });
        }
    });
    (port, frozen)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_that_stops_answering_fails_writes_within_the_bound_and_recovers() {
    use std::sync::atomic::Ordering;
    let (store, secrets) = store_cluster().await;
    let (relay, frozen) = freezable_relay(store.address()).await;
    let table = store_table(&store, secrets.path()).replace(&store.address(), &format!("127.0.0.1:{relay}"));
    let h = Harness::start_with(Options {
        store: Some(table),
        ..Options::default()
    })
    .await;
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "prod-db", AccessLevel::Read, HOUR).await;
    frozen.store(true, Ordering::Relaxed);
    // A write waits at most the store's bound, then fails with the clear error: never a hang.
    let new = jitgate_tests::jitgate::model::NewGrant {
        user: UserName::new("bob").unwrap(),
        target: jitgate_tests::jitgate::model::TargetName::new("prod-db").unwrap(),
        access: AccessLevel::Read,
        duration_secs: 600,
        reason: "partition".into(),
    };
    let err = tokio::time::timeout(Duration::from_secs(30), h.admin().create_grant(&new))
        .await
        .expect("the API answered while the store is silent")
        .unwrap_err();
    assert!(err.to_string().contains("the store is unreachable"), "{err}");
    eventually("A reports degraded", Duration::from_secs(20), || async {
        h.metrics_get("/readyz").await.1.starts_with("degraded: ")
    })
    .await;
    // Sessions under the grant held go on.
    let out = h.psql(&alice, "prod-db", "SELECT 1").await;
    assert!(out.success, "{}", out.stderr);
    frozen.store(false, Ordering::Relaxed);
    eventually("A ready again", Duration::from_secs(30), || async {
        h.metrics_get("/readyz").await.1.trim() == "ready"
    })
    .await;
    let made = tokio::time::timeout(Duration::from_secs(30), h.admin().create_grant(&new))
        .await
        .expect("answered");
    assert!(made.is_ok(), "{made:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_extension_made_on_a_keeps_a_session_on_b_past_the_old_end() {
    let (h, _store, _secrets) = cluster().await;
    let b = Replica::start(&h, "b").await;
    let alice = h.user("alice", &["dev"]);
    let grant = h
        .grant("alice", "prod-db", AccessLevel::Read, Duration::from_secs(6))
        .await;
    let at_b = h.conninfo_at(&alice, "prod-db", b.postgres);
    eventually("B admits under A's grant", Duration::from_secs(10), || async {
        h.psql_conninfo(&at_b, "SELECT 1").await.success
    })
    .await;
    let started = Instant::now();
    let long = {
        let at_b = at_b.clone();
        tokio::spawn(async move {
            jitgate_tests::client_command("psql")
                .arg(at_b)
                .args(["-X", "-c", "SELECT pg_sleep(12)"])
                .output()
                .await
                .unwrap()
        })
    };
    eventually("the query runs on B", Duration::from_secs(10), || async {
        sleeping(&h) == 1
    })
    .await;
    h.admin().extend_grant(grant.id.as_str(), HOUR).await.unwrap();
    let out = tokio::time::timeout(Duration::from_secs(40), long)
        .await
        .expect("the query ended")
        .unwrap();
    assert!(
        out.status.success(),
        "cut at the old end after {:?}: {}",
        started.elapsed(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(started.elapsed() >= Duration::from_secs(6), "ran past the old end");
    // B holds the new end.
    let on_b = b.api.list_grants().await.unwrap();
    let held = on_b.iter().find(|g| g.id == grant.id).expect("B lists the grant");
    assert!(
        held.expires_at > grant.expires_at + Duration::from_secs(3000),
        "{held:?}"
    );
}
