//! The proxy as an OpenID Connect client: discovery, the device authorization grant (RFC 8628),
//! the authorization code grant with PKCE, and verification of the ID token the provider
//! returns (signature against the provider's JWKS, `iss`, `aud`, `azp`, `exp`, `nbf`,
//! `nonce`), with `jsonwebtoken` doing the JWT work. Then the mapping of the token's claims to
//! a jitgate user and roles.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::http::{Http, HttpError};
use super::LoginError;
use crate::config::OidcConfig;
use crate::model::{Role, UserName};

/// How long discovery's answer is kept.
const METADATA_TTL: Duration = Duration::from_secs(3600);
/// How long the provider's keys are kept; an unknown `kid` fetches them again (at most this
/// often: [`JWKS_REFETCH`]).
const JWKS_TTL: Duration = Duration::from_secs(3600);
const JWKS_REFETCH: Duration = Duration::from_secs(10);
/// Clock skew allowed on `exp`, `nbf` and `iat`.
const LEEWAY_SECS: u64 = 60;

/// The parts of `/.well-known/openid-configuration` jitgate uses.
#[derive(Debug, Clone, Deserialize)]
pub struct Metadata {
    pub issuer: String,
    pub authorization_endpoint: Option<String>,
    pub token_endpoint: String,
    pub jwks_uri: String,
    pub device_authorization_endpoint: Option<String>,
}

/// The provider's answer to a device authorization request.
#[derive(Debug, Clone, Deserialize)]
pub struct DeviceAuthorization {
    pub device_code: String,
    pub user_code: String,
    pub verification_uri: String,
    #[serde(default)]
    pub verification_uri_complete: Option<String>,
    pub expires_in: u64,
    #[serde(default)]
    pub interval: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct TokenAnswer {
    id_token: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct OAuthError {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: Option<String>,
}

/// The outcome of one poll of the token endpoint in the device flow.
pub enum Poll {
    /// The user has not finished yet.
    Pending,
    /// Polling too fast: wait longer.
    SlowDown,
    /// The ID token, not yet verified.
    Token(String),
}

/// Who the verified ID token says logged in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Person {
    pub user: UserName,
    pub roles: Vec<Role>,
    /// `sub`: the provider's stable id for the person.
    pub subject: String,
    pub groups: Vec<String>,
}

/// One configured provider, with discovery and keys cached.
pub struct Provider {
    config: Arc<OidcConfig>,
    http: Http,
    metadata: Mutex<Option<(Instant, Arc<Metadata>)>>,
    keys: Mutex<Option<(Instant, Arc<JwkSet>)>>,
}

fn unavailable(e: HttpError) -> LoginError {
    LoginError::Unavailable(format!("the identity provider: {e}"))
}

impl Provider {
    pub fn new(config: Arc<OidcConfig>) -> Result<Self, LoginError> {
        let http = Http::new(config.ca_file.as_deref()).map_err(|e| LoginError::Unavailable(e.to_string()))?;
        Ok(Self {
            config,
            http,
            metadata: Mutex::new(None),
            keys: Mutex::new(None),
        })
    }

    pub fn config(&self) -> &OidcConfig {
        &self.config
    }

    /// Discovery, cached for an hour. The document must name the configured issuer exactly
    /// (OpenID Connect Discovery 1.0, section 4.3).
    pub async fn metadata(&self) -> Result<Arc<Metadata>, LoginError> {
        if let Some((at, m)) = lock(&self.metadata).as_ref() {
            if at.elapsed() < METADATA_TTL {
                return Ok(Arc::clone(m));
            }
        }
        let url = format!("{}/.well-known/openid-configuration", self.config.issuer);
        let m: Metadata = self.http.get_json(&url).await.map_err(unavailable)?;
        if m.issuer.trim_end_matches('/') != self.config.issuer {
            return Err(LoginError::Unavailable(format!(
                "the identity provider at {url} names issuer {:?}, not the configured {:?}",
                m.issuer, self.config.issuer
            )));
        }
        let m = Arc::new(m);
        *lock(&self.metadata) = Some((Instant::now(), Arc::clone(&m)));
        Ok(m)
    }

    /// The provider's keys; fetched again when `kid` is not among them (keys rotate).
    async fn keys(&self, kid: Option<&str>) -> Result<Arc<JwkSet>, LoginError> {
        let cached = lock(&self.keys).clone();
        if let Some((at, keys)) = &cached {
            let fresh = at.elapsed() < JWKS_TTL;
            let knows = kid.is_none_or(|k| keys.find(k).is_some());
            if fresh && (knows || at.elapsed() < JWKS_REFETCH) {
                return Ok(Arc::clone(keys));
            }
        }
        let meta = self.metadata().await?;
        let keys: JwkSet = self.http.get_json(&meta.jwks_uri).await.map_err(unavailable)?;
        let keys = Arc::new(keys);
        *lock(&self.keys) = Some((Instant::now(), Arc::clone(&keys)));
        Ok(keys)
    }

    fn client_auth<'a>(&'a self, form: &mut Vec<(&'a str, &'a str)>) {
        form.push(("client_id", &self.config.client_id));
        if let Some(secret) = &self.config.client_secret {
            form.push(("client_secret", secret));
        }
    }

    /// Starts a device authorization, carrying `nonce` (a token that echoes one must echo it).
    pub async fn start_device(&self, nonce: &str) -> Result<DeviceAuthorization, LoginError> {
        let meta = self.metadata().await?;
        let endpoint = meta.device_authorization_endpoint.as_deref().ok_or_else(|| {
            LoginError::NotConfigured(format!(
                "the identity provider {} offers no device authorization endpoint: use jitgate login --browser",
                self.config.issuer
            ))
        })?;
        let scope = self.config.scopes.join(" ");
        let mut form = vec![("scope", scope.as_str()), ("nonce", nonce)];
        self.client_auth(&mut form);
        match self.http.post_form(endpoint, &form).await {
            Ok(d) => Ok(d),
            Err(HttpError::Status { body, .. }) => Err(provider_refused(&body)),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Polls the token endpoint once for `device_code`.
    pub async fn poll_device(&self, device_code: &str) -> Result<Poll, LoginError> {
        let meta = self.metadata().await?;
        let mut form = vec![
            ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
            ("device_code", device_code),
        ];
        self.client_auth(&mut form);
        match self.http.post_form::<TokenAnswer>(&meta.token_endpoint, &form).await {
            Ok(TokenAnswer { id_token: Some(t) }) => Ok(Poll::Token(t)),
            Ok(TokenAnswer { id_token: None }) => Err(LoginError::Refused(
                "the identity provider returned no ID token (is the openid scope allowed?)".into(),
            )),
            Err(HttpError::Status { body, .. }) => {
                let e: OAuthError = serde_json::from_slice(&body).unwrap_or_default();
                match e.error.as_str() {
                    "authorization_pending" => Ok(Poll::Pending),
                    "slow_down" => Ok(Poll::SlowDown),
                    _ => Err(provider_refused(&body)),
                }
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    /// The URL the browser opens for the authorization code flow with PKCE (S256).
    pub async fn authorization_url(
        &self,
        redirect_uri: &str,
        state: &str,
        nonce: &str,
        code_challenge: &str,
    ) -> Result<String, LoginError> {
        let meta = self.metadata().await?;
        let endpoint = meta.authorization_endpoint.as_deref().ok_or_else(|| {
            LoginError::NotConfigured(format!(
                "the identity provider {} offers no authorization endpoint",
                self.config.issuer
            ))
        })?;
        let scope = self.config.scopes.join(" ");
        let query = super::http::encode_form(&[
            ("response_type", "code"),
            ("client_id", &self.config.client_id),
            ("redirect_uri", redirect_uri),
            ("scope", &scope),
            ("state", state),
            ("nonce", nonce),
            ("code_challenge", code_challenge),
            ("code_challenge_method", "S256"),
        ]);
        let sep = if endpoint.contains('?') { '&' } else { '?' };
        Ok(format!("{endpoint}{sep}{query}"))
    }

    /// Redeems an authorization code (with its PKCE verifier) for an ID token.
    pub async fn redeem_code(&self, code: &str, redirect_uri: &str, verifier: &str) -> Result<String, LoginError> {
        let meta = self.metadata().await?;
        let mut form = vec![
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", redirect_uri),
            ("code_verifier", verifier),
        ];
        self.client_auth(&mut form);
        match self.http.post_form::<TokenAnswer>(&meta.token_endpoint, &form).await {
            Ok(TokenAnswer { id_token: Some(t) }) => Ok(t),
            Ok(TokenAnswer { id_token: None }) => Err(LoginError::Refused(
                "the identity provider returned no ID token (is the openid scope allowed?)".into(),
            )),
            Err(HttpError::Status { body, .. }) => Err(provider_refused(&body)),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Verifies `id_token` (signature, issuer, audience, times, `nonce`) and maps its claims
    /// to a jitgate user and roles.
    pub async fn verify(&self, id_token: &str, nonce: Nonce<'_>) -> Result<Person, LoginError> {
        let header = jsonwebtoken::decode_header(id_token)
            .map_err(|e| LoginError::Refused(format!("the ID token is unreadable: {e}")))?;
        let keys = self.keys(header.kid.as_deref()).await?;
        let claims = verify_token(&keys, &self.config.issuer, &self.config.client_id, nonce, id_token)
            .map_err(LoginError::Refused)?;
        person(&self.config, &claims).map_err(LoginError::Refused)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn provider_refused(body: &[u8]) -> LoginError {
    let e: OAuthError = serde_json::from_slice(body).unwrap_or_default();
    let what = match e.error.as_str() {
        "access_denied" => "the sign-in was denied at the identity provider".to_owned(),
        "expired_token" => "the code expired before the sign-in finished: run jitgate login again".to_owned(),
        "" => "the identity provider refused the request".to_owned(),
        other => format!("the identity provider refused the request ({other})"),
    };
    match e.error_description {
        Some(d) if !d.is_empty() => LoginError::Refused(format!("{what}: {d}")),
        _ => LoginError::Refused(what),
    }
}

/// Algorithms an ID token may be signed with (never `none`, never an HMAC with a shared key).
const ALGORITHMS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// What an ID token's `nonce` claim must be.
#[derive(Clone, Copy, Debug)]
pub enum Nonce<'a> {
    /// Authorization code flow: the token came back through the browser's redirect, so it
    /// must echo the nonce the proxy put in the authorization request.
    Required(&'a str),
    /// Device flow: the proxy itself fetched the token from the token endpoint with its client
    /// credentials and a device code only it holds. RFC 8628 has no nonce and providers
    /// (oidc-provider among them) drop it, so a token without one is accepted; a token with
    /// one must still carry this login's.
    IfPresent(&'a str),
}

/// Verifies an ID token against `keys`: the signature, `iss` equal to `issuer`, `aud`
/// containing `client_id` (and `azp` equal to it when there are several audiences), `exp` and
/// `nbf` with 60 s of leeway, `iat` present, and `nonce` as [`Nonce`] says. Returns the
/// claims, or the reason for the refusal.
pub fn verify_token(
    keys: &JwkSet,
    issuer: &str,
    client_id: &str,
    nonce: Nonce<'_>,
    token: &str,
) -> Result<Map<String, Value>, String> {
    let header = jsonwebtoken::decode_header(token).map_err(|e| format!("the ID token is unreadable: {e}"))?;
    if !ALGORITHMS.contains(&header.alg) {
        return Err(format!(
            "the ID token is signed with {:?}, which is not accepted",
            header.alg
        ));
    }
    let jwk = match &header.kid {
        Some(kid) => keys
            .find(kid)
            .ok_or_else(|| format!("the ID token's key {kid:?} is not among the identity provider's keys"))?,
        None => match keys.keys.as_slice() {
            [only] => only,
            _ => return Err("the ID token names no key and the provider has several".into()),
        },
    };
    let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("the provider's key is unusable: {e}"))?;
    let mut validation = Validation::new(header.alg);
    validation.set_issuer(&[issuer]);
    validation.set_audience(&[client_id]);
    validation.set_required_spec_claims(&["exp", "iss", "aud", "sub", "iat"]);
    validation.leeway = LEEWAY_SECS;
    validation.validate_nbf = true;
    let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key, &validation).map_err(|e| {
        use jsonwebtoken::errors::ErrorKind;
        match e.kind() {
            ErrorKind::InvalidIssuer => format!("the ID token was issued by another issuer (not {issuer})"),
            ErrorKind::InvalidAudience => format!("the ID token is for another audience (not {client_id})"),
            ErrorKind::ExpiredSignature => "the ID token has expired".to_owned(),
            ErrorKind::ImmatureSignature => "the ID token is not valid yet".to_owned(),
            ErrorKind::InvalidSignature => "the ID token's signature does not verify".to_owned(),
            ErrorKind::MissingRequiredClaim(c) => format!("the ID token lacks the {c} claim"),
            ErrorKind::InvalidAlgorithm => "the ID token's algorithm does not match its key".to_owned(),
            _ => format!("the ID token is invalid: {e}"),
        }
    })?;
    let claims = data.claims;
    if let Some(Value::Array(auds)) = claims.get("aud") {
        if auds.len() > 1 && claims.get("azp").and_then(Value::as_str) != Some(client_id) {
            return Err(format!(
                "the ID token has several audiences and its azp is not {client_id}"
            ));
        }
    }
    let (expected, required) = match nonce {
        Nonce::Required(n) => (n, true),
        Nonce::IfPresent(n) => (n, false),
    };
    match claims.get("nonce") {
        Some(Value::String(n)) if super::ct_eq(n.as_bytes(), expected.as_bytes()) => Ok(claims),
        Some(_) => Err("the ID token's nonce is not this login's (a replayed token)".into()),
        None if required => Err("the ID token carries no nonce (a replayed or unsolicited token)".into()),
        None => Ok(claims),
    }
}

/// The jitgate user (`user_claim`) and roles (`groups_claim` through `[oidc.roles]`) of a
/// verified token, or why the login is refused.
pub fn person(config: &OidcConfig, claims: &Map<String, Value>) -> Result<Person, String> {
    let subject = claims.get("sub").and_then(Value::as_str).unwrap_or_default().to_owned();
    let user = claims
        .get(&config.user_claim)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("the ID token has no {} claim to name the user", config.user_claim))?;
    let user = UserName::new(user.to_ascii_lowercase()).map_err(|e| {
        format!(
            "the {} claim {user:?} is not a jitgate user name: {e}",
            config.user_claim
        )
    })?;
    if let Some(domains) = &config.allowed_domains {
        let email = claims
            .get("email")
            .and_then(Value::as_str)
            .ok_or_else(|| "the ID token has no email claim, and oidc.allowed_domains needs one".to_owned())?;
        if claims.get("email_verified").and_then(Value::as_bool) == Some(false) {
            return Err(format!("the email {email} is not verified at the identity provider"));
        }
        let domain = email
            .rsplit_once('@')
            .map(|(_, d)| d.to_ascii_lowercase())
            .unwrap_or_default();
        if !domains.contains(&domain) {
            return Err(format!("{email} is not in an allowed domain ({})", domains.join(", ")));
        }
    }
    let groups: Vec<String> = match claims.get(&config.groups_claim) {
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
        Some(Value::String(one)) => vec![one.clone()],
        _ => Vec::new(),
    };
    let mut seen = BTreeSet::new();
    let mut roles = Vec::new();
    for group in &groups {
        for role in config.roles.get(group).into_iter().flatten() {
            if seen.insert(role.as_str().to_owned()) {
                roles.push(role.clone());
            }
        }
    }
    if roles.is_empty() {
        let listed = if groups.is_empty() {
            format!("no {} claim", config.groups_claim)
        } else {
            format!("groups: {}", groups.join(", "))
        };
        return Err(format!(
            "no group of {user} maps to a jitgate role ({listed}; see [oidc.roles])"
        ));
    }
    Ok(Person {
        user,
        roles,
        subject,
        groups,
    })
}
