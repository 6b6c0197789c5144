//! `jitgate login` against a real, certified OpenID Provider (panva/oidc-provider, npm, in
//! `tests/oidc`) on loopback: the device flow and the browser flow (authorization code with
//! PKCE) end to end with the real CLI, the provider's own sign-in pages walked over HTTP by
//! `tests/oidc/user.mjs`; groups mapped to roles; an unmapped group and an aborted sign-in
//! refused with their reasons; psql with the new certificate, and psql and psycopg through
//! `jitgate connect` with nothing but the profile, audited under the signed-in user.
//! The refusals a real provider will not produce on demand are in `login_refusals.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use jitgate_tests::jitgate::model::AccessLevel;
use jitgate_tests::jitgate::sandbox::free_port;
use jitgate_tests::{client_command, eventually, jitgate_bin, run_jitgate, CliRun, Harness, UserCert};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, BufReader};
use tokio::process::{Child, Command};

const CLIENT: &str = "jitgate-at-the-provider";
const SECRET: &str = "provider-secret-kept-by-the-proxy";

/// `tests/oidc`, with oidc-provider installed.
fn fixture() -> PathBuf {
    jitgate_tests::npm_fixture("oidc", "oidc-provider")
}

/// The running provider; killed when dropped.
struct Provider {
    _child: Child,
    issuer: String,
}

impl Provider {
    /// Starts oidc-provider with alice (group db-admins) and bob (group contractors).
    async fn start() -> Provider {
        let config = serde_json::json!({
            "client_id": CLIENT,
            "client_secret": SECRET,
            "accounts": {
                "alice": { "email": "Alice@Example.com", "groups": ["db-admins", "everyone"] },
                "bob": { "email": "bob@example.com", "groups": ["contractors"] },
            },
        });
        let (child, issuer) = jitgate_tests::start_oidc_provider(&config).await;
        Provider { _child: child, issuer }
    }

    /// The person at the browser: `node user.mjs ARGS...`; true when the sign-in finished.
    async fn user(&self, args: &[&str]) -> (bool, String) {
        let out = tokio::time::timeout(
            Duration::from_secs(60),
            Command::new("node")
                .arg(fixture().join("user.mjs"))
                .args(args)
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("user.mjs finishes")
        .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        (out.status.success() && text.starts_with("DONE"), text)
    }
}

/// A proxy whose `[oidc]` is the provider; db-admins are dba and approver, everyone is dev.
async fn proxy(op: &Provider) -> Harness {
    std::env::set_var("JITGATE_TEST_REAL_OIDC_SECRET", SECRET);
    let mut h = Harness::start().await;
    h.reconfigure(&format!(
        "[oidc]\nissuer = \"{}\"\nclient_id = \"{CLIENT}\"\nclient_secret_env = \"JITGATE_TEST_REAL_OIDC_SECRET\"\nscopes = [\"openid\", \"email\", \"groups\"]\n[oidc.roles]\n\"db-admins\" = [\"dba\", \"approver\"]\n\"everyone\" = [\"dev\"]\n",
        op.issuer
    ))
    .await;
    h
}

/// `jitgate login ARGS` running as the engineer at `home`, and its stderr line by line.
struct Login {
    child: Child,
    stderr: tokio::io::Lines<BufReader<tokio::process::ChildStderr>>,
    seen: String,
}

impl Login {
    fn start(h: &Harness, home: &Path, args: &[&str]) -> Login {
        let fp = jitgate_tests::jitgate::pki::cert_fingerprint(
            &std::fs::read_to_string(h.data_dir().join("ca.crt")).unwrap(),
        )
        .unwrap();
        let mut c = Command::new(jitgate_bin());
        for (k, _) in std::env::vars() {
            if k.starts_with("JITGATE_") {
                c.env_remove(k);
            }
        }
        let mut child = c
            .arg("login")
            .args(["--proxy", &format!("https://127.0.0.1:{}", h.addrs().api.port())])
            .args(["--ca-fingerprint", &fp])
            .args(args)
            .env("HOME", home)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stderr = BufReader::new(child.stderr.take().unwrap()).lines();
        Login {
            child,
            stderr,
            seen: String::new(),
        }
    }

    /// The first stderr line containing `marker`.
    async fn line_with(&mut self, marker: &str) -> String {
        loop {
            let line = tokio::time::timeout(Duration::from_secs(30), self.stderr.next_line())
                .await
                .unwrap_or_else(|_| panic!("no {marker:?} line; so far: {}", self.seen))
                .unwrap()
                .unwrap_or_else(|| panic!("login ended without {marker:?}: {}", self.seen));
            self.seen.push_str(&line);
            self.seen.push('\n');
            if line.contains(marker) {
                return line;
            }
        }
    }

    /// The device prompt: (verification URI, user code).
    async fn device_prompt(&mut self) -> (String, String) {
        let line = self.line_with("To sign in, open ").await;
        let rest = line.split_once("To sign in, open ").unwrap().1;
        let (uri, code) = rest.split_once(" and enter the code ").unwrap();
        (uri.to_owned(), code.trim().to_owned())
    }

    async fn finish(mut self) -> CliRun {
        let mut stdout = String::new();
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut stdout)
            .await
            .unwrap();
        while let Ok(Some(line)) = self.stderr.next_line().await {
            self.seen.push_str(&line);
            self.seen.push('\n');
        }
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("login exits")
            .unwrap();
        CliRun {
            ok: status.success(),
            code: status.code(),
            stdout,
            stderr: self.seen,
        }
    }
}

/// The profile's certificate as a harness user.
fn profile_user(home: &Path, name: &str) -> UserCert {
    let dir = home.join(".jitgate");
    UserCert {
        user: name.into(),
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
        ca: dir.join("ca.pem"),
    }
}

async fn as_engineer(home: &Path, args: &[&str]) -> CliRun {
    let home = home.display().to_string();
    run_jitgate(args, &[("HOME", home.as_str())]).await
}

#[tokio::test]
async fn the_device_flow_at_a_real_provider_gives_a_certificate_with_the_mapped_roles() {
    let op = Provider::start().await;
    let h = proxy(&op).await;
    let home = tempfile::tempdir().unwrap();

    let mut login = Login::start(&h, home.path(), &[]);
    let (uri, code) = login.device_prompt().await;
    assert!(uri.starts_with(&op.issuer), "the provider's own page: {uri}");
    let (done, page) = op.user(&["device", &uri, &code, "alice"]).await;
    assert!(done, "{page}");
    let run = login.finish().await;
    assert!(run.ok, "{run:?}");
    // The user claim is lower-cased; both mapped groups give their roles, once each.
    assert!(
        run.stdout
            .contains("logged in as alice@example.com (roles: dba, approver, dev)"),
        "{run:?}"
    );
    assert!(!run.stdout.contains(SECRET) && !run.stderr.contains(SECRET));

    let who = as_engineer(home.path(), &["whoami", "--json"]).await;
    assert!(who.ok, "{who:?}");
    let who: serde_json::Value = serde_json::from_str(&who.stdout).unwrap();
    assert_eq!(who["user"], "alice@example.com");

    let ok = h.audit_events("login.succeeded");
    assert_eq!(ok.len(), 1, "{ok:?}");
    assert_eq!(ok[0]["method"], "oidc");
    assert_eq!(ok[0]["subject"], "sub-alice");
    assert_eq!(ok[0]["user"], "alice@example.com");

    // The certificate opens a granted target with psql.
    h.grant(
        "alice@example.com",
        "prod-db",
        AccessLevel::Read,
        Duration::from_secs(3600),
    )
    .await;
    let alice = profile_user(home.path(), "alice@example.com");
    let out = h.psql(&alice, "prod-db", "SELECT count(*) FROM items").await;
    assert!(out.success, "{}", out.stderr);
    assert_eq!(out.stdout, "100");
    assert!(h
        .audit_events("session.start")
        .iter()
        .any(|s| s["user"] == "alice@example.com"));

    // The device code is single-use at the provider: the same code again is refused there.
    let (done, page) = op.user(&["device", &uri, &code, "alice"]).await;
    assert!(!done, "a used code signed in again: {page}");
}

#[tokio::test]
async fn the_browser_flow_with_pkce_at_a_real_provider_gives_a_certificate() {
    let op = Provider::start().await;
    let h = proxy(&op).await;
    let home = tempfile::tempdir().unwrap();

    let mut login = Login::start(&h, home.path(), &["--browser", "--no-open"]);
    let line = login.line_with("Open this URL in your browser to sign in: ").await;
    let url = line.split_once("sign in: ").unwrap().1.trim().to_owned();
    assert!(url.starts_with(&format!("{}/auth?", op.issuer)), "{url}");
    for p in [
        "code_challenge_method=S256",
        "code_challenge=",
        "nonce=",
        "state=",
        "redirect_uri=http%3A%2F%2F127.0.0.1%3A",
    ] {
        assert!(url.contains(p), "{p} missing from {url}");
    }
    // The client secret is the proxy's: never in the URL the user's browser sees.
    assert!(!url.contains(SECRET));
    let (done, page) = op.user(&["authorize", &url, "alice"]).await;
    assert!(done, "{page}");
    let run = login.finish().await;
    assert!(run.ok, "{run:?}");
    assert!(
        run.stdout
            .contains("logged in as alice@example.com (roles: dba, approver, dev)"),
        "{run:?}"
    );
    let ok = h.audit_events("login.succeeded");
    assert_eq!(ok.len(), 1, "{ok:?}");
    assert_eq!(ok[0]["subject"], "sub-alice");
}

#[tokio::test]
async fn an_unmapped_group_and_an_aborted_sign_in_are_refused_with_their_reasons() {
    let op = Provider::start().await;
    let h = proxy(&op).await;

    // bob signs in at the provider, but none of his groups maps to a role.
    let home = tempfile::tempdir().unwrap();
    let mut login = Login::start(&h, home.path(), &[]);
    let (uri, code) = login.device_prompt().await;
    let (done, page) = op.user(&["device", &uri, &code, "bob"]).await;
    assert!(done, "{page}");
    let run = login.finish().await;
    assert!(!run.ok, "{run:?}");
    assert!(
        run.stderr
            .contains("no group of bob@example.com maps to a jitgate role (groups: contractors"),
        "{run:?}"
    );
    assert!(!home.path().join(".jitgate/cert.pem").exists());

    // alice clicks [ Abort ] on the provider's confirmation page.
    let home = tempfile::tempdir().unwrap();
    let mut login = Login::start(&h, home.path(), &[]);
    let (uri, code) = login.device_prompt().await;
    let _ = op.user(&["device-abort", &uri, &code, "alice"]).await;
    let run = login.finish().await;
    assert!(!run.ok, "{run:?}");
    assert!(run.stderr.contains("denied at the identity provider"), "{run:?}");
    assert!(!home.path().join(".jitgate/cert.pem").exists());

    let reasons: Vec<String> = h
        .audit_events("login.refused")
        .iter()
        .map(|r| r["reason"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(reasons[0].contains("no group of bob@example.com"), "{reasons:?}");
    assert!(reasons[1].contains("denied"), "{reasons:?}");
    assert!(h.audit_events("login.succeeded").is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn after_login_psql_and_psycopg_connect_through_jitgate_connect_with_the_profile_alone() {
    let python = std::env::var("JITGATE_PYTHON").unwrap_or_else(|_| {
        format!(
            "{}/.cache/jitgate-tools/venv/bin/python",
            std::env::var("HOME").unwrap()
        )
    });
    assert!(
        Path::new(&python).exists(),
        "{python} missing: scripts/test installs psycopg in its virtualenv"
    );
    let op = Provider::start().await;
    let h = proxy(&op).await;
    let home = tempfile::tempdir().unwrap();
    let mut login = Login::start(&h, home.path(), &[]);
    let (uri, code) = login.device_prompt().await;
    assert!(op.user(&["device", &uri, &code, "alice"]).await.0);
    let run = login.finish().await;
    assert!(run.ok, "{run:?}");
    h.grant(
        "alice@example.com",
        "prod-db",
        AccessLevel::Read,
        Duration::from_secs(3600),
    )
    .await;

    // No --cert, --key, --ca, --proxy or --api: the profile says all of it.
    let port = free_port().unwrap();
    let mut connect = Command::new(jitgate_bin());
    for (k, _) in std::env::vars() {
        if k.starts_with("JITGATE_") {
            connect.env_remove(k);
        }
    }
    let mut connect = connect
        .args(["connect", "prod-db", "--port", &port.to_string()])
        .env("HOME", home.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = BufReader::new(connect.stdout.take().unwrap());
    let mut first = String::new();
    tokio::time::timeout(Duration::from_secs(20), out.read_line(&mut first))
        .await
        .expect("jitgate connect prints where it listens")
        .unwrap();
    assert!(first.contains(&port.to_string()), "{first}");
    tokio::spawn(async move {
        let mut sink = Vec::new();
        let _ = out.read_to_end(&mut sink).await;
    });
    let plain = format!("host=127.0.0.1 port={port} dbname=prod-db user=whoever sslmode=disable connect_timeout=10");

    let psql = client_command("psql")
        .arg(&plain)
        .args(["-X", "-A", "-t", "-c", "SELECT count(*) FROM items"])
        .output()
        .await
        .unwrap();
    assert!(psql.status.success(), "{}", String::from_utf8_lossy(&psql.stderr));
    assert_eq!(String::from_utf8_lossy(&psql.stdout).trim(), "100");

    let py = Command::new(&python)
        .args([
            "-c",
            "import sys, psycopg\nwith psycopg.connect(sys.argv[1]) as c:\n    print(c.execute('SELECT 41 + 1').fetchone()[0])",
            &plain,
        ])
        .output()
        .await
        .unwrap();
    assert!(py.status.success(), "{}", String::from_utf8_lossy(&py.stderr));
    assert_eq!(String::from_utf8_lossy(&py.stdout).trim(), "42");

    eventually("both statements audited", Duration::from_secs(10), || async {
        let texts: Vec<_> = h
            .audit_events("statement")
            .into_iter()
            .filter(|s| s["user"] == "alice@example.com")
            .map(|s| s["text"].as_str().unwrap_or_default().to_owned())
            .collect();
        texts.iter().any(|t| t == "SELECT count(*) FROM items") && texts.iter().any(|t| t == "SELECT 41 + 1")
    })
    .await;
    assert!(h
        .audit_events("session.start")
        .iter()
        .all(|s| s["user"] == "alice@example.com"));
}
