//! The web console's rules over raw HTTPS against the running proxy, without a browser: the
//! page's security headers and nothing served but the embedded files; signing in with a client
//! certificate (the cookie's attributes); the cookie on a connection without a certificate;
//! CSRF for every state-changing call from a browser, also when the browser presents a
//! certificate; a cookie counting only for its own user's certificate; signing out; forged and
//! oversized cookies; and the audit search (`GET /v1/audit`) with its filters.
//!
//! Every connect, handshake, write and read is bounded: a hang fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use jitgate_tests::jitgate::model::AccessLevel;
use jitgate_tests::{eventually, Harness, UserCert};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Longest any one exchange with the proxy may take.
const BOUND: Duration = Duration::from_secs(10);

/// An HTTP response as read off the wire.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: not JSON: {self:?}"))
    }

    /// The problem's `code` (of an `application/problem+json` body).
    fn code(&self) -> String {
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "a problem: {self:?}"
        );
        self.json()["code"].as_str().unwrap_or_default().to_owned()
    }

    /// Asserts the status and problem code.
    #[track_caller]
    fn refused(&self, status: u16, code: &str) {
        assert_eq!((self.status, self.code().as_str()), (status, code), "{}", self.text());
    }

    /// Asserts `200` and returns the JSON body.
    #[track_caller]
    fn ok(&self) -> Value {
        assert_eq!(self.status, 200, "{}", self.text());
        self.json()
    }

    /// The console cookie's value from `Set-Cookie`.
    fn console_cookie(&self) -> String {
        let set = self.header("set-cookie").expect("a Set-Cookie");
        let first = set.split(';').next().unwrap();
        first
            .strip_prefix("jitgate_console=")
            .unwrap_or_else(|| panic!("the console's cookie: {set}"))
            .to_owned()
    }
}

fn tls_config(h: &Harness, cert: Option<&UserCert>) -> Arc<rustls::ClientConfig> {
    let ca = std::fs::read(h.data_dir().join("ca.crt")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&ca) {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let cfg = match cert {
        None => builder.with_no_client_auth(),
        Some(u) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&u.cert)
                .unwrap()
                .map(Result::unwrap)
                .collect();
            let key = PrivateKeyDer::from_pem_file(&u.key).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    };
    Arc::new(cfg)
}

/// Sends `request` (raw bytes) on a new TLS connection and reads until the proxy closes it.
/// `Err`: the connection failed or was closed before an answer. Panics when any step takes
/// longer than [`BOUND`].
async fn exchange(h: &Harness, cert: Option<&UserCert>, request: &[u8]) -> std::io::Result<Vec<u8>> {
    let cfg = tls_config(h, cert);
    let addr = h.addrs().api;
    let work = async move {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let name = ServerName::try_from("localhost").unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await?;
        // A server that answers early and closes may fail the rest of the write: read anyway.
        let written = tls.write_all(request).await;
        let _ = tls.flush().await;
        let mut buf = Vec::new();
        let read = tls.read_to_end(&mut buf).await;
        match (read, written) {
            _ if !buf.is_empty() => Ok(buf),
            (Err(e), _) | (Ok(_), Err(e)) => Err(e),
            (Ok(_), Ok(())) => Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed without an answer",
            )),
        }
    };
    tokio::time::timeout(BOUND, work)
        .await
        .unwrap_or_else(|_| panic!("no answer within {BOUND:?} (the proxy hangs)"))
}

fn parse(raw: &[u8]) -> Reply {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of headers in {:?}", String::from_utf8_lossy(raw)));
    let head = std::str::from_utf8(&raw[..end]).unwrap();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    if chunked {
        body = dechunk(&body);
    } else if let Some(len) = headers.iter().find(|(k, _)| k == "content-length") {
        let len: usize = len.1.parse().unwrap();
        assert!(
            body.len() >= len,
            "body cut short: {len} announced, {} read",
            body.len()
        );
        body.truncate(len);
    }
    Reply { status, headers, body }
}

fn dechunk(mut rest: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let nl = rest.windows(2).position(|w| w == b"\r\n").expect("chunk size line");
        let size_text = std::str::from_utf8(&rest[..nl]).unwrap();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap();
        rest = &rest[nl + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

fn request(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || !matches!(method, "GET" | "HEAD") {
        r.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    r.push_str("\r\n");
    let mut bytes = r.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// One request on a new connection (with `cert`'s client certificate, or none).
async fn send(h: &Harness, cert: Option<&UserCert>, method: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    let raw = exchange(h, cert, &request(method, path, headers, b""))
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    parse(&raw)
}

/// `(Cookie header, CSRF token)` of a console session signed in with `user`'s certificate.
async fn sign_in(h: &Harness, user: &UserCert) -> (String, String) {
    let r = send(
        h,
        Some(user),
        "POST",
        "/ui/session",
        &[("Origin", "https://localhost"), ("Sec-Fetch-Site", "same-origin")],
    )
    .await;
    let body = r.ok();
    assert_eq!(body["user"], user.user.as_str());
    (
        format!("jitgate_console={}", r.console_cookie()),
        body["csrf"].as_str().unwrap().to_owned(),
    )
}

/// Whether grant `id` is still active (as the admin's API lists it).
async fn live(h: &Harness, id: &str) -> bool {
    let grants = tokio::time::timeout(BOUND, h.admin().list_grants())
        .await
        .expect("grants listed in time")
        .unwrap();
    grants.iter().any(|g| g.id.as_str() == id)
}

async fn prod_grant(h: &Harness, user: &str) -> String {
    h.grant(user, "prod-db", AccessLevel::Read, Duration::from_secs(600))
        .await
        .id
        .as_str()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_page_has_strict_headers_and_nothing_but_the_embedded_files_is_served() {
    let h = Harness::start().await;
    let dev = h.user("alice", &["dev"]);
    for cert in [None, Some(&dev)] {
        let r = send(&h, cert, "GET", "/ui/", &[]).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert!(r.header("content-type").unwrap().starts_with("text/html"), "{r:?}");
        assert!(r.text().contains("<html") || r.text().contains("<!doctype"), "the page");
        let csp = r.header("content-security-policy").expect("a CSP");
        assert!(csp.contains("script-src 'self'"), "{csp}");
        assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
        assert!(
            !csp.contains("'unsafe-inline'") && !csp.contains("'unsafe-eval'"),
            "{csp}"
        );
        assert_eq!(r.header("x-frame-options"), Some("DENY"));
        assert_eq!(r.header("x-content-type-options"), Some("nosniff"));

        let r = send(&h, cert, "GET", "/ui/app.js", &[]).await;
        assert_eq!(r.status, 200);
        assert!(
            r.header("content-type").unwrap().starts_with("text/javascript"),
            "{r:?}"
        );
        assert_eq!(r.header("x-content-type-options"), Some("nosniff"));

        send(&h, cert, "GET", "/ui/nope.js", &[])
            .await
            .refused(404, "not_found");
    }
    // Paths out of /ui/: nothing but a refusal, never a file of the host or the source tree.
    for path in [
        "/ui/../../etc/passwd",
        "/ui/../../../../../../etc/passwd",
        "/ui/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/ui/..%2f..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
        "/ui/%2E%2E%2F%2E%2E%2F%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
        "/ui/vendor/../../../../../../etc/passwd",
        "/ui//etc/passwd",
        "/ui/%2fetc%2fpasswd",
        "/ui/..%5c..%5c..%5cetc%5cpasswd",
        "/ui/../Cargo.toml",
        "/ui/%2e%2e/Cargo.toml",
        "/ui/%2e%2e/src/console.rs",
        "/ui/%2e%2e/ui/index.html",
    ] {
        for cert in [None, Some(&dev)] {
            let raw = exchange(&h, cert, &request("GET", path, &[], b"")).await;
            let Ok(raw) = raw else { continue };
            let r = parse(&raw);
            assert!(matches!(r.status, 400 | 404), "{path}: {r:?}");
            let text = r.text();
            assert!(
                !text.contains("root:") && !text.contains("[package]") && !text.contains("<html"),
                "{path} served a file: {text}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_signs_in_and_the_cookie_alone_then_works_behind_its_csrf_token() {
    let h = Harness::start().await;
    let rita = h.user("rita", &["admin", "dba"]);

    // Signing in with the certificate: a strict cookie and the session in the body.
    let r = send(
        &h,
        Some(&rita),
        "POST",
        "/ui/session",
        &[("Origin", "https://localhost"), ("Sec-Fetch-Site", "same-origin")],
    )
    .await;
    let body = r.ok();
    let set = r.header("set-cookie").unwrap().to_owned();
    let attrs: Vec<&str> = set.split(';').map(str::trim).collect();
    for want in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
        assert!(attrs.contains(&want), "{want} in {set}");
    }
    let max_age: u64 = attrs
        .iter()
        .find_map(|a| a.strip_prefix("Max-Age="))
        .expect("a Max-Age")
        .parse()
        .unwrap();
    assert!(max_age > 0 && max_age <= 3600, "not past the certificate: {set}");
    assert_eq!(body["user"], "rita");
    assert_eq!(body["roles"], serde_json::json!(["admin", "dba"]));
    let csrf = body["csrf"].as_str().unwrap().to_owned();
    assert!(csrf.len() >= 32, "{csrf}");
    let token = r.console_cookie();
    assert!(token.len() >= 32 && token != csrf, "{token}");
    let jar = format!("a=1; jitgate_console={token}; b=2");

    // The cookie gives the session back, with the same CSRF token, with or without the
    // certificate.
    for cert in [Some(&rita), None] {
        let shown = send(&h, cert, "GET", "/ui/session", &[("Cookie", &jar)]).await.ok();
        assert_eq!(
            (shown["user"].as_str(), shown["csrf"].as_str()),
            (Some("rita"), Some(csrf.as_str()))
        );
    }

    // Without a certificate: no signing in, and only the login routes without the cookie.
    send(&h, None, "POST", "/ui/session", &[("Origin", "https://localhost")])
        .await
        .refused(401, "unauthenticated");
    send(&h, None, "POST", "/ui/session", &[])
        .await
        .refused(401, "unauthenticated");
    send(&h, None, "GET", "/v1/grants", &[])
        .await
        .refused(401, "unauthenticated");
    send(&h, None, "GET", "/v1/whoami", &[])
        .await
        .refused(401, "unauthenticated");
    send(&h, None, "GET", "/ui/session", &[])
        .await
        .refused(401, "unauthenticated");

    // With the cookie, every route as its user.
    let me = send(&h, None, "GET", "/v1/whoami", &[("Cookie", &jar)]).await.ok();
    assert_eq!(me["user"], "rita");
    assert_eq!(me["roles"], serde_json::json!(["admin", "dba"]));
    let grant = prod_grant(&h, "alice").await;
    let listed = send(&h, None, "GET", "/v1/grants", &[("Cookie", &jar)]).await.ok();
    assert!(
        listed.as_array().unwrap().iter().any(|g| g["id"] == grant.as_str()),
        "{listed}"
    );

    // A state-changing call needs the session's token.
    let revoke = format!("/v1/grants/{grant}/revoke");
    let wrong = "A".repeat(csrf.len());
    for headers in [
        vec![("Cookie", jar.as_str())],
        vec![("Cookie", jar.as_str()), ("X-CSRF-Token", wrong.as_str())],
        vec![("Cookie", jar.as_str()), ("X-CSRF-Token", "")],
        vec![("Cookie", jar.as_str()), ("X-CSRF-Token", token.as_str())],
        vec![
            ("Cookie", jar.as_str()),
            ("Origin", "https://localhost"),
            ("Sec-Fetch-Site", "same-origin"),
        ],
    ] {
        send(&h, None, "POST", &revoke, &headers).await.refused(403, "csrf");
    }
    assert!(live(&h, &grant).await, "the refused calls revoked nothing");
    assert!(h.audit_events("grant.revoked").is_empty());

    let r = send(
        &h,
        None,
        "POST",
        &revoke,
        &[
            ("Cookie", &jar),
            ("X-CSRF-Token", &csrf),
            ("Origin", "https://localhost"),
        ],
    )
    .await;
    let revoked = r.ok();
    assert_eq!(revoked["id"], grant.as_str());
    assert!(!live(&h, &grant).await, "revoked");
    let records = h.audit_events("grant.revoked");
    assert_eq!(records.len(), 1, "{records:?}");
    assert!(
        records[0].to_string().contains("rita"),
        "revoked by the session's user: {records:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_browser_presenting_an_admin_certificate_still_needs_the_token() {
    let h = Harness::start().await;
    let admin = h.user("rita", &["admin"]);
    let grant = prod_grant(&h, "alice").await;
    let revoke = format!("/v1/grants/{grant}/revoke");

    // What a page of another site makes the browser send: its certificate goes along.
    for browser in [
        vec![("Origin", "https://evil.example")],
        vec![("Origin", "https://evil.example"), ("Sec-Fetch-Site", "cross-site")],
        vec![("Sec-Fetch-Site", "cross-site")],
        vec![("Origin", "null"), ("Content-Type", "text/plain")],
        vec![("Origin", "https://evil.example"), ("X-CSRF-Token", "guessed")],
    ] {
        send(&h, Some(&admin), "POST", &revoke, &browser)
            .await
            .refused(403, "csrf");
    }
    assert!(live(&h, &grant).await, "CSRF refused on the certificate connection too");

    // Signing in from another site is refused: no cookie set.
    let r = send(
        &h,
        Some(&admin),
        "POST",
        "/ui/session",
        &[("Origin", "https://evil.example"), ("Sec-Fetch-Site", "cross-site")],
    )
    .await;
    r.refused(403, "csrf");
    assert_eq!(r.header("set-cookie"), None);
    send(
        &h,
        Some(&admin),
        "POST",
        "/ui/session",
        &[("Sec-Fetch-Site", "same-site")],
    )
    .await
    .refused(403, "csrf");
    // From the console's own page it works, and its token then lets the browser revoke.
    let (jar, csrf) = sign_in(&h, &admin).await;
    send(
        &h,
        Some(&admin),
        "POST",
        &revoke,
        &[("Origin", "https://evil.example"), ("Cookie", &jar)],
    )
    .await
    .refused(403, "csrf");
    assert!(live(&h, &grant).await);

    // The same call as the CLI sends it (no browser headers): the certificate is enough.
    let r = send(
        &h,
        Some(&admin),
        "POST",
        &revoke,
        &[("Content-Type", "application/json")],
    )
    .await;
    assert_eq!(r.ok()["id"], grant.as_str());
    assert!(!live(&h, &grant).await);

    // And with the token, from the browser.
    let other = prod_grant(&h, "bob").await;
    let r = send(
        &h,
        Some(&admin),
        "POST",
        &format!("/v1/grants/{other}/revoke"),
        &[
            ("Origin", "https://localhost"),
            ("Cookie", &jar),
            ("X-CSRF-Token", &csrf),
        ],
    )
    .await;
    assert_eq!(r.ok()["id"], other.as_str());
    assert!(!live(&h, &other).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cookie_counts_only_on_its_own_users_certificate() {
    let h = Harness::start().await;
    let alice = h.user("alice", &["admin", "dba"]);
    let bob = h.user("bob", &["admin"]);
    let (jar, csrf) = sign_in(&h, &alice).await;

    // On bob's connection, alice's cookie is ignored: the certificate wins.
    let me = send(&h, Some(&bob), "GET", "/v1/whoami", &[("Cookie", &jar)])
        .await
        .ok();
    assert_eq!(me["user"], "bob");
    assert_eq!(me["roles"], serde_json::json!(["admin"]));
    send(&h, Some(&bob), "GET", "/ui/session", &[("Cookie", &jar)])
        .await
        .refused(401, "unauthenticated");

    // Nor does alice's token make bob's browser calls pass (bob could revoke: he is an admin).
    let grant = prod_grant(&h, "carol").await;
    let revoke = format!("/v1/grants/{grant}/revoke");
    send(
        &h,
        Some(&bob),
        "POST",
        &revoke,
        &[
            ("Origin", "https://localhost"),
            ("Cookie", &jar),
            ("X-CSRF-Token", &csrf),
        ],
    )
    .await
    .refused(403, "csrf");
    send(
        &h,
        Some(&bob),
        "POST",
        &revoke,
        &[("Cookie", &jar), ("X-CSRF-Token", &csrf)],
    )
    .await
    .refused(403, "csrf");
    assert!(live(&h, &grant).await);

    // On alice's own certificate the same request passes, as alice.
    let r = send(
        &h,
        Some(&alice),
        "POST",
        &revoke,
        &[
            ("Origin", "https://localhost"),
            ("Cookie", &jar),
            ("X-CSRF-Token", &csrf),
        ],
    )
    .await;
    r.ok();
    assert!(!live(&h, &grant).await);
    let records = h.audit_events("grant.revoked");
    assert_eq!(records.len(), 1);
    assert!(records[0].to_string().contains("\"alice\""), "{records:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn signing_out_ends_the_session_and_forged_or_huge_cookies_get_nowhere() {
    let h = Harness::start().await;
    let alice = h.user("alice", &["dev"]);
    // A session of a certificate that ends in a few seconds ends with it.
    let brief = h.user_with_ttl("brief", &["dev"], Duration::from_secs(4));
    let (brief_jar, _) = sign_in(&h, &brief).await;
    let brief_ends = SystemTime::now() + Duration::from_secs(5);
    assert_eq!(
        send(&h, None, "GET", "/v1/whoami", &[("Cookie", &brief_jar)])
            .await
            .ok()["user"],
        "brief"
    );
    let (jar, csrf) = sign_in(&h, &alice).await;
    send(&h, None, "GET", "/v1/whoami", &[("Cookie", &jar)]).await.ok();

    // Signing out is state-changing too.
    send(&h, None, "POST", "/ui/logout", &[("Cookie", &jar)])
        .await
        .refused(403, "csrf");
    send(
        &h,
        None,
        "POST",
        "/ui/logout",
        &[("Cookie", &jar), ("X-CSRF-Token", "nope")],
    )
    .await
    .refused(403, "csrf");
    send(&h, None, "GET", "/v1/whoami", &[("Cookie", &jar)]).await.ok();

    let r = send(
        &h,
        None,
        "POST",
        "/ui/logout",
        &[
            ("Cookie", &jar),
            ("X-CSRF-Token", &csrf),
            ("Origin", "https://localhost"),
        ],
    )
    .await;
    assert_eq!(r.status, 204, "{r:?}");
    let set = r.header("set-cookie").expect("the cookie cleared");
    assert!(set.starts_with("jitgate_console=;"), "{set}");
    assert!(set.split(';').any(|a| a.trim() == "Max-Age=0"), "{set}");
    send(&h, None, "GET", "/v1/whoami", &[("Cookie", &jar)])
        .await
        .refused(401, "unauthenticated");
    send(&h, None, "GET", "/ui/session", &[("Cookie", &jar)])
        .await
        .refused(401, "unauthenticated");
    // Its token is gone with it.
    send(
        &h,
        Some(&alice),
        "POST",
        "/v1/requests",
        &[
            ("Cookie", &jar),
            ("X-CSRF-Token", &csrf),
            ("Origin", "https://localhost"),
        ],
    )
    .await
    .refused(403, "csrf");

    // Forged cookies, and a live session's value under another cookie's name.
    let (live_jar, _) = sign_in(&h, &alice).await;
    let live_token = live_jar.trim_start_matches("jitgate_console=");
    let random = "Zm9yZ2VkLWNvb2tpZS12YWx1ZS0wMTIzNDU2Nzg5YWJjZGVm";
    for forged in [
        format!("jitgate_console={random}"),
        "jitgate_console=".to_owned(),
        "jitgate_console=../../etc/passwd".to_owned(),
        format!("jitgate_console={live_token}x"),
        format!("xjitgate_console={live_token}"),
        format!("jitgate_console_login={live_token}"),
    ] {
        send(&h, None, "GET", "/v1/whoami", &[("Cookie", &forged)])
            .await
            .refused(401, "unauthenticated");
    }
    send(&h, None, "GET", "/v1/whoami", &[("Cookie", &live_jar)]).await.ok();

    // A huge Cookie header: an error or a closed connection, in time.
    for size in [64 * 1024, 1024 * 1024] {
        let huge = format!("jitgate_console={}", "A".repeat(size));
        match exchange(&h, None, &request("GET", "/v1/whoami", &[("Cookie", &huge)], b"")).await {
            Ok(raw) => {
                let r = parse(&raw);
                eprintln!("{size} bytes of cookie: {}", r.status);
                assert!(r.status >= 400, "{size}: {}", r.status);
            }
            Err(e) => eprintln!("{size} bytes of cookie: connection closed ({e})"),
        }
        // Many cookies in many headers.
        let many: Vec<(&str, &str)> = (0..200).map(|_| ("Cookie", "a=1; b=2; c=3")).collect();
        if let Ok(raw) = exchange(&h, None, &request("GET", "/v1/whoami", &many, b"")).await {
            assert!(parse(&raw).status >= 400);
        }
    }
    // The proxy still answers, with and without a certificate.
    assert_eq!(send(&h, None, "GET", "/ui/", &[]).await.status, 200);
    let me = send(&h, Some(&alice), "GET", "/v1/whoami", &[]).await.ok();
    assert_eq!(me["user"], "alice");

    // The brief certificate has ended by now (or soon): its session with it.
    if let Ok(left) = brief_ends.duration_since(SystemTime::now()) {
        tokio::time::sleep(left).await;
    }
    send(&h, None, "GET", "/v1/whoami", &[("Cookie", &brief_jar)])
        .await
        .refused(401, "unauthenticated");
    send(&h, None, "GET", "/ui/session", &[("Cookie", &brief_jar)])
        .await
        .refused(401, "unauthenticated");
}

/// `GET /v1/audit?query` as `user`.
async fn audit(h: &Harness, user: &UserCert, query: &str) -> Reply {
    send(h, Some(user), "GET", &format!("/v1/audit?{query}"), &[]).await
}

fn events(found: &Value) -> Vec<String> {
    found["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["event"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_audit_search_is_for_auditors_and_finds_what_it_is_asked() {
    let h = Harness::start().await;
    let alice = h.user("alice", &["dev"]);
    let sam = h.user("sam", &["auditor"]);
    let admin = h.user("rita", &["admin"]);

    audit(&h, &alice, "").await.refused(403, "forbidden");
    audit(&h, &alice, "event=statement").await.refused(403, "forbidden");
    send(&h, None, "GET", "/v1/audit", &[])
        .await
        .refused(401, "unauthenticated");
    let all = audit(&h, &sam, "").await.ok();
    assert!(all["records"].is_array() && all["truncated"] == false, "{all}");
    audit(&h, &admin, "limit=5").await.ok();

    h.grant("alice", "prod-db", AccessLevel::Read, Duration::from_secs(600))
        .await;
    let before = SystemTime::now() - Duration::from_millis(5);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let out = h.psql(&alice, "prod-db", "SELECT 'needle-1'").await;
    assert!(out.success, "{}", out.stderr);
    eventually(
        "the statement and the session's end logged",
        Duration::from_secs(10),
        || async {
            h.audit_events("statement")
                .iter()
                .any(|s| s.to_string().contains("needle-1"))
                && !h.audit_events("session.end").is_empty()
        },
    )
    .await;
    let after = SystemTime::now() + Duration::from_secs(1);

    // By event, user and text (any case): exactly that statement.
    let found = audit(&h, &sam, "event=statement&user=alice&text=NEEDLE-1").await.ok();
    let records = found["records"].as_array().unwrap();
    assert_eq!(records.len(), 1, "{found}");
    assert_eq!(records[0]["event"], "statement");
    assert_eq!(records[0]["user"], "alice");
    assert!(records[0].to_string().contains("SELECT 'needle-1'"), "{found}");
    assert_eq!(found["truncated"], false);
    let statement_session = records[0]["session_id"].as_str().unwrap().to_owned();
    let found = audit(&h, &sam, "text=needle-2").await.ok();
    assert!(events(&found).is_empty(), "{found}");

    // A family: session.start and session.end, nothing else.
    let found = audit(&h, &sam, "event=session").await.ok();
    let got = events(&found);
    assert!(got.iter().any(|e| e == "session.start"), "{got:?}");
    assert!(got.iter().any(|e| e == "session.end"), "{got:?}");
    assert!(
        got.iter().all(|e| e == "session.start" || e == "session.end"),
        "{got:?}"
    );

    // By session: its records in order.
    let found = audit(&h, &sam, &format!("session={statement_session}")).await.ok();
    let got = events(&found);
    assert_eq!(got.first().map(String::as_str), Some("session.start"), "{got:?}");
    assert_eq!(got.last().map(String::as_str), Some("session.end"), "{got:?}");
    assert!(got.iter().any(|e| e == "statement"), "{got:?}");

    // Another user: none of alice's.
    let found = audit(&h, &sam, "user=bob").await.ok();
    let records = found["records"].as_array().unwrap();
    assert!(
        records
            .iter()
            .all(|r| r["user"] != "alice" && r["session_id"] != statement_session.as_str()),
        "{found}"
    );
    assert!(!found.to_string().contains("needle-1"), "{found}");

    // The latest of them only, saying more were left out.
    let found = audit(&h, &sam, "event=session&user=alice&limit=1").await.ok();
    assert_eq!(events(&found), vec!["session.end".to_owned()], "{found}");
    assert_eq!(found["truncated"], true, "{found}");
    let found = audit(&h, &sam, "event=session&user=alice&limit=2").await.ok();
    assert_eq!(events(&found), vec!["session.start", "session.end"], "{found}");
    assert_eq!(found["truncated"], false, "{found}");

    // Until: a time before the statement excludes it, one after keeps it (and its end: the
    // `statement` family).
    let rfc = jitgate_tests::jitgate::timefmt::rfc3339;
    let q = |until: SystemTime| format!("event=statement&user=alice&until={}", rfc(until));
    assert!(events(&audit(&h, &sam, &q(before)).await.ok()).is_empty());
    assert_eq!(
        events(&audit(&h, &sam, &q(after)).await.ok()),
        vec!["statement", "statement.end"]
    );
    // Since: the reverse.
    let q = |since: SystemTime| format!("event=statement&user=alice&since={}", rfc(since));
    assert_eq!(
        events(&audit(&h, &sam, &q(before)).await.ok()),
        vec!["statement", "statement.end"]
    );
    assert!(events(&audit(&h, &sam, &q(after)).await.ok()).is_empty());

    // Refused queries.
    audit(&h, &sam, "since=garbage").await.refused(400, "invalid");
    audit(&h, &sam, "until=yesterday-ish").await.refused(400, "invalid");
    audit(&h, &sam, "bogus=1").await.refused(400, "invalid");
    audit(&h, &sam, "limit=many").await.refused(400, "invalid");
}

impl Reply {
    /// Every value of header `name`.
    fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The error the console's page is sent back with (`/ui/?error=...`), decoded.
    fn sent_back_with_error(&self) -> String {
        assert_eq!(self.status, 303, "{self:?}");
        let location = self.header("location").unwrap_or_default();
        let error = location
            .strip_prefix("/ui/?error=")
            .unwrap_or_else(|| panic!("back to the page with an error: {location}"));
        assert!(
            !self.all("set-cookie").iter().any(|c| c.starts_with("jitgate_console=")),
            "no console session: {self:?}"
        );
        percent_decode(error)
    }
}

fn percent_decode(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 3 <= b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Starts a console sign-in: (the provider's authorization URL, the sign-in cookie).
async fn start_sso(h: &Harness) -> (String, String) {
    let r = send(h, None, "GET", "/ui/oidc/start", &[]).await;
    assert_eq!(r.status, 303, "{r:?}");
    let cookie = r.header("set-cookie").unwrap().to_owned();
    for attr in ["Path=/ui/oidc", "Secure", "HttpOnly", "SameSite=Lax"] {
        assert!(cookie.contains(attr), "{attr}: {cookie}");
    }
    let pair = cookie.split(';').next().unwrap().to_owned();
    assert!(pair.starts_with("jitgate_console_login="), "{pair}");
    (r.header("location").unwrap().to_owned(), pair)
}

/// carol signs in at the provider: the callback path and query it redirects the browser to.
async fn provider_sign_in(authorization_url: &str) -> String {
    let fixture = jitgate_tests::npm_fixture("oidc", "oidc-provider");
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("node")
            .arg(fixture.join("user.mjs"))
            .args(["authorize", authorization_url, "carol"])
            .env("PRINT_REDIRECT", "1")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("user.mjs finishes")
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let url = text
        .lines()
        .find_map(|l| l.strip_prefix("REDIRECT "))
        .unwrap_or_else(|| panic!("no redirect: {text}"));
    let path = url.split_once("/ui/oidc/callback").map(|(_, q)| q).unwrap();
    format!("/ui/oidc/callback{path}")
}

#[tokio::test(flavor = "multi_thread")]
async fn single_sign_on_callbacks_that_are_not_this_browsers_are_refused() {
    let (h, _provider, issuer) = jitgate_tests::console_sso_harness("").await;

    // The start sends the browser to the provider, with PKCE and a nonce.
    let (url, cookie) = start_sso(&h).await;
    assert!(url.starts_with(&issuer), "{url}");
    for part in ["code_challenge_method=S256", "code_challenge=", "nonce=", "state="] {
        assert!(url.contains(part), "{part}: {url}");
    }
    let callback = provider_sign_in(&url).await;
    let state = callback.split("state=").nth(1).unwrap().split('&').next().unwrap();
    assert!(callback.contains("code="), "{callback}");

    // Not this browser's: without the sign-in cookie, or with another sign-in's cookie.
    let r = send(&h, None, "GET", &callback, &[]).await;
    assert!(r.sent_back_with_error().contains("did not start the sign-in"), "{r:?}");
    let (_, other) = start_sso(&h).await;
    let r = send(&h, None, "GET", &callback, &[("Cookie", &other)]).await;
    assert!(r.sent_back_with_error().contains("another state"), "{r:?}");
    // A state changed on the way, and an edited handle.
    let changed = callback.replace(state, "forged-state");
    let r = send(&h, None, "GET", &changed, &[("Cookie", &cookie)]).await;
    assert!(r.sent_back_with_error().contains("another state"), "{r:?}");
    let edited = format!("{cookie}x");
    let r = send(&h, None, "GET", &callback, &[("Cookie", &edited)]).await;
    assert!(r.sent_back_with_error().contains("unknown login"), "{r:?}");
    // The provider's own refusal comes back as such.
    let r = send(
        &h,
        None,
        "GET",
        "/ui/oidc/callback?error=access_denied&error_description=aborted",
        &[("Cookie", &cookie)],
    )
    .await;
    assert!(r.sent_back_with_error().contains("access_denied"), "{r:?}");

    // This browser's: a console session as carol, and the sign-in cookie is cleared.
    let r = send(&h, None, "GET", &callback, &[("Cookie", &cookie)]).await;
    assert_eq!((r.status, r.header("location")), (303, Some("/ui/")), "{r:?}");
    let cookies = r.all("set-cookie");
    assert!(
        cookies
            .iter()
            .any(|c| c.starts_with("jitgate_console_login=;") && c.contains("Max-Age=0")),
        "{cookies:?}"
    );
    let session = cookies
        .iter()
        .find_map(|c| c.strip_prefix("jitgate_console="))
        .map(|c| format!("jitgate_console={}", c.split(';').next().unwrap()))
        .expect("a console session");
    let me = send(&h, None, "GET", "/v1/whoami", &[("Cookie", &session)]).await.ok();
    assert_eq!(me["user"], "carol@example.com");
    assert_eq!(me["roles"], serde_json::json!(["dba"]));

    // The same callback again (a replay): refused, no second session.
    let r = send(&h, None, "GET", &callback, &[("Cookie", &cookie)]).await;
    let error = r.sent_back_with_error();
    assert!(!error.is_empty(), "{r:?}");

    eventually("the refusals audited", Duration::from_secs(10), || async {
        let refused = h.audit_events("login.refused");
        refused.iter().filter(|e| e["method"] == "console").count() >= 3
    })
    .await;
    let ok = h.audit_events("login.succeeded");
    assert_eq!(
        ok.iter().filter(|e| e["method"] == "console").count(),
        1,
        "one sign-in: {ok:?}"
    );
}
