//! The web console in a real browser: Debian's Chromium, driven by playwright-core
//! (tests/console/console.mjs), signs in with an approver's client certificate, approves a
//! pending request (psql then gets in), watches the live session, revokes the grant (the live
//! psql is cut), finds the statement in the audit search and signs out. A POST without the
//! CSRF token is refused. Screenshots of every page go to
//! `$CARGO_TARGET_DIR/test-artifacts/console/` (or `target/...`).
//!
//! Below it, the console's rules over raw HTTPS: the CSP and cookie attributes, CSRF for
//! browsers whatever certificate they present, the console's cookie only for its own user.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use jitgate_tests::{eventually, poke_and_collect, Harness, UserCert};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};

const POLICY: &str = r#"
[[policies]]
name = "prod-reviewed"
roles = ["dev"]
targets = { env = "prod" }
access = ["read"]
max_duration = "1h"
approvers = ["dba"]
approvals = 1
"#;

async fn start() -> Harness {
    let mut h = Harness::start().await;
    h.reconfigure(POLICY).await;
    h
}

fn artifacts() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")));
    target.join("test-artifacts").join("console")
}

async fn file_request(h: &Harness, alice: &UserCert) -> String {
    let r = h.request_read(alice, "prod-db", "INC-77").await;
    assert_eq!(r["state"], "pending");
    r["id"].as_str().unwrap().to_owned()
}

/// Starts the browser driver as `user` (env `extra` added).
fn driver(h: &Harness, user: &UserCert, extra: &[(&str, &str)]) -> tokio::process::Child {
    let fixture = jitgate_tests::npm_fixture("console", "playwright-core");
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg(fixture.join("console.mjs"))
        .current_dir(&fixture)
        .env("URL", format!("https://localhost:{}", h.addrs().api.port()))
        .env("CERT", &user.cert)
        .env("KEY", &user.key)
        .env("SHOTS", artifacts())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.spawn().expect("node runs (scripts/test installs Node.js)")
}

/// Fails on any error the page logged (CSP violations among them), but for the refusals the
/// tests ask for: 401 before signing in and after signing out, 403 for the forged POSTs.
fn assert_no_page_errors(problems: &str) {
    let problems: Vec<String> = serde_json::from_str(problems).unwrap();
    let unexpected: Vec<&String> = problems
        .iter()
        .filter(|p| !(p.starts_with("Failed to load resource") && (p.contains("401") || p.contains("403"))))
        .collect();
    assert!(unexpected.is_empty(), "the page logged errors: {unexpected:?}");
}

/// Reads the driver's lines until one starts with `prefix`; panics on `FAIL` or its end.
async fn expect_line(lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>, prefix: &str) -> String {
    let read = tokio::time::timeout(Duration::from_secs(90), async {
        loop {
            let line = lines
                .next_line()
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("driver ended before {prefix}"));
            eprintln!("driver: {line}");
            assert!(!line.starts_with("FAIL"), "{line}");
            if let Some(rest) = line.strip_prefix(prefix) {
                return rest.trim().to_owned();
            }
        }
    })
    .await;
    read.unwrap_or_else(|_| panic!("the browser driver did not print {prefix} within 90s"))
}

#[tokio::test(flavor = "multi_thread")]
async fn an_approver_works_the_console_in_chromium() {
    let h = start().await;
    let alice = h.user("alice", &["dev"]);
    let bob = h.user("bob", &["dba", "admin"]);
    let id = file_request(&h, &alice).await;
    let other = file_request(&h, &alice).await;
    let marker = format!("SELECT 'console-{}' AS marker", std::process::id());
    let shots = artifacts();
    let mut driver = driver(&h, &bob, &[("REQUEST", &id), ("MARKER", &marker), ("DENY", &other)]);
    let mut stdin = driver.stdin.take().unwrap();
    let mut lines = BufReader::new(driver.stdout.take().unwrap()).lines();

    let csp = expect_line(&mut lines, "CSP").await;
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert!(
        !csp.contains("'unsafe-inline'") && !csp.contains("'unsafe-eval'"),
        "{csp}"
    );
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    let cookie: serde_json::Value = serde_json::from_str(&expect_line(&mut lines, "COOKIE").await).unwrap();
    assert_eq!(
        cookie,
        serde_json::json!({"httpOnly": true, "secure": true, "sameSite": "Strict"})
    );
    assert_eq!(expect_line(&mut lines, "SCRIPT_SEES_COOKIE").await, "false");
    let csrf: serde_json::Value = serde_json::from_str(&expect_line(&mut lines, "CSRF").await).unwrap();
    assert_eq!(
        csrf,
        serde_json::json!([[403, "csrf"], [403, "csrf"]]),
        "CSRF-less POSTs refused"
    );
    assert_eq!(
        h.cli_as(&alice, &["request", "show", &id, "--json"]).await.json()["state"],
        "pending",
        "the refused POSTs approved nothing"
    );

    assert_eq!(expect_line(&mut lines, "FOCUS").await, format!("request-{id}"));
    // Approved in the console: alice's psql gets in, and stays for the next steps.
    let approved = expect_line(&mut lines, "APPROVED").await;
    assert!(approved.ends_with("done"), "{approved}");
    let shown = h.cli_as(&alice, &["request", "show", &id, "--json"]).await.json();
    assert_eq!(
        (shown["state"].as_str(), shown["decided_by"].as_str()),
        (Some("approved"), Some("bob"))
    );
    assert!(expect_line(&mut lines, "DENY_WITHOUT_REASON")
        .await
        .contains("Give a reason"));
    assert!(expect_line(&mut lines, "DENIED").await.ends_with("done"));
    let denied = h.cli_as(&alice, &["request", "show", &other, "--json"]).await.json();
    assert_eq!(
        (denied["state"].as_str(), denied["decided_by"].as_str()),
        (Some("denied"), Some("bob"))
    );
    assert!(denied.to_string().contains("not during the freeze"), "{denied}");
    let out = h.psql(&alice, "prod-db", &marker).await;
    assert!(out.success, "{}", out.stderr);
    let mut live = h.psql_interactive(&alice, "prod-db");
    let mut live_in = live.stdin.take().unwrap();
    live_in.write_all(b"SELECT 1;\n").await.unwrap();
    eventually("alice's live session listed", Duration::from_secs(10), || async {
        let run = h.cli_as(&bob, &["session", "list"]).await;
        run.ok && run.stdout.contains("alice")
    })
    .await;
    live.stdin = Some(live_in);
    stdin.write_all(b"next\n").await.unwrap();

    let sessions = expect_line(&mut lines, "SESSIONS").await;
    assert!(sessions.contains("alice") && sessions.contains("prod-db"), "{sessions}");

    // Revoked in the console: the live psql is cut.
    let revoked = expect_line(&mut lines, "REVOKED").await;
    assert!(revoked.ends_with("done"), "{revoked}");
    let stderr = poke_and_collect(live).await;
    assert!(stderr.contains("FATAL") && stderr.contains("revoked"), "{stderr}");
    stdin.write_all(b"next\n").await.unwrap();

    // The statement is found by user, event and text; its session's records come in order.
    let found = expect_line(&mut lines, "FOUND").await;
    assert!(found.contains(&marker) && found.contains("1 record(s)"), "{found}");
    let events: Vec<String> = serde_json::from_str(&expect_line(&mut lines, "SESSION_EVENTS").await).unwrap();
    assert_eq!(events.first().map(String::as_str), Some("session.start"), "{events:?}");
    assert_eq!(events.last().map(String::as_str), Some("session.end"), "{events:?}");
    assert!(events.iter().any(|e| e == "statement"), "{events:?}");
    assert_eq!(expect_line(&mut lines, "SIGNED_OUT").await, "401");
    assert_no_page_errors(&expect_line(&mut lines, "PROBLEMS").await);
    expect_line(&mut lines, "DONE").await;
    let status = tokio::time::timeout(Duration::from_secs(30), driver.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    for page in [
        "sign-in",
        "overview",
        "requests",
        "sessions",
        "grants",
        "audit",
        "audit-session",
    ] {
        let shot = shots.join(format!("{page}.png"));
        assert!(
            std::fs::metadata(&shot).map(|m| m.len() > 1000).unwrap_or(false),
            "{} saved",
            shot.display()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shell_recording_plays_in_the_audit_page() {
    use jitgate_tests::jitgate::model::AccessLevel;
    use jitgate_tests::ssh::{ssh_command, ssh_user};
    let h = Harness::start_with(jitgate_tests::Options {
        ssh: true,
        ..jitgate_tests::Options::default()
    })
    .await;
    let alice = ssh_user(&h, "alice", &["dev"]);
    let auditor = h.user("sam", &["auditor"]);
    h.grant("alice", "web-1", AccessLevel::Write, Duration::from_secs(3600))
        .await;
    let mut shell = ssh_command(&h, &alice, "web-1", &["-tt"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut typed = shell.stdin.take().unwrap();
    typed.write_all(b"echo played-$((6*7)); exit\n").await.unwrap();
    let out = tokio::time::timeout(Duration::from_secs(30), shell.wait_with_output())
        .await
        .expect("the shell exits")
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("played-42"));
    eventually("session.end naming the recording", Duration::from_secs(10), || async {
        h.audit_events("session.end").iter().any(|e| e["recordings"].is_array())
    })
    .await;

    // An auditor (not an admin) plays it in the page.
    let mut driver = driver(&h, &auditor, &[("MODE", "recording"), ("MARKER", "played-42")]);
    let mut lines = BufReader::new(driver.stdout.take().unwrap()).lines();
    let id = expect_line(&mut lines, "RECORDING").await;
    assert!(id.starts_with("s-"), "{id}");
    let played = expect_line(&mut lines, "PLAYED").await;
    assert!(played.contains("played-42"), "{played}");
    assert_no_page_errors(&expect_line(&mut lines, "PROBLEMS").await);
    expect_line(&mut lines, "DONE").await;

    // The recording is served only while it matches the audit log.
    let api = h.api_as(&auditor);
    let path = format!("/v1/recordings/{id}");
    let (status, body) = api
        .raw(jitgate_tests::jitgate::client::Method::GET, &path, None)
        .await
        .unwrap();
    assert_eq!(status, 200);
    let text = String::from_utf8_lossy(&body).into_owned();
    let head: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(
        (head["version"].as_u64(), head["width"].as_u64()),
        (Some(2), Some(80)),
        "an asciicast v2"
    );
    assert!(text.contains("played-42"));
    let file = h.data_dir().join("recordings").join(format!("{id}.cast"));
    let mut bytes = std::fs::read(&file).unwrap();
    bytes.extend_from_slice(b"[9.9, \"o\", \"forged\"]\n");
    std::fs::write(&file, bytes).unwrap();
    let (status, body) = api
        .raw(jitgate_tests::jitgate::client::Method::GET, &path, None)
        .await
        .unwrap();
    assert_eq!(status, 409, "{}", String::from_utf8_lossy(&body));
    // Neither a plain user's certificate.
    let (status, _) = h
        .api_as(&h.user("eve", &["dev"]))
        .raw(jitgate_tests::jitgate::client::Method::GET, &path, None)
        .await
        .unwrap();
    assert_eq!(status, 403);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_approver_signs_in_to_the_console_with_single_sign_on() {
    const HOST: &str = jitgate_tests::CONSOLE_SSO_HOST;
    let (h, _provider, _) = jitgate_tests::console_sso_harness(POLICY).await;
    let port = h.addrs().api.port();
    let alice = h.user("alice", &["dev"]);
    let id = file_request(&h, &alice).await;

    // A browser without any certificate signs in at the provider as carol (group db-admins).
    let mut driver = driver(
        &h,
        &alice,
        &[
            ("MODE", "sso"),
            ("HOST_MAP", HOST),
            ("LOGIN", "carol"),
            ("REQUEST", &id),
            ("URL", &format!("https://{HOST}:{port}")),
        ],
    );
    let mut lines = BufReader::new(driver.stdout.take().unwrap()).lines();
    assert_eq!(expect_line(&mut lines, "WHO").await, "carol@example.com (dba)");
    let cookies: Vec<String> = serde_json::from_str(&expect_line(&mut lines, "COOKIES").await).unwrap();
    assert!(cookies.contains(&"jitgate_console:Strict".to_owned()), "{cookies:?}");
    assert!(
        !cookies.iter().any(|c| c.starts_with("jitgate_console_login")),
        "the sign-in cookie is cleared: {cookies:?}"
    );
    assert_eq!(expect_line(&mut lines, "CSRF").await, "403");
    let approved = expect_line(&mut lines, "APPROVED").await;
    assert!(approved.ends_with("done"), "{approved}");
    assert_no_page_errors(&expect_line(&mut lines, "PROBLEMS").await);
    expect_line(&mut lines, "DONE").await;

    let shown = h.cli_as(&alice, &["request", "show", &id, "--json"]).await.json();
    assert_eq!(
        (shown["state"].as_str(), shown["decided_by"].as_str()),
        (Some("approved"), Some("carol@example.com"))
    );
    let logins = h.audit_events("login.succeeded");
    assert!(
        logins
            .iter()
            .any(|l| l["method"] == "console" && l["user"] == "carol@example.com" && l["subject"] == "sub-carol"),
        "{logins:?}"
    );
    let out = h.psql(&alice, "prod-db", "SELECT 1").await;
    assert!(out.success, "{}", out.stderr);
}
