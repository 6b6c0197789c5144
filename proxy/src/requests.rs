//! Access requests: the just-in-time workflow. An engineer asks for one access level to one
//! target for a bounded time with a reason ([`NewRequest`]), or for more time on a live grant
//! ([`NewExtension`]); the policies ([`crate::policy`]) decide whether that is granted at once,
//! needs approvals, or is refused; approvers approve or deny; the requester may withdraw; a
//! request nobody decides lapses.
//!
//! States: `pending` → `approved` (a grant was created or extended), `denied`, `withdrawn` or
//! `lapsed`. Refused requests are never stored: the caller gets the reason at once and the
//! audit log gets a `request.refused` record. Every change is stored, audited and notified.
//! Changes are compare-and-set on the request's stored version: a decision is always made on
//! the request as stored, and of two approvals landing at once only one counts as the last
//! (the other re-reads and finds it decided). The grant an approval makes is stored in the
//! same transaction as the approval, so a request can never be approved twice, nor its grant
//! exist without the approval. Grants come from [`Grants`]; this module only decides when to
//! create or extend one.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::audit::{AuditError, AuditEvent, AuditLog};
use crate::clock::SharedClock;
use crate::config::Config;
use crate::grants::{GrantError, Grants};
use crate::model::{
    AccessLevel, GrantId, ListFilter, NewExtension, NewGrant, NewRequest, Request, RequestId, RequestState, TargetName,
    UserName, Vote,
};
use crate::notify::{Notification, Notifier, RequestInfo};
use crate::pki::Identity;
use crate::policy::{Approval, Ask, Decision};
use crate::store::{GrantWrite, RequestQuery, Store, StoreError, Versioned};

pub mod command;

/// Why a request operation failed; each maps to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// Malformed input (400).
    #[error("{0}")]
    Invalid(String),
    /// No policy allows it (403); audited as `request.refused`.
    #[error("refused: {0}")]
    Refused(String),
    /// The caller may not do this (403).
    #[error("{0}")]
    Forbidden(String),
    /// No such request, or not one the caller may see (404).
    #[error("no request {0}")]
    NotFound(RequestId),
    /// The request is not in a state that allows this (409).
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Grant(#[from] GrantError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Audit(#[from] AuditError),
}

/// Longest reason or comment accepted, in bytes.
const MAX_TEXT: usize = 1024;
/// Longest access a request may ask for (the grant service's own cap).
const MAX_DURATION: Duration = Duration::from_secs(30 * 86_400);
/// Most requests one list returns.
const LIST_LIMIT: usize = 500;

/// The request service.
pub struct Requests {
    config: Config,
    store: Arc<dyn Store>,
    grants: Arc<Grants>,
    audit: Arc<AuditLog>,
    notifier: Arc<Notifier>,
    clock: SharedClock,
}

/// How often a change re-reads a request that another writer changed first.
const ATTEMPTS: usize = 5;

fn text(what: &str, value: &str) -> Result<String, RequestError> {
    let value = value.trim();
    if value.is_empty() {
        return Err(RequestError::Invalid(format!("{what} must not be empty")));
    }
    if value.len() > MAX_TEXT {
        return Err(RequestError::Invalid(format!("{what} is longer than {MAX_TEXT} bytes")));
    }
    if value.chars().any(|c| c.is_control() && c != '\n') {
        return Err(RequestError::Invalid(format!("{what} contains control characters")));
    }
    Ok(value.to_owned())
}

fn duration(secs: u64) -> Result<Duration, RequestError> {
    let d = Duration::from_secs(secs);
    if d.is_zero() || d > MAX_DURATION {
        return Err(RequestError::Invalid("duration must be between 1s and 30d".into()));
    }
    Ok(d)
}

impl Requests {
    pub fn new(
        config: Config,
        store: Arc<dyn Store>,
        grants: Arc<Grants>,
        audit: Arc<AuditLog>,
        notifier: Arc<Notifier>,
        clock: SharedClock,
    ) -> Arc<Self> {
        Arc::new(Self {
            config,
            store,
            grants,
            audit,
            notifier,
            clock,
        })
    }

    /// Files a request for access: refused, granted at once (auto or break-glass), or left
    /// pending for approvers.
    pub async fn create(&self, who: &Identity, new: NewRequest) -> Result<Request, RequestError> {
        let reason = text("reason", &new.reason)?;
        let length = duration(new.duration_secs)?;
        let refusal = |text: String| Refused {
            target: new.target.clone(),
            access: new.access,
            length,
            break_glass: new.break_glass,
            reason: reason.clone(),
            refusal: text,
        };
        let Some(target) = TargetName::new(&new.target)
            .ok()
            .and_then(|name| self.config.targets.get(&name).cloned())
        else {
            return Err(self
                .refuse(who, refusal(format!("no target named {:?}", new.target)))
                .await);
        };
        if !target.credentials.contains_key(&new.access) {
            let text = format!("target {} has no credentials for {} access", target.name, new.access);
            return Err(self.refuse(who, refusal(text)).await);
        }
        let ask = Ask {
            user: &who.user,
            roles: &who.roles,
            target: &target,
            access: new.access,
            duration: length,
            break_glass: new.break_glass,
        };
        let decision = self.config.policies.decide(&ask);
        let mut request = self.draft(who, target.name.clone(), new.access, length, reason.clone(), &decision);
        request.break_glass = new.break_glass;
        match decision {
            Decision::Refused { reason: text } => Err(self.refuse(who, refusal(text)).await),
            Decision::NeedsApproval { .. } => self.file(request).await,
            Decision::Auto { policy } => {
                let request = self.file(request).await?;
                self.grant_now(request, format!("approved automatically by policy {policy}"))
                    .await
            }
            Decision::BreakGlass { policy } => {
                self.file_quietly(&request).await?;
                let request = self
                    .grant_now(request, format!("break-glass under policy {policy}"))
                    .await?;
                self.notifier
                    .notify(Notification::break_glass(RequestInfo::of(&request)));
                tracing::warn!(request.id = %request.id, user = %request.user, target = %request.target, "break-glass access granted");
                Ok(request)
            }
        }
    }

    /// Files a request to extend the caller's live grant `grant_id` by `ext.duration_secs`.
    /// The policy sees the time the grant would have left after the extension.
    pub async fn create_extension(
        &self,
        who: &Identity,
        grant_id: &GrantId,
        ext: NewExtension,
    ) -> Result<Request, RequestError> {
        let reason = text("reason", &ext.reason)?;
        let by = duration(ext.duration_secs)?;
        let grant = self
            .grants
            .get(grant_id)
            .filter(|g| g.user == who.user)
            .ok_or_else(|| RequestError::Invalid(format!("you have no active grant {grant_id}")))?;
        let target = self
            .config
            .targets
            .get(&grant.target)
            .cloned()
            .ok_or_else(|| RequestError::Conflict(format!("target {} is no longer configured", grant.target)))?;
        let left = (grant.expires_at + by)
            .duration_since(self.clock.now())
            .unwrap_or_default();
        let ask = Ask {
            user: &who.user,
            roles: &who.roles,
            target: &target,
            access: grant.access,
            duration: left,
            break_glass: false,
        };
        let decision = self.config.policies.decide(&ask);
        let mut request = self.draft(who, grant.target.clone(), grant.access, by, reason, &decision);
        request.extends = Some(grant.id.clone());
        match decision {
            Decision::Refused { reason: refusal } => {
                let text = format!(
                    "extending grant {} to {} from now: {refusal}",
                    grant.id,
                    crate::policy::duration_text(left)
                );
                let refused = Refused {
                    target: grant.target.to_string(),
                    access: grant.access,
                    length: by,
                    break_glass: false,
                    reason: request.reason.clone(),
                    refusal: text,
                };
                Err(self.refuse(who, refused).await)
            }
            Decision::NeedsApproval { .. } => self.file(request).await,
            Decision::Auto { policy } | Decision::BreakGlass { policy } => {
                let request = self.file(request).await?;
                self.grant_now(request, format!("approved automatically by policy {policy}"))
                    .await
            }
        }
    }

    /// A new request in state pending, with the decision's policy and approvers.
    fn draft(
        &self,
        who: &Identity,
        target: TargetName,
        access: AccessLevel,
        length: Duration,
        reason: String,
        decision: &Decision,
    ) -> Request {
        let (policy, approver_roles, approvals_needed) = match decision {
            Decision::Auto { policy } => (policy.clone(), Vec::new(), 0),
            // Nobody approves break-glass access, but the policy's approvers review it.
            Decision::BreakGlass { policy } => {
                let reviewers = match self.config.policies.get(policy).map(|p| &p.approval) {
                    Some(Approval::Approvers { roles, .. }) => roles.clone(),
                    _ => Vec::new(),
                };
                (policy.clone(), reviewers, 0)
            }
            Decision::NeedsApproval {
                policy,
                approvers,
                approvals,
            } => (policy.clone(), approvers.clone(), *approvals),
            Decision::Refused { .. } => (String::new(), Vec::new(), 0),
        };
        let now = crate::grants::whole_millis(self.clock.now());
        Request {
            id: RequestId::generate(),
            state: RequestState::Pending,
            user: who.user.clone(),
            roles: who.roles.clone(),
            target,
            access,
            duration_secs: length.as_secs(),
            reason,
            extends: None,
            break_glass: false,
            policy,
            approvals_needed,
            approver_roles,
            approvals: Vec::new(),
            created_at: now,
            lapses_at: now + self.config.requests.lapse_after,
            decided_at: None,
            decided_by: None,
            note: None,
            grant_id: None,
        }
    }

    /// Audits a refusal and returns it as the error.
    async fn refuse(&self, who: &Identity, r: Refused) -> RequestError {
        let audited = self
            .audit
            .record(AuditEvent::RequestRefused {
                user: who.user.clone(),
                roles: who.roles.clone(),
                target: r.target,
                access: r.access,
                duration_secs: r.length.as_secs(),
                break_glass: r.break_glass,
                reason: r.reason,
                refusal: r.refusal.clone(),
            })
            .await;
        match audited {
            Ok(()) => RequestError::Refused(r.refusal),
            Err(e) => e.into(),
        }
    }

    /// Stores and audits a new request, then tells the webhooks.
    async fn file(&self, request: Request) -> Result<Request, RequestError> {
        self.file_quietly(&request).await?;
        self.notifier
            .notify(Notification::request_created(RequestInfo::of(&request)));
        Ok(request)
    }

    async fn file_quietly(&self, request: &Request) -> Result<(), RequestError> {
        self.store.insert_request(request).await?;
        self.audit
            .record(AuditEvent::RequestCreated {
                request: request.clone(),
            })
            .await?;
        Ok(())
    }

    /// Approves a request just filed (version 1) by policy: creates or extends its grant.
    async fn grant_now(&self, request: Request, note: String) -> Result<Request, RequestError> {
        let by = request.user.clone();
        self.approve_stored(
            Versioned {
                value: request,
                version: 1,
            },
            &by,
            note,
        )
        .await
    }

    /// The last approval came: store the approval together with the grant it makes (or the
    /// extension), then audit, activate and notify. A `Conflict` means the request changed
    /// since it was read.
    async fn approve_stored(
        &self,
        stored: Versioned<Request>,
        by: &UserName,
        note: String,
    ) -> Result<Request, RequestError> {
        let Versioned {
            value: mut request,
            version,
        } = stored;
        let decider = (!request.approvals.is_empty()).then_some(by);
        match request.extends.clone() {
            None => {
                let new = NewGrant {
                    user: request.user.clone(),
                    target: request.target.clone(),
                    access: request.access,
                    duration_secs: request.duration_secs,
                    reason: format!("{} (request {})", request.reason, request.id),
                };
                let length = match Grants::validate(&new, &self.config) {
                    Ok(d) => d,
                    Err(e) => return self.deny_unmakeable(request, version, e).await,
                };
                let grant = self.grants.draft(new, by.clone(), length);
                request.close(RequestState::Approved, decider, note, self.clock.now());
                request.grant_id = Some(grant.id.clone());
                self.store
                    .update_request(&request, version, Some(GrantWrite::Insert(&grant)))
                    .await?;
                self.grants.activate(grant).await?;
                self.record_close(&request).await?;
                Ok(request)
            }
            Some(grant_id) => {
                let Some(grant) = self.grants.get(&grant_id) else {
                    return self.lapse_extension(request, version, &grant_id).await;
                };
                let new_at = match self
                    .grants
                    .extended_end(&grant, Duration::from_secs(request.duration_secs))
                {
                    Ok(at) => at,
                    Err(e) => return self.deny_unmakeable(request, version, e).await,
                };
                request.close(RequestState::Approved, decider, note, self.clock.now());
                request.grant_id = Some(grant_id.clone());
                let extend = GrantWrite::Extend {
                    id: &grant_id,
                    from: grant.expires_at,
                    to: new_at,
                };
                self.store.update_request(&request, version, Some(extend)).await?;
                self.grants.extended(&grant, new_at, by).await?;
                self.record_close(&request).await?;
                Ok(request)
            }
        }
    }

    /// The grant to extend ended before the approval: the request lapses.
    async fn lapse_extension(
        &self,
        mut request: Request,
        version: u64,
        grant_id: &GrantId,
    ) -> Result<Request, RequestError> {
        request.close(
            RequestState::Lapsed,
            None,
            format!("grant {grant_id} ended before the extension was approved"),
            self.clock.now(),
        );
        self.store_close(&request, version).await?;
        Err(RequestError::Conflict(format!(
            "request {} lapsed: grant {grant_id} ended before the extension was approved",
            request.id
        )))
    }

    /// The grant cannot be made (its target lost the level's credentials, say): denied.
    async fn deny_unmakeable(
        &self,
        mut request: Request,
        version: u64,
        e: GrantError,
    ) -> Result<Request, RequestError> {
        request.close(
            RequestState::Denied,
            None,
            format!("the grant could not be made: {e}"),
            self.clock.now(),
        );
        if let Err(error) = self.store_close(&request, version).await {
            tracing::error!(request.id = %request.id, %error, "could not record a failed approval");
        }
        Err(e.into())
    }

    /// Stores (compare-and-set), audits and notifies a request that just left `pending`.
    async fn store_close(&self, request: &Request, version: u64) -> Result<(), RequestError> {
        self.store.update_request(request, version, None).await?;
        self.record_close(request).await
    }

    /// Audits and notifies a request that just left `pending` (already stored).
    async fn record_close(&self, request: &Request) -> Result<(), RequestError> {
        let info = RequestInfo::of(request);
        let request = request.clone();
        let event = match request.state {
            RequestState::Approved => AuditEvent::RequestApproved { request },
            RequestState::Denied => AuditEvent::RequestDenied { request },
            RequestState::Withdrawn => AuditEvent::RequestWithdrawn { request },
            RequestState::Lapsed | RequestState::Pending => AuditEvent::RequestLapsed { request },
        };
        self.audit.record(event).await?;
        self.notifier.notify(Notification::request_decided(info));
        Ok(())
    }

    /// Loads a request whoever asks (approvals and denials then say which role is missing;
    /// ids are random, so this tells a caller nothing they did not send). A pending request
    /// past its lapse time lapses first.
    async fn load_any(&self, id: &RequestId) -> Result<Versioned<Request>, RequestError> {
        for _ in 0..ATTEMPTS {
            let stored = self
                .store
                .request(id)
                .await?
                .ok_or_else(|| RequestError::NotFound(id.clone()))?;
            let request = &stored.value;
            if request.state != RequestState::Pending || request.lapses_at > self.clock.now() {
                return Ok(stored);
            }
            match self.lapse(stored).await {
                Ok(lapsed) => return Ok(lapsed),
                // Decided by someone else meanwhile: read it again.
                Err(RequestError::Store(StoreError::Conflict)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(busy(id))
    }

    /// Loads a request the caller may see.
    async fn load(&self, who: &Identity, id: &RequestId) -> Result<Versioned<Request>, RequestError> {
        let stored = self.load_any(id).await?;
        if self.may_see(who, &stored.value) {
            Ok(stored)
        } else {
            Err(RequestError::NotFound(id.clone()))
        }
    }

    async fn lapse(&self, stored: Versioned<Request>) -> Result<Versioned<Request>, RequestError> {
        let Versioned {
            value: mut request,
            version,
        } = stored;
        let after =
            crate::policy::duration_text(request.lapses_at.duration_since(request.created_at).unwrap_or_default());
        request.close(
            RequestState::Lapsed,
            None,
            format!("not decided within {after}"),
            self.clock.now(),
        );
        let version = self.store.update_request(&request, version, None).await?;
        self.record_close(&request).await?;
        Ok(Versioned {
            value: request,
            version,
        })
    }

    fn pending(request: &Request) -> Result<(), RequestError> {
        match request.state {
            RequestState::Pending => Ok(()),
            state => Err(RequestError::Conflict(format!(
                "request {} is {state}, not pending",
                request.id
            ))),
        }
    }

    /// True when `who` holds one of the roles that decide `request`.
    fn is_approver(who: &Identity, request: &Request) -> bool {
        who.roles.iter().any(|r| request.approver_roles.contains(r))
    }

    /// Admins see every request; others their own and those they may decide.
    fn may_see(&self, who: &Identity, request: &Request) -> bool {
        who.has_role("admin") || request.user == who.user || Self::is_approver(who, request)
    }

    /// The request `id`, if the caller may see it.
    /// A request whoever asks (for the Slack app, which then applies the same rules).
    pub async fn get_any(&self, id: &RequestId) -> Result<Request, RequestError> {
        Ok(self.load_any(id).await?.value)
    }

    pub async fn get(&self, who: &Identity, id: &RequestId) -> Result<Request, RequestError> {
        Ok(self.load(who, id).await?.value)
    }

    /// Requests the caller may see, newest first, at most 500.
    pub async fn list(&self, who: &Identity, filter: &ListFilter) -> Result<Vec<Request>, RequestError> {
        self.lapse_due().await?;
        let query = RequestQuery {
            user: filter.mine.then(|| who.user.clone()),
            state: filter.pending.then_some(RequestState::Pending),
            break_glass: filter.break_glass,
            limit: if who.has_role("admin") || filter.mine {
                LIST_LIMIT
            } else {
                0
            },
        };
        let mut found = self.store.requests(&query).await?;
        found.retain(|r| self.may_see(who, r));
        found.truncate(LIST_LIMIT);
        Ok(found)
    }

    /// Adds the caller's approval; the last one needed creates (or extends) the grant.
    pub async fn approve(
        &self,
        who: &Identity,
        id: &RequestId,
        comment: Option<String>,
    ) -> Result<Request, RequestError> {
        let comment = comment.as_deref().map(|c| text("comment", c)).transpose()?;
        for _ in 0..ATTEMPTS {
            let Versioned {
                value: mut request,
                version,
            } = self.load_any(id).await?;
            self.config
                .policies
                .may_approve(&request.policy, &who.user, &who.roles, &request.user)
                .map_err(RequestError::Forbidden)?;
            Self::pending(&request)?;
            if request.approvals.iter().any(|v| v.by == who.user) {
                return Err(RequestError::Conflict(format!(
                    "{} already approved request {}; it needs another approver",
                    who.user, request.id
                )));
            }
            request.approvals.push(Vote {
                by: who.user.clone(),
                comment: comment.clone(),
                at: self.clock.now(),
            });
            let given = u32::try_from(request.approvals.len()).unwrap_or(u32::MAX);
            let vote = AuditEvent::RequestApproval {
                request_id: request.id.clone(),
                user: request.user.clone(),
                by: who.user.clone(),
                comment: comment.clone(),
                approvals: given,
                approvals_needed: request.approvals_needed,
            };
            if given < request.approvals_needed {
                match self.store.update_request(&request, version, None).await {
                    Ok(_) => {}
                    Err(StoreError::Conflict) => continue,
                    Err(e) => return Err(e.into()),
                }
                self.audit.record(vote).await?;
                self.notifier.progress(RequestInfo::of(&request));
                return Ok(request);
            }
            let approvers: Vec<&str> = request.approvals.iter().map(|v| v.by.as_str()).collect();
            let note = format!("approved by {}", approvers.join(", "));
            let stored = Versioned {
                value: request,
                version,
            };
            match self.approve_stored(stored, &who.user, note).await {
                Err(RequestError::Store(StoreError::Conflict)) => continue,
                Err(e) => return Err(e),
                Ok(request) => {
                    self.audit.record(vote).await?;
                    return Ok(request);
                }
            }
        }
        Err(busy(id))
    }

    /// Denies a pending request. Approvers of its policy may deny; so may admins.
    pub async fn deny(&self, who: &Identity, id: &RequestId, reason: &str) -> Result<Request, RequestError> {
        let reason = text("reason", reason)?;
        for _ in 0..ATTEMPTS {
            let Versioned {
                value: mut request,
                version,
            } = self.load_any(id).await?;
            if !who.has_role("admin") {
                self.config
                    .policies
                    .may_approve(&request.policy, &who.user, &who.roles, &request.user)
                    .map_err(|e| RequestError::Forbidden(e.replace("approve", "decide")))?;
            }
            Self::pending(&request)?;
            request.close(RequestState::Denied, Some(&who.user), reason.clone(), self.clock.now());
            match self.store_close(&request, version).await {
                Err(RequestError::Store(StoreError::Conflict)) => continue,
                other => return other.map(|()| request),
            }
        }
        Err(busy(id))
    }

    /// The requester takes back their pending request.
    pub async fn withdraw(&self, who: &Identity, id: &RequestId) -> Result<Request, RequestError> {
        for _ in 0..ATTEMPTS {
            let Versioned {
                value: mut request,
                version,
            } = self.load(who, id).await?;
            if request.user != who.user {
                return Err(RequestError::Forbidden(format!(
                    "only {} may withdraw request {}",
                    request.user, request.id
                )));
            }
            Self::pending(&request)?;
            request.close(
                RequestState::Withdrawn,
                Some(&who.user),
                "withdrawn by the requester".into(),
                self.clock.now(),
            );
            match self.store_close(&request, version).await {
                Err(RequestError::Store(StoreError::Conflict)) => continue,
                other => return other.map(|()| request),
            }
        }
        Err(busy(id))
    }

    /// Lapses every pending request past its lapse time; returns how many lapsed here.
    pub async fn lapse_due(&self) -> Result<usize, RequestError> {
        let due = self.store.pending_due(self.clock.now()).await?;
        let mut n = 0;
        for stored in due {
            match self.lapse(stored).await {
                Ok(lapsed) => {
                    n += 1;
                    tracing::info!(request.id = %lapsed.value.id, user = %lapsed.value.user, "request lapsed");
                }
                // Decided by someone else just now.
                Err(RequestError::Store(StoreError::Conflict)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }

    /// Lapses overdue requests once a second until `shutdown`.
    pub async fn run_lapser(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            if let Err(error) = self.lapse_due().await {
                tracing::error!(%error, "could not lapse overdue requests");
            }
        }
    }
}

/// A refusal to audit: what was asked, and why not.
struct Refused {
    target: String,
    access: AccessLevel,
    length: Duration,
    break_glass: bool,
    reason: String,
    refusal: String,
}

/// The request kept changing under the caller.
fn busy(id: &RequestId) -> RequestError {
    RequestError::Conflict(format!(
        "request {id} is being changed by someone else at the same time; try again"
    ))
}
