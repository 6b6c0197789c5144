//! What the replicas on one shared store do for each other, besides following its grants
//! (`grants`): each publishes its session list (so any replica lists them all), kills the
//! sessions a kill on another replica named, answers CancelRequests other replicas passed on,
//! ends the links of agents removed on any replica, reads where agents reach the replicas
//! (for the agents' replica lists), and tells `/readyz` and `jitgate_store_up` whether the
//! store answers.
//!
//! A store of one replica (SQLite) has no cluster: nothing here runs but the health watch,
//! which then never reports degraded.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::agents::Hub;
use crate::metrics::Metrics;
use crate::model::SessionId;
use crate::pg::PgContext;
use crate::sessions::{SessionInfo, Sessions};
use crate::store::{Change, Store, StoreError};

/// How often the session list is looked at (and published when it changed).
const LOOK: Duration = Duration::from_secs(1);
/// Published at least this often anyway: the replica's heartbeat, and fresh byte counts.
const HEARTBEAT: Duration = Duration::from_secs(5);

/// Starts the cluster's tasks, stopped by `stop`.
pub fn start(
    store: &Arc<dyn Store>,
    pg: &Arc<PgContext>,
    hub: &Arc<Hub>,
    metrics: &Arc<Metrics>,
    tracker: &TaskTracker,
    stop: &CancellationToken,
) {
    tracker.spawn(watch_health(Arc::clone(store), Arc::clone(metrics), stop.clone()));
    if store.replica().is_none() {
        return;
    }
    tracker.spawn(publish_sessions(
        Arc::clone(store),
        Arc::clone(&pg.sessions),
        stop.clone(),
    ));
    tracker.spawn(apply_changes(
        store.changes(),
        Arc::clone(store),
        Arc::clone(&pg.sessions),
        Arc::clone(hub),
        stop.clone(),
    ));
    tracker.spawn(read_agent_addresses(Arc::clone(store), Arc::clone(hub), stop.clone()));
    if let Some(cancels) = store.cancels() {
        tracker.spawn(answer_cancels(cancels, Arc::clone(pg), stop.clone()));
    }
}

/// Every session of the cluster: this replica's, then the others' (as they last published
/// them, at most [`HEARTBEAT`] old). Alone, or while the store does not answer, only this
/// replica's: `Err` carries those with the reason.
pub async fn list_sessions(
    store: &dyn Store,
    sessions: &Sessions,
) -> Result<Vec<SessionInfo>, (Vec<SessionInfo>, StoreError)> {
    let mut all = sessions.list();
    if store.replica().is_none() {
        return Ok(all);
    }
    match store.peer_sessions().await {
        Ok(peers) => {
            for (replica, list) in peers {
                all.extend(list.into_iter().map(|mut s| {
                    s.replica = Some(replica.clone());
                    s
                }));
            }
            Ok(all)
        }
        Err(e) => Err((all, e)),
    }
}

/// Where a kill went.
#[derive(Debug, PartialEq, Eq)]
pub enum KillOutcome {
    /// Cut here.
    Here,
    /// Passed to the replica that listed it.
    Sent(String),
    /// No replica lists it.
    Unknown,
}

/// Kills session `id` wherever it runs: here at once, on another replica through the store's
/// log (that replica cuts it when it reads the change, as fast as a revoke).
pub async fn kill_session(store: &dyn Store, sessions: &Sessions, id: &SessionId) -> Result<KillOutcome, StoreError> {
    if sessions.kill(id) {
        return Ok(KillOutcome::Here);
    }
    if store.replica().is_none() {
        return Ok(KillOutcome::Unknown);
    }
    let peers = store.peer_sessions().await?;
    let Some(replica) = peers
        .into_iter()
        .find(|(_, list)| list.iter().any(|s| s.id == *id))
        .map(|(r, _)| r)
    else {
        return Ok(KillOutcome::Unknown);
    };
    store.kill_session(id).await?;
    Ok(KillOutcome::Sent(replica))
}

/// Publishes this replica's session list when its set of sessions changed, and every
/// [`HEARTBEAT`] regardless.
async fn publish_sessions(store: Arc<dyn Store>, sessions: Arc<Sessions>, stop: CancellationToken) {
    let mut published: Option<(BTreeSet<SessionId>, Instant)> = None;
    loop {
        let list: Vec<SessionInfo> = sessions
            .list()
            .into_iter()
            .map(|mut s| {
                // The reader names the replica from the row; no need to repeat it per session.
                s.replica = None;
                s
            })
            .collect();
        let ids: BTreeSet<SessionId> = list.iter().map(|s| s.id.clone()).collect();
        let due = match &published {
            None => true,
            Some((last, at)) => *last != ids || at.elapsed() >= HEARTBEAT,
        };
        if due {
            match store.publish_sessions(&list).await {
                Ok(()) => published = Some((ids, Instant::now())),
                Err(error) => tracing::debug!(%error, "session list not published"),
            }
        }
        tokio::select! {
            () = tokio::time::sleep(LOOK) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// Applies the changes made on any replica that act on this one's sessions and links (the
/// grant table follows the grant changes itself, in `grants`):
/// - a kill cuts the session if it runs here (the kill made here is applied twice: the second
///   does nothing);
/// - an agent's removal ends its link here; its record is gone from the store, so its
///   reconnection is refused. When changes may have been missed (the feed fell behind, or the
///   log had a gap), the links of agents the store no longer holds end. Kills in missed
///   changes are lost: their sessions run on until their grant ends.
async fn apply_changes(
    mut changes: tokio::sync::broadcast::Receiver<Change>,
    store: Arc<dyn Store>,
    sessions: Arc<Sessions>,
    hub: Arc<Hub>,
    stop: CancellationToken,
) {
    loop {
        let change = tokio::select! {
            c = changes.recv() => c,
            () = stop.cancelled() => return,
        };
        match change {
            Ok(Change::SessionKilled { id }) => {
                if sessions.kill(&id) {
                    tracing::info!(session.id = %id, "session killed (from another replica)");
                }
            }
            Ok(Change::AgentRemoved { name }) => {
                if hub.get(&name).is_some() {
                    tracing::info!(agent = %name, "agent removed (on some replica): ending its link");
                    hub.end(&name);
                }
            }
            Ok(Change::Resync) => end_unknown_agents(store.as_ref(), &hub).await,
            Ok(_) => {}
            Err(RecvError::Lagged(missed)) => {
                tracing::warn!(
                    missed,
                    "cluster change feed fell behind: kills in the missed changes are lost; re-reading the agents"
                );
                end_unknown_agents(store.as_ref(), &hub).await;
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// Ends the links of agents the store no longer holds. A store that does not answer ends
/// nothing: the removals are in its log, read when it answers again.
async fn end_unknown_agents(store: &dyn Store, hub: &Hub) {
    let joined = match store.agents().await {
        Ok(all) => all.into_iter().map(|a| a.name).collect::<BTreeSet<_>>(),
        Err(error) => return tracing::debug!(%error, "agents not re-read"),
    };
    for name in hub.linked() {
        if !joined.contains(&name) {
            tracing::info!(agent = %name, "agent no longer in the store: ending its link");
            hub.end(&name);
        }
    }
}

/// Reads where agents reach the replicas alive now, every [`HEARTBEAT`], into the hub, which
/// tells the agents linked here when the list changes. A failed read keeps the last list.
async fn read_agent_addresses(store: Arc<dyn Store>, hub: Arc<Hub>, stop: CancellationToken) {
    loop {
        match store.agent_addresses().await {
            Ok(list) => hub.set_replicas(list),
            Err(error) => tracing::debug!(%error, "replica list not read; keeping the last one"),
        }
        tokio::select! {
            () = tokio::time::sleep(HEARTBEAT) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// Forwards the CancelRequests other replicas passed on whose key this replica issued.
async fn answer_cancels(
    mut cancels: tokio::sync::broadcast::Receiver<crate::sessions::CancelKey>,
    pg: Arc<PgContext>,
    stop: CancellationToken,
) {
    loop {
        let key = tokio::select! {
            k = cancels.recv() => k,
            () = stop.cancelled() => return,
        };
        match key {
            Ok(key) if pg.sessions.issued_here(key) => {
                let pg = Arc::clone(&pg);
                tokio::spawn(async move { crate::pg::forward_cancel(&pg, key, false).await });
            }
            Ok(_) => {}
            Err(RecvError::Lagged(missed)) => tracing::warn!(missed, "cancel requests from other replicas dropped"),
            Err(RecvError::Closed) => return,
        }
    }
}

/// Mirrors the store's health into `/readyz` and `jitgate_store_up`, every second.
async fn watch_health(store: Arc<dyn Store>, metrics: Arc<Metrics>, stop: CancellationToken) {
    let mut was: Option<String> = None;
    metrics.set_degraded(None);
    loop {
        let now = store.degraded();
        if now != was {
            match &now {
                Some(reason) => {
                    tracing::warn!(%reason, "degraded: the store does not answer; enforcing the grants held")
                }
                None => tracing::info!("the store answers again"),
            }
            metrics.set_degraded(now.clone());
            was = now;
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = stop.cancelled() => return,
        }
    }
}
