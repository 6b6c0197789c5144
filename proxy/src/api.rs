//! The control API: HTTPS + JSON over mTLS, for the CLI (and later the web console). Every
//! route but `whoami` requires the `admin` role in the client certificate.
//!
//! Routes: `GET/POST /v1/grants`, `POST /v1/grants/{id}/revoke`, `GET /v1/sessions`,
//! `POST /v1/sessions/{id}/kill`, `GET /v1/whoami`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use crate::config::Config;
use crate::grants::{Grant, GrantError, Grants, NewGrant};
use crate::metrics::Metrics;
use crate::pki::{identity_from_der, Identity};
use crate::sessions::{SessionInfo, Sessions};
use crate::types::{GrantId, SessionId};

/// State shared by API handlers.
pub struct ApiState {
    pub config: Config,
    pub grants: Arc<Grants>,
    pub sessions: Arc<Sessions>,
    pub metrics: Arc<Metrics>,
}

/// Error body: `{"error": "..."}`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ApiErrorBody {
    pub error: String,
}

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ApiErrorBody { error: self.1 })).into_response()
    }
}

impl From<GrantError> for ApiError {
    fn from(e: GrantError) -> Self {
        let status = match &e {
            GrantError::NotFound(_) => StatusCode::NOT_FOUND,
            GrantError::UnknownTarget(_) | GrantError::NoCredentials { .. } | GrantError::BadDuration => {
                StatusCode::BAD_REQUEST
            }
            GrantError::Store(_) | GrantError::Audit(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError(status, e.to_string())
    }
}

/// Who is calling, as proven by the client certificate.
#[derive(Debug, Serialize, Deserialize)]
pub struct WhoAmI {
    pub user: String,
    pub roles: Vec<String>,
}

fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/v1/whoami", get(whoami))
        .route("/v1/grants", get(list_grants).post(create_grant))
        .route("/v1/grants/{id}/revoke", post(revoke_grant))
        .route("/v1/grants/{id}/extend", post(extend_grant))
        .route("/v1/sessions", get(list_sessions))
        .route("/v1/sessions/{id}/kill", post(kill_session))
        .with_state(state)
}

fn require_admin(id: &Identity) -> Result<(), ApiError> {
    if id.has_role("admin") {
        Ok(())
    } else {
        Err(ApiError(
            StatusCode::FORBIDDEN,
            format!("{} lacks the admin role", id.user),
        ))
    }
}

async fn whoami(Extension(id): Extension<Arc<Identity>>) -> Json<WhoAmI> {
    Json(WhoAmI {
        user: id.user.to_string(),
        roles: id.roles.iter().map(ToString::to_string).collect(),
    })
}

async fn list_grants(
    State(s): State<Arc<ApiState>>,
    Extension(id): Extension<Arc<Identity>>,
) -> Result<Json<Vec<Grant>>, ApiError> {
    require_admin(&id)?;
    Ok(Json(s.grants.list()))
}

async fn create_grant(
    State(s): State<Arc<ApiState>>,
    Extension(id): Extension<Arc<Identity>>,
    Json(req): Json<NewGrant>,
) -> Result<(StatusCode, Json<Grant>), ApiError> {
    require_admin(&id)?;
    let grant = s.grants.create(req, id.user.clone(), &s.config)?;
    tracing::info!(grant.id = %grant.id, user = %grant.user, target = %grant.target, by = %id.user, "grant created");
    Ok((StatusCode::CREATED, Json(grant)))
}

async fn revoke_grant(
    State(s): State<Arc<ApiState>>,
    Extension(id): Extension<Arc<Identity>>,
    Path(grant): Path<String>,
) -> Result<Json<Grant>, ApiError> {
    require_admin(&id)?;
    let grant = s.grants.revoke(&GrantId::from_string(grant), &id.user)?;
    tracing::info!(grant.id = %grant.id, by = %id.user, "grant revoked");
    Ok(Json(grant))
}

/// Body of `POST /v1/grants/{id}/extend`: how much later the grant ends.
#[derive(Debug, Serialize, Deserialize)]
pub struct ExtendBody {
    pub duration_secs: u64,
}

async fn extend_grant(
    State(s): State<Arc<ApiState>>,
    Extension(id): Extension<Arc<Identity>>,
    Path(grant): Path<String>,
    Json(ext): Json<ExtendBody>,
) -> Result<Json<Grant>, ApiError> {
    require_admin(&id)?;
    let by = std::time::Duration::from_secs(ext.duration_secs);
    let grant = s.grants.extend(&GrantId::from_string(grant), by, &id.user)?;
    tracing::info!(grant.id = %grant.id, by = %id.user, "grant extended");
    Ok(Json(grant))
}

async fn list_sessions(
    State(s): State<Arc<ApiState>>,
    Extension(id): Extension<Arc<Identity>>,
) -> Result<Json<Vec<SessionInfo>>, ApiError> {
    require_admin(&id)?;
    Ok(Json(s.sessions.list()))
}

/// Body of a successful kill.
#[derive(Debug, Serialize, Deserialize)]
pub struct Killed {
    pub id: SessionId,
    pub killed: bool,
}

async fn kill_session(
    State(s): State<Arc<ApiState>>,
    Extension(id): Extension<Arc<Identity>>,
    Path(session): Path<String>,
) -> Result<Json<Killed>, ApiError> {
    require_admin(&id)?;
    let sid = SessionId::from_string(session);
    if !s.sessions.kill(&sid) {
        return Err(ApiError(StatusCode::NOT_FOUND, format!("no live session {sid}")));
    }
    tracing::info!(session.id = %sid, by = %id.user, "session killed");
    Ok(Json(Killed { id: sid, killed: true }))
}

/// Serves one API connection: mTLS handshake, then HTTP/1.1 until either side closes or the
/// proxy shuts down.
pub async fn serve_connection(
    state: Arc<ApiState>,
    tls: Arc<rustls::ServerConfig>,
    tcp: TcpStream,
    _peer: SocketAddr,
    handshake_timeout: Duration,
    shutdown: CancellationToken,
) {
    let accepted = tokio::time::timeout(handshake_timeout, tokio_rustls::TlsAcceptor::from(tls).accept(tcp)).await;
    let stream = match accepted {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let reason = crate::tls::failure_reason(&e);
            state
                .metrics
                .tls_handshake_failures_total
                .with_label_values(&["api", reason])
                .inc();
            tracing::info!(reason, error = %e, "API TLS handshake refused");
            return;
        }
        Err(_) => {
            state
                .metrics
                .tls_handshake_failures_total
                .with_label_values(&["api", "timeout"])
                .inc();
            return;
        }
    };
    let der = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec());
    let identity = match der.as_deref().map(identity_from_der) {
        Some(Ok(id)) => Arc::new(id),
        _ => {
            state
                .metrics
                .tls_handshake_failures_total
                .with_label_values(&["api", "bad_certificate"])
                .inc();
            return;
        }
    };
    let app = router(state).layer(Extension(identity));
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let app = app.clone();
        async move {
            Ok::<_, Infallible>(
                app.oneshot(req.map(axum::body::Body::new))
                    .await
                    .unwrap_or_else(|e| match e {}),
            )
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(handshake_timeout)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => if let Err(error) = r { tracing::debug!(%error, "API connection ended") },
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(2), conn).await;
        }
    }
}
