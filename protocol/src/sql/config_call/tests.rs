use crate::sql::{classify, Classified, SessionChange, StatementClass};

fn one(sql: &str) -> Classified {
    let mut all = classify(sql);
    assert_eq!(all.len(), 1, "{sql}");
    all.remove(0)
}

#[test]
fn set_config_of_role_is_set_role_wherever_it_sits() {
    for sql in [
        "SELECT set_config('role', 'app_owner', false)",
        "select SET_CONFIG('ROLE', 'app_owner', false)",
        "SELECT pg_catalog.set_config('role', 'app_owner', true)",
        "SELECT \"set_config\"('Role', 'app_owner', false)",
        "SELECT * FROM set_config('role', 'app_owner', false)",
        "SELECT 1 WHERE EXISTS (SELECT set_config('role', 'app_owner', false))",
        "WITH x AS (SELECT set_config('role', $$app_owner$$, false)) SELECT * FROM x",
        "SELECT count(*) FROM items WHERE set_config('role', 'app_owner', false) IS NOT NULL",
        "PREPARE p AS SELECT set_config('role', 'app_owner', false)",
    ] {
        let c = one(sql);
        assert_eq!(c.kind, "set_role", "{sql}");
        assert_eq!(c.class, StatementClass::Privilege, "{sql}");
        assert_eq!(
            c.session_change,
            Some(SessionChange::Role(Some("app_owner".into()))),
            "{sql}"
        );
    }
    let c = one("SELECT set_config('role', 'none', false)");
    assert_eq!(c.session_change, Some(SessionChange::Role(None)));
}

#[test]
fn set_config_of_session_authorization_is_set_session_authorization() {
    let c = one("SELECT set_config('session_authorization', 'bob', false)");
    assert_eq!(c.kind, "set_session_authorization");
    assert_eq!(c.class, StatementClass::Privilege);
    assert_eq!(
        c.session_change,
        Some(SessionChange::SessionAuthorization(Some("bob".into())))
    );
}

#[test]
fn a_computed_name_or_value_is_unknown() {
    for sql in [
        "SELECT set_config('ro' || 'le', 'app_owner', false)",
        "SELECT set_config($1, $2, false)",
        "SELECT set_config(E'role', 'app_owner', false)",
        "SELECT set_config(U&'role', 'app_owner', false)",
        "SELECT set_config('role'::text, 'app_owner', false)",
        "SELECT set_config((SELECT 'role'), 'app_owner', false)",
        "SELECT set_config(lower('ROLE'), 'app_owner', false)",
        "SELECT set_config(setting_name => 'role', new_value => 'x', is_local => false)",
        "SELECT set_config('role', current_setting('my.role'), false)",
        "SELECT set_config('role', 'a', false), set_config('role', 'b', false)",
    ] {
        let c = one(sql);
        assert_eq!(c.class, StatementClass::Unknown, "{sql}");
        assert_eq!(c.session_change, None, "{sql}");
    }
}

#[test]
fn other_settings_leave_the_statement_alone() {
    let c = one("SELECT set_config('application_name', 'x', false)");
    assert_eq!((c.class, c.kind), (StatementClass::Read, "select"));
    let c = one("SELECT my_set_config('role', 'x', false)");
    assert_eq!((c.class, c.kind), (StatementClass::Read, "select"));
}
