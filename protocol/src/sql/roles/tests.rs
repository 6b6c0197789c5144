use crate::sql::{classify, RolesNamed};

fn roles_of(sql: &str) -> Option<RolesNamed> {
    let mut all = classify(sql);
    assert_eq!(all.len(), 1, "{sql}");
    all.remove(0).roles
}

fn touches(sql: &str, role: &str) -> bool {
    roles_of(sql).is_some_and(|r| r.touches(&[role.to_owned()]))
}

#[test]
fn every_spelling_of_a_change_to_the_role_is_found() {
    for sql in [
        "ALTER ROLE jit_writer PASSWORD 'x'",
        "alter user JIT_WRITER with password 'x'",
        "ALTER ROLE \"jit_writer\" VALID UNTIL 'infinity'",
        "ALTER USER jit_writer LOGIN",
        "ALTER ROLE jit_writer RENAME TO other",
        "ALTER ROLE other RENAME TO jit_writer",
        "ALTER ROLE CURRENT_USER PASSWORD 'x'",
        "ALTER ROLE session_user PASSWORD 'x'",
        "ALTER ROLE current_role PASSWORD 'x'",
        "ALTER ROLE ALL SET search_path = x",
        "ALTER ROLE jit_writer SET role = 'app_owner'",
        "ALTER GROUP g ADD USER jit_writer",
        "CREATE ROLE evil IN ROLE jit_writer",
        "CREATE USER evil LOGIN PASSWORD 'x' IN GROUP jit_writer",
        "CREATE ROLE evil ROLE jit_writer",
        "CREATE ROLE evil ADMIN jit_writer",
        "GRANT jit_writer TO evil",
        "GRANT evil TO jit_writer WITH ADMIN OPTION",
        "REVOKE jit_writer FROM evil",
        "DROP ROLE IF EXISTS jit_writer",
        "ALTER ROLE U&\"jit\\005fwriter\" PASSWORD 'x'",
        "/* c */ ALTER -- c\n ROLE jit_writer PASSWORD 'x'",
        "ALTER ROLE jit_writer_with_a_very_long_name_that_goes_past_sixty_three_bytes_x PASSWORD 'x'",
    ] {
        let role = if sql.contains("sixty") {
            "jit_writer_with_a_very_long_name_that_goes_past_sixty_three_bytes_y"
        } else {
            "jit_writer"
        };
        assert!(touches(sql, role), "{sql}");
    }
}

#[test]
fn other_statements_and_other_roles_are_not_role_changes() {
    for sql in [
        "GRANT SELECT ON items TO jit_writer",
        "REVOKE ALL ON TABLE items FROM jit_writer",
        "ALTER USER MAPPING FOR jit_writer SERVER s OPTIONS (SET password 'x')",
        "SELECT 'ALTER ROLE jit_writer PASSWORD 1'",
        "SET ROLE jit_writer",
    ] {
        assert_eq!(roles_of(sql), None, "{sql}");
    }
    assert!(!touches("ALTER ROLE bob PASSWORD 'x'", "jit_writer"));
    assert!(!touches("ALTER ROLE \"JIT_WRITER\" PASSWORD 'x'", "jit_writer"));
    assert!(touches("ALTER ROLE \"JIT_WRITER\" PASSWORD 'x'", "JIT_WRITER"));
    assert!(!touches("ALTER ROLE JIT_WRITER PASSWORD 'x'", "JIT_WRITER"));
}

#[test]
fn code_that_may_change_a_role_is_found_by_its_words() {
    let roles = ["jit_writer".to_owned()];
    assert!(super::code_may_change(
        "DO $$BEGIN EXECUTE 'ALTER ROLE jit_writer PASSWORD ''x'''; END$$",
        &roles
    ));
    assert!(super::code_may_change(
        "DO $$BEGIN EXECUTE format('ALTER USER %I PASSWORD %L', current_user, 'x'); END$$",
        &roles
    ));
    assert!(!super::code_may_change(
        "DO $$BEGIN RAISE NOTICE '%', current_user; END$$",
        &roles
    ));
    assert!(!super::code_may_change("DO $$BEGIN PERFORM 1; END$$", &roles));
}

#[test]
fn a_prefix_protects_every_role_it_starts() {
    assert!(touches("ALTER ROLE jit_alice_0123abcd PASSWORD 'x'", "jit_*"));
    assert!(touches("ALTER USER JIT_Alice_0123 VALID UNTIL 'infinity'", "jit_*"));
    assert!(touches("GRANT app_owner TO \"jit_bob_99\"", "jit_*"));
    assert!(touches("ALTER ROLE current_user PASSWORD 'x'", "jit_*"));
    assert!(!touches("ALTER ROLE \"JIT_alice\" PASSWORD 'x'", "jit_*"));
    assert!(!touches("ALTER ROLE app PASSWORD 'x'", "jit_*"));
    let roles = ["jit_*".to_owned()];
    assert!(super::code_may_change(
        "DO $$BEGIN EXECUTE 'ALTER ROLE JIT_alice_1 PASSWORD ''x'''; END$$",
        &roles
    ));
    assert!(!super::code_may_change(
        "DO $$BEGIN EXECUTE 'ALTER ROLE app PASSWORD ''x'''; END$$",
        &roles
    ));
}
