//! Delivering to one webhook: the HTTP POST of one attempt, the HMAC signature, and the worker
//! that takes notifications from the webhook's queue in order and retries with backoff.

use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use prometheus::{IntCounter, IntGauge};
use rand::Rng;
use rustls::pki_types::ServerName;
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Format, Notification, WebhookConfig};

/// First retry delay; doubled after each failed attempt up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Longest wait between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How long a worker keeps delivering queued notifications after shutdown starts.
pub const DRAIN: Duration = Duration::from_secs(2);

/// `sha256=<hex HMAC-SHA256(secret, body)>`, the `X-Jitgate-Signature` value.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes keys of any length, so this cannot fail.
    let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(secret) else {
        return String::new();
    };
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Delay before attempt `n + 1` after `n` failed attempts (n >= 1).
pub fn backoff(failed: u32) -> Duration {
    let shift = failed.saturating_sub(1).min(16);
    FIRST_BACKOFF.saturating_mul(1 << shift).min(MAX_BACKOFF)
}

/// Why an attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    #[error("HTTP {0}")]
    Status(u16),
    #[error("{0}")]
    Connect(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// Counters of one webhook.
pub struct HookMetrics {
    pub delivered: IntCounter,
    pub failed: IntCounter,
    pub dropped: IntCounter,
    pub queue: IntGauge,
}

/// A rendered request, the same for every attempt.
struct Prepared {
    event: &'static str,
    delivery: String,
    body: bytes::Bytes,
    signature: Option<String>,
}

fn prepare(hook: &WebhookConfig, n: &Notification) -> Prepared {
    let body = match hook.format {
        Format::Json => n.to_json(),
        Format::Slack => n.to_slack(),
    };
    let signature = match (hook.format, &hook.secret) {
        (Format::Json, Some(secret)) => Some(signature(secret, &body)),
        _ => None,
    };
    Prepared {
        event: n.kind.as_str(),
        delivery: format!("{:032x}", rand::thread_rng().gen::<u128>()),
        body: body.into(),
        signature,
    }
}

/// One POST, bounded by the webhook's timeout. 2xx is success.
async fn attempt(hook: &WebhookConfig, p: &Prepared) -> Result<(), AttemptError> {
    tokio::time::timeout(hook.timeout, async {
        let tcp = TcpStream::connect(&hook.endpoint.authority)
            .await
            .map_err(|e| AttemptError::Connect(e.to_string()))?;
        match &hook.tls {
            None => post(tcp, hook, p).await,
            Some(tls) => {
                let name = ServerName::try_from(hook.endpoint.host.clone())
                    .map_err(|e| AttemptError::Connect(e.to_string()))?;
                let stream = tokio_rustls::TlsConnector::from(Arc::clone(tls))
                    .connect(name, tcp)
                    .await
                    .map_err(|e| AttemptError::Connect(e.to_string()))?;
                post(stream, hook, p).await
            }
        }
    })
    .await
    .unwrap_or(Err(AttemptError::Timeout(hook.timeout)))
}

async fn post<S>(stream: S, hook: &WebhookConfig, p: &Prepared) -> Result<(), AttemptError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io_err = |e: hyper::Error| AttemptError::Connect(e.to_string());
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(io_err)?;
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(hook.endpoint.path.as_str())
        .header(hyper::header::HOST, hook.endpoint.authority.as_str())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(
            hyper::header::USER_AGENT,
            concat!("jitgate/", env!("CARGO_PKG_VERSION")),
        )
        .header(hyper::header::CONNECTION, "close")
        .header("X-Jitgate-Event", p.event)
        .header("X-Jitgate-Delivery", p.delivery.as_str());
    if let Some(sig) = &p.signature {
        req = req.header("X-Jitgate-Signature", sig.as_str());
    }
    let req = req
        .body(Full::new(p.body.clone()))
        .map_err(|e| AttemptError::Connect(e.to_string()))?;
    let result = async {
        let resp = sender.send_request(req).await.map_err(io_err)?;
        let status = resp.status();
        // Read (and discard) the answer so the receiver sees a clean close.
        let _ = resp.into_body().collect().await;
        if status.is_success() {
            Ok(())
        } else {
            Err(AttemptError::Status(status.as_u16()))
        }
    }
    .await;
    conn.abort();
    result
}

/// Delivers one notification with retries. Returns whether it was delivered. After
/// `shutdown` fires, waits and attempts end at `drain_until`.
async fn deliver(
    hook: &WebhookConfig,
    n: &Notification,
    shutdown: &CancellationToken,
    drain_until: impl Fn() -> Option<Instant>,
) -> bool {
    let p = prepare(hook, n);
    let mut failed = 0;
    loop {
        let result = match drain_until() {
            None => tokio::select! {
                r = attempt(hook, &p) => r,
                // Cut a hanging attempt at shutdown; it is retried under the drain deadline.
                _ = shutdown.cancelled() => Err(AttemptError::Connect("shutting down".into())),
            },
            Some(until) => tokio::time::timeout_at(until, attempt(hook, &p))
                .await
                .unwrap_or(Err(AttemptError::Timeout(hook.timeout))),
        };
        let error = match result {
            Ok(()) => {
                tracing::debug!(webhook = %hook.name, event = p.event, delivery = %p.delivery, "webhook delivered");
                return true;
            }
            Err(e) => e,
        };
        failed += 1;
        if failed >= hook.max_attempts {
            tracing::warn!(
                webhook = %hook.name,
                event = p.event,
                delivery = %p.delivery,
                attempts = failed,
                %error,
                "webhook delivery failed"
            );
            return false;
        }
        tracing::debug!(webhook = %hook.name, event = p.event, attempt = failed, %error, "webhook attempt failed");
        let wake = Instant::now() + backoff(failed);
        match drain_until() {
            None => tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                _ = shutdown.cancelled() => {}
            },
            Some(until) if wake < until => tokio::time::sleep_until(wake).await,
            Some(_) => {
                tracing::warn!(webhook = %hook.name, event = p.event, delivery = %p.delivery, "webhook delivery abandoned at shutdown");
                return false;
            }
        }
    }
}

/// The worker of one webhook: delivers queued notifications in order until shutdown, then
/// keeps going for at most [`DRAIN`].
pub async fn run(
    hook: WebhookConfig,
    mut queue: mpsc::Receiver<Notification>,
    metrics: HookMetrics,
    shutdown: CancellationToken,
) {
    let drain = std::sync::OnceLock::new();
    let drain_until = || {
        shutdown
            .is_cancelled()
            .then(|| *drain.get_or_init(|| Instant::now() + DRAIN))
    };
    loop {
        let next = match drain_until() {
            None => tokio::select! {
                n = queue.recv() => n,
                _ = shutdown.cancelled() => continue,
            },
            Some(until) => {
                if Instant::now() >= until {
                    break;
                }
                queue.try_recv().ok()
            }
        };
        let Some(n) = next else { break };
        metrics.queue.dec();
        if deliver(&hook, &n, &shutdown, drain_until).await {
            metrics.delivered.inc();
        } else {
            metrics.failed.inc();
        }
    }
    // What is left was never attempted.
    queue.close();
    while queue.try_recv().is_ok() {
        metrics.queue.dec();
        metrics.dropped.inc();
    }
}
