//! How sessions log in to their target: the access level's static role, or, with
//! `credentials.mode = "ephemeral"`, a login role per grant that lives exactly as long as the
//! grant.
//!
//! The temporary role is made lazily, at the grant's first session, by the target's manager
//! role: `jit_<user>_<grant>`, a random 32-byte password sent as a SCRAM verifier (so the
//! password never reaches the server's logs), `VALID UNTIL` the grant's end, `IN ROLE` the
//! level's role, a `CONNECTION LIMIT`, and a comment that marks it as this deployment's with
//! the grant id. The password lives only in the memory of the replica that set it last; a
//! replica that does not know it sets a new one (under an advisory lock, so two replicas never
//! race on it). The engineer never sees it.
//!
//! When the grant ends the sessions are cut as always ([`crate::access`]); the reconciler here
//! then makes the role unable to log in, terminates its backends, deals with what it owns by
//! the target's `on_end`, and drops it. It runs when a grant ends or moves, at start-up and
//! every minute, so a role left behind by a killed proxy is dropped too. Failures are retried
//! with backoff and counted in `jitgate_credential_failures_total`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use dashmap::DashMap;
use rand::RngCore;
use tokio::time::{timeout, Instant};
use tokio_postgres::config::SslMode;
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;

use crate::access::table::GrantTable;
use crate::access::Lease;
use crate::audit::{AuditEvent, AuditLog};
use crate::config::{CredentialsMode, Ephemeral, OnEnd, Target};
use crate::metrics::Metrics;
use crate::model::{Grant, GrantId, TargetName, UserName};
use crate::pg::upstream::{self, Connector, Login, Upstream, UpstreamError};
use crate::store::Store;

/// Every temporary role's name starts with this; the guard protects every such role.
pub const ROLE_PREFIX: &str = "jit_";

/// How often the reconciler looks at every ephemeral target when nothing wakes it.
pub const RECONCILE_EVERY: Duration = Duration::from_secs(60);

/// Retries of a failed target wait 1 s, 2 s, 4 s, ... at most this.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Bound on one manager operation (connect, lock, statements).
const MANAGER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a drop waits for terminated backends to go.
const TERMINATE_WAIT: Duration = Duration::from_secs(5);

/// The start of every marker comment (`COMMENT ON ROLE`).
const MARKER: &str = "jitgate";

/// The grant's temporary role: `jit_`, the user name (lowercased, anything but `a-z0-9_` as
/// `_`, cut to fit) and 12 hex digits of the grant id; at most 63 bytes.
pub fn role_name(user: &UserName, grant: &GrantId) -> String {
    let id: String = grant
        .as_str()
        .trim_start_matches("g-")
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(12)
        .collect::<String>()
        .to_ascii_lowercase();
    let room = 63 - ROLE_PREFIX.len() - 1 - id.len();
    let user: String = user
        .as_str()
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '_') => c,
            _ => '_',
        })
        .take(room)
        .collect();
    format!("{ROLE_PREFIX}{user}_{id}")
}

/// The role a session of `grant` logs in as on `target` (recorded with every statement).
pub fn upstream_role(target: &Target, grant: &Grant) -> String {
    match &target.mode {
        CredentialsMode::Ephemeral(_) => role_name(&grant.user, &grant.id),
        CredentialsMode::Static => target
            .credentials
            .get(&grant.access)
            .map(|c| c.user.clone())
            .unwrap_or_default(),
    }
}

/// `"name"`, with `"` doubled: an identifier the server reads as written.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `'text'`, with `'` doubled (`standard_conforming_strings` is on for the manager).
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// A timestamp PostgreSQL reads exactly (microseconds, UTC).
fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

/// The advisory lock every replica takes on the target before it creates, re-keys or drops a
/// role: one key per role name (FNV-1a), so different grants never wait on each other.
fn lock_key(role: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in b"jitgate-role:".iter().chain(role.as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h as i64
}

/// Why a manager operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("cannot reach the target: {0}")]
    Connect(#[from] UpstreamError),
    #[error("the manager role {user} cannot log in: {source}")]
    Login {
        user: String,
        source: tokio_postgres::Error,
    },
    #[error("{0}")]
    Sql(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("the manager role {user} is not fit: {message}")]
    Unfit { user: String, message: String },
}

impl ManagerError {
    /// The target could not be reached (rather than answering wrongly): start-up goes on, and
    /// the reconciler retries.
    pub fn unreachable(&self) -> bool {
        matches!(self, ManagerError::Connect(_) | ManagerError::Timeout(_))
            || matches!(self, ManagerError::Login { source, .. } if source.as_db_error().is_none())
    }
}

fn sql_error(e: tokio_postgres::Error) -> ManagerError {
    match e.as_db_error() {
        Some(db) => ManagerError::Sql(format!("{} ({})", db.message(), db.code().code())),
        None => ManagerError::Sql(e.to_string()),
    }
}

/// A role the reconciler found on a target, marked as this deployment's.
#[derive(Debug)]
struct Marked {
    role: String,
    grant: GrantId,
    /// `VALID UNTIL` as seconds since the epoch (`None`: no limit).
    valid_until: Option<f64>,
}

/// Logs sessions in and looks after the temporary roles of every ephemeral target.
pub struct Credentials {
    connector: Connector,
    targets: Arc<HashMap<TargetName, Arc<Target>>>,
    table: Arc<GrantTable>,
    store: Arc<dyn Store>,
    audit: Arc<AuditLog>,
    metrics: Arc<Metrics>,
    /// Identifies this deployment's roles in their comment (from its CA), so two jitgate
    /// deployments sharing a database never drop each other's roles.
    deployment: String,
    /// Passwords this process set, by grant.
    passwords: DashMap<GrantId, Arc<str>>,
}

/// What [`Credentials::new`] needs.
pub struct CredentialsDeps {
    pub connector: Connector,
    pub targets: Arc<HashMap<TargetName, Arc<Target>>>,
    pub table: Arc<GrantTable>,
    pub store: Arc<dyn Store>,
    pub audit: Arc<AuditLog>,
    pub metrics: Arc<Metrics>,
    /// The CA certificate's bytes: their hash marks this deployment's roles.
    pub ca_cert: Vec<u8>,
}

/// The deployment mark of a CA certificate: 12 hex digits of its SHA-256.
pub fn deployment_mark(ca_cert: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(ca_cert)
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Credentials {
    pub fn new(deps: CredentialsDeps) -> Arc<Self> {
        Arc::new(Self {
            deployment: deployment_mark(&deps.ca_cert),
            connector: deps.connector,
            targets: deps.targets,
            table: deps.table,
            store: deps.store,
            audit: deps.audit,
            metrics: deps.metrics,
            passwords: DashMap::new(),
        })
    }

    /// The comment of a temporary role: this deployment, the target (several targets may
    /// share one server, and each drops only its own roles by its own `on_end`), the grant.
    fn marker(&self, target: &TargetName, grant: &GrantId) -> String {
        format!("{} grant={grant}", self.marker_prefix(target))
    }

    fn marker_prefix(&self, target: &TargetName) -> String {
        format!("{MARKER} deployment={} target={target}", self.deployment)
    }

    /// Logs a session in: as the level's role, or as the grant's temporary role (made now if
    /// it is the grant's first session here).
    pub async fn login(
        &self,
        lease: &Lease,
        database: &str,
        forward: &[(String, String)],
    ) -> Result<Upstream, UpstreamError> {
        let target = lease.target();
        let access = lease.access();
        let level = target
            .credentials
            .get(&access)
            .ok_or(UpstreamError::NoCredentials(access))?;
        let eph = match &target.mode {
            CredentialsMode::Static => {
                let login = Login {
                    user: level.user.clone(),
                    password: level.password.as_deref().map(Arc::from),
                };
                return upstream::connect(&self.connector, lease, &login, database, forward).await;
            }
            CredentialsMode::Ephemeral(e) => e,
        };
        let grant = lease.grant();
        let role = role_name(&grant.user, &grant.id);
        if let Some(password) = self.passwords.get(&grant.id).map(|p| Arc::clone(&p)) {
            let login = Login {
                user: role.clone(),
                password: Some(password),
            };
            match upstream::connect(&self.connector, lease, &login, database, forward).await {
                // Another replica set a new password since: set one again, below.
                Err(UpstreamError::Server { sqlstate, .. }) if sqlstate == "28P01" || sqlstate == "28000" => {}
                done => return done,
            }
        }
        self.provision(lease, eph, &level.user, &role, database, forward).await
    }

    /// Creates the grant's role, or gives it a new password, under the role's advisory lock,
    /// and logs the session in while the lock is held.
    async fn provision(
        &self,
        lease: &Lease,
        eph: &Ephemeral,
        level_role: &str,
        role: &str,
        database: &str,
        forward: &[(String, String)],
    ) -> Result<Upstream, UpstreamError> {
        let target = lease.target();
        let failed = |e: ManagerError| {
            self.metrics
                .credential_failures_total
                .with_label_values(&[target.name.as_str(), "create"])
                .inc();
            tracing::warn!(target = %target.name, role, error = %e, "cannot make the temporary role");
            UpstreamError::Refused(format!("cannot make the temporary role {role}: {e}"))
        };
        let manager = manager(&self.connector, target, eph, &target.database)
            .await
            .map_err(failed)?;
        let key = lock_key(role);
        manager
            .execute("SELECT pg_advisory_lock($1)", &[&key])
            .await
            .map_err(|e| failed(sql_error(e)))?;
        let grant = lease.grant();
        let valid_until = lease.deadline().borrow().at;
        let password = random_password();
        let mut salt = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut salt);
        let verifier = jitgate_protocol::postgres::scram::verifier(&password, &salt, 4096);
        let found = manager
            .query_opt(
                "SELECT coalesce(shobj_description(oid, 'pg_authid'), ''), \
                 rolsuper OR rolcreaterole OR rolcreatedb OR rolreplication OR rolbypassrls \
                 FROM pg_roles WHERE rolname = $1",
                &[&role],
            )
            .await
            .map_err(|e| failed(sql_error(e)))?;
        let exists = found.is_some();
        if let Some(row) = found {
            // A role of that name that is not this grant's, or that has gained an attribute
            // it was not made with, is never logged in as (someone made it to be taken over).
            let (marker, privileged): (String, bool) = (row.get(0), row.get(1));
            if marker != self.marker(&target.name, &grant.id) || privileged {
                let _ = manager.execute("SELECT pg_advisory_unlock($1)", &[&key]).await;
                return Err(failed(ManagerError::Sql(format!(
                    "a role named {role} exists on the target but is not the one jitgate made for grant {} (its comment or attributes differ); refusing to log in as it",
                    grant.id
                ))));
            }
        }
        if exists {
            let sql = format!(
                "ALTER ROLE {} PASSWORD {} VALID UNTIL {}",
                ident(role),
                literal(&verifier),
                literal(&timestamp(valid_until))
            );
            manager.batch_execute(&sql).await.map_err(|e| failed(sql_error(e)))?;
        } else {
            if lease.grant_ended() {
                return Err(UpstreamError::Refused("the grant ended".into()));
            }
            let sql = format!(
                "BEGIN; CREATE ROLE {name} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS INHERIT \
                 CONNECTION LIMIT {limit} VALID UNTIL {until} PASSWORD {verifier} IN ROLE {level}; \
                 COMMENT ON ROLE {name} IS {marker}",
                name = ident(role),
                limit = eph.connection_limit,
                until = literal(&timestamp(valid_until)),
                verifier = literal(&verifier),
                level = ident(level_role),
                marker = literal(&self.marker(&target.name, &grant.id)),
            );
            manager.batch_execute(&sql).await.map_err(|e| failed(sql_error(e)))?;
            // Recorded before the role is committed: no role exists unaudited.
            let event = AuditEvent::CredentialCreated {
                role: role.to_owned(),
                grant_id: grant.id.clone(),
                user: grant.user.clone(),
                target: target.name.clone(),
                access: grant.access,
                valid_until,
            };
            if self.audit.record(event).await.is_err() {
                let _ = manager.batch_execute("ROLLBACK").await;
                return Err(UpstreamError::Refused("jitgate cannot write its audit log".into()));
            }
            manager
                .batch_execute("COMMIT")
                .await
                .map_err(|e| failed(sql_error(e)))?;
            self.metrics
                .credentials_created_total
                .with_label_values(&[target.name.as_str()])
                .inc();
            tracing::info!(target = %target.name, role, grant = %grant.id, "temporary role created");
        }
        let password: Arc<str> = Arc::from(password);
        self.passwords.insert(grant.id.clone(), Arc::clone(&password));
        let login = Login {
            user: role.to_owned(),
            password: Some(password),
        };
        let up = upstream::connect(&self.connector, lease, &login, database, forward).await;
        let _ = manager.execute("SELECT pg_advisory_unlock($1)", &[&key]).await;
        if lease.grant_ended() {
            // The grant ended while the role was being made: the reconciler drops it now.
            self.table.touch();
        }
        up
    }

    /// Every ephemeral target.
    fn ephemeral_targets(&self) -> Vec<(Arc<Target>, Arc<Ephemeral>)> {
        let mut v: Vec<_> = self
            .targets
            .values()
            .filter_map(|t| match &t.mode {
                CredentialsMode::Ephemeral(e) => Some((Arc::clone(t), Arc::clone(e))),
                CredentialsMode::Static => None,
            })
            .collect();
        v.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        v
    }

    /// The reconciler: every ephemeral target at start, when a grant ends or moves, and every
    /// [`RECONCILE_EVERY`]; a target that failed is retried with backoff.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let targets = self.ephemeral_targets();
        if targets.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut next: Vec<Instant> = vec![now; targets.len()];
        let mut backoff: Vec<Option<Duration>> = vec![None; targets.len()];
        loop {
            for (i, (target, eph)) in targets.iter().enumerate() {
                if Instant::now() < next[i] {
                    continue;
                }
                if self.table.resyncing() {
                    next[i] = Instant::now() + Duration::from_secs(1);
                    continue;
                }
                match timeout(MANAGER_TIMEOUT * 6, self.reconcile(target, eph)).await {
                    Ok(Ok(())) => {
                        backoff[i] = None;
                        next[i] = Instant::now() + RECONCILE_EVERY;
                    }
                    failed => {
                        let error = match failed {
                            Ok(Err(e)) => e.to_string(),
                            _ => "timed out".to_owned(),
                        };
                        self.metrics
                            .credential_failures_total
                            .with_label_values(&[target.name.as_str(), "reconcile"])
                            .inc();
                        let wait = backoff[i].map_or(Duration::from_secs(1), |b| (b * 2).min(MAX_BACKOFF));
                        backoff[i] = Some(wait);
                        next[i] = Instant::now() + wait;
                        tracing::warn!(target = %target.name, %error, retry_in = ?wait, "cannot reconcile temporary roles");
                    }
                }
            }
            let due = next
                .iter()
                .min()
                .copied()
                .unwrap_or_else(|| Instant::now() + RECONCILE_EVERY);
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.table.moved() => {
                    // A grant ended or moved: look again now, except where a retry is waiting.
                    let now = Instant::now();
                    for (i, n) in next.iter_mut().enumerate() {
                        if backoff[i].is_none() {
                            *n = now;
                        }
                    }
                }
                () = tokio::time::sleep_until(due) => {}
            }
        }
    }

    /// One pass over a target: moves `VALID UNTIL` of live grants' roles to their end, drops
    /// the roles of grants that are no longer live.
    pub async fn reconcile(&self, target: &Target, eph: &Ephemeral) -> Result<(), ManagerError> {
        let m = manager(&self.connector, target, eph, &target.database).await?;
        let rows = m
            .query(
                "SELECT r.rolname::text, d.description, extract(epoch FROM r.rolvaliduntil)::float8 \
                 FROM pg_roles r JOIN pg_shdescription d \
                 ON d.objoid = r.oid AND d.classoid = 'pg_authid'::regclass \
                 WHERE d.description LIKE $1",
                &[&format!("{MARKER} deployment={} %", self.deployment)],
            )
            .await
            .map_err(sql_error)?;
        let prefix = format!("{} grant=", self.marker_prefix(&target.name));
        let marked: Vec<Marked> = rows
            .iter()
            .filter_map(|r| {
                let description: String = r.get(1);
                let grant = description.strip_prefix(&prefix)?;
                Some(Marked {
                    role: r.get(0),
                    grant: GrantId::from_string(grant),
                    valid_until: r.get(2),
                })
            })
            .collect();
        let now = SystemTime::now();
        let mut store_live: Option<Vec<GrantId>> = None;
        for role in marked {
            if let Some(grant) = self.table.get(&role.grant) {
                let want = grant
                    .expires_at
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs_f64();
                if role.valid_until.is_none_or(|v| (v - want).abs() > 0.001) {
                    let sql = format!(
                        "ALTER ROLE {} VALID UNTIL {}",
                        ident(&role.role),
                        literal(&timestamp(grant.expires_at))
                    );
                    m.batch_execute(&sql).await.map_err(sql_error)?;
                    tracing::info!(target = %target.name, role = %role.role, until = %timestamp(grant.expires_at), "temporary role's VALID UNTIL moved");
                }
                continue;
            }
            // Not live here. Ended for sure if this process saw it end or the role's validity
            // has passed; otherwise the store decides (a grant another replica created a moment
            // ago may not have reached this table yet).
            let ended = self.table.has_ended(&role.grant)
                || role.valid_until.is_some_and(|v| {
                    v <= now
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .unwrap_or_default()
                        .as_secs_f64()
                });
            let ended = ended || {
                if store_live.is_none() {
                    let live = self
                        .store
                        .live_grants()
                        .await
                        .map_err(|e| ManagerError::Sql(format!("the store: {e}")))?;
                    store_live = Some(live.into_iter().map(|g| g.id).collect());
                }
                !store_live.as_ref().is_some_and(|l| l.contains(&role.grant))
            };
            if ended {
                let reason = if self.passwords.contains_key(&role.grant) || self.table.has_ended(&role.grant) {
                    "grant ended"
                } else {
                    "reconciled"
                };
                if let Err(e) = self.drop_role(&m, target, eph, &role, reason).await {
                    self.metrics
                        .credential_failures_total
                        .with_label_values(&[target.name.as_str(), "drop"])
                        .inc();
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Ends one temporary role: no more logins, its backends terminated, its objects dealt
    /// with in every database that holds any, then `DROP ROLE`. Under the role's advisory lock.
    async fn drop_role(
        &self,
        m: &Client,
        target: &Target,
        eph: &Ephemeral,
        role: &Marked,
        reason: &str,
    ) -> Result<(), ManagerError> {
        let key = lock_key(&role.role);
        m.execute("SELECT pg_advisory_lock($1)", &[&key])
            .await
            .map_err(sql_error)?;
        let result = self.drop_locked(m, target, eph, role, reason).await;
        let _ = m.execute("SELECT pg_advisory_unlock($1)", &[&key]).await;
        result
    }

    async fn drop_locked(
        &self,
        m: &Client,
        target: &Target,
        eph: &Ephemeral,
        role: &Marked,
        reason: &str,
    ) -> Result<(), ManagerError> {
        let Some(row) = m
            .query_opt("SELECT oid::int8 FROM pg_roles WHERE rolname = $1", &[&role.role])
            .await
            .map_err(sql_error)?
        else {
            // Another replica dropped it first.
            self.passwords.remove(&role.grant);
            return Ok(());
        };
        let oid: i64 = row.get(0);
        let name = ident(&role.role);
        // Membership lets the manager terminate the role's backends and run REASSIGN/DROP
        // OWNED; NOLOGIN first, so nothing logs in while the rest is done.
        m.batch_execute(&format!("GRANT {name} TO CURRENT_USER; ALTER ROLE {name} NOLOGIN"))
            .await
            .map_err(sql_error)?;
        let terminated: i64 = m
            .query_one(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usesysid = $1::int8::oid",
                &[&oid],
            )
            .await
            .map_err(sql_error)?
            .get(0);
        let waited = Instant::now();
        loop {
            let left: i64 = m
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE usesysid = $1::int8::oid",
                    &[&oid],
                )
                .await
                .map_err(sql_error)?
                .get(0);
            if left == 0 || waited.elapsed() > TERMINATE_WAIT {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let objects = match &eph.on_end {
            OnEnd::ReassignTo(to) => format!("REASSIGN OWNED BY {name} TO {}; DROP OWNED BY {name}", ident(to)),
            OnEnd::DropOwned => format!("DROP OWNED BY {name}"),
        };
        // REASSIGN and DROP OWNED act on the current database only: every database that holds
        // something of the role's, then the target's own.
        let databases: Vec<String> = m
            .query(
                "SELECT DISTINCT d.datname::text FROM pg_shdepend s JOIN pg_database d ON d.oid = s.dbid \
                 WHERE s.refclassid = 'pg_authid'::regclass AND s.refobjid = $1::int8::oid",
                &[&oid],
            )
            .await
            .map_err(sql_error)?
            .iter()
            .map(|r| r.get(0))
            .filter(|d: &String| *d != target.database)
            .collect();
        for database in &databases {
            let other = manager(&self.connector, target, eph, database).await?;
            other
                .batch_execute(&objects)
                .await
                .map_err(|e| ManagerError::Sql(format!("in database {database}: {}", sql_error(e))))?;
        }
        m.batch_execute(&format!("{objects}; DROP ROLE {name}"))
            .await
            .map_err(sql_error)?;
        self.passwords.remove(&role.grant);
        self.metrics
            .credentials_dropped_total
            .with_label_values(&[target.name.as_str()])
            .inc();
        tracing::info!(target = %target.name, role = %role.role, terminated, reason, "temporary role dropped");
        let _ = self
            .audit
            .record(AuditEvent::CredentialDropped {
                role: role.role.clone(),
                grant_id: role.grant.clone(),
                target: target.name.clone(),
                objects: match &eph.on_end {
                    OnEnd::ReassignTo(to) => format!("reassigned to {to}"),
                    OnEnd::DropOwned => "dropped owned".to_owned(),
                },
                terminated: terminated.max(0) as u64,
                reason: reason.to_owned(),
            })
            .await;
        Ok(())
    }
}

/// A manager connection to `database` on `target`, through the same dialer sessions use.
pub(crate) async fn manager(
    connector: &Connector,
    target: &Target,
    eph: &Ephemeral,
    database: &str,
) -> Result<Client, ManagerError> {
    let open = async {
        let stream = connector.open_unleased(target).await?;
        let mut cfg = tokio_postgres::Config::new();
        cfg.user(&eph.manager.user)
            .dbname(database)
            .application_name("jitgate:manager")
            .ssl_mode(SslMode::Disable)
            .options("-c standard_conforming_strings=on");
        if let Some(p) = &eph.manager.password {
            cfg.password(p);
        }
        let (client, connection) = cfg
            .connect_raw(stream, NoTls)
            .await
            .map_err(|source| ManagerError::Login {
                user: eph.manager.user.clone(),
                source,
            })?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok::<_, ManagerError>(client)
    };
    timeout(MANAGER_TIMEOUT, open)
        .await
        .map_err(|_| ManagerError::Timeout(MANAGER_TIMEOUT))?
}

/// Checks an ephemeral target's manager: it logs in, has CREATEROLE, and every role the
/// config names (the levels', `reassign_to`) exists; the manager is a member of
/// `reassign_to`. `config check` and start-up run it.
pub async fn check(connector: &Connector, target: &Target) -> Result<(), ManagerError> {
    let CredentialsMode::Ephemeral(eph) = &target.mode else {
        return Ok(());
    };
    let m = manager(connector, target, eph, &target.database).await?;
    let unfit = |message: String| ManagerError::Unfit {
        user: eph.manager.user.clone(),
        message,
    };
    let row = m
        .query_one(
            "SELECT rolsuper, rolcreaterole FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .map_err(sql_error)?;
    let (superuser, createrole): (bool, bool) = (row.get(0), row.get(1));
    if !superuser && !createrole {
        return Err(unfit(
            "it lacks CREATEROLE, so it cannot make temporary roles (ALTER ROLE ... CREATEROLE)".into(),
        ));
    }
    let mut levels: Vec<&String> = target.credentials.values().map(|c| &c.user).collect();
    levels.sort();
    for level in levels {
        let found = m
            .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[level])
            .await
            .map_err(sql_error)?;
        if found.is_none() {
            return Err(unfit(format!("the access-level role {level} does not exist")));
        }
    }
    if let OnEnd::ReassignTo(to) = &eph.on_end {
        let row = m
            .query_opt(
                "SELECT pg_has_role(current_user, oid, 'MEMBER') FROM pg_roles WHERE rolname = $1",
                &[to],
            )
            .await
            .map_err(sql_error)?;
        match row.map(|r| r.get::<_, bool>(0)) {
            None => return Err(unfit(format!("on_end.reassign_to names {to}, which does not exist"))),
            Some(false) if !superuser => {
                return Err(unfit(format!(
                    "it is not a member of {to} (on_end.reassign_to), so REASSIGN OWNED cannot give it the objects: GRANT {to} TO {}",
                    eph.manager.user
                )))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// 32 random bytes, base64url without padding (43 characters, nothing to quote).
fn random_password() -> String {
    use base64::Engine as _;
    let mut raw = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut raw);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_names_fit_and_read_as_written() {
        let id = GrantId::from_string("g-0123456789abcdef");
        assert_eq!(
            role_name(&UserName::new("alice").unwrap(), &id),
            "jit_alice_0123456789ab"
        );
        assert_eq!(
            role_name(&UserName::new("Bob.Smith@example.com").unwrap(), &id),
            "jit_bob_smith_example_com_0123456789ab"
        );
        let long = UserName::new("a".repeat(63)).unwrap();
        let name = role_name(&long, &id);
        assert_eq!(name.len(), 63);
        assert!(name.ends_with("_0123456789ab"), "{name}");
    }

    #[test]
    fn quoting_doubles_quotes() {
        assert_eq!(ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(literal("it's"), "'it''s'");
    }

    #[test]
    fn passwords_are_long_and_fresh() {
        let a = random_password();
        assert_eq!(a.len(), 43);
        assert_ne!(a, random_password());
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
    }

    #[test]
    fn lock_keys_differ_per_role() {
        assert_ne!(lock_key("jit_a_1"), lock_key("jit_a_2"));
        assert_eq!(lock_key("jit_a_1"), lock_key("jit_a_1"));
    }
}
