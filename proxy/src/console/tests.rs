//! The console's sessions and per-request rules ([`Consoles::gate`]), without a listener.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use crate::model::{Role, UserName};

fn identity(user: &str, roles: &[&str], not_after: SystemTime) -> Arc<Identity> {
    Arc::new(Identity {
        user: UserName::new(user).unwrap(),
        roles: roles.iter().map(|r| Role::new(*r).unwrap()).collect(),
        not_after,
        enrolled_until: None,
    })
}

/// An identity whose certificate is valid for another hour.
fn valid(user: &str, roles: &[&str]) -> Arc<Identity> {
    identity(user, roles, SystemTime::now() + Duration::from_secs(3600))
}

/// Headers from `(name, value)` pairs.
fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

fn cookie_of(token: &str) -> String {
    format!("{COOKIE}={token}")
}

/// The user the gate lets `headers` route as, or the refusal.
fn caller(
    c: &Consoles,
    cert: Option<&Arc<Identity>>,
    method: Method,
    h: &HeaderMap,
    path: &str,
) -> Result<Option<String>, Refused> {
    c.gate(cert, &method, h, path)
        .map(|id| id.map(|id| id.user.to_string()))
}

const REVOKE: &str = "/v1/grants/g-1/revoke";

#[test]
fn a_session_is_found_by_its_cookie_and_routes_an_anonymous_connection_as_its_user() {
    let c = Consoles::default();
    let alice = valid("alice", &["dev", "dba"]);
    let (token, shown) = c.create(Arc::clone(&alice), SystemTime::now());
    assert_eq!(shown.user, "alice");
    assert_eq!(shown.roles, vec!["dev".to_owned(), "dba".to_owned()]);
    assert!(
        !shown.csrf.is_empty() && shown.csrf != token,
        "the CSRF token is not the cookie"
    );

    let h = headers(&[("cookie", &cookie_of(&token))]);
    let (id, csrf, _) = c.lookup(&h, SystemTime::now()).expect("found by its cookie");
    assert_eq!(*id, *alice);
    assert_eq!(csrf, shown.csrf);
    let got = c.gate(None, &Method::GET, &h, "/v1/whoami").unwrap().expect("a caller");
    assert_eq!(*got, *alice, "the session's identity, roles included");

    // Without a cookie, or with one naming no session: no caller.
    assert_eq!(caller(&c, None, Method::GET, &HeaderMap::new(), "/v1/whoami"), Ok(None));
    let forged = headers(&[("cookie", &cookie_of("forged-value"))]);
    assert_eq!(caller(&c, None, Method::GET, &forged, "/v1/whoami"), Ok(None));
    // Two sessions of the same identity are distinct.
    let (other, again) = c.create(alice, SystemTime::now());
    assert_ne!(other, token);
    assert_ne!(again.csrf, shown.csrf);
}

#[test]
fn a_browser_post_needs_its_own_sessions_csrf_token() {
    let c = Consoles::default();
    let (token, shown) = c.create(valid("alice", &["admin"]), SystemTime::now());
    let (_, other) = c.create(valid("alice", &["admin"]), SystemTime::now());
    let jar = cookie_of(&token);
    for (what, extra) in [
        ("no token", None),
        ("a wrong token", Some("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")),
        ("an empty token", Some("")),
        ("the token of another session", Some(other.csrf.as_str())),
        ("the cookie itself", Some(token.as_str())),
    ] {
        let mut pairs = vec![("cookie", jar.as_str()), ("origin", "https://localhost:8443")];
        if let Some(t) = extra {
            pairs.push((CSRF_HEADER, t));
        }
        let h = headers(&pairs);
        for method in [Method::POST, Method::PUT, Method::DELETE, Method::PATCH] {
            assert!(
                c.gate(None, &method, &h, REVOKE).is_err(),
                "{method} with {what} refused"
            );
        }
    }
    let h = headers(&[
        ("cookie", &jar),
        ("origin", "https://localhost:8443"),
        (CSRF_HEADER, &shown.csrf),
    ]);
    assert_eq!(caller(&c, None, Method::POST, &h, REVOKE), Ok(Some("alice".into())));
    // The cookie alone (no Origin) already makes it a browser's call.
    let h = headers(&[("cookie", &jar)]);
    assert!(c.gate(None, &Method::POST, &h, REVOKE).is_err());
    let h = headers(&[("cookie", &jar), (CSRF_HEADER, &shown.csrf)]);
    assert_eq!(caller(&c, None, Method::POST, &h, REVOKE), Ok(Some("alice".into())));
}

#[test]
fn safe_methods_need_no_token() {
    let c = Consoles::default();
    let (token, _) = c.create(valid("alice", &["dev"]), SystemTime::now());
    let h = headers(&[
        ("cookie", &cookie_of(&token)),
        ("origin", "https://localhost"),
        ("sec-fetch-site", "same-origin"),
    ]);
    for method in [Method::GET, Method::HEAD, Method::OPTIONS] {
        assert_eq!(caller(&c, None, method, &h, "/v1/grants"), Ok(Some("alice".into())));
    }
}

#[test]
fn any_browser_header_asks_for_the_token_even_with_a_certificate() {
    let c = Consoles::default();
    let admin = valid("root", &["admin"]);
    for browser in [
        ("origin", "https://evil.example"),
        ("origin", "null"),
        ("sec-fetch-site", "cross-site"),
        ("sec-fetch-site", "same-origin"),
        ("cookie", "jitgate_console=whatever"),
    ] {
        let h = headers(&[browser]);
        assert_eq!(
            c.gate(Some(&admin), &Method::POST, &h, REVOKE),
            Err(Refused(
                "a state-changing call from a browser needs its console session's X-CSRF-Token"
            )),
            "{browser:?}"
        );
        // A token without a session does not help.
        let h = headers(&[browser, (CSRF_HEADER, "anything")]);
        assert!(c.gate(Some(&admin), &Method::POST, &h, REVOKE).is_err(), "{browser:?}");
    }
}

#[test]
fn a_program_without_browser_headers_passes_with_its_certificate() {
    let c = Consoles::default();
    let admin = valid("root", &["admin"]);
    let h = headers(&[
        ("content-type", "application/json"),
        ("user-agent", "jitgate/1"),
        ("cookie", "other=1"),
    ]);
    let got = c.gate(Some(&admin), &Method::POST, &h, REVOKE).unwrap().unwrap();
    assert_eq!(*got, *admin);
    // Without a certificate, such a program has no caller (the login routes only), but is
    // not refused here either.
    assert_eq!(caller(&c, None, Method::POST, &h, "/v1/login/device"), Ok(None));
    assert_eq!(caller(&c, None, Method::POST, &h, REVOKE), Ok(None));
}

#[test]
fn with_a_certificate_a_cookie_of_another_user_is_ignored() {
    let c = Consoles::default();
    let alice = valid("alice", &["admin"]);
    let bob = valid("bob", &["dev"]);
    let (alice_token, alice_view) = c.create(Arc::clone(&alice), SystemTime::now());
    let jar = cookie_of(&alice_token);

    let h = headers(&[("cookie", &jar)]);
    let got = c.gate(Some(&bob), &Method::GET, &h, "/v1/whoami").unwrap().unwrap();
    assert_eq!(*got, *bob, "the certificate's identity, not the cookie's");
    // Alice's token on bob's connection does not make a browser POST pass.
    let h = headers(&[
        ("cookie", &jar),
        ("origin", "https://localhost"),
        (CSRF_HEADER, &alice_view.csrf),
    ]);
    assert!(c.gate(Some(&bob), &Method::POST, &h, REVOKE).is_err());
    // On alice's own certificate it does, and routes as the certificate.
    let got = c.gate(Some(&alice), &Method::POST, &h, REVOKE).unwrap().unwrap();
    assert_eq!(*got, *alice);
    // Bob's own session on bob's connection passes too.
    let (bob_token, bob_view) = c.create(Arc::clone(&bob), SystemTime::now());
    let h = headers(&[
        ("cookie", &cookie_of(&bob_token)),
        ("origin", "https://localhost"),
        (CSRF_HEADER, &bob_view.csrf),
    ]);
    assert_eq!(caller(&c, Some(&bob), Method::POST, &h, REVOKE), Ok(Some("bob".into())));
}

#[test]
fn signing_in_is_possible_from_the_consoles_own_page_only() {
    let c = Consoles::default();
    let alice = valid("alice", &["dev"]);
    for site in ["cross-site", "same-site", "none", ""] {
        let h = headers(&[("sec-fetch-site", site), ("origin", "https://localhost")]);
        assert_eq!(
            c.gate(Some(&alice), &Method::POST, &h, "/ui/session"),
            Err(Refused("signing in to the console is possible from its own page only")),
            "Sec-Fetch-Site: {site:?}"
        );
    }
    // From the page itself, or from a browser that sends no Sec-Fetch-Site, without a token.
    for h in [
        headers(&[("sec-fetch-site", "same-origin"), ("origin", "https://localhost")]),
        headers(&[("origin", "https://localhost")]),
        headers(&[]),
    ] {
        assert_eq!(
            caller(&c, Some(&alice), Method::POST, &h, "/ui/session"),
            Ok(Some("alice".into()))
        );
    }
    // The exemption is POST /ui/session alone: logging out needs the token.
    let h = headers(&[("sec-fetch-site", "same-origin")]);
    assert!(c.gate(Some(&alice), &Method::POST, &h, "/ui/logout").is_err());
    assert!(c.gate(Some(&alice), &Method::PUT, &h, "/ui/session").is_err());
    assert!(c.gate(Some(&alice), &Method::POST, &h, "/ui/session/").is_err());
}

#[test]
fn a_session_never_outlives_its_certificate() {
    let c = Consoles::default();
    let now = SystemTime::now();
    let expired = identity("alice", &["dev"], now - Duration::from_secs(1));
    let (token, shown) = c.create(expired, now);
    assert!(shown.expires_at <= now, "clamped to the certificate's end");
    let h = headers(&[("cookie", &cookie_of(&token))]);
    assert!(c.lookup(&h, now).is_none(), "never found");
    assert_eq!(caller(&c, None, Method::GET, &h, "/v1/whoami"), Ok(None));
    let h = headers(&[("cookie", &cookie_of(&token)), (CSRF_HEADER, &shown.csrf)]);
    assert!(c.gate(None, &Method::POST, &h, REVOKE).is_err(), "nor its token");

    // One that ends in 30s: found until then, not after, and gone once found expired.
    let soon = identity("bob", &["dev"], now + Duration::from_secs(30));
    let (token, shown) = c.create(soon, now);
    assert_eq!(shown.expires_at, now + Duration::from_secs(30));
    let h = headers(&[("cookie", &cookie_of(&token))]);
    assert!(c.lookup(&h, now + Duration::from_secs(29)).is_some());
    assert!(c.lookup(&h, now + Duration::from_secs(30)).is_none());
    assert!(c.lookup(&h, now).is_none(), "removed when found expired");

    // A long-lived certificate: at most 8 hours.
    let long = identity("carol", &["dev"], now + Duration::from_secs(30 * 24 * 3600));
    let (token, shown) = c.create(long, now);
    assert_eq!(shown.expires_at, now + SESSION_TTL);
    let h = headers(&[("cookie", &cookie_of(&token))]);
    assert!(c.lookup(&h, now + SESSION_TTL - Duration::from_secs(1)).is_some());
    assert!(c.lookup(&h, now + SESSION_TTL).is_none());
}

#[test]
fn a_removed_session_is_gone() {
    let c = Consoles::default();
    let (token, _) = c.create(valid("alice", &["dev"]), SystemTime::now());
    let (kept, _) = c.create(valid("alice", &["dev"]), SystemTime::now());
    let h = headers(&[("cookie", &cookie_of(&token))]);
    c.remove(&h);
    assert!(c.lookup(&h, SystemTime::now()).is_none());
    let h = headers(&[("cookie", &cookie_of(&kept))]);
    assert!(c.lookup(&h, SystemTime::now()).is_some(), "the other session stays");
}

#[test]
fn the_cookie_is_found_among_others() {
    let h = headers(&[("cookie", "a=1; jitgate_console=TOKEN; b=2")]);
    assert_eq!(cookie(&h, COOKIE), Some("TOKEN"));
    let h = headers(&[("cookie", "a=1;jitgate_console=TOKEN;b=2")]);
    assert_eq!(cookie(&h, COOKIE), Some("TOKEN"));
    let h = headers(&[("cookie", "  jitgate_console=TOKEN  ")]);
    assert_eq!(cookie(&h, COOKIE), Some("TOKEN"));
    // In a second Cookie header.
    let h = headers(&[("cookie", "a=1"), ("cookie", "b=2; jitgate_console=TOKEN")]);
    assert_eq!(cookie(&h, COOKIE), Some("TOKEN"));
    // Not ours.
    for jar in [
        "xjitgate_console=TOKEN",
        "jitgate_console_x=TOKEN",
        "a=jitgate_console=TOKEN",
        "jitgate_console",
        "",
    ] {
        let h = headers(&[("cookie", jar)]);
        assert_eq!(cookie(&h, COOKIE), None, "{jar:?}");
    }
    assert_eq!(cookie(&HeaderMap::new(), COOKIE), None);

    // Through the gate: a session is found in a jar of several cookies.
    let c = Consoles::default();
    let (token, _) = c.create(valid("alice", &["dev"]), SystemTime::now());
    let h = headers(&[("cookie", &format!("a=1; {COOKIE}={token}; b=2"))]);
    assert_eq!(
        caller(&c, None, Method::GET, &h, "/v1/whoami"),
        Ok(Some("alice".into()))
    );
    // Under another name it is neither a session nor a browser's cookie.
    let h = headers(&[("cookie", &format!("x{COOKIE}={token}"))]);
    assert_eq!(caller(&c, None, Method::GET, &h, "/v1/whoami"), Ok(None));
    let admin = valid("root", &["admin"]);
    assert_eq!(
        caller(&c, Some(&admin), Method::POST, &h, REVOKE),
        Ok(Some("root".into()))
    );
}

#[test]
fn the_oldest_session_goes_first_when_full() {
    let c = Consoles::default();
    let start = SystemTime::now();
    let id = valid("alice", &["dev"]);
    let (first, _) = c.create(Arc::clone(&id), start);
    let (second, _) = c.create(Arc::clone(&id), start + Duration::from_secs(1));
    for i in 2..MAX_SESSIONS {
        c.create(
            Arc::clone(&id),
            start + Duration::from_secs(2) + Duration::from_millis(i as u64),
        );
    }
    assert_eq!(c.lock().len(), MAX_SESSIONS);
    let (last, _) = c.create(id, start + Duration::from_secs(60));
    assert_eq!(c.lock().len(), MAX_SESSIONS);
    let at = start + Duration::from_secs(61);
    assert!(
        c.lookup(&headers(&[("cookie", &cookie_of(&first))]), at).is_none(),
        "the oldest went"
    );
    assert!(c.lookup(&headers(&[("cookie", &cookie_of(&second))]), at).is_some());
    assert!(c.lookup(&headers(&[("cookie", &cookie_of(&last))]), at).is_some());
}
