//! Access requests: the just-in-time workflow. An engineer asks for one access level to one
//! target for a bounded time with a reason ([`NewRequest`]), or for more time on a live grant
//! ([`NewExtension`]); the policies ([`crate::policy`]) decide whether that is granted at once,
//! needs approvals, or is refused; approvers approve or deny; the requester may withdraw; a
//! request nobody decides lapses.
//!
//! States: `pending` → `approved` (a grant was created or extended), `denied`, `withdrawn` or
//! `lapsed`. Refused requests are never stored: the caller gets the reason at once and the
//! audit log gets a `request.refused` record. Every change is stored (SQLite), audited and
//! notified; changes are serialised by one lock, so two approvals cannot both be the last.
//! Grants come from [`Grants`]; this module only decides when to create or extend one.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::audit::{AuditError, AuditEvent, AuditLog};
use crate::config::Config;
use crate::grants::{GrantError, Grants};
use crate::model::{
    AccessLevel, GrantId, ListFilter, NewExtension, NewGrant, NewRequest, Request, RequestId, RequestState, TargetName,
    UserName, Vote,
};
use crate::notify::{Notification, Notifier, RequestInfo};
use crate::pki::Identity;
use crate::policy::{Approval, Ask, Decision};
use crate::store::{RequestQuery, RequestStore, StoreError};

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
    store: Arc<dyn RequestStore>,
    grants: Arc<Grants>,
    audit: Arc<AuditLog>,
    notifier: Arc<Notifier>,
    /// Serialises every change, so a decision is made on the request as stored.
    lock: Mutex<()>,
}

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
        store: Arc<dyn RequestStore>,
        grants: Arc<Grants>,
        audit: Arc<AuditLog>,
        notifier: Arc<Notifier>,
    ) -> Arc<Self> {
        Arc::new(Self {
            config,
            store,
            grants,
            audit,
            notifier,
            lock: Mutex::new(()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Files a request for access: refused, granted at once (auto or break-glass), or left
    /// pending for approvers.
    pub fn create(&self, who: &Identity, new: NewRequest) -> Result<Request, RequestError> {
        let reason = text("reason", &new.reason)?;
        let length = duration(new.duration_secs)?;
        let _guard = self.lock();
        let refuse =
            |refusal: String| self.refuse(who, &new.target, new.access, length, new.break_glass, &reason, refusal);
        let Some(target) = TargetName::new(&new.target)
            .ok()
            .and_then(|name| self.config.targets.get(&name).cloned())
        else {
            return Err(refuse(format!("no target named {:?}", new.target)));
        };
        if !target.credentials.contains_key(&new.access) {
            return Err(refuse(format!(
                "target {} has no credentials for {} access",
                target.name, new.access
            )));
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
            Decision::Refused { reason: refusal } => Err(refuse(refusal)),
            Decision::NeedsApproval { .. } => self.file(request),
            Decision::Auto { policy } => {
                self.file(request.clone())?;
                self.grant_now(request, format!("approved automatically by policy {policy}"))
            }
            Decision::BreakGlass { policy } => {
                self.file_quietly(&request)?;
                let request = self.grant_now(request, format!("break-glass under policy {policy}"))?;
                self.notifier
                    .notify(Notification::break_glass(RequestInfo::of(&request)));
                tracing::warn!(request.id = %request.id, user = %request.user, target = %request.target, "break-glass access granted");
                Ok(request)
            }
        }
    }

    /// Files a request to extend the caller's live grant `grant_id` by `ext.duration_secs`.
    /// The policy sees the time the grant would have left after the extension.
    pub fn create_extension(
        &self,
        who: &Identity,
        grant_id: &GrantId,
        ext: NewExtension,
    ) -> Result<Request, RequestError> {
        let reason = text("reason", &ext.reason)?;
        let by = duration(ext.duration_secs)?;
        let _guard = self.lock();
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
            .duration_since(SystemTime::now())
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
            Decision::Refused { reason: refusal } => Err(self.refuse(
                who,
                grant.target.as_str(),
                grant.access,
                by,
                false,
                &request.reason,
                format!(
                    "extending grant {} to {} from now: {refusal}",
                    grant.id,
                    crate::policy::duration_text(left)
                ),
            )),
            Decision::NeedsApproval { .. } => self.file(request),
            Decision::Auto { policy } | Decision::BreakGlass { policy } => {
                self.file(request.clone())?;
                self.grant_now(request, format!("approved automatically by policy {policy}"))
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
        let now = SystemTime::now();
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
    #[allow(clippy::too_many_arguments)]
    fn refuse(
        &self,
        who: &Identity,
        target: &str,
        access: AccessLevel,
        length: Duration,
        break_glass: bool,
        reason: &str,
        refusal: String,
    ) -> RequestError {
        let audited = self.audit.record(AuditEvent::RequestRefused {
            user: who.user.clone(),
            roles: who.roles.clone(),
            target: target.to_owned(),
            access,
            duration_secs: length.as_secs(),
            break_glass,
            reason: reason.to_owned(),
            refusal: refusal.clone(),
        });
        match audited {
            Ok(()) => RequestError::Refused(refusal),
            Err(e) => e.into(),
        }
    }

    /// Stores and audits a new request, then tells the webhooks.
    fn file(&self, request: Request) -> Result<Request, RequestError> {
        self.file_quietly(&request)?;
        self.notifier
            .notify(Notification::request_created(RequestInfo::of(&request)));
        Ok(request)
    }

    fn file_quietly(&self, request: &Request) -> Result<(), RequestError> {
        self.store.insert_request(request)?;
        self.audit.record(AuditEvent::RequestCreated {
            request: request.clone(),
        })?;
        Ok(())
    }

    /// Creates (or extends) the grant of a filed request and marks it approved. `request` is
    /// stored as pending; if the grant cannot be made it ends denied with the error as note.
    fn grant_now(&self, mut request: Request, note: String) -> Result<Request, RequestError> {
        let by = request.user.clone();
        self.approve_filed(&mut request, &by, note)?;
        Ok(request)
    }

    /// The last approval came: create the grant (or extend it), then store, audit and notify
    /// the decision.
    fn approve_filed(&self, request: &mut Request, by: &UserName, note: String) -> Result<(), RequestError> {
        let granted = match &request.extends {
            Some(grant_id) => self
                .grants
                .extend(grant_id, Duration::from_secs(request.duration_secs), by)
                .map(|g| g.id),
            None => self
                .grants
                .create(
                    NewGrant {
                        user: request.user.clone(),
                        target: request.target.clone(),
                        access: request.access,
                        duration_secs: request.duration_secs,
                        reason: format!("{} (request {})", request.reason, request.id),
                    },
                    by.clone(),
                    &self.config,
                )
                .map(|g| g.id),
        };
        match granted {
            Ok(grant_id) => {
                let decider = (!request.approvals.is_empty()).then_some(by);
                request.close(RequestState::Approved, decider, note);
                request.grant_id = Some(grant_id);
                self.record_close(request)
            }
            Err(GrantError::NotFound(grant_id)) => {
                request.close(
                    RequestState::Lapsed,
                    None,
                    format!("grant {grant_id} ended before the extension was approved"),
                );
                self.record_close(request)?;
                Err(RequestError::Conflict(format!(
                    "request {} lapsed: grant {grant_id} ended before the extension was approved",
                    request.id
                )))
            }
            Err(e) => {
                request.close(RequestState::Denied, None, format!("the grant could not be made: {e}"));
                if let Err(error) = self.record_close(request) {
                    tracing::error!(request.id = %request.id, %error, "could not record a failed approval");
                }
                Err(e.into())
            }
        }
    }

    /// Stores, audits and notifies a request that just left `pending`.
    fn record_close(&self, request: &Request) -> Result<(), RequestError> {
        self.store.update_request(request)?;
        let request = request.clone();
        let info = RequestInfo::of(&request);
        let event = match request.state {
            RequestState::Approved => AuditEvent::RequestApproved { request },
            RequestState::Denied => AuditEvent::RequestDenied { request },
            RequestState::Withdrawn => AuditEvent::RequestWithdrawn { request },
            RequestState::Lapsed | RequestState::Pending => AuditEvent::RequestLapsed { request },
        };
        self.audit.record(event)?;
        self.notifier.notify(Notification::request_decided(info));
        Ok(())
    }

    /// Loads a request the caller may see; a pending request past its lapse time lapses first.
    fn load(&self, who: &Identity, id: &RequestId) -> Result<Request, RequestError> {
        let request = self.load_any(id)?;
        if self.may_see(who, &request) {
            Ok(request)
        } else {
            Err(RequestError::NotFound(id.clone()))
        }
    }

    /// Loads a request whoever asks (approvals and denials then say which role is missing;
    /// ids are random, so this tells a caller nothing they did not send).
    fn load_any(&self, id: &RequestId) -> Result<Request, RequestError> {
        let mut request = self
            .store
            .request(id)?
            .ok_or_else(|| RequestError::NotFound(id.clone()))?;
        if request.state == RequestState::Pending && request.lapses_at <= SystemTime::now() {
            self.lapse(&mut request)?;
        }
        Ok(request)
    }

    fn lapse(&self, request: &mut Request) -> Result<(), RequestError> {
        let after =
            crate::policy::duration_text(request.lapses_at.duration_since(request.created_at).unwrap_or_default());
        request.close(RequestState::Lapsed, None, format!("not decided within {after}"));
        self.record_close(request)
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
    pub fn get(&self, who: &Identity, id: &RequestId) -> Result<Request, RequestError> {
        let _guard = self.lock();
        self.load(who, id)
    }

    /// Requests the caller may see, newest first, at most 500.
    pub fn list(&self, who: &Identity, filter: &ListFilter) -> Result<Vec<Request>, RequestError> {
        let _guard = self.lock();
        self.lapse_due_locked()?;
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
        let mut found = self.store.requests(&query)?;
        found.retain(|r| self.may_see(who, r));
        found.truncate(LIST_LIMIT);
        Ok(found)
    }

    /// Adds the caller's approval; the last one needed creates (or extends) the grant.
    pub fn approve(&self, who: &Identity, id: &RequestId, comment: Option<String>) -> Result<Request, RequestError> {
        let comment = comment.as_deref().map(|c| text("comment", c)).transpose()?;
        let _guard = self.lock();
        let mut request = self.load_any(id)?;
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
            at: SystemTime::now(),
        });
        let given = u32::try_from(request.approvals.len()).unwrap_or(u32::MAX);
        self.audit.record(AuditEvent::RequestApproval {
            request_id: request.id.clone(),
            user: request.user.clone(),
            by: who.user.clone(),
            comment,
            approvals: given,
            approvals_needed: request.approvals_needed,
        })?;
        if given < request.approvals_needed {
            self.store.update_request(&request)?;
            return Ok(request);
        }
        let approvers: Vec<&str> = request.approvals.iter().map(|v| v.by.as_str()).collect();
        let note = format!("approved by {}", approvers.join(", "));
        self.approve_filed(&mut request, &who.user, note)?;
        Ok(request)
    }

    /// Denies a pending request. Approvers of its policy may deny; so may admins.
    pub fn deny(&self, who: &Identity, id: &RequestId, reason: &str) -> Result<Request, RequestError> {
        let reason = text("reason", reason)?;
        let _guard = self.lock();
        let mut request = self.load_any(id)?;
        if !who.has_role("admin") {
            self.config
                .policies
                .may_approve(&request.policy, &who.user, &who.roles, &request.user)
                .map_err(|e| RequestError::Forbidden(e.replace("approve", "decide")))?;
        }
        Self::pending(&request)?;
        request.close(RequestState::Denied, Some(&who.user), reason);
        self.record_close(&request)?;
        Ok(request)
    }

    /// The requester takes back their pending request.
    pub fn withdraw(&self, who: &Identity, id: &RequestId) -> Result<Request, RequestError> {
        let _guard = self.lock();
        let mut request = self.load(who, id)?;
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
        );
        self.record_close(&request)?;
        Ok(request)
    }

    /// Lapses every pending request past its lapse time; returns how many.
    pub fn lapse_due(&self) -> Result<usize, RequestError> {
        let _guard = self.lock();
        self.lapse_due_locked()
    }

    fn lapse_due_locked(&self) -> Result<usize, RequestError> {
        let due = self.store.pending_due(SystemTime::now())?;
        let n = due.len();
        for mut request in due {
            self.lapse(&mut request)?;
            tracing::info!(request.id = %request.id, user = %request.user, "request lapsed");
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
            let this = Arc::clone(&self);
            match tokio::task::spawn_blocking(move || this.lapse_due()).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => tracing::error!(%error, "could not lapse overdue requests"),
                Err(error) => tracing::error!(%error, "request lapser failed"),
            }
        }
    }
}
