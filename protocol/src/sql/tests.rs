//! Unit tests for statement splitting, classification and redaction.

use super::*;

/// Classifies text holding exactly one statement.
fn one(sql: &str) -> Classified {
    let mut all = classify(sql);
    assert_eq!(all.len(), 1, "{sql:?} gave {all:?}");
    all.remove(0)
}

fn class(sql: &str) -> StatementClass {
    one(sql).class
}

fn kind(sql: &str) -> &'static str {
    one(sql).kind
}

#[test]
fn reads() {
    for sql in [
        "SELECT 1",
        "select * from t where a = 1",
        "VALUES (1), (2)",
        "SHOW search_path",
        "SHOW ALL",
        "EXPLAIN SELECT * FROM t",
        "EXPLAIN DELETE FROM t",
        "EXPLAIN (ANALYZE false) DELETE FROM t",
        "EXPLAIN (ANALYZE off, COSTS) DELETE FROM t",
        "DECLARE c CURSOR FOR SELECT * FROM t",
        "FETCH NEXT FROM c",
        "FETCH 10 c",
        "MOVE NEXT IN c",
        "CLOSE c",
        "CLOSE ALL",
        "SELECT * FROM (SELECT 1) s WHERE EXISTS (SELECT 1 FROM u)",
        "WITH a AS (SELECT 1) SELECT * FROM a",
    ] {
        assert_eq!(class(sql), StatementClass::Read, "{sql}");
    }
    assert_eq!(kind("SELECT 1"), "select");
    assert_eq!(kind("EXPLAIN SELECT 1"), "explain");
    assert_eq!(kind("SHOW search_path"), "show");
}

#[test]
fn transactions() {
    for (sql, expected) in [
        ("BEGIN", "begin"),
        ("BEGIN ISOLATION LEVEL SERIALIZABLE", "begin"),
        ("START TRANSACTION READ ONLY", "begin"),
        ("COMMIT", "commit"),
        ("END", "commit"),
        ("ROLLBACK", "rollback"),
        ("ABORT", "rollback"),
        ("ROLLBACK TO SAVEPOINT s", "rollback"),
        ("SAVEPOINT s", "savepoint"),
        ("RELEASE SAVEPOINT s", "release"),
        ("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ", "set_transaction"),
    ] {
        let c = one(sql);
        assert_eq!((c.class, c.kind), (StatementClass::Transaction, expected), "{sql}");
    }
}

#[test]
fn session_settings() {
    for (sql, expected) in [
        ("SET work_mem = '64MB'", "set"),
        ("SET LOCAL statement_timeout TO 1000", "set"),
        ("SET TIME ZONE 'UTC'", "set"),
        ("SET NAMES 'UTF8'", "set"),
        ("SET client_encoding = 'utf-8'", "set"),
        ("SET standard_conforming_strings = on", "set"),
        ("RESET work_mem", "reset"),
        ("DISCARD PLANS", "discard"),
        ("LISTEN ch", "listen"),
        ("UNLISTEN *", "unlisten"),
    ] {
        let c = one(sql);
        assert_eq!((c.class, c.kind), (StatementClass::Session, expected), "{sql}");
        assert_eq!(c.session_change, None, "{sql}");
    }
}

#[test]
fn settings_that_change_lexing_are_unknown() {
    for sql in [
        "SET standard_conforming_strings = off",
        "SET standard_conforming_strings TO 'off'",
        "SET client_encoding = 'SJIS'",
        "SET NAMES 'BIG5'",
    ] {
        assert_eq!(class(sql), StatementClass::Unknown, "{sql}");
    }
}

#[test]
fn utilities() {
    for (sql, expected) in [
        ("VACUUM", "vacuum"),
        ("VACUUM FULL t", "vacuum"),
        ("VACUUM (VERBOSE, ANALYZE) t", "vacuum"),
        ("ANALYZE t", "analyze"),
        ("ANALYZE VERBOSE t", "analyze"),
        ("CHECKPOINT", "checkpoint"),
        ("COMMENT ON TABLE t IS 'x'", "comment"),
        ("DEALLOCATE p", "deallocate"),
        ("DEALLOCATE ALL", "deallocate"),
    ] {
        let c = one(sql);
        assert_eq!((c.class, c.kind), (StatementClass::Utility, expected), "{sql}");
    }
}

#[test]
fn writes() {
    for (sql, expected) in [
        ("INSERT INTO t VALUES (1)", "insert"),
        ("INSERT INTO t SELECT * FROM s ON CONFLICT DO NOTHING", "insert"),
        ("UPDATE t SET a = 1 WHERE b = 2", "update"),
        ("DELETE FROM t WHERE a = 1", "delete"),
        ("MERGE INTO t USING s ON t.a = s.a WHEN MATCHED THEN DELETE", "merge"),
        ("TRUNCATE t", "truncate"),
        ("TRUNCATE TABLE ONLY t RESTART IDENTITY", "truncate"),
        ("LOCK TABLE t IN ACCESS EXCLUSIVE MODE", "lock"),
        ("CALL p(1)", "call"),
        ("NOTIFY ch, 'x'", "notify"),
        ("REFRESH MATERIALIZED VIEW mv", "refresh"),
        ("SELECT * INTO t2 FROM t", "select"),
        ("SELECT * FROM t FOR UPDATE", "select"),
        ("SELECT * FROM t FOR SHARE", "select"),
        ("SELECT * FROM (SELECT * FROM t FOR UPDATE) s", "select"),
        ("DECLARE c CURSOR FOR SELECT * FROM t FOR UPDATE", "declare"),
        ("EXPLAIN ANALYZE DELETE FROM t", "explain"),
        ("EXPLAIN (ANALYZE, BUFFERS) DELETE FROM t", "explain"),
        ("EXPLAIN (ANALYZE TRUE) UPDATE t SET a = 1", "explain"),
        ("PREPARE p (int) AS DELETE FROM t WHERE a = $1", "prepare"),
        (
            "WITH a AS (SELECT 1) DELETE FROM t WHERE x IN (SELECT * FROM a)",
            "delete",
        ),
        ("COPY (DELETE FROM t RETURNING *) TO STDOUT", "copy_to"),
        ("COPY t TO '/tmp/t.csv'", "copy_to"),
    ] {
        let c = one(sql);
        assert_eq!((c.class, c.kind), (StatementClass::Write, expected), "{sql}");
    }
}

#[test]
fn prepare_takes_its_body_class() {
    let c = one("PREPARE p AS SELECT * FROM t");
    assert_eq!((c.class, c.kind), (StatementClass::Read, "prepare"));
    assert_eq!(c.tables, ["t"]);
    let c = one("EXECUTE p(1)");
    assert_eq!((c.class, c.kind), (StatementClass::Unknown, "execute"));
    assert_eq!(class("EXPLAIN ANALYZE EXECUTE p"), StatementClass::Unknown);
}

#[test]
fn data_modifying_cte_is_never_read() {
    let c = one("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d");
    assert!(
        matches!(c.class, StatementClass::Write | StatementClass::Unknown),
        "{c:?}"
    );
    assert!(c.tables.contains(&"t".to_owned()), "{c:?}");
}

#[test]
fn ddl() {
    for (sql, expected) in [
        ("CREATE TABLE t (a int)", "create"),
        ("CREATE TEMP TABLE t AS SELECT * FROM s", "create"),
        ("CREATE INDEX i ON t (a)", "create"),
        ("CREATE VIEW v AS SELECT * FROM t", "create"),
        ("CREATE MATERIALIZED VIEW mv AS SELECT 1", "create"),
        ("CREATE SCHEMA s", "create"),
        ("CREATE EXTENSION pgcrypto", "create"),
        (
            "CREATE FUNCTION f() RETURNS int AS $$ SELECT 1 $$ LANGUAGE sql",
            "create",
        ),
        ("CREATE TYPE ty AS (a int)", "create"),
        ("CREATE SEQUENCE sq", "create"),
        ("ALTER TABLE t ADD COLUMN b int", "alter"),
        ("DROP TABLE t", "drop"),
        ("DROP INDEX i", "drop"),
        ("DROP SCHEMA s CASCADE", "drop"),
        ("DROP FUNCTION f", "drop"),
        ("DROP EXTENSION pgcrypto", "drop"),
    ] {
        let c = one(sql);
        assert_eq!((c.class, c.kind), (StatementClass::Ddl, expected), "{sql}");
    }
}

#[test]
fn privileges() {
    for (sql, expected) in [
        ("GRANT SELECT ON t TO bob", "grant"),
        ("GRANT admin TO bob", "grant"),
        ("REVOKE SELECT ON t FROM bob", "revoke"),
        ("CREATE ROLE r LOGIN", "create_role"),
        ("CREATE USER u WITH ENCRYPTED PASSWORD 'p'", "create_role"),
        ("ALTER ROLE bob SUPERUSER", "alter_role"),
        ("ALTER USER bob PASSWORD 'x'", "alter_role"),
        ("DROP ROLE r", "drop_role"),
        ("DROP USER IF EXISTS a, b", "drop_role"),
        ("ALTER SYSTEM SET work_mem = '1MB'", "alter_system"),
        (
            "ALTER DEFAULT PRIVILEGES IN SCHEMA s GRANT SELECT ON TABLES TO r",
            "alter_default_privileges",
        ),
        ("SECURITY LABEL ON TABLE t IS 'secret'", "security_label"),
        ("REASSIGN OWNED BY a TO b", "reassign_owned"),
        ("DROP OWNED BY a", "drop_owned"),
        ("SET ROLE x", "set_role"),
        ("RESET ROLE", "set_role"),
        ("SET SESSION AUTHORIZATION y", "set_session_authorization"),
        ("RESET SESSION AUTHORIZATION", "set_session_authorization"),
        ("LOAD 'auto_explain'", "load"),
    ] {
        let c = one(sql);
        assert_eq!((c.class, c.kind), (StatementClass::Privilege, expected), "{sql}");
    }
}

#[test]
fn session_changes() {
    let change = |sql: &str| one(sql).session_change;
    assert_eq!(change("SET ROLE x"), Some(SessionChange::Role(Some("x".into()))));
    assert_eq!(
        change("SET ROLE \"Admin\""),
        Some(SessionChange::Role(Some("Admin".into())))
    );
    assert_eq!(
        change("SET LOCAL ROLE Admin"),
        Some(SessionChange::Role(Some("admin".into())))
    );
    assert_eq!(change("SET role = 'x'"), Some(SessionChange::Role(Some("x".into()))));
    assert_eq!(change("SET ROLE NONE"), Some(SessionChange::Role(None)));
    assert_eq!(change("RESET ROLE"), Some(SessionChange::Role(None)));
    assert_eq!(
        change("SET SESSION AUTHORIZATION y"),
        Some(SessionChange::SessionAuthorization(Some("y".into())))
    );
    assert_eq!(
        change("SET SESSION AUTHORIZATION DEFAULT"),
        Some(SessionChange::SessionAuthorization(None))
    );
    assert_eq!(
        change("RESET SESSION AUTHORIZATION"),
        Some(SessionChange::SessionAuthorization(None))
    );
    assert_eq!(
        change("SET search_path = a, b"),
        Some(SessionChange::SearchPath(Some("a, b".into())))
    );
    assert_eq!(
        change("SET search_path TO \"$user\", Public, 'x''y'"),
        Some(SessionChange::SearchPath(Some("\"$user\", public, 'x''y'".into())))
    );
    assert_eq!(
        change("SET search_path TO DEFAULT"),
        Some(SessionChange::SearchPath(None))
    );
    assert_eq!(change("RESET search_path"), Some(SessionChange::SearchPath(None)));
    assert_eq!(change("RESET ALL"), Some(SessionChange::SearchPath(None)));
    assert_eq!(change("DISCARD ALL"), Some(SessionChange::SessionAuthorization(None)));
    assert_eq!(class("SET search_path = a, b"), StatementClass::Session);
    assert_eq!(class("SET role = x"), StatementClass::Privilege);
    assert_eq!(class("SET \"ROLE\" = x"), StatementClass::Privilege);
}

#[test]
fn splits_with_exact_texts() {
    let all = classify("SELECT 1; DROP TABLE t");
    let got: Vec<_> = all.iter().map(|c| (c.class, c.text.as_str())).collect();
    assert_eq!(
        got,
        [
            (StatementClass::Read, "SELECT 1"),
            (StatementClass::Ddl, "DROP TABLE t")
        ]
    );

    let all = classify("  SELECT 'a;b' ;\n\tSELECT $$x;y$$;  ");
    let texts: Vec<_> = all.iter().map(|c| c.text.as_str()).collect();
    assert_eq!(texts, ["SELECT 'a;b'", "SELECT $$x;y$$"]);

    let all = classify("SELECT \"a;b\"; SELECT $tag$ $$ ; $tag$; SELECT E'\\';'; SELECT 1 -- x ; y\n");
    let texts: Vec<_> = all.iter().map(|c| c.text.as_str()).collect();
    assert_eq!(
        texts,
        [
            "SELECT \"a;b\"",
            "SELECT $tag$ $$ ; $tag$",
            "SELECT E'\\';'",
            "SELECT 1 -- x ; y"
        ]
    );

    let all = classify("SELECT 'é';SELECT 'ü'\r\n; DELETE FROM t");
    let texts: Vec<_> = all.iter().map(|c| c.text.as_str()).collect();
    assert_eq!(texts, ["SELECT 'é'", "SELECT 'ü'", "DELETE FROM t"]);
}

#[test]
fn comments_and_case_do_not_hide_statements() {
    assert_eq!(class("/* x */ DROP TABLE t"), StatementClass::Ddl);
    assert_eq!(class("-- hello\ndRoP tAbLe t"), StatementClass::Ddl);
    assert_eq!(
        class("/* a /* nested ; */ still comment */ DROP TABLE t"),
        StatementClass::Ddl
    );
    assert_eq!(one("/* x */ DROP TABLE t").text, "/* x */ DROP TABLE t");
    let all = classify("SELECT 1 /* ; */; -- ; \n DELETE FROM t");
    let classes: Vec<_> = all.iter().map(|c| c.class).collect();
    assert_eq!(classes, [StatementClass::Read, StatementClass::Write]);
    // With standard_conforming_strings on, a backslash does not escape a quote.
    let all = classify("SELECT 'x\\', '; DROP TABLE t; --'");
    assert_eq!(all.len(), 1);
    let all = classify("SELECT 'a\\'; DROP TABLE t; --'");
    let classes: Vec<_> = all.iter().map(|c| c.class).collect();
    assert_eq!(classes, [StatementClass::Read, StatementClass::Ddl]);
}

#[test]
fn tables() {
    assert_eq!(one("select * from a join b.c on true").tables, ["a", "b.c"]);
    assert_eq!(
        one("SELECT * FROM T, t, Public.Foo, \"MyTab\"").tables,
        ["t", "public.foo", "\"MyTab\""]
    );
    assert_eq!(one("SELECT * FROM generate_series(1, 3) g, t").tables, ["t"]);
    assert_eq!(one("INSERT INTO s.t (a) SELECT * FROM u").tables, ["s.t", "u"]);
    assert_eq!(one("COPY t FROM STDIN").tables, ["t"]);
    assert_eq!(one("TRUNCATE t, u").tables, ["t", "u"]);
    assert_eq!(one("DROP TABLE t, s.u").tables, ["t", "s.u"]);
    assert_eq!(
        one("SELECT (SELECT max(a) FROM t2) FROM t1 WHERE EXISTS (SELECT 1 FROM t3)").tables,
        ["t2", "t1", "t3"]
    );
    assert_eq!(one("GRANT SELECT ON t TO bob").tables, ["t"]);
    assert!(one("SELECT 1").tables.is_empty());
}

#[test]
fn misread_only_is_unknown() {
    // sqlparser reads `ONLY t` as a table named ONLY aliased t, hiding the real table.
    assert_eq!(class("SELECT * FROM ONLY t"), StatementClass::Unknown);
    assert_eq!(class("DELETE FROM ONLY t WHERE a = 1"), StatementClass::Unknown);
    assert_eq!(class("SELECT * FROM \"only\""), StatementClass::Read);
}

#[test]
fn where_clauses() {
    assert_eq!(one("UPDATE t SET a = 1").has_where, Some(false));
    assert_eq!(one("UPDATE t SET a = 1 WHERE b = 2").has_where, Some(true));
    assert_eq!(one("DELETE FROM t").has_where, Some(false));
    assert_eq!(one("DELETE FROM t USING u WHERE t.a = u.a").has_where, Some(true));
    assert_eq!(one("WITH a AS (SELECT 1) DELETE FROM t").has_where, Some(false));
    assert_eq!(one("SELECT 1 WHERE true").has_where, None);
    assert_eq!(one("INSERT INTO t VALUES (1)").has_where, None);
}

#[test]
fn copy() {
    let c = one("COPY t FROM STDIN");
    assert_eq!((c.class, c.kind), (StatementClass::Write, "copy_from"));
    let c = one("COPY (SELECT 1) TO STDOUT");
    assert_eq!((c.class, c.kind), (StatementClass::Read, "copy_to"));
    let c = one("COPY t (a, b) TO STDOUT WITH (FORMAT csv)");
    assert_eq!((c.class, c.kind), (StatementClass::Read, "copy_to"));
    let c = one("COPY t TO PROGRAM 'x'");
    assert_eq!((c.class, c.kind), (StatementClass::Write, "copy_program"));
    let c = one("COPY t FROM PROGRAM 'curl x'");
    assert_eq!((c.class, c.kind), (StatementClass::Write, "copy_program"));
}

#[test]
fn garbage_is_unknown() {
    for sql in [
        "this is not sql",
        "SELECT FROM WHERE (",
        "SELECT 'unterminated",
        "SELECT 1 /* unterminated",
        "USE db",
        "SHOW TABLES; FLUSH TABLES",
    ] {
        let all = classify(sql);
        assert!(all.iter().any(|c| c.class == StatementClass::Unknown), "{sql}: {all:?}");
    }
    let c = one("  this is not sql ;  ");
    assert_eq!(
        (c.class, c.kind, c.text.as_str()),
        (StatementClass::Unknown, "unknown", "this is not sql")
    );
    let c = one("SELECT 'unterminated; DROP TABLE t");
    assert_eq!((c.class, c.kind), (StatementClass::Unknown, "unknown"));
    assert_eq!(c.text, "SELECT 'unterminated; DROP TABLE t");
}

#[test]
fn one_bad_statement_leaves_the_others() {
    let all = classify("SELECT 1; not sql; DELETE FROM t");
    let got: Vec<_> = all.iter().map(|c| (c.class, c.kind)).collect();
    assert_eq!(
        got,
        [
            (StatementClass::Read, "select"),
            (StatementClass::Unknown, "unknown"),
            (StatementClass::Write, "delete")
        ]
    );
}

#[test]
fn deep_nesting_is_unknown_without_overflow() {
    let n = 10_000;
    let sql = format!("SELECT {}1{}", "(".repeat(n), ")".repeat(n));
    assert_eq!(class(&sql), StatementClass::Unknown);
    let sql = format!("SELECT {}1{}", "ARRAY[".repeat(n), "]".repeat(n));
    assert_eq!(class(&sql), StatementClass::Unknown);
    let sql = format!("SELECT {}true", "NOT ".repeat(n));
    assert_eq!(class(&sql), StatementClass::Unknown);
    // Just within the limits: parsed, visited and dropped on the test thread's stack.
    let sql = format!(
        "SELECT {}1{}",
        "(".repeat(RECURSION_LIMIT / 2),
        ")".repeat(RECURSION_LIMIT / 2)
    );
    assert_eq!(class(&sql), StatementClass::Read);
}

#[test]
fn long_chains_are_bounded() {
    // (head, link, operator tokens per link): the deepest trees the limit lets through.
    let chains = [
        ("SELECT 1", "+1", 1),
        ("SELECT 1 WHERE a", " OR a", 1),
        ("SELECT 1", " UNION SELECT 1", 2),
        ("SELECT a", "::int", 2),
        ("SELECT a", "[1]", 2),
        ("SELECT a", " IS NULL", 1),
        ("SELECT 'a'", " || 'a'", 1),
    ];
    for (head, link, per_link) in chains {
        let within = format!("{head}{}", link.repeat((MAX_OPERATOR_TOKENS - 2) / per_link));
        assert_ne!(class(&within), StatementClass::Unknown, "{head}{link}...");
        let beyond = format!("{head}{}", link.repeat(MAX_OPERATOR_TOKENS * 2));
        assert_eq!(class(&beyond), StatementClass::Unknown, "{head}{link}...");
    }
    let rows = vec!["(1, 'x', NULL, -1, $1)"; 5_000].join(", ");
    assert_eq!(class(&format!("INSERT INTO t VALUES {rows}")), StatementClass::Write);
}

#[test]
fn empty_input() {
    for sql in ["", ";;", "  \n", "-- just a comment", "/* c */ ; ;"] {
        let c = one(sql);
        assert_eq!((c.class, c.kind), (StatementClass::Read, "empty"), "{sql:?}");
    }
}

#[test]
fn kinds_are_bounded_and_classes_named() {
    let corpus = [
        "SELECT 1; INSERT INTO t VALUES (1); UPDATE t SET a = 1; DELETE FROM t; TRUNCATE t",
        "MERGE INTO t USING s ON true WHEN MATCHED THEN DELETE; DROP TABLE t; CREATE TABLE t (a int)",
        "ALTER TABLE t ADD b int; ALTER SYSTEM SET a = 1; GRANT SELECT ON t TO b; REVOKE SELECT ON t FROM b",
        "CREATE ROLE r; ALTER ROLE r LOGIN; DROP ROLE r; COPY t FROM STDIN; COPY t TO STDOUT; COPY t TO PROGRAM 'x'",
        "SET a = 1; SET ROLE r; SET SESSION AUTHORIZATION r; RESET a; SHOW a; BEGIN; COMMIT; ROLLBACK",
        "SAVEPOINT s; RELEASE s; EXPLAIN SELECT 1; VACUUM; ANALYZE; CHECKPOINT; LOCK t; CALL p()",
        "DO $$ $$; PREPARE p AS SELECT 1; EXECUTE p; DEALLOCATE p; DECLARE c CURSOR FOR SELECT 1; FETCH NEXT FROM c",
        "CLOSE c; LISTEN c; UNLISTEN c; NOTIFY c; DISCARD ALL; COMMENT ON TABLE t IS 'x'; USE x; nonsense",
    ];
    for sql in corpus {
        for c in classify(sql) {
            assert!(
                KINDS.contains(&c.kind),
                "{:?} has kind {:?} outside KINDS",
                c.text,
                c.kind
            );
        }
    }
    let names: Vec<_> = [
        StatementClass::Read,
        StatementClass::Transaction,
        StatementClass::Session,
        StatementClass::Utility,
        StatementClass::Write,
        StatementClass::Ddl,
        StatementClass::Privilege,
        StatementClass::Unknown,
    ]
    .iter()
    .map(|c| c.as_str())
    .collect();
    assert_eq!(
        names,
        [
            "read",
            "transaction",
            "session",
            "utility",
            "write",
            "ddl",
            "privilege",
            "unknown"
        ]
    );
    assert!(StatementClass::Read < StatementClass::Write && StatementClass::Privilege < StatementClass::Unknown);
}

#[test]
fn redacts_role_passwords() {
    let out = redact("ALTER ROLE bob PASSWORD 'hunter2'");
    assert!(!out.contains("hunter2"), "{out}");
    assert!(out.contains("PASSWORD '***'"), "{out}");
    assert_eq!(out, "ALTER ROLE bob PASSWORD '***'");

    let out = redact("CREATE USER x WITH ENCRYPTED PASSWORD 'p''q'");
    assert_eq!(out, "CREATE USER x WITH ENCRYPTED PASSWORD '***'");

    let out = redact("create role r login password 'x' valid until '2030-01-01'");
    assert_eq!(out, "create role r login password '***' valid until '2030-01-01'");

    assert_eq!(
        redact("ALTER USER bob PASSWORD E'a\\'b' LOGIN"),
        "ALTER USER bob PASSWORD '***' LOGIN"
    );
    assert_eq!(
        redact("alter user bob password $p$se'cr;et$p$"),
        "alter user bob password '***'"
    );
    assert_eq!(
        redact("ALTER USER bob PASSWORD /* c */ 'x'"),
        "ALTER USER bob PASSWORD /* c */ '***'"
    );
    assert_eq!(
        redact("CREATE USER MAPPING FOR bob SERVER s OPTIONS (user 'bob', password 'x')"),
        "CREATE USER MAPPING FOR bob SERVER s OPTIONS (user 'bob', password '***')"
    );
    assert_eq!(
        redact("ALTER ROLE a PASSWORD 'x'; ALTER ROLE b PASSWORD 'y'"),
        "ALTER ROLE a PASSWORD '***'; ALTER ROLE b PASSWORD '***'"
    );
}

#[test]
fn redact_leaves_other_text_alone() {
    for sql in [
        "SELECT 1",
        "SELECT password FROM users WHERE password = 'x'",
        "SELECT 'password', \"password\" 'x'",
        "-- password 'x'\nSELECT 1",
        "ALTER ROLE bob PASSWORD NULL",
        "SELECT $1, $$ password 'x' $$",
        "",
        "SELECT 'é' -- ü",
    ] {
        assert_eq!(redact(sql), sql);
    }
}

#[test]
fn redacts_malformed_text_to_the_end() {
    assert_eq!(
        redact("ALTER ROLE bob PASSWORD 'hunter2; SELECT 1"),
        "ALTER ROLE bob PASSWORD '***'"
    );
    assert_eq!(
        redact("ALTER ROLE bob PASSWORD E'hunter2\\"),
        "ALTER ROLE bob PASSWORD '***'"
    );
    assert_eq!(
        redact("ALTER ROLE bob PASSWORD $x$hunter2"),
        "ALTER ROLE bob PASSWORD '***'"
    );
    assert_eq!(redact("ALTER ROLE bob PASSWORD 'é"), "ALTER ROLE bob PASSWORD '***'");
}

#[test]
fn redacting_twice_changes_nothing_more() {
    // Fuzz finding 4: a dollar-quoted password right before a quote. The mask must not join
    // the quote into a longer literal, or a second pass reads another token structure.
    let once = redact("ALTER ROLE r PASSWORD $é$x$é$'tail");
    assert_eq!(once, "ALTER ROLE r PASSWORD '***' 'tail");
    assert_eq!(redact(&once), once);
    for sql in [
        "ALTER ROLE r PASSWORD $$a$$'b' PASSWORD 'c'",
        "ALTER ROLE r PASSWORD E'a''b''c'",
        "ALTER ROLE r PASSWORD 'a''' ",
    ] {
        let once = redact(sql);
        assert_eq!(redact(&once), once, "{sql:?}");
    }
}

#[test]
fn a_unicode_space_ending_an_identifier_stays_in_the_text() {
    // Fuzz finding 5: PostgreSQL reads U+00A0 (bytes C2 A0) as part of an identifier, but
    // `str::trim` dropped it from the statement's text, so the recorded text named table `t`
    // while the statement that ran names `t\u{a0}`.
    for sql in [
        "SELECT FROM t\u{a0};",
        "SELECT 1; SELECT FROM t\u{a0}",
        "SELECT FROM t\u{a0}\u{2003}",
    ] {
        let list = classify(sql);
        let last = list.last().unwrap();
        assert!(
            last.text.ends_with('\u{a0}') || last.text.ends_with('\u{2003}'),
            "{sql:?}: {:?}",
            last.text
        );
        let alone = classify(&last.text);
        assert_eq!(alone[0].tables, last.tables, "{sql:?}");
        assert_eq!(alone[0].text, last.text);
    }
    assert_eq!(classify(" \t\n\r\x0b\x0cSELECT 1 \x0c;")[0].text, "SELECT 1");
}

#[test]
fn do_blocks_are_unknown() {
    // A DO block can run any statement through dynamic EXECUTE.
    assert_eq!(
        class("DO $$ BEGIN EXECUTE 'DROP TABLE t'; END $$"),
        StatementClass::Unknown
    );
    assert_eq!(classify("DO $$ BEGIN PERFORM 1; END $$")[0].kind, "do");
}
