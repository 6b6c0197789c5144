//! The small HTTP client the proxy talks to the identity provider with: discovery, JWKS,
//! device authorization and token requests. HTTPS with the system's roots plus
//! `[oidc] ca_file`; plain HTTP only to loopback issuers (see `config::issuer_allowed`).
//! One connection per call, bounded in time and size.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;

/// Longest one call to the provider may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest answer read from the provider.
const MAX_BODY: usize = 1 << 20;

/// A request body and its type.
struct Body {
    content_type: &'static str,
    bytes: String,
}

/// A failed call to the provider.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{0}")]
    Setup(String),
    #[error("cannot reach {url}: {message}")]
    Unreachable { url: String, message: String },
    /// The provider answered `status`; `body` as received (an OAuth error object, usually).
    #[error("{url} answered HTTP {status}")]
    Status { url: String, status: u16, body: Vec<u8> },
    #[error("unreadable answer from {url}: {message}")]
    Decode { url: String, message: String },
}

/// Calls the provider. Cheap to clone.
#[derive(Clone)]
pub struct Http {
    tls: Arc<rustls::ClientConfig>,
}

impl Http {
    /// Trusts the system's roots and the certificates in `extra_ca` (PEM).
    pub fn new(extra_ca: Option<&std::path::Path>) -> Result<Self, HttpError> {
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for cert in native.certs {
            // A system certificate rustls cannot use is skipped, as browsers do.
            let _ = roots.add(cert);
        }
        if let Some(path) = extra_ca {
            for cert in crate::tls::load_certs(path).map_err(|e| HttpError::Setup(e.to_string()))? {
                roots.add(cert).map_err(|e| HttpError::Setup(e.to_string()))?;
            }
        }
        let mut cfg = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| HttpError::Setup(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self { tls: Arc::new(cfg) })
    }

    /// `GET url`, JSON answer.
    pub async fn get_json<T: DeserializeOwned>(&self, url: &str) -> Result<T, HttpError> {
        let body = self.call(hyper::Method::GET, url, None, None).await?;
        decode(url, &body)
    }

    /// `POST url` with a form body, JSON answer.
    pub async fn post_form<T: DeserializeOwned>(&self, url: &str, form: &[(&str, &str)]) -> Result<T, HttpError> {
        let body = Body {
            content_type: "application/x-www-form-urlencoded",
            bytes: encode_form(form),
        };
        let body = self.call(hyper::Method::POST, url, Some(body), None).await?;
        decode(url, &body)
    }

    /// `POST url` with a JSON body and `Authorization: Bearer token`, JSON answer.
    pub async fn post_json_bearer<T: DeserializeOwned>(
        &self,
        url: &str,
        token: &str,
        json: &serde_json::Value,
    ) -> Result<T, HttpError> {
        let body = Body {
            content_type: "application/json; charset=utf-8",
            bytes: json.to_string(),
        };
        let body = self.call(hyper::Method::POST, url, Some(body), Some(token)).await?;
        decode(url, &body)
    }

    async fn call(
        &self,
        method: hyper::Method,
        url: &str,
        form: Option<Body>,
        bearer: Option<&str>,
    ) -> Result<Vec<u8>, HttpError> {
        match tokio::time::timeout(CALL_TIMEOUT, self.call_unbounded(method, url, form, bearer)).await {
            Ok(r) => r,
            Err(_) => Err(HttpError::Unreachable {
                url: url.to_owned(),
                message: format!("no answer within {}s", CALL_TIMEOUT.as_secs()),
            }),
        }
    }

    async fn call_unbounded(
        &self,
        method: hyper::Method,
        url: &str,
        form: Option<Body>,
        bearer: Option<&str>,
    ) -> Result<Vec<u8>, HttpError> {
        let unreachable = |message: String| HttpError::Unreachable {
            url: url.to_owned(),
            message,
        };
        let parsed = Url::parse(url).ok_or_else(|| HttpError::Setup(format!("{url:?} is not an http(s) URL")))?;
        if !parsed.https && !crate::config::issuer_allowed(url) {
            return Err(HttpError::Setup(format!(
                "{url}: plain http is used only on loopback addresses"
            )));
        }
        let tcp = TcpStream::connect((parsed.host.as_str(), parsed.port))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let request = hyper::Request::builder()
            .method(method)
            .uri(&parsed.path)
            .header(hyper::header::HOST, parsed.authority.as_str())
            .header(hyper::header::ACCEPT, "application/json")
            .header(
                hyper::header::USER_AGENT,
                concat!("jitgate/", env!("CARGO_PKG_VERSION")),
            );
        let request = match bearer {
            Some(token) => request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}")),
            None => request,
        };
        let (request, bytes) = match form {
            Some(b) => (request.header(hyper::header::CONTENT_TYPE, b.content_type), b.bytes),
            None => (request, String::new()),
        };
        let request = request
            .body(Full::new(bytes::Bytes::from(bytes)))
            .map_err(|e| HttpError::Setup(e.to_string()))?;
        let response = if parsed.https {
            let name = ServerName::try_from(parsed.host.clone()).map_err(|e| HttpError::Setup(e.to_string()))?;
            let tls = tokio_rustls::TlsConnector::from(Arc::clone(&self.tls))
                .connect(name, tcp)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            send(TokioIo::new(tls), request).await
        } else {
            send(TokioIo::new(tcp), request).await
        }
        .map_err(unreachable)?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| unreachable(e.to_string()))?
            .to_bytes()
            .to_vec();
        if !(200..300).contains(&status) {
            return Err(HttpError::Status {
                url: url.to_owned(),
                status,
                body,
            });
        }
        Ok(body)
    }
}

async fn send<I>(
    io: I,
    request: hyper::Request<Full<bytes::Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender.send_request(request).await.map_err(|e| e.to_string())
}

fn decode<T: DeserializeOwned>(url: &str, body: &[u8]) -> Result<T, HttpError> {
    serde_json::from_slice(body).map_err(|e| HttpError::Decode {
        url: url.to_owned(),
        message: e.to_string(),
    })
}

/// `application/x-www-form-urlencoded`.
pub fn encode_form(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", percent(k), percent(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Percent-encodes everything but unreserved characters.
pub fn percent(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The parts of an `http(s)://host[:port]/path?query` URL a request needs.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Url {
    pub https: bool,
    pub host: String,
    pub port: u16,
    /// `host[:port]` as written.
    pub authority: String,
    /// Path and query, at least `/`.
    pub path: String,
}

impl Url {
    pub fn parse(url: &str) -> Option<Self> {
        let (https, rest) = match url.split_once("://")? {
            ("https", rest) => (true, rest),
            ("http", rest) => (false, rest),
            _ => return None,
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty() || authority.contains('@') {
            return None;
        }
        let default = if https { 443 } else { 80 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']')?;
            match after {
                "" => (host, default),
                p => (host, p.strip_prefix(':')?.parse().ok()?),
            }
        } else {
            match authority.split_once(':') {
                Some((h, p)) => (h, p.parse().ok()?),
                None => (authority, default),
            }
        };
        let path = if path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_owned()
        };
        Some(Self {
            https,
            host: host.to_owned(),
            port,
            authority: authority.to_owned(),
            path,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_host_port_and_path() {
        let u = Url::parse("https://idp.example.com/realms/a/.well-known/openid-configuration").unwrap();
        assert_eq!((u.https, u.host.as_str(), u.port), (true, "idp.example.com", 443));
        assert_eq!(u.path, "/realms/a/.well-known/openid-configuration");
        let u = Url::parse("http://127.0.0.1:9000").unwrap();
        assert_eq!(
            (u.https, u.host.as_str(), u.port, u.path.as_str()),
            (false, "127.0.0.1", 9000, "/")
        );
        let u = Url::parse("http://[::1]:8080/x?y=1").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.path.as_str()), ("::1", 8080, "/x?y=1"));
        assert!(Url::parse("ftp://x/").is_none());
        assert!(Url::parse("https://user@evil/").is_none());
        assert_eq!(encode_form(&[("a b", "c&d=é")]), "a%20b=c%26d%3D%C3%A9");
    }
}
