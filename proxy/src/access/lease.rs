//! A session's proof of access, from admission to its end: its grant, target and level, its
//! entry in the session registry, and the one future that says when and why it must end.
//!
//! The cut follows a token tree: the proxy's shutdown token is the parent of every grant's
//! token, and a grant's token is the parent of each of its sessions' tokens. Shutting down,
//! ending the grant (revoked, expired) or killing the session cancels the session's token;
//! [`Lease::cut`] waits on that one token, on the certificate's end, and on the grant's
//! deadline as a backstop to the table's expiry loop.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use super::dialer::{BoxedIo, Dialer};
use super::table::GrantPermit;
use super::wave::CutWave;
use crate::audit::SessionEndReason;
use crate::budget::UserSlot;
use crate::config::Target;
use crate::model::{AccessLevel, Deadline, Grant, GrantEnd};
use crate::sessions::{Registration, SessionHandle};

/// A live session's access. Dropping it deregisters the session and frees its per-user slot.
pub struct Lease {
    pub(super) permit: GrantPermit,
    pub(super) target: Arc<Target>,
    pub(super) registration: Registration,
    pub(super) _slot: UserSlot,
    /// When the client's certificate ends, on tokio's clock.
    pub(super) cert_deadline: Instant,
    pub(super) shutdown: CancellationToken,
    pub(super) dialer: Arc<dyn Dialer>,
    pub(super) wave: Arc<CutWave>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("grant", &self.permit.grant().id)
            .field("target", &self.target.name)
            .field("session", &self.session().meta.id)
            .finish_non_exhaustive()
    }
}

impl Lease {
    /// The grant the session runs under (with its original expiry; see [`Lease::deadline`]).
    pub fn grant(&self) -> &Grant {
        self.permit.grant()
    }

    /// Whether the grant has ended (revoked, expired) or the proxy is shutting down.
    pub fn grant_ended(&self) -> bool {
        self.permit.cut_token().is_cancelled()
    }

    pub fn access(&self) -> AccessLevel {
        self.permit.grant().access
    }

    /// The target this lease reaches; the only one [`Lease::dial`] opens.
    pub fn target(&self) -> &Arc<Target> {
        &self.target
    }

    /// The registered session (listing, kill, byte counters, cancel key).
    pub fn session(&self) -> &Arc<SessionHandle> {
        self.registration.handle()
    }

    /// Follows the grant's deadline as extensions move it.
    pub fn deadline(&self) -> watch::Receiver<Deadline> {
        self.permit.deadline_watch()
    }

    /// The pre-expiry notice: an event `lead` before the grant's deadline, again after each
    /// extension. `None` when `lead` is zero (notices turned off).
    pub fn notice(&self, lead: Duration) -> Option<Notice> {
        (!lead.is_zero()).then(|| Notice::new(self.permit.deadline_watch(), lead))
    }

    /// Opens a stream to the lease's own target.
    pub async fn dial(&self) -> io::Result<BoxedIo> {
        self.dialer.dial(&self.target).await
    }

    /// Resolves with the reason the session must end: shutdown, the grant revoked or expired,
    /// the session killed, or the client certificate expired. The one place a session is cut,
    /// for every protocol.
    pub async fn cut(&self) -> SessionEndReason {
        let session = self.session();
        let mut deadline = self.permit.deadline_watch();
        loop {
            // An extension moves the deadline: wait on the current one, start over when it moves.
            let due = deadline.borrow_and_update().instant;
            tokio::select! {
                _ = session.killed() => return self.why(),
                _ = tokio::time::sleep_until(due) => {
                    if self.permit.deadline().instant <= Instant::now() {
                        return SessionEndReason::GrantExpired;
                    }
                }
                Ok(()) = deadline.changed() => {}
                _ = tokio::time::sleep_until(self.cert_deadline) => return SessionEndReason::CertExpired,
            }
        }
    }

    /// The second phase of a cut: call once the client has been told (the protocol's last
    /// message sent, the stream shut down), before the teardown. Waits, at most until `by`,
    /// until every session cut at the same time has told its client too, so that no teardown
    /// delays another session's telling (see [`CutWave`]).
    pub async fn told(&self, by: Instant) {
        self.wave.told();
        self.wave.settled(by).await;
    }

    /// Why the session's token was cancelled: the session's own kill reason, else the grant's
    /// end, else shutdown.
    fn why(&self) -> SessionEndReason {
        if let Some(reason) = self.session().kill_reason() {
            return reason;
        }
        match self.permit.ended() {
            Some(GrantEnd::Revoked) => SessionEndReason::GrantRevoked,
            Some(GrantEnd::Expired) => SessionEndReason::GrantExpired,
            None if self.shutdown.is_cancelled() => SessionEndReason::Shutdown,
            None => SessionEndReason::Killed,
        }
    }
}

/// The pre-expiry notice of one session: due `lead` before the grant's deadline, re-armed when
/// an extension moves the deadline.
pub struct Notice {
    deadline: watch::Receiver<Deadline>,
    lead: Duration,
    timer: Option<Pin<Box<Sleep>>>,
}

impl Notice {
    fn new(mut deadline: watch::Receiver<Deadline>, lead: Duration) -> Self {
        let timer = Some(arm(&mut deadline, lead));
        Self { deadline, lead, timer }
    }

    /// Ready with the deadline once the notice is due; then pending until the deadline moves
    /// and the notice comes due again. Only the timer wakes the task: poll it in the task that
    /// also waits on [`Lease::cut`], which wakes on every move of the deadline.
    pub fn poll_due(&mut self, cx: &mut Context<'_>) -> Poll<Deadline> {
        if self.deadline.has_changed().unwrap_or(false) {
            self.timer = Some(arm(&mut self.deadline, self.lead));
        }
        let fired = self.timer.as_mut().is_some_and(|t| t.as_mut().poll(cx).is_ready());
        if fired {
            self.timer = None;
            Poll::Ready(*self.deadline.borrow())
        } else {
            Poll::Pending
        }
    }
}

fn arm(deadline: &mut watch::Receiver<Deadline>, lead: Duration) -> Pin<Box<Sleep>> {
    let due = deadline.borrow_and_update().instant;
    Box::pin(tokio::time::sleep_until(due.checked_sub(lead).unwrap_or(due)))
}
