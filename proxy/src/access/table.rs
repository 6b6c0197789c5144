//! The in-memory grant table: consulted at every session start, changed only by applying typed
//! changes ([`Change`]), whoever made them (this process now, another replica later), and
//! ended at expiry by one loop for every grant.
//!
//! Each live grant owns a `CancellationToken`, a child of the proxy's shutdown token; a session
//! opened under it holds a child of that. Ending a grant (revoked, expired) cancels its token,
//! so every session under it is cut the moment the change is applied, before anything is
//! persisted. The expiry loop keeps one `DelayQueue` of deadlines: it never waits on the store
//! or the audit log, so grants are cut on time whatever they are doing; the expired grants it
//! ends are handed to the grant service ([`crate::grants`]) to persist, audit and notify.
//! Applying a change twice is harmless, which is what lets the store's change feed echo the
//! changes this process made itself.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use dashmap::DashMap;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::time::{delay_queue, DelayQueue};

use crate::clock::SharedClock;
use crate::metrics::Metrics;
use crate::model::{Deadline, Grant, GrantEnd, GrantId, TargetName, UserName};
use crate::store::Change;

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

/// Proof that a grant was live for (user, target) at lookup time. Only [`GrantTable::lookup`]
/// makes one.
#[derive(Debug, Clone)]
pub struct GrantPermit(Arc<LiveGrant>);

impl GrantPermit {
    /// The grant this permit stands for (with its original expiry).
    pub fn grant(&self) -> &Grant {
        &self.0.grant
    }
    /// The grant's deadline now (an extension moves it).
    pub fn deadline(&self) -> Deadline {
        self.0.deadline()
    }
    /// Follows the grant's deadline as extensions move it.
    pub fn deadline_watch(&self) -> watch::Receiver<Deadline> {
        self.0.deadline.subscribe()
    }
    /// Cancelled when the grant ends (revoked or expired) or the proxy shuts down.
    pub fn cut_token(&self) -> &CancellationToken {
        &self.0.cut
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

/// What applying a change did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// A new live grant.
    Created,
    /// A live grant's deadline moved; the grant with its new expiry.
    Extended(Grant),
    /// A live grant ended (its sessions are being cut); the grant with its last expiry.
    Ended(Grant),
    /// Nothing: already applied, unknown, or no longer live.
    Unchanged,
}

/// A request to the expiry loop: (re)arm `id` for `due`.
struct Arm {
    id: GrantId,
    due: Instant,
}

/// The live grants.
pub struct GrantTable {
    by_id: DashMap<GrantId, Arc<LiveGrant>>,
    /// Grants that ended, with their last expiry: a `GrantCreated` that arrives after the
    /// grant's end (a feed behind the local revoke) never brings it back. Pruned once past
    /// their expiry.
    ended: DashMap<GrantId, SystemTime>,
    by_key: DashMap<Key, Vec<Arc<LiveGrant>>>,
    clock: SharedClock,
    /// Parent of every grant's token: the proxy's shutdown.
    root: CancellationToken,
    /// One message per grant change, so bounded by the number of changes applied.
    arm: mpsc::UnboundedSender<Arm>,
    metrics: Arc<Metrics>,
    /// Set while the table is being made what the store holds (a resync): admission waits
    /// for none, it refuses new sessions until the resync is done.
    resyncing: std::sync::atomic::AtomicBool,
    /// Woken when a grant ends or its deadline moves (the temporary-role reconciler waits on it).
    moved: tokio::sync::Notify,
}

impl GrantTable {
    /// An empty table, and the loop that ends grants at their deadline. Grants it ends come out
    /// of the returned receiver (with their last expiry), in deadline order. The loop stops
    /// when `root` is cancelled.
    pub fn start(
        clock: SharedClock,
        root: CancellationToken,
        metrics: Arc<Metrics>,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<Grant>) {
        let (arm, arms) = mpsc::unbounded_channel();
        let (expired_tx, expired) = mpsc::unbounded_channel();
        let table = Arc::new(Self {
            by_id: DashMap::new(),
            ended: DashMap::new(),
            by_key: DashMap::new(),
            clock,
            root,
            arm,
            metrics,
            resyncing: std::sync::atomic::AtomicBool::new(false),
            moved: tokio::sync::Notify::new(),
        });
        tokio::spawn(expiry_loop(
            Arc::downgrade(&table),
            arms,
            expired_tx,
            table.root.clone(),
        ));
        (table, expired)
    }

    /// Marks a resync begun (`true`) or done.
    pub fn set_resyncing(&self, on: bool) {
        self.resyncing.store(on, std::sync::atomic::Ordering::Release);
    }

    /// Whether a resync is under way: new sessions wait for it to end (they are refused).
    pub fn resyncing(&self) -> bool {
        self.resyncing.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The clock the table computes deadlines with.
    pub fn clock(&self) -> &SharedClock {
        &self.clock
    }

    /// Applies one change. Idempotent: a change already applied, or about a grant no longer
    /// live, changes nothing.
    pub fn apply(&self, change: &Change) -> Applied {
        match change {
            Change::GrantCreated(grant) => self.create(grant),
            Change::GrantExtended { id, expires_at } => self.extend(id, *expires_at),
            Change::GrantEnded { id, end } => self.end(id, *end),
            Change::RequestChanged { .. }
            | Change::SessionKilled { .. }
            | Change::AgentRemoved { .. }
            | Change::Resync => Applied::Unchanged,
        }
    }

    fn create(&self, grant: &Grant) -> Applied {
        if self.by_id.contains_key(&grant.id) || self.ended.contains_key(&grant.id) {
            return Applied::Unchanged;
        }
        let deadline = Deadline {
            instant: self.clock.instant_at(grant.expires_at),
            at: grant.expires_at,
        };
        let live = Arc::new(LiveGrant {
            deadline: watch::Sender::new(deadline),
            cut: self.root.child_token(),
            end: OnceLock::new(),
            grant: grant.clone(),
        });
        let key = Key::new(&grant.user, &grant.target);
        self.by_key.entry(key).or_default().push(Arc::clone(&live));
        self.by_id.insert(grant.id.clone(), live);
        self.metrics.grants_active.inc();
        let _ = self.arm.send(Arm {
            id: grant.id.clone(),
            due: deadline.instant,
        });
        Applied::Created
    }

    fn extend(&self, id: &GrantId, expires_at: std::time::SystemTime) -> Applied {
        let Some(live) = self.by_id.get(id).map(|g| Arc::clone(&g)) else {
            return Applied::Unchanged;
        };
        if live.end.get().is_some() || live.deadline().at == expires_at {
            return Applied::Unchanged;
        }
        let deadline = Deadline {
            instant: self.clock.instant_at(expires_at),
            at: expires_at,
        };
        live.deadline.send_replace(deadline);
        let _ = self.arm.send(Arm {
            id: id.clone(),
            due: deadline.instant,
        });
        self.moved.notify_one();
        Applied::Extended(live.current())
    }

    fn end(&self, id: &GrantId, end: GrantEnd) -> Applied {
        let Some(live) = self.by_id.get(id).map(|g| Arc::clone(&g)) else {
            return Applied::Unchanged;
        };
        if live.end.set(end).is_err() {
            return Applied::Unchanged;
        }
        self.remove(&live);
        Applied::Ended(live.current())
    }

    /// Takes a grant whose end is set out of both indexes and cuts its sessions.
    fn remove(&self, live: &Arc<LiveGrant>) {
        live.cut.cancel();
        self.moved.notify_one();
        if self.ended.len() >= 4096 {
            let now = self.clock.now();
            self.ended.retain(|_, expires_at| *expires_at > now);
        }
        self.ended.insert(live.grant.id.clone(), live.current().expires_at);
        if self.by_id.remove(&live.grant.id).is_some() {
            self.metrics.grants_active.dec();
        }
        let key = Key::new(&live.grant.user, &live.grant.target);
        self.by_key.remove_if_mut(&key, |_, v| {
            v.retain(|g| !Arc::ptr_eq(g, live));
            v.is_empty()
        });
    }

    /// Ends `id` as expired if its deadline has come (an extension may have just moved it).
    fn expire_due(&self, id: &GrantId) -> Option<Grant> {
        let live = self.by_id.get(id).map(|g| Arc::clone(&g))?;
        if live.deadline().instant > Instant::now() || live.end.set(GrantEnd::Expired).is_err() {
            return None;
        }
        self.remove(&live);
        Some(live.current())
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

    /// The live grant `id`, with its current expiry.
    pub fn get(&self, id: &GrantId) -> Option<Grant> {
        let live = self.by_id.get(id)?;
        live.is_live(Instant::now()).then(|| live.current())
    }

    /// Every live grant, soonest expiry first.
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

    /// Whether `id` is known to have ended (revoked or expired while this process ran).
    pub fn has_ended(&self, id: &GrantId) -> bool {
        self.ended.contains_key(id)
    }

    /// Resolves after a grant ended or an extension moved a deadline (at least once since the
    /// last time it resolved).
    pub async fn moved(&self) {
        self.moved.notified().await;
    }

    /// Wakes whoever waits in [`GrantTable::moved`] (a temporary role was made for a grant
    /// that ended meanwhile).
    pub fn touch(&self) {
        self.moved.notify_one();
    }

    /// How many grants the table holds.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether the table holds no grant.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

/// One timer for every grant: arms and re-arms deadlines as changes come, and ends each grant
/// when its deadline passes. Holds only a weak reference, so a dropped table stops it.
async fn expiry_loop(
    table: std::sync::Weak<GrantTable>,
    mut arms: mpsc::UnboundedReceiver<Arm>,
    expired: mpsc::UnboundedSender<Grant>,
    root: CancellationToken,
) {
    let mut queue: DelayQueue<GrantId> = DelayQueue::new();
    let mut keys: HashMap<GrantId, delay_queue::Key> = HashMap::new();
    loop {
        tokio::select! {
            biased;
            () = root.cancelled() => return,
            arm = arms.recv() => {
                let Some(Arm { id, due }) = arm else { return };
                match keys.get(&id) {
                    Some(key) => queue.reset_at(key, due),
                    None => {
                        let key = queue.insert_at(id.clone(), due);
                        keys.insert(id, key);
                    }
                }
            }
            Some(fired) = std::future::poll_fn(|cx| queue.poll_expired(cx)), if !queue.is_empty() => {
                let id = fired.into_inner();
                keys.remove(&id);
                let Some(table) = table.upgrade() else { return };
                match table.expire_due(&id) {
                    Some(grant) => {
                        let _ = expired.send(grant);
                    }
                    None => {
                        // Extended meanwhile: the re-arm is queued behind this; or already
                        // ended, in which case there is nothing to arm.
                        if let Some(live) = table.by_id.get(&id) {
                            if live.end.get().is_none() {
                                let key = queue.insert_at(id.clone(), live.deadline().instant);
                                keys.insert(id, key);
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
