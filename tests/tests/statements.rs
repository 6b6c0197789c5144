//! Every way a client can run SQL produces audit records: one `statement` (written before the
//! statement is forwarded) and one `statement.end` (how it ended) per executed statement.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use jitgate_tests::jitgate::model::AccessLevel;
use jitgate_tests::raw::{self, bind, close_statement, execute, first_column, parse, read_until_ready, send, sync, P};
use jitgate_tests::{client_command, eventually, statements, Harness};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

const HOUR: Duration = Duration::from_secs(3600);

/// Waits until `n` statement records have their `statement.end`.
async fn settled(h: &Harness, n: usize) -> Vec<(Value, Value)> {
    eventually(&format!("{n} statements ended"), Duration::from_secs(10), || async {
        let s = statements(h);
        s.len() >= n && s.iter().all(|(_, e)| e.is_some())
    })
    .await;
    statements(h).into_iter().map(|(s, e)| (s, e.unwrap())).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn simple_query_records_each_statement_in_order() {
    let h = Harness::start().await;
    let alice = h.user("alice", &["dev"]);
    let grant = h.grant("alice", "prod-db", AccessLevel::Read, HOUR).await;
    let out = h
        .psql(
            &alice,
            "prod-db",
            "SELECT 1; SELECT count(*) FROM items; SELECT * FROM nope; SELECT 4",
        )
        .await;
    assert!(!out.success);
    assert!(
        out.stderr.contains("relation \"nope\" does not exist"),
        "{}",
        out.stderr
    );
    let s = settled(&h, 4).await;
    let texts: Vec<&str> = s.iter().map(|(st, _)| st["text"].as_str().unwrap()).collect();
    assert_eq!(
        texts,
        [
            "SELECT 1",
            "SELECT count(*) FROM items",
            "SELECT * FROM nope",
            "SELECT 4"
        ]
    );
    for (st, _) in &s {
        assert_eq!(st["protocol"], "simple");
        assert_eq!(st["class"], "read");
        assert_eq!(st["decision"], "allowed");
        assert_eq!(st["user"], "alice");
        assert_eq!(st["target"], "prod-db");
        assert_eq!(st["access"], "read");
        assert_eq!(st["grant_id"], grant.id.as_str());
    }
    assert_eq!(s[1].0["tables"], json!(["items"]));
    assert_eq!(s[0].1["outcome"], json!({"status": "ok", "tag": "SELECT 1", "rows": 1}));
    assert_eq!(s[1].1["outcome"], json!({"status": "ok", "tag": "SELECT 1", "rows": 1}));
    assert_eq!(s[2].1["outcome"]["status"], "error");
    assert_eq!(s[2].1["outcome"]["sqlstate"], "42P01");
    assert_eq!(s[3].1["outcome"], json!({"status": "not_executed"}));
    // Each statement record precedes its end, and the session's records sit between its
    // start and end.
    let all = h.audit();
    let pos = |pred: &dyn Fn(&Value) -> bool| all.iter().position(pred).unwrap();
    let first_stmt = pos(&|e| e["event"] == "statement");
    let first_end = pos(&|e| e["event"] == "statement.end");
    assert!(pos(&|e| e["event"] == "session.start") < first_stmt && first_stmt < first_end);
}

#[tokio::test(flavor = "multi_thread")]
async fn extended_protocol_attaches_parse_text_to_each_execute() {
    let h = Harness::start().await;
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "prod-db", AccessLevel::Read, HOUR).await;
    let mut s = raw::session(&h, &alice, "prod-db").await;

    let mut batch = Vec::new();
    // Unnamed statement, text parameter; then re-parsed unnamed with a binary parameter.
    batch.extend(parse("", "SELECT $1::int + 1"));
    batch.extend(bind("", "", &[P::Text("41")]));
    batch.extend(execute(""));
    batch.extend(parse("", "SELECT length($1::bytea)"));
    batch.extend(bind("", "", &[P::Binary(&[0xde, 0xad, 0xbe, 0xef])]));
    batch.extend(execute(""));
    // Named statement executed twice, closed, re-parsed with another text.
    batch.extend(parse("s1", "SELECT count(*) FROM items WHERE id <= $1"));
    batch.extend(bind("", "s1", &[P::Text("10")]));
    batch.extend(execute(""));
    batch.extend(bind("", "s1", &[P::Null]));
    batch.extend(execute(""));
    batch.extend(close_statement("s1"));
    batch.extend(parse("s1", "SELECT 'again'"));
    batch.extend(bind("", "s1", &[]));
    batch.extend(execute(""));
    batch.extend(sync());
    send(&mut s, &batch).await;
    let msgs = read_until_ready(&mut s).await;
    assert_eq!(first_column(&msgs), ["42", "4", "10", "0", "again"]);

    // 60 executions pipelined before one Sync.
    let mut batch = parse("p", "SELECT $1::int * 2");
    for i in 0..60 {
        batch.extend(bind("", "p", &[P::Text(&i.to_string())]));
        batch.extend(execute(""));
    }
    batch.extend(sync());
    send(&mut s, &batch).await;
    let msgs = read_until_ready(&mut s).await;
    assert_eq!(first_column(&msgs).len(), 60);

    let st = settled(&h, 65).await;
    let got: Vec<(&str, Value)> = st
        .iter()
        .take(5)
        .map(|(s, _)| (s["text"].as_str().unwrap(), s["params"].clone()))
        .collect();
    assert_eq!(
        got,
        [
            ("SELECT $1::int + 1", json!(["41"])),
            ("SELECT length($1::bytea)", json!(["\\xdeadbeef"])),
            ("SELECT count(*) FROM items WHERE id <= $1", json!(["10"])),
            ("SELECT count(*) FROM items WHERE id <= $1", json!([null])),
            ("SELECT 'again'", Value::Null),
        ]
    );
    for (i, (s, e)) in st.iter().skip(5).enumerate() {
        assert_eq!(s["text"], "SELECT $1::int * 2");
        assert_eq!(s["params"], json!([i.to_string()]));
        assert_eq!(s["protocol"], "extended");
        assert_eq!(e["outcome"], json!({"status": "ok", "tag": "SELECT 1", "rows": 1}));
    }
    // Statement numbers are consecutive within the session.
    let numbers: Vec<u64> = st.iter().map(|(s, _)| s["statement"].as_u64().unwrap()).collect();
    assert_eq!(numbers, (1..=65).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread")]
async fn long_parameters_are_capped() {
    let h = Harness::start().await;
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "prod-db", AccessLevel::Read, HOUR).await;
    let mut s = raw::session(&h, &alice, "prod-db").await;
    let long = "x".repeat(10_000);
    let mut batch = parse("", "SELECT length($1)");
    batch.extend(bind("", "", &[P::Text(&long)]));
    batch.extend(execute(""));
    batch.extend(sync());
    send(&mut s, &batch).await;
    assert_eq!(first_column(&read_until_ready(&mut s).await), ["10000"]);
    let st = settled(&h, 1).await;
    let p = st[0].0["params"][0].as_str().unwrap();
    assert!(p.len() < 300 && p.ends_with("..."), "{p}");
}

#[tokio::test(flavor = "multi_thread")]
async fn pgbench_prepared_records_one_statement_per_execution() {
    let h = Harness::start().await;
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "prod-db", AccessLevel::Write, HOUR).await;
    let conninfo = h.conninfo(&alice, "prod-db");
    let out = client_command("pgbench")
        .args(["-i", "-s", "1", "-q"])
        .arg(&conninfo)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let before = statements(&h).len();
    let out = client_command("pgbench")
        .args(["-M", "prepared", "-n", "-c", "1", "-t", "20"])
        .arg(&conninfo)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let st = settled(&h, before + 140).await;
    let run = &st[before..];
    let count = |prefix: &str| {
        run.iter()
            .filter(|(s, _)| s["text"].as_str().unwrap().starts_with(prefix))
            .count()
    };
    assert_eq!(count("UPDATE pgbench_accounts"), 20);
    assert_eq!(count("SELECT abalance"), 20);
    assert_eq!(count("UPDATE pgbench_tellers"), 20);
    assert_eq!(count("UPDATE pgbench_branches"), 20);
    assert_eq!(count("INSERT INTO pgbench_history"), 20);
    assert_eq!(count("BEGIN"), 20);
    assert_eq!(count("END"), 20);
    let prefixes = ["UPDATE", "SELECT abalance", "INSERT", "BEGIN", "END"];
    let bench: Vec<_> = run
        .iter()
        .filter(|(s, _)| prefixes.iter().any(|p| s["text"].as_str().unwrap().starts_with(p)))
        .collect();
    assert_eq!(bench.len(), 140);
    assert!(bench
        .iter()
        .all(|(s, e)| s["protocol"] == "extended" && e["outcome"]["status"] == "ok"));
    let updates = bench
        .iter()
        .filter(|(s, _)| s["text"].as_str().unwrap().starts_with("UPDATE"));
    assert!(
        updates.clone().count() == 60
            && updates
                .into_iter()
                .all(|(s, _)| s["params"].as_array().unwrap().len() == 2)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn copy_in_and_out_record_statement_bytes_and_rows() {
    let h = Harness::start().await;
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "prod-db", AccessLevel::Write, HOUR).await;
    let out = h
        .psql(
            &alice,
            "prod-db",
            "COPY (SELECT id, name FROM items WHERE id <= 30) TO STDOUT",
        )
        .await;
    assert!(out.success, "{out:?}");
    assert_eq!(out.stdout.lines().count(), 30);

    let mut child = client_command("psql")
        .arg(h.conninfo(&alice, "prod-db"))
        .args(["-X", "-v", "ON_ERROR_STOP=1", "-c", "COPY items (id, name) FROM STDIN"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data: String = (1001..=1025).map(|i| format!("{i}\tcopied {i}\n")).collect();
    stdin.write_all(data.as_bytes()).await.unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        h.pg.sql("app", "SELECT count(*) FROM items WHERE id > 1000").unwrap(),
        "25"
    );

    let st = settled(&h, 2).await;
    let (out_s, out_e) = &st[0];
    assert_eq!(out_s["kind"], "copy_to");
    assert_eq!(out_s["protocol"], "copy");
    assert_eq!(out_e["outcome"]["rows"], 30);
    assert!(out_e["copy_bytes"].as_u64().unwrap() > 30 * 5);
    let (in_s, in_e) = &st[1];
    assert_eq!(in_s["kind"], "copy_from");
    assert_eq!(in_s["class"], "write");
    assert_eq!(in_s["tables"], json!(["items"]));
    assert_eq!(in_e["outcome"]["rows"], 25);
    assert_eq!(in_e["copy_bytes"].as_u64().unwrap(), data.len() as u64);
}

#[tokio::test(flavor = "multi_thread")]
async fn function_calls_record_oid_and_arguments() {
    let h = Harness::start().await;
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "prod-db", AccessLevel::Write, HOUR).await;
    let oid: i32 =
        h.pg.sql("app", "SELECT 'abs(int4)'::regprocedure::oid")
            .unwrap()
            .parse()
            .unwrap();
    let mut s = raw::session(&h, &alice, "prod-db").await;
    send(&mut s, &raw::function_call(oid, &["-5"])).await;
    let msgs = read_until_ready(&mut s).await;
    let v = msgs.iter().find(|m| m.tag == b'V').expect("FunctionCallResponse");
    assert!(v.raw.ends_with(b"5"));
    let st = settled(&h, 1).await;
    assert_eq!(st[0].0["protocol"], "function_call");
    assert_eq!(st[0].0["text"], format!("function call oid={oid}"));
    assert_eq!(st[0].0["params"], json!(["-5"]));
    assert_eq!(st[0].1["outcome"]["status"], "ok");
}

#[tokio::test(flavor = "multi_thread")]
async fn role_and_search_path_changes_are_tracked() {
    let h = Harness::start().await;
    let alice = h.user("alice", &["dba"]);
    h.grant("alice", "prod-db", AccessLevel::Admin, HOUR).await;
    let out = h
        .psql(
            &alice,
            "prod-db",
            "SET search_path = public; SET ROLE jit_reader; SELECT current_user; RESET ROLE; \
             SET SESSION AUTHORIZATION jit_writer; SELECT current_user",
        )
        .await;
    assert!(out.success, "{out:?}");
    let st = settled(&h, 6).await;
    let role = |i: usize| st[i].0["effective_role"].clone();
    assert_eq!(st[0].0["kind"], "set");
    assert_eq!(role(0), Value::Null);
    assert_eq!(st[1].0["kind"], "set_role");
    assert_eq!(st[1].0["class"], "privilege");
    assert_eq!(role(2), "jit_reader", "{:?}", st[2].0);
    assert_eq!(st[4].0["kind"], "set_session_authorization");
    assert_eq!(role(5), "jit_writer", "{:?}", st[5].0);
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_never_reach_the_audit_file() {
    let h = Harness::start().await;
    let alice = h.user("alice", &["dba"]);
    h.grant("alice", "prod-db", AccessLevel::Admin, HOUR).await;
    // Not a role jitgate logs in with: those cannot be changed through it at all.
    h.pg.sql("postgres", "CREATE ROLE reporting LOGIN").unwrap();
    let out = h
        .psql(&alice, "prod-db", "ALTER ROLE reporting PASSWORD 'hunter2-very-secret'")
        .await;
    assert!(out.success, "{out:?}");
    let mut s = raw::session(&h, &alice, "prod-db").await;
    let mut batch = parse("", "SELECT $1::text AS password");
    batch.extend(bind("", "", &[P::Text("param-secret-value")]));
    batch.extend(execute(""));
    batch.extend(sync());
    send(&mut s, &batch).await;
    read_until_ready(&mut s).await;
    let st = settled(&h, 2).await;
    assert!(
        st[0].0["text"].as_str().unwrap().contains("PASSWORD '***'"),
        "{}",
        st[0].0
    );
    assert_eq!(st[1].0["params"], json!(["***"]));
    let file = std::fs::read_to_string(h.data_dir().join("audit.jsonl")).unwrap();
    assert!(!file.contains("hunter2-very-secret"));
    assert!(!file.contains("param-secret-value"));
}
