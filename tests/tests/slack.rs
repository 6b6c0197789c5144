//! Approvals from Slack, end to end: a pending request is posted (Block Kit, checked against
//! its shape) to a local fake of Slack's Web API; signed interaction payloads in Slack's
//! format are sent to the running proxy's `POST /v1/slack/interactions`. A linked approver's
//! Approve is applied (psql then gets in) and the message is updated in place; a bad
//! signature, an old timestamp, an unlinked user, a self-approval, a replayed payload, a link
//! confirmed by another Slack user and a click on a console-only policy are each refused.
//! Nothing outside loopback is called.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use jitgate_tests::{eventually, Harness};
use serde_json::{json, Value};

const SIGNING: &str = "8f742231b10e8888abcd99yyyzzz85a5";
const BOT: &str = "xoxb-test-bot-token";
const TEAM: &str = "T0JITGATE";
const CHANNEL: &str = "C0APPROVALS";

/// One call the bot made: the Web API method, its Authorization header and JSON body.
#[derive(Debug, Clone)]
struct Call {
    method: String,
    auth: String,
    body: Value,
}

/// Slack's Web API, as far as the bot uses it: records each call and answers `ok`.
struct FakeSlack {
    addr: SocketAddr,
    calls: Mutex<Vec<Call>>,
    /// Answer this many more calls with HTTP 503 (recorded all the same).
    fail_next: AtomicUsize,
    /// Never answer (until the connection is dropped).
    hang: AtomicBool,
}

impl FakeSlack {
    async fn start() -> Arc<FakeSlack> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fake = Arc::new(FakeSlack {
            addr: listener.local_addr().unwrap(),
            calls: Mutex::new(Vec::new()),
            fail_next: AtomicUsize::new(0),
            hang: AtomicBool::new(false),
        });
        let server = Arc::clone(&fake);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let fake = Arc::clone(&server);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let fake = Arc::clone(&fake);
                        async move { Ok::<_, Infallible>(fake.answer(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        fake
    }

    async fn answer(&self, req: hyper::Request<hyper::body::Incoming>) -> hyper::Response<Full<bytes::Bytes>> {
        let method = req.uri().path().trim_start_matches("/api/").to_owned();
        let auth = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let bytes = req.into_body().collect().await.unwrap().to_bytes();
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let channel = body["channel"].clone();
        let n = {
            let mut calls = self.calls.lock().unwrap();
            calls.push(Call { method, auth, body });
            calls.len()
        };
        if self.hang.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        let failing = self
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |f| f.checked_sub(1))
            .is_ok();
        if failing {
            return hyper::Response::builder()
                .status(503)
                .body(Full::new(bytes::Bytes::from_static(b"upstream connect error")))
                .unwrap();
        }
        let answer = json!({"ok": true, "channel": channel, "ts": format!("1700000000.{n:06}")});
        hyper::Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(bytes::Bytes::from(answer.to_string())))
            .unwrap()
    }

    fn calls(&self, method: &str) -> Vec<Call> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.method == method)
            .cloned()
            .collect()
    }

    /// Waits for the `n`th call of `method` (1-based) and returns it.
    async fn nth(&self, method: &str, n: usize) -> Call {
        eventually(&format!("{n} {method} calls"), Duration::from_secs(10), || async {
            self.calls(method).len() >= n
        })
        .await;
        self.calls(method)[n - 1].clone()
    }
}

async fn start(slack: &FakeSlack) -> Harness {
    std::env::set_var("JITGATE_TEST_SLACK_SIGNING", SIGNING);
    std::env::set_var("JITGATE_TEST_SLACK_BOT", BOT);
    let mut h = Harness::start().await;
    h.reconfigure(&format!(
        r#"
[slack]
signing_secret_env = "JITGATE_TEST_SLACK_SIGNING"
bot_token_env = "JITGATE_TEST_SLACK_BOT"
api_url = "http://{}/api"
console_url = "https://jitgate.example.test/ui"

[[policies]]
name = "prod-in-slack"
roles = ["dev"]
targets = {{ env = "prod" }}
access = ["read"]
max_duration = "1h"
approvers = ["dba"]
approvals = 1
slack_channel = "{CHANNEL}"

[[policies]]
name = "prod-in-console"
roles = ["ops"]
targets = {{ env = "prod" }}
access = ["read"]
max_duration = "1h"
approvers = ["dba"]
approvals = 1
slack_channel = "{CHANNEL}"
approve_in_chat = false

[[policies]]
name = "prod-two-approvers"
roles = ["qa"]
targets = {{ env = "prod" }}
access = ["read"]
max_duration = "1h"
approvers = ["dba"]
approvals = 2
slack_channel = "{CHANNEL}"
"#,
        slack.addr
    ))
    .await;
    h
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn percent(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A `block_actions` interaction as Slack sends it: the form body.
fn payload(slack_user: &str, action: &str, value: &str, message_ts: &str) -> String {
    // Slack gives every click its own trigger_id and action_ts.
    static CLICKS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let n = CLICKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let p = json!({
        "type": "block_actions",
        "user": {"id": slack_user, "username": slack_user.to_lowercase(), "team_id": TEAM},
        "api_app_id": "A0JITGATE",
        "token": "legacy-verification-token",
        "team": {"id": TEAM, "domain": "example"},
        "container": {"type": "message", "message_ts": message_ts, "channel_id": CHANNEL, "is_ephemeral": false},
        "trigger_id": format!("123.{n}.abc"),
        "channel": {"id": CHANNEL, "name": "approvals"},
        "response_url": "https://hooks.slack.invalid/actions/T0/1/x",
        "actions": [{"action_id": action, "block_id": "jitgate-decide", "value": value,
                     "type": "button", "action_ts": format!("1700000001.{n:06}")}],
    });
    format!("payload={}", percent(&p.to_string()))
}

/// Slack's `X-Slack-Signature`, computed here independently of the proxy.
fn sign(secret: &str, ts: &str, body: &str) -> String {
    use hmac::Mac as _;
    let mut mac = <hmac::Hmac<sha2::Sha256>>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("v0:{ts}:{body}").as_bytes());
    let digest = mac.finalize().into_bytes();
    format!("v0={}", digest.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// POSTs `body` to `/v1/slack/interactions` over TLS without a client certificate, as Slack
/// does: (status, JSON answer).
async fn deliver(h: &Harness, ts: &str, signature: &str, body: &str) -> (u16, Value) {
    let ca = std::fs::read(h.data_dir().join("ca.crt")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::pem::PemObject::pem_slice_iter(&ca) {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(h.addrs().api).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::post("/v1/slack/interactions")
        .header("host", "localhost")
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-slack-request-timestamp", ts)
        .header("x-slack-signature", signature)
        .body(Full::new(bytes::Bytes::from(body.to_owned())))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// Signs `body` now and delivers it.
async fn click(h: &Harness, body: &str) -> (u16, Value) {
    let ts = unix_now().to_string();
    deliver(h, &ts, &sign(SIGNING, &ts, body), body).await
}

/// Checks `message` has the Block Kit shape Slack accepts for the blocks jitgate uses.
fn assert_block_kit(message: &Value) {
    assert!(
        message["text"].as_str().is_some_and(|t| !t.is_empty()),
        "fallback text: {message}"
    );
    let blocks = message["blocks"].as_array().expect("blocks");
    assert!(!blocks.is_empty() && blocks.len() <= 50);
    for b in blocks {
        match b["type"].as_str().unwrap() {
            "section" => {
                assert!(["mrkdwn", "plain_text"].contains(&b["text"]["type"].as_str().unwrap()));
                assert!(b["text"]["text"].as_str().unwrap().len() <= 3000);
            }
            "context" => {
                let els = b["elements"].as_array().unwrap();
                assert!(!els.is_empty() && els.len() <= 10);
                assert!(els.iter().all(|e| e["type"] == "mrkdwn" && e["text"].is_string()));
            }
            "actions" => {
                let els = b["elements"].as_array().unwrap();
                assert!(!els.is_empty() && els.len() <= 25);
                for e in els {
                    assert_eq!(e["type"], "button");
                    assert_eq!(e["text"]["type"], "plain_text");
                    assert!(e["text"]["text"].as_str().unwrap().len() <= 75);
                    assert!(e["action_id"].as_str().unwrap().len() <= 255);
                    if let Some(v) = e.get("value") {
                        assert!(v.as_str().unwrap().len() <= 2000);
                    }
                    if let Some(s) = e.get("style") {
                        assert!(["primary", "danger"].contains(&s.as_str().unwrap()));
                    }
                }
            }
            other => panic!("unexpected block type {other}"),
        }
    }
}

fn actions(message: &Value) -> Vec<Value> {
    message["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["type"] == "actions")
        .flat_map(|b| b["elements"].as_array().unwrap().clone())
        .collect()
}

fn all_text(message: &Value) -> String {
    message.to_string()
}

#[tokio::test]
async fn a_linked_approver_approves_in_slack_and_every_bad_interaction_is_refused() {
    let slack = FakeSlack::start().await;
    let h = start(&slack).await;
    let alice = h.user("alice", &["dev"]);
    let bob = h.user("bob", &["dba"]);

    // alice's request is posted to the policy's channel with the bot's token.
    let req = h.request_read(&alice, "prod-db", "INC-7 <!channel> & co").await;
    let id = req["id"].as_str().unwrap().to_owned();
    assert_eq!(req["state"], "pending");
    let posted = slack.nth("chat.postMessage", 1).await;
    assert_eq!(posted.auth, format!("Bearer {BOT}"));
    assert_eq!(posted.body["channel"], CHANNEL);
    assert_block_kit(&posted.body);
    let buttons = actions(&posted.body);
    let ids: Vec<_> = buttons.iter().map(|b| b["action_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["approve", "deny"]);
    assert!(buttons.iter().all(|b| b["value"] == id.as_str()));
    let text = all_text(&posted.body);
    assert!(text.contains("*alice*") && text.contains("prod-db"), "{text}");
    // The requester's text cannot mention the channel or add links.
    assert!(
        text.contains("&lt;!channel&gt; &amp; co") && !text.contains("<!channel>"),
        "{text}"
    );
    let message_ts = "1700000000.000001";

    // Refused before any action: a bad signature, an old timestamp, no signature.
    let body = payload("UBOB", "approve", &id, message_ts);
    let ts = unix_now().to_string();
    let (status, answer) = deliver(&h, &ts, &sign("another-secret", &ts, &body), &body).await;
    assert_eq!(status, 401, "{answer}");
    assert!(
        answer["detail"].as_str().unwrap_or_default().contains("signature") || answer.to_string().contains("signature"),
        "{answer}"
    );
    let old = (unix_now() - 6 * 60).to_string();
    let (status, answer) = deliver(&h, &old, &sign(SIGNING, &old, &body), &body).await;
    assert_eq!(status, 401, "{answer}");
    assert!(answer.to_string().contains("5 minutes"), "{answer}");
    // The body changed after signing (another request ID): refused.
    let ts = unix_now().to_string();
    let sig = sign(SIGNING, &ts, &body);
    let (status, _) = deliver(&h, &ts, &sig, &payload("UBOB", "approve", "r-other", message_ts)).await;
    assert_eq!(status, 401);

    // An unlinked Slack user: refused by name, told ephemerally, nothing decided.
    let (status, answer) = click(&h, &payload("UBOB", "approve", &id, message_ts)).await;
    assert_eq!(status, 200);
    assert_eq!(answer["ok"], false, "{answer}");
    assert!(answer["text"].as_str().unwrap().contains("not linked"), "{answer}");
    let eph = slack.nth("chat.postEphemeral", 1).await;
    assert_eq!(
        (eph.body["user"].as_str(), eph.body["channel"].as_str()),
        (Some("UBOB"), Some(CHANNEL))
    );
    let shown = h.cli_as(&alice, &["request", "show", &id, "--json"]).await.json();
    assert_eq!(shown["state"], "pending");

    // bob links his Slack account: the bot DMs UBOB a Confirm button.
    let run = h.cli_as(&bob, &["slack", "link", "UBOB"]).await;
    assert!(run.ok && run.stdout.contains("direct message"), "{run:?}");
    let dm = slack.nth("chat.postMessage", 2).await;
    assert_eq!(dm.body["channel"], "UBOB");
    assert_block_kit(&dm.body);
    let offer = actions(&dm.body)[0]["value"].as_str().unwrap().to_owned();
    // Another Slack user cannot take bob's offer; an edited offer is not jitgate's.
    let (_, answer) = click(&h, &payload("UMALLORY", "link", &offer, "1.2")).await;
    assert_eq!(answer["ok"], false);
    assert!(
        answer["text"].as_str().unwrap().contains("another Slack user"),
        "{answer}"
    );
    let (_, answer) = click(&h, &payload("UBOB", "link", &format!("x{offer}"), "1.2")).await;
    assert_eq!(answer["ok"], false);
    assert!(
        answer["text"].as_str().unwrap().contains("not one jitgate made"),
        "{answer}"
    );
    let (_, answer) = click(&h, &payload("UBOB", "link", &offer, "1.2")).await;
    assert_eq!(answer["ok"], true, "{answer}");
    let linked = h.audit_events("slack.linked");
    assert_eq!(linked.len(), 1);
    assert_eq!(
        (linked[0]["user"].as_str(), linked[0]["slack_user"].as_str()),
        (Some("bob"), Some("UBOB"))
    );

    // alice links hers too, and cannot approve her own request from Slack.
    assert!(h.cli_as(&alice, &["slack", "link", "UALICE"]).await.ok);
    let dm = slack.nth("chat.postMessage", 3).await;
    let (_, answer) = click(
        &h,
        &payload("UALICE", "link", actions(&dm.body)[0]["value"].as_str().unwrap(), "1.3"),
    )
    .await;
    assert_eq!(answer["ok"], true, "{answer}");
    let (_, answer) = click(&h, &payload("UALICE", "approve", &id, message_ts)).await;
    assert_eq!(answer["ok"], false, "{answer}");
    assert!(answer["text"].as_str().unwrap().contains("alice"), "{answer}");
    assert_eq!(
        h.cli_as(&alice, &["request", "show", &id, "--json"]).await.json()["state"],
        "pending"
    );

    // bob approves: the grant exists, psql gets in, the message is updated in place.
    let body = payload("UBOB", "approve", &id, message_ts);
    let ts = unix_now().to_string();
    let sig = sign(SIGNING, &ts, &body);
    let (status, answer) = deliver(&h, &ts, &sig, &body).await;
    assert_eq!((status, answer["ok"].as_bool()), (200, Some(true)), "{answer}");
    let shown = h.cli_as(&alice, &["request", "show", &id, "--json"]).await.json();
    assert_eq!(shown["state"], "approved");
    assert_eq!(shown["decided_by"], "bob");
    let out = h.psql(&alice, "prod-db", "SELECT count(*) FROM items").await;
    assert!(out.success, "{}", out.stderr);
    assert_eq!(out.stdout, "100");
    let update = slack.nth("chat.update", 1).await;
    assert_eq!(
        (update.body["channel"].as_str(), update.body["ts"].as_str()),
        (Some(CHANNEL), Some(message_ts))
    );
    assert_block_kit(&update.body);
    assert!(actions(&update.body).is_empty(), "no buttons once decided");
    assert!(all_text(&update.body).contains("Approved by bob"), "{}", update.body);
    let approvals = h.audit_events("request.approval");
    assert!(
        approvals.iter().any(|a| a["by"] == "bob" && a["comment"] == "in Slack"),
        "{approvals:?}"
    );

    // The same signed payload again: a replay, refused.
    let (status, answer) = deliver(&h, &ts, &sig, &body).await;
    assert_eq!(status, 401, "{answer}");
    assert!(answer.to_string().contains("replay"), "{answer}");

    // Every refusal is in the audit log (written in the background, so wait for the last).
    let expected = [
        "signature",
        "5 minutes",
        "not linked",
        "another Slack user",
        "own request",
        "replay",
    ];
    eventually("every refusal audited", Duration::from_secs(10), || {
        let reasons: Vec<String> = h
            .audit_events("slack.refused")
            .iter()
            .map(|r| r["reason"].as_str().unwrap().to_owned())
            .collect();
        let ok = expected.iter().all(|e| reasons.iter().any(|r| r.contains(e)));
        async move { ok }
    })
    .await;
}

#[tokio::test]
async fn a_policy_decided_in_the_console_gets_a_link_and_its_clicks_are_refused() {
    let slack = FakeSlack::start().await;
    let h = start(&slack).await;
    let carol = h.user("carol", &["ops"]);
    let bob = h.user("bob", &["dba"]);
    let req = h.request_read(&carol, "prod-db", "INC-8").await;
    let id = req["id"].as_str().unwrap().to_owned();
    let posted = slack.nth("chat.postMessage", 1).await;
    assert_block_kit(&posted.body);
    let buttons = actions(&posted.body);
    assert_eq!(buttons.len(), 1, "{}", posted.body);
    assert_eq!(
        buttons[0]["url"],
        format!("https://jitgate.example.test/ui/#/requests/{id}").as_str()
    );
    assert!(!all_text(&posted.body).contains("\"approve\""));

    // A (signed) approve click for it anyway: refused, the request stays pending.
    assert!(h.cli_as(&bob, &["slack", "link", "UBOB"]).await.ok);
    let dm = slack.nth("chat.postMessage", 2).await;
    let (_, answer) = click(
        &h,
        &payload("UBOB", "link", actions(&dm.body)[0]["value"].as_str().unwrap(), "1.1"),
    )
    .await;
    assert_eq!(answer["ok"], true, "{answer}");
    let (_, answer) = click(&h, &payload("UBOB", "approve", &id, "1700000000.000001")).await;
    assert_eq!(answer["ok"], false, "{answer}");
    assert!(answer["text"].as_str().unwrap().contains("console"), "{answer}");
    assert_eq!(
        h.cli_as(&carol, &["request", "show", &id, "--json"]).await.json()["state"],
        "pending"
    );
    // Decided with the CLI instead: the Slack message is still updated (this replica posted it).
    let run = h.cli_as(&bob, &["deny", &id, "--reason", "not now"]).await;
    assert!(run.ok, "{run:?}");
    let update = slack.nth("chat.update", 1).await;
    assert!(all_text(&update.body).contains("Denied by bob"), "{}", update.body);
    assert!(actions(&update.body).is_empty());
}

#[tokio::test]
async fn a_failing_or_silent_slack_never_holds_up_a_decision() {
    let slack = FakeSlack::start().await;
    let h = start(&slack).await;
    let alice = h.user("alice", &["dev"]);
    let bob = h.user("bob", &["dba"]);

    // Slack answers 503 twice: the request is filed at once, the post is retried until it lands.
    slack.fail_next.store(2, Ordering::SeqCst);
    let first = h.request_read(&alice, "prod-db", "INC-9").await;
    assert_eq!(first["state"], "pending");
    let third = slack.nth("chat.postMessage", 3).await;
    assert!(all_text(&third.body).contains("INC-9"), "{}", third.body);
    assert_eq!(slack.fail_next.load(Ordering::SeqCst), 0);
    assert_eq!(
        slack.calls("chat.postMessage").len(),
        3,
        "posted once it worked, not again"
    );

    // Slack stops answering: filing, approving and connecting go on without it.
    slack.hang.store(true, Ordering::SeqCst);
    let second = h.request_read(&alice, "prod-db", "INC-10").await;
    let id = second["id"].as_str().unwrap();
    let run = h.cli_as(&bob, &["approve", id]).await;
    assert!(run.ok, "{run:?}");
    let out = h.psql(&alice, "prod-db", "SELECT 1").await;
    assert!(out.success, "{}", out.stderr);
}

/// Links `user`'s certificate to Slack account `slack_user` (the `dm`th direct message).
async fn link(h: &Harness, slack: &FakeSlack, user: &jitgate_tests::UserCert, slack_user: &str, dm: usize) {
    assert!(h.cli_as(user, &["slack", "link", slack_user]).await.ok);
    let offer = slack.nth("chat.postMessage", dm).await;
    assert_eq!(offer.body["channel"], slack_user);
    let value = actions(&offer.body)[0]["value"].as_str().unwrap().to_owned();
    let (_, answer) = click(h, &payload(slack_user, "link", &value, "1.9")).await;
    assert_eq!(answer["ok"], true, "{answer}");
}

#[tokio::test]
async fn each_approval_of_several_updates_the_message() {
    let slack = FakeSlack::start().await;
    let h = start(&slack).await;
    let quinn = h.user("quinn", &["qa"]);
    let bob = h.user("bob", &["dba"]);
    let dan = h.user("dan", &["dba"]);
    let req = h.request_read(&quinn, "prod-db", "INC-11").await;
    let id = req["id"].as_str().unwrap().to_owned();
    let posted = slack.nth("chat.postMessage", 1).await;
    assert!(all_text(&posted.body).contains("Pending: 0 of 2"), "{}", posted.body);
    link(&h, &slack, &dan, "UDAN", 2).await;

    // One approval with the CLI, one in Slack: each shows in the message.
    let run = h.cli_as(&bob, &["approve", &id]).await;
    assert!(run.ok, "{run:?}");
    let first = slack.nth("chat.update", 1).await;
    assert!(all_text(&first.body).contains("Pending: 1 of 2"), "{}", first.body);
    assert_eq!(actions(&first.body).len(), 2, "still decidable: {}", first.body);

    let (_, answer) = click(&h, &payload("UDAN", "approve", &id, "1700000000.000001")).await;
    assert_eq!(answer["ok"], true, "{answer}");
    let second = slack.nth("chat.update", 2).await;
    assert!(all_text(&second.body).contains("Approved by dan"), "{}", second.body);
    assert!(actions(&second.body).is_empty());
}
