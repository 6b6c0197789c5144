//! The embedded store: one SQLite file in the data directory, WAL mode, `synchronous=FULL` so
//! a committed change survives a crash.
//!
//! SQLite runs on a thread of its own: every call is a job sent to it over a channel and
//! answered through a oneshot, so no tokio worker ever waits on the file. Compare-and-set is a
//! conditional `UPDATE` (the grant still live, the request still at its version) inside the
//! thread's single connection; a job that touches two tables runs in one transaction.

use std::path::Path;
use std::sync::mpsc;
use std::time::SystemTime;

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension as _};
use tokio::sync::{broadcast, oneshot};

use super::{Change, GrantWrite, RequestQuery, Store, StoreError, Versioned};
use crate::model::{
    AgentName, AgentRecord, AgentToken, Grant, GrantEnd, GrantId, Invite, Request, RequestId, RequestState, SlackLink,
    TargetName, TokenRefusal, UserName,
};
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
CREATE TABLE IF NOT EXISTS agent_tokens (
    id            TEXT PRIMARY KEY,
    agent         TEXT NOT NULL,
    targets       TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL,
    created_by    TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    expires_at    INTEGER NOT NULL,
    used_at       INTEGER
);
CREATE TABLE IF NOT EXISTS invites (
    id            TEXT PRIMARY KEY,
    user          TEXT NOT NULL,
    roles         TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL,
    created_by    TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    expires_at    INTEGER NOT NULL,
    used_at       INTEGER
);
CREATE TABLE IF NOT EXISTS slack_links (
    team       TEXT NOT NULL,
    slack_user TEXT NOT NULL,
    user       TEXT NOT NULL,
    roles      TEXT NOT NULL,
    linked_at  INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (team, slack_user)
);
CREATE TABLE IF NOT EXISTS agents (
    name      TEXT PRIMARY KEY,
    targets   TEXT NOT NULL,
    joined_at INTEGER NOT NULL,
    token     TEXT NOT NULL
);
";

/// `PRAGMA user_version` of the current schema: 1 added `requests.version`; 2 added the
/// `agent_tokens` and `agents` tables; 3 the `invites` table; 4 the `slack_links` table
/// (both created by `SCHEMA`, nothing to migrate).
const SCHEMA_VERSION: i64 = 4;

/// How many changes a slow follower of [`Store::changes`] may fall behind.
const CHANGES: usize = 4096;

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// SQLite-backed [`Store`].
pub struct SqliteStore {
    jobs: mpsc::Sender<Job>,
    changes: broadcast::Sender<Change>,
}

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl SqliteStore {
    /// Opens or creates the store file (creating or upgrading the schema) and starts its thread.
    /// Blocking: call it before serving, or from `spawn_blocking`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = open_connection(path)?;
        let (jobs, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("jitgate-store".into())
            .spawn(move || {
                let mut conn = conn;
                // Ends when the last sender (the store) is dropped.
                while let Ok(job) = rx.recv() {
                    job(&mut conn);
                }
            })
            .map_err(err)?;
        let (changes, _) = broadcast::channel(CHANGES);
        Ok(Self { jobs, changes })
    }

    /// Runs `f` on the store's thread.
    async fn call<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Box::new(move |conn| {
                let _ = tx.send(f(conn));
            }))
            .map_err(|_| StoreError::Unavailable("the store thread has stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Unavailable("the store thread has stopped".into()))?
    }

    fn publish(&self, change: Change) {
        // No follower is not an error.
        let _ = self.changes.send(change);
    }
}

fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(|e| err(format!("{}: {e}", path.display())))?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        // Grant history is not for other local users.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| err(format!("{}: {e}", path.display())))?;
    }
    conn.pragma_update(None, "journal_mode", "WAL").map_err(err)?;
    conn.pragma_update(None, "synchronous", "FULL").map_err(err)?;
    conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(err)?;
    conn.execute_batch(SCHEMA).map_err(err)?;
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(err)?;
    if version < 1 {
        let has_version = conn
            .prepare("SELECT 1 FROM pragma_table_info('requests') WHERE name = 'version'")
            .and_then(|mut s| s.exists([]))
            .map_err(err)?;
        if !has_version {
            conn.execute_batch("ALTER TABLE requests ADD COLUMN version INTEGER NOT NULL DEFAULT 1")
                .map_err(err)?;
        }
    }
    conn.pragma_update(None, "user_version", SCHEMA_VERSION).map_err(err)?;
    Ok(conn)
}

fn insert_grant(conn: &Connection, g: &Grant) -> Result<(), StoreError> {
    conn.execute(
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

/// `Conflict` when the grant exists but is no longer live (or moved), `NotFound` when it does
/// not exist: what a conditional update that changed nothing means.
fn why_unchanged(conn: &Connection, id: &GrantId) -> StoreError {
    let exists = conn
        .query_row("SELECT 1 FROM grants WHERE id = ?1", [id.as_str()], |_| Ok(()))
        .optional();
    match exists {
        Ok(Some(())) => StoreError::Conflict,
        Ok(None) => StoreError::NotFound,
        Err(e) => err(e),
    }
}

fn extend_grant(conn: &Connection, id: &GrantId, from: SystemTime, to: SystemTime) -> Result<(), StoreError> {
    let n = conn
        .execute(
            "UPDATE grants SET expires_at = ?3 WHERE id = ?1 AND ended_at IS NULL AND expires_at = ?2",
            params![id.as_str(), to_millis(from), to_millis(to)],
        )
        .map_err(err)?;
    if n == 1 {
        Ok(())
    } else {
        Err(why_unchanged(conn, id))
    }
}

fn request_body(r: &Request) -> Result<String, StoreError> {
    serde_json::to_string(r).map_err(err)
}

fn decode_request(body: &str) -> Result<Request, StoreError> {
    serde_json::from_str(body).map_err(|e| err(format!("stored request: {e}")))
}

fn targets_json(targets: &[TargetName]) -> Result<String, StoreError> {
    serde_json::to_string(targets).map_err(err)
}

fn decode_targets(json: &str) -> Result<Vec<TargetName>, StoreError> {
    serde_json::from_str(json).map_err(|e| err(format!("stored agent targets: {e}")))
}

fn redeem_agent_token(
    conn: &mut Connection,
    id: &str,
    secret_sha256: &str,
    now: SystemTime,
) -> Result<Result<AgentRecord, TokenRefusal>, StoreError> {
    let tx = conn.transaction().map_err(err)?;
    let row = tx
        .query_row(
            "SELECT agent, targets, secret_sha256, expires_at, used_at FROM agent_tokens WHERE id = ?1",
            [id],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, Option<i64>>(4)?,
                ))
            },
        )
        .optional()
        .map_err(err)?;
    let Some((agent, targets, stored, expires_at, used_at)) = row else {
        return Ok(Err(TokenRefusal::Unknown));
    };
    // Both are hashes of the same length; compared in constant time anyway.
    if !ring_eq(stored.as_bytes(), secret_sha256.as_bytes()) {
        return Ok(Err(TokenRefusal::Unknown));
    }
    if used_at.is_some() {
        return Ok(Err(TokenRefusal::Used));
    }
    if from_millis(expires_at) <= now {
        return Ok(Err(TokenRefusal::Expired));
    }
    // The compare-and-set: of two redemptions at once, one updates the row.
    let n = tx
        .execute(
            "UPDATE agent_tokens SET used_at = ?2 WHERE id = ?1 AND used_at IS NULL",
            params![id, to_millis(now)],
        )
        .map_err(err)?;
    if n != 1 {
        return Ok(Err(TokenRefusal::Used));
    }
    tx.execute(
        "INSERT INTO agents (name, targets, joined_at, token) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (name) DO UPDATE SET targets = excluded.targets, joined_at = excluded.joined_at,
             token = excluded.token",
        params![agent, targets, to_millis(now), id],
    )
    .map_err(err)?;
    tx.commit().map_err(err)?;
    Ok(Ok(AgentRecord {
        name: AgentName::new(agent).map_err(err)?,
        targets: decode_targets(&targets)?,
        joined_at: now,
        token: id.to_owned(),
    }))
}

fn redeem_invite(
    conn: &mut Connection,
    id: &str,
    secret_sha256: &str,
    now: SystemTime,
) -> Result<Result<Invite, TokenRefusal>, StoreError> {
    let tx = conn.transaction().map_err(err)?;
    let row = tx
        .query_row(
            "SELECT user, roles, secret_sha256, created_by, created_at, expires_at, used_at FROM invites WHERE id = ?1",
            [id],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, Option<i64>>(6)?,
                ))
            },
        )
        .optional()
        .map_err(err)?;
    let Some((user, roles, stored, created_by, created_at, expires_at, used_at)) = row else {
        return Ok(Err(TokenRefusal::Unknown));
    };
    if !ring_eq(stored.as_bytes(), secret_sha256.as_bytes()) {
        return Ok(Err(TokenRefusal::Unknown));
    }
    if used_at.is_some() {
        return Ok(Err(TokenRefusal::Used));
    }
    if from_millis(expires_at) <= now {
        return Ok(Err(TokenRefusal::Expired));
    }
    let n = tx
        .execute(
            "UPDATE invites SET used_at = ?2 WHERE id = ?1 AND used_at IS NULL",
            params![id, to_millis(now)],
        )
        .map_err(err)?;
    if n != 1 {
        return Ok(Err(TokenRefusal::Used));
    }
    tx.commit().map_err(err)?;
    Ok(Ok(Invite {
        id: id.to_owned(),
        user: UserName::new(user).map_err(err)?,
        roles: serde_json::from_str(&roles).map_err(|e| err(format!("stored invite roles: {e}")))?,
        secret_sha256: stored,
        created_by: UserName::new(created_by).map_err(err)?,
        created_at: from_millis(created_at),
        expires_at: from_millis(expires_at),
    }))
}

/// Constant-time equality of two byte strings (false when the lengths differ).
fn ring_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[async_trait]
impl Store for SqliteStore {
    async fn insert_agent_token(&self, token: &AgentToken) -> Result<(), StoreError> {
        let t = token.clone();
        self.call(move |conn| {
            conn.execute(
                "INSERT INTO agent_tokens (id, agent, targets, secret_sha256, created_by, created_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    t.id,
                    t.agent.as_str(),
                    targets_json(&t.targets)?,
                    t.secret_sha256,
                    t.created_by.as_str(),
                    to_millis(t.created_at),
                    to_millis(t.expires_at)
                ],
            )
            .map_err(err)?;
            Ok(())
        })
        .await
    }

    async fn redeem_agent_token(
        &self,
        id: &str,
        secret_sha256: &str,
        now: SystemTime,
    ) -> Result<Result<AgentRecord, TokenRefusal>, StoreError> {
        let (id, secret) = (id.to_owned(), secret_sha256.to_owned());
        self.call(move |conn| redeem_agent_token(conn, &id, &secret, now)).await
    }

    async fn insert_invite(&self, invite: &Invite) -> Result<(), StoreError> {
        let i = invite.clone();
        self.call(move |conn| {
            conn.execute(
                "INSERT INTO invites (id, user, roles, secret_sha256, created_by, created_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    i.id,
                    i.user.as_str(),
                    serde_json::to_string(&i.roles).map_err(err)?,
                    i.secret_sha256,
                    i.created_by.as_str(),
                    to_millis(i.created_at),
                    to_millis(i.expires_at)
                ],
            )
            .map_err(err)?;
            Ok(())
        })
        .await
    }

    async fn redeem_invite(
        &self,
        id: &str,
        secret_sha256: &str,
        now: SystemTime,
    ) -> Result<Result<Invite, TokenRefusal>, StoreError> {
        let (id, secret) = (id.to_owned(), secret_sha256.to_owned());
        self.call(move |conn| redeem_invite(conn, &id, &secret, now)).await
    }

    async fn upsert_slack_link(&self, link: &SlackLink) -> Result<(), StoreError> {
        let l = link.clone();
        self.call(move |conn| {
            conn.execute(
                "INSERT INTO slack_links (team, slack_user, user, roles, linked_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (team, slack_user) DO UPDATE SET
                   user = excluded.user, roles = excluded.roles,
                   linked_at = excluded.linked_at, expires_at = excluded.expires_at",
                params![
                    l.team,
                    l.slack_user,
                    l.user.as_str(),
                    serde_json::to_string(&l.roles).map_err(err)?,
                    to_millis(l.linked_at),
                    to_millis(l.expires_at)
                ],
            )
            .map_err(err)?;
            Ok(())
        })
        .await
    }

    async fn slack_link(&self, team: &str, slack_user: &str) -> Result<Option<SlackLink>, StoreError> {
        let (team, slack_user) = (team.to_owned(), slack_user.to_owned());
        self.call(move |conn| {
            let row = conn
                .query_row(
                    "SELECT user, roles, linked_at, expires_at FROM slack_links WHERE team = ?1 AND slack_user = ?2",
                    params![team, slack_user],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, i64>(2)?,
                            r.get::<_, i64>(3)?,
                        ))
                    },
                )
                .optional()
                .map_err(err)?;
            let Some((user, roles, linked_at, expires_at)) = row else {
                return Ok(None);
            };
            Ok(Some(SlackLink {
                slack_user,
                team,
                user: UserName::new(user).map_err(|e| err(format!("stored slack link user: {e}")))?,
                roles: serde_json::from_str(&roles).map_err(|e| err(format!("stored slack link roles: {e}")))?,
                linked_at: from_millis(linked_at),
                expires_at: from_millis(expires_at),
            }))
        })
        .await
    }

    async fn remove_agent(&self, name: &AgentName) -> Result<(), StoreError> {
        let key = name.to_string();
        self.call(move |conn| {
            match conn
                .execute("DELETE FROM agents WHERE name = ?1", [&key])
                .map_err(err)?
            {
                0 => Err(StoreError::NotFound),
                _ => Ok(()),
            }
        })
        .await?;
        self.publish(Change::AgentRemoved { name: name.clone() });
        Ok(())
    }

    async fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        self.call(|conn| {
            let mut stmt = conn
                .prepare("SELECT name, targets, joined_at, token FROM agents ORDER BY name")
                .map_err(err)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, String>(3)?,
                    ))
                })
                .map_err(err)?;
            let mut out = Vec::new();
            for row in rows {
                let (name, targets, joined_at, token) = row.map_err(err)?;
                out.push(AgentRecord {
                    name: AgentName::new(name).map_err(err)?,
                    targets: decode_targets(&targets)?,
                    joined_at: from_millis(joined_at),
                    token,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn insert_grant(&self, grant: &Grant) -> Result<(), StoreError> {
        let g = grant.clone();
        self.call(move |conn| insert_grant(conn, &g)).await?;
        self.publish(Change::GrantCreated(grant.clone()));
        Ok(())
    }

    async fn end_grant(&self, id: &GrantId, end: GrantEnd, at: SystemTime) -> Result<(), StoreError> {
        let gid = id.clone();
        self.call(move |conn| {
            let n = conn
                .execute(
                    "UPDATE grants SET ended_at = ?2, end_reason = ?3 WHERE id = ?1 AND ended_at IS NULL",
                    params![gid.as_str(), to_millis(at), end.as_str()],
                )
                .map_err(err)?;
            if n == 1 {
                Ok(())
            } else {
                Err(why_unchanged(conn, &gid))
            }
        })
        .await?;
        self.publish(Change::GrantEnded { id: id.clone(), end });
        Ok(())
    }

    async fn extend_grant(&self, id: &GrantId, from: SystemTime, to: SystemTime) -> Result<(), StoreError> {
        let gid = id.clone();
        self.call(move |conn| extend_grant(conn, &gid, from, to)).await?;
        self.publish(Change::GrantExtended {
            id: id.clone(),
            expires_at: to,
        });
        Ok(())
    }

    async fn live_grants(&self) -> Result<Vec<Grant>, StoreError> {
        self.call(|conn| {
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
                    access: access.parse().map_err(err)?,
                    reason,
                    created_by: UserName::new(by).map_err(err)?,
                    created_at: from_millis(created),
                    expires_at: from_millis(expires),
                });
            }
            Ok(grants)
        })
        .await
    }

    async fn insert_request(&self, request: &Request) -> Result<(), StoreError> {
        let r = request.clone();
        let body = request_body(request)?;
        self.call(move |conn| {
            conn.execute(
                "INSERT INTO requests (id, user, state, break_glass, created_at, lapses_at, body, version)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 1)",
                params![
                    r.id.as_str(),
                    r.user.as_str(),
                    r.state.as_str(),
                    r.break_glass,
                    to_millis(r.created_at),
                    to_millis(r.lapses_at),
                    body
                ],
            )
            .map_err(err)?;
            Ok(())
        })
        .await?;
        self.publish(Change::RequestChanged {
            id: request.id.clone(),
            version: 1,
        });
        Ok(())
    }

    async fn update_request(
        &self,
        request: &Request,
        version: u64,
        grant: Option<GrantWrite<'_>>,
    ) -> Result<u64, StoreError> {
        let r = request.clone();
        let body = request_body(request)?;
        let owned_grant = grant.map(|g| match g {
            GrantWrite::Insert(g) => OwnedWrite::Insert(g.clone()),
            GrantWrite::Extend { id, from, to } => OwnedWrite::Extend {
                id: id.clone(),
                from,
                to,
            },
        });
        let write = owned_grant.clone();
        let next = version + 1;
        self.call(move |conn| {
            let tx = conn.transaction().map_err(err)?;
            let v = i64::try_from(version).map_err(err)?;
            let n = tx
                .execute(
                    "UPDATE requests SET state = ?2, lapses_at = ?3, body = ?4, version = version + 1
                     WHERE id = ?1 AND version = ?5",
                    params![r.id.as_str(), r.state.as_str(), to_millis(r.lapses_at), body, v],
                )
                .map_err(err)?;
            if n != 1 {
                let exists = tx
                    .query_row("SELECT 1 FROM requests WHERE id = ?1", [r.id.as_str()], |_| Ok(()))
                    .optional()
                    .map_err(err)?;
                return Err(if exists.is_some() {
                    StoreError::Conflict
                } else {
                    StoreError::NotFound
                });
            }
            match &write {
                Some(OwnedWrite::Insert(g)) => insert_grant(&tx, g)?,
                Some(OwnedWrite::Extend { id, from, to }) => extend_grant(&tx, id, *from, *to)?,
                None => {}
            }
            tx.commit().map_err(err)?;
            Ok(())
        })
        .await?;
        self.publish(Change::RequestChanged {
            id: request.id.clone(),
            version: next,
        });
        match owned_grant {
            Some(OwnedWrite::Insert(g)) => self.publish(Change::GrantCreated(g)),
            Some(OwnedWrite::Extend { id, to, .. }) => self.publish(Change::GrantExtended { id, expires_at: to }),
            None => {}
        }
        Ok(next)
    }

    async fn request(&self, id: &RequestId) -> Result<Option<Versioned<Request>>, StoreError> {
        let id = id.clone();
        self.call(move |conn| {
            let row = conn
                .query_row("SELECT body, version FROM requests WHERE id = ?1", [id.as_str()], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
                })
                .optional()
                .map_err(err)?;
            row.map(|(body, version)| {
                Ok(Versioned {
                    value: decode_request(&body)?,
                    version: u64::try_from(version).map_err(err)?,
                })
            })
            .transpose()
        })
        .await
    }

    async fn requests(&self, query: &RequestQuery) -> Result<Vec<Request>, StoreError> {
        let q = query.clone();
        self.call(move |conn| {
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
            rows.iter().map(|b| decode_request(b)).collect()
        })
        .await
    }

    async fn pending_due(&self, now: SystemTime) -> Result<Vec<Versioned<Request>>, StoreError> {
        self.call(move |conn| {
            let mut stmt = conn
                .prepare(
                    "SELECT body, version FROM requests WHERE state = 'pending' AND lapses_at <= ?1
                     ORDER BY lapses_at",
                )
                .map_err(err)?;
            let rows = stmt
                .query_map([to_millis(now)], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
                .map_err(err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(err)?;
            rows.iter()
                .map(|(body, version)| {
                    Ok(Versioned {
                        value: decode_request(body)?,
                        version: u64::try_from(*version).map_err(err)?,
                    })
                })
                .collect()
        })
        .await
    }

    fn changes(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }
}

/// A [`GrantWrite`] that can cross to the store's thread.
#[derive(Debug, Clone)]
enum OwnedWrite {
    Insert(Grant),
    Extend {
        id: GrantId,
        from: SystemTime,
        to: SystemTime,
    },
}

#[cfg(test)]
mod tests;
