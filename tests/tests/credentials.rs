//! Temporary database credentials per grant (`credentials.mode = "ephemeral"`): a login role
//! made at the grant's first session, `VALID UNTIL` the grant's end, moved by an extension,
//! dropped (backends terminated, objects reassigned or dropped) when the grant ends, and found
//! by the reconciler after a crash. Also `application_name` attribution in static mode.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jitgate_tests::jitgate::credentials::role_name;
use jitgate_tests::jitgate::model::{AccessLevel, Grant, UserName};
use jitgate_tests::jitgate::pki;
use jitgate_tests::jitgate::sandbox::free_port;
use jitgate_tests::{eventually, metric, poke_and_collect, run_jitgate, Harness};

const HOUR: Duration = Duration::from_secs(3600);
const MANAGER_PASSWORD: &str = "manager-secret-pw";
const STOLEN: &str = "stolen-password-1";

/// The manager role and the role objects are reassigned to, on the harness's cluster.
fn prepare(h: &Harness) {
    h.pg.sql(
        "postgres",
        &format!(
            "CREATE ROLE jit_manager LOGIN CREATEROLE PASSWORD '{MANAGER_PASSWORD}';
             CREATE ROLE app_owner NOLOGIN;
             GRANT app_owner TO jit_manager;
             CREATE ROLE weak_manager LOGIN PASSWORD '{MANAGER_PASSWORD}';"
        ),
    )
    .unwrap();
    pki::write_file(&h.data_dir().join("manager.password"), MANAGER_PASSWORD, true).unwrap();
}

/// An ephemeral target `name` on the harness's cluster.
fn target(h: &Harness, name: &str, manager: &str, on_end: &str, limit: u32) -> String {
    format!(
        r#"
[[targets]]
name = "{name}"
address = "{addr}"
database = "app"
[targets.credentials]
mode = "ephemeral"
connection_limit = {limit}
[targets.credentials.read]
user = "jit_reader"
[targets.credentials.write]
user = "jit_writer"
[targets.manager]
user = "{manager}"
password_file = "{d}/manager.password"
[targets.on_end]
{on_end}
"#,
        addr = h.pg.address(),
        d = h.data_dir().display(),
    )
}

async fn ephemeral_harness(limit: u32) -> Harness {
    let mut h = Harness::start().await;
    prepare(&h);
    let extra = target(&h, "temp-db", "jit_manager", "reassign_to = \"app_owner\"", limit)
        + &target(&h, "scratch-db", "jit_manager", "drop_owned = true", limit);
    h.reconfigure(&extra).await;
    h
}

fn role_of(grant: &Grant) -> String {
    role_name(&UserName::new(grant.user.as_str()).unwrap(), &grant.id)
}

fn role_exists(h: &Harness, role: &str) -> bool {
    h.pg.sql(
        "postgres",
        &format!("SELECT count(*) FROM pg_roles WHERE rolname = '{role}'"),
    )
    .unwrap()
        == "1"
}

fn valid_until_secs(h: &Harness, role: &str) -> i64 {
    h.pg.sql(
        "postgres",
        &format!("SELECT floor(extract(epoch FROM rolvaliduntil))::bigint FROM pg_roles WHERE rolname = '{role}'"),
    )
    .unwrap()
    .parse()
    .unwrap()
}

fn epoch(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

#[tokio::test(flavor = "multi_thread")]
async fn the_session_runs_as_a_role_that_ends_with_the_grant() {
    let h = ephemeral_harness(10).await;
    let alice = h.user("alice", &["dev"]);
    let grant = h
        .grant("alice", "temp-db", AccessLevel::Read, Duration::from_secs(10))
        .await;
    let role = role_of(&grant);
    assert!(!role_exists(&h, &role), "made lazily, at the first session");

    let out = h
        .psql(&alice, "temp-db", "SELECT current_user, count(*) FROM items")
        .await;
    assert!(out.success, "{}", out.stderr);
    assert_eq!(out.stdout, format!("{role}|100"));

    // The live session, as a DBA sees it.
    let live = h.psql_interactive(&alice, "temp-db");
    eventually("the session's backend", Duration::from_secs(10), || async {
        h.backends_of(&role) == 1
    })
    .await;
    let facts = h
        .pg
        .sql(
            "postgres",
            &format!(
                "SELECT r.rolcanlogin, r.rolconnlimit, r.rolcreaterole, r.rolsuper, \
                 pg_has_role(r.oid, 'jit_reader', 'MEMBER'), shobj_description(r.oid, 'pg_authid') LIKE 'jitgate deployment=% target=temp-db grant={}', \
                 left(r2.rolpassword, 14) FROM pg_roles r JOIN pg_authid r2 ON r2.oid = r.oid WHERE r.rolname = '{role}'",
                grant.id
            ),
        )
        .unwrap();
    assert_eq!(facts, "t|10|f|f|t|t|SCRAM-SHA-256$");
    assert_eq!(valid_until_secs(&h, &role), epoch(grant.expires_at));
    let app: String =
        h.pg.sql(
            "postgres",
            &format!("SELECT application_name FROM pg_stat_activity WHERE usename = '{role}'"),
        )
        .unwrap();
    assert!(app.starts_with("psql jitgate:alice:s-"), "{app}");

    // What a stolen temporary password gives: a login until the grant ends, no longer.
    h.pg.sql("postgres", &format!("ALTER ROLE \"{role}\" PASSWORD '{STOLEN}'"))
        .unwrap();
    let direct = h.direct_psql(&role, STOLEN, "SELECT current_user").await;
    assert!(direct.success, "{}", direct.stderr);

    // The grant ends: the session is cut, the role dropped.
    eventually("the grant ends", Duration::from_secs(20), || async {
        SystemTime::now() > grant.expires_at + Duration::from_millis(200)
    })
    .await;
    let stderr = poke_and_collect(live).await;
    assert!(stderr.contains("expired"), "{stderr}");
    eventually("the role is dropped", Duration::from_secs(20), || async {
        !role_exists(&h, &role)
    })
    .await;
    let direct = h.direct_psql(&role, STOLEN, "SELECT 1").await;
    assert!(!direct.success);
    assert!(direct.stderr.contains("authentication failed"), "{}", direct.stderr);

    let created = h.audit_events("credential.created");
    assert_eq!(created.len(), 1, "{created:?}");
    assert_eq!(created[0]["role"], role.as_str());
    assert_eq!(created[0]["grant_id"], grant.id.as_str());
    assert_eq!(created[0]["access"], "read");
    let dropped = h.audit_events("credential.dropped");
    assert_eq!(dropped.len(), 1, "{dropped:?}");
    assert_eq!(dropped[0]["role"], role.as_str());
    assert_eq!(dropped[0]["objects"], "reassigned to app_owner");
    // Statement records carry the role; no record carries a password or its verifier.
    let statements = h.audit_events("statement");
    assert!(statements
        .iter()
        .any(|s| s["upstream_role"] == role.as_str() && s["target"] == "temp-db"));
    let log = std::fs::read_to_string(h.data_dir().join("audit.jsonl")).unwrap();
    assert!(
        !log.contains("SCRAM-SHA-256$") && !log.contains("PASSWORD"),
        "a password in the audit log"
    );
    let (_, text) = h.metrics_get("/metrics").await;
    assert_eq!(
        metric(&text, "jitgate_credentials_created_total{target=\"temp-db\"}"),
        1.0
    );
    assert_eq!(
        metric(&text, "jitgate_credentials_dropped_total{target=\"temp-db\"}"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_of_one_grant_share_the_role_within_its_connection_limit() {
    let h = ephemeral_harness(2).await;
    let alice = h.user("alice", &["dev"]);
    let grant = h.grant("alice", "temp-db", AccessLevel::Read, HOUR).await;
    let role = role_of(&grant);
    let first = h.psql_interactive(&alice, "temp-db");
    let second = h.psql_interactive(&alice, "temp-db");
    eventually("two backends of one role", Duration::from_secs(15), || async {
        h.backends_of(&role) == 2
    })
    .await;
    let third = h.psql(&alice, "temp-db", "SELECT 1").await;
    assert!(!third.success);
    assert!(
        third.stderr.contains("too many connections for role"),
        "{}",
        third.stderr
    );
    assert_eq!(h.audit_events("credential.created").len(), 1, "one role for the grant");

    // A revoke cuts both and drops the role.
    h.admin().revoke_grant(grant.id.as_str()).await.unwrap();
    for psql in [first, second] {
        let stderr = poke_and_collect(psql).await;
        assert!(stderr.contains("revoked"), "{stderr}");
    }
    eventually("the role is dropped", Duration::from_secs(20), || async {
        !role_exists(&h, &role)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_extension_moves_valid_until() {
    let h = ephemeral_harness(10).await;
    let alice = h.user("alice", &["dev"]);
    let grant = h.grant("alice", "temp-db", AccessLevel::Read, HOUR).await;
    let role = role_of(&grant);
    assert!(h.psql(&alice, "temp-db", "SELECT 1").await.success);
    assert_eq!(valid_until_secs(&h, &role), epoch(grant.expires_at));
    let extended = h
        .admin()
        .extend_grant(grant.id.as_str(), Duration::from_secs(1800))
        .await
        .unwrap();
    assert_eq!(epoch(extended.expires_at), epoch(grant.expires_at) + 1800);
    eventually("VALID UNTIL follows the extension", Duration::from_secs(10), || async {
        valid_until_secs(&h, &role) == epoch(extended.expires_at)
    })
    .await;
    // A later session (the password is known) still gets in.
    assert!(h.psql(&alice, "temp-db", "SELECT 1").await.success);
}

#[tokio::test(flavor = "multi_thread")]
async fn objects_of_the_role_go_to_reassign_to_or_are_dropped() {
    let h = ephemeral_harness(10).await;
    let alice = h.user("alice", &["dev"]);
    let kept = h.grant("alice", "temp-db", AccessLevel::Write, HOUR).await;
    let gone = h.grant("alice", "scratch-db", AccessLevel::Write, HOUR).await;
    for (target, table) in [("temp-db", "alice_kept"), ("scratch-db", "alice_gone")] {
        let out = h
            .psql(
                &alice,
                target,
                &format!("CREATE TABLE {table} (x int); INSERT INTO {table} VALUES (1)"),
            )
            .await;
        assert!(out.success, "{}", out.stderr);
    }
    // Objects in another database of the target are found too.
    h.pg.sql("other", "GRANT ALL ON SCHEMA public TO jit_writer").unwrap();
    let out = h
        .psql(&alice, "temp-db/other", "CREATE TABLE alice_elsewhere (x int)")
        .await;
    assert!(out.success, "{}", out.stderr);
    let owner_in = |database: &str, table: &str| {
        h.pg.sql(
            database,
            &format!("SELECT coalesce((SELECT tableowner FROM pg_tables WHERE tablename = '{table}'), '-')"),
        )
        .unwrap()
    };
    let owner = |table: &str| owner_in("app", table);
    assert_eq!(owner("alice_kept"), role_of(&kept));
    assert_eq!(owner("alice_gone"), role_of(&gone));
    h.admin().revoke_grant(kept.id.as_str()).await.unwrap();
    h.admin().revoke_grant(gone.id.as_str()).await.unwrap();
    for grant in [&kept, &gone] {
        let role = role_of(grant);
        eventually("the role is dropped", Duration::from_secs(20), || async {
            !role_exists(&h, &role)
        })
        .await;
    }
    assert_eq!(owner("alice_kept"), "app_owner");
    assert_eq!(owner("alice_gone"), "-");
    assert_eq!(owner_in("other", "alice_elsewhere"), "app_owner");
    assert_eq!(h.pg.sql("app", "SELECT x FROM alice_kept").unwrap(), "1");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_grant_cannot_change_its_own_temporary_role() {
    let h = ephemeral_harness(10).await;
    let alice = h.user("alice", &["dev"]);
    let grant = h.grant("alice", "temp-db", AccessLevel::Write, HOUR).await;
    let role = role_of(&grant);
    assert!(h.psql(&alice, "temp-db", "SELECT 1").await.success);
    let before = valid_until_secs(&h, &role);
    for attempt in [
        format!("ALTER ROLE {role} PASSWORD 'mine'"),
        format!("ALTER USER \"{role}\" WITH PASSWORD 'mine'"),
        "ALTER ROLE CURRENT_USER PASSWORD 'mine'".to_owned(),
        format!("ALTER ROLE {} VALID UNTIL 'infinity'", role.to_uppercase()),
        "DO $$BEGIN EXECUTE 'ALTER ROLE ' || quote_ident(current_user) || ' PASSWORD ''mine'''; END$$".to_owned(),
        format!("DO $$BEGIN EXECUTE 'ALTER ROLE {role} PASSWORD ''mine'''; END$$"),
        "CREATE ROLE jit_bob_0000 LOGIN PASSWORD 'mine'".to_owned(),
    ] {
        let out = h.psql(&alice, "temp-db", &attempt).await;
        assert!(!out.success, "{attempt} was let through");
        assert!(
            out.stderr.contains("would change a role jitgate logs in with"),
            "{attempt}: {}",
            out.stderr
        );
    }
    assert_eq!(valid_until_secs(&h, &role), before);
    let direct = h.direct_psql(&role, "mine", "SELECT 1").await;
    assert!(!direct.success, "a password was planted");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_drop_that_fails_is_retried_and_counted() {
    let mut h = ephemeral_harness(10).await;
    let alice = h.user("alice", &["dev"]);
    let grant = h
        .grant("alice", "temp-db", AccessLevel::Read, Duration::from_secs(4))
        .await;
    let role = role_of(&grant);
    assert!(h.psql(&alice, "temp-db", "SELECT 1").await.success);
    h.pg.pause();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (_, text) = h.metrics_get("/metrics").await;
    assert!(
        metric(
            &text,
            "jitgate_credential_failures_total{op=\"reconcile\",target=\"temp-db\"}"
        ) >= 1.0,
        "{text}"
    );
    h.pg.resume().unwrap();
    eventually(
        "the role is dropped after the target is back",
        Duration::from_secs(30),
        || async { !role_exists(&h, &role) },
    )
    .await;
    assert_eq!(h.audit_events("credential.dropped").len(), 1);
}

/// A `jitgate serve` process, killed when dropped.
struct Serve(std::process::Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_reconciler_drops_a_role_left_by_a_killed_proxy() {
    let mut h = ephemeral_harness(10).await;
    h.stop_proxy().await.unwrap();
    let (pg_port, api_port) = (free_port().unwrap(), free_port().unwrap());
    h.edit_config(|c| {
        c.replacen(
            "postgres = \"127.0.0.1:0\"",
            &format!("postgres = \"127.0.0.1:{pg_port}\""),
            1,
        )
        .replacen("api = \"127.0.0.1:0\"", &format!("api = \"127.0.0.1:{api_port}\""), 1)
    });
    let serve = || {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(h.data_dir().join("serve.log"))
            .unwrap();
        Serve(
            std::process::Command::new(jitgate_tests::jitgate_bin())
                .args(["serve", "--config"])
                .arg(h.config_path())
                .stderr(log)
                .spawn()
                .unwrap(),
        )
    };
    let first = serve();
    let d = h.data_dir().to_owned();
    let api = jitgate_tests::jitgate::client::ApiClient::from_files(
        &format!("127.0.0.1:{api_port}"),
        &d.join("admin.crt"),
        &d.join("admin.key"),
        &d.join("ca.crt"),
    )
    .unwrap();
    eventually("serve answers", Duration::from_secs(20), || {
        let api = api.clone();
        async move { api.whoami().await.is_ok() }
    })
    .await;
    let grant = api
        .create_grant(&jitgate_tests::jitgate::model::NewGrant {
            user: UserName::new("alice").unwrap(),
            target: jitgate_tests::jitgate::model::TargetName::new("temp-db").unwrap(),
            access: AccessLevel::Read,
            duration_secs: 5,
            reason: "crash test".into(),
        })
        .await
        .unwrap();
    let role = role_of(&grant);
    let alice = h.user("alice", &["dev"]);
    let out = h
        .psql_conninfo(&h.conninfo_at(&alice, "temp-db", pg_port), "SELECT current_user")
        .await;
    assert_eq!(out.stdout, role, "{}", out.stderr);

    // kill -9 while the grant is live; started again after it ended.
    let mut first = first;
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(role_exists(&h, &role), "nothing dropped it while the proxy was down");
    let _second = serve();
    eventually(
        "the reconciler drops the leftover role",
        Duration::from_secs(30),
        || async { !role_exists(&h, &role) },
    )
    .await;
    let dropped = h.audit_events("credential.dropped");
    assert_eq!(dropped.len(), 1, "{dropped:?}");
    assert_eq!(dropped[0]["reason"], "reconciled");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_manager_that_cannot_create_roles_stops_config_check_and_start_up() {
    let h = Harness::start().await;
    prepare(&h);
    let base = std::fs::read_to_string(h.config_path()).unwrap();
    let check = |extra: String| {
        let path = h.data_dir().join(format!("check-{}.toml", extra.len()));
        std::fs::write(&path, format!("{base}\n{extra}")).unwrap();
        path
    };

    // No manager at all: a config error.
    let no_manager = target(&h, "temp-db", "jit_manager", "drop_owned = true", 10)
        .replace("[targets.manager]\nuser = \"jit_manager\"\n", "")
        .replace(
            &format!("password_file = \"{}/manager.password\"\n", h.data_dir().display()),
            "",
        );
    let path = check(no_manager);
    let run = run_jitgate(&["config", "check", path.to_str().unwrap()], &[]).await;
    assert!(!run.ok);
    assert!(
        run.stderr.contains("targets[4].manager") && run.stderr.contains("CREATEROLE"),
        "{}",
        run.stderr
    );

    // A manager without CREATEROLE: config check and serve both refuse, naming the reason.
    let path = check(target(&h, "temp-db", "weak_manager", "drop_owned = true", 10));
    let run = run_jitgate(&["config", "check", path.to_str().unwrap()], &[]).await;
    assert!(!run.ok);
    assert!(
        run.stderr.contains("targets.temp-db.manager") && run.stderr.contains("lacks CREATEROLE"),
        "{}",
        run.stderr
    );
    let run = run_jitgate(&["serve", "--config", path.to_str().unwrap()], &[]).await;
    assert!(!run.ok);
    assert!(run.stderr.contains("lacks CREATEROLE"), "{}", run.stderr);

    // reassign_to a role the manager is not a member of.
    let path = check(target(&h, "temp-db", "jit_manager", "reassign_to = \"jit_reader\"", 10));
    let run = run_jitgate(&["config", "check", path.to_str().unwrap()], &[]).await;
    assert!(!run.ok);
    assert!(run.stderr.contains("not a member of jit_reader"), "{}", run.stderr);

    // A good manager passes, and says so.
    let path = check(target(&h, "temp-db", "jit_manager", "drop_owned = true", 10));
    let run = run_jitgate(&["config", "check", path.to_str().unwrap()], &[]).await;
    assert!(run.ok, "{}", run.stderr);
    assert!(
        run.stdout.contains("manager jit_manager may create temporary roles"),
        "{}",
        run.stdout
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn static_sessions_carry_the_user_and_session_in_application_name() {
    let h = Harness::start().await;
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "prod-db", AccessLevel::Read, HOUR).await;
    let own = format!("{} application_name=nightly-report", h.conninfo(&alice, "prod-db"));
    let out = h
        .psql_conninfo(&own, "SELECT current_setting('application_name')")
        .await;
    assert!(out.success, "{}", out.stderr);
    let sessions = h.audit_events("session.start");
    let id = sessions.last().unwrap()["session_id"].as_str().unwrap().to_owned();
    assert_eq!(out.stdout, format!("nightly-report jitgate:alice:{id}"));
    assert_eq!(sessions.last().unwrap()["upstream_role"], "jit_reader");

    // A long name of the client's is cut, never ours.
    let long = format!("{} application_name={}", h.conninfo(&alice, "prod-db"), "x".repeat(80));
    let out = h
        .psql_conninfo(&long, "SELECT current_setting('application_name')")
        .await;
    let id = h.audit_events("session.start").last().unwrap()["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(out.stdout, format!("{} jitgate:alice:{id}", "x".repeat(30)));

    // psql's own default name, likewise.
    let out = h
        .psql(&alice, "prod-db", "SELECT current_setting('application_name')")
        .await;
    assert!(out.stdout.starts_with("psql jitgate:alice:s-"), "{}", out.stdout);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_documented_ephemeral_target_passes_config_check() {
    let h = Harness::start().await;
    prepare(&h);
    h.pg.sql(
        "postgres",
        "CREATE ROLE jitgate_manager LOGIN CREATEROLE PASSWORD 'manager-secret-pw'; GRANT app_owner TO jitgate_manager",
    )
    .unwrap();
    let example = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/jitgate.toml"),
    )
    .unwrap();
    let start = example
        .find("# [[targets]]\n# name = \"ledger-db\"")
        .expect("the ephemeral example");
    let block: String = example[start..]
        .lines()
        .take_while(|l| l.starts_with('#'))
        .map(|l| l.strip_prefix("# ").unwrap_or(l.strip_prefix('#').unwrap_or(l)))
        .collect::<Vec<_>>()
        .join("\n");
    let block = block
        .replace("db2.internal.example.com:5432", &h.pg.address())
        .replace("database = \"ledger\"", "database = \"app\"")
        .replace(
            "/etc/jitgate/secrets/ledger-db-manager",
            &h.data_dir().join("manager.password").display().to_string(),
        );
    assert!(
        block.contains("mode = \"ephemeral\"") && block.contains("[targets.on_end]"),
        "{block}"
    );
    let path = h.data_dir().join("example-ephemeral.toml");
    std::fs::write(
        &path,
        format!("{}\n{block}\n", std::fs::read_to_string(h.config_path()).unwrap()),
    )
    .unwrap();
    let run = run_jitgate(&["config", "check", path.to_str().unwrap()], &[]).await;
    assert!(run.ok, "{}", run.stderr);
    assert!(
        run.stdout
            .contains("target ledger-db: manager jitgate_manager may create temporary roles"),
        "{}",
        run.stdout
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_role_planted_under_the_grants_name_is_never_logged_in_as() {
    let h = ephemeral_harness(10).await;
    let alice = h.user("alice", &["dev"]);
    let grant = h.grant("alice", "temp-db", AccessLevel::Read, HOUR).await;
    let role = role_of(&grant);
    // Someone who learned the grant id makes the role first, with more than a read grant's
    // rights, and even copies the marker comment.
    h.pg.sql(
        "postgres",
        &format!(
            "CREATE ROLE \"{role}\" LOGIN CREATEDB PASSWORD 'planted' IN ROLE jit_writer;
             COMMENT ON ROLE \"{role}\" IS 'jitgate deployment=000000000000 target=temp-db grant={}'",
            grant.id
        ),
    )
    .unwrap();
    let out = h.psql(&alice, "temp-db", "SELECT current_user").await;
    assert!(!out.success, "logged in as a planted role: {}", out.stdout);
    assert!(out.stderr.contains("is not the one jitgate made"), "{}", out.stderr);
    assert_eq!(h.backends_of(&role), 0);
    assert!(h.audit_events("credential.created").is_empty());
    let (_, text) = h.metrics_get("/metrics").await;
    assert!(
        metric(
            &text,
            "jitgate_credential_failures_total{op=\"create\",target=\"temp-db\"}"
        ) >= 1.0
    );
}
