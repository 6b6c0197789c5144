//! Attacks on how the server reads statement text: a statement pipelined behind one that
//! changes `client_encoding` or `standard_conforming_strings` (by a computed `set_config`, a
//! function running `SET`) must never reach the server, whatever the encoding; ordinary
//! pipelines keep flowing. And `set_config('role', ...)` counts as `SET ROLE`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use jitgate_protocol::postgres::backend::BackendMessage;
use jitgate_protocol::postgres::messages::encode_query;
use jitgate_tests::jitgate::model::AccessLevel;
use jitgate_tests::raw::{self, bind, error_of, execute, first_column, parse, read_until_ready, send, sync, Msg};
use jitgate_tests::{eventually, statements, Harness, READER_PASSWORD, WRITER_PASSWORD};

const HOUR: Duration = Duration::from_secs(3600);

/// Reads through `n` `ReadyForQuery`s, or until the proxy closes the session.
async fn read_answers<S: tokio::io::AsyncReadExt + Unpin>(s: &mut S, n: usize) -> Vec<Msg> {
    let mut all = Vec::new();
    for _ in 0..n {
        let msgs = read_until_ready(s).await;
        let done = !msgs
            .iter()
            .any(|m| matches!(m.decoded, BackendMessage::ReadyForQuery { .. }));
        all.extend(msgs);
        if done {
            break;
        }
    }
    all
}

/// Reads until the proxy closes the session.
async fn read_to_end<S: tokio::io::AsyncReadExt + Unpin>(s: &mut S) -> Vec<Msg> {
    read_answers(s, usize::MAX).await
}

/// Every error in `msgs`: (SQLSTATE, message).
fn errors(msgs: &[Msg]) -> Vec<(String, String)> {
    msgs.iter()
        .filter_map(|m| match &m.decoded {
            BackendMessage::ErrorResponse(f) => Some((f.code().to_owned(), f.message().to_owned())),
            _ => None,
        })
        .collect()
}

/// The password the attacker tries to plant.
const CHOSEN: &str = "chosen";

async fn assert_password_unchanged(h: &Harness, role: &str) {
    let planted = h.direct_psql(role, CHOSEN, "SELECT 1").await;
    assert!(!planted.success, "the smuggled ALTER ROLE ran: {planted:?}");
    let password = if role == "jit_reader" {
        READER_PASSWORD
    } else {
        WRITER_PASSWORD
    };
    let original = h.direct_psql(role, password, "SELECT 1").await;
    assert!(original.success, "{original:?}");
}

/// The last `statement` record whose text contains `needle`.
fn record_with(h: &Harness, needle: &str) -> serde_json::Value {
    statements(h)
        .into_iter()
        .map(|(s, _)| s)
        .rfind(|s| s["text"].as_str().is_some_and(|t| t.contains(needle)))
        .unwrap_or_else(|| panic!("no statement record containing {needle:?}"))
}

/// A function anyone may call that changes the session's client encoding, as user code can.
const SWITCH_ENCODING: &str = "CREATE FUNCTION switch_encoding(e text) RETURNS text LANGUAGE plpgsql AS \
     $$ BEGIN EXECUTE 'SET client_encoding = ' || quote_literal(e); RETURN e; END $$";

#[tokio::test(flavor = "multi_thread")]
async fn a_statement_behind_an_encoding_change_never_runs() {
    let h = Harness::start().await;
    h.pg.sql("app", SWITCH_ENCODING).unwrap();
    let alice = h.user("alice", &["dev"]);
    let bob = h.user("bob", &["dev"]);
    h.grant("alice", "prod-db", AccessLevel::Read, HOUR).await;
    h.grant("bob", "prod-db", AccessLevel::Write, HOUR).await;
    // A character whose last byte, in that encoding, starts a two-byte character that takes
    // the backslash after it: the proxy sees one string literal, the server two statements.
    // The change comes from a function on the read grant, from a set_config with a computed
    // name on the write grant (which may run statements the proxy cannot classify).
    let cases = [
        (&alice, "jit_reader", "SJIS", "\u{c1}"),
        (&alice, "jit_reader", "BIG5", "\u{4e2d}"),
        (&alice, "jit_reader", "GBK", "\u{4e2d}"),
        (&alice, "jit_reader", "GB18030", "\u{4e2d}"),
        (&alice, "jit_reader", "UHC", "\u{4e2d}"),
        (&bob, "jit_writer", "SJIS", "\u{c1}"),
        (&bob, "jit_writer", "BIG5", "\u{4e2d}"),
    ];
    for (user, role, encoding, lead) in cases {
        let mut s = raw::session(&h, user, "prod-db").await;
        let flip = if role == "jit_reader" {
            format!("SELECT switch_encoding('{encoding}')")
        } else {
            format!("SELECT set_config('client_' || 'encoding', '{encoding}', false)")
        };
        let mut batch = encode_query(&flip);
        let smuggle = format!("SELECT E'{lead}\\' ; ALTER ROLE CURRENT_USER PASSWORD $${CHOSEN}$$; --'");
        batch.extend(encode_query(&smuggle));
        send(&mut s, &batch).await;
        let msgs = read_to_end(&mut s).await;
        // The first one ran and the server then reported the new encoding: the session ends.
        let errs = errors(&msgs);
        assert!(
            errs.iter()
                .any(|(_, m)| m.contains(&format!("client_encoding={encoding}"))),
            "{encoding}: {errs:?}"
        );
        assert_password_unchanged(&h, role).await;
    }
    // Each smuggled text was refused before it reached the server, and recorded as such.
    eventually("records", Duration::from_secs(10), || async {
        statements(&h)
            .iter()
            .filter(|(s, _)| s["denied_by"] == "setting_dependent")
            .count()
            == cases.len()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_statement_behind_a_standard_conforming_strings_change_never_runs_at_any_level() {
    let h = Harness::start().await;
    let alice = h.user("alice", &["dba"]);
    h.pg.sql(
        "app",
        "CREATE FUNCTION relax() RETURNS text LANGUAGE plpgsql AS \
         $$ BEGIN EXECUTE 'SET standard_conforming_strings = ' || 'off'; RETURN 'ok'; END $$",
    )
    .unwrap();
    // The proxy reads one string literal ('a\'' ... '); with the setting off the server reads
    // 'a\'' as "a'" and runs the ALTER ROLE.
    let smuggle = format!("SELECT 'a\\'' ; ALTER ROLE jit_reader PASSWORD $${CHOSEN}$$; --'");
    for (access, flip) in [
        (
            AccessLevel::Admin,
            "SELECT set_config('standard_conforming' || '_strings', 'off', false)",
        ),
        (AccessLevel::Read, "SELECT relax()"),
    ] {
        let grant = h.grant("alice", "prod-db", access, HOUR).await;
        let mut s = raw::session(&h, &alice, "prod-db").await;
        let mut batch = encode_query(flip);
        batch.extend(encode_query(&smuggle));
        send(&mut s, &batch).await;
        let errs = errors(&read_to_end(&mut s).await);
        assert!(
            errs.iter().any(|(_, m)| m.contains("standard_conforming_strings=off")),
            "{access}: {errs:?}"
        );
        assert_password_unchanged(&h, "jit_reader").await;
        h.admin().revoke_grant(grant.id.as_str()).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_extended_protocol_cannot_smuggle_behind_an_unanswered_execute() {
    let h = Harness::start().await;
    let alice = h.user("alice", &["dev"]);
    h.pg.sql("postgres", "CREATE ROLE app_owner; GRANT app_owner TO jit_reader")
        .unwrap();
    h.pg.sql("app", SWITCH_ENCODING).unwrap();
    h.grant("alice", "prod-db", AccessLevel::Read, HOUR).await;
    let mut s = raw::session(&h, &alice, "prod-db").await;
    // No Sync between the change and the next Parse: the server parses it in SJIS, where
    // the literal ends early and a set_config('role') appears.
    let mut batch = parse("", "SELECT switch_encoding('SJIS')");
    batch.extend(bind("", "", &[]));
    batch.extend(execute(""));
    batch.extend(parse(
        "",
        "SELECT E'\u{c1}\\', set_config($$role$$, $$app_owner$$, false) AS r --'",
    ));
    batch.extend(bind("", "", &[]));
    batch.extend(execute(""));
    batch.extend(sync());
    send(&mut s, &batch).await;
    let msgs = read_answers(&mut s, 1).await;
    assert!(
        !first_column(&msgs).iter().any(|v| v.contains("app_owner"))
            && !msgs
                .iter()
                .any(|m| m.tag == b'D' && String::from_utf8_lossy(&m.raw).contains("app_owner")),
        "the smuggled set_config ran: {msgs:?}"
    );
    let errs = errors(&msgs);
    assert!(
        errs.iter()
            .any(|(code, m)| code == "42501" && m.contains("could read differently")),
        "{errs:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ordinary_pipelines_keep_flowing_and_settled_text_reads_as_sent() {
    let h = Harness::start().await;
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "prod-db", AccessLevel::Read, HOUR).await;
    let mut s = raw::session(&h, &alice, "prod-db").await;
    // Non-ASCII text and backslashes that read the same under every setting: all pipelined.
    let texts = [
        "SELECT 'M\u{fc}ller'",
        "SELECT '\u{4e2d}\u{6587}' || E'\\\\'",
        "SELECT 'C:\\temp'",
        "SELECT 1 /* \u{4e2d}\\ */",
    ];
    let mut batch = Vec::new();
    for t in texts {
        batch.extend(encode_query(t));
    }
    batch.extend(parse("", "SELECT $1::text || '\u{4e2d}'"));
    batch.extend(bind("", "", &[raw::P::Text("x")]));
    batch.extend(execute(""));
    batch.extend(sync());
    send(&mut s, &batch).await;
    let msgs = read_answers(&mut s, texts.len() + 1).await;
    assert_eq!(error_of(&msgs), None);
    assert_eq!(
        first_column(&msgs),
        ["M\u{fc}ller", "\u{4e2d}\u{6587}\\", "C:\\temp", "1", "x\u{4e2d}"]
    );

    // Text whose reading does depend on the settings is read as sent once the server has
    // answered everything before it...
    let dependent = "SELECT E'\u{4e2d}\\'', 1 --'";
    send(&mut s, &encode_query(dependent)).await;
    let msgs = read_until_ready(&mut s).await;
    assert_eq!(error_of(&msgs), None);
    assert_eq!(first_column(&msgs), ["\u{4e2d}'"]);
    // ...and refused, with a hint, behind an unanswered statement, however harmless.
    let mut batch = encode_query("SELECT 1");
    batch.extend(encode_query(dependent));
    send(&mut s, &batch).await;
    let msgs = read_answers(&mut s, 2).await;
    assert_eq!(first_column(&msgs), ["1"]);
    let (code, message) = error_of(&msgs).unwrap();
    assert_eq!(code, "42501");
    assert!(message.contains("could read differently"), "{message}");
    assert_eq!(record_with(&h, "1 --")["denied_by"], "setting_dependent");
    // The session goes on.
    send(&mut s, &encode_query("SELECT 2")).await;
    assert_eq!(first_column(&read_until_ready(&mut s).await), ["2"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_driver_pipelining_many_queries_is_unaffected() {
    let h = Harness::start().await;
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "prod-db", AccessLevel::Read, HOUR).await;
    let tls =
        tokio_postgres_rustls::MakeRustlsConnect::new((*raw::client_config(h.data_dir(), Some(&alice), None)).clone());
    let conninfo = format!(
        "host=127.0.0.1 port={} user=alice dbname=prod-db sslmode=require",
        h.addrs().postgres.port()
    );
    let (client, connection) = tokio_postgres::connect(&conninfo, tls).await.unwrap();
    let conn = tokio::spawn(connection);
    // tokio-postgres pipelines concurrent requests on one connection.
    let stmt = client
        .prepare("SELECT name || ' \u{4e2d}' FROM items WHERE id = $1")
        .await
        .unwrap();
    let queries = (1..=50).map(|id: i32| {
        let (client, stmt) = (&client, &stmt);
        async move { client.query_one(stmt, &[&id]).await.map(|r| r.get::<_, String>(0)) }
    });
    let results = futures_join_all(queries).await;
    for (i, r) in results.into_iter().enumerate() {
        assert_eq!(r.unwrap(), format!("item {} \u{4e2d}", i + 1));
    }
    drop(client);
    let _ = conn.await;
}

/// Runs futures concurrently on this task (no extra dependency).
async fn futures_join_all<F: std::future::Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut set = Vec::new();
    for f in futures {
        set.push(Box::pin(f));
    }
    let mut out: Vec<Option<F::Output>> = (0..set.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for (i, f) in set.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => done = false,
                }
            }
        }
        if done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    out.into_iter().map(|v| v.expect("every future finished")).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn set_config_of_role_counts_as_set_role() {
    let mut h = Harness::start().await;
    h.pg.sql(
        "app",
        "CREATE ROLE app_owner; GRANT app_owner TO jit_writer; \
         CREATE TABLE owner_only (secret text); INSERT INTO owner_only VALUES ('s3cret'); \
         ALTER TABLE owner_only OWNER TO app_owner; REVOKE ALL ON owner_only FROM jit_writer",
    )
    .unwrap();
    h.reconfigure(&format!(
        r#"
[[targets]]
name = "no-role-db"
address = "{addr}"
database = "app"
[targets.credentials.write]
user = "jit_writer"
password_file = "{d}/writer.password"
[[targets.guardrails]]
access = ["write"]
deny_kinds = ["set_role", "set_session_authorization"]
"#,
        addr = h.pg.address(),
        d = h.data_dir().display()
    ))
    .await;
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "no-role-db", AccessLevel::Write, HOUR).await;
    let attempts = [
        "SELECT set_config('role', 'app_owner', false)",
        "SELECT SET_CONFIG('ROLE', 'app_owner', false)",
        "SELECT pg_catalog.set_config('role', 'app_owner', false)",
        "SELECT * FROM set_config('role', 'app_owner', false)",
        "SELECT (SELECT set_config('role', 'app_owner', false))",
        "SELECT set_config('session_authorization', 'app_owner', false)",
        // Computed names cannot be checked: unclassifiable, refused where deny rules apply.
        "SELECT set_config('ro' || 'le', 'app_owner', false)",
        "SELECT set_config(E'role', 'app_owner', false)",
    ];
    for sql in attempts {
        let out = h
            .psql_commands(&alice, "no-role-db", &[sql, "SELECT * FROM owner_only"])
            .await;
        assert!(!out.success, "{sql}: {out:?}");
        assert!(out.stderr.contains("jitgate:"), "{sql}: {}", out.stderr);
        assert!(!out.stdout.contains("s3cret"), "{sql}: {}", out.stdout);
    }
    // Extended protocol: the same call in a Parse.
    let mut s = raw::session(&h, &alice, "no-role-db").await;
    let mut batch = parse("", "SELECT set_config('role', 'app_owner', false)");
    batch.extend(bind("", "", &[]));
    batch.extend(execute(""));
    batch.extend(sync());
    send(&mut s, &batch).await;
    let (code, _) = error_of(&read_until_ready(&mut s).await).unwrap();
    assert_eq!(code, "42501");

    // Without the rule it runs, and later records carry the role it switched to.
    h.grant("alice", "prod-db", AccessLevel::Write, HOUR).await;
    let out = h
        .psql_commands(
            &alice,
            "prod-db",
            &[
                "SELECT set_config('role', 'app_owner', false)",
                "SELECT secret FROM owner_only",
            ],
        )
        .await;
    assert!(out.success, "{out:?}");
    assert!(out.stdout.contains("s3cret"));
    eventually("records", Duration::from_secs(10), || async {
        statements(&h)
            .iter()
            .any(|(s, _)| s["text"] == "SELECT secret FROM owner_only")
    })
    .await;
    let switch = record_with(&h, "set_config('role', 'app_owner', false)");
    assert_eq!(switch["kind"], "set_role");
    assert_eq!(switch["class"], "privilege");
    assert_eq!(
        record_with(&h, "SELECT secret FROM owner_only")["effective_role"],
        "app_owner"
    );

    // A computed name is unknown: refused on a read grant.
    let bob = h.user("bob", &["dev"]);
    h.grant("bob", "prod-db", AccessLevel::Read, HOUR).await;
    let out = h
        .psql(
            &bob,
            "prod-db",
            "SELECT set_config('applic' || 'ation_name', 'x', false)",
        )
        .await;
    assert!(!out.success && out.stderr.contains("read access"), "{out:?}");
}

/// One server connection reading under `client_encoding` and `standard_conforming_strings`.
async fn server_reading(h: &Harness, encoding: &str, scs: &str) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(h.pg.address()).await.unwrap();
    raw::send_startup(
        &mut s,
        &[
            ("user", "jit_trust"),
            ("database", "app"),
            ("client_encoding", encoding),
            ("standard_conforming_strings", scs),
        ],
    )
    .await;
    let login = read_until_ready(&mut s).await;
    assert_eq!(error_of(&login), None, "{encoding} {scs}");
    s
}

/// What the server ran of `text`: the first column of each result, or `None` if it refused
/// the text.
async fn server_runs(s: &mut tokio::net::TcpStream, text: &str) -> Option<Vec<String>> {
    send(s, &encode_query(text)).await;
    let msgs = read_until_ready(s).await;
    let rows = first_column(&msgs);
    match error_of(&msgs) {
        // Refused as a whole (an invalid byte sequence, a syntax error): nothing ran.
        Some(_) if rows.is_empty() => None,
        Some(e) => panic!("{text:?}: ran {rows:?}, then {e:?}"),
        None => Some(rows),
    }
}

/// Texts of one to three `SELECT 'kN', <literal>` statements whose literals and comments mix
/// backslashes, quotes, semicolons and multibyte characters, from a fixed seed.
fn corpus() -> Vec<String> {
    const PIECES: &[&str] = &[
        "a",
        "\\",
        "''",
        ";",
        "\u{e9}",
        "\u{4e2d}",
        "\u{c1}",
        "\u{ff71}",
        "\u{d55c}",
        "\u{1f600}",
        "@",
        "1",
        " ",
        "\u{4e2d}\\",
        "\u{c1}\\",
        "\\'",
        "$",
        "\"",
    ];
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    };
    let mut texts = Vec::new();
    while texts.len() < 400 {
        let statements = 1 + next(3);
        let mut text = String::new();
        for k in 0..statements {
            let mut body = String::new();
            for _ in 0..1 + next(4) {
                body.push_str(PIECES[next(PIECES.len())]);
            }
            let literal = match next(5) {
                0 => format!("'{body}'"),
                1 => format!("E'{body}'"),
                2 => format!("$$ {body} $$"),
                3 => format!("'x' -- {body}\n"),
                _ => format!("'x' /* {body} */"),
            };
            if k > 0 {
                text.push_str("; ");
            }
            text.push_str(&format!("SELECT 'k{k}', {literal}"));
        }
        texts.push(text);
    }
    texts
}

/// The proxy's reading of `text`: the statement markers it expects, when it splits the text.
fn proxy_reading(text: &str) -> Option<Vec<String>> {
    let statements = jitgate_protocol::sql::classify(text);
    let markers: Vec<String> = (0..statements.len()).map(|k| format!("k{k}")).collect();
    let split = jitgate_protocol::sql::reading::semicolons(text)?;
    (split.len() + 1 == statements.len()
        && statements.iter().all(|c| c.kind == "select")
        && statements
            .iter()
            .enumerate()
            .all(|(k, c)| c.text.contains(&format!("'k{k}'"))))
    .then_some(markers)
}

#[tokio::test(flavor = "multi_thread")]
async fn texts_the_proxy_forwards_when_unsettled_split_alike_under_every_setting_on_a_real_server() {
    let h = Harness::start().await;
    let readings = [
        ("UTF8", "off"),
        ("SJIS", "on"),
        ("SJIS", "off"),
        ("SHIFT_JIS_2004", "on"),
        ("BIG5", "on"),
        ("BIG5", "off"),
        ("GBK", "on"),
        ("GBK", "off"),
        ("UHC", "on"),
        ("UHC", "off"),
        ("GB18030", "on"),
        ("GB18030", "off"),
        ("JOHAB", "on"),
        ("JOHAB", "off"),
    ];
    let texts = corpus();
    let (mut checked, mut compared, mut dependent) = (0, 0, 0);
    for (encoding, scs) in readings {
        let mut s = server_reading(&h, encoding, scs).await;
        for text in &texts {
            let Some(expected) = proxy_reading(text) else { continue };
            if jitgate_protocol::sql::reading::depends_on_settings(text) {
                dependent += 1;
                continue;
            }
            checked += 1;
            if let Some(ran) = server_runs(&mut s, text).await {
                assert_eq!(ran, expected, "{encoding}, standard_conforming_strings={scs}: {text:?}");
                compared += 1;
            }
        }
    }
    assert!(
        compared > 2000 && dependent > 0,
        "{checked} checked, {compared} run by the server, {dependent} dependent"
    );
    // The harness sees a difference where there is one: the smuggle splits in two in SJIS.
    let smuggle = "SELECT 'k0', E'\u{c1}\\' ; SELECT 'k1'; --'";
    assert!(jitgate_protocol::sql::reading::depends_on_settings(smuggle));
    let mut s = server_reading(&h, "SJIS", "on").await;
    assert_eq!(server_runs(&mut s, smuggle).await.unwrap(), ["k0", "k1"]);
}
