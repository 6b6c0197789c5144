//! The registry of live sessions: what `jitgate session list` shows and what
//! `jitgate session kill` and CancelRequest routing find.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::audit::SessionEndReason;
use crate::config::Target;
use crate::model::{AccessLevel, GrantId, SessionId, SessionMeta, TargetName, UserName};

/// A live session's shared state.
#[derive(Debug)]
pub struct SessionHandle {
    pub meta: SessionMeta,
    pub started_at: SystemTime,
    /// Bytes read from the client.
    pub bytes_from_client: AtomicU64,
    /// Bytes written to the client.
    pub bytes_to_client: AtomicU64,
    /// Statements audited (PostgreSQL) or commands run (SSH exec) so far.
    pub statements: AtomicU64,
    /// The key this session's client was given in `BackendKeyData`.
    pub cancel_key: CancelKey,
    /// Where a matching CancelRequest goes: the target and its backend's own key, once the
    /// upstream login gave one.
    upstream_cancel: OnceLock<(Arc<Target>, CancelKey)>,
    kill: CancellationToken,
    kill_reason: OnceLock<SessionEndReason>,
    /// Set once the session is through its login and audited: only then is it listed.
    established: AtomicBool,
}

/// A (process id, secret key) pair as carried by `BackendKeyData` and `CancelRequest`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CancelKey {
    pub process_id: i32,
    pub secret_key: i32,
}

impl SessionHandle {
    /// Cuts this session for `reason`; the first reason given wins.
    pub fn kill(&self, reason: SessionEndReason) {
        let _ = self.kill_reason.set(reason);
        self.kill.cancel();
    }

    /// Records where a CancelRequest with this session's key goes (set once, after the
    /// upstream login).
    pub fn set_upstream_cancel(&self, target: Arc<Target>, key: CancelKey) {
        let _ = self.upstream_cancel.set((target, key));
    }

    /// Marks the session established (logged in upstream, `session.start` written): from now
    /// on it is listed. Admission registers it earlier, so it can be cut while logging in.
    pub fn set_established(&self) {
        self.established.store(true, Ordering::Release);
    }

    /// Fires when the session is killed, its grant ends or the proxy shuts down (its token is
    /// a child of the grant's).
    pub fn killed(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.kill.cancelled()
    }

    /// Why the session was killed, once it was.
    pub fn kill_reason(&self) -> Option<SessionEndReason> {
        self.kill_reason.get().copied()
    }

    /// A snapshot for listings; `replica` is this replica's id in a cluster.
    pub fn info(&self, replica: Option<&str>) -> SessionInfo {
        let m = &self.meta;
        SessionInfo {
            id: m.id.clone(),
            user: m.user.clone(),
            target: m.target.clone(),
            database: m.database.clone(),
            access: m.access,
            grant_id: m.grant_id.clone(),
            client_addr: m.client_addr,
            started_at: self.started_at,
            bytes_from_client: self.bytes_from_client.load(Ordering::Relaxed),
            bytes_to_client: self.bytes_to_client.load(Ordering::Relaxed),
            statements: self.statements.load(Ordering::Relaxed),
            replica: replica.map(str::to_owned),
        }
    }
}

/// A session as listed by the API (its wire format: `id`, and no roles).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionInfo {
    pub id: SessionId,
    pub user: UserName,
    pub target: TargetName,
    pub database: String,
    pub access: AccessLevel,
    pub grant_id: GrantId,
    pub client_addr: SocketAddr,
    #[serde(with = "crate::timefmt::serde_rfc3339")]
    pub started_at: SystemTime,
    pub bytes_from_client: u64,
    pub bytes_to_client: u64,
    /// Statements audited (PostgreSQL) or commands run (SSH exec) so far.
    #[serde(default)]
    pub statements: u64,
    /// The replica holding the session, when replicas share a store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
}

/// A new session: who it is, and the token that cuts it.
pub struct NewSession {
    pub meta: SessionMeta,
    /// The grant's cut token: the session's own token is its child.
    pub cut_parent: CancellationToken,
}

/// Live sessions by id and by proxy-issued cancel key. A session deregisters itself when its
/// guard drops.
///
/// In a cluster the cancel key names its replica: bits 23 to 30 of the process id are the
/// replica's [`cancel_tag`], so a CancelRequest that reaches another replica is passed to
/// the one that issued it.
#[derive(Default)]
pub struct Sessions {
    live: DashMap<SessionId, Arc<SessionHandle>>,
    by_cancel_pid: DashMap<i32, Arc<SessionHandle>>,
    /// This replica's id, when replicas share a store.
    replica: Option<String>,
}

/// Bits of a cancel key's process id below the replica tag.
const TAG_SHIFT: u32 = 23;

/// The 8-bit tag a replica's cancel keys carry (FNV-1a of its id). Two replicas may share a
/// tag: a passed-on cancel is still matched by its whole key, so that only costs a lookup.
pub fn cancel_tag(replica: &str) -> i32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in replica.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    i32::from((h ^ (h >> 8) ^ (h >> 16) ^ (h >> 24)) as u8)
}

/// The replica tag in a cancel key's process id.
pub fn tag_of(key: CancelKey) -> i32 {
    (key.process_id >> TAG_SHIFT) & 0xff
}

/// Removes the session from the registry when dropped.
pub struct Registration {
    sessions: Arc<Sessions>,
    handle: Arc<SessionHandle>,
}

impl Registration {
    /// The registered session.
    pub fn handle(&self) -> &Arc<SessionHandle> {
        &self.handle
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.sessions.live.remove(&self.handle.meta.id);
        self.sessions.by_cancel_pid.remove(&self.handle.cancel_key.process_id);
    }
}

impl Sessions {
    /// The registry of replica `replica` in a cluster (`None`: alone).
    pub fn new(replica: Option<String>) -> Self {
        Self {
            replica,
            ..Self::default()
        }
    }

    /// This replica's id in a cluster.
    pub fn replica(&self) -> Option<&str> {
        self.replica.as_deref()
    }

    /// Whether `key` names this replica (always, alone).
    pub fn issued_here(&self, key: CancelKey) -> bool {
        self.replica.as_deref().is_none_or(|r| tag_of(key) == cancel_tag(r))
    }

    /// Registers a session and returns the guard that keeps it listed.
    pub fn register(self: &Arc<Self>, s: NewSession) -> Registration {
        // A fresh positive process id not in use (carrying this replica's tag in a cluster),
        // and an unguessable secret.
        let tag = self.replica.as_deref().map(cancel_tag);
        let process_id = loop {
            let pid = match tag {
                Some(tag) => (tag << TAG_SHIFT) | (rand::random::<i32>() & ((1 << TAG_SHIFT) - 1)),
                None => rand::random::<i32>() & i32::MAX,
            };
            if pid != 0 && !self.by_cancel_pid.contains_key(&pid) {
                break pid;
            }
        };
        let cancel_key = CancelKey {
            process_id,
            secret_key: rand::random(),
        };
        let handle = Arc::new(SessionHandle {
            meta: s.meta,
            started_at: SystemTime::now(),
            bytes_from_client: AtomicU64::new(0),
            bytes_to_client: AtomicU64::new(0),
            statements: AtomicU64::new(0),
            cancel_key,
            upstream_cancel: OnceLock::new(),
            kill: s.cut_parent.child_token(),
            kill_reason: OnceLock::new(),
            established: AtomicBool::new(false),
        });
        self.live.insert(handle.meta.id.clone(), Arc::clone(&handle));
        self.by_cancel_pid.insert(process_id, Arc::clone(&handle));
        Registration {
            sessions: Arc::clone(self),
            handle,
        }
    }

    /// Kills a session by id; false when no such session is live.
    pub fn kill(&self, id: &SessionId) -> bool {
        match self.live.get(id) {
            Some(h) => {
                h.kill(SessionEndReason::Killed);
                true
            }
            None => false,
        }
    }

    /// Resolves a client's CancelRequest to the target and upstream key to forward it to.
    /// Unknown process ids and wrong secrets resolve to nothing, as PostgreSQL ignores them.
    pub fn cancel_route(&self, key: CancelKey) -> Option<(Arc<Target>, CancelKey)> {
        let handle = self.by_cancel_pid.get(&key.process_id)?;
        // Compare without an early exit on the first differing bit.
        let diff = handle.cancel_key.secret_key ^ key.secret_key;
        if diff != 0 {
            return None;
        }
        handle.upstream_cancel.get().cloned()
    }

    /// Every established session, oldest first (not those still logging in).
    pub fn list(&self) -> Vec<SessionInfo> {
        let mut v: Vec<SessionInfo> = self
            .live
            .iter()
            .filter(|h| h.established.load(Ordering::Acquire))
            .map(|h| h.info(self.replica.as_deref()))
            .collect();
        v.sort_by_key(|s| s.started_at);
        v
    }
}
