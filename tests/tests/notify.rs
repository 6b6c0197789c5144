//! Webhook notifications end to end: a local HTTP receiver gets grant.started and grant.ended
//! with valid signatures; a dead endpoint delays nothing; a failing endpoint gets the delivery
//! on retry.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, Mac};
use jitgate_tests::jitgate::model::AccessLevel;
use jitgate_tests::{eventually, metric, Harness};
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const SECRET: &str = "webhook-test-secret";

#[derive(Debug, Clone)]
struct Received {
    path: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl Received {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

type Log = Arc<Mutex<Vec<Received>>>;

/// An HTTP/1.1 receiver on 127.0.0.1:0 that records every request and answers the n-th one
/// with `statuses[n]` (200 once the list is used up).
async fn receiver(statuses: Vec<u16>) -> (SocketAddr, Log) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log: Log = Arc::default();
    let seen = Arc::clone(&log);
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let head_end = loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break Some(i + 4);
                }
                match conn.read(&mut chunk).await {
                    Ok(0) | Err(_) => break None,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            };
            let Some(head_end) = head_end else { continue };
            let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
            let mut lines = head.lines();
            let path = lines
                .next()
                .unwrap_or_default()
                .split(' ')
                .nth(1)
                .unwrap_or_default()
                .to_owned();
            let headers: HashMap<String, String> = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                .collect();
            let len: usize = headers.get("content-length").map_or(0, |v| v.parse().unwrap());
            while buf.len() < head_end + len {
                match conn.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let body = buf[head_end..].to_vec();
            let status = {
                let mut log = seen.lock().unwrap();
                log.push(Received { path, headers, body });
                statuses.get(log.len() - 1).copied().unwrap_or(200)
            };
            let reply = format!("HTTP/1.1 {status} X\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
            let _ = conn.write_all(reply.as_bytes()).await;
            let _ = conn.shutdown().await;
        }
    });
    (addr, log)
}

fn sign(body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(body);
    let hex: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

fn of_kind(log: &Log, kind: &str) -> Vec<Received> {
    log.lock()
        .unwrap()
        .iter()
        .filter(|r| r.headers.get("x-jitgate-event").map(String::as_str) == Some(kind))
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn webhooks_are_signed_retried_and_never_block_grants() {
    let mut h = Harness::start().await;
    let (good, good_log) = receiver(vec![]).await;
    let (flaky, flaky_log) = receiver(vec![500]).await;
    let (chat, chat_log) = receiver(vec![]).await;
    // A port with nothing behind it.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let secret_file = h.data_dir().join("webhook.secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    let s = secret_file.display().to_string();
    h.reconfigure(&format!(
        r#"
[[webhooks]]
name = "dead"
url = "http://{dead}/hooks"
secret_file = "{s}"
timeout = "1s"
max_attempts = 2

[[webhooks]]
name = "security"
url = "http://{good}/hooks/jitgate"
events = ["grant.started", "grant.ended"]
secret_file = "{s}"

[[webhooks]]
name = "flaky"
url = "http://{flaky}/"
events = ["grant.started"]
secret_file = "{s}"

[[webhooks]]
name = "chat"
url = "http://{chat}/services/T0/B0"
events = ["grant.started"]
format = "slack"
"#
    ))
    .await;

    let grant = tokio::time::timeout(
        Duration::from_secs(10),
        h.grant("alice", "prod-db", AccessLevel::Read, Duration::from_secs(1800)),
    )
    .await
    .expect("grant creation returned within 10 s while the dead webhook retries");
    tokio::time::timeout(Duration::from_secs(10), h.admin().revoke_grant(grant.id.as_str()))
        .await
        .expect("revocation returned within 10 s")
        .unwrap();

    eventually(
        "grant.started and grant.ended delivered",
        Duration::from_secs(20),
        || async { !of_kind(&good_log, "grant.started").is_empty() && !of_kind(&good_log, "grant.ended").is_empty() },
    )
    .await;
    let started = &of_kind(&good_log, "grant.started")[0];
    let ended = &of_kind(&good_log, "grant.ended")[0];
    for r in [started, ended] {
        assert_eq!(r.path, "/hooks/jitgate");
        assert_eq!(r.headers["content-type"], "application/json");
        assert_eq!(r.headers["x-jitgate-signature"], sign(&r.body), "{r:?}");
        assert_eq!(r.headers["x-jitgate-delivery"].len(), 32);
    }
    assert_ne!(
        started.headers["x-jitgate-delivery"],
        ended.headers["x-jitgate-delivery"]
    );
    let (s, e) = (started.json(), ended.json());
    assert_eq!(s["kind"], "grant.started");
    assert_eq!(s["data"]["id"], grant.id.as_str());
    assert_eq!(s["data"]["user"], "alice");
    assert_eq!(s["data"]["access"], "read");
    assert_eq!(s["data"]["reason"], "e2e test");
    assert_eq!(e["kind"], "grant.ended");
    assert_eq!(e["data"]["id"], grant.id.as_str());
    assert_eq!(e["data"]["end_reason"], "revoked");
    assert_eq!(e["data"]["revoked_by"], "admin");
    assert_eq!(good_log.lock().unwrap().len(), 2, "in order, once each");

    // 500 first, then 200: the same delivery, retried after the backoff.
    eventually("flaky webhook retried", Duration::from_secs(20), || async {
        flaky_log.lock().unwrap().len() >= 2
    })
    .await;
    let tries = flaky_log.lock().unwrap().clone();
    assert_eq!(tries.len(), 2, "only grant.started, delivered on the second attempt");
    assert_eq!(tries[0].body, tries[1].body);
    assert_eq!(
        tries[0].headers["x-jitgate-delivery"],
        tries[1].headers["x-jitgate-delivery"]
    );
    assert_eq!(tries[1].headers["x-jitgate-signature"], sign(&tries[1].body));

    // The Slack format: one text line, no signature.
    eventually("slack delivery", Duration::from_secs(20), || async {
        !chat_log.lock().unwrap().is_empty()
    })
    .await;
    let slack = chat_log.lock().unwrap()[0].clone();
    assert!(!slack.headers.contains_key("x-jitgate-signature"));
    let text = slack.json()["text"].as_str().unwrap().to_owned();
    assert_eq!(
        text,
        format!(
            ":unlock: alice got read access to prod-db for 30m (grant {}): e2e test",
            grant.id
        )
    );

    eventually("outcomes counted", Duration::from_secs(20), || async {
        let (_, body) = h.metrics_get("/metrics").await;
        metric(
            &body,
            "jitgate_webhook_deliveries_total{outcome=\"delivered\",webhook=\"security\"}",
        ) == 2.0
            && metric(
                &body,
                "jitgate_webhook_deliveries_total{outcome=\"delivered\",webhook=\"flaky\"}",
            ) == 1.0
            && metric(
                &body,
                "jitgate_webhook_deliveries_total{outcome=\"failed\",webhook=\"dead\"}",
            ) == 2.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn request_webhooks_fire_and_a_dead_endpoint_delays_no_decision() {
    let mut h = Harness::start().await;
    let (good, good_log) = receiver(vec![]).await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let secret_file = h.data_dir().join("webhook.secret");
    std::fs::write(&secret_file, SECRET).unwrap();
    let s = secret_file.display().to_string();
    h.reconfigure(&format!(
        r#"
[[policies]]
name = "dev-prod-read"
roles = ["dev"]
targets = {{ env = "prod" }}
access = ["read"]
max_duration = "1h"
approvers = ["dba"]
approvals = 1
break_glass = true

[[webhooks]]
name = "dead"
url = "http://{dead}/hooks"
secret_file = "{s}"
timeout = "2s"
max_attempts = 5

[[webhooks]]
name = "reviews"
url = "http://{good}/hooks"
events = ["request.created", "request.decided", "break_glass"]
secret_file = "{s}"
"#
    ))
    .await;
    let alice = h.user("alice", &["dev"]);
    let carol = h.user("carol", &["dba"]);
    let within = |what: &'static str| move |_| panic!("{what} took longer than 10 s");

    let ask = |break_glass: bool| jitgate_tests::jitgate::model::NewRequest {
        target: "prod-db".into(),
        access: AccessLevel::Read,
        duration_secs: 600,
        reason: "INC-9".into(),
        break_glass,
    };
    let filed = tokio::time::timeout(Duration::from_secs(10), h.api_as(&alice).create_request(&ask(false)))
        .await
        .unwrap_or_else(within("filing"))
        .unwrap();
    let approved = tokio::time::timeout(
        Duration::from_secs(10),
        h.api_as(&carol).approve_request(filed.id.as_str(), None),
    )
    .await
    .unwrap_or_else(within("approving"))
    .unwrap();
    let glass = tokio::time::timeout(Duration::from_secs(10), h.api_as(&alice).create_request(&ask(true)))
        .await
        .unwrap_or_else(within("break-glass"))
        .unwrap();
    assert!(glass.break_glass && approved.grant_id.is_some());

    eventually("request webhooks delivered", Duration::from_secs(20), || async {
        good_log.lock().unwrap().len() >= 4
    })
    .await;
    for r in good_log.lock().unwrap().iter() {
        assert_eq!(r.headers["x-jitgate-signature"], sign(&r.body), "{r:?}");
    }
    let created = of_kind(&good_log, "request.created");
    assert_eq!(created.len(), 1, "break-glass announces itself as break_glass");
    assert_eq!(created[0].json()["data"]["id"], filed.id.as_str());
    assert_eq!(created[0].json()["data"]["state"], "pending");
    let decided: Vec<serde_json::Value> = of_kind(&good_log, "request.decided")
        .iter()
        .map(Received::json)
        .collect();
    let mine = decided.iter().find(|d| d["data"]["id"] == filed.id.as_str()).unwrap();
    assert_eq!(mine["data"]["state"], "approved");
    assert_eq!(mine["data"]["decided_by"], "carol");
    assert_eq!(mine["data"]["grant_id"], approved.grant_id.as_ref().unwrap().as_str());
    let glass_hook = of_kind(&good_log, "break_glass");
    assert_eq!(glass_hook.len(), 1);
    let g = glass_hook[0].json();
    assert_eq!(g["data"]["id"], glass.id.as_str());
    assert_eq!(g["data"]["user"], "alice");
    assert_eq!(g["data"]["reason"], "INC-9");
    assert_eq!(g["data"]["grant_id"], glass.grant_id.as_ref().unwrap().as_str());
}
