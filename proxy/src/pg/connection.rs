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

use super::close::{close, CLOSE_BOUND};
use super::guard::Guard;
use super::relay::{relay, ExpiryNotice, RelayContext, RelayEnd, Relayed};
use super::startup::{self, CheckedStartup};
use super::statements::{SessionFacts, TextLimits, Tracker};
use super::upstream;
use super::PgContext;
use super::Refusal;
use crate::audit::{AuditEvent, SessionEndReason};
use crate::grants::GrantPermit;
use crate::model::{Deadline, GrantEnd};
use crate::pki::Identity;
use crate::sessions::{CancelKey, NewSession};

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
fn asked_target(n: &Negotiated) -> String {
    n.params
        .iter()
        .find(|(k, _)| k == "database")
        .map_or("", |(_, v)| v.as_str())
        .to_owned()
}

/// Audits a refusal, tells the client and closes the connection.
async fn deny(ctx: &PgContext, n: &mut Negotiated, peer: SocketAddr, target: &str, r: Refusal) {
    let _ = ctx.audit.record(AuditEvent::SessionDenied {
        user: n.identity.user.clone(),
        target: target.to_owned(),
        client_addr: peer,
        code: r.reason.to_owned(),
        reason: r.message.clone(),
    });
    tracing::info!(reason = r.reason, message = %r.message, "session refused");
    let fatal = error_bytes(Severity::Fatal, r.sqlstate, &r.message, r.hint.as_deref());
    close(&mut n.tls, &fatal, Instant::now() + CLOSE_BOUND).await;
}

/// A startup refusal, counted in `jitgate_sessions_denied_total`.
async fn refuse(ctx: &PgContext, n: &mut Negotiated, peer: SocketAddr, target: &str, r: Refusal) {
    ctx.metrics.sessions_denied_total.with_label_values(&[r.reason]).inc();
    deny(ctx, n, peer, target, r).await;
}

/// A connection limit refusal, counted in `jitgate_connections_refused_total`.
pub(super) async fn refuse_over_limit(ctx: &PgContext, n: &mut Negotiated, peer: SocketAddr, r: Refusal) {
    ctx.metrics
        .connections_refused_total
        .with_label_values(&[PROTOCOL, r.reason])
        .inc();
    let target = asked_target(n);
    deny(ctx, n, peer, &target, r).await;
}

pub(super) fn refusal(reason: &'static str, sqlstate: &'static str, message: String, hint: Option<String>) -> Refusal {
    Refusal {
        sqlstate,
        message,
        hint,
        reason,
    }
}

/// Runs a session on a connection that holds a slot of `limits.max_connections`.
pub(super) async fn run_session(ctx: &Arc<PgContext>, mut n: Negotiated, peer: SocketAddr) {
    // Held for the whole session, so one user cannot take every session slot.
    let Some(_user_slot) = ctx.users.try_take(&n.identity.user) else {
        let max = ctx.users.max();
        let msg = format!(
            "too many sessions for {}: jitgate allows {max} per user (limits.max_sessions_per_user)",
            n.identity.user
        );
        let hint = "close a session you no longer need, or ask an operator to raise limits.max_sessions_per_user";
        let r = refusal("max_sessions_per_user", "53300", msg, Some(hint.to_owned()));
        refuse_over_limit(ctx, &mut n, peer, r).await;
        return;
    };
    let CheckedStartup {
        target,
        database,
        forward,
    } = match startup::check(&n.identity, &n.params) {
        Ok(c) => c,
        Err(r) => {
            let target = asked_target(&n);
            refuse(ctx, &mut n, peer, &target, r).await;
            return;
        }
    };
    tracing::Span::current().record("target", target.as_str());
    let user = n.identity.user.clone();
    let Some(target_cfg) = ctx.config.targets.get(&target).cloned() else {
        let msg = format!("\"{target}\" is not a jitgate target");
        let hint = Some("set dbname to a configured target, e.g. dbname=prod-db".to_owned());
        refuse(
            ctx,
            &mut n,
            peer,
            target.as_str(),
            refusal("unknown_target", "3D000", msg, hint),
        )
        .await;
        return;
    };
    let Some(permit) = ctx.grants.lookup(&user, &target) else {
        let msg = format!("no active grant for {user} on {target}");
        let hint = format!("request access: jitgate request {target} --access read --for 30m --reason \"...\"");
        refuse(
            ctx,
            &mut n,
            peer,
            target.as_str(),
            refusal("no_grant", "28000", msg, Some(hint)),
        )
        .await;
        return;
    };
    if n.identity.not_after <= SystemTime::now() {
        let msg = "client certificate has expired".to_owned();
        let hint = Some("get a new certificate: jitgate cert issue".to_owned());
        refuse(
            ctx,
            &mut n,
            peer,
            target.as_str(),
            refusal("cert_expired", "28000", msg, hint),
        )
        .await;
        return;
    }
    let database = database.unwrap_or_else(|| target_cfg.database.clone());

    let started = StdInstant::now();
    let login = timeout(
        ctx.config.limits.upstream_connect_timeout,
        upstream::connect(&target_cfg, &permit, &database, &forward),
    )
    .await;
    let mut up = match login {
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
            refuse(
                ctx,
                &mut n,
                peer,
                target.as_str(),
                refusal("upstream", "08001", msg, None),
            )
            .await;
            return;
        }
    };

    if let Some((k, v)) = up
        .parameters
        .iter()
        .find(|(k, v)| startup::lexing_parameter_unsafe(k, v))
    {
        // A role or database default the proxy cannot read statements under.
        let msg = format!("target {target} reports {k}={v}; jitgate requires standard_conforming_strings=on and UTF8");
        refuse(
            ctx,
            &mut n,
            peer,
            target.as_str(),
            refusal("unsafe_setting", "42501", msg, None),
        )
        .await;
        return;
    }
    let grant = permit.grant();
    let upstream_cancel = up
        .backend_key
        .map(|(process_id, secret_key)| (Arc::clone(&target_cfg), CancelKey { process_id, secret_key }));
    let registration = ctx.sessions.register(NewSession {
        upstream_cancel,
        user: user.clone(),
        roles: n.identity.roles.clone(),
        target: target.clone(),
        database: database.clone(),
        access: grant.access,
        grant_id: grant.id.clone(),
        client_addr: peer,
    });
    let session = registration.handle();
    tracing::Span::current().record("session.id", session.id.as_str());
    let start_event = AuditEvent::SessionStart {
        session_id: session.id.clone(),
        grant_id: grant.id.clone(),
        user: user.clone(),
        roles: n.identity.roles.clone(),
        target: target.clone(),
        database: database.clone(),
        access: grant.access,
        client_addr: peer,
    };
    if ctx.audit.record(start_event).is_err() {
        ctx.metrics
            .sessions_denied_total
            .with_label_values(&["audit_unavailable"])
            .inc();
        let msg = "jitgate cannot write its audit log; sessions are refused until it can";
        let fatal = error_bytes(Severity::Fatal, "58030", msg, None);
        close(&mut n.tls, &fatal, Instant::now() + CLOSE_BOUND).await;
        return;
    }

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
    ctx.metrics.sessions_active.with_label_values(&labels).inc();
    tracing::info!(access = %grant.access, grant.id = %grant.id, "session started");

    let facts = SessionFacts {
        session_id: session.id.clone(),
        grant_id: grant.id.clone(),
        user: user.clone(),
        target: target.clone(),
        access: grant.access,
    };
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
    let mut tracker = Tracker::new(facts, guard, limits);

    let Relayed { end, close_by } = if n.tls.write_all(&hello).await.is_err() || n.tls.flush().await.is_err() {
        Relayed {
            end: RelayEnd::Closed(SessionEndReason::ClientClosed),
            close_by: Instant::now() + CLOSE_BOUND,
        }
    } else {
        let cut = cut_signal(ctx, &permit, session, Instant::now() + remaining(n.identity.not_after));
        let target_name = target.to_string();
        let grant_id = grant.id.to_string();
        let session_id = session.id.to_string();
        let fatal = move |reason| fatal_for(reason, &target_name, &grant_id, &session_id);
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
            notice: expiry_notice(ctx, &permit),
        };
        relay(&mut n.tls, &mut up.stream, relay_cx, cut, fatal).await
    };

    let reason = match end {
        RelayEnd::Closed(r) => r,
        RelayEnd::ProtocolViolation => SessionEndReason::Error,
        RelayEnd::Cut { reason: r, in_flight } => {
            ctx.metrics.session_cuts_total.with_label_values(&[r.as_str()]).inc();
            // An idle backend needs no cancel: closing the connection ends it.
            if let Some(key) = up.backend_key.filter(|_| in_flight) {
                // Stop a statement in progress on the server too; best effort, bounded.
                let target_cfg = Arc::clone(&target_cfg);
                let wait = ctx.config.limits.upstream_connect_timeout;
                tokio::spawn(async move {
                    let _ = timeout(wait, upstream::cancel(&target_cfg, key)).await;
                });
            }
            r
        }
    };
    drop(up);
    let bytes_from_client = session.bytes_from_client.load(std::sync::atomic::Ordering::Relaxed);
    let bytes_to_client = session.bytes_to_client.load(std::sync::atomic::Ordering::Relaxed);
    ctx.metrics.sessions_active.with_label_values(&labels).dec();
    ctx.metrics
        .bytes_total
        .with_label_values(&["client_to_target"])
        .inc_by(bytes_from_client);
    ctx.metrics
        .bytes_total
        .with_label_values(&["target_to_client"])
        .inc_by(bytes_to_client);
    // Not waited for: thousands of sessions cut at once must not queue up on the writer one
    // after another. A record that cannot be written is counted by the audit log.
    let _ = ctx.audit.write_or_enqueue(vec![AuditEvent::SessionEnd {
        session_id: session.id.clone(),
        grant_id: grant.id.clone(),
        user,
        roles: session.roles.clone(),
        target,
        access: grant.access,
        client_addr: peer,
        reason,
        bytes_from_client,
        bytes_to_client,
        duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    }]);
    tracing::info!(
        reason = reason.as_str(),
        bytes_from_client,
        bytes_to_client,
        "session ended"
    );
    // By close_by the client has the rest, close_notify and FIN, or a reset.
    close(&mut n.tls, &[], close_by).await;
}

/// The pre-expiry NOTICE for this session, unless turned off.
fn expiry_notice(ctx: &PgContext, permit: &GrantPermit) -> Option<ExpiryNotice> {
    let lead = ctx.config.sessions.expiry_notice;
    if lead.is_zero() {
        return None;
    }
    let grant = permit.grant();
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
        deadline: permit.deadline_watch(),
        lead,
        render: Box::new(render),
    })
}

fn remaining(t: SystemTime) -> std::time::Duration {
    t.duration_since(SystemTime::now()).unwrap_or_default()
}

/// Resolves with the reason the session must end: grant revoked or expired, session killed,
/// certificate expired, or proxy shutdown.
async fn cut_signal(
    ctx: &PgContext,
    permit: &GrantPermit,
    session: &crate::sessions::SessionHandle,
    cert_deadline: Instant,
) -> SessionEndReason {
    let grant_cut = permit.cut_token();
    let mut deadline = permit.deadline_watch();
    loop {
        // An extension moves the deadline: wait on the current one, start over when it moves.
        let due = deadline.borrow_and_update().instant;
        tokio::select! {
            _ = grant_cut.cancelled() => return match permit.ended() {
                Some(GrantEnd::Revoked) => SessionEndReason::GrantRevoked,
                _ => SessionEndReason::GrantExpired,
            },
            _ = tokio::time::sleep_until(due) => {
                if permit.deadline() <= Instant::now() {
                    return SessionEndReason::GrantExpired;
                }
            }
            _ = deadline.changed() => {}
            _ = session.killed() => return session.kill_reason().unwrap_or(SessionEndReason::Killed),
            _ = tokio::time::sleep_until(cert_deadline) => return SessionEndReason::CertExpired,
            _ = ctx.shutdown.cancelled() => return SessionEndReason::Shutdown,
        }
    }
}

/// The FATAL the client sees when the proxy cuts its session.
fn fatal_for(reason: SessionEndReason, target: &str, grant_id: &str, session_id: &str) -> Vec<u8> {
    let (code, message, hint) = match reason {
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
