//! How engineers get their own certificates, through the API (`jitgate login`):
//!
//! - **OIDC** (`[oidc]`): the proxy is the OpenID Connect client. `POST /v1/login/device`
//!   starts a device authorization (RFC 8628) and `POST /v1/login/device/token` polls it;
//!   `POST /v1/login/authorize` and `POST /v1/login/code` run the authorization code flow with
//!   PKCE for `--browser`. Each login carries a fresh nonce, sealed with the rest of its state
//!   into an opaque `login` handle (HMAC with a key derived from the CA key, so any replica
//!   with the CA can finish it) and used once: the ID token must echo it.
//! - **Invites**: an admin's one-time code (`POST /v1/invites`, stored as a hash, single-use,
//!   expiring) is redeemed at `POST /v1/login/invite` for a first certificate; `POST
//!   /v1/login/renew`, with a still-valid certificate of that enrollment, gives the next one,
//!   until the enrollment's end (`[enrollment] max_lifetime` after the invite was redeemed).
//!
//! The CLI makes the key and sends a CSR; only the request's public key is used. Every
//! certificate given is recorded (`login.succeeded`) before it is returned; every refusal is
//! recorded with its reason (`login.refused`). These routes, but for renewal, need no client
//! certificate: the API listener accepts TLS without one and serves nothing else to it.

pub mod command;
pub(crate) mod http;
pub mod oidc;
pub mod profile;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::audit::{AuditEvent, AuditLog};
use crate::config::Config;
use crate::model::{Invite, Role, TokenRefusal, UserName};
use crate::pki::{Authority, Identity, UserCert};
use crate::store::{Store, StoreError};
use oidc::Nonce;

/// Longest an invite code may be used.
pub const MAX_INVITE_TTL: Duration = Duration::from_secs(7 * 86_400);
/// Longest a browser login may take from `authorize` to `code`.
pub(crate) const CODE_LOGIN_TTL: Duration = Duration::from_secs(600);
/// Purpose string of the key that seals login handles.
const SEAL_PURPOSE: &str = "jitgate login handle v1";

/// Why a login call did not give a certificate.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// The call itself is malformed (bad CSR, bad handle, bad redirect URI).
    #[error("{0}")]
    Invalid(String),
    /// The device flow: the user has not finished at the provider yet.
    #[error("the sign-in at the identity provider is not finished yet")]
    Pending,
    /// The device flow: poll less often.
    #[error("polling too fast: wait longer between polls")]
    SlowDown,
    /// Refused, with the reason (recorded as `login.refused`).
    #[error("{0}")]
    Refused(String),
    /// This proxy has no `[oidc]`, or the provider lacks what the flow needs.
    #[error("{0}")]
    NotConfigured(String),
    /// The provider, the store or the audit log did not answer; try again.
    #[error("{0}")]
    Unavailable(String),
}

impl From<StoreError> for LoginError {
    fn from(e: StoreError) -> Self {
        LoginError::Unavailable(e.to_string())
    }
}

/// A certificate given by a login, an invite or a renewal.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Issued {
    pub user: UserName,
    pub roles: Vec<Role>,
    /// The certificate, PEM.
    pub certificate: String,
    /// The CA that signed it and the proxy's server certificate, PEM.
    pub ca: String,
    #[serde(with = "crate::timefmt::serde_rfc3339")]
    pub not_after: SystemTime,
    /// When renewals stop (certificates of an enrollment only).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::timefmt::serde_rfc3339_opt"
    )]
    pub enrolled_until: Option<SystemTime>,
    /// The port of the proxy's PostgreSQL listener (`listen.postgres`).
    pub postgres_port: u16,
}

/// `GET /v1/login`: which ways of logging in this proxy offers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoginMethods {
    /// The OIDC issuer, when `[oidc]` is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oidc_issuer: Option<String>,
    /// Invite codes and renewals always work.
    pub invites: bool,
    /// The web console offers single sign-on (`[oidc] console_redirect_uri`).
    #[serde(default)]
    pub console_oidc: bool,
}

/// `POST /v1/login/device` answer: what to show the user.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceStarted {
    /// Opaque; send it back to `POST /v1/login/device/token`.
    pub login: String,
    pub user_code: String,
    pub verification_uri: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification_uri_complete: Option<String>,
    /// Seconds between polls.
    pub interval: u64,
    pub expires_in: u64,
}

/// `POST /v1/login/device/token` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceToken {
    pub login: String,
    /// PEM certificate signing request for the key the CLI made.
    pub csr: String,
}

/// `POST /v1/login/authorize` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Authorize {
    /// `http://127.0.0.1:PORT/...` (or `localhost`, `[::1]`): the CLI's loopback listener.
    pub redirect_uri: String,
    /// BASE64URL(SHA-256(code_verifier)), 43 characters.
    pub code_challenge: String,
}

/// `POST /v1/login/authorize` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Authorization {
    pub login: String,
    /// Open it in the browser.
    pub authorization_url: String,
    /// The `state` the redirect must carry back.
    pub state: String,
}

/// `POST /v1/login/code` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CodeLogin {
    pub login: String,
    pub code: String,
    pub code_verifier: String,
    pub csr: String,
}

/// `POST /v1/login/invite` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InviteLogin {
    /// `jgi1.ID.SECRET.FINGERPRINT`.
    pub code: String,
    pub csr: String,
}

/// `POST /v1/login/renew` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Renew {
    pub csr: String,
}

/// `POST /v1/invites` body (admin).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewInvite {
    pub user: UserName,
    pub roles: Vec<Role>,
    /// How long the code may be redeemed; default 24h, at most 7d.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

/// A created invite: the only time its code is shown.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreatedInvite {
    pub id: String,
    pub user: UserName,
    pub roles: Vec<Role>,
    #[serde(with = "crate::timefmt::serde_rfc3339")]
    pub expires_at: SystemTime,
    /// `jgi1.ID.SECRET.CA_SHA256`: give it to `jitgate login --invite`.
    pub code: String,
}

/// What a login handle seals.
#[derive(Debug, Serialize, Deserialize)]
struct Pending {
    /// `device` or `code`.
    kind: String,
    nonce: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    device_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    redirect_uri: Option<String>,
    /// Console sign-ins: the `state` the redirect must bring back, and the PKCE verifier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    verifier: Option<String>,
    /// Unix seconds.
    expires: u64,
}

/// A console sign-in on its way to the provider: where to send the browser, and the sealed
/// handle the browser keeps (in a cookie) until it comes back.
pub struct ConsoleAuthorization {
    pub authorization_url: String,
    pub handle: String,
}

/// The login service the API handlers call.
pub struct Logins {
    config: Config,
    store: Arc<dyn Store>,
    audit: Arc<AuditLog>,
    /// `None` when the CA key is not here: then no login can give a certificate.
    authority: Option<Arc<Authority>>,
    ca_pem: String,
    /// The PostgreSQL listener's bound port, told to the CLI for its profile.
    postgres_port: u16,
    provider: Option<oidc::Provider>,
    sealer: crate::seal::Sealer,
    /// Nonces of logins finished here, until their handle expires: a handle is used once.
    used: Mutex<HashMap<String, SystemTime>>,
}

/// How the caller got here, for the audit record.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub remote_addr: Option<SocketAddr>,
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
}

pub(crate) fn random_token() -> String {
    b64().encode(rand::random::<[u8; 32]>())
}

pub(crate) fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs()
}

/// Constant-time equality of two byte strings (false when the lengths differ).
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Logins {
    /// Reads the CA (key included, when present) and prepares the OIDC client.
    pub fn new(
        config: Config,
        store: Arc<dyn Store>,
        audit: Arc<AuditLog>,
        postgres_port: u16,
    ) -> Result<Self, LoginError> {
        let authority = match Authority::load(&config.data_dir) {
            Ok(ca) => Some(Arc::new(ca)),
            Err(error) => {
                tracing::warn!(%error, "logins and invites are refused: no CA key to sign with");
                None
            }
        };
        let ca_pem = std::fs::read_to_string(&config.tls.ca_cert)
            .map_err(|e| LoginError::Unavailable(format!("{}: {e}", config.tls.ca_cert.display())))?;
        let seal = match &authority {
            Some(ca) => ca.derived_key(SEAL_PURPOSE),
            // Nothing can be signed anyway; handles made here are never redeemable elsewhere.
            None => rand::random(),
        };
        let provider = config.oidc.clone().map(oidc::Provider::new).transpose()?;
        Ok(Self {
            config,
            store,
            audit,
            authority,
            ca_pem,
            postgres_port,
            provider,
            sealer: crate::seal::Sealer::new(&seal),
            used: Mutex::new(HashMap::new()),
        })
    }

    pub fn methods(&self) -> LoginMethods {
        LoginMethods {
            oidc_issuer: self.config.oidc.as_ref().map(|o| o.issuer.clone()),
            invites: true,
            console_oidc: self
                .config
                .oidc
                .as_ref()
                .is_some_and(|o| o.console_redirect_uri.is_some()),
        }
    }

    fn provider(&self) -> Result<&oidc::Provider, LoginError> {
        self.provider.as_ref().ok_or_else(|| {
            LoginError::NotConfigured(
                "this proxy has no [oidc] single sign-on: ask an admin for an invite (jitgate login --invite CODE)"
                    .into(),
            )
        })
    }

    fn seal(&self, p: &Pending) -> String {
        self.sealer.seal(p)
    }

    fn unseal(&self, handle: &str, kind: &str) -> Result<Pending, LoginError> {
        let bad = || LoginError::Invalid("unknown login: start again with jitgate login".into());
        let p: Pending = self.sealer.unseal(handle).ok_or_else(bad)?;
        if p.kind != kind {
            return Err(bad());
        }
        if p.expires <= unix(SystemTime::now()) {
            return Err(LoginError::Refused(
                "the login expired before it was finished: run jitgate login again".into(),
            ));
        }
        if lock(&self.used).contains_key(&p.nonce) {
            return Err(LoginError::Refused(
                "this login was finished already (a replayed nonce)".into(),
            ));
        }
        Ok(p)
    }

    /// Marks a login's nonce used; false when it was already (two finishes raced).
    fn spend(&self, p: &Pending) -> bool {
        let now = SystemTime::now();
        let mut used = lock(&self.used);
        used.retain(|_, until| *until > now);
        let until = SystemTime::UNIX_EPOCH + Duration::from_secs(p.expires);
        used.insert(p.nonce.clone(), until).is_none()
    }

    /// `POST /v1/login/device`.
    pub async fn start_device(&self, caller: Caller) -> Result<DeviceStarted, LoginError> {
        let provider = self.provider()?;
        let nonce = random_token();
        let d = match provider.start_device(&nonce).await {
            Ok(d) => d,
            Err(e) => return Err(self.refused("oidc", None, caller, e)),
        };
        let expires_in = d.expires_in.clamp(1, 3600);
        let pending = Pending {
            kind: "device".into(),
            nonce,
            device_code: Some(d.device_code),
            redirect_uri: None,
            state: None,
            verifier: None,
            expires: unix(SystemTime::now()) + expires_in,
        };
        Ok(DeviceStarted {
            login: self.seal(&pending),
            user_code: d.user_code,
            verification_uri: d.verification_uri,
            verification_uri_complete: d.verification_uri_complete,
            interval: d.interval.unwrap_or(5).clamp(1, 60),
            expires_in,
        })
    }

    /// `POST /v1/login/device/token`: one poll; a certificate once the user has signed in.
    pub async fn poll_device(&self, caller: Caller, body: DeviceToken) -> Result<Issued, LoginError> {
        self.check_csr(&body.csr)?;
        let provider = self.provider()?;
        let pending = self
            .unseal(&body.login, "device")
            .map_err(|e| self.refused("oidc", None, caller, e))?;
        let device_code = pending.device_code.as_deref().unwrap_or_default();
        let token = match provider.poll_device(device_code).await {
            Ok(oidc::Poll::Pending) => return Err(LoginError::Pending),
            Ok(oidc::Poll::SlowDown) => return Err(LoginError::SlowDown),
            Ok(oidc::Poll::Token(t)) => t,
            Err(e) => return Err(self.refused("oidc", None, caller, e)),
        };
        self.finish_oidc(caller, &pending, &token, &body.csr).await
    }

    /// `POST /v1/login/authorize`: the URL for the browser.
    pub async fn authorize(&self, caller: Caller, body: Authorize) -> Result<Authorization, LoginError> {
        let provider = self.provider()?;
        if !loopback_redirect(&body.redirect_uri) {
            return Err(LoginError::Invalid(format!(
                "redirect_uri {:?}: only http://127.0.0.1:PORT/..., http://localhost:PORT/... or http://[::1]:PORT/...",
                body.redirect_uri
            )));
        }
        if body.code_challenge.len() != 43 || b64().decode(&body.code_challenge).is_err() {
            return Err(LoginError::Invalid(
                "code_challenge must be BASE64URL(SHA-256(code_verifier)), 43 characters".into(),
            ));
        }
        let nonce = random_token();
        let state = random_token();
        let url = provider
            .authorization_url(&body.redirect_uri, &state, &nonce, &body.code_challenge)
            .await
            .map_err(|e| self.refused("oidc", None, caller, e))?;
        let pending = Pending {
            kind: "code".into(),
            nonce,
            device_code: None,
            redirect_uri: Some(body.redirect_uri),
            state: None,
            verifier: None,
            expires: unix(SystemTime::now() + CODE_LOGIN_TTL),
        };
        Ok(Authorization {
            login: self.seal(&pending),
            authorization_url: url,
            state,
        })
    }

    /// `POST /v1/login/code`: redeems the code the browser brought back.
    pub async fn code(&self, caller: Caller, body: CodeLogin) -> Result<Issued, LoginError> {
        self.check_csr(&body.csr)?;
        let provider = self.provider()?;
        let pending = self
            .unseal(&body.login, "code")
            .map_err(|e| self.refused("oidc", None, caller, e))?;
        let redirect = pending.redirect_uri.as_deref().unwrap_or_default();
        let token = provider
            .redeem_code(&body.code, redirect, &body.code_verifier)
            .await
            .map_err(|e| self.refused("oidc", None, caller, e))?;
        self.finish_oidc(caller, &pending, &token, &body.csr).await
    }

    /// Starts a web console sign-in at the provider (`[oidc] console_redirect_uri`): the
    /// proxy holds the PKCE verifier, sealed in the handle the browser keeps.
    pub async fn console_authorize(&self, caller: Caller) -> Result<ConsoleAuthorization, LoginError> {
        let provider = self.provider()?;
        let Some(redirect) = provider.config().console_redirect_uri.clone() else {
            return Err(LoginError::NotConfigured(
                "this proxy offers no single sign-on for the console ([oidc] console_redirect_uri)".into(),
            ));
        };
        let nonce = random_token();
        let state = random_token();
        let verifier = random_token();
        let challenge = b64().encode(ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes()));
        let url = provider
            .authorization_url(&redirect, &state, &nonce, &challenge)
            .await
            .map_err(|e| self.refused("console", None, caller, e))?;
        let pending = Pending {
            kind: "console".into(),
            nonce,
            device_code: None,
            redirect_uri: Some(redirect),
            state: Some(state),
            verifier: Some(verifier),
            expires: unix(SystemTime::now() + CODE_LOGIN_TTL),
        };
        Ok(ConsoleAuthorization {
            authorization_url: url,
            handle: self.seal(&pending),
        })
    }

    /// Finishes a console sign-in: the handle from the browser's cookie, the `code` and
    /// `state` the provider redirected with. The identity lasts `max_cert_ttl`; no
    /// certificate is made.
    pub async fn console_finish(
        &self,
        caller: Caller,
        handle: &str,
        code: &str,
        state: &str,
    ) -> Result<Identity, LoginError> {
        let provider = self.provider()?;
        let pending = self
            .unseal(handle, "console")
            .map_err(|e| self.refused("console", None, caller, e))?;
        if !ct_eq(
            pending.state.as_deref().unwrap_or_default().as_bytes(),
            state.as_bytes(),
        ) {
            let e = LoginError::Refused("the sign-in came back with another state (not this browser's)".into());
            return Err(self.refused("console", None, caller, e));
        }
        let redirect = pending.redirect_uri.as_deref().unwrap_or_default();
        let verifier = pending.verifier.as_deref().unwrap_or_default();
        let token = provider
            .redeem_code(code, redirect, verifier)
            .await
            .map_err(|e| self.refused("console", None, caller, e))?;
        let person = match provider.verify(&token, Nonce::Required(&pending.nonce)).await {
            Ok(p) => p,
            Err(e) => return Err(self.refused("console", None, caller, e)),
        };
        if !self.spend(&pending) {
            let e = LoginError::Refused("this sign-in was finished already (a replayed nonce)".into());
            return Err(self.refused("console", Some(&person.user), caller, e));
        }
        let not_after = SystemTime::now() + provider.config().max_cert_ttl.min(crate::console::SESSION_TTL);
        self.audit
            .record(AuditEvent::LoginSucceeded {
                method: "console".into(),
                user: person.user.clone(),
                roles: person.roles.clone(),
                subject: Some(person.subject),
                remote_addr: caller.remote_addr,
                cert_expires_at: not_after,
            })
            .await
            .map_err(|e| LoginError::Unavailable(format!("the audit log: {e}")))?;
        tracing::info!(user = %person.user, "login: console session by single sign-on");
        Ok(Identity {
            user: person.user,
            roles: person.roles,
            not_after,
            enrolled_until: None,
        })
    }

    async fn finish_oidc(
        &self,
        caller: Caller,
        pending: &Pending,
        token: &str,
        csr: &str,
    ) -> Result<Issued, LoginError> {
        let provider = self.provider()?;
        let nonce = match pending.kind.as_str() {
            "code" => Nonce::Required(&pending.nonce),
            _ => Nonce::IfPresent(&pending.nonce),
        };
        let person = match provider.verify(token, nonce).await {
            Ok(p) => p,
            Err(e) => return Err(self.refused("oidc", None, caller, e)),
        };
        if !self.spend(pending) {
            let e = LoginError::Refused("this login was finished already (a replayed nonce)".into());
            return Err(self.refused("oidc", Some(&person.user), caller, e));
        }
        let ttl = provider.config().max_cert_ttl;
        let what = UserCert {
            user: &person.user,
            roles: &person.roles,
            not_after: SystemTime::now() + ttl,
            enrolled_until: None,
        };
        self.issue(caller, "oidc", &what, csr, Some(person.subject)).await
    }

    /// `POST /v1/invites` (the caller is an admin).
    pub async fn create_invite(&self, by: &UserName, new: NewInvite) -> Result<CreatedInvite, LoginError> {
        let ttl = Duration::from_secs(new.ttl_secs.unwrap_or(86_400));
        if ttl.is_zero() || ttl > MAX_INVITE_TTL {
            return Err(LoginError::Invalid("ttl must be between 1s and 7d".into()));
        }
        if self.authority.is_none() {
            return Err(LoginError::Unavailable(
                "this replica has no CA key: invites could not be redeemed here".into(),
            ));
        }
        let ca_sha256 =
            crate::pki::cert_fingerprint(&self.ca_pem).map_err(|e| LoginError::Unavailable(e.to_string()))?;
        let id = format!("inv-{}", crate::agents::hex(&rand::random::<[u8; 6]>()));
        let secret = random_token();
        let now = SystemTime::now();
        let invite = Invite {
            id: id.clone(),
            user: new.user.clone(),
            roles: new.roles.clone(),
            secret_sha256: crate::agents::secret_hash(&secret),
            created_by: by.clone(),
            created_at: now,
            expires_at: now + ttl,
        };
        self.store.insert_invite(&invite).await?;
        self.audit
            .record(AuditEvent::InviteCreated {
                invite_id: id.clone(),
                user: new.user.clone(),
                roles: new.roles.clone(),
                by: by.clone(),
                expires_at: invite.expires_at,
            })
            .await
            .map_err(|e| LoginError::Unavailable(e.to_string()))?;
        let code = jitgate_protocol::tunnel::InviteCode {
            id: id.clone(),
            secret,
            ca_sha256,
        }
        .to_string();
        Ok(CreatedInvite {
            id,
            user: new.user,
            roles: new.roles,
            expires_at: invite.expires_at,
            code,
        })
    }

    /// `POST /v1/login/invite`: the first certificate of an enrollment.
    pub async fn redeem_invite(&self, caller: Caller, body: InviteLogin) -> Result<Issued, LoginError> {
        self.check_csr(&body.csr)?;
        let code: jitgate_protocol::tunnel::InviteCode = body
            .code
            .parse()
            .map_err(|e: String| self.refused("invite", None, caller, LoginError::Refused(e)))?;
        let now = SystemTime::now();
        let hash = crate::agents::secret_hash(&code.secret);
        let invite = match self.store.redeem_invite(&code.id, &hash, now).await? {
            Ok(i) => i,
            Err(refusal) => {
                let reason = match refusal {
                    TokenRefusal::Unknown => "unknown invite code",
                    TokenRefusal::Used => "invite code already used",
                    TokenRefusal::Expired => "invite code expired",
                };
                return Err(self.refused("invite", None, caller, LoginError::Refused(reason.into())));
            }
        };
        let e = &self.config.enrollment;
        let until = now + e.max_lifetime;
        let what = UserCert {
            user: &invite.user,
            roles: &invite.roles,
            not_after: (now + e.cert_ttl).min(until),
            enrolled_until: Some(until),
        };
        self.issue(caller, "invite", &what, &body.csr, Some(invite.id)).await
    }

    /// `POST /v1/login/renew`: the next certificate of the caller's enrollment.
    pub async fn renew(&self, caller: Caller, id: &Identity, body: Renew) -> Result<Issued, LoginError> {
        self.check_csr(&body.csr)?;
        let now = SystemTime::now();
        let Some(until) = id.enrolled_until else {
            let e = LoginError::Refused(
                "this certificate is not from an invite and cannot be renewed: run jitgate login again".into(),
            );
            return Err(self.refused("renew", Some(&id.user), caller, e));
        };
        if until <= now + Duration::from_secs(60) {
            let e = LoginError::Refused(format!(
                "the enrollment of {} ended at {}: ask an admin for a new invite",
                id.user,
                crate::timefmt::rfc3339(until)
            ));
            return Err(self.refused("renew", Some(&id.user), caller, e));
        }
        let what = UserCert {
            user: &id.user,
            roles: &id.roles,
            not_after: (now + self.config.enrollment.cert_ttl).min(until),
            enrolled_until: Some(until),
        };
        self.issue(caller, "renew", &what, &body.csr, None).await
    }

    fn check_csr(&self, csr: &str) -> Result<(), LoginError> {
        crate::pki::check_csr(csr).map_err(|e| LoginError::Invalid(e.to_string()))
    }

    /// Signs, records `login.succeeded` (before the certificate leaves), answers.
    async fn issue(
        &self,
        caller: Caller,
        method: &'static str,
        what: &UserCert<'_>,
        csr: &str,
        detail: Option<String>,
    ) -> Result<Issued, LoginError> {
        let ca = self
            .authority
            .as_ref()
            .ok_or_else(|| LoginError::Unavailable("this replica has no CA key to sign with".into()))?;
        let certificate = ca
            .issue_user_csr(what, csr)
            .map_err(|e| LoginError::Invalid(e.to_string()))?;
        self.audit
            .record(AuditEvent::LoginSucceeded {
                method: method.into(),
                user: what.user.clone(),
                roles: what.roles.to_vec(),
                subject: detail,
                remote_addr: caller.remote_addr,
                cert_expires_at: what.not_after,
            })
            .await
            .map_err(|e| LoginError::Unavailable(format!("the audit log: {e}")))?;
        tracing::info!(user = %what.user, method, "login: certificate issued");
        Ok(Issued {
            user: what.user.clone(),
            roles: what.roles.to_vec(),
            certificate,
            ca: self.ca_pem.clone(),
            not_after: what.not_after,
            enrolled_until: what.enrolled_until,
            postgres_port: self.postgres_port,
        })
    }

    /// Records a refusal (refusals only: a provider or store that did not answer is not one)
    /// and hands the error back.
    fn refused(&self, method: &'static str, user: Option<&UserName>, caller: Caller, e: LoginError) -> LoginError {
        if let LoginError::Refused(reason) = &e {
            tracing::info!(method, user = ?user.map(UserName::as_str), %reason, "login refused");
            self.audit.submit(AuditEvent::LoginRefused {
                method: method.into(),
                user: user.cloned(),
                reason: reason.clone(),
                remote_addr: caller.remote_addr,
            });
        }
        e
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `http://` to a loopback host with a port (RFC 8252, section 7.3).
fn loopback_redirect(uri: &str) -> bool {
    let Some(rest) = uri.strip_prefix("http://") else {
        return false;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = match authority.rsplit_once(':') {
        Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => return false,
    };
    matches!(host, "127.0.0.1" | "localhost" | "[::1]")
}

#[cfg(test)]
mod tests;
