//! Webhook notifications: what happened to requests and grants, sent to configured HTTP
//! endpoints in the background.
//!
//! [`Notifier::notify`] never blocks and never fails its caller: it puts the notification on
//! a bounded queue per webhook (full: dropped and counted). One task per webhook delivers in
//! order, retrying with exponential backoff, and counts each outcome in
//! `jitgate_webhook_deliveries_total`. A dead endpoint therefore delays nothing but its own
//! queue. This module owns the `[[webhooks]]` config tables too; it does not decide when
//! events happen (grants and the request workflow call it).

mod delivery;
mod payload;
mod webhook;

#[cfg(test)]
mod tests;

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;

pub use delivery::{backoff, signature};
pub use payload::{EventKind, GrantData, Notification, NotificationData, RequestInfo};
pub use webhook::{validate as validate_webhooks, Endpoint, Format, RawWebhook, WebhookConfig};

/// Notifications that may wait per webhook; more are dropped and counted.
pub const QUEUE_SIZE: usize = 1024;

/// One webhook's queue entrance.
struct Hook {
    name: String,
    events: Vec<EventKind>,
    queue: mpsc::Sender<Notification>,
    dropped: prometheus::IntCounter,
    depth: prometheus::IntGauge,
}

/// Fans notifications out to the configured webhooks.
pub struct Notifier {
    hooks: Vec<Hook>,
    /// The Slack app, told of request events too (`[slack]`).
    slack: Option<Arc<crate::slack::Slack>>,
}

impl Notifier {
    /// Starts one delivery task per webhook on `tracker`. The tasks stop when `shutdown`
    /// fires, after delivering what they can within 2 s.
    pub fn start(
        webhooks: &[WebhookConfig],
        metrics: &Metrics,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Arc<Notifier> {
        Self::start_with_slack(webhooks, None, metrics, tracker, shutdown)
    }

    /// [`Notifier::start`], and request events also go to the Slack app.
    pub fn start_with_slack(
        webhooks: &[WebhookConfig],
        slack: Option<Arc<crate::slack::Slack>>,
        metrics: &Metrics,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Arc<Notifier> {
        let (mut notifier, workers) = Self::build(webhooks, metrics, QUEUE_SIZE);
        notifier.slack = slack;
        for (hook, queue) in workers {
            let m = hook_metrics(metrics, &hook.name);
            tracker.spawn(delivery::run(hook, queue, m, shutdown.clone()));
        }
        Arc::new(notifier)
    }

    /// A notifier without webhooks: every notification is ignored.
    pub fn disabled() -> Arc<Notifier> {
        Arc::new(Notifier {
            hooks: Vec::new(),
            slack: None,
        })
    }

    /// The queues and, separately, their receiving ends (for the workers).
    fn build(
        webhooks: &[WebhookConfig],
        metrics: &Metrics,
        queue_size: usize,
    ) -> (Notifier, Vec<(WebhookConfig, mpsc::Receiver<Notification>)>) {
        let mut hooks = Vec::with_capacity(webhooks.len());
        let mut workers = Vec::with_capacity(webhooks.len());
        for w in webhooks {
            let (tx, rx) = mpsc::channel(queue_size);
            let m = hook_metrics(metrics, &w.name);
            hooks.push(Hook {
                name: w.name.clone(),
                events: w.events.clone(),
                queue: tx,
                dropped: m.dropped,
                depth: m.queue,
            });
            workers.push((w.clone(), rx));
        }
        (Notifier { hooks, slack: None }, workers)
    }

    /// A pending request got one approval of several: only the Slack message shows it (there
    /// is no webhook event for votes; `request.approval` is in the audit log). Never waits.
    pub fn progress(&self, info: RequestInfo) {
        if let Some(slack) = &self.slack {
            slack.progress(info);
        }
    }

    /// Queues `event` for every webhook subscribed to its kind. Never waits.
    pub fn notify(&self, event: Notification) {
        if let Some(slack) = &self.slack {
            slack.notify(&event);
        }
        for hook in self.hooks.iter().filter(|h| h.events.contains(&event.kind)) {
            hook.depth.inc();
            if let Err(e) = hook.queue.try_send(event.clone()) {
                hook.depth.dec();
                hook.dropped.inc();
                let why = match e {
                    mpsc::error::TrySendError::Full(_) => "queue full",
                    mpsc::error::TrySendError::Closed(_) => "shutting down",
                };
                tracing::warn!(webhook = %hook.name, event = event.kind.as_str(), why, "webhook notification dropped");
            }
        }
    }
}

fn hook_metrics(metrics: &Metrics, name: &str) -> delivery::HookMetrics {
    let outcome = |o: &str| metrics.webhook_deliveries_total.with_label_values(&[name, o]);
    delivery::HookMetrics {
        delivered: outcome("delivered"),
        failed: outcome("failed"),
        dropped: outcome("dropped"),
        queue: metrics.webhook_queue_depth.with_label_values(&[name]),
    }
}
