//! The grant service: creates, extends, revokes and expires grants, keeping the store, the
//! audit log, the webhooks and the in-memory table ([`GrantTable`]) in step.
//!
//! Order, so nothing fails open:
//! - create: stored, audited, then applied to the table (no grant exists unaudited);
//! - revoke: applied to the table first (sessions are cut now), then audited, then stored;
//! - extend: stored (compare-and-set from the expiry the caller saw), audited, applied;
//! - expire: the table's expiry loop has already cut the grant; the store's compare-and-set
//!   decides who records it, so with several writers exactly one `grant.expired` record and one
//!   webhook come out.
//!
//! Everything here is async and nothing blocks a tokio worker: the store runs on its own
//! thread, audit records are waited for without blocking. A follower task applies the store's
//! change feed to the table, so changes made elsewhere take effect here too; applying this
//! process's own changes again changes nothing.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access::table::{Applied, GrantTable};
use crate::audit::{AuditError, AuditEvent, AuditLog};
use crate::clock::SharedClock;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::model::{AccessLevel, Grant, GrantEnd, GrantId, NewGrant, TargetName, UserName};
use crate::notify::{Notification, Notifier};
use crate::store::{Change, Store, StoreError};

/// Errors from grant operations, by what the caller does next.
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
    /// Someone else changed the grant first (an extension or an end): read it again.
    #[error("grant {0} was changed at the same time; try again")]
    Conflict(GrantId),
    #[error(transparent)]
    Store(StoreError),
    #[error(transparent)]
    Audit(#[from] AuditError),
}

impl From<StoreError> for GrantError {
    fn from(e: StoreError) -> Self {
        GrantError::Store(e)
    }
}

/// Longest grant an admin may create directly.
const MAX_GRANT: Duration = Duration::from_secs(30 * 86_400);

/// The grant service.
pub struct Grants {
    table: Arc<GrantTable>,
    store: Arc<dyn Store>,
    audit: Arc<AuditLog>,
    notifier: Arc<Notifier>,
    metrics: Arc<Metrics>,
    clock: SharedClock,
}

/// What [`Grants::start`] needs.
pub struct GrantsDeps {
    pub store: Arc<dyn Store>,
    pub audit: Arc<AuditLog>,
    pub metrics: Arc<Metrics>,
    pub notifier: Arc<Notifier>,
    pub clock: SharedClock,
    /// The proxy's shutdown: parent of every grant's cut token; stops the service's tasks.
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
}

impl Grants {
    /// Rebuilds the table from the store and starts the expiry recorder and the change
    /// follower. Grants whose time passed while the proxy was down are ended as expired
    /// (stored, audited) and never become live.
    pub async fn start(deps: GrantsDeps) -> Result<Arc<Self>, GrantError> {
        let GrantsDeps {
            store,
            audit,
            metrics,
            notifier,
            clock,
            shutdown,
            tracker,
        } = deps;
        // Subscribed before reading, so no change committed meanwhile is missed.
        let changes = store.changes();
        let (table, expired) = GrantTable::start(Arc::clone(&clock), shutdown.clone(), Arc::clone(&metrics));
        let grants = Arc::new(Self {
            table,
            store,
            audit,
            notifier,
            metrics,
            clock,
        });
        let now = grants.clock.now();
        for grant in grants.store.live_grants().await? {
            if grant.expires_at <= now {
                grants.record_expiry(&grant, true).await?;
            } else {
                grants.table.apply(&Change::GrantCreated(grant));
            }
        }
        tracker.spawn(Arc::clone(&grants).record_expiries(expired, shutdown.clone()));
        tracker.spawn(Arc::clone(&grants).follow(changes, shutdown));
        Ok(grants)
    }

    /// The table sessions are admitted against.
    pub fn table(&self) -> &Arc<GrantTable> {
        &self.table
    }

    /// The live grant `id`, with its current expiry.
    pub fn get(&self, id: &GrantId) -> Option<Grant> {
        self.table.get(id)
    }

    /// Every live grant, soonest expiry first.
    pub fn list(&self) -> Vec<Grant> {
        self.table.list()
    }

    /// Checks a grant's target, level and duration against the configuration.
    pub fn validate(req: &NewGrant, config: &Config) -> Result<Duration, GrantError> {
        let target = config
            .targets
            .get(&req.target)
            .ok_or_else(|| GrantError::UnknownTarget(req.target.to_string()))?;
        if !target.credentials.contains_key(&req.access) {
            return Err(GrantError::NoCredentials {
                target: req.target.clone(),
                access: req.access,
            });
        }
        let duration = Duration::from_secs(req.duration_secs);
        if duration.is_zero() || duration > MAX_GRANT {
            return Err(GrantError::BadDuration);
        }
        Ok(duration)
    }

    /// The grant a request for `req` starting now makes (not yet stored).
    pub fn draft(&self, req: NewGrant, created_by: UserName, duration: Duration) -> Grant {
        let now = whole_millis(self.clock.now());
        Grant {
            id: GrantId::generate(),
            user: req.user,
            target: req.target,
            access: req.access,
            reason: req.reason,
            created_by,
            created_at: now,
            expires_at: now + duration,
        }
    }

    /// Creates a grant: stored, audited, then live. If the audit record cannot be written the
    /// stored grant is ended again and the creation fails: no grant exists unaudited.
    pub async fn create(&self, req: NewGrant, created_by: UserName, config: &Config) -> Result<Grant, GrantError> {
        let duration = Self::validate(&req, config)?;
        let grant = self.draft(req, created_by, duration);
        self.store.insert_grant(&grant).await?;
        self.activate(grant).await
    }

    /// Audits a grant already stored (by [`Grants::create`], or with a request's approval) and
    /// makes it live. On an audit failure the stored grant is ended again.
    pub async fn activate(&self, grant: Grant) -> Result<Grant, GrantError> {
        if let Err(e) = self
            .audit
            .record(AuditEvent::GrantCreated { grant: grant.clone() })
            .await
        {
            if let Err(error) = self
                .store
                .end_grant(&grant.id, GrantEnd::Revoked, self.clock.now())
                .await
            {
                tracing::error!(grant.id = %grant.id, %error, "could not withdraw unaudited grant");
            }
            return Err(e.into());
        }
        self.table.apply(&Change::GrantCreated(grant.clone()));
        self.notifier.notify(Notification::grant_started(&grant));
        Ok(grant)
    }

    /// Revokes a grant and cuts its sessions. Sessions are cut first, so a store failure never
    /// leaves them running; the revocation is audited before it is stored.
    pub async fn revoke(&self, id: &GrantId, by: &UserName) -> Result<Grant, GrantError> {
        let change = Change::GrantEnded {
            id: id.clone(),
            end: GrantEnd::Revoked,
        };
        let Applied::Ended(grant) = self.table.apply(&change) else {
            return Err(GrantError::NotFound(id.clone()));
        };
        self.notifier
            .notify(Notification::grant_ended(&grant, GrantEnd::Revoked, Some(by)));
        let audited = self
            .audit
            .record(AuditEvent::GrantRevoked {
                grant_id: grant.id.clone(),
                user: grant.user.clone(),
                target: grant.target.clone(),
                access: grant.access,
                by: by.clone(),
            })
            .await;
        match self.store.end_grant(id, GrantEnd::Revoked, self.clock.now()).await {
            // Ended elsewhere at the same moment: it is ended either way.
            Ok(()) | Err(StoreError::Conflict) => {}
            Err(e) => return Err(e.into()),
        }
        audited?;
        Ok(grant)
    }

    /// Moves a live grant's deadline `by` later: stored, audited, then every session under it
    /// follows the new deadline without reconnecting. The grant's end stays within 30 days
    /// from now.
    pub async fn extend(&self, id: &GrantId, by: Duration, who: &UserName) -> Result<Grant, GrantError> {
        let current = self.get(id).ok_or_else(|| GrantError::NotFound(id.clone()))?;
        let new_at = self.extended_end(&current, by)?;
        match self.store.extend_grant(id, current.expires_at, new_at).await {
            Ok(()) => {}
            Err(StoreError::Conflict) => return Err(GrantError::Conflict(id.clone())),
            Err(StoreError::NotFound) => return Err(GrantError::NotFound(id.clone())),
            Err(e) => return Err(e.into()),
        }
        self.extended(&current, new_at, who).await
    }

    /// Where `grant` would end if extended `by`: an error when `by` is zero or the end would lie
    /// more than 30 days ahead.
    pub fn extended_end(&self, grant: &Grant, by: Duration) -> Result<SystemTime, GrantError> {
        let new_at = grant.expires_at + by;
        let ahead = new_at.duration_since(self.clock.now()).unwrap_or_default();
        if by.is_zero() || ahead > MAX_GRANT {
            return Err(GrantError::BadDuration);
        }
        Ok(new_at)
    }

    /// Audits and applies an extension already stored (by [`Grants::extend`], or with a
    /// request's approval).
    pub async fn extended(&self, grant: &Grant, new_at: SystemTime, who: &UserName) -> Result<Grant, GrantError> {
        self.audit
            .record(AuditEvent::GrantExtended {
                grant_id: grant.id.clone(),
                user: grant.user.clone(),
                target: grant.target.clone(),
                access: grant.access,
                expires_at: new_at,
                by: who.clone(),
            })
            .await?;
        self.table.apply(&Change::GrantExtended {
            id: grant.id.clone(),
            expires_at: new_at,
        });
        Ok(self.get(&grant.id).unwrap_or_else(|| Grant {
            expires_at: new_at,
            ..grant.clone()
        }))
    }

    /// Stores, audits and notifies one expiry. Only the writer whose compare-and-set ends the
    /// grant records it. At start-up (`strict`) a failure stops the start; afterwards it is
    /// logged and counted: the grant is cut already, and the next start-up ends it in the store.
    async fn record_expiry(&self, grant: &Grant, strict: bool) -> Result<(), GrantError> {
        match self
            .store
            .end_grant(&grant.id, GrantEnd::Expired, self.clock.now())
            .await
        {
            Ok(()) => {}
            Err(StoreError::Conflict | StoreError::NotFound) => return Ok(()),
            Err(e) if strict => return Err(e.into()),
            Err(error) => {
                tracing::error!(grant.id = %grant.id, %error, "could not store grant expiry");
                return Ok(());
            }
        }
        let event = AuditEvent::GrantExpired {
            grant_id: grant.id.clone(),
            user: grant.user.clone(),
            target: grant.target.clone(),
            access: grant.access,
        };
        if strict {
            self.audit.record(event).await?;
        } else {
            // Nobody waits for it: it records what already happened.
            self.audit.submit(event);
        }
        self.notifier
            .notify(Notification::grant_ended(grant, GrantEnd::Expired, None));
        Ok(())
    }

    /// Records each grant the table's expiry loop ends, in the order they end.
    async fn record_expiries(self: Arc<Self>, mut expired: mpsc::UnboundedReceiver<Grant>, stop: CancellationToken) {
        loop {
            let grant = tokio::select! {
                g = expired.recv() => match g {
                    Some(g) => g,
                    None => return,
                },
                () = stop.cancelled() => return,
            };
            let _ = self.record_expiry(&grant, false).await;
        }
    }

    /// Applies the store's changes to the table: changes made elsewhere take effect here.
    async fn follow(self: Arc<Self>, mut changes: tokio::sync::broadcast::Receiver<Change>, stop: CancellationToken) {
        loop {
            let change = tokio::select! {
                c = changes.recv() => c,
                () = stop.cancelled() => return,
            };
            match change {
                Ok(Change::Resync) => {
                    tracing::warn!("the store's change log has a gap; re-reading live grants");
                    self.resync().await;
                }
                Ok(change) => {
                    self.table.apply(&change);
                }
                Err(RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "grant change feed fell behind; re-reading live grants");
                    self.resync().await;
                }
                Err(RecvError::Closed) => return,
            }
        }
    }

    /// Makes the table what the store holds: live grants created or moved, grants the store
    /// no longer holds live ended (as expired when past their expiry, revoked otherwise).
    ///
    /// New sessions are refused while it runs (`Reason::Resyncing`): the replica admits
    /// nothing under a grant the store may have ended meanwhile. Grants the store still holds
    /// live past their expiry (an expiry this replica or another could not store during an
    /// outage) are expired now, once across the cluster (compare-and-set).
    async fn resync(&self) {
        self.metrics.grant_resyncs_total.inc();
        self.table.set_resyncing(true);
        let live = self.store.live_grants().await;
        let live = match live {
            Ok(live) => live,
            Err(error) => {
                // Nothing better to admit from than what is held: the store is gone again.
                self.table.set_resyncing(false);
                return tracing::error!(%error, "cannot re-read live grants");
            }
        };
        let ids: std::collections::HashSet<GrantId> = live.iter().map(|g| g.id.clone()).collect();
        let now = self.clock.now();
        for held in self.table.list() {
            if !ids.contains(&held.id) {
                let end = if held.expires_at <= now {
                    GrantEnd::Expired
                } else {
                    GrantEnd::Revoked
                };
                self.table.apply(&Change::GrantEnded { id: held.id, end });
            }
        }
        let mut overdue = Vec::new();
        for grant in live {
            if grant.expires_at <= now {
                self.table.apply(&Change::GrantEnded {
                    id: grant.id.clone(),
                    end: GrantEnd::Expired,
                });
                overdue.push(grant);
                continue;
            }
            let expires_at = grant.expires_at;
            let id = grant.id.clone();
            self.table.apply(&Change::GrantCreated(grant));
            self.table.apply(&Change::GrantExtended { id, expires_at });
        }
        self.table.set_resyncing(false);
        for grant in overdue {
            let _ = self.record_expiry(&grant, false).await;
        }
    }
}

/// `t` cut to whole milliseconds, the store's precision, so a compare-and-set on an expiry
/// read back from the store matches the one kept in memory.
pub fn whole_millis(t: SystemTime) -> SystemTime {
    crate::timefmt::from_millis(crate::timefmt::to_millis(t))
}
