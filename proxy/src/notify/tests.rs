use std::path::Path;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::*;
use crate::config::Config;
use crate::model::{AccessLevel, Grant, GrantEnd, GrantId, TargetName, UserName};

/// HMAC-SHA256 from its definition (RFC 2104), independent of the `hmac` crate.
fn reference_hmac(key: &[u8], msg: &[u8]) -> String {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let ipad: Vec<u8> = k.iter().map(|b| b ^ 0x36).collect();
    let opad: Vec<u8> = k.iter().map(|b| b ^ 0x5c).collect();
    let inner = Sha256::new().chain_update(&ipad).chain_update(msg).finalize();
    let outer = Sha256::new().chain_update(&opad).chain_update(inner).finalize();
    outer.iter().map(|b| format!("{b:02x}")).collect()
}

fn grant() -> Grant {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    Grant {
        id: GrantId::from_string("g-0123456789abcdef"),
        user: UserName::new("alice").unwrap(),
        target: TargetName::new("prod-db").unwrap(),
        access: AccessLevel::Read,
        reason: "INC-4411 <urgent> & co".into(),
        created_by: UserName::new("admin").unwrap(),
        created_at: now,
        expires_at: now + Duration::from_secs(1800),
    }
}

fn request(state: &str) -> RequestInfo {
    RequestInfo {
        id: "r-42".into(),
        user: UserName::new("bob").unwrap(),
        target: TargetName::new("prod-db").unwrap(),
        access: AccessLevel::Admin,
        duration_secs: 3600,
        reason: "outage".into(),
        state: state.into(),
        decided_by: Some(UserName::new("carol").unwrap()),
        grant_id: None,
        policy: "oncall".into(),
        approvals: (0, 1),
    }
}

#[test]
fn signature_matches_an_independent_hmac() {
    // RFC 4231 test case 2.
    assert_eq!(
        signature(b"Jefe", b"what do ya want for nothing?"),
        "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
    let body = Notification::grant_started(&grant()).to_json();
    for key in [&b"s3cret"[..], &[7u8; 100][..]] {
        assert_eq!(signature(key, &body), format!("sha256={}", reference_hmac(key, &body)));
    }
}

#[test]
fn json_payload_has_kind_ts_and_data() {
    let v: serde_json::Value = serde_json::from_slice(&Notification::grant_started(&grant()).to_json()).unwrap();
    assert_eq!(v["kind"], "grant.started");
    assert!(v["ts"].as_str().unwrap().ends_with('Z'));
    assert_eq!(v["data"]["id"], "g-0123456789abcdef");
    assert_eq!(v["data"]["access"], "read");
    assert!(v["data"].get("end_reason").is_none());
    let by = UserName::new("admin").unwrap();
    let v: serde_json::Value =
        serde_json::from_slice(&Notification::grant_ended(&grant(), GrantEnd::Revoked, Some(&by)).to_json()).unwrap();
    assert_eq!(v["kind"], "grant.ended");
    assert_eq!(v["data"]["end_reason"], "revoked");
    assert_eq!(v["data"]["revoked_by"], "admin");
    assert_eq!(v["data"]["reason"], "INC-4411 <urgent> & co");
    let v: serde_json::Value =
        serde_json::from_slice(&Notification::request_decided(request("denied")).to_json()).unwrap();
    assert_eq!(v["kind"], "request.decided");
    assert_eq!(v["data"]["state"], "denied");
    assert_eq!(v["data"]["decided_by"], "carol");
    assert_eq!(v["data"]["duration_secs"], 3600);
}

#[test]
fn slack_text_is_one_readable_line() {
    assert_eq!(
        Notification::grant_started(&grant()).slack_text(),
        ":unlock: alice got read access to prod-db for 30m (grant g-0123456789abcdef): INC-4411 &lt;urgent&gt; &amp; co"
    );
    let by = UserName::new("admin").unwrap();
    assert_eq!(
        Notification::grant_ended(&grant(), GrantEnd::Revoked, Some(&by)).slack_text(),
        ":lock: alice's read access to prod-db ended: revoked by admin (grant g-0123456789abcdef)"
    );
    assert!(Notification::grant_ended(&grant(), GrantEnd::Expired, None)
        .slack_text()
        .contains("ended: expired"));
    let bg = Notification::break_glass(request("approved")).slack_text();
    assert!(bg.starts_with(":rotating_light: BREAK-GLASS"), "{bg}");
    assert!(bg.contains("bob took admin access to prod-db for 1h"), "{bg}");
    let body: serde_json::Value =
        serde_json::from_slice(&Notification::request_created(request("pending")).to_slack()).unwrap();
    assert_eq!(
        body["text"],
        ":inbox_tray: bob requests admin access to prod-db for 1h (request r-42): outage"
    );
    assert!(!Notification::request_decided(request("approved"))
        .slack_text()
        .contains('\n'));
}

const BASE: &str = "data_dir = \"/var/lib/jitgate\"\n";

fn parse(webhooks: &str) -> Result<Config, crate::config::ConfigError> {
    Config::parse(&format!("{BASE}{webhooks}"), Path::new("test.toml"))
}

#[test]
fn webhook_config_defaults_and_errors_name_keys() {
    std::env::set_var("JITGATE_TEST_WEBHOOK_SECRET", "k");
    let c = parse(
        "[[webhooks]]\nname = \"security\"\nurl = \"http://127.0.0.1:9000/hooks?x=1\"\n\
         secret_env = \"JITGATE_TEST_WEBHOOK_SECRET\"\n\
         [[webhooks]]\nname = \"chat\"\nurl = \"http://hooks.example.com/T/B\"\nformat = \"slack\"\n\
         events = [\"break_glass\"]\ntimeout = \"2s\"\nmax_attempts = 3\n",
    )
    .unwrap();
    let [sec, chat] = &c.webhooks[..] else {
        panic!("{:?}", c.webhooks)
    };
    assert_eq!(sec.events, EventKind::ALL);
    assert_eq!(sec.format, Format::Json);
    assert_eq!(sec.secret.as_deref(), Some(&b"k"[..]));
    assert_eq!(sec.timeout, Duration::from_secs(5));
    assert_eq!(sec.max_attempts, 5);
    assert_eq!(sec.endpoint.authority, "127.0.0.1:9000");
    assert_eq!(sec.endpoint.path, "/hooks?x=1");
    assert!(!format!("{sec:?}").contains("\"k\""));
    assert_eq!(chat.events, [EventKind::BreakGlass]);
    assert_eq!(chat.format, Format::Slack);
    assert_eq!(chat.endpoint.authority, "hooks.example.com:80");
    assert_eq!((chat.timeout, chat.max_attempts), (Duration::from_secs(2), 3));

    let ok = "name = \"a\"\nurl = \"http://127.0.0.1:1/\"\nsecret_env = \"JITGATE_TEST_WEBHOOK_SECRET\"\n";
    for (table, key) in [
        (
            "name = \"a\"\nurl = \"http://127.0.0.1:1/\"\n",
            "webhooks[0].secret_env",
        ),
        (
            "name = \"a\"\nurl = \"http://127.0.0.1:1/\"\nsecret_env = \"JITGATE_TEST_UNSET_WEBHOOK\"\n",
            "webhooks[0].secret_env",
        ),
        (&ok.replace("http://127.0.0.1:1/", "ftp://x/"), "webhooks[0].url"),
        (&ok.replace("http://127.0.0.1:1/", "not a url"), "webhooks[0].url"),
        (&ok.replace("http://127.0.0.1:1/", "https://x/"), "webhooks[0].ca_file"),
        (
            &format!("{ok}events = [\"grant.started\", \"grant.begun\"]\n"),
            "webhooks[0].events[1]",
        ),
        (&format!("{ok}format = \"xml\"\n"), "webhooks[0].format"),
        (&format!("{ok}timeout = \"soon\"\n"), "webhooks[0].timeout"),
        (&format!("{ok}max_attempts = 0\n"), "webhooks[0].max_attempts"),
        (&ok.replace("name = \"a\"", "name = \"Sec Team\""), "webhooks[0].name"),
    ] {
        let err = parse(&format!("[[webhooks]]\n{table}")).unwrap_err().to_string();
        assert!(err.starts_with(key), "{table}: {err}");
    }
    let err = parse(&format!("[[webhooks]]\n{ok}[[webhooks]]\n{ok}"))
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("webhooks[1].name"), "{err}");
    let err = parse(&format!("[[webhooks]]\n{ok}secret = \"x\"\n"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("secret"), "{err}");
}

#[tokio::test]
async fn a_full_queue_drops_and_counts() {
    std::env::set_var("JITGATE_TEST_WEBHOOK_SECRET", "k");
    let c = parse(
        "[[webhooks]]\nname = \"slow\"\nurl = \"http://127.0.0.1:1/\"\nsecret_env = \"JITGATE_TEST_WEBHOOK_SECRET\"\n\
         [[webhooks]]\nname = \"other\"\nurl = \"http://127.0.0.1:1/\"\nformat = \"slack\"\nevents = [\"break_glass\"]\n",
    )
    .unwrap();
    let metrics = Metrics::new();
    // No workers: nothing leaves the queues.
    let (notifier, _queues) = Notifier::build(&c.webhooks, &metrics, 4);
    for _ in 0..6 {
        notifier.notify(Notification::grant_started(&grant()));
    }
    let text = metrics.render();
    assert!(
        text.contains("jitgate_webhook_deliveries_total{outcome=\"dropped\",webhook=\"slow\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("jitgate_webhook_queue_depth{webhook=\"slow\"} 4"),
        "{text}"
    );
    // `other` does not subscribe to grant.started.
    assert!(
        text.contains("jitgate_webhook_queue_depth{webhook=\"other\"} 0"),
        "{text}"
    );
}

#[test]
fn backoff_doubles_up_to_a_minute() {
    let waits: Vec<u64> = (1..=9).map(|n| delivery::backoff(n).as_secs()).collect();
    assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
    assert_eq!(delivery::backoff(u32::MAX), Duration::from_secs(60));
}

/// Reads one HTTP request (head and `content-length` body) and answers 200.
async fn answer_once<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut s: S) -> (String, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "request cut short");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    while buf.len() < end + len {
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "body cut short");
        buf.extend_from_slice(&chunk[..n]);
    }
    s.write_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let _ = s.shutdown().await;
    (head, buf[end..].to_vec())
}

#[tokio::test]
async fn https_delivery_verifies_the_receiver_against_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = crate::pki::Authority::generate().unwrap();
    let (cert, key) = ca.issue_server(&["127.0.0.1".into()]).unwrap();
    for (name, pem) in [
        ("ca.crt", ca.cert_pem().to_owned()),
        ("server.crt", cert),
        ("server.key", key),
    ] {
        std::fs::write(dir.path().join(name), pem).unwrap();
    }
    let server = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            crate::tls::load_certs(&dir.path().join("server.crt")).unwrap(),
            crate::tls::load_key(&dir.path().join("server.key")).unwrap(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(server));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let received = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        answer_once(acceptor.accept(tcp).await.unwrap()).await
    });

    std::env::set_var("JITGATE_TEST_WEBHOOK_SECRET", "k");
    let c = parse(&format!(
        "[[webhooks]]\nname = \"tls\"\nurl = \"https://127.0.0.1:{port}/in\"\nca_file = \"{}\"\n\
         secret_env = \"JITGATE_TEST_WEBHOOK_SECRET\"\nmax_attempts = 1\n",
        dir.path().join("ca.crt").display()
    ))
    .unwrap();
    let metrics = Metrics::new();
    let tracker = TaskTracker::new();
    let shutdown = CancellationToken::new();
    let notifier = Notifier::start(&c.webhooks, &metrics, &tracker, shutdown.clone());
    notifier.notify(Notification::grant_started(&grant()));
    let (head, body) = tokio::time::timeout(Duration::from_secs(10), received)
        .await
        .unwrap()
        .unwrap();
    assert!(head.starts_with("post /in http/1.1"), "{head}");
    assert!(head.contains("x-jitgate-event: grant.started"), "{head}");
    assert!(
        head.contains(&format!("x-jitgate-signature: {}", signature(b"k", &body))),
        "{head}"
    );
    // The receiver has the request; the notifier counts it once it has read the answer.
    let delivered = "jitgate_webhook_deliveries_total{outcome=\"delivered\",webhook=\"tls\"} 1";
    for _ in 0..100 {
        if metrics.render().contains(delivered) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = metrics.render();
    assert!(text.contains(delivered), "{text}");
    shutdown.cancel();
    tracker.close();
    tracker.wait().await;
}

#[tokio::test]
async fn shutdown_drains_for_at_most_two_seconds() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let c = parse(&format!(
        "[[webhooks]]\nname = \"dead\"\nurl = \"http://{dead}/\"\nformat = \"slack\"\nmax_attempts = 100\n"
    ))
    .unwrap();
    let metrics = Metrics::new();
    let tracker = TaskTracker::new();
    let shutdown = CancellationToken::new();
    let notifier = Notifier::start(&c.webhooks, &metrics, &tracker, shutdown.clone());
    for _ in 0..3 {
        notifier.notify(Notification::grant_started(&grant()));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    shutdown.cancel();
    tracker.close();
    tokio::time::timeout(Duration::from_secs(4), tracker.wait())
        .await
        .expect("workers stop after the drain");
    // Everything is accounted for: the one in flight failed, the queued ones dropped.
    let text = metrics.render();
    let count = |o: &str| {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(&format!(
                    "jitgate_webhook_deliveries_total{{outcome=\"{o}\",webhook=\"dead\"}} "
                ))
            })
            .map_or(0, |v| v.trim().parse::<u64>().unwrap())
    };
    assert_eq!(count("failed") + count("dropped"), 3, "{text}");
    assert!(
        text.contains("jitgate_webhook_queue_depth{webhook=\"dead\"} 0"),
        "{text}"
    );
    drop(notifier);
}
