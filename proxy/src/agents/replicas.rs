//! What a replica tells its agents about the cluster: where agents reach every replica alive
//! now (`[agents] advertise` of each, read from the store by `cluster`), in the join and
//! renewal answers and, on a live link, in a `POST /replicas` stream whenever it changes. An
//! agent links to each address, so any replica can reach any agent's targets.
//!
//! Only agents that offered [`tunnel::ALPN_REPLICAS`] are told: an older agent refuses an
//! answer with a field it does not know, and has no `/replicas` path.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use jitgate_protocol::tunnel::{self, REPLICAS_PATH};
use tokio::sync::watch;

use super::listener::AgentsContext;
use crate::model::AgentName;

/// How long the agent may take to take a list.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// A list the agent did not take is sent again after this long.
const RETRY: Duration = Duration::from_secs(30);

/// The list for a join or renewal answer: read from the store now (the last one read when
/// the store does not answer); empty for an agent that cannot take it.
pub(super) async fn for_answer(ctx: &AgentsContext, told: bool) -> Vec<String> {
    if !told {
        return Vec::new();
    }
    match ctx.store.agent_addresses().await {
        Ok(list) => list,
        Err(error) => {
            tracing::warn!(%error, "replica list not read from the store: answering with the last one read");
            ctx.hub.replicas().borrow().clone()
        }
    }
}

/// Sends `list` to the agent on its link at once and whenever it changes; a list the agent
/// did not take is sent again every [`RETRY`]. Never returns: the link's end drops it.
pub(super) async fn push(
    send: h2::client::SendRequest<Bytes>,
    mut list: watch::Receiver<Vec<String>>,
    agent: &AgentName,
) -> Infallible {
    let mut sent: Option<Vec<String>> = None;
    loop {
        let now = list.borrow_and_update().clone();
        // An empty list says nothing (alone, or the store unread): the agent keeps its own.
        let due = !now.is_empty() && sent.as_ref() != Some(&now);
        if due {
            match tokio::time::timeout(SEND_TIMEOUT, send_once(send.clone(), agent, &now)).await {
                Ok(Ok(())) => {
                    tracing::debug!(%agent, replicas = ?now, "replica list sent to the agent");
                    sent = Some(now);
                }
                Ok(Err(error)) => tracing::debug!(%agent, %error, "replica list not taken; sending again later"),
                Err(_) => tracing::debug!(%agent, "replica list not taken in time; sending again later"),
            }
        }
        let retry = due && sent.as_ref() != Some(&*list.borrow());
        tokio::select! {
            changed = list.changed() => {
                if changed.is_err() {
                    // The hub is gone: nothing more to tell.
                    return std::future::pending().await;
                }
            }
            () = tokio::time::sleep(RETRY), if retry => {}
        }
    }
}

async fn send_once(send: h2::client::SendRequest<Bytes>, agent: &AgentName, list: &[String]) -> Result<(), String> {
    let mut send = send.ready().await.map_err(|e| e.to_string())?;
    let request = http::Request::builder()
        .method(http::Method::POST)
        .uri(format!("http://{agent}{REPLICAS_PATH}"))
        .body(())
        .map_err(|e| e.to_string())?;
    let (response, mut body) = send.send_request(request, false).map_err(|e| e.to_string())?;
    body.send_data(Bytes::from(tunnel::encode_replicas(list)), true)
        .map_err(|e| e.to_string())?;
    let response = response.await.map_err(|e| e.to_string())?;
    match response.status() {
        http::StatusCode::OK => Ok(()),
        status => Err(format!("the agent answered {status}")),
    }
}
