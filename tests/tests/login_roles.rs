//! No grant may change the roles jitgate logs in with: a password, validity, login, setting,
//! name or membership planted through the proxy would outlive the grant.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use jitgate_tests::jitgate::model::AccessLevel;
use jitgate_tests::raw::{self, bind, error_of, execute, parse, read_until_ready, send, sync};
use jitgate_tests::{Harness, WRITER_PASSWORD};

const HOUR: Duration = Duration::from_secs(3600);
const REFUSED: &str = "would change a role jitgate logs in with";

fn role_facts(h: &Harness) -> String {
    h.pg.sql(
        "postgres",
        "SELECT string_agg(rolname || ':' || rolcanlogin || ':' || coalesce(rolvaliduntil::text, '-'), ',' \
         ORDER BY rolname) FROM pg_roles WHERE rolname LIKE 'jit_%' OR rolname LIKE 'evil%' OR rolname = 'gone'",
    )
    .unwrap()
}

fn memberships(h: &Harness) -> String {
    h.pg.sql(
        "postgres",
        "SELECT string_agg(r.rolname || '>' || m.rolname, ',' ORDER BY r.rolname, m.rolname) \
         FROM pg_auth_members a JOIN pg_roles r ON r.oid = a.roleid JOIN pg_roles m ON m.oid = a.member",
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn no_write_grant_changes_a_login_role_however_it_is_spelled() {
    let h = Harness::start().await;
    // CREATEROLE makes every attack below one the server would carry out.
    h.pg.sql(
        "postgres",
        "ALTER ROLE jit_writer CREATEROLE; CREATE ROLE evil_existing LOGIN PASSWORD 'x'",
    )
    .unwrap();
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "prod-db", AccessLevel::Write, HOUR).await;
    let (roles_before, members_before) = (role_facts(&h), memberships(&h));
    let attempts = [
        "ALTER ROLE jit_writer PASSWORD 'chosen'",
        "alter user \"jit_writer\" with password 'chosen'",
        "ALTER ROLE CURRENT_USER PASSWORD 'chosen'",
        "ALTER ROLE SESSION_USER PASSWORD 'chosen'",
        "ALTER USER current_role WITH PASSWORD 'chosen'",
        "ALTER ROLE U&\"jit\\005fwriter\" PASSWORD 'chosen'",
        "ALTER ROLE jit_reader VALID UNTIL 'infinity'",
        "ALTER ROLE jit_reader NOLOGIN",
        "ALTER ROLE jit_reader RENAME TO gone",
        "ALTER ROLE jit_writer SET role = 'evil_existing'",
        "ALTER ROLE ALL SET search_path = evil",
        "CREATE ROLE evil LOGIN PASSWORD 'chosen' IN ROLE jit_writer",
        "CREATE USER evil2 PASSWORD 'chosen' IN GROUP jit_reader",
        "CREATE ROLE evil3 ROLE jit_writer",
        "GRANT jit_writer TO evil_existing",
        "GRANT jit_reader TO evil_existing WITH ADMIN OPTION",
        "REVOKE jit_reader FROM jit_writer",
        "ALTER GROUP jit_reader ADD USER evil_existing",
        "DROP ROLE jit_md5",
        "SELECT 1; ALTER ROLE jit_writer PASSWORD 'chosen'",
        "/* maintenance */ ALTER\n  ROLE\tjit_writer -- x\n PASSWORD 'chosen'",
        "DO $$BEGIN EXECUTE 'ALTER ROLE ' || current_user || ' PASSWORD ''chosen'''; END$$",
        "DO $$BEGIN EXECUTE format('GRANT %I TO evil_existing', 'jit_writer'); END$$",
    ];
    for sql in attempts {
        let out = h.psql(&alice, "prod-db", sql).await;
        assert!(!out.success, "{sql}: {out:?}");
        assert!(out.stderr.contains(REFUSED), "{sql}: {}", out.stderr);
    }
    let out = h
        .psql(&alice, "prod-db", "ALTER ROLE jit_writer PASSWORD 'chosen'")
        .await;
    assert!(out.stderr.contains("allow_role_management"), "{}", out.stderr);
    // The extended protocol, pipelined behind an allowed statement.
    let mut s = raw::session(&h, &alice, "prod-db").await;
    let mut batch = parse("", "SELECT 1");
    batch.extend(bind("", "", &[]));
    batch.extend(execute(""));
    batch.extend(parse("", "ALTER ROLE jit_writer PASSWORD 'chosen'"));
    batch.extend(bind("", "", &[]));
    batch.extend(execute(""));
    batch.extend(sync());
    send(&mut s, &batch).await;
    let (code, message) = error_of(&read_until_ready(&mut s).await).unwrap();
    assert_eq!(code, "42501");
    assert!(message.contains(REFUSED), "{message}");

    // Nothing changed, and the planted password does not log in.
    assert_eq!(role_facts(&h), roles_before);
    assert_eq!(memberships(&h), members_before);
    assert!(!h.direct_psql("jit_writer", "chosen", "SELECT 1").await.success);
    assert!(h.direct_psql("jit_writer", WRITER_PASSWORD, "SELECT 1").await.success);

    // Roles jitgate does not log in with, and privileges on objects, stay manageable.
    for sql in [
        "CREATE ROLE reporting LOGIN PASSWORD 'x'",
        "ALTER ROLE reporting PASSWORD 'y'",
        "GRANT SELECT ON items TO reporting",
        "GRANT SELECT ON items TO jit_reader",
    ] {
        let out = h.psql(&alice, "prod-db", sql).await;
        assert!(out.success, "{sql}: {out:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_grants_manage_login_roles_only_where_the_target_allows_it() {
    let mut h = Harness::start().await;
    let alice = h.user("alice", &["dba"]);
    h.grant("alice", "prod-db", AccessLevel::Admin, HOUR).await;
    let out = h
        .psql(&alice, "prod-db", "ALTER ROLE jit_reader VALID UNTIL 'infinity'")
        .await;
    assert!(!out.success && out.stderr.contains(REFUSED), "{out:?}");

    h.reconfigure(&format!(
        r#"
[[targets]]
name = "roles-db"
address = "{addr}"
database = "app"
allow_role_management = true
[targets.credentials.write]
user = "jit_writer"
password_file = "{d}/writer.password"
[targets.credentials.admin]
user = "jit_admin"
password_file = "{d}/admin.password"
"#,
        addr = h.pg.address(),
        d = h.data_dir().display()
    ))
    .await;
    // Still refused for a write grant there.
    let bob = h.user("bob", &["dev"]);
    h.grant("bob", "roles-db", AccessLevel::Write, HOUR).await;
    let out = h
        .psql(&bob, "roles-db", "ALTER ROLE jit_writer PASSWORD 'chosen'")
        .await;
    assert!(!out.success && out.stderr.contains(REFUSED), "{out:?}");
    // An admin grant there may.
    h.grant("alice", "roles-db", AccessLevel::Admin, HOUR).await;
    let out = h
        .psql(&alice, "roles-db", "ALTER ROLE jit_reader VALID UNTIL 'infinity'")
        .await;
    assert!(out.success, "{out:?}");
    assert_eq!(
        h.pg.sql(
            "postgres",
            "SELECT rolvaliduntil FROM pg_roles WHERE rolname = 'jit_reader'"
        )
        .unwrap(),
        "infinity"
    );
}
