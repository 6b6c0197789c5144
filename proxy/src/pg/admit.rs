//! From accept to a session slot: the TLS handshake and startup message within
//! `limits.handshake_timeout`, the connection budgets, and cancel requests.
//!
//! Until the client shows a valid certificate, its connection holds a slot of the listener's
//! unauthenticated budget and closes at once when a newer connection evicts it. With a valid
//! certificate it moves to a slot of `limits.max_connections`; when none is free it stays in
//! the unauthenticated budget only until it has been told `53300`.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::time::{timeout, timeout_at, Instant};
use tracing::Instrument as _;

use super::close::{close, CLOSE_BOUND};
use super::connection::{asked_target, refuse, run_session, Negotiated, PROTOCOL};
use super::negotiate::{self, acceptor, Accepted, NegotiateError, Startup};
use super::upstream;
use super::PgContext;
use crate::access::{Reason, Refusal};
use crate::budget::Ticket;
use crate::sessions::CancelKey;

/// Serves one accepted TCP connection on the PostgreSQL listener. `ticket` is its slot in the
/// listener's unauthenticated budget.
pub async fn serve_connection(ctx: Arc<PgContext>, tcp: TcpStream, peer: SocketAddr, ticket: Ticket) {
    let _ = tcp.set_nodelay(true);
    let limits = &ctx.config.limits;
    // TLS and the startup message must both arrive by this deadline.
    let deadline = Instant::now() + limits.handshake_timeout;
    let max_startup = limits.max_startup_message_bytes;
    let handshake = timeout_at(deadline, negotiate::handshake(tcp, acceptor(&ctx.tls), max_startup));
    let accepted = tokio::select! {
        r = handshake => {
            // Counted while the socket is still open (select! drops it after this arm), so
            // a client that sees the close also sees the count.
            if r.is_err() {
                handshake_timed_out(&ctx);
            }
            r
        }
        () = ticket.evicted() => {
            tracing::debug!("unauthenticated connection evicted by a newer one");
            return;
        }
    };
    let Accepted { mut tls, identity } = match accepted {
        Err(_) => return,
        Ok(Err(NegotiateError::Handshake { reason, message })) => {
            ctx.metrics
                .tls_handshake_failures_total
                .with_label_values(&[PROTOCOL, reason])
                .inc();
            tracing::info!(reason, error = %message, "TLS handshake refused");
            return;
        }
        Ok(Err(NegotiateError::Cancel { process_id, secret_key })) => {
            forward_cancel(&ctx, CancelKey { process_id, secret_key }, true).await;
            return;
        }
        Ok(Err(NegotiateError::Client(reason))) => {
            tracing::debug!(%reason, "client left during negotiation");
            return;
        }
        Ok(Ok(a)) => a,
    };
    // A valid certificate: the connection leaves the unauthenticated budget for a slot of
    // limits.max_connections. Without a free one it stays evictable until it is refused.
    let slot = ctx.connections.try_take();
    let ticket = if slot.is_some() {
        drop(ticket);
        None
    } else {
        Some(ticket)
    };
    let read = tokio::select! {
        r = timeout_at(deadline, negotiate::startup(&mut tls, max_startup)) => r,
        () = evicted(ticket.as_ref()) => return,
    };
    let (params, leftover) = match read {
        Err(_) => {
            close(&mut tls, &[], Instant::now() + CLOSE_BOUND).await;
            return handshake_timed_out(&ctx);
        }
        Ok(Ok(Startup::Session { params, leftover })) => (params, leftover),
        Ok(Ok(Startup::Cancel { process_id, secret_key })) => {
            forward_cancel(&ctx, CancelKey { process_id, secret_key }, true).await;
            close(&mut tls, &[], Instant::now() + CLOSE_BOUND).await;
            return;
        }
        Ok(Err(e)) => {
            tracing::debug!(reason = %e, "client left during negotiation");
            return;
        }
    };
    let mut n = Negotiated {
        tls,
        identity,
        params,
        leftover,
    };
    let span = tracing::info_span!("session", identity = %n.identity.user, target = tracing::field::Empty, session.id = tracing::field::Empty);
    async move {
        let Some(slot) = slot else {
            let max = ctx.connections.max();
            let msg = format!(
                "sorry, too many clients already: jitgate holds its limit of {max} connections (limits.max_connections)"
            );
            let r = Refusal::new(Reason::MaxConnections, msg).hint("try again later");
            let target = asked_target(&n);
            refuse(&ctx, &mut n, peer, &target, r).await;
            drop(ticket);
            return;
        };
        run_session(&ctx, n, peer).await;
        drop(slot);
    }
    .instrument(span)
    .await;
}

fn handshake_timed_out(ctx: &PgContext) {
    ctx.metrics
        .tls_handshake_failures_total
        .with_label_values(&[PROTOCOL, "timeout"])
        .inc();
    tracing::debug!("handshake timed out");
}

/// Resolves when `ticket` is evicted; never without one.
async fn evicted(ticket: Option<&Ticket>) {
    match ticket {
        Some(t) => t.evicted().await,
        None => std::future::pending().await,
    }
}

/// Forwards a CancelRequest to the backend of the session it names, if any. The client gets
/// no answer either way, as with PostgreSQL. A key another replica issued (`from_client`: it
/// came from a client, not passed on by a replica) goes to the other replicas through the
/// store; the one that issued it forwards it.
pub(crate) async fn forward_cancel(ctx: &PgContext, key: CancelKey, from_client: bool) {
    let Some((target, upstream_key)) = ctx.sessions.cancel_route(key) else {
        if let Some(cluster) = ctx
            .cluster
            .as_ref()
            .filter(|_| from_client && !ctx.sessions.issued_here(key))
        {
            match cluster.send_cancel(key).await {
                Ok(()) => {
                    ctx.metrics
                        .cancel_requests_total
                        .with_label_values(&["passed_on"])
                        .inc();
                    tracing::debug!("cancel request passed to the replica that issued its key");
                }
                Err(error) => {
                    ctx.metrics.cancel_requests_total.with_label_values(&["failed"]).inc();
                    tracing::warn!(%error, "cancel request for another replica could not be passed on");
                }
            }
            return;
        }
        ctx.metrics.cancel_requests_total.with_label_values(&["unknown"]).inc();
        tracing::debug!("cancel request for an unknown key ignored");
        return;
    };
    let wait = ctx.config.limits.upstream_connect_timeout;
    let key = (upstream_key.process_id, upstream_key.secret_key);
    match timeout(wait, upstream::cancel(&ctx.connector, &target, key)).await {
        Ok(Ok(())) => {
            ctx.metrics
                .cancel_requests_total
                .with_label_values(&["forwarded"])
                .inc();
            tracing::info!(target = %target.name, "query cancel forwarded");
        }
        _ => {
            ctx.metrics.cancel_requests_total.with_label_values(&["failed"]).inc();
            tracing::warn!(target = %target.name, "query cancel could not be delivered");
        }
    }
}
