//! Grants: the in-memory table consulted at every session start, and the service that creates,
//! revokes and expires grants while keeping the store, the audit log and live sessions in step.
//!
//! Each live grant owns a [`CancellationToken`]. Sessions opened under it wait on that token
//! and on the grant's deadline, so revocation and expiry cut them the moment they happen.
//! A lookup hands out a [`GrantPermit`], the only value that lets a session reach a target.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use dashmap::DashMap;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::{AuditError, AuditEvent, AuditLog};
use crate::metrics::Metrics;
use crate::model::{AccessLevel, Deadline, Grant, GrantEnd, GrantId, NewGrant, TargetName, UserName};
use crate::notify::{Notification, Notifier};
use crate::store::{GrantStore, StoreError};

/// Errors from grant operations.
#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    #[error("no active grant {0}")]
    NotFound(GrantId),
    #[error("unknown target {0}")]
    UnknownTarget(String),
    #[error("target {target} has no credentials for {access} access")]
    NoCredentials { target: TargetName, access: AccessLevel },
    #[error("duration must be between 1s and 30d")]
    BadDuration,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Audit(#[from] AuditError),
}

/// A grant in the table with its cut signal and its (movable) deadline.
#[derive(Debug)]
struct LiveGrant {
    /// The grant as created; `expires_at` here is the original expiry, see `deadline`.
    grant: Grant,
    deadline: watch::Sender<Deadline>,
    cut: CancellationToken,
    end: OnceLock<GrantEnd>,
}

impl LiveGrant {
    fn deadline(&self) -> Deadline {
        *self.deadline.borrow()
    }
    fn is_live(&self, now: Instant) -> bool {
        self.end.get().is_none() && now < self.deadline().instant
    }
    /// The grant with its current expiry.
    fn current(&self) -> Grant {
        Grant {
            expires_at: self.deadline().at,
            ..self.grant.clone()
        }
    }
}

/// Proof that a grant was active for (user, target) at lookup time. Only [`Grants::lookup`]
/// makes one.
#[derive(Debug, Clone)]
pub struct GrantPermit(Arc<LiveGrant>);

impl GrantPermit {
    /// The grant this permit stands for.
    pub fn grant(&self) -> &Grant {
        &self.0.grant
    }
    /// Instant at which the grant expires now (an extension moves it).
    pub fn deadline(&self) -> Instant {
        self.0.deadline().instant
    }
    /// Follows the grant's deadline as extensions move it.
    pub fn deadline_watch(&self) -> watch::Receiver<Deadline> {
        self.0.deadline.subscribe()
    }
    /// Fires when the grant is revoked or expires.
    pub fn cut_token(&self) -> CancellationToken {
        self.0.cut.clone()
    }
    /// How the grant ended, once it has.
    pub fn ended(&self) -> Option<GrantEnd> {
        self.0.end.get().copied()
    }
}

/// The table key of (user, target): `user`, a NUL, `target`. Looked up as a `str` built on
/// the stack, so a lookup allocates nothing.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key(Box<str>);

impl Key {
    fn new(user: &UserName, target: &TargetName) -> Self {
        Key(format!("{user}\0{target}").into_boxed_str())
    }
}

impl std::borrow::Borrow<str> for Key {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// Names are at most 63 bytes each, so a key always fits.
const KEY_BYTES: usize = 128;

/// `user`, a NUL and `target` in `buf` (the form of [`Key`]), or `None` if too long.
fn key_str<'a>(buf: &'a mut [u8; KEY_BYTES], user: &str, target: &str) -> Option<&'a str> {
    let n = user.len() + 1 + target.len();
    if n > KEY_BYTES {
        return None;
    }
    buf[..user.len()].copy_from_slice(user.as_bytes());
    buf[user.len()] = 0;
    buf[user.len() + 1..n].copy_from_slice(target.as_bytes());
    std::str::from_utf8(&buf[..n]).ok()
}

/// The grant service.
pub struct Grants {
    by_id: DashMap<GrantId, Arc<LiveGrant>>,
    by_key: DashMap<Key, Vec<Arc<LiveGrant>>>,
    store: Arc<dyn GrantStore>,
    audit: Arc<AuditLog>,
    metrics: Arc<Metrics>,
    notifier: Arc<Notifier>,
    reapers: TaskTracker,
    shutdown: CancellationToken,
}

/// Longest grant an admin may create directly.
const MAX_GRANT: Duration = Duration::from_secs(30 * 86_400);

impl Grants {
    /// Rebuilds the table from the store. Grants whose time passed while the proxy was down
    /// are ended as expired (stored, audited) and never become active.
    pub fn restore(
        store: Arc<dyn GrantStore>,
        audit: Arc<AuditLog>,
        metrics: Arc<Metrics>,
        notifier: Arc<Notifier>,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, GrantError> {
        let grants = Arc::new(Self {
            by_id: DashMap::new(),
            by_key: DashMap::new(),
            store,
            audit,
            metrics,
            notifier,
            reapers: TaskTracker::new(),
            shutdown,
        });
        let now = SystemTime::now();
        for grant in grants.store.active()? {
            if grant.expires_at <= now {
                grants.store.end(&grant.id, GrantEnd::Expired, now)?;
                grants.audit.record(AuditEvent::GrantExpired {
                    grant_id: grant.id.clone(),
                    user: grant.user.clone(),
                    target: grant.target.clone(),
                    access: grant.access,
                })?;
                grants
                    .notifier
                    .notify(Notification::grant_ended(&grant, GrantEnd::Expired, None));
            } else {
                grants.activate(grant);
            }
        }
        Ok(grants)
    }

    /// Creates a grant: stored, audited, then active. If the audit record cannot be written the
    /// stored grant is ended again and the creation fails: no grant exists unaudited.
    pub fn create(
        self: &Arc<Self>,
        req: NewGrant,
        created_by: UserName,
        targets: &crate::config::Config,
    ) -> Result<Grant, GrantError> {
        let target = targets
            .targets
            .get(&req.target)
            .ok_or_else(|| GrantError::UnknownTarget(req.target.to_string()))?;
        if !target.credentials.contains_key(&req.access) {
            return Err(GrantError::NoCredentials {
                target: req.target,
                access: req.access,
            });
        }
        let duration = Duration::from_secs(req.duration_secs);
        if duration.is_zero() || duration > MAX_GRANT {
            return Err(GrantError::BadDuration);
        }
        let now = SystemTime::now();
        let grant = Grant {
            id: GrantId::generate(),
            user: req.user,
            target: req.target,
            access: req.access,
            reason: req.reason,
            created_by,
            created_at: now,
            expires_at: now + duration,
        };
        self.store.insert(&grant)?;
        if let Err(e) = self.audit.record(AuditEvent::GrantCreated { grant: grant.clone() }) {
            if let Err(error) = self.store.end(&grant.id, GrantEnd::Revoked, SystemTime::now()) {
                tracing::error!(grant.id = %grant.id, %error, "could not withdraw unaudited grant");
            }
            return Err(e.into());
        }
        self.activate(grant.clone());
        self.notifier.notify(Notification::grant_started(&grant));
        Ok(grant)
    }

    /// Revokes a grant and cuts its sessions. Sessions are cut first, so a store failure
    /// never leaves them running; the revocation is audited before it is stored.
    pub fn revoke(&self, id: &GrantId, by: &UserName) -> Result<Grant, GrantError> {
        let live = self
            .by_id
            .get(id)
            .map(|g| Arc::clone(&g))
            .ok_or_else(|| GrantError::NotFound(id.clone()))?;
        if live.end.set(GrantEnd::Revoked).is_err() {
            return Err(GrantError::NotFound(id.clone()));
        }
        self.deactivate(&live);
        self.notifier
            .notify(Notification::grant_ended(&live.current(), GrantEnd::Revoked, Some(by)));
        let g = &live.grant;
        let audited = self.audit.record(AuditEvent::GrantRevoked {
            grant_id: g.id.clone(),
            user: g.user.clone(),
            target: g.target.clone(),
            access: g.access,
            by: by.clone(),
        });
        self.store.end(id, GrantEnd::Revoked, SystemTime::now())?;
        audited?;
        Ok(g.clone())
    }

    /// Moves a live grant's deadline `by` later: stored, audited, then every session under it
    /// follows the new deadline without reconnecting. The total lifetime stays within 30 days.
    pub fn extend(&self, id: &GrantId, by: Duration, who: &UserName) -> Result<Grant, GrantError> {
        let live = self
            .by_id
            .get(id)
            .map(|g| Arc::clone(&g))
            .ok_or_else(|| GrantError::NotFound(id.clone()))?;
        if !live.is_live(Instant::now()) {
            return Err(GrantError::NotFound(id.clone()));
        }
        let new_at = live.deadline().at + by;
        if by.is_zero() || new_at.duration_since(SystemTime::now()).unwrap_or_default() > MAX_GRANT {
            return Err(GrantError::BadDuration);
        }
        if !self.store.extend(id, new_at)? {
            return Err(GrantError::NotFound(id.clone()));
        }
        let g = &live.grant;
        self.audit.record(AuditEvent::GrantExtended {
            grant_id: g.id.clone(),
            user: g.user.clone(),
            target: g.target.clone(),
            access: g.access,
            expires_at: new_at,
            by: who.clone(),
        })?;
        live.deadline.send_replace(Deadline::at(new_at));
        Ok(live.current())
    }

    /// The live grant `id`, with its current expiry.
    pub fn get(&self, id: &GrantId) -> Option<Grant> {
        let live = self.by_id.get(id)?;
        live.is_live(Instant::now()).then(|| live.current())
    }

    /// The best live grant for (user, target): the highest access level, then the latest
    /// expiry. `None` denies.
    pub fn lookup(&self, user: &UserName, target: &TargetName) -> Option<GrantPermit> {
        let now = Instant::now();
        let mut buf = [0u8; KEY_BYTES];
        let key = key_str(&mut buf, user.as_str(), target.as_str())?;
        let entry = self.by_key.get(key)?;
        entry
            .iter()
            .filter(|g| g.is_live(now))
            .max_by_key(|g| (g.grant.access, g.deadline().instant))
            .map(|g| GrantPermit(Arc::clone(g)))
    }

    /// Every active grant, soonest expiry first.
    pub fn list(&self) -> Vec<Grant> {
        let now = Instant::now();
        let mut v: Vec<Grant> = self
            .by_id
            .iter()
            .filter(|g| g.is_live(now))
            .map(|g| g.current())
            .collect();
        v.sort_by_key(|g| g.expires_at);
        v
    }

    fn activate(self: &Arc<Self>, grant: Grant) {
        let live = Arc::new(LiveGrant {
            deadline: watch::Sender::new(Deadline::at(grant.expires_at)),
            cut: CancellationToken::new(),
            end: OnceLock::new(),
            grant,
        });
        let key = Key::new(&live.grant.user, &live.grant.target);
        self.by_key.entry(key).or_default().push(Arc::clone(&live));
        self.by_id.insert(live.grant.id.clone(), Arc::clone(&live));
        self.metrics.grants_active.inc();
        let this = Arc::clone(self);
        self.reapers.spawn(async move {
            let mut deadline = live.deadline.subscribe();
            loop {
                let due = deadline.borrow_and_update().instant;
                tokio::select! {
                    _ = tokio::time::sleep_until(due) => {
                        // An extension may have landed just now.
                        if live.deadline().instant <= Instant::now() {
                            this.expire(&live);
                            return;
                        }
                    }
                    _ = deadline.changed() => {}
                    _ = live.cut.cancelled() => return,
                    _ = this.shutdown.cancelled() => return,
                }
            }
        });
    }

    fn expire(&self, live: &Arc<LiveGrant>) {
        if live.end.set(GrantEnd::Expired).is_err() {
            return;
        }
        self.deactivate(live);
        self.notifier
            .notify(Notification::grant_ended(&live.current(), GrantEnd::Expired, None));
        let g = &live.grant;
        if let Err(error) = self.store.end(&g.id, GrantEnd::Expired, SystemTime::now()) {
            tracing::error!(grant.id = %g.id, %error, "could not store grant expiry");
        }
        // An audit failure is already logged and counted by the audit log.
        let _ = self.audit.record(AuditEvent::GrantExpired {
            grant_id: g.id.clone(),
            user: g.user.clone(),
            target: g.target.clone(),
            access: g.access,
        });
    }

    /// Removes a grant whose `end` is set from both indexes and cuts its sessions.
    fn deactivate(&self, live: &Arc<LiveGrant>) {
        live.cut.cancel();
        if self.by_id.remove(&live.grant.id).is_some() {
            self.metrics.grants_active.dec();
        }
        let key = Key::new(&live.grant.user, &live.grant.target);
        self.by_key.remove_if_mut(&key, |_, v| {
            v.retain(|g| !Arc::ptr_eq(g, live));
            v.is_empty()
        });
    }
}
