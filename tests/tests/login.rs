//! `jitgate login` without an identity provider, and the API's first contact: invite codes
//! (single-use, expiring), renewals up to the enrollment's end, the CA pin, the files in
//! ~/.jitgate and the commands that find them there, and the routes a caller without a
//! certificate may use. Single sign-on refusals against a scripted provider are in
//! `login_refusals.rs`; the real provider (oidc-provider) in `oidc.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::Duration;

use jitgate_tests::jitgate::model::AccessLevel;
use jitgate_tests::{run_jitgate, CliRun, Harness, UserCert};

const HOUR: Duration = Duration::from_secs(3600);

/// Runs the CLI with `home` as the engineer's home directory (so ~/.jitgate is its own).
async fn as_engineer(home: &Path, args: &[&str]) -> CliRun {
    let home = home.display().to_string();
    run_jitgate(args, &[("HOME", home.as_str())]).await
}

fn proxy_url(h: &Harness) -> String {
    format!("https://127.0.0.1:{}", h.addrs().api.port())
}

/// `jitgate user invite USER --roles ROLES --ttl TTL` as the admin; the printed code.
async fn invite(h: &Harness, user: &str, roles: &str, ttl: &str) -> String {
    let admin = h.data_dir().display().to_string();
    let api = h.addrs().api.to_string();
    let run = run_jitgate(
        &["user", "invite", user, "--roles", roles, "--ttl", ttl],
        &[("JITGATE_DATA_DIR", admin.as_str()), ("JITGATE_API", api.as_str())],
    )
    .await;
    assert!(run.ok, "{run:?}");
    run.stdout.trim().to_owned()
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

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn an_invite_gets_a_first_certificate_once_and_later_commands_find_it() {
    let h = Harness::start().await;
    let code = invite(&h, "alice", "dev,oncall", "1h").await;
    assert!(code.starts_with("jgi1."), "{code}");
    let home = tempfile::tempdir().unwrap();

    let run = as_engineer(home.path(), &["login", "--proxy", &proxy_url(&h), "--invite", &code]).await;
    assert!(run.ok, "{run:?}");
    assert!(
        run.stdout.contains("logged in as alice (roles: dev, oncall)"),
        "{run:?}"
    );
    let dir = home.path().join(".jitgate");
    assert_eq!(mode(&dir), 0o700);
    for f in ["cert.pem", "key.pem", "ca.pem", "profile.json"] {
        assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
    }
    // The CA saved is the proxy's (the one the code pinned).
    assert_eq!(
        std::fs::read_to_string(dir.join("ca.pem")).unwrap(),
        std::fs::read_to_string(h.data_dir().join("ca.crt")).unwrap()
    );
    // The profile points at the proxy's bound PostgreSQL port (the config says port 0).
    let profile: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("profile.json")).unwrap()).unwrap();
    assert_eq!(
        profile["postgres"],
        format!("127.0.0.1:{}", h.addrs().postgres.port()),
        "{profile}"
    );

    let who = as_engineer(home.path(), &["whoami"]).await;
    assert!(who.ok, "{who:?}");
    assert!(who.stdout.contains("user:    alice"), "{who:?}");
    assert!(who.stdout.contains("roles:   dev, oncall"), "{who:?}");
    assert!(who.stdout.contains("renew until:"), "{who:?}");

    // psql with the certificate, and a command over the API with no flags at all.
    h.grant("alice", "prod-db", AccessLevel::Read, HOUR).await;
    let alice = profile_user(home.path(), "alice");
    let out = h.psql(&alice, "prod-db", "SELECT current_user").await;
    assert!(out.success, "{out:?}");
    assert_eq!(out.stdout.trim(), "jit_reader");
    let list = as_engineer(home.path(), &["grant", "list", "--json"]).await;
    assert!(list.ok, "{list:?}");
    let grants: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
    assert_eq!(grants.as_array().unwrap().len(), 1, "{list:?}");
    assert_eq!(grants[0]["user"], "alice");

    // The code is spent: a second use is refused, and recorded with the reason.
    let other = tempfile::tempdir().unwrap();
    let again = as_engineer(other.path(), &["login", "--proxy", &proxy_url(&h), "--invite", &code]).await;
    assert!(!again.ok, "{again:?}");
    assert!(again.stderr.contains("invite code already used"), "{again:?}");
    assert!(!other.path().join(".jitgate/cert.pem").exists());

    let ok = h.audit_events("login.succeeded");
    assert_eq!(ok.len(), 1, "{ok:?}");
    assert_eq!(ok[0]["method"], "invite");
    assert_eq!(ok[0]["user"], "alice");
    assert_eq!(ok[0]["roles"], serde_json::json!(["dev", "oncall"]));
    let refused = h.audit_events("login.refused");
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0]["reason"], "invite code already used");
    let created = h.audit_events("invite.created");
    assert_eq!(created[0]["user"], "alice");
    assert_eq!(created[0]["by"], "admin");
    // The code itself is in no record.
    let secret = code.split('.').nth(2).unwrap();
    let text = std::fs::read_to_string(h.data_dir().join("audit.jsonl")).unwrap();
    assert!(!text.contains(secret));

    // Logout removes the files; whoami then says so.
    let out = as_engineer(home.path(), &["logout"]).await;
    assert!(out.ok && out.stdout.contains("removed"), "{out:?}");
    assert!(!dir.join("key.pem").exists());
    let who = as_engineer(home.path(), &["whoami"]).await;
    assert!(!who.ok && who.stderr.contains("not logged in"), "{who:?}");
}

#[tokio::test]
async fn expired_unknown_and_forged_invite_codes_are_refused() {
    let h = Harness::start().await;
    let home = tempfile::tempdir().unwrap();
    let code = invite(&h, "bob", "dev", "1s").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let run = as_engineer(home.path(), &["login", "--proxy", &proxy_url(&h), "--invite", &code]).await;
    assert!(!run.ok && run.stderr.contains("invite code expired"), "{run:?}");

    // Another secret under a real id: unknown, not "used" or "expired".
    let good = invite(&h, "bob", "dev", "1h").await;
    let parts: Vec<&str> = good.split('.').collect();
    let forged = format!("jgi1.{}.{}.{}", parts[1], "A".repeat(43), parts[3]);
    let run = as_engineer(home.path(), &["login", "--proxy", &proxy_url(&h), "--invite", &forged]).await;
    assert!(!run.ok && run.stderr.contains("unknown invite code"), "{run:?}");
    // Not a code at all: refused by the CLI before anything is sent.
    let run = as_engineer(home.path(), &["login", "--proxy", &proxy_url(&h), "--invite", "jgi1.x"]).await;
    assert!(!run.ok && run.stderr.contains("not a jitgate invite code"), "{run:?}");
    // The forged attempt did not spend the real code.
    let run = as_engineer(home.path(), &["login", "--proxy", &proxy_url(&h), "--invite", &good]).await;
    assert!(run.ok, "{run:?}");
    let reasons: Vec<String> = h
        .audit_events("login.refused")
        .iter()
        .map(|r| r["reason"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(reasons, ["invite code expired", "unknown invite code"]);
}

#[tokio::test]
async fn the_first_contact_needs_the_pinned_ca_and_never_trusts_on_first_use() {
    let h = Harness::start().await;
    let home = tempfile::tempdir().unwrap();
    // No pin at all: refused before connecting.
    let run = as_engineer(home.path(), &["login", "--proxy", &proxy_url(&h)]).await;
    assert!(!run.ok, "{run:?}");
    assert!(run.stderr.contains("never trusts a proxy on first use"), "{run:?}");

    // The pin of another CA: the TLS handshake fails, nothing is written.
    let other = jitgate_tests::jitgate::pki::Authority::generate().unwrap();
    let wrong = jitgate_tests::jitgate::pki::cert_fingerprint(other.cert_pem()).unwrap();
    let run = as_engineer(
        home.path(),
        &["login", "--proxy", &proxy_url(&h), "--ca-fingerprint", &wrong],
    )
    .await;
    assert!(!run.ok, "{run:?}");
    assert!(run.stderr.contains("does not match the pinned fingerprint"), "{run:?}");

    // An invite whose fingerprint was changed in transit: same.
    let code = invite(&h, "carol", "dev", "1h").await;
    let parts: Vec<&str> = code.split('.').collect();
    let tampered = format!("jgi1.{}.{}.{wrong}", parts[1], parts[2]);
    let run = as_engineer(
        home.path(),
        &["login", "--proxy", &proxy_url(&h), "--invite", &tampered],
    )
    .await;
    assert!(!run.ok && run.stderr.contains("pinned fingerprint"), "{run:?}");
    assert!(!home.path().join(".jitgate").exists());

    // The admin's printed fingerprint is the right pin (this proxy has no [oidc], which the
    // login then says, after a handshake that verified).
    let data_dir = h.data_dir().display().to_string();
    let fp = run_jitgate(&["cert", "fingerprint", "--data-dir", &data_dir], &[]).await;
    assert!(fp.ok, "{fp:?}");
    let run = as_engineer(
        home.path(),
        &["login", "--proxy", &proxy_url(&h), "--ca-fingerprint", fp.stdout.trim()],
    )
    .await;
    assert!(!run.ok, "{run:?}");
    assert!(run.stderr.contains("no [oidc] single sign-on"), "{run:?}");
}

#[tokio::test]
async fn renewal_gives_a_new_certificate_until_the_enrollment_ends() {
    let mut h = Harness::start().await;
    h.reconfigure("[enrollment]\ncert_ttl = \"1m\"\nmax_lifetime = \"72s\"\n")
        .await;
    let home = tempfile::tempdir().unwrap();
    let code = invite(&h, "dave", "dev", "1h").await;
    let run = as_engineer(home.path(), &["login", "--proxy", &proxy_url(&h), "--invite", &code]).await;
    assert!(run.ok, "{run:?}");
    let first = std::fs::read_to_string(home.path().join(".jitgate/cert.pem")).unwrap();
    let first_key = std::fs::read_to_string(home.path().join(".jitgate/key.pem")).unwrap();

    let run = as_engineer(home.path(), &["login", "--renew"]).await;
    assert!(run.ok, "{run:?}");
    let second = std::fs::read_to_string(home.path().join(".jitgate/cert.pem")).unwrap();
    assert_ne!(first, second);
    // A new key with every certificate.
    assert_ne!(
        first_key,
        std::fs::read_to_string(home.path().join(".jitgate/key.pem")).unwrap()
    );
    let who = as_engineer(home.path(), &["whoami", "--json"]).await;
    let who: serde_json::Value = serde_json::from_str(&who.stdout).unwrap();
    assert_eq!(who["user"], "dave");
    assert_eq!(who["roles"], serde_json::json!(["dev"]));
    let renewed: Vec<_> = h.audit_events("login.succeeded");
    assert_eq!(renewed.len(), 2);
    assert_eq!(renewed[1]["method"], "renew");

    // Past the enrollment's end (less than a minute left counts as ended): refused.
    tokio::time::sleep(Duration::from_secs(13)).await;
    let run = as_engineer(home.path(), &["login", "--renew"]).await;
    assert!(!run.ok, "{run:?}");
    assert!(run.stderr.contains("enrollment of dave ended"), "{run:?}");

    // An admin-issued certificate is no enrollment: not renewable.
    let eve = h.user("eve", &["dev"]);
    let eve_home = tempfile::tempdir().unwrap();
    let dir = eve_home.path().join(".jitgate");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(&eve.cert, dir.join("cert.pem")).unwrap();
    std::fs::copy(&eve.key, dir.join("key.pem")).unwrap();
    std::fs::copy(&eve.ca, dir.join("ca.pem")).unwrap();
    let run = as_engineer(eve_home.path(), &["login", "--renew", "--proxy", &proxy_url(&h)]).await;
    assert!(!run.ok && run.stderr.contains("cannot be renewed"), "{run:?}");
    let reasons: Vec<_> = h.audit_events("login.refused");
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert_eq!(reasons[1]["user"], "eve");
}

/// One HTTPS request to the API without a client certificate, trusting the proxy's CA.
async fn anonymous(h: &Harness, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    let fp =
        jitgate_tests::jitgate::pki::cert_fingerprint(&std::fs::read_to_string(h.data_dir().join("ca.crt")).unwrap())
            .unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(jitgate_protocol::pin::PinnedCa::new(&fp, provider)))
        .with_no_client_auth();
    let client = jitgate_tests::jitgate::client::ApiClient::with_tls(&h.addrs().api.to_string(), cfg);
    let method = method.parse().unwrap();
    let body = (!body.is_empty()).then(|| body.as_bytes().to_vec());
    let (status, bytes) = client.raw(method, path, body).await.unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
}

#[tokio::test]
async fn without_a_certificate_the_api_serves_only_the_login_routes() {
    let h = Harness::start().await;
    let (status, body) = anonymous(&h, "GET", "/v1/login", "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["invites"], true);
    for (method, path) in [
        ("GET", "/v1/grants"),
        ("GET", "/v1/whoami"),
        ("POST", "/v1/invites"),
        ("POST", "/v1/login/renew"),
        ("GET", "/v1/sessions"),
        ("POST", "/v1/grants/g-1/revoke"),
        ("GET", "/nope"),
    ] {
        let (status, body) = anonymous(&h, method, path, "{}").await;
        assert_eq!(status, 401, "{method} {path}: {body}");
        assert_eq!(body["code"], "unauthenticated", "{method} {path}");
    }
    // Bad bodies get a problem, never a panic or a hang.
    let (status, body) = anonymous(&h, "POST", "/v1/login/invite", "{not json").await;
    assert_eq!((status, body["code"].as_str()), (400, Some("invalid")), "{body}");
    let (status, body) = anonymous(&h, "POST", "/v1/login/invite", r#"{"code":"x","csr":"y"}"#).await;
    assert_eq!((status, body["code"].as_str()), (400, Some("invalid")), "{body}");
    let (status, body) = anonymous(&h, "POST", "/v1/login/device/token", r#"{"login":"a.b","csr":"c"}"#).await;
    assert_eq!(status, 400, "{body}");
    // SSO calls on a proxy without [oidc]: 404 not_configured.
    let (status, body) = anonymous(&h, "POST", "/v1/login/device", "").await;
    assert_eq!((status, body["code"].as_str()), (404, Some("not_configured")), "{body}");

    // Invites are for admins.
    let dev = h.user("mallory", &["dev"]);
    let run = h
        .cli_as(&dev, &["user", "invite", "mallory2", "--roles", "admin"])
        .await;
    assert!(!run.ok && run.stderr.contains("lacks the admin role"), "{run:?}");
}
