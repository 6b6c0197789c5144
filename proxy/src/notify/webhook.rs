//! The `[[webhooks]]` config tables: [`RawWebhook`] as written and the validated
//! [`WebhookConfig`]. Secrets and CA files are read at load time, so a missing secret stops
//! start-up (and `config check`) instead of failing deliveries later.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper::Uri;
use serde::Deserialize;

use super::EventKind;
use crate::config::{resolve_secret, ConfigError, SecretKeys, Secrets};

/// One `[[webhooks]]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebhook {
    name: String,
    url: String,
    events: Option<Vec<String>>,
    format: Option<String>,
    secret_env: Option<String>,
    secret_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    timeout: Option<String>,
    max_attempts: Option<u32>,
}

/// Body format of a webhook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The notification as JSON, signed with HMAC-SHA256 (`X-Jitgate-Signature`).
    Json,
    /// A Slack incoming-webhook body: `{"text": "..."}`, unsigned.
    Slack,
}

/// Where and how a webhook is delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub https: bool,
    /// `host:port` to connect to.
    pub authority: String,
    /// Host name (for the `Host` header and TLS server name).
    pub host: String,
    /// Path and query sent in the request line.
    pub path: String,
}

/// A validated webhook.
#[derive(Clone)]
pub struct WebhookConfig {
    /// Label for metrics and logs: 1-63 of `[a-z0-9_-]`, unique.
    pub name: String,
    /// The URL as configured (for logs).
    pub url: String,
    pub endpoint: Endpoint,
    /// Event kinds sent to this webhook. Default: every kind.
    pub events: Vec<EventKind>,
    pub format: Format,
    /// HMAC key for `format = "json"`.
    pub secret: Option<Vec<u8>>,
    /// TLS client configuration for https URLs (roots from `ca_file`).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Deadline of one attempt (connect, send, response head). Default 5s.
    pub timeout: Duration,
    /// Attempts before a notification is given up. Default 5.
    pub max_attempts: u32,
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("events", &self.events)
            .field("format", &self.format)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls.is_some())
            .field("timeout", &self.timeout)
            .field("max_attempts", &self.max_attempts)
            .finish()
    }
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// Validates every `[[webhooks]]` table; errors name the key (`webhooks[1].url`).
pub fn validate(raw: Vec<RawWebhook>, secrets: Secrets) -> Result<Vec<WebhookConfig>, ConfigError> {
    let mut out: Vec<WebhookConfig> = Vec::with_capacity(raw.len());
    for (i, w) in raw.into_iter().enumerate() {
        let hook = w.validate(&format!("webhooks[{i}]"), secrets)?;
        if out.iter().any(|h| h.name == hook.name) {
            return Err(invalid(format!("webhooks[{i}].name"), "duplicate webhook name"));
        }
        out.push(hook);
    }
    Ok(out)
}

impl RawWebhook {
    fn validate(self, key: &str, secrets: Secrets) -> Result<WebhookConfig, ConfigError> {
        let k = |field: &str| format!("{key}.{field}");
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 63
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
        if !name_ok {
            return Err(invalid(k("name"), "use 1-63 of a-z, 0-9, '_' and '-'"));
        }
        let endpoint = parse_url(&self.url).map_err(|m| invalid(k("url"), m))?;
        let events = match self.events {
            None => EventKind::ALL.to_vec(),
            Some(list) => {
                let mut events = Vec::new();
                for (j, e) in list.iter().enumerate() {
                    let kind = EventKind::parse(e).ok_or_else(|| {
                        invalid(
                            k(&format!("events[{j}]")),
                            format!("unknown event {e:?}: use {}", EventKind::names()),
                        )
                    })?;
                    if !events.contains(&kind) {
                        events.push(kind);
                    }
                }
                if events.is_empty() {
                    return Err(invalid(
                        k("events"),
                        "must name at least one event (or leave it out for all)",
                    ));
                }
                events
            }
        };
        let format = match self.format.as_deref().unwrap_or("json") {
            "json" => Format::Json,
            "slack" => Format::Slack,
            other => {
                return Err(invalid(
                    k("format"),
                    format!("unknown format {other:?}: use json or slack"),
                ))
            }
        };
        // Whether a secret is configured decides the format checks even when secrets are not
        // read (inspection).
        let configured = self.secret_env.is_some() || self.secret_file.is_some();
        let keys = SecretKeys {
            table: key,
            env: "secret_env",
            file: "secret_file",
            both: &k("secret_env"),
        };
        let secret = resolve_secret(&keys, self.secret_env, self.secret_file, secrets)?.map(String::into_bytes);
        match (format, &secret) {
            (Format::Json, None) if !configured => {
                return Err(invalid(
                    k("secret_env"),
                    "format = \"json\" is signed: set secret_env or secret_file",
                ))
            }
            (Format::Json, Some(s)) if s.is_empty() => return Err(invalid(k("secret_env"), "the secret is empty")),
            (Format::Slack, _) if configured => {
                return Err(invalid(
                    k("secret_env"),
                    "format = \"slack\" is not signed: remove the secret",
                ))
            }
            _ => {}
        }
        let tls = match (endpoint.https, self.ca_file) {
            (true, Some(ca)) => Some(client_tls(&ca).map_err(|m| invalid(k("ca_file"), m))?),
            (true, None) => {
                return Err(invalid(
                    k("ca_file"),
                    "required for https URLs (the CA bundle that signs the receiver's certificate)",
                ))
            }
            (false, Some(_)) => return Err(invalid(k("ca_file"), "only used with https URLs")),
            (false, None) => None,
        };
        let timeout = match self.timeout.as_deref() {
            None => Duration::from_secs(5),
            Some(v) => humantime::parse_duration(v)
                .map_err(|e| invalid(k("timeout"), format!("{v:?} is not a duration ({e})")))?,
        };
        if timeout.is_zero() {
            return Err(invalid(k("timeout"), "must be more than 0s"));
        }
        let max_attempts = self.max_attempts.unwrap_or(5);
        if !(1..=100).contains(&max_attempts) {
            return Err(invalid(k("max_attempts"), "must be between 1 and 100"));
        }
        Ok(WebhookConfig {
            name: self.name,
            url: self.url,
            endpoint,
            events,
            format,
            secret,
            tls,
            timeout,
            max_attempts,
        })
    }
}

fn parse_url(url: &str) -> Result<Endpoint, String> {
    let uri: Uri = url.parse().map_err(|e| format!("{url:?} is not a URL ({e})"))?;
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(format!("{url:?}: use an http:// or https:// URL")),
    };
    let authority = uri.authority().ok_or_else(|| format!("{url:?} has no host"))?;
    if authority.as_str().contains('@') {
        return Err(format!("{url:?}: credentials in the URL are not supported"));
    }
    let host = authority.host().trim_matches(['[', ']']).to_owned();
    if host.is_empty() {
        return Err(format!("{url:?} has no host"));
    }
    let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    Ok(Endpoint {
        https,
        authority: format!("{}:{port}", authority.host()),
        host,
        path,
    })
}

fn client_tls(ca: &std::path::Path) -> Result<Arc<rustls::ClientConfig>, String> {
    let roots = crate::tls::load_roots(ca).map_err(|e| e.to_string())?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}
