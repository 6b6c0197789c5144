//! The web console: static pages under `/ui/` on the API listener, embedded in the binary,
//! that call the JSON API like any other client.
//!
//! Signing in: a browser that presented a client certificate on the connection `POST`s
//! `/ui/session` and gets a session cookie (`jitgate_console`: HttpOnly, Secure,
//! SameSite=Strict, at most 8 hours and never past the certificate) and a CSRF token. A
//! browser is recognised by what browsers send (`Origin`, `Sec-Fetch-Site`, or the console
//! cookie); every state-changing call from one must carry `X-CSRF-Token` equal to its
//! session's token, or it is refused with `403` (code `csrf`), whatever certificate the
//! connection has. Programs (the CLI, Slack) send none of those headers and are unaffected.
//!
//! Sessions live in this replica's memory: a restart or another replica asks to sign in again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};

use crate::api::ApiState;
use crate::login::random_token;
use crate::pki::Identity;

/// The console's session cookie.
pub const COOKIE: &str = "jitgate_console";
/// The cookie that carries a single sign-on in progress back from the provider: the sealed
/// handle (state, nonce, PKCE verifier). `SameSite=Lax`, as the provider's redirect back is
/// a cross-site navigation; scoped to `/ui/oidc`.
pub const LOGIN_COOKIE: &str = "jitgate_console_login";
/// The header that carries the CSRF token.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// Longest console session.
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);
/// Most console sessions held at once; the oldest go first.
const MAX_SESSIONS: usize = 10_000;

/// Content-Security-Policy of every console page and asset: scripts, styles and calls from
/// this origin only, nothing inline, no `eval`, no framing. `'wasm-unsafe-eval'` lets the
/// vendored asciinema-player compile its terminal emulator (WebAssembly from its own file).
pub const CSP: &str =
    "default-src 'none'; script-src 'self' 'wasm-unsafe-eval'; style-src 'self'; img-src 'self' data:; \
connect-src 'self'; font-src 'self'; worker-src 'self'; frame-ancestors 'none'; base-uri 'none'; \
form-action 'self'";

/// The embedded files: path under `/ui/`, content type, bytes.
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_bytes!("../ui/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../ui/app.js"),
    ),
    ("app.css", "text/css; charset=utf-8", include_bytes!("../ui/app.css")),
    (
        "vendor/asciinema-player.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../ui/vendor/asciinema-player.min.js"),
    ),
    (
        "vendor/asciinema-player.css",
        "text/css; charset=utf-8",
        include_bytes!("../ui/vendor/asciinema-player.css"),
    ),
];

/// Set on requests of connections that presented a client certificate.
#[derive(Clone)]
pub struct Certified(pub Arc<Identity>);

struct Session {
    identity: Arc<Identity>,
    csrf: String,
    expires: SystemTime,
    created: SystemTime,
}

/// Console sessions of this replica, by the SHA-256 of their cookie.
#[derive(Default)]
pub struct Consoles {
    sessions: Mutex<HashMap<[u8; 32], Session>>,
}

/// What the console knows about its signed-in user.
#[derive(Debug, Serialize, Deserialize)]
pub struct SessionView {
    pub user: String,
    pub roles: Vec<String>,
    pub csrf: String,
    #[serde(with = "crate::timefmt::serde_rfc3339")]
    pub expires_at: SystemTime,
}

fn digest(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The value of cookie `name` in `headers`.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn view(id: &Identity, csrf: String, expires_at: SystemTime) -> SessionView {
    SessionView {
        user: id.user.to_string(),
        roles: id.roles.iter().map(ToString::to_string).collect(),
        csrf,
        expires_at,
    }
}

impl Consoles {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Session>> {
        self.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A new session for `id`: (cookie value, its view).
    pub fn create(&self, id: Arc<Identity>, now: SystemTime) -> (String, SessionView) {
        let token = random_token();
        let csrf = random_token();
        let expires = (now + SESSION_TTL).min(id.not_after);
        let shown = view(&id, csrf.clone(), expires);
        let mut map = self.lock();
        map.retain(|_, s| s.expires > now);
        if map.len() >= MAX_SESSIONS {
            if let Some(oldest) = map.iter().min_by_key(|(_, s)| s.created).map(|(k, _)| *k) {
                map.remove(&oldest);
            }
        }
        map.insert(
            digest(&token),
            Session {
                identity: id,
                csrf,
                expires,
                created: now,
            },
        );
        (token, shown)
    }

    /// The live session the request's cookie names.
    fn lookup(&self, headers: &HeaderMap, now: SystemTime) -> Option<(Arc<Identity>, String, SystemTime)> {
        let token = cookie(headers, COOKIE)?;
        let key = digest(token);
        let mut map = self.lock();
        match map.get(&key) {
            Some(s) if s.expires > now => Some((Arc::clone(&s.identity), s.csrf.clone(), s.expires)),
            Some(_) => {
                map.remove(&key);
                None
            }
            None => None,
        }
    }

    fn remove(&self, headers: &HeaderMap) {
        if let Some(token) = cookie(headers, COOKIE) {
            self.lock().remove(&digest(token));
        }
    }

    /// The console's rules for one request, before routing. `cert` is the connection's
    /// certificate identity. `Ok(Some(id))`: route with that caller; `Ok(None)`: no caller
    /// (the anonymous routes); `Err`: refused as it is.
    pub fn gate(
        &self,
        cert: Option<&Arc<Identity>>,
        method: &Method,
        headers: &HeaderMap,
        path: &str,
    ) -> Result<Option<Arc<Identity>>, Refused> {
        let now = SystemTime::now();
        // A session counts only for the certificate's own user.
        let session = self
            .lookup(headers, now)
            .filter(|(id, _, _)| cert.is_none_or(|c| c.user == id.user));
        let browser = headers.contains_key(header::ORIGIN)
            || headers.contains_key("sec-fetch-site")
            || cookie(headers, COOKIE).is_some();
        let safe = matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
        if !safe && browser {
            if path == "/ui/session" && method == Method::POST {
                // Signing in: from the console's own page only.
                let site = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok());
                if site.is_some_and(|s| s != "same-origin") {
                    return Err(Refused("signing in to the console is possible from its own page only"));
                }
            } else {
                let sent = headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok());
                let ok = match (&session, sent) {
                    (Some((_, csrf, _)), Some(sent)) => crate::login::ct_eq(csrf.as_bytes(), sent.as_bytes()),
                    _ => false,
                };
                if !ok {
                    return Err(Refused(
                        "a state-changing call from a browser needs its console session's X-CSRF-Token",
                    ));
                }
            }
        }
        Ok(match cert {
            Some(c) => Some(Arc::clone(c)),
            None => session.map(|(id, _, _)| id),
        })
    }
}

/// A request the console's rules refuse (answered `403`, code `csrf`).
#[derive(Debug, PartialEq, Eq)]
pub struct Refused(pub &'static str);

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        secured(
            crate::api::problem(StatusCode::FORBIDDEN, "csrf", self.0.to_owned()),
            "no-store",
        )
    }
}

fn secured(mut r: Response, cache: &'static str) -> Response {
    let h = r.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    r
}

/// `GET /ui`: to `/ui/`.
pub async fn root() -> Redirect {
    Redirect::permanent("/ui/")
}

/// `GET /ui/`: the page.
pub async fn index() -> Response {
    asset_response("index.html")
}

/// `GET /ui/{*file}`: an embedded asset.
pub async fn asset(Path(file): Path<String>) -> Response {
    asset_response(&file)
}

fn asset_response(file: &str) -> Response {
    match ASSETS.iter().find(|(name, _, _)| *name == file) {
        Some((_, kind, bytes)) => {
            let cache = if file == "index.html" { "no-store" } else { "no-cache" };
            secured(([(header::CONTENT_TYPE, *kind)], *bytes).into_response(), cache)
        }
        None => secured(
            crate::api::problem(StatusCode::NOT_FOUND, "not_found", format!("no console file {file}")),
            "no-store",
        ),
    }
}

fn set_cookie(value: &str, max_age: u64) -> HeaderValue {
    let c = format!("{COOKIE}={value}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age={max_age}");
    HeaderValue::from_str(&c).unwrap_or_else(|_| HeaderValue::from_static("invalid=1"))
}

/// `POST /ui/session`: signs in with the connection's client certificate.
pub async fn sign_in(State(s): State<Arc<ApiState>>, cert: Option<Extension<Certified>>) -> Response {
    let Some(Extension(Certified(id))) = cert else {
        return secured(
            crate::api::problem(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "signing in to the console needs a client certificate in the browser".into(),
            ),
            "no-store",
        );
    };
    let now = SystemTime::now();
    let (token, shown) = s.consoles.create(id, now);
    let max_age = shown.expires_at.duration_since(now).unwrap_or_default().as_secs();
    tracing::info!(user = %shown.user, "console: signed in");
    let mut r = Json(shown).into_response();
    r.headers_mut().insert(header::SET_COOKIE, set_cookie(&token, max_age));
    secured(r, "no-store")
}

/// `GET /ui/session`: who is signed in (with the CSRF token), or `401`.
pub async fn show(State(s): State<Arc<ApiState>>, headers: HeaderMap, cert: Option<Extension<Certified>>) -> Response {
    let found = s
        .consoles
        .lookup(&headers, SystemTime::now())
        .filter(|(id, _, _)| cert.as_ref().is_none_or(|Extension(Certified(c))| c.user == id.user));
    match found {
        Some((id, csrf, expires)) => secured(Json(view(&id, csrf, expires)).into_response(), "no-store"),
        None => secured(
            crate::api::problem(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "not signed in to the console".into(),
            ),
            "no-store",
        ),
    }
}

/// `POST /ui/logout`: ends the session (the gate checked its CSRF token).
pub async fn sign_out(State(s): State<Arc<ApiState>>, headers: HeaderMap) -> Response {
    s.consoles.remove(&headers);
    let mut r = StatusCode::NO_CONTENT.into_response();
    r.headers_mut().insert(header::SET_COOKIE, set_cookie("", 0));
    secured(r, "no-store")
}

fn login_cookie(value: &str, max_age: u64) -> HeaderValue {
    let c = format!("{LOGIN_COOKIE}={value}; Path=/ui/oidc; Secure; HttpOnly; SameSite=Lax; Max-Age={max_age}");
    HeaderValue::from_str(&c).unwrap_or_else(|_| HeaderValue::from_static("invalid=1"))
}

/// Back to the console's page, which shows `error`; the sign-in cookie is cleared.
fn back_with_error(error: &str) -> Response {
    let location = format!("/ui/?error={}", crate::login::http::percent(error));
    let mut r = Redirect::to(&location).into_response();
    r.headers_mut().append(header::SET_COOKIE, login_cookie("", 0));
    secured(r, "no-store")
}

/// `GET /ui/oidc/start`: to the provider, with the sign-in's sealed handle in a cookie.
pub(crate) async fn oidc_start(State(s): State<Arc<ApiState>>, peer: Option<Extension<crate::api::Peer>>) -> Response {
    match s.logins.console_authorize(crate::api::caller(peer)).await {
        Ok(a) => {
            let mut r = Redirect::to(&a.authorization_url).into_response();
            let ttl = crate::login::CODE_LOGIN_TTL.as_secs();
            r.headers_mut().append(header::SET_COOKIE, login_cookie(&a.handle, ttl));
            secured(r, "no-store")
        }
        Err(e) => back_with_error(&e.to_string()),
    }
}

/// What the provider's redirect brings back.
#[derive(Debug, Deserialize)]
pub struct Callback {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

/// `GET /ui/oidc/callback`: the provider sent the browser back; on success a console
/// session (as [`sign_in`]) and on to the page.
pub(crate) async fn oidc_callback(
    State(s): State<Arc<ApiState>>,
    peer: Option<Extension<crate::api::Peer>>,
    headers: HeaderMap,
    query: Result<axum::extract::Query<Callback>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(axum::extract::Query(cb)) = query else {
        return back_with_error("the provider's answer could not be read");
    };
    if let Some(error) = cb.error {
        let detail = cb.error_description.unwrap_or_default();
        return back_with_error(&format!("the provider refused the sign-in: {error} {detail}"));
    }
    let (Some(code), Some(state)) = (cb.code, cb.state) else {
        return back_with_error("the provider's answer has no code");
    };
    let Some(handle) = cookie(&headers, LOGIN_COOKIE) else {
        return back_with_error("this browser did not start the sign-in (no sign-in cookie): sign in again");
    };
    let id = match s
        .logins
        .console_finish(crate::api::caller(peer), handle, &code, &state)
        .await
    {
        Ok(id) => Arc::new(id),
        Err(e) => return back_with_error(&e.to_string()),
    };
    let now = SystemTime::now();
    let (token, shown) = s.consoles.create(id, now);
    let max_age = shown.expires_at.duration_since(now).unwrap_or_default().as_secs();
    tracing::info!(user = %shown.user, "console: signed in by single sign-on");
    let mut r = Redirect::to("/ui/").into_response();
    r.headers_mut().append(header::SET_COOKIE, set_cookie(&token, max_age));
    r.headers_mut().append(header::SET_COOKIE, login_cookie("", 0));
    secured(r, "no-store")
}

#[cfg(test)]
mod tests;
