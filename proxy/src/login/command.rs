//! `jitgate login`, `logout`, `whoami` and `user invite`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context as _, Result};
use base64::Engine as _;
use clap::{Args, Subcommand};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::profile::{self, Settings};
use super::{Authorization, Authorize, CodeLogin, DeviceStarted, DeviceToken, InviteLogin, Issued, NewInvite, Renew};
use crate::cli::{api_client, print_json, ApiArgs};
use crate::client::{ApiClient, ClientError};
use crate::model::{Role, UserName};

/// `jitgate login`.
#[derive(Debug, Args)]
pub struct LoginArgs {
    /// The proxy's control API, `https://HOST:PORT` (`listen.api`). Default: the proxy of
    /// your last login.
    #[arg(long)]
    proxy: Option<String>,
    /// Sign in with a one-time invite code from an admin (`jitgate user invite`) instead of
    /// single sign-on. The code carries the proxy CA's fingerprint.
    #[arg(long, conflicts_with_all = ["renew", "browser"])]
    invite: Option<String>,
    /// Trade your still-valid certificate (from an invite) for a new one, up to the end of
    /// your enrollment.
    #[arg(long, conflicts_with = "browser")]
    renew: bool,
    /// Single sign-on in a browser (authorization code flow with PKCE and a loopback
    /// redirect) instead of the device code flow.
    #[arg(long)]
    browser: bool,
    /// With --browser: print the URL only, do not start a browser.
    #[arg(long, requires = "browser")]
    no_open: bool,
    /// SHA-256 fingerprint of the proxy's CA certificate (from your admin: `jitgate cert
    /// fingerprint`). Needed on the first single sign-on login: jitgate never trusts a proxy
    /// on first use.
    #[arg(long, env = "JITGATE_CA_FINGERPRINT")]
    ca_fingerprint: Option<String>,
    /// The proxy's CA certificate (PEM), instead of --ca-fingerprint.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// The proxy's PostgreSQL listener, HOST:PORT, for `jitgate connect`. Default: the API's
    /// host with the port the proxy reports.
    #[arg(long)]
    postgres: Option<String>,
}

/// `jitgate user ...` (admin).
#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Print a one-time invite code that gets USER a first certificate with `jitgate login
    /// --invite CODE` (shown only once).
    Invite {
        user: String,
        /// Comma-separated roles, e.g. dev,oncall.
        #[arg(long, value_delimiter = ',', required = true)]
        roles: Vec<String>,
        /// How long the code may be redeemed (at most 7d).
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
}

/// How a first contact trusts the proxy.
enum Trust {
    /// The CA's SHA-256 fingerprint.
    Pin(String),
    /// A CA certificate file (PEM).
    Roots(PathBuf),
}

fn tls_config(trust: &Trust) -> Result<rustls::ClientConfig> {
    let builder =
        rustls::ClientConfig::builder_with_provider(crate::tls::provider()).with_safe_default_protocol_versions()?;
    Ok(match trust {
        Trust::Pin(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(jitgate_protocol::pin::PinnedCa::new(
                pin,
                crate::tls::provider(),
            )))
            .with_no_client_auth(),
        Trust::Roots(path) => builder
            .with_root_certificates(crate::tls::load_roots(path).with_context(|| format!("--ca {}", path.display()))?)
            .with_no_client_auth(),
    })
}

/// `https://HOST:PORT` or `HOST:PORT` to `HOST:PORT`.
fn api_addr(proxy: &str) -> Result<String> {
    let addr = proxy.trim_start_matches("https://").trim_end_matches('/');
    if proxy.starts_with("http://") || !addr.contains(':') || addr.contains('/') {
        bail!("--proxy {proxy:?}: the proxy's API as https://HOST:PORT");
    }
    Ok(addr.to_owned())
}

fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':').map_or(addr, |(h, _)| h)
}

/// A new key and a CSR for it.
fn new_key() -> Result<(rcgen::KeyPair, String)> {
    let key = rcgen::KeyPair::generate()?;
    let csr = rcgen::CertificateParams::default().serialize_request(&key)?.pem()?;
    Ok((key, csr))
}

/// Runs `jitgate login`.
pub async fn login(a: LoginArgs) -> Result<()> {
    let saved = profile::settings();
    let api = match (&a.proxy, &saved) {
        (Some(p), _) => api_addr(p)?,
        (None, Some(s)) => s.api.clone(),
        (None, None) => bail!("no proxy: pass --proxy https://HOST:PORT (the proxy's listen.api)"),
    };
    let (key, csr) = new_key()?;
    let (issued, pin) = if a.renew {
        let client = profile_client(&api)?;
        let issued: Issued = client.post("/v1/login/renew", &Renew { csr }).await.map_err(refused)?;
        (issued, None)
    } else {
        let code: Option<jitgate_protocol::tunnel::InviteCode> = a
            .invite
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(|e: String| anyhow::anyhow!("--invite: {e}"))?;
        let trust = match (&code, &a.ca_fingerprint, &a.ca) {
            (Some(c), _, _) => Trust::Pin(c.ca_sha256.clone()),
            (None, Some(fp), _) => Trust::Pin(
                jitgate_protocol::pin::normalize_fingerprint(fp)
                    .with_context(|| format!("--ca-fingerprint {fp:?}: 64 hex digits (SHA-256)"))?,
            ),
            (None, None, Some(path)) => Trust::Roots(path.clone()),
            (None, None, None) => match profile::file(profile::CA) {
                Some(ca) if saved.as_ref().is_some_and(|s| s.api == api) => Trust::Roots(ca),
                _ => bail!(
                    "no trust for the proxy's TLS yet: pass --ca-fingerprint SHA256 (your admin prints it with \
                     `jitgate cert fingerprint`), --ca FILE, or --invite CODE (it carries the fingerprint). \
                     jitgate never trusts a proxy on first use"
                ),
            },
        };
        let pin = match &trust {
            Trust::Pin(p) => Some(p.clone()),
            Trust::Roots(_) => None,
        };
        let client = ApiClient::with_tls(&api, tls_config(&trust)?);
        let issued = match code {
            Some(code) => client
                .post(
                    "/v1/login/invite",
                    &InviteLogin {
                        code: code.to_string(),
                        csr,
                    },
                )
                .await
                .map_err(refused)?,
            None if a.browser => browser(&client, csr, !a.no_open).await?,
            None => device(&client, csr).await?,
        };
        (issued, pin)
    };
    finish(&api, a.postgres, &key, &issued, pin.as_deref())
}

/// Saves what the proxy gave, after checking it: the certificate is for our key, and the CA
/// sent is the pinned one.
fn finish(api: &str, postgres: Option<String>, key: &rcgen::KeyPair, issued: &Issued, pin: Option<&str>) -> Result<()> {
    let der = rustls_pemfile::certs(&mut issued.certificate.as_bytes())
        .next()
        .context("the proxy's answer holds no certificate")??;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).context("the proxy's certificate is unreadable")?;
    if cert.public_key().raw != key.public_key_der().as_slice() {
        bail!("the proxy's certificate is not for the key made here");
    }
    let identity = crate::pki::identity_from_der(&der).context("the proxy's certificate names no jitgate user")?;
    if let Some(pin) = pin {
        let ca = crate::pki::cert_fingerprint(&issued.ca)?;
        if ca != pin {
            bail!("the CA the proxy sent ({ca}) is not the pinned one ({pin})");
        }
    }
    let settings = Settings {
        api: api.to_owned(),
        postgres: postgres.unwrap_or_else(|| format!("{}:{}", host_of(api), issued.postgres_port)),
    };
    let dir = profile::save(&issued.certificate, &key.serialize_pem(), &issued.ca, &settings)?;
    let roles = identity.roles.iter().map(ToString::to_string).collect::<Vec<_>>();
    println!(
        "logged in as {} (roles: {}) until {}; certificate in {}",
        identity.user,
        if roles.is_empty() {
            "none".to_owned()
        } else {
            roles.join(", ")
        },
        crate::timefmt::rfc3339(identity.not_after),
        dir.join(profile::CERT).display()
    );
    if let Some(until) = issued.enrolled_until {
        println!(
            "renew with `jitgate login --renew` until {}",
            crate::timefmt::rfc3339(until)
        );
    }
    Ok(())
}

/// A refusal as the proxy worded it.
fn refused(e: ClientError) -> anyhow::Error {
    match e {
        ClientError::Api { code, message, .. } if code == "refused" => anyhow::anyhow!("login refused: {message}"),
        other => other.into(),
    }
}

/// The client with the profile's certificate (renewal).
fn profile_client(api: &str) -> Result<ApiClient> {
    let (Some(cert), Some(key), Some(ca)) = (
        profile::file(profile::CERT),
        profile::file(profile::KEY),
        profile::file(profile::CA),
    ) else {
        bail!("no certificate to renew: log in first (jitgate login --invite CODE)");
    };
    Ok(ApiClient::from_files(api, &cert, &key, &ca)?)
}

/// The device authorization flow: show the code, poll until the user has signed in.
async fn device(client: &ApiClient, csr: String) -> Result<Issued> {
    let started: DeviceStarted = client.post("/v1/login/device", &()).await.map_err(refused)?;
    eprintln!(
        "To sign in, open {} and enter the code {}",
        started.verification_uri, started.user_code
    );
    if let Some(complete) = &started.verification_uri_complete {
        eprintln!("(or open {complete})");
    }
    let deadline = Instant::now() + Duration::from_secs(started.expires_in);
    let mut interval = Duration::from_secs(started.interval.max(1));
    let poll = DeviceToken {
        login: started.login,
        csr,
    };
    loop {
        tokio::time::sleep(interval).await;
        if Instant::now() >= deadline {
            bail!("the code expired before the sign-in finished: run jitgate login again");
        }
        match client.post::<_, Issued>("/v1/login/device/token", &poll).await {
            Ok(issued) => return Ok(issued),
            Err(ClientError::Api { code, .. }) if code == "authorization_pending" => {}
            Err(ClientError::Api { code, .. }) if code == "slow_down" => interval += Duration::from_secs(5),
            Err(e) => return Err(refused(e)),
        }
    }
}

/// How long the browser flow waits for the redirect.
const BROWSER_WAIT: Duration = Duration::from_secs(600);

/// The authorization code flow with PKCE: a loopback listener takes the redirect.
async fn browser(client: &ApiClient, csr: String, open: bool) -> Result<Issued> {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let redirect_uri = format!("http://127.0.0.1:{}/callback", listener.local_addr()?.port());
    let verifier = b64.encode(rand::random::<[u8; 32]>());
    let challenge = b64.encode(ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes()));
    let auth: Authorization = client
        .post(
            "/v1/login/authorize",
            &Authorize {
                redirect_uri,
                code_challenge: challenge,
            },
        )
        .await
        .map_err(refused)?;
    eprintln!("Open this URL in your browser to sign in: {}", auth.authorization_url);
    if open {
        // Best effort: without a desktop the URL above is what the user follows.
        let _ = std::process::Command::new("xdg-open")
            .arg(&auth.authorization_url)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
    }
    let code = tokio::time::timeout(BROWSER_WAIT, redirected(&listener, &auth.state))
        .await
        .map_err(|_| anyhow::anyhow!("no sign-in came back within 10 minutes: run jitgate login again"))??;
    client
        .post(
            "/v1/login/code",
            &CodeLogin {
                login: auth.login,
                code,
                code_verifier: verifier,
                csr,
            },
        )
        .await
        .map_err(refused)
}

/// Serves the loopback redirect until one carries our `state`; returns its code.
async fn redirected(listener: &tokio::net::TcpListener, state: &str) -> Result<String> {
    loop {
        let (mut conn, _) = listener.accept().await?;
        let mut buf = vec![0u8; 8192];
        let mut len = 0;
        // The request line is all that is needed; bounded in size and time.
        let read = tokio::time::timeout(Duration::from_secs(5), async {
            while len < buf.len() && !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf[len..]).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => len += n,
                }
            }
        })
        .await;
        if read.is_err() {
            continue;
        }
        let head = String::from_utf8_lossy(&buf[..len]);
        let target = head.lines().next().and_then(|l| l.split(' ').nth(1)).unwrap_or("");
        let query = target.split_once('?').map_or("", |(_, q)| q);
        let param = |name: &str| {
            query
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| *k == name)
                .map(|(_, v)| percent_decode(v))
        };
        let (status, body, outcome) = match (param("state"), param("code"), param("error")) {
            (Some(s), Some(code), None) if super::ct_eq(s.as_bytes(), state.as_bytes()) => (
                "200 OK",
                "Signed in to jitgate. You can close this tab.",
                Some(Ok(code)),
            ),
            (Some(s), _, Some(error)) if super::ct_eq(s.as_bytes(), state.as_bytes()) => (
                "400 Bad Request",
                "The sign-in was refused. See the terminal.",
                Some(Err(anyhow::anyhow!(
                    "the identity provider refused the sign-in: {error} {}",
                    param("error_description").unwrap_or_default()
                ))),
            ),
            _ => ("400 Bad Request", "Not a jitgate sign-in redirect.", None),
        };
        let reply = format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = conn.write_all(reply.as_bytes()).await;
        let _ = conn.shutdown().await;
        if let Some(outcome) = outcome {
            return outcome;
        }
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `jitgate logout`.
pub fn logout() -> Result<()> {
    let removed = profile::remove()?;
    if removed.is_empty() {
        println!("not logged in: nothing to remove");
    } else {
        for p in removed {
            println!("removed {}", p.display());
        }
    }
    Ok(())
}

/// `jitgate whoami`: the profile certificate's user, roles and expiry.
pub fn whoami(json: bool) -> Result<()> {
    let Some(path) = profile::file(profile::CERT) else {
        bail!("not logged in: run jitgate login");
    };
    let certs = crate::tls::load_certs(&path)?;
    let first = certs.first().context("no certificate")?;
    let id = crate::pki::identity_from_der(first.as_ref())?;
    let now = SystemTime::now();
    if json {
        return print_json(&serde_json::json!({
            "user": id.user,
            "roles": id.roles,
            "not_after": crate::timefmt::rfc3339(id.not_after),
            "expired": id.not_after <= now,
            "enrolled_until": id.enrolled_until.map(crate::timefmt::rfc3339),
            "api": profile::settings().map(|s| s.api),
        }));
    }
    let roles = id.roles.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
    println!("user:    {}", id.user);
    println!("roles:   {}", if roles.is_empty() { "-" } else { roles.as_str() });
    let left = id.not_after.duration_since(now).map_or_else(
        |_| "expired".to_owned(),
        |d| format!("in {}", humantime::format_duration(Duration::from_secs(d.as_secs()))),
    );
    println!("expires: {} ({left})", crate::timefmt::rfc3339(id.not_after));
    if let Some(until) = id.enrolled_until {
        println!("renew until: {}", crate::timefmt::rfc3339(until));
    }
    if let Some(s) = profile::settings() {
        println!("proxy:   api {}, postgres {}", s.api, s.postgres);
    }
    Ok(())
}

/// `jitgate user ...`.
pub(crate) async fn user(cmd: UserCommand, a: &ApiArgs) -> Result<()> {
    match cmd {
        UserCommand::Invite { user, roles, ttl } => {
            let new = NewInvite {
                user: UserName::new(user)?,
                roles: roles.into_iter().map(Role::new).collect::<Result<_, _>>()?,
                ttl_secs: Some(ttl.as_secs().max(1)),
            };
            let client = api_client(a)?;
            let created: super::CreatedInvite = client.post("/v1/invites", &new).await?;
            if a.json {
                return print_json(&created);
            }
            println!("{}", created.code);
            eprintln!(
                "one-time invite {} for {} ({}), usable until {}: jitgate login --proxy https://HOST:PORT --invite CODE",
                created.id,
                created.user,
                created.roles.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
                crate::timefmt::rfc3339(created.expires_at)
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_parameters_are_percent_decoded() {
        assert_eq!(percent_decode("a%2Fb+c%3d"), "a/b c=");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("%\u{e9}x"), "%\u{e9}x");
        assert_eq!(api_addr("https://proxy:8443/").unwrap(), "proxy:8443");
        assert!(api_addr("http://proxy:8443").is_err());
        assert!(api_addr("proxy").is_err());
    }
}
