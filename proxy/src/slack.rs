//! Approvals in Slack. A pending request whose policy names a `slack_channel` is posted there
//! as a Block Kit message with Approve and Deny buttons (or, with `approve_in_chat = false`,
//! a link to the console); clicks come back to `POST /v1/slack/interactions` on the API
//! listener, which verifies Slack's signature (`X-Slack-Signature`, HMAC-SHA256 of
//! `v0:TIMESTAMP:BODY` with the signing secret), refuses timestamps more than 5 minutes away
//! and payloads seen before, maps the Slack user to a jitgate identity through a link, and
//! decides by the same rules as the API ([`Requests::approve`], [`Requests::deny`]). The
//! message is then updated in place with the outcome.
//!
//! Links: `jitgate slack link SLACK_USER_ID` (with the user's certificate) makes the bot send
//! that Slack user a direct message with a Confirm button; only that Slack user's click (a
//! signed interaction) stores the link, so neither side can claim the other alone. The
//! button's value is sealed (HMAC under a key derived from the signing secret), so any
//! replica can finish it.
//!
//! Calls to Slack go through a queue and one worker, in order, retried with the webhooks'
//! backoff; nothing here ever makes a request's decision wait for Slack.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::audit::{AuditEvent, AuditLog};
use crate::config::SlackConfig;
use crate::login::http::Http;
use crate::login::{lock, unix};
use crate::model::{RequestId, Role, SlackLink, UserName};
use crate::notify::{EventKind, Notification, NotificationData, RequestInfo};
use crate::pki::Identity;
use crate::policy::Policies;
use crate::requests::{RequestError, Requests};
use crate::store::Store;

#[cfg(test)]
mod tests;

/// Interactions whose timestamp is further than this from now are refused.
pub const MAX_SKEW: Duration = Duration::from_secs(300);
/// Calls to Slack that may wait; more are dropped (and logged).
const QUEUE_SIZE: usize = 1024;
/// Attempts per call to Slack before it is given up.
const ATTEMPTS: u32 = 5;
/// How long a link confirmation button works.
const LINK_CONFIRM_TTL: Duration = Duration::from_secs(15 * 60);

/// Why an interaction was refused before it reached the request rules.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("missing X-Slack-Request-Timestamp or X-Slack-Signature")]
    Unsigned,
    #[error("the timestamp is more than 5 minutes away from now")]
    Stale,
    #[error("the signature does not verify")]
    BadSignature,
    #[error("this payload was received before (a replay)")]
    Replayed,
    #[error("unreadable payload: {0}")]
    Unreadable(String),
}

/// Verifies Slack's request signature: `v0=hex(HMAC-SHA256(secret, "v0:" ts ":" body))`,
/// with `ts` (Unix seconds) within [`MAX_SKEW`] of `now`.
pub fn verify(secret: &[u8], ts: &str, signature: &str, body: &[u8], now: SystemTime) -> Result<(), Refusal> {
    let ts_secs: i64 = ts.trim().parse().map_err(|_| Refusal::Stale)?;
    let now_secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    if ts_secs.abs_diff(now_secs) > MAX_SKEW.as_secs() {
        return Err(Refusal::Stale);
    }
    let expected = sign(secret, ts.trim(), body);
    if crate::login::ct_eq(expected.as_bytes(), signature.trim().as_bytes()) {
        Ok(())
    } else {
        Err(Refusal::BadSignature)
    }
}

/// The `X-Slack-Signature` of `body` sent at `ts`.
pub fn sign(secret: &[u8], ts: &str, body: &[u8]) -> String {
    let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(secret) else {
        return String::new();
    };
    mac.update(b"v0:");
    mac.update(ts.as_bytes());
    mac.update(b":");
    mac.update(body);
    format!("v0={}", crate::agents::hex(&mac.finalize().into_bytes()))
}

/// Escapes text for Slack's mrkdwn (`&`, `<`, `>`), so user text cannot mention or link.
pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn human(secs: u64) -> String {
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

/// The message of a request: what is asked, and the buttons while it is pending.
pub fn request_message(r: &RequestInfo, approve_in_chat: bool, console_url: Option<&str>) -> Value {
    let summary = format!(
        "*{}* requests *{}* access to *{}* for {}",
        escape(r.user.as_str()),
        r.access,
        escape(r.target.as_str()),
        human(r.duration_secs)
    );
    let quoted: String = r.reason.lines().map(|l| format!(">{}\n", escape(l))).collect();
    let (given, needed) = r.approvals;
    let status = match r.state.as_str() {
        "pending" => format!("Pending: {given} of {needed} approvals"),
        "approved" => match &r.decided_by {
            Some(by) => format!(":white_check_mark: Approved by {}", escape(by.as_str())),
            None => ":white_check_mark: Approved".to_owned(),
        },
        "denied" => match &r.decided_by {
            Some(by) => format!(":no_entry: Denied by {}", escape(by.as_str())),
            None => ":no_entry: Denied".to_owned(),
        },
        "withdrawn" => "Withdrawn by the requester".to_owned(),
        "lapsed" => "Lapsed: nobody decided in time".to_owned(),
        other => escape(other),
    };
    let mut blocks = vec![
        json!({"type": "section", "text": {"type": "mrkdwn", "text": format!("{summary}\n{quoted}")}}),
        json!({"type": "context", "elements": [{"type": "mrkdwn",
            "text": format!("{status} · request `{}` · policy `{}`", escape(&r.id), escape(&r.policy))}]}),
    ];
    if r.state == "pending" {
        if approve_in_chat {
            blocks.push(json!({"type": "actions", "block_id": "jitgate-decide", "elements": [
                {"type": "button", "action_id": "approve", "style": "primary",
                 "text": {"type": "plain_text", "text": "Approve"}, "value": r.id},
                {"type": "button", "action_id": "deny", "style": "danger",
                 "text": {"type": "plain_text", "text": "Deny"}, "value": r.id},
            ]}));
        } else {
            match console_url {
                Some(base) => blocks.push(json!({"type": "actions", "block_id": "jitgate-open", "elements": [
                    {"type": "button", "action_id": "open",
                     "text": {"type": "plain_text", "text": "Review in the console"},
                     "url": format!("{base}/#/requests/{}", r.id)},
                ]})),
                None => blocks.push(json!({"type": "context", "elements": [{"type": "mrkdwn",
                    "text": format!("Decide with `jitgate approve {}`", escape(&r.id))}]})),
            }
        }
    }
    let text = format!("{} requests {} access to {} ({status})", r.user, r.access, r.target);
    json!({"text": text, "blocks": blocks})
}

/// What a link confirmation button carries, sealed.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct LinkOffer {
    user: UserName,
    roles: Vec<Role>,
    slack_user: String,
    /// Unix seconds.
    expires: u64,
}

/// One call to Slack the worker makes.
#[derive(Debug)]
enum Job {
    /// Post a new request to its policy's channel.
    Post(RequestInfo),
    /// Update the request's message, where this replica knows it.
    Update(RequestInfo),
    /// A message only `user` sees in `channel`.
    Ephemeral {
        channel: String,
        user: String,
        text: String,
    },
    /// The link confirmation, by direct message.
    LinkOffer {
        slack_user: String,
        user: UserName,
        value: String,
    },
}

/// What the interaction endpoint answers (Slack ignores the body; tests and logs read it).
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Outcome {
    pub ok: bool,
    pub text: String,
}

/// The Slack app of this proxy.
pub struct Slack {
    config: Arc<SlackConfig>,
    policies: Arc<Policies>,
    store: Arc<dyn Store>,
    audit: Arc<AuditLog>,
    http: Http,
    queue: mpsc::Sender<Job>,
    sealer: crate::seal::Sealer,
    /// Request ID to (channel, ts) of its message, as posted or clicked here.
    messages: Mutex<HashMap<String, (String, String)>>,
    /// Signatures of interactions received in the last [`MAX_SKEW`] (twice, for both sides
    /// of now): a signed payload is acted on once.
    seen: Mutex<HashMap<String, SystemTime>>,
}

/// The fields of a `block_actions` payload jitgate reads.
#[derive(Debug, Deserialize)]
struct Payload {
    #[serde(rename = "type")]
    kind: String,
    user: PayloadUser,
    #[serde(default)]
    team: Option<PayloadTeam>,
    #[serde(default)]
    channel: Option<PayloadChannel>,
    #[serde(default)]
    container: Option<PayloadContainer>,
    #[serde(default)]
    actions: Vec<PayloadAction>,
}

#[derive(Debug, Deserialize)]
struct PayloadUser {
    id: String,
    #[serde(default)]
    team_id: Option<String>,
}

#[derive(Debug, Deserialize)]
struct PayloadTeam {
    id: String,
}

#[derive(Debug, Deserialize)]
struct PayloadChannel {
    id: String,
}

#[derive(Debug, Deserialize)]
struct PayloadContainer {
    #[serde(default)]
    message_ts: Option<String>,
    #[serde(default)]
    channel_id: Option<String>,
}

#[derive(Debug, Deserialize)]
struct PayloadAction {
    action_id: String,
    #[serde(default)]
    value: Option<String>,
}

impl Slack {
    /// The app, and its worker started on `tracker`.
    pub fn start(
        config: Arc<SlackConfig>,
        policies: Arc<Policies>,
        store: Arc<dyn Store>,
        audit: Arc<AuditLog>,
        tracker: &tokio_util::task::TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<Arc<Slack>, String> {
        let http = Http::new(None).map_err(|e| e.to_string())?;
        let (queue, jobs) = mpsc::channel(QUEUE_SIZE);
        let secret = config.signing_secret.clone().unwrap_or_default();
        let sealer = {
            let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()) else {
                return Err("the signing secret is unusable".into());
            };
            mac.update(b"jitgate slack link offer v1");
            crate::seal::Sealer::new(&mac.finalize().into_bytes())
        };
        let slack = Arc::new(Slack {
            config,
            policies,
            store,
            audit,
            http,
            queue,
            sealer,
            messages: Mutex::new(HashMap::new()),
            seen: Mutex::new(HashMap::new()),
        });
        tracker.spawn(Arc::clone(&slack).run(jobs, shutdown));
        Ok(slack)
    }

    /// Called by the notifier for every notification: queues the Slack side. Never waits.
    pub fn notify(&self, n: &Notification) {
        let NotificationData::Request(info) = &n.data else {
            return;
        };
        let job = match n.kind {
            EventKind::RequestCreated if info.state == "pending" => Job::Post(info.clone()),
            EventKind::RequestDecided => Job::Update(info.clone()),
            _ => return,
        };
        self.enqueue(job);
    }

    /// A pending request's approvals changed: the message shows the new count.
    pub fn progress(&self, info: RequestInfo) {
        self.enqueue(Job::Update(info));
    }

    fn enqueue(&self, job: Job) {
        if let Err(e) = self.queue.try_send(job) {
            tracing::warn!(error = %e, "slack: call dropped (queue full or shutting down)");
        }
    }

    fn channel_of(&self, policy: &str) -> Option<(&str, bool)> {
        let p = self.policies.get(policy)?;
        Some((p.slack_channel.as_deref()?, p.approve_in_chat))
    }

    async fn run(self: Arc<Self>, mut jobs: mpsc::Receiver<Job>, shutdown: CancellationToken) {
        loop {
            let job = tokio::select! {
                () = shutdown.cancelled() => return,
                job = jobs.recv() => match job {
                    Some(j) => j,
                    None => return,
                },
            };
            let mut failed = 0;
            loop {
                let attempt = tokio::select! {
                    () = shutdown.cancelled() => return,
                    r = self.perform(&job) => r,
                };
                match attempt {
                    Ok(()) => break,
                    Err(Failure::Final(e)) => {
                        tracing::warn!(error = %e, ?job, "slack: call refused, not retried");
                        break;
                    }
                    Err(Failure::Retry(e)) => {
                        failed += 1;
                        if failed >= ATTEMPTS {
                            tracing::warn!(error = %e, ?job, "slack: call failed, given up");
                            break;
                        }
                        tokio::select! {
                            () = shutdown.cancelled() => return,
                            () = tokio::time::sleep(crate::notify::backoff(failed)) => {}
                        }
                    }
                }
            }
        }
    }

    async fn call(&self, method: &str, body: Value) -> Result<Value, Failure> {
        let url = format!("{}/{method}", self.config.api_url);
        let token = self.config.bot_token.as_deref().unwrap_or_default();
        let answer: Value = self
            .http
            .post_json_bearer(&url, token, &body)
            .await
            .map_err(|e| match &e {
                crate::login::http::HttpError::Status { status, .. } if *status < 500 && *status != 429 => {
                    Failure::Final(e.to_string())
                }
                _ => Failure::Retry(e.to_string()),
            })?;
        if answer.get("ok").and_then(Value::as_bool) == Some(true) {
            return Ok(answer);
        }
        let error = answer.get("error").and_then(Value::as_str).unwrap_or("unknown error");
        match error {
            "ratelimited" | "internal_error" | "fatal_error" | "service_unavailable" | "request_timeout" => {
                Err(Failure::Retry(format!("{method}: {error}")))
            }
            _ => Err(Failure::Final(format!("{method}: {error}"))),
        }
    }

    async fn perform(&self, job: &Job) -> Result<(), Failure> {
        match job {
            Job::Post(info) => {
                let Some((channel, in_chat)) = self.channel_of(&info.policy) else {
                    return Ok(());
                };
                let mut body = request_message(info, in_chat, self.config.console_url.as_deref());
                body["channel"] = json!(channel);
                let answer = self.call("chat.postMessage", body).await?;
                let posted_in = answer.get("channel").and_then(Value::as_str).unwrap_or(channel);
                if let Some(ts) = answer.get("ts").and_then(Value::as_str) {
                    lock(&self.messages).insert(info.id.clone(), (posted_in.to_owned(), ts.to_owned()));
                }
                Ok(())
            }
            Job::Update(info) => {
                let Some((_, in_chat)) = self.channel_of(&info.policy) else {
                    return Ok(());
                };
                let Some((channel, ts)) = lock(&self.messages).get(&info.id).cloned() else {
                    return Ok(());
                };
                let mut body = request_message(info, in_chat, self.config.console_url.as_deref());
                body["channel"] = json!(channel);
                body["ts"] = json!(ts);
                self.call("chat.update", body).await?;
                if info.state != "pending" {
                    lock(&self.messages).remove(&info.id);
                }
                Ok(())
            }
            Job::Ephemeral { channel, user, text } => {
                let body = json!({"channel": channel, "user": user, "text": text});
                self.call("chat.postEphemeral", body).await.map(drop)
            }
            Job::LinkOffer {
                slack_user,
                user,
                value,
            } => {
                let text = format!(
                    "jitgate user *{}* asked to link this Slack account. Approvals you click in Slack will then act as {}.",
                    escape(user.as_str()),
                    escape(user.as_str())
                );
                let body = json!({"channel": slack_user, "text": text, "blocks": [
                    {"type": "section", "text": {"type": "mrkdwn", "text": text}},
                    {"type": "actions", "block_id": "jitgate-link", "elements": [
                        {"type": "button", "action_id": "link", "style": "primary",
                         "text": {"type": "plain_text", "text": "Confirm the link"}, "value": value},
                    ]},
                ]});
                self.call("chat.postMessage", body).await.map(drop)
            }
        }
    }

    /// `POST /v1/slack/links`: offers `slack_user` a link to the caller (a DM to confirm).
    pub fn offer_link(&self, who: &Identity, slack_user: &str) -> Result<(), String> {
        let valid = !slack_user.is_empty()
            && slack_user.len() <= 32
            && slack_user.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit());
        if !valid {
            return Err(format!(
                "{slack_user:?} is not a Slack user ID (like U0123ABCD: in Slack, your profile's ⋮ menu, Copy member ID)"
            ));
        }
        let offer = LinkOffer {
            user: who.user.clone(),
            roles: who.roles.clone(),
            slack_user: slack_user.to_owned(),
            expires: unix(SystemTime::now() + LINK_CONFIRM_TTL),
        };
        let value = self.seal(&offer);
        self.enqueue(Job::LinkOffer {
            slack_user: slack_user.to_owned(),
            user: who.user.clone(),
            value,
        });
        Ok(())
    }

    fn seal(&self, offer: &LinkOffer) -> String {
        self.sealer.seal(offer)
    }

    fn unseal(&self, value: &str) -> Option<LinkOffer> {
        self.sealer.unseal(value)
    }

    /// Remembers `signature` as used; false when it was seen already.
    fn first_time(&self, signature: &str, now: SystemTime) -> bool {
        let mut seen = lock(&self.seen);
        seen.retain(|_, until| *until > now);
        seen.insert(signature.to_owned(), now + 2 * MAX_SKEW).is_none()
    }

    /// `POST /v1/slack/interactions`: the signature, then the action. `Err` is a refusal
    /// before any action (answered 401); `Ok` carries what the action did or why the rules
    /// refused it (answered 200, as Slack wants, and said to the user ephemerally).
    pub async fn interaction(
        &self,
        requests: &Requests,
        timestamp: Option<&str>,
        signature: Option<&str>,
        body: &[u8],
    ) -> Result<Outcome, Refusal> {
        let now = SystemTime::now();
        let (Some(ts), Some(sig)) = (timestamp, signature) else {
            return Err(self.refused(None, None, None, Refusal::Unsigned));
        };
        let secret = self.config.signing_secret.as_deref().unwrap_or_default();
        if let Err(r) = verify(secret.as_bytes(), ts, sig, body, now) {
            return Err(self.refused(None, None, None, r));
        }
        if !self.first_time(sig.trim(), now) {
            return Err(self.refused(None, None, None, Refusal::Replayed));
        }
        let payload = form_payload(body).map_err(|e| self.refused(None, None, None, Refusal::Unreadable(e)))?;
        let p: Payload = serde_json::from_str(&payload)
            .map_err(|e| self.refused(None, None, None, Refusal::Unreadable(e.to_string())))?;
        let slack_user = p.user.id.clone();
        let Some(team) = p.team.as_ref().map(|t| t.id.clone()).or_else(|| p.user.team_id.clone()) else {
            return Err(self.refused(Some(&slack_user), None, None, Refusal::Unreadable("no team".into())));
        };
        let channel = p
            .channel
            .as_ref()
            .map(|c| c.id.clone())
            .or_else(|| p.container.as_ref().and_then(|c| c.channel_id.clone()));
        if p.kind != "block_actions" {
            return Ok(Outcome {
                ok: false,
                text: format!("jitgate does not handle {:?} interactions", p.kind),
            });
        }
        let Some(action) = p.actions.first() else {
            return Err(self.refused(Some(&slack_user), None, None, Refusal::Unreadable("no action".into())));
        };
        let value = action.value.clone().unwrap_or_default();
        let outcome = match action.action_id.as_str() {
            "link" => self.confirm_link(&team, &slack_user, &value, now).await,
            "approve" | "deny" => {
                if let (Some(ch), Some(ts)) = (&channel, p.container.as_ref().and_then(|c| c.message_ts.clone())) {
                    lock(&self.messages).insert(value.clone(), (ch.clone(), ts));
                }
                self.decide(requests, &team, &slack_user, &action.action_id, &value, now)
                    .await
            }
            "open" => Outcome {
                ok: true,
                text: String::new(),
            },
            other => Outcome {
                ok: false,
                text: format!("unknown action {other:?}"),
            },
        };
        if !outcome.ok {
            if let Some(ch) = channel {
                self.enqueue(Job::Ephemeral {
                    channel: ch,
                    user: slack_user,
                    text: outcome.text.clone(),
                });
            }
        }
        Ok(outcome)
    }

    async fn confirm_link(&self, team: &str, slack_user: &str, value: &str, now: SystemTime) -> Outcome {
        let refuse = |text: String| Outcome { ok: false, text };
        let Some(offer) = self.unseal(value) else {
            return refuse(self.refused_text(Some(slack_user), None, None, "the link button is not one jitgate made"));
        };
        if offer.slack_user != slack_user {
            return refuse(self.refused_text(
                Some(slack_user),
                Some(&offer.user),
                None,
                "the link was offered to another Slack user",
            ));
        }
        if offer.expires <= unix(now) {
            return refuse(self.refused_text(
                Some(slack_user),
                Some(&offer.user),
                None,
                "the link offer expired: run jitgate slack link again",
            ));
        }
        let link = SlackLink {
            slack_user: slack_user.to_owned(),
            team: team.to_owned(),
            user: offer.user.clone(),
            roles: offer.roles.clone(),
            linked_at: now,
            expires_at: now + self.config.link_ttl,
        };
        if let Err(e) = self.store.upsert_slack_link(&link).await {
            return refuse(format!("the link could not be stored: {e}"));
        }
        let recorded = self
            .audit
            .record(AuditEvent::SlackLinked {
                user: link.user.clone(),
                roles: link.roles.clone(),
                team: link.team.clone(),
                slack_user: link.slack_user.clone(),
                expires_at: link.expires_at,
            })
            .await;
        if let Err(e) = recorded {
            return refuse(format!("the audit log: {e}"));
        }
        Outcome {
            ok: true,
            text: format!("linked to jitgate user {}", link.user),
        }
    }

    async fn decide(
        &self,
        requests: &Requests,
        team: &str,
        slack_user: &str,
        action: &str,
        request_id: &str,
        now: SystemTime,
    ) -> Outcome {
        let refuse = |text: String| Outcome { ok: false, text };
        let rid = Some(request_id);
        let link = match self.store.slack_link(team, slack_user).await {
            Ok(Some(l)) if l.expires_at > now => l,
            Ok(Some(_)) => {
                return refuse(self.refused_text(
                    Some(slack_user),
                    None,
                    rid,
                    "this Slack account's link to jitgate expired: run jitgate slack link again",
                ))
            }
            Ok(None) => {
                return refuse(self.refused_text(
                    Some(slack_user),
                    None,
                    rid,
                    &format!("this Slack account is not linked to a jitgate user: run jitgate slack link {slack_user}"),
                ))
            }
            Err(e) => return refuse(format!("the store: {e}")),
        };
        let who = Identity {
            user: link.user.clone(),
            roles: link.roles.clone(),
            not_after: link.expires_at,
            enrolled_until: None,
        };
        let id = RequestId::from_string(request_id.to_owned());
        // Buttons exist only where the policy decides in chat; a click on an old message of a
        // policy changed since is refused the same way.
        if let Ok(r) = requests.get_any(&id).await {
            if self.policies.get(&r.policy).is_some_and(|p| !p.approve_in_chat) {
                return refuse(self.refused_text(
                    Some(slack_user),
                    Some(&who.user),
                    rid,
                    &format!("policy {} is decided in the console, not in chat", r.policy),
                ));
            }
        }
        let result = match action {
            "approve" => requests.approve(&who, &id, Some("in Slack".into())).await,
            _ => requests.deny(&who, &id, "denied in Slack").await,
        };
        match result {
            Ok(r) => {
                let text = match r.state.as_str() {
                    "pending" => format!(
                        "your approval of {} is recorded: {} of {}",
                        r.id,
                        r.approvals.len(),
                        r.approvals_needed
                    ),
                    state => format!("request {} {state} by {}", r.id, who.user),
                };
                Outcome { ok: true, text }
            }
            Err(e) => {
                let text = match &e {
                    RequestError::Forbidden(m) | RequestError::Conflict(m) | RequestError::Invalid(m) => m.clone(),
                    other => other.to_string(),
                };
                refuse(self.refused_text(Some(slack_user), Some(&who.user), rid, &text))
            }
        }
    }

    fn refused(&self, slack_user: Option<&str>, user: Option<&UserName>, request: Option<&str>, r: Refusal) -> Refusal {
        self.refused_text(slack_user, user, request, &r.to_string());
        r
    }

    /// Records `slack.refused` (in the background) and returns `reason`.
    fn refused_text(
        &self,
        slack_user: Option<&str>,
        user: Option<&UserName>,
        request: Option<&str>,
        reason: &str,
    ) -> String {
        tracing::info!(slack_user, reason, "slack: interaction refused");
        self.audit.submit(AuditEvent::SlackRefused {
            slack_user: slack_user.map(str::to_owned),
            user: user.cloned(),
            request_id: request.map(str::to_owned),
            reason: reason.to_owned(),
        });
        reason.to_owned()
    }
}

/// A call to Slack that failed: worth retrying, or not.
#[derive(Debug)]
enum Failure {
    Retry(String),
    Final(String),
}

/// The `payload` field of an `application/x-www-form-urlencoded` body.
fn form_payload(body: &[u8]) -> Result<String, String> {
    let text = std::str::from_utf8(body).map_err(|_| "the body is not UTF-8".to_owned())?;
    for pair in text.split('&') {
        if let Some(v) = pair.strip_prefix("payload=") {
            return percent_decode(v);
        }
    }
    Err("no payload field".into())
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or("a truncated %-escape")?;
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return Err("a bad %-escape".into());
                }
                let hex = std::str::from_utf8(hex).map_err(|_| "a bad %-escape")?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| "a bad %-escape")?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| "the payload is not UTF-8".into())
}
