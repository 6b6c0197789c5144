//! Live sessions per user, bounded by `limits.max_sessions_per_user`, so one user cannot take
//! every session slot of the listener. The count is held by a [`UserSlot`] for the life of the
//! session. The lock is held only to change one counter, so it is safe on a tokio worker.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use crate::model::UserName;

/// Session counts per user.
pub struct UserSessions {
    max: usize,
    counts: Mutex<HashMap<UserName, usize>>,
}

/// One of a user's sessions; gives the slot back when dropped.
pub struct UserSlot {
    owner: Arc<UserSessions>,
    user: UserName,
}

impl UserSessions {
    /// At most `max` sessions per user.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            counts: Mutex::new(HashMap::new()),
        })
    }

    /// The configured limit (`limits.max_sessions_per_user`).
    pub fn max(&self) -> usize {
        self.max
    }

    /// A slot for one more session of `user`, or `None` when the user already holds `max`.
    pub fn try_take(self: &Arc<Self>, user: &UserName) -> Option<UserSlot> {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let n = counts.entry(user.clone()).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(UserSlot {
            owner: Arc::clone(self),
            user: user.clone(),
        })
    }

    /// Sessions `user` holds now.
    pub fn held(&self, user: &UserName) -> usize {
        let counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        counts.get(user).copied().unwrap_or(0)
    }
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut counts = self.owner.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = counts.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_gets_at_most_max_slots_and_dropped_slots_come_back() {
        let users = UserSessions::new(2);
        let (alice, bob) = (UserName::new("alice").unwrap(), UserName::new("bob").unwrap());
        let a1 = users.try_take(&alice).unwrap();
        let _a2 = users.try_take(&alice).unwrap();
        assert!(users.try_take(&alice).is_none());
        assert!(users.try_take(&bob).is_some(), "another user is not affected");
        drop(a1);
        assert_eq!(users.held(&alice), 1);
        assert!(users.try_take(&alice).is_some());
    }
}
