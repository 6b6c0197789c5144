//! One session, from a negotiated connection with a session slot (`admit`) to its end: the
//! per-user limit, startup checks, grant lookup, upstream login, registration and audit, the
//! relay, how it ended, and the close within its bound.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant as StdInstant, SystemTime};

use bytes::BytesMut;
use jitgate_protocol::postgres::backend::{self, Report, Severity};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};
use tokio_rustls::server::TlsStream;

use super::close::{close, close_shut, CLOSE_BOUND};
use super::guard::Guard;
use super::relay::{relay, ExpiryNotice, RelayContext, RelayEnd, Relayed};
use super::sqlstate::Sqlstate;
use super::startup::{self, CheckedStartup};
use super::statements::{TextLimits, Tracker};
use super::upstream::{self, Upstream};
use super::PgContext;
use crate::access::{Ask, Lease, Protocol, Reason, Refusal};
use crate::audit::{AuditEvent, SessionEndReason};
use crate::model::Deadline;
use crate::pki::Identity;
use crate::sessions::CancelKey;

/// The `protocol` label of this listener's metrics.
pub(super) const PROTOCOL: &str = "postgres";

/// A client that passed TLS with a jitgate certificate and sent a `StartupMessage`.
pub(super) struct Negotiated {
    pub(super) tls: TlsStream<TcpStream>,
    pub(super) identity: Identity,
    pub(super) params: Vec<(String, String)>,
    /// Bytes the client sent after its startup message (pipelined queries), to be relayed.
    pub(super) leftover: BytesMut,
}

fn error_bytes(severity: Severity, code: &str, message: &str, hint: Option<&str>) -> Vec<u8> {
    backend::error_response(
        severity,
        &Report {
            sqlstate: code,
            message,
            detail: None,
            hint,
        },
    )
}

/// The target the client asked for, as sent (for refusals before it is checked).
pub(super) fn asked_target(n: &Negotiated) -> String {
    n.params
        .iter()
        .find(|(k, _)| k == "database")
        .map_or("", |(_, v)| v.as_str())
        .to_owned()
}

/// Audits a refusal, counts it, tells the client and closes the connection: the one way a
/// PostgreSQL session is refused, whatever refused it.
pub(super) async fn refuse(ctx: &PgContext, n: &mut Negotiated, peer: SocketAddr, target: &str, r: Refusal) {
    let reason = r.reason.as_str();
    if r.reason.is_limit() {
        ctx.metrics
            .connections_refused_total
            .with_label_values(&[PROTOCOL, reason])
            .inc();
    } else {
        ctx.metrics.sessions_denied_total.with_label_values(&[reason]).inc();
    }
    // Waited for (off the runtime's workers), so the record is there when the client hears.
    let _ = ctx
        .audit
        .record(AuditEvent::SessionDenied {
            user: n.identity.user.clone(),
            target: target.to_owned(),
            client_addr: peer,
            code: reason.to_owned(),
            reason: r.message.clone(),
        })
        .await;
    tracing::info!(reason, message = %r.message, "session refused");
    let fatal = error_bytes(
        Severity::Fatal,
        Sqlstate::of(r.reason).as_str(),
        &r.message,
        r.hint.as_deref(),
    );
    close(&mut n.tls, &fatal, Instant::now() + CLOSE_BOUND).await;
}

/// A session admitted and logged in upstream, its start audited.
struct Opened {
    lease: Lease,
    up: Upstream,
    started: StdInstant,
}

/// Everything between the startup message and the relay that can refuse: the startup checks,
/// admission, the upstream login and the `session.start` record. On refusal, also the target
/// name to record it under.
async fn open(ctx: &PgContext, n: &Negotiated, peer: SocketAddr) -> Result<Opened, (Refusal, String)> {
    let CheckedStartup {
        target,
        database,
        forward,
    } = startup::check(&n.identity, &n.params).map_err(|r| (r, asked_target(n)))?;
    tracing::Span::current().record("target", target.as_str());
    let at = |r: Refusal| (r, target.to_string());
    let lease = ctx
        .admission
        .admit(Ask {
            identity: &n.identity,
            target: &target,
            protocol: Protocol::Postgres,
            client_addr: peer,
            database,
        })
        .map_err(at)?;
    let session = lease.session();
    tracing::Span::current().record("session.id", session.meta.id.as_str());

    let started = StdInstant::now();
    let login = timeout(
        ctx.config.limits.upstream_connect_timeout,
        ctx.credentials.login(&lease, &session.meta.database, &forward),
    )
    .await;
    let up = match login {
        Ok(Ok(up)) => {
            ctx.metrics
                .upstream_connect_seconds
                .with_label_values(&[target.as_str()])
                .observe(started.elapsed().as_secs_f64());
            up
        }
        failed => {
            ctx.metrics
                .upstream_errors_total
                .with_label_values(&[target.as_str()])
                .inc();
            let msg = match failed {
                Ok(Err(e)) => format!("jitgate could not log in to {target}: {e}"),
                _ => format!("jitgate timed out connecting to {target}"),
            };
            return Err(at(Refusal::new(Reason::Upstream, msg)));
        }
    };
    if let Some((k, v)) = up
        .parameters
        .iter()
        .find(|(k, v)| startup::lexing_parameter_unsafe(k, v))
    {
        // A role or database default the proxy cannot read statements under.
        let msg = format!("target {target} reports {k}={v}; jitgate requires standard_conforming_strings=on and UTF8");
        return Err(at(Refusal::new(Reason::UnsafeSetting, msg)));
    }
    if let Some((process_id, secret_key)) = up.backend_key {
        session.set_upstream_cancel(Arc::clone(lease.target()), CancelKey { process_id, secret_key });
    }
    let start_event = AuditEvent::SessionStart {
        session: session.meta.clone(),
    };
    if ctx.audit.record(start_event).await.is_err() {
        let msg = "jitgate cannot write its audit log; sessions are refused until it can";
        return Err(at(Refusal::new(Reason::AuditUnavailable, msg)));
    }
    session.set_established();
    Ok(Opened { lease, up, started })
}

/// Runs a session on a connection that holds a slot of `limits.max_connections`.
pub(super) async fn run_session(ctx: &Arc<PgContext>, mut n: Negotiated, peer: SocketAddr) {
    let Opened { lease, mut up, started } = match open(ctx, &n, peer).await {
        Ok(opened) => opened,
        Err((r, target)) => return refuse(ctx, &mut n, peer, &target, r).await,
    };
    let session = lease.session();
    let grant = lease.grant();
    let target_cfg = lease.target();
    let target = &target_cfg.name;

    // Login complete: the client sees the target's parameters and a proxy-issued cancel key,
    // never the target's own.
    let mut hello = backend::authentication_ok();
    for (k, v) in &up.parameters {
        hello.extend_from_slice(&backend::parameter_status(k, v));
    }
    hello.extend_from_slice(&backend::backend_key_data(
        session.cancel_key.process_id,
        session.cancel_key.secret_key,
    ));
    hello.extend_from_slice(&backend::ready_for_query(b'I'));
    let labels = [target.as_str(), PROTOCOL];
    ctx.metrics.sessions_total.with_label_values(&labels).inc();
    let active = ctx.metrics.sessions_active.with_label_values(&labels);
    active.inc();
    tracing::info!(access = %grant.access, grant.id = %grant.id, "session started");

    let guard = Guard::new(grant.access, target.as_str(), &target_cfg.guardrails).protecting(
        std::sync::Arc::clone(&ctx.config.login_roles),
        target_cfg.allow_role_management,
    );
    let audit_cfg = &ctx.config.audit;
    let limits = TextLimits {
        max_statement_bytes: audit_cfg.max_statement_bytes,
        max_param_bytes: audit_cfg.max_param_bytes,
        redact_params_matching: audit_cfg.redact_params_matching.clone(),
    };
    let mut tracker = Tracker::new(session.meta.clone(), guard, limits);

    let Relayed {
        end,
        close_by,
        shut_down,
    } = if n.tls.write_all(&hello).await.is_err() || n.tls.flush().await.is_err() {
        Relayed {
            end: RelayEnd::Closed(SessionEndReason::ClientClosed),
            close_by: Instant::now() + CLOSE_BOUND,
            shut_down: false,
        }
    } else {
        let target_name = target.to_string();
        let grant_id = grant.id.to_string();
        let session_id = session.meta.id.to_string();
        let via = lease.target().via.as_ref().map(ToString::to_string);
        let fatal = move |reason| {
            let at = Place {
                target: &target_name,
                via: via.as_deref(),
                grant_id: &grant_id,
                session_id: &session_id,
            };
            fatal_for(reason, &at)
        };
        let relay_cx = RelayContext {
            session,
            tracker: &mut tracker,
            audit: &ctx.audit,
            metrics: &ctx.metrics,
            target: target.as_str(),
            max_message_bytes: ctx.config.limits.max_message_bytes,
            // Anything the client pipelined behind its startup message is a statement like
            // any other: it goes through the tracker, never straight upstream.
            initial: std::mem::take(&mut n.leftover),
            notice: expiry_notice(ctx, &lease),
        };
        relay(&mut n.tls, &mut up.stream, relay_cx, lease.cut(), fatal).await
    };

    if matches!(end, RelayEnd::Cut { .. }) {
        // A cut is two phases across sessions: the relay has sent this session's FATAL and
        // shut its stream down; the teardown below waits until every other session cut at
        // the same time has done so too, so 10,000 sessions under one grant all hear of the
        // end before any of them spends time tearing down. Half the close bound stays for the
        // client's EOF.
        lease.told(close_by - CLOSE_BOUND / 2).await;
    }
    let reason = match end {
        RelayEnd::Closed(r) => r,
        RelayEnd::ProtocolViolation => SessionEndReason::Error,
        RelayEnd::Cut { reason: r, in_flight } => {
            ctx.metrics.session_cuts_total.with_label_values(&[r.as_str()]).inc();
            // An idle backend needs no cancel: closing the connection ends it.
            if let Some(key) = up.backend_key.filter(|_| in_flight) {
                // Stop a statement in progress on the server too; best effort, bounded.
                let target_cfg = Arc::clone(target_cfg);
                let connector = ctx.connector.clone();
                let wait = ctx.config.limits.upstream_connect_timeout;
                tokio::spawn(async move {
                    let _ = timeout(wait, upstream::cancel(&connector, &target_cfg, key)).await;
                });
            }
            r
        }
    };
    drop(up);
    let bytes_from_client = session.bytes_from_client.load(std::sync::atomic::Ordering::Relaxed);
    let bytes_to_client = session.bytes_to_client.load(std::sync::atomic::Ordering::Relaxed);
    active.dec();
    ctx.metrics
        .bytes_total
        .with_label_values(&["client_to_target"])
        .inc_by(bytes_from_client);
    ctx.metrics
        .bytes_total
        .with_label_values(&["target_to_client"])
        .inc_by(bytes_to_client);
    // Handed to the writer thread, not waited for: the sessions a cut ends at once are
    // written in a few batches, not one write each. A record that cannot be written is counted
    // by the audit log.
    ctx.audit.submit(AuditEvent::SessionEnd {
        session: session.meta.clone(),
        reason,
        bytes_from_client,
        bytes_to_client,
        duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        recordings: Vec::new(),
    });
    tracing::info!(
        reason = reason.as_str(),
        bytes_from_client,
        bytes_to_client,
        database = %session.meta.database,
        "session ended"
    );
    // By close_by the client has the rest, close_notify and FIN, or a reset.
    if shut_down {
        close_shut(&n.tls, close_by).await;
    } else {
        close(&mut n.tls, &[], close_by).await;
    }
}

/// The pre-expiry NOTICE for this session, unless turned off.
fn expiry_notice(ctx: &PgContext, lease: &Lease) -> Option<ExpiryNotice> {
    let notice = lease.notice(ctx.config.sessions.expiry_notice)?;
    let grant = lease.grant();
    let (target, grant_id) = (grant.target.to_string(), grant.id.to_string());
    let render = move |d: Deadline| {
        let left = d.at.duration_since(SystemTime::now()).unwrap_or_default();
        let message = format!(
            "jitgate: access to {target} ends in {} (at {})",
            humantime::format_duration(std::time::Duration::from_secs(left.as_secs())),
            humantime::format_rfc3339_seconds(d.at)
        );
        let hint = format!("to keep working, ask for more time: jitgate extend {grant_id} --for 30m --reason TEXT");
        backend::notice_response(&Report {
            sqlstate: "01000",
            message: &message,
            detail: None,
            hint: Some(&hint),
        })
    };
    Some(ExpiryNotice {
        notice,
        render: Box::new(render),
    })
}

/// What a cut's FATAL names.
struct Place<'a> {
    target: &'a str,
    via: Option<&'a str>,
    grant_id: &'a str,
    session_id: &'a str,
}

/// The FATAL the client sees when the proxy cuts its session.
fn fatal_for(reason: SessionEndReason, at: &Place<'_>) -> Vec<u8> {
    let Place {
        target,
        via,
        grant_id,
        session_id,
    } = *at;
    let (code, message, hint) = match reason {
        SessionEndReason::AgentLost => (
            "08006",
            format!(
                "jitgate: access to {target} ended: the link to agent {} was lost",
                via.unwrap_or("(none)")
            ),
            Some("the agent reconnects on its own; reconnect in a moment"),
        ),
        SessionEndReason::GrantExpired => (
            "57P01",
            format!("jitgate: access to {target} ended: grant {grant_id} expired"),
            Some("ask for a new grant to reconnect"),
        ),
        SessionEndReason::GrantRevoked => (
            "57P01",
            format!("jitgate: access to {target} ended: grant {grant_id} was revoked"),
            None,
        ),
        SessionEndReason::Killed => (
            "57P01",
            format!("jitgate: session {session_id} was terminated by an administrator"),
            None,
        ),
        SessionEndReason::CertExpired => (
            "57P01",
            format!("jitgate: access to {target} ended: your client certificate expired"),
            Some("get a new certificate, then reconnect"),
        ),
        _ => (
            "57P01",
            "jitgate is shutting down".to_owned(),
            Some("reconnect in a moment"),
        ),
    };
    error_bytes(Severity::Fatal, code, &message, hint)
}
