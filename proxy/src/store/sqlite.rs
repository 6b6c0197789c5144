//! The embedded store: one SQLite file in the data directory, WAL mode, `synchronous=FULL` so
//! a committed grant change survives a crash.

use std::path::Path;
use std::sync::Mutex;
use std::time::SystemTime;

use rusqlite::{params, Connection};

use super::{GrantStore, RequestQuery, RequestStore, StoreError};
use crate::model::{Grant, GrantEnd, GrantId, Request, RequestId, RequestState, TargetName, UserName};
use crate::timefmt::{from_millis, to_millis};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS grants (
    id          TEXT PRIMARY KEY,
    user        TEXT NOT NULL,
    target      TEXT NOT NULL,
    access      TEXT NOT NULL,
    reason      TEXT NOT NULL,
    created_by  TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    ended_at    INTEGER,
    end_reason  TEXT
);
CREATE INDEX IF NOT EXISTS grants_active ON grants (ended_at) WHERE ended_at IS NULL;
CREATE TABLE IF NOT EXISTS requests (
    id          TEXT PRIMARY KEY,
    user        TEXT NOT NULL,
    state       TEXT NOT NULL,
    break_glass INTEGER NOT NULL,
    created_at  INTEGER NOT NULL,
    lapses_at   INTEGER NOT NULL,
    body        TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS requests_state ON requests (state, lapses_at);
CREATE INDEX IF NOT EXISTS requests_created ON requests (created_at);
";

/// SQLite-backed [`GrantStore`].
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

impl SqliteStore {
    /// Opens or creates the store file.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path).map_err(|e| StoreError(format!("{}: {e}", path.display())))?;
        {
            use std::os::unix::fs::PermissionsExt as _;
            // Grant history is not for other local users.
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| StoreError(format!("{}: {e}", path.display())))?;
        }
        conn.pragma_update(None, "journal_mode", "WAL").map_err(err)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        Ok(Self { conn: Mutex::new(conn) })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        match self.conn.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

impl GrantStore for SqliteStore {
    fn insert(&self, g: &Grant) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "INSERT INTO grants (id, user, target, access, reason, created_by, created_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    g.id.as_str(),
                    g.user.as_str(),
                    g.target.as_str(),
                    g.access.as_str(),
                    g.reason,
                    g.created_by.as_str(),
                    to_millis(g.created_at),
                    to_millis(g.expires_at),
                ],
            )
            .map_err(err)?;
        Ok(())
    }

    fn end(&self, id: &GrantId, end: GrantEnd, at: SystemTime) -> Result<bool, StoreError> {
        let n = self
            .conn()
            .execute(
                "UPDATE grants SET ended_at = ?2, end_reason = ?3 WHERE id = ?1 AND ended_at IS NULL",
                params![id.as_str(), to_millis(at), end.as_str()],
            )
            .map_err(err)?;
        Ok(n == 1)
    }

    fn extend(&self, id: &GrantId, expires_at: SystemTime) -> Result<bool, StoreError> {
        let n = self
            .conn()
            .execute(
                "UPDATE grants SET expires_at = ?2 WHERE id = ?1 AND ended_at IS NULL",
                params![id.as_str(), to_millis(expires_at)],
            )
            .map_err(err)?;
        Ok(n == 1)
    }

    fn active(&self) -> Result<Vec<Grant>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT id, user, target, access, reason, created_by, created_at, expires_at
                 FROM grants WHERE ended_at IS NULL ORDER BY created_at",
            )
            .map_err(err)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, i64>(6)?,
                    r.get::<_, i64>(7)?,
                ))
            })
            .map_err(err)?;
        let mut grants = Vec::new();
        for row in rows {
            let (id, user, target, access, reason, by, created, expires) = row.map_err(err)?;
            grants.push(Grant {
                id: GrantId::from_string(id),
                user: UserName::new(user).map_err(err)?,
                target: TargetName::new(target).map_err(err)?,
                access: access.parse().map_err(StoreError)?,
                reason,
                created_by: UserName::new(by).map_err(err)?,
                created_at: from_millis(created),
                expires_at: from_millis(expires),
            });
        }
        Ok(grants)
    }
}

/// The indexed columns of a request row, then its JSON body.
fn request_row(r: &Request) -> Result<(i64, i64, String), StoreError> {
    let body = serde_json::to_string(r).map_err(err)?;
    Ok((to_millis(r.created_at), to_millis(r.lapses_at), body))
}

fn decode_requests(rows: Vec<String>) -> Result<Vec<Request>, StoreError> {
    rows.iter()
        .map(|body| serde_json::from_str(body).map_err(|e| StoreError(format!("stored request: {e}"))))
        .collect()
}

impl RequestStore for SqliteStore {
    fn insert_request(&self, r: &Request) -> Result<(), StoreError> {
        let (created, lapses, body) = request_row(r)?;
        self.conn()
            .execute(
                "INSERT INTO requests (id, user, state, break_glass, created_at, lapses_at, body)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    r.id.as_str(),
                    r.user.as_str(),
                    r.state.as_str(),
                    r.break_glass,
                    created,
                    lapses,
                    body
                ],
            )
            .map_err(err)?;
        Ok(())
    }

    fn update_request(&self, r: &Request) -> Result<(), StoreError> {
        let (_, lapses, body) = request_row(r)?;
        let n = self
            .conn()
            .execute(
                "UPDATE requests SET state = ?2, lapses_at = ?3, body = ?4 WHERE id = ?1",
                params![r.id.as_str(), r.state.as_str(), lapses, body],
            )
            .map_err(err)?;
        if n == 1 {
            Ok(())
        } else {
            Err(StoreError(format!("request {} is not stored", r.id)))
        }
    }

    fn request(&self, id: &RequestId) -> Result<Option<Request>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT body FROM requests WHERE id = ?1").map_err(err)?;
        let mut rows = stmt.query_map([id.as_str()], |r| r.get::<_, String>(0)).map_err(err)?;
        match rows.next() {
            Some(body) => Ok(decode_requests(vec![body.map_err(err)?])?.pop()),
            None => Ok(None),
        }
    }

    fn requests(&self, q: &RequestQuery) -> Result<Vec<Request>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT body FROM requests
                 WHERE (?1 IS NULL OR user = ?1) AND (?2 IS NULL OR state = ?2) AND (?3 = 0 OR break_glass = 1)
                 ORDER BY created_at DESC, id LIMIT ?4",
            )
            .map_err(err)?;
        let limit = if q.limit == 0 {
            -1
        } else {
            i64::try_from(q.limit).unwrap_or(-1)
        };
        let rows = stmt
            .query_map(
                params![
                    q.user.as_ref().map(UserName::as_str),
                    q.state.map(RequestState::as_str),
                    q.break_glass,
                    limit
                ],
                |r| r.get::<_, String>(0),
            )
            .map_err(err)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(err)?;
        decode_requests(rows)
    }

    fn pending_due(&self, now: SystemTime) -> Result<Vec<Request>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT body FROM requests WHERE state = 'pending' AND lapses_at <= ?1 ORDER BY lapses_at")
            .map_err(err)?;
        let rows = stmt
            .query_map([to_millis(now)], |r| r.get::<_, String>(0))
            .map_err(err)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(err)?;
        decode_requests(rows)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::model::AccessLevel;

    #[test]
    fn grants_survive_reopen_and_end_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jitgate.db");
        let now = SystemTime::now();
        let g = Grant {
            id: GrantId::generate(),
            user: UserName::new("alice").unwrap(),
            target: TargetName::new("prod-db").unwrap(),
            access: AccessLevel::Read,
            reason: "INC-1".into(),
            created_by: UserName::new("admin").unwrap(),
            created_at: now,
            expires_at: now + Duration::from_secs(60),
        };
        SqliteStore::open(&path).unwrap().insert(&g).unwrap();
        let store = SqliteStore::open(&path).unwrap();
        let active = store.active().unwrap();
        assert_eq!(active.len(), 1);
        assert_eq!(active[0].id, g.id);
        assert_eq!(active[0].user, g.user);
        assert!(store.end(&g.id, GrantEnd::Revoked, now).unwrap());
        assert!(!store.end(&g.id, GrantEnd::Expired, now).unwrap());
        assert!(SqliteStore::open(&path).unwrap().active().unwrap().is_empty());
    }
}
