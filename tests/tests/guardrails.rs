//! Guardrails: a read grant runs reads only; deny rules refuse chosen statements on write
//! grants. Refused statements never reach the database, and the session stays usable.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::time::Duration;

use jitgate_tests::jitgate::model::AccessLevel;
use jitgate_tests::raw::{self, bind, error_of, execute, first_column, parse, read_until_ready, send, sync};
use jitgate_tests::{client_command, eventually, metric, statements, Harness};
use tokio::io::AsyncWriteExt;

const HOUR: Duration = Duration::from_secs(3600);

/// Runs `script` in one psql session (errors do not stop it); returns (stdout, stderr).
async fn psql_script(h: &Harness, user: &jitgate_tests::UserCert, db: &str, script: &str) -> (String, String) {
    let mut child = client_command("psql")
        .arg(h.conninfo(user, db))
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=0"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(script.as_bytes()).await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn fingerprint(h: &Harness) -> String {
    h.pg.sql(
        "app",
        "SELECT count(*) || ':' || sum(id) || ':' || count(*) FILTER (WHERE name LIKE 'item %') FROM items",
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn read_grant_refuses_everything_but_reads() {
    let h = Harness::start().await;
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "prod-db", AccessLevel::Read, HOUR).await;
    let before = fingerprint(&h);
    let refused = [
        "INSERT INTO items VALUES (1000, 'x');",
        "UPDATE items SET name = 'x' WHERE id = 1;",
        "DELETE FROM items WHERE id = 2;",
        "CREATE TABLE sneaky (id int);",
        "COPY items FROM STDIN;",
        "SELECT 1; DROP TABLE items;",
        "/* x */ DROP TABLE items;",
        "WITH d AS (DELETE FROM items RETURNING *) SELECT count(*) FROM d;",
        "SELECT * FROM items FOR UPDATE;",
        "this is not sql at all;",
        "GRANT ALL ON items TO PUBLIC;",
        "SET ROLE jit_writer;",
    ];
    let mut script = String::new();
    for stmt in refused {
        script.push_str(stmt);
        script.push('\n');
    }
    script.push_str("SELECT 'still usable', count(*) FROM items;\n");
    let (stdout, stderr) = psql_script(&h, &alice, "prod-db", &script).await;
    assert_eq!(
        stderr
            .matches("jitgate: read access to prod-db does not allow this statement")
            .count(),
        refused.len(),
        "{stderr}"
    );
    assert!(
        stderr.contains("HINT:  request write access: jitgate request prod-db --access write --for 30m"),
        "{stderr}"
    );
    assert!(stdout.contains("still usable|100"), "{stdout}");
    assert_eq!(fingerprint(&h), before, "nothing may change");
    assert_eq!(
        h.pg.sql("app", "SELECT count(*) FROM pg_tables WHERE tablename = 'sneaky'")
            .unwrap(),
        "0"
    );

    // psql sends "SELECT 1; DROP TABLE items;" from a script as two messages; in one message
    // the whole message is refused and nothing of it runs.
    let out = h.psql(&alice, "prod-db", "SELECT 1; DROP TABLE items").await;
    assert!(
        !out.success && out.stderr.contains("does not allow this statement (ddl drop)"),
        "{out:?}"
    );
    assert_eq!(fingerprint(&h), before);

    let st = statements(&h);
    let denied: Vec<_> = st.iter().filter(|(s, _)| s["decision"] == "denied").collect();
    assert_eq!(denied.len(), refused.len() + 2, "{denied:?}");
    let last_two: Vec<_> = denied
        .iter()
        .rev()
        .take(2)
        .map(|(s, _)| (s["text"].clone(), s["denied_by"].clone()))
        .collect();
    assert_eq!(
        last_two[0],
        (serde_json::json!("DROP TABLE items"), serde_json::json!("read_only"))
    );
    assert_eq!(
        last_two[1],
        (serde_json::json!("SELECT 1"), serde_json::json!("same_message"))
    );
    let (_, body) = h.metrics_get("/metrics").await;
    assert!(
        metric(&body, "jitgate_statement_denials_total{reason=\"read_only\"}") >= refused.len() as f64,
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn read_grant_refuses_writes_in_the_extended_protocol() {
    let h = Harness::start().await;
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "prod-db", AccessLevel::Read, HOUR).await;
    let before = fingerprint(&h);
    let mut s = raw::session(&h, &alice, "prod-db").await;
    // A read, then a refused write, then more work before Sync: the server skips to Sync.
    let mut batch = parse("", "SELECT 1");
    batch.extend(bind("", "", &[]));
    batch.extend(execute(""));
    batch.extend(parse("w", "DELETE FROM items"));
    batch.extend(bind("", "w", &[]));
    batch.extend(execute(""));
    batch.extend(sync());
    send(&mut s, &batch).await;
    let msgs = read_until_ready(&mut s).await;
    assert_eq!(first_column(&msgs), ["1"]);
    let (code, message) = error_of(&msgs).expect("refused");
    assert_eq!(code, "42501");
    assert!(
        message.contains("does not allow this statement (write delete)"),
        "{message}"
    );
    assert_eq!(msgs.last().unwrap().tag, b'Z');
    // Executing the refused statement again later is refused again, and reads still work.
    let mut batch = bind("", "w", &[]);
    batch.extend(execute(""));
    batch.extend(sync());
    batch.extend(parse("", "SELECT count(*) FROM items"));
    batch.extend(bind("", "", &[]));
    batch.extend(execute(""));
    batch.extend(sync());
    send(&mut s, &batch).await;
    let first = read_until_ready(&mut s).await;
    assert!(error_of(&first).is_some());
    assert_eq!(first_column(&read_until_ready(&mut s).await), ["100"]);
    assert_eq!(fingerprint(&h), before);
}

#[tokio::test(flavor = "multi_thread")]
async fn deny_rules_refuse_chosen_statements_on_write_grants() {
    let h = Harness::start().await;
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "guarded-db", AccessLevel::Write, HOUR).await;
    let script = "DROP TABLE items;\nTRUNCATE items;\nDELETE FROM items;\nUPDATE items SET name = 'all';\n\
                  COPY items TO PROGRAM 'cat > /dev/null';\nDELETE FROM items WHERE id = 1;\n\
                  UPDATE items SET name = 'one' WHERE id = 2;\nSELECT count(*) FROM items;\n";
    let (stdout, stderr) = psql_script(&h, &alice, "guarded-db", script).await;
    assert!(
        stderr.contains("jitgate: drop statements are not allowed on guarded-db"),
        "{stderr}"
    );
    assert!(
        stderr.contains("jitgate: truncate statements are not allowed on guarded-db"),
        "{stderr}"
    );
    assert!(
        stderr.contains("jitgate: DELETE without WHERE is not allowed on guarded-db"),
        "{stderr}"
    );
    assert!(
        stderr.contains("jitgate: UPDATE without WHERE is not allowed on guarded-db"),
        "{stderr}"
    );
    assert!(
        stderr.contains("jitgate: copy_program statements are not allowed"),
        "{stderr}"
    );
    assert!(stdout.contains("99"), "{stdout}");
    assert_eq!(h.pg.sql("app", "SELECT name FROM items WHERE id = 2").unwrap(), "one");
    assert_eq!(
        h.pg.sql("app", "SELECT count(*) FROM items WHERE name = 'all'")
            .unwrap(),
        "0"
    );
    let (_, body) = h.metrics_get("/metrics").await;
    assert_eq!(
        metric(&body, "jitgate_statement_denials_total{reason=\"unfiltered_write\"}"),
        2.0
    );
    assert_eq!(
        metric(&body, "jitgate_statement_denials_total{reason=\"deny_kind\"}"),
        3.0
    );
    eventually("denials audited", Duration::from_secs(10), || async {
        statements(&h).iter().filter(|(s, _)| s["decision"] == "denied").count() == 5
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn settings_that_change_statement_lexing_are_refused_at_every_level() {
    let h = Harness::start().await;
    let alice = h.user("alice", &["dba"]);
    h.grant("alice", "prod-db", AccessLevel::Admin, HOUR).await;
    for sql in [
        "SET standard_conforming_strings = off",
        "SET client_encoding = 'SJIS'",
        "SET NAMES 'BIG5'",
    ] {
        let out = h.psql(&alice, "prod-db", sql).await;
        assert!(!out.success, "{sql}");
        assert!(
            out.stderr.contains("would change how statements are read"),
            "{sql}: {}",
            out.stderr
        );
    }
    // The same settings in the startup packet are refused too.
    let conninfo = format!("{} client_encoding=SJIS", h.conninfo(&alice, "prod-db"));
    let out = h.psql_conninfo(&conninfo, "SELECT 1").await;
    assert!(
        !out.success && out.stderr.contains("client_encoding=\"SJIS\" is not allowed"),
        "{}",
        out.stderr
    );
    // Harmless settings pass at every level.
    assert!(
        h.psql(
            &alice,
            "prod-db",
            "SET standard_conforming_strings = on; SET client_encoding = 'UTF8'"
        )
        .await
        .success
    );
    let (_, body) = h.metrics_get("/metrics").await;
    assert_eq!(
        metric(&body, "jitgate_statement_denials_total{reason=\"unsafe_setting\"}"),
        3.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn statements_the_proxy_cannot_read_are_refused_where_deny_rules_apply() {
    let h = Harness::start().await;
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "guarded-db", AccessLevel::Write, HOUR).await;
    let before = fingerprint(&h);
    for sql in [
        "DELETE FROM ONLY items",
        "PREPARE p AS DELETE FROM items; EXECUTE p",
        "DO $$ BEGIN DELETE FROM items; END $$",
    ] {
        let out = h.psql(&alice, "guarded-db", sql).await;
        assert!(!out.success, "{sql}");
        assert!(out.stderr.contains("cannot be classified"), "{sql}: {}", out.stderr);
    }
    // A statement prepared with SQL PREPARE and run through Bind/Execute is unknown too.
    assert!(h.psql(&alice, "guarded-db", "SELECT 1").await.success);
    let mut s = raw::session(&h, &alice, "guarded-db").await;
    raw::send_query(&mut s, "PREPARE q AS UPDATE items SET name = 'x' WHERE id = 1").await;
    read_until_ready(&mut s).await;
    let mut batch = bind("", "q", &[]);
    batch.extend(execute(""));
    batch.extend(sync());
    send(&mut s, &batch).await;
    let (code, message) = error_of(&read_until_ready(&mut s).await).expect("refused");
    assert_eq!(code, "42501", "{message}");
    assert_eq!(fingerprint(&h), before);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_portal_of_an_unseen_statement_is_never_recorded_as_another() {
    let h = Harness::start().await;
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "prod-db", AccessLevel::Write, HOUR).await;
    let mut s = raw::session(&h, &alice, "prod-db").await;
    let mut batch = parse("", "SELECT 1");
    batch.extend(bind("", "", &[]));
    batch.extend(execute(""));
    batch.extend(sync());
    send(&mut s, &batch).await;
    read_until_ready(&mut s).await;
    raw::send_query(&mut s, "PREPARE p AS DELETE FROM items WHERE id = 3").await;
    read_until_ready(&mut s).await;
    let mut batch = bind("", "p", &[]);
    batch.extend(execute(""));
    batch.extend(sync());
    send(&mut s, &batch).await;
    assert!(error_of(&read_until_ready(&mut s).await).is_none());
    assert_eq!(h.pg.sql("app", "SELECT count(*) FROM items WHERE id = 3").unwrap(), "0");
    eventually("records", Duration::from_secs(10), || async {
        statements(&h).len() == 3
    })
    .await;
    let last = statements(&h).pop().unwrap().0;
    assert_eq!(last["text"], "prepared statement \"p\"", "{last}");
    assert_eq!(last["class"], "unknown");
}

#[tokio::test(flavor = "multi_thread")]
async fn lexing_changes_made_any_other_way_end_the_session() {
    let h = Harness::start().await;
    let alice = h.user("alice", &["dba"]);
    h.grant("alice", "prod-db", AccessLevel::Admin, HOUR).await;
    // From inside an expression: refused like the SET.
    let out = h
        .psql(
            &alice,
            "prod-db",
            "SELECT set_config('standard_conforming_strings', 'off', false)",
        )
        .await;
    assert!(
        !out.success && out.stderr.contains("would change how statements are read"),
        "{}",
        out.stderr
    );
    // Hidden in a function: the server's ParameterStatus gives it away and the session ends.
    h.pg.sql(
        "app",
        "CREATE FUNCTION flip() RETURNS text LANGUAGE sql AS \
         $$ SELECT set_config('standard_conforming_strings', 'off', false) $$",
    )
    .unwrap();
    // psql -c reports the first statement's result (it completed), then finds the session cut.
    let out = h.psql_commands(&alice, "prod-db", &["SELECT flip()", "SELECT 1"]).await;
    assert!(!out.success);
    assert!(
        out.stderr
            .contains("the server now reports standard_conforming_strings=off"),
        "{}",
        out.stderr
    );
    // A role or database default the proxy cannot read under never applies: the proxy pins
    // both settings in its own startup packet, which takes precedence.
    h.pg.sql(
        "postgres",
        "ALTER ROLE jit_admin SET standard_conforming_strings = off; \
         ALTER ROLE jit_admin SET client_encoding = 'SJIS'",
    )
    .unwrap();
    let out = h
        .psql(
            &alice,
            "prod-db",
            "SELECT current_setting('standard_conforming_strings') || ' ' || current_setting('client_encoding')",
        )
        .await;
    assert!(out.success, "{}", out.stderr);
    assert_eq!(out.stdout.trim(), "on UTF8");
}
