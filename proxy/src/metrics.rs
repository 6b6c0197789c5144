//! Prometheus metrics, registered in one place, and the metrics listener (`/metrics`,
//! `/healthz`, `/readyz`). Labels come from bounded sets: target names from the config, cut
//! and failure reasons from enums, never user input.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Every metric the proxy exports.
pub struct Metrics {
    registry: Registry,
    /// Live proxied sessions, by target.
    pub sessions_active: IntGaugeVec,
    /// Sessions started, by target.
    pub sessions_total: IntCounterVec,
    /// Session start refusals, by reason.
    pub sessions_denied_total: IntCounterVec,
    /// Grants currently active.
    pub grants_active: IntGauge,
    /// Times the grant table re-read the store because its change feed fell behind.
    pub grant_resyncs_total: IntCounter,
    /// 1 while the store answers, 0 while it does not (the replica is degraded).
    pub store_up: IntGauge,
    /// Sessions cut by the proxy, by reason (grant_expired, grant_revoked, killed, cert_expired,
    /// shutdown).
    pub session_cuts_total: IntCounterVec,
    /// Bytes relayed, by direction (`client_to_target`, `target_to_client`); added when a
    /// session ends.
    pub bytes_total: IntCounterVec,
    /// Time to connect and log in to a target, by target.
    pub upstream_connect_seconds: HistogramVec,
    /// Upstream connect or login failures, by target.
    pub upstream_errors_total: IntCounterVec,
    /// Temporary database roles created (`credentials.mode = "ephemeral"`), by target.
    pub credentials_created_total: IntCounterVec,
    /// Temporary database roles dropped, by target.
    pub credentials_dropped_total: IntCounterVec,
    /// Failed attempts of the manager role (create, drop, reconcile), by target and operation;
    /// each is retried with backoff.
    pub credential_failures_total: IntCounterVec,
    /// Failed client TLS handshakes, by reason.
    pub tls_handshake_failures_total: IntCounterVec,
    /// Connections that have not yet presented a valid certificate, by listener.
    pub connections_unauthenticated: IntGaugeVec,
    /// Connections closed or refused because a connection budget was full, by listener and
    /// reason (`evicted`, `max_connections`, `max_sessions_per_user`).
    pub connections_refused_total: IntCounterVec,
    /// Audit records that could not be written, by event (`kind`); failed syncs as
    /// `kind="fsync"`.
    pub audit_write_errors_total: IntCounterVec,
    /// Audit records written (handed to the operating system).
    pub audit_records_total: IntCounter,
    /// Times the audit log was reopened, by `reason` (`deleted`, `renamed`, `truncated`,
    /// `signal`, `command`).
    pub audit_reopens_total: IntCounterVec,
    /// Submissions waiting for the audit writer.
    pub audit_queue_depth: IntGauge,
    /// Records per audit batch (one `write` each).
    pub audit_batch_records: Histogram,
    /// Time of one `fsync` of the audit file.
    pub audit_fsync_seconds: Histogram,
    /// Client CancelRequests, by outcome (`forwarded`, `unknown`, `failed`).
    pub cancel_requests_total: IntCounterVec,
    /// Statements forwarded, by target and class.
    pub statements_total: IntCounterVec,
    /// Statements refused by guardrails or because they could not be audited, by reason.
    pub statement_denials_total: IntCounterVec,
    /// Time from forwarding a statement to the server's answer.
    pub statement_duration_seconds: prometheus::Histogram,
    /// Webhook notifications, by webhook and outcome (`delivered`, `failed`, `dropped`).
    pub webhook_deliveries_total: IntCounterVec,
    /// Notifications waiting in a webhook's queue, by webhook.
    pub webhook_queue_depth: IntGaugeVec,
    /// SSH channels relayed, by kind (`shell`, `exec`).
    pub ssh_channels_total: IntCounterVec,
    /// SSH refusals, by reason: authentication (`plain_key`, `unknown_ca`,
    /// `not_user_certificate`, `bad_key_id`, `principal`, `login_user`, `login_target`), or a
    /// request jitgate does not serve (`subsystem`, `port_forwarding`, `x11`,
    /// `agent_forwarding`).
    pub ssh_refusals_total: IntCounterVec,
    /// Agents with a live link.
    pub agents_connected: IntGauge,
    /// Streams open on agent links (one per session or cancel through an agent).
    pub agent_streams_open: IntGauge,
    /// Links from an agent name that had a link before.
    pub agent_reconnects_total: IntCounter,
    /// Agent links ended because a ping went unanswered for `agents.keepalive_timeout`.
    pub agent_keepalive_failures_total: IntCounter,
    ready: AtomicBool,
    /// Why the replica is degraded, while it is.
    degraded: std::sync::Mutex<Option<String>>,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Arc<Self> {
        let registry = Registry::new();
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m;
                // Names are static and distinct, so registration cannot collide.
                #[allow(clippy::expect_used)]
                registry
                    .register(Box::new(m.clone()))
                    .expect("metric names are unique");
                m
            }};
        }
        #[allow(clippy::expect_used)]
        let m = Metrics {
            sessions_active: reg!(IntGaugeVec::new(
                Opts::new("jitgate_sessions_active", "Live proxied sessions"),
                &["target", "protocol"]
            )
            .expect("valid metric")),
            sessions_total: reg!(IntCounterVec::new(
                Opts::new("jitgate_sessions_total", "Sessions started"),
                &["target", "protocol"]
            )
            .expect("valid metric")),
            sessions_denied_total: reg!(IntCounterVec::new(
                Opts::new("jitgate_sessions_denied_total", "Session start refusals"),
                &["reason"]
            )
            .expect("valid metric")),
            grants_active: reg!(
                IntGauge::new("jitgate_grants_active", "Grants currently active").expect("valid metric")
            ),
            grant_resyncs_total: reg!(IntCounter::new(
                "jitgate_grant_resyncs_total",
                "Re-reads of the live grants after the store's change feed fell behind"
            )
            .expect("valid metric")),
            store_up: reg!(IntGauge::new(
                "jitgate_store_up",
                "1 while the store answers, 0 while the replica runs degraded without it"
            )
            .expect("valid metric")),
            session_cuts_total: reg!(IntCounterVec::new(
                Opts::new("jitgate_session_cuts_total", "Sessions cut by the proxy"),
                &["reason"]
            )
            .expect("valid metric")),
            bytes_total: reg!(
                IntCounterVec::new(Opts::new("jitgate_bytes_total", "Bytes relayed"), &["direction"])
                    .expect("valid metric")
            ),
            upstream_connect_seconds: reg!(HistogramVec::new(
                HistogramOpts::new(
                    "jitgate_upstream_connect_seconds",
                    "Time to connect and log in to a target"
                )
                .buckets(vec![
                    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0
                ]),
                &["target"]
            )
            .expect("valid metric")),
            upstream_errors_total: reg!(IntCounterVec::new(
                Opts::new("jitgate_upstream_errors_total", "Upstream connect or login failures"),
                &["target"]
            )
            .expect("valid metric")),
            credentials_created_total: reg!(IntCounterVec::new(
                Opts::new("jitgate_credentials_created_total", "Temporary database roles created"),
                &["target"]
            )
            .expect("valid metric")),
            credentials_dropped_total: reg!(IntCounterVec::new(
                Opts::new("jitgate_credentials_dropped_total", "Temporary database roles dropped"),
                &["target"]
            )
            .expect("valid metric")),
            credential_failures_total: reg!(IntCounterVec::new(
                Opts::new(
                    "jitgate_credential_failures_total",
                    "Failed attempts to create, drop or reconcile temporary database roles (retried)"
                ),
                &["target", "op"]
            )
            .expect("valid metric")),
            tls_handshake_failures_total: reg!(IntCounterVec::new(
                Opts::new("jitgate_tls_handshake_failures_total", "Failed client TLS handshakes"),
                &["listener", "reason"]
            )
            .expect("valid metric")),
            connections_unauthenticated: reg!(IntGaugeVec::new(
                Opts::new(
                    "jitgate_connections_unauthenticated",
                    "Connections that have not yet presented a valid client certificate"
                ),
                &["listener"]
            )
            .expect("valid metric")),
            connections_refused_total: reg!(IntCounterVec::new(
                Opts::new(
                    "jitgate_connections_refused_total",
                    "Connections closed or refused because a connection budget was full"
                ),
                &["listener", "reason"]
            )
            .expect("valid metric")),
            audit_write_errors_total: reg!(IntCounterVec::new(
                Opts::new(
                    "jitgate_audit_write_errors_total",
                    "Audit records that could not be written"
                ),
                &["kind"]
            )
            .expect("valid metric")),
            audit_records_total: reg!(
                IntCounter::new("jitgate_audit_records_total", "Audit records written").expect("valid metric")
            ),
            audit_reopens_total: reg!(IntCounterVec::new(
                Opts::new(
                    "jitgate_audit_reopens_total",
                    "Times the audit log was reopened (moved from outside, or on request)"
                ),
                &["reason"]
            )
            .expect("valid metric")),
            audit_queue_depth: reg!(IntGauge::new(
                "jitgate_audit_queue_depth",
                "Submissions waiting for the audit writer"
            )
            .expect("valid metric")),
            audit_batch_records: reg!(Histogram::with_opts(
                HistogramOpts::new("jitgate_audit_batch_records", "Records per audit batch")
                    .buckets(prometheus::exponential_buckets(1.0, 4.0, 7).expect("valid buckets"))
            )
            .expect("valid metric")),
            audit_fsync_seconds: reg!(Histogram::with_opts(
                HistogramOpts::new("jitgate_audit_fsync_seconds", "Time of one fsync of the audit file").buckets(vec![
                    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0
                ])
            )
            .expect("valid metric")),
            ssh_channels_total: reg!(IntCounterVec::new(
                Opts::new("jitgate_ssh_channels_total", "SSH channels relayed"),
                &["kind"]
            )
            .expect("valid metric")),
            ssh_refusals_total: reg!(IntCounterVec::new(
                Opts::new("jitgate_ssh_refusals_total", "SSH authentications and requests refused"),
                &["reason"]
            )
            .expect("valid metric")),
            agents_connected: reg!(
                IntGauge::new("jitgate_agents_connected", "Agents with a live link").expect("valid metric")
            ),
            agent_streams_open: reg!(
                IntGauge::new("jitgate_agent_streams_open", "Streams open on agent links").expect("valid metric")
            ),
            agent_reconnects_total: reg!(IntCounter::new(
                "jitgate_agent_reconnects_total",
                "Links from an agent that had a link before"
            )
            .expect("valid metric")),
            agent_keepalive_failures_total: reg!(IntCounter::new(
                "jitgate_agent_keepalive_failures_total",
                "Agent links ended because a ping went unanswered"
            )
            .expect("valid metric")),
            statements_total: reg!(IntCounterVec::new(
                Opts::new("jitgate_statements_total", "Statements forwarded"),
                &["target", "class"]
            )
            .expect("valid metric")),
            statement_denials_total: reg!(IntCounterVec::new(
                Opts::new("jitgate_statement_denials_total", "Statements refused"),
                &["reason"]
            )
            .expect("valid metric")),
            statement_duration_seconds: reg!(prometheus::Histogram::with_opts(
                HistogramOpts::new(
                    "jitgate_statement_duration_seconds",
                    "Time from forwarding a statement to its answer"
                )
                .buckets(vec![
                    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 300.0
                ]),
            )
            .expect("valid metric")),
            cancel_requests_total: reg!(IntCounterVec::new(
                Opts::new("jitgate_cancel_requests_total", "Client query cancel requests"),
                &["outcome"]
            )
            .expect("valid metric")),
            webhook_deliveries_total: reg!(IntCounterVec::new(
                Opts::new("jitgate_webhook_deliveries_total", "Webhook notifications by outcome"),
                &["webhook", "outcome"]
            )
            .expect("valid metric")),
            webhook_queue_depth: reg!(IntGaugeVec::new(
                Opts::new(
                    "jitgate_webhook_queue_depth",
                    "Notifications waiting in a webhook's queue"
                ),
                &["webhook"]
            )
            .expect("valid metric")),
            registry,
            ready: AtomicBool::new(false),
            degraded: std::sync::Mutex::new(None),
        };
        Arc::new(m)
    }

    /// Marks the replica degraded, with the reason (its store does not answer), or not.
    pub fn set_degraded(&self, reason: Option<String>) {
        self.store_up.set(i64::from(reason.is_none()));
        if let Ok(mut d) = self.degraded.lock() {
            *d = reason;
        }
    }

    /// Marks the proxy ready (listeners bound, grants restored) or not.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed families.
        if TextEncoder::new().encode(&self.registry.gather(), &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` until `shutdown` fires.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let app = Router::new()
        .route("/metrics", get(render))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(metrics);
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
    if let Err(error) = result {
        tracing::error!(%error, "metrics listener failed");
    }
}

async fn render(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], m.render())
}

/// `200 ready`, `200 degraded: REASON` (the store does not answer: sessions under the grants
/// held go on, so a load balancer keeps sending them), or `503 not ready`.
async fn ready(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    if !m.ready.load(Ordering::Acquire) {
        return (StatusCode::SERVICE_UNAVAILABLE, "not ready\n".to_owned());
    }
    match m.degraded.lock().ok().and_then(|d| d.clone()) {
        Some(reason) => (StatusCode::OK, format!("degraded: {reason}\n")),
        None => (StatusCode::OK, "ready\n".to_owned()),
    }
}
