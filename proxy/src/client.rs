//! Client for the control API, used by the CLI and by tests: one mTLS connection per request,
//! HTTP/1.1, JSON bodies.

use std::path::Path;
use std::sync::Arc;

use http_body_util::{BodyExt as _, Full};
pub use hyper::Method;
use hyper::StatusCode;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpStream;

use crate::api::Problem;
use crate::model::{Grant, ListFilter, NewExtension, NewGrant, NewRequest, Request};
use crate::sessions::SessionInfo;

/// API call failures.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Setup(String),
    #[error("cannot reach the jitgate API at {addr}: {message}")]
    Connect { addr: String, message: String },
    /// The API answered with a problem: `code` is its stable kind (refused, forbidden, ...).
    #[error("{message} (HTTP {status})")]
    Api { status: u16, code: String, message: String },
    #[error("unexpected API response: {0}")]
    Decode(String),
}

/// A configured API client.
#[derive(Clone)]
pub struct ApiClient {
    addr: String,
    host: String,
    tls: Arc<rustls::ClientConfig>,
}

impl ApiClient {
    /// `api` is `host:port` or `https://host:port`; the certificate files are PEM.
    pub fn from_files(api: &str, cert: &Path, key: &Path, ca: &Path) -> Result<Self, ClientError> {
        let setup = |e: crate::tls::TlsError| ClientError::Setup(e.to_string());
        let roots = crate::tls::load_roots(ca).map_err(setup)?;
        let certs = crate::tls::load_certs(cert).map_err(setup)?;
        let key = crate::tls::load_key(key).map_err(setup)?;
        let cfg = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::Setup(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .map_err(|e| ClientError::Setup(e.to_string()))?;
        Ok(Self::with_tls(api, cfg))
    }

    /// A client with its own TLS settings (`jitgate login`: no certificate yet, a pinned CA).
    pub fn with_tls(api: &str, mut cfg: rustls::ClientConfig) -> Self {
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let addr = api.trim_start_matches("https://").trim_end_matches('/').to_owned();
        let host = addr
            .rsplit_once(':')
            .map_or(addr.as_str(), |(h, _)| h)
            .trim_matches(['[', ']'])
            .to_owned();
        Self {
            addr,
            host,
            tls: Arc::new(cfg),
        }
    }

    /// Sends one request; returns the status and body as received.
    pub async fn raw(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> Result<(u16, Vec<u8>), ClientError> {
        let connect = |message: String| ClientError::Connect {
            addr: self.addr.clone(),
            message,
        };
        let tcp = TcpStream::connect(&self.addr)
            .await
            .map_err(|e| connect(e.to_string()))?;
        let name = ServerName::try_from(self.host.clone()).map_err(|e| ClientError::Setup(e.to_string()))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::clone(&self.tls))
            .connect(name, tcp)
            .await
            .map_err(|e| connect(e.to_string()))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| connect(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &self.addr)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(bytes::Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Setup(e.to_string()))?;
        let resp = sender.send_request(req).await.map_err(|e| connect(e.to_string()))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| connect(e.to_string()))?
            .to_bytes();
        Ok((status.as_u16(), bytes.to_vec()))
    }

    /// One call; a problem answer becomes [`ClientError::Api`].
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let (status, bytes) = self.raw(method, path, body).await?;
        if status != StatusCode::OK.as_u16() && status != StatusCode::CREATED.as_u16() {
            return Err(match serde_json::from_slice::<Problem>(&bytes) {
                Ok(p) => ClientError::Api {
                    status,
                    code: p.code,
                    message: p.detail,
                },
                Err(_) => ClientError::Api {
                    status,
                    code: String::new(),
                    message: String::from_utf8_lossy(&bytes).into_owned(),
                },
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// `POST path` with a JSON body; the answer decoded.
    pub async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T, ClientError> {
        let body = serde_json::to_vec(body).map_err(|e| ClientError::Setup(e.to_string()))?;
        self.call(Method::POST, path, Some(body)).await
    }

    /// `GET /v1/whoami`.
    pub async fn whoami(&self) -> Result<crate::api::WhoAmI, ClientError> {
        self.call(Method::GET, "/v1/whoami", None).await
    }

    /// `POST /v1/grants`.
    pub async fn create_grant(&self, req: &NewGrant) -> Result<Grant, ClientError> {
        self.post("/v1/grants", req).await
    }

    /// `GET /v1/grants`.
    pub async fn list_grants(&self) -> Result<Vec<Grant>, ClientError> {
        self.call(Method::GET, "/v1/grants", None).await
    }

    /// `POST /v1/grants/{id}/revoke`.
    pub async fn revoke_grant(&self, id: &str) -> Result<Grant, ClientError> {
        self.post(&format!("/v1/grants/{}/revoke", encode_segment(id)), &())
            .await
    }

    /// `POST /v1/grants/{id}/extend`: `by` in whole seconds (the API refuses 0).
    pub async fn extend_grant(&self, id: &str, by: std::time::Duration) -> Result<Grant, ClientError> {
        let body = crate::api::ExtendBody {
            duration_secs: by.as_secs(),
        };
        self.post(&format!("/v1/grants/{}/extend", encode_segment(id)), &body)
            .await
    }

    /// `POST /v1/requests`: ask for access.
    pub async fn create_request(&self, new: &NewRequest) -> Result<Request, ClientError> {
        self.post("/v1/requests", new).await
    }

    /// `POST /v1/grants/{id}/extensions`: ask for more time on a live grant.
    pub async fn request_extension(&self, grant: &str, ext: &NewExtension) -> Result<Request, ClientError> {
        self.post(&format!("/v1/grants/{}/extensions", encode_segment(grant)), ext)
            .await
    }

    /// `GET /v1/requests`.
    pub async fn list_requests(&self, filter: &ListFilter) -> Result<Vec<Request>, ClientError> {
        let mut query = Vec::new();
        for (on, name) in [
            (filter.mine, "mine"),
            (filter.pending, "pending"),
            (filter.break_glass, "break_glass"),
        ] {
            if on {
                query.push(format!("{name}=true"));
            }
        }
        let path = if query.is_empty() {
            "/v1/requests".to_owned()
        } else {
            format!("/v1/requests?{}", query.join("&"))
        };
        self.call(Method::GET, &path, None).await
    }

    /// `GET /v1/requests/{id}`.
    pub async fn get_request(&self, id: &str) -> Result<Request, ClientError> {
        self.call(Method::GET, &format!("/v1/requests/{}", encode_segment(id)), None)
            .await
    }

    /// `POST /v1/requests/{id}/approve`.
    pub async fn approve_request(&self, id: &str, comment: Option<String>) -> Result<Request, ClientError> {
        let body = crate::api::ApproveBody { comment };
        self.post(&format!("/v1/requests/{}/approve", encode_segment(id)), &body)
            .await
    }

    /// `POST /v1/requests/{id}/deny`.
    pub async fn deny_request(&self, id: &str, reason: &str) -> Result<Request, ClientError> {
        let body = crate::api::DenyBody { reason: reason.into() };
        self.post(&format!("/v1/requests/{}/deny", encode_segment(id)), &body)
            .await
    }

    /// `POST /v1/requests/{id}/withdraw`.
    pub async fn withdraw_request(&self, id: &str) -> Result<Request, ClientError> {
        self.post(&format!("/v1/requests/{}/withdraw", encode_segment(id)), &())
            .await
    }

    /// `GET /v1/sessions`.
    /// `POST /v1/agents/tokens`.
    pub async fn create_agent_token(
        &self,
        new: &crate::agents::NewAgentToken,
    ) -> Result<crate::agents::CreatedAgentToken, ClientError> {
        self.post("/v1/agents/tokens", new).await
    }

    /// `POST /v1/agents/{name}/remove`.
    pub async fn remove_agent(&self, name: &str) -> Result<crate::api::RemovedAgent, ClientError> {
        self.post(&format!("/v1/agents/{}/remove", encode_segment(name)), &())
            .await
    }

    /// `GET /v1/agents`.
    pub async fn list_agents(&self) -> Result<Vec<crate::agents::AgentStatus>, ClientError> {
        self.call(Method::GET, "/v1/agents", None).await
    }

    pub async fn list_sessions(&self) -> Result<Vec<SessionInfo>, ClientError> {
        self.call(Method::GET, "/v1/sessions", None).await
    }

    /// `POST /v1/audit/reopen`.
    pub async fn reopen_audit(&self) -> Result<crate::api::ReopenedLog, ClientError> {
        self.post("/v1/audit/reopen", &()).await
    }

    /// `POST /v1/sessions/{id}/kill`.
    pub async fn kill_session(&self, id: &str) -> Result<crate::api::Killed, ClientError> {
        self.post(&format!("/v1/sessions/{}/kill", encode_segment(id)), &())
            .await
    }
}

/// Percent-encodes everything but unreserved characters, so an id cannot alter the path.
fn encode_segment(s: &str) -> String {
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
