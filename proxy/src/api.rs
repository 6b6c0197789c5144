//! The control API: HTTPS + JSON over mTLS, for the CLI and the web console (`/ui/`, see
//! [`crate::console`]). Each caller is identified by its client certificate (user and roles),
//! or by its console session's cookie, and authorized by role:
//!
//! - anyone: `GET /v1/whoami`, `GET /openapi.json`, filing requests (the policies decide),
//!   listing their own grants, and extension requests for them;
//! - requests: visible to the requester, to holders of an approver role of the deciding
//!   policy, and to admins; approvals and denials need an approver role (admins may deny);
//! - `admin` role: direct grants (`POST /v1/grants`, revoke, extend), sessions, and
//!   reopening the audit log (`POST /v1/audit/reopen`, for logrotate);
//! - `admin` or `auditor` role: searching the audit log (`GET /v1/audit`) and fetching shell
//!   recordings (`GET /v1/recordings/{id}`).
//!
//! Errors are RFC 9457 problem details (`application/problem+json`). The routes are described
//! by `docs/openapi.json`, served at `/openapi.json`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use crate::audit::{AuditLog, ReopenReason};
use crate::budget::{Authenticated, Ticket};
use crate::config::Config;
use crate::grants::{GrantError, Grants};
use crate::metrics::Metrics;
use crate::model::{Grant, GrantId, ListFilter, NewExtension, NewGrant, NewRequest, Request, RequestId, SessionId};
use crate::pki::{identity_from_der, Identity};
use crate::requests::{RequestError, Requests};
use crate::sessions::{SessionInfo, Sessions};
use crate::store::StoreError;

/// The OpenAPI document of this API, as kept in docs/.
pub const OPENAPI: &str = include_str!("../../docs/openapi.json");

/// Every route: method and path (axum syntax), as the OpenAPI document lists them.
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/openapi.json"),
    ("get", "/v1/login"),
    ("post", "/v1/login/device"),
    ("post", "/v1/login/device/token"),
    ("post", "/v1/login/authorize"),
    ("post", "/v1/login/code"),
    ("post", "/v1/login/invite"),
    ("post", "/v1/login/renew"),
    ("post", "/v1/invites"),
    ("post", "/v1/slack/interactions"),
    ("post", "/v1/slack/links"),
    ("get", "/v1/whoami"),
    ("get", "/v1/grants"),
    ("post", "/v1/grants"),
    ("post", "/v1/grants/{id}/revoke"),
    ("post", "/v1/grants/{id}/extend"),
    ("post", "/v1/grants/{id}/extensions"),
    ("get", "/v1/requests"),
    ("post", "/v1/requests"),
    ("get", "/v1/requests/{id}"),
    ("post", "/v1/requests/{id}/approve"),
    ("post", "/v1/requests/{id}/deny"),
    ("post", "/v1/requests/{id}/withdraw"),
    ("get", "/v1/sessions"),
    ("post", "/v1/sessions/{id}/kill"),
    ("get", "/v1/audit"),
    ("post", "/v1/audit/reopen"),
    ("get", "/v1/recordings/{id}"),
    ("get", "/v1/agents"),
    ("post", "/v1/agents/tokens"),
    ("post", "/v1/agents/{name}/remove"),
];

/// State shared by API handlers.
pub struct ApiState {
    /// Web console sessions of this replica.
    pub consoles: crate::console::Consoles,
    /// The Slack app (`[slack]`), or `None`.
    pub slack: Option<Arc<crate::slack::Slack>>,
    /// `jitgate login`: OIDC, invites, renewals.
    pub logins: Arc<crate::login::Logins>,
    pub config: Config,
    pub store: Arc<dyn crate::store::Store>,
    pub hub: Arc<crate::agents::Hub>,
    pub grants: Arc<Grants>,
    pub requests: Arc<Requests>,
    pub sessions: Arc<Sessions>,
    pub audit: Arc<AuditLog>,
    pub metrics: Arc<Metrics>,
    /// Connections past the TLS handshake (`limits.max_connections`).
    pub connections: Authenticated,
}

/// An error body: RFC 9457 problem details, with `code` naming the kind of problem.
#[derive(Debug, Serialize, Deserialize)]
pub struct Problem {
    /// Always `about:blank`: `code` and `title` say what went wrong.
    #[serde(rename = "type")]
    pub kind: String,
    /// The HTTP status text.
    pub title: String,
    pub status: u16,
    /// What happened, for people.
    pub detail: String,
    /// Stable, for programs: invalid, refused, forbidden, not_found, conflict, unavailable,
    /// no_route.
    pub code: String,
}

/// A failed call: status, problem code and detail.
pub struct ApiError(StatusCode, &'static str, String);

/// A problem-details response.
pub fn problem(status: StatusCode, code: &'static str, detail: String) -> Response {
    ApiError(status, code, detail).into_response()
}

impl ApiError {
    fn forbidden(detail: String) -> Self {
        ApiError(StatusCode::FORBIDDEN, "forbidden", detail)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let ApiError(status, code, detail) = self;
        let body = Problem {
            kind: "about:blank".into(),
            title: status.canonical_reason().unwrap_or("Error").into(),
            status: status.as_u16(),
            detail,
            code: code.into(),
        };
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        (status, [(header::CONTENT_TYPE, "application/problem+json")], bytes).into_response()
    }
}

impl From<GrantError> for ApiError {
    fn from(e: GrantError) -> Self {
        let (status, code) = match &e {
            GrantError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            GrantError::UnknownTarget(_) | GrantError::NoCredentials { .. } | GrantError::BadDuration => {
                (StatusCode::BAD_REQUEST, "invalid")
            }
            GrantError::Conflict(_) | GrantError::Store(StoreError::Conflict) => (StatusCode::CONFLICT, "conflict"),
            GrantError::Store(StoreError::NotFound) => (StatusCode::NOT_FOUND, "not_found"),
            GrantError::Store(StoreError::Unavailable(_)) | GrantError::Audit(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
            }
        };
        ApiError(status, code, e.to_string())
    }
}

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> Self {
        let (status, code) = match &e {
            RequestError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid"),
            RequestError::Refused(_) => (StatusCode::FORBIDDEN, "refused"),
            RequestError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            RequestError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            RequestError::Conflict(_) | RequestError::Store(StoreError::Conflict) => (StatusCode::CONFLICT, "conflict"),
            RequestError::Store(StoreError::NotFound) => (StatusCode::NOT_FOUND, "not_found"),
            RequestError::Store(StoreError::Unavailable(_))
            | RequestError::Audit(_)
            | RequestError::Grant(GrantError::Store(StoreError::Unavailable(_)) | GrantError::Audit(_)) => {
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
            }
            // The grant could not be made for the request as it stands (target gone, ...).
            RequestError::Grant(_) => (StatusCode::CONFLICT, "conflict"),
        };
        ApiError(status, code, e.to_string())
    }
}

impl From<crate::agents::TokenError> for ApiError {
    fn from(e: crate::agents::TokenError) -> Self {
        use crate::agents::TokenError;
        let (status, code) = match &e {
            TokenError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid"),
            TokenError::Store(_) => (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
            TokenError::Ca(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        ApiError(status, code, e.to_string())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        ApiError(StatusCode::BAD_REQUEST, "invalid", e.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> Self {
        ApiError(StatusCode::BAD_REQUEST, "invalid", e.body_text())
    }
}

/// Who is calling, as proven by the client certificate.
#[derive(Debug, Serialize, Deserialize)]
pub struct WhoAmI {
    pub user: String,
    pub roles: Vec<String>,
}

type Caller = Extension<Arc<Identity>>;
type Shared = State<Arc<ApiState>>;

/// The routes a caller without a client certificate may use: logging in.
fn login_routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/openapi.json", get(openapi))
        .route("/v1/login", get(login_methods))
        .route("/v1/login/device", post(login_device))
        .route("/v1/login/device/token", post(login_device_token))
        .route("/v1/login/authorize", post(login_authorize))
        .route("/v1/login/code", post(login_code))
        .route("/v1/login/invite", post(login_invite))
        .route("/v1/slack/interactions", post(slack_interaction))
        .route("/ui", get(crate::console::root))
        .route("/ui/", get(crate::console::index))
        .route("/ui/session", get(crate::console::show).post(crate::console::sign_in))
        .route("/ui/logout", post(crate::console::sign_out))
        .route("/ui/oidc/start", get(crate::console::oidc_start))
        .route("/ui/oidc/callback", get(crate::console::oidc_callback))
        .route("/ui/{*file}", get(crate::console::asset))
}

/// The router of a connection without a client certificate: the login routes, and `401` for
/// everything else.
fn anonymous_router(state: Arc<ApiState>) -> Router {
    login_routes()
        .fallback(|uri: axum::http::Uri| async move {
            ApiError(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                format!(
                    "{} needs a client certificate: run jitgate login (or pass --cert and --key)",
                    uri.path()
                ),
            )
        })
        .with_state(state)
}

fn router(state: Arc<ApiState>) -> Router {
    login_routes()
        .route("/v1/login/renew", post(login_renew))
        .route("/v1/invites", post(create_invite))
        .route("/v1/slack/links", post(slack_link))
        .route("/v1/whoami", get(whoami))
        .route("/v1/grants", get(list_grants).post(create_grant))
        .route("/v1/grants/{id}/revoke", post(revoke_grant))
        .route("/v1/grants/{id}/extend", post(extend_grant))
        .route("/v1/grants/{id}/extensions", post(request_extension))
        .route("/v1/requests", get(list_requests).post(create_request))
        .route("/v1/requests/{id}", get(show_request))
        .route("/v1/requests/{id}/approve", post(approve_request))
        .route("/v1/requests/{id}/deny", post(deny_request))
        .route("/v1/requests/{id}/withdraw", post(withdraw_request))
        .route("/v1/sessions", get(list_sessions))
        .route("/v1/sessions/{id}/kill", post(kill_session))
        .route("/v1/audit", get(search_audit))
        .route("/v1/audit/reopen", post(reopen_audit))
        .route("/v1/recordings/{id}", get(show_recording))
        .route("/v1/agents", get(list_agents))
        .route("/v1/agents/tokens", post(create_agent_token))
        .route("/v1/agents/{name}/remove", post(remove_agent))
        .fallback(no_route)
        .method_not_allowed_fallback(no_method)
        .with_state(state)
}

async fn no_route(uri: axum::http::Uri) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, "no_route", format!("no route {}", uri.path()))
}

async fn no_method(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError(
        StatusCode::METHOD_NOT_ALLOWED,
        "no_route",
        format!("{method} is not allowed on {}", uri.path()),
    )
}

fn require_admin(id: &Identity) -> Result<(), ApiError> {
    if id.has_role("admin") {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!("{} lacks the admin role", id.user)))
    }
}

impl From<crate::login::LoginError> for ApiError {
    fn from(e: crate::login::LoginError) -> Self {
        use crate::login::LoginError;
        let (status, code) = match &e {
            LoginError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid"),
            LoginError::Pending => (StatusCode::BAD_REQUEST, "authorization_pending"),
            LoginError::SlowDown => (StatusCode::BAD_REQUEST, "slow_down"),
            LoginError::Refused(_) => (StatusCode::FORBIDDEN, "refused"),
            LoginError::NotConfigured(_) => (StatusCode::NOT_FOUND, "not_configured"),
            LoginError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        };
        ApiError(status, code, e.to_string())
    }
}

/// Body of `POST /v1/slack/links`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlackLinkBody {
    /// Slack's member ID of the account to link (`U...`).
    pub slack_user: String,
}

/// Answer of `POST /v1/slack/links`.
#[derive(Debug, Serialize, Deserialize)]
pub struct SlackLinkOffered {
    pub slack_user: String,
    pub message: String,
}

fn slack_of(s: &ApiState) -> Result<&crate::slack::Slack, ApiError> {
    s.slack.as_deref().ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            "not_configured",
            "this proxy has no [slack] app".into(),
        )
    })
}

/// `POST /v1/slack/interactions`: Slack's calls (signed, without a client certificate).
async fn slack_interaction(
    State(s): Shared,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<crate::slack::Outcome>, ApiError> {
    let slack = slack_of(&s)?;
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    slack
        .interaction(
            &s.requests,
            header("x-slack-request-timestamp"),
            header("x-slack-signature"),
            &body,
        )
        .await
        .map(Json)
        .map_err(|r| ApiError(StatusCode::UNAUTHORIZED, "refused", r.to_string()))
}

/// `POST /v1/slack/links`: the caller offers a Slack account a link (it confirms in Slack).
async fn slack_link(
    State(s): Shared,
    Extension(id): Caller,
    body: Result<Json<SlackLinkBody>, JsonRejection>,
) -> Result<Json<SlackLinkOffered>, ApiError> {
    let Json(body) = body?;
    let slack = slack_of(&s)?;
    slack
        .offer_link(&id, &body.slack_user)
        .map_err(|m| ApiError(StatusCode::BAD_REQUEST, "invalid", m))?;
    Ok(Json(SlackLinkOffered {
        message: format!(
            "sent {} a direct message in Slack: click Confirm there to link it to {}",
            body.slack_user, id.user
        ),
        slack_user: body.slack_user,
    }))
}

/// The TCP peer of an API connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer(std::net::SocketAddr);

pub(crate) fn caller(peer: Option<Extension<Peer>>) -> crate::login::Caller {
    crate::login::Caller {
        remote_addr: peer.map(|Extension(Peer(a))| a),
    }
}

async fn login_methods(State(s): Shared) -> Json<crate::login::LoginMethods> {
    Json(s.logins.methods())
}

async fn login_device(
    State(s): Shared,
    peer: Option<Extension<Peer>>,
) -> Result<Json<crate::login::DeviceStarted>, ApiError> {
    Ok(Json(s.logins.start_device(caller(peer)).await?))
}

async fn login_device_token(
    State(s): Shared,
    peer: Option<Extension<Peer>>,
    body: Result<Json<crate::login::DeviceToken>, JsonRejection>,
) -> Result<Json<crate::login::Issued>, ApiError> {
    let Json(body) = body?;
    Ok(Json(s.logins.poll_device(caller(peer), body).await?))
}

async fn login_authorize(
    State(s): Shared,
    peer: Option<Extension<Peer>>,
    body: Result<Json<crate::login::Authorize>, JsonRejection>,
) -> Result<Json<crate::login::Authorization>, ApiError> {
    let Json(body) = body?;
    Ok(Json(s.logins.authorize(caller(peer), body).await?))
}

async fn login_code(
    State(s): Shared,
    peer: Option<Extension<Peer>>,
    body: Result<Json<crate::login::CodeLogin>, JsonRejection>,
) -> Result<Json<crate::login::Issued>, ApiError> {
    let Json(body) = body?;
    Ok(Json(s.logins.code(caller(peer), body).await?))
}

async fn login_invite(
    State(s): Shared,
    peer: Option<Extension<Peer>>,
    body: Result<Json<crate::login::InviteLogin>, JsonRejection>,
) -> Result<Json<crate::login::Issued>, ApiError> {
    let Json(body) = body?;
    Ok(Json(s.logins.redeem_invite(caller(peer), body).await?))
}

async fn login_renew(
    State(s): Shared,
    Extension(id): Caller,
    peer: Option<Extension<Peer>>,
    body: Result<Json<crate::login::Renew>, JsonRejection>,
) -> Result<Json<crate::login::Issued>, ApiError> {
    let Json(body) = body?;
    Ok(Json(s.logins.renew(caller(peer), &id, body).await?))
}

async fn create_invite(
    State(s): Shared,
    Extension(id): Caller,
    body: Result<Json<crate::login::NewInvite>, JsonRejection>,
) -> Result<(StatusCode, Json<crate::login::CreatedInvite>), ApiError> {
    require_admin(&id)?;
    let Json(new) = body?;
    let created = s.logins.create_invite(&id.user, new).await?;
    tracing::info!(invite.id = %created.id, user = %created.user, by = %id.user, "invite created");
    Ok((StatusCode::CREATED, Json(created)))
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

async fn whoami(Extension(id): Caller) -> Json<WhoAmI> {
    Json(WhoAmI {
        user: id.user.to_string(),
        roles: id.roles.iter().map(ToString::to_string).collect(),
    })
}

/// Admins get every active grant; anyone else their own.
async fn list_grants(State(s): Shared, Extension(id): Caller) -> Json<Vec<Grant>> {
    let mut grants = s.grants.list();
    if !id.has_role("admin") {
        grants.retain(|g| g.user == id.user);
    }
    Json(grants)
}

async fn create_grant(
    State(s): Shared,
    Extension(id): Caller,
    body: Result<Json<NewGrant>, JsonRejection>,
) -> Result<(StatusCode, Json<Grant>), ApiError> {
    require_admin(&id)?;
    let Json(req) = body?;
    let grant = s.grants.create(req, id.user.clone(), &s.config).await?;
    tracing::info!(grant.id = %grant.id, user = %grant.user, target = %grant.target, by = %id.user, "grant created");
    Ok((StatusCode::CREATED, Json(grant)))
}

async fn revoke_grant(
    State(s): Shared,
    Extension(id): Caller,
    Path(grant): Path<String>,
) -> Result<Json<Grant>, ApiError> {
    require_admin(&id)?;
    let grant = s.grants.revoke(&GrantId::from_string(grant), &id.user).await?;
    tracing::info!(grant.id = %grant.id, by = %id.user, "grant revoked");
    Ok(Json(grant))
}

/// Body of `POST /v1/grants/{id}/extend`: how much later the grant ends.
#[derive(Debug, Serialize, Deserialize)]
pub struct ExtendBody {
    pub duration_secs: u64,
}

async fn extend_grant(
    State(s): Shared,
    Extension(id): Caller,
    Path(grant): Path<String>,
    body: Result<Json<ExtendBody>, JsonRejection>,
) -> Result<Json<Grant>, ApiError> {
    require_admin(&id)?;
    let Json(ext) = body?;
    let by = std::time::Duration::from_secs(ext.duration_secs);
    let grant = s.grants.extend(&GrantId::from_string(grant), by, &id.user).await?;
    tracing::info!(grant.id = %grant.id, by = %id.user, "grant extended");
    Ok(Json(grant))
}

async fn request_extension(
    State(s): Shared,
    Extension(id): Caller,
    Path(grant): Path<String>,
    body: Result<Json<NewExtension>, JsonRejection>,
) -> Result<(StatusCode, Json<Request>), ApiError> {
    let Json(ext) = body?;
    let grant = GrantId::from_string(grant);
    let r = s.requests.create_extension(&id, &grant, ext).await?;
    Ok((StatusCode::CREATED, Json(r)))
}

async fn create_request(
    State(s): Shared,
    Extension(id): Caller,
    body: Result<Json<NewRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Request>), ApiError> {
    let Json(new) = body?;
    let r = s.requests.create(&id, new).await?;
    Ok((StatusCode::CREATED, Json(r)))
}

async fn list_requests(
    State(s): Shared,
    Extension(id): Caller,
    filter: Result<Query<ListFilter>, QueryRejection>,
) -> Result<Json<Vec<Request>>, ApiError> {
    let Query(filter) = filter?;
    Ok(Json(s.requests.list(&id, &filter).await?))
}

async fn show_request(
    State(s): Shared,
    Extension(id): Caller,
    Path(r): Path<String>,
) -> Result<Json<Request>, ApiError> {
    let r = RequestId::from_string(r);
    Ok(Json(s.requests.get(&id, &r).await?))
}

/// Body of `POST /v1/requests/{id}/approve`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApproveBody {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

/// Body of `POST /v1/requests/{id}/deny`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenyBody {
    pub reason: String,
}

async fn approve_request(
    State(s): Shared,
    Extension(id): Caller,
    Path(r): Path<String>,
    body: Result<Json<ApproveBody>, JsonRejection>,
) -> Result<Json<Request>, ApiError> {
    let Json(body) = body?;
    let r = RequestId::from_string(r);
    Ok(Json(s.requests.approve(&id, &r, body.comment).await?))
}

async fn deny_request(
    State(s): Shared,
    Extension(id): Caller,
    Path(r): Path<String>,
    body: Result<Json<DenyBody>, JsonRejection>,
) -> Result<Json<Request>, ApiError> {
    let Json(body) = body?;
    let r = RequestId::from_string(r);
    Ok(Json(s.requests.deny(&id, &r, &body.reason).await?))
}

async fn withdraw_request(
    State(s): Shared,
    Extension(id): Caller,
    Path(r): Path<String>,
) -> Result<Json<Request>, ApiError> {
    let r = RequestId::from_string(r);
    Ok(Json(s.requests.withdraw(&id, &r).await?))
}

/// Every replica's sessions. While the store does not answer, `503` (code
/// `store_unavailable`): a list of this replica's alone would pass for the cluster's.
async fn list_sessions(State(s): Shared, Extension(id): Caller) -> Result<Json<Vec<SessionInfo>>, ApiError> {
    require_admin(&id)?;
    match crate::cluster::list_sessions(s.store.as_ref(), &s.sessions).await {
        Ok(all) => Ok(Json(all)),
        Err((here, e)) => Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            format!(
                "{e}; this replica ({}) alone holds {} session(s), the others cannot be listed",
                s.store.replica().unwrap_or("-"),
                here.len()
            ),
        )),
    }
}

async fn list_agents(
    State(s): Shared,
    Extension(id): Caller,
) -> Result<Json<Vec<crate::agents::AgentStatus>>, ApiError> {
    require_admin(&id)?;
    let agents = crate::agents::list(s.store.as_ref(), &s.hub)
        .await
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", e.to_string()))?;
    Ok(Json(agents))
}

/// Body of a successful removal.
#[derive(Debug, Serialize, Deserialize)]
pub struct RemovedAgent {
    pub name: crate::model::AgentName,
    pub removed: bool,
}

async fn remove_agent(
    State(s): Shared,
    Extension(id): Caller,
    Path(name): Path<String>,
) -> Result<Json<RemovedAgent>, ApiError> {
    require_admin(&id)?;
    let name =
        crate::model::AgentName::new(name).map_err(|e| ApiError(StatusCode::NOT_FOUND, "not_found", e.to_string()))?;
    match crate::agents::remove(s.store.as_ref(), &s.hub, &s.audit, &id.user, &name).await {
        Ok(()) => {
            tracing::info!(agent = %name, by = %id.user, "agent removed");
            Ok(Json(RemovedAgent { name, removed: true }))
        }
        Err(crate::store::StoreError::NotFound) => Err(ApiError(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no agent {name} has joined"),
        )),
        Err(e) => Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            e.to_string(),
        )),
    }
}

async fn create_agent_token(
    State(s): Shared,
    Extension(id): Caller,
    body: Result<Json<crate::agents::NewAgentToken>, JsonRejection>,
) -> Result<(StatusCode, Json<crate::agents::CreatedAgentToken>), ApiError> {
    require_admin(&id)?;
    let Json(new) = body?;
    let created = crate::agents::create_token(&s.config, s.store.as_ref(), &s.audit, &id.user, new).await?;
    tracing::info!(token.id = %created.id, agent = %created.name, by = %id.user, "agent join token created");
    Ok((StatusCode::CREATED, Json(created)))
}

/// Body of a successful kill.
#[derive(Debug, Serialize, Deserialize)]
pub struct Killed {
    pub id: SessionId,
    pub killed: bool,
    /// The replica holding the session, when replicas share a store (the kill reaches it
    /// through the store).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
}

async fn kill_session(
    State(s): Shared,
    Extension(id): Caller,
    Path(session): Path<String>,
) -> Result<Json<Killed>, ApiError> {
    require_admin(&id)?;
    let sid = SessionId::from_string(session);
    let outcome = crate::cluster::kill_session(s.store.as_ref(), &s.sessions, &sid)
        .await
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", e.to_string()))?;
    let replica = match outcome {
        crate::cluster::KillOutcome::Here => s.store.replica().map(str::to_owned),
        crate::cluster::KillOutcome::Sent(replica) => Some(replica),
        crate::cluster::KillOutcome::Unknown => {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no live session {sid}"),
            ))
        }
    };
    tracing::info!(session.id = %sid, by = %id.user, replica = ?replica, "session killed");
    Ok(Json(Killed {
        id: sid,
        killed: true,
        replica,
    }))
}

/// Body of `POST /v1/audit/reopen`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ReopenedLog {
    /// `audit.path`.
    pub path: String,
    /// Whether the path named another file than the one the log was writing.
    pub new_file: bool,
    /// Seq of the `audit.reopened` record (absent for a device or pipe).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}

async fn reopen_audit(State(s): Shared, Extension(id): Caller) -> Result<Json<ReopenedLog>, ApiError> {
    require_admin(&id)?;
    let audit = Arc::clone(&s.audit);
    let by = id.user.clone();
    let reopened = match tokio::task::spawn_blocking(move || audit.reopen(ReopenReason::Command, Some(by))).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string())),
        Err(e) => {
            return Err(ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                "unavailable",
                e.to_string(),
            ))
        }
    };
    tracing::info!(by = %id.user, new_file = reopened.new_file, "audit log reopened on request");
    Ok(Json(ReopenedLog {
        path: s.config.audit.path.display().to_string(),
        new_file: reopened.new_file,
        seq: reopened.seq,
    }))
}

fn require_auditor(id: &Identity) -> Result<(), ApiError> {
    if id.has_role("admin") || id.has_role("auditor") {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!(
            "{} lacks the admin or auditor role",
            id.user
        )))
    }
}

/// Query of `GET /v1/audit`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    pub user: Option<String>,
    pub target: Option<String>,
    pub session: Option<String>,
    /// An event (`statement`) or a family (`grant` for every `grant.*`).
    pub event: Option<String>,
    /// RFC 3339, or an age (`15m`, `2h`).
    pub since: Option<String>,
    /// RFC 3339, or an age.
    pub until: Option<String>,
    /// Text anywhere in the record, ignoring case.
    pub text: Option<String>,
    /// At most this many (the latest); default 200, at most 1000.
    pub limit: Option<usize>,
}

/// Answer of `GET /v1/audit`.
#[derive(Debug, Serialize, Deserialize)]
pub struct AuditRecords {
    /// Matching records, in log order.
    pub records: Vec<serde_json::Value>,
    /// Earlier records matched too but were left out (past `limit`).
    pub truncated: bool,
}

fn instant(name: &str, v: Option<&str>) -> Result<Option<std::time::SystemTime>, ApiError> {
    let Some(v) = v.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    if let Ok(t) = humantime::parse_rfc3339_weak(v) {
        return Ok(Some(t));
    }
    humantime::parse_duration(v)
        .ok()
        .and_then(|d| std::time::SystemTime::now().checked_sub(d))
        .map(Some)
        .ok_or_else(|| {
            ApiError(
                StatusCode::BAD_REQUEST,
                "invalid",
                format!("{name}: {v:?} is neither an RFC 3339 time nor an age like 15m"),
            )
        })
}

/// `GET /v1/audit`: records of this replica's audit log (admins and auditors).
async fn search_audit(
    State(s): Shared,
    Extension(id): Caller,
    query: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<Json<AuditRecords>, ApiError> {
    require_auditor(&id)?;
    let Query(q) = query?;
    let search = crate::audit::tail::Search {
        filter: crate::audit::tail::Filter {
            user: q.user.filter(|v| !v.is_empty()),
            target: q.target.filter(|v| !v.is_empty()),
            session: q.session.filter(|v| !v.is_empty()),
            since: instant("since", q.since.as_deref())?,
        },
        event: q.event.filter(|v| !v.is_empty()),
        until: instant("until", q.until.as_deref())?,
        text: q.text,
        limit: q.limit.unwrap_or(200).clamp(1, 1000),
    };
    let path = s.config.audit.path.clone();
    let found = tokio::task::spawn_blocking(move || crate::audit::tail::search(&path, &search)).await;
    match found {
        Ok(Ok((records, truncated))) => Ok(Json(AuditRecords { records, truncated })),
        Ok(Err(e)) => Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string())),
        Err(e) => Err(ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            "unavailable",
            e.to_string(),
        )),
    }
}

/// `GET /v1/recordings/{id}`: a shell recording (asciicast v2) named by the audit log, only
/// while its bytes still hash to what the log says (admins and auditors).
async fn show_recording(
    State(s): Shared,
    Extension(id): Caller,
    Path(rec): Path<String>,
) -> Result<Response, ApiError> {
    require_auditor(&id)?;
    let path = s.config.audit.path.clone();
    let dir = s.config.ssh.recordings_dir.clone();
    let found = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, ApiError> {
        let files = crate::audit::siblings::log_files(&path)
            .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string()))?;
        let all = crate::recordings::from_log(&files)
            .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string()))?;
        let r = all
            .into_iter()
            .find(|r| r.id() == rec)
            .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, "not_found", format!("no recording {rec}")))?;
        match crate::recordings::check(&r, Some(&dir)) {
            crate::recordings::State::Intact => std::fs::read(r.path(Some(&dir)))
                .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string())),
            state => Err(ApiError(
                StatusCode::CONFLICT,
                "conflict",
                crate::recordings::problem(&r, &state, Some(&dir)).unwrap_or_else(|| "not intact".into()),
            )),
        }
    })
    .await
    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, "unavailable", e.to_string()))??;
    Ok(([(header::CONTENT_TYPE, "application/x-asciicast")], found).into_response())
}

/// How long a refused connection may take to get its `close_notify` out.
const CLOSE_BOUND: Duration = Duration::from_secs(1);

/// Answers every request with `503` and `detail`: the router of a connection over
/// `limits.max_connections`.
fn refusing_router(detail: String) -> Router {
    Router::new().fallback(move || {
        let detail = detail.clone();
        async move { ApiError(StatusCode::SERVICE_UNAVAILABLE, "unavailable", detail) }
    })
}

/// The routers of one connection.
enum Apps {
    /// No client certificate: the login routes, or every route for a console session.
    Anonymous { anonymous: Router, console: Router },
    /// A client certificate: every route, as `id`.
    Certified { app: Router, id: Arc<Identity> },
    /// Over `limits.max_connections`.
    Refusing(Router),
}

impl Apps {
    /// The router for `req` after the console's rules (CSRF, its session cookie), with the
    /// caller set on the request; `Err`: the refusal to answer instead.
    fn route(
        &self,
        consoles: &crate::console::Consoles,
        req: &mut axum::extract::Request,
    ) -> Result<Router, crate::console::Refused> {
        let cert = match self {
            Apps::Refusing(app) => return Ok(app.clone()),
            Apps::Anonymous { .. } => None,
            Apps::Certified { id, .. } => Some(id),
        };
        // The certificate's identity when there is one, else a console session's, if any.
        let caller = consoles.gate(cert, req.method(), req.headers(), req.uri().path())?;
        let app = match (self, &caller) {
            (Apps::Anonymous { console, .. }, Some(_)) => console,
            (Apps::Anonymous { anonymous, .. }, None) => anonymous,
            (Apps::Certified { app, id }, _) => {
                req.extensions_mut().insert(crate::console::Certified(Arc::clone(id)));
                app
            }
            (Apps::Refusing(app), _) => app,
        };
        if let Some(id) = caller {
            req.extensions_mut().insert(id);
        }
        Ok(app.clone())
    }
}

/// Resolves when `ticket` is evicted; never without one.
async fn evicted(ticket: Option<&Ticket>) {
    match ticket {
        Some(t) => t.evicted().await,
        None => std::future::pending().await,
    }
}

/// Serves one API connection: mTLS handshake, then HTTP/1.1 until either side closes or the
/// proxy shuts down. `ticket` is its slot in the listener's unauthenticated budget, given up
/// for a slot of `limits.max_connections` once the certificate is verified; without a free
/// one, each request gets `503` and the connection closes.
pub async fn serve_connection(
    state: Arc<ApiState>,
    tls: Arc<rustls::ServerConfig>,
    tcp: TcpStream,
    peer: std::net::SocketAddr,
    ticket: Ticket,
    shutdown: CancellationToken,
) {
    let handshake_timeout = state.config.limits.handshake_timeout;
    let handshake = tokio::time::timeout(handshake_timeout, tokio_rustls::TlsAcceptor::from(tls).accept(tcp));
    let accepted = tokio::select! {
        r = handshake => r,
        () = ticket.evicted() => {
            tracing::debug!("unauthenticated connection evicted by a newer one");
            return;
        }
    };
    let mut stream = match accepted {
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
    // Without a certificate: the login routes (and the console's, with its cookie), one
    // request per connection, and the connection keeps its slot in the unauthenticated budget
    // (it can be evicted).
    let (apps, ticket, slot) = match der.as_deref().map(identity_from_der) {
        None => (
            Apps::Anonymous {
                anonymous: anonymous_router(Arc::clone(&state)),
                console: router(Arc::clone(&state)),
            },
            Some(ticket),
            None,
        ),
        Some(Ok(id)) => {
            let slot = state.connections.try_take();
            match &slot {
                Some(_) => {
                    drop(ticket);
                    (
                        Apps::Certified {
                            app: router(Arc::clone(&state)),
                            id: Arc::new(id),
                        },
                        None,
                        slot,
                    )
                }
                None => {
                    state
                        .metrics
                        .connections_refused_total
                        .with_label_values(&["api", "max_connections"])
                        .inc();
                    let max = state.connections.max();
                    let detail =
                        format!("too many connections: the API holds its limit of {max} (limits.max_connections)");
                    (Apps::Refusing(refusing_router(detail)), Some(ticket), None)
                }
            }
        }
        Some(Err(_)) => {
            state
                .metrics
                .tls_handshake_failures_total
                .with_label_values(&["api", "bad_certificate"])
                .inc();
            let _ = tokio::time::timeout(CLOSE_BOUND, stream.shutdown()).await;
            return;
        }
    };
    let gate_state = Arc::clone(&state);
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let mut req = req.map(axum::body::Body::new);
        req.extensions_mut().insert(Peer(peer));
        let app = apps.route(&gate_state.consoles, &mut req);
        async move {
            Ok::<_, Infallible>(match app {
                Ok(app) => app.oneshot(req).await.unwrap_or_else(|e| match e {}),
                Err(refused) => refused.into_response(),
            })
        }
    });
    // On a normal end hyper shuts the stream down, which sends close_notify.
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(handshake_timeout)
        .keep_alive(slot.is_some())
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => if let Err(error) = r { tracing::debug!(%error, "API connection ended") },
        () = evicted(ticket.as_ref()) => {}
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(2), conn).await;
        }
    }
    drop(slot);
}
