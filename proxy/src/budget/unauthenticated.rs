//! The budget of connections that have not yet presented a valid client certificate.
//!
//! A full budget never refuses the newcomer: that would let whoever holds the slots keep
//! everyone else out. Instead the newcomer is admitted and one held connection is evicted:
//! the oldest of the source that holds the most (an IPv4 address, or an IPv6 /64). A flood
//! from a few sources therefore evicts its own connections, and a client from anywhere else
//! keeps its slot for the few milliseconds its handshake takes. Only when every source holds
//! as many as the others (many sources, or everyone behind one load balancer or NAT) does
//! this become "evict the oldest".
//!
//! The lock is held for a few map operations per connection, never across an await.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use prometheus::{IntCounter, IntGauge};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use crate::metrics::Metrics;

/// Where a connection comes from, as far as fairness goes: an IPv4 address, or the /64 of an
/// IPv6 address (one host commonly holds a whole /64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Source {
    V4([u8; 4]),
    V6([u8; 8]),
}

impl From<IpAddr> for Source {
    fn from(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(a) => Source::V4(a.octets()),
            IpAddr::V6(a) => {
                let o = a.octets();
                Source::V6([o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]])
            }
        }
    }
}

struct Held {
    id: u64,
    evict: CancellationToken,
}

/// Rank of a source: connections held, then age of its oldest (older ranks higher).
type Rank = (usize, Reverse<u64>, Source);

#[derive(Default)]
struct State {
    next_id: u64,
    len: usize,
    /// Each source's connections, oldest first.
    by_source: HashMap<Source, VecDeque<Held>>,
    /// Every source with connections, by rank; the last one is evicted from first.
    ranks: BTreeSet<Rank>,
}

impl State {
    fn rank(source: Source, held: &VecDeque<Held>) -> Option<Rank> {
        held.front().map(|h| (held.len(), Reverse(h.id), source))
    }

    /// Applies `change` to `source`'s connections, keeping `ranks` in step.
    fn update<T>(&mut self, source: Source, change: impl FnOnce(&mut VecDeque<Held>) -> T) -> T {
        let held = self.by_source.entry(source).or_default();
        if let Some(rank) = Self::rank(source, held) {
            self.ranks.remove(&rank);
        }
        let out = change(held);
        match Self::rank(source, held) {
            Some(rank) => {
                self.ranks.insert(rank);
            }
            None => {
                self.by_source.remove(&source);
            }
        }
        out
    }
}

/// The unauthenticated connections of one listener.
pub struct Unauthenticated {
    capacity: usize,
    state: Mutex<State>,
    held: IntGauge,
    evicted: IntCounter,
}

/// A connection's slot in the budget, until it is dropped (it authenticated, or it ended) or
/// evicted ([`Ticket::evicted`]).
pub struct Ticket {
    budget: Arc<Unauthenticated>,
    source: Source,
    id: u64,
    evict: CancellationToken,
}

impl Unauthenticated {
    /// A budget of `capacity` connections for the listener `name`, reported in
    /// `jitgate_connections_unauthenticated{listener}` and, for evictions,
    /// `jitgate_connections_refused_total{listener, reason="evicted"}`.
    pub fn new(name: &'static str, capacity: usize, metrics: &Metrics) -> Arc<Self> {
        Arc::new(Self {
            capacity: capacity.max(1),
            state: Mutex::new(State::default()),
            held: metrics.connections_unauthenticated.with_label_values(&[name]),
            evicted: metrics.connections_refused_total.with_label_values(&[name, "evicted"]),
        })
    }

    /// Admits a new connection from `ip`, evicting one held connection when the budget is
    /// full. Never refuses.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Ticket {
        let source = Source::from(ip);
        let evict = CancellationToken::new();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.len >= self.capacity {
            if let Some(&(_, _, victim)) = state.ranks.last() {
                if let Some(h) = state.update(victim, VecDeque::pop_front) {
                    h.evict.cancel();
                    state.len -= 1;
                    self.evicted.inc();
                }
            }
        }
        let id = state.next_id;
        state.next_id += 1;
        let token = evict.clone();
        state.update(source, |held| held.push_back(Held { id, evict: token }));
        state.len += 1;
        self.held.set(i64::try_from(state.len).unwrap_or(i64::MAX));
        Ticket {
            budget: Arc::clone(self),
            source,
            id,
            evict,
        }
    }

    /// Connections held now.
    pub fn len(&self) -> usize {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).len
    }

    /// Whether no connection is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn release(&self, source: Source, id: u64) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if !state.by_source.contains_key(&source) {
            return;
        }
        let removed = state.update(source, |held| {
            let at = held.iter().position(|h| h.id == id)?;
            held.remove(at)
        });
        if removed.is_some() {
            state.len -= 1;
            self.held.set(i64::try_from(state.len).unwrap_or(i64::MAX));
        }
    }
}

impl Ticket {
    /// Resolves when a newer connection has taken this slot: the connection must close.
    pub fn evicted(&self) -> WaitForCancellationFuture<'_> {
        self.evict.cancelled()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.budget.release(self.source, self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn is_evicted(t: &Ticket) -> bool {
        t.evict.is_cancelled()
    }

    #[test]
    fn a_full_budget_evicts_from_the_source_holding_the_most() {
        let metrics = Metrics::new();
        let budget = Unauthenticated::new("postgres", 4, &metrics);
        let user = budget.admit(ip("10.0.0.1"));
        let flood: Vec<Ticket> = (0..3).map(|_| budget.admit(ip("10.0.0.66"))).collect();
        // Full: every newcomer from the flood's address evicts the flood's own oldest.
        let more: Vec<Ticket> = (0..10).map(|_| budget.admit(ip("10.0.0.66"))).collect();
        assert!(!is_evicted(&user));
        assert!(flood.iter().all(is_evicted));
        assert_eq!(more.iter().filter(|t| !is_evicted(t)).count(), 3);
        assert_eq!(budget.len(), 4);
        // A second user arriving now is admitted too, at the flood's expense.
        let other = budget.admit(ip("10.0.0.2"));
        assert!(!is_evicted(&user) && !is_evicted(&other));
        assert_eq!(budget.len(), 4);
        assert_eq!(budget.evicted.get(), 11);
    }

    #[test]
    fn equal_sources_lose_their_oldest_and_ipv6_counts_by_64() {
        let metrics = Metrics::new();
        let budget = Unauthenticated::new("api", 2, &metrics);
        let a = budget.admit(ip("2001:db8::1"));
        let b = budget.admit(ip("2001:db8:0:1::1"));
        let c = budget.admit(ip("2001:db8:0:2::1"));
        assert!(is_evicted(&a) && !is_evicted(&b) && !is_evicted(&c));
        // Two addresses of one /64 are one source.
        let d = budget.admit(ip("2001:db8:0:2::2"));
        assert!(is_evicted(&b) && !is_evicted(&c) && !is_evicted(&d));
        let e = budget.admit(ip("2001:db8:0:3::1"));
        assert!(is_evicted(&c) && !is_evicted(&d) && !is_evicted(&e));
    }

    #[test]
    fn dropped_tickets_free_their_slot() {
        let metrics = Metrics::new();
        let budget = Unauthenticated::new("postgres", 2, &metrics);
        let a = budget.admit(ip("127.0.0.1"));
        let b = budget.admit(ip("127.0.0.1"));
        drop(a);
        assert_eq!(budget.len(), 1);
        let c = budget.admit(ip("::ffff:127.0.0.1"));
        assert!(!is_evicted(&b) && !is_evicted(&c));
        drop((b, c));
        assert!(budget.is_empty());
        assert_eq!(budget.held.get(), 0);
        // An evicted ticket dropped later does not free anyone else's slot.
        let x = budget.admit(ip("127.0.0.1"));
        let y = budget.admit(ip("127.0.0.1"));
        let z = budget.admit(ip("127.0.0.1"));
        assert!(is_evicted(&x));
        drop(x);
        assert_eq!(budget.len(), 2);
        drop((y, z));
        assert!(budget.is_empty());
    }
}
