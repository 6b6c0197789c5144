//! A real driver (tokio-postgres over rustls with a client certificate): the extended
//! protocol with binary parameters, prepared statements reused, and a transaction, all
//! audited with the text from Parse and the parameters of each execution.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use jitgate_tests::jitgate::model::AccessLevel;
use jitgate_tests::{eventually, raw, statements, Harness};
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn tokio_postgres_binary_parameters_are_audited() {
    let h = Harness::start().await;
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "prod-db", AccessLevel::Write, Duration::from_secs(3600))
        .await;
    let tls =
        tokio_postgres_rustls::MakeRustlsConnect::new((*raw::client_config(h.data_dir(), Some(&alice), None)).clone());
    let conninfo = format!(
        "host=127.0.0.1 port={} user=alice dbname=prod-db sslmode=require",
        h.addrs().postgres.port()
    );
    let (mut client, connection) = tokio_postgres::connect(&conninfo, tls).await.unwrap();
    let conn = tokio::spawn(connection);

    let row = client
        .query_one(
            "SELECT $1::bytea, $2::int8, $3::text",
            &[&vec![1u8, 2, 3], &42i64, &"hi"],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Vec<u8>>(0), vec![1u8, 2, 3]);
    assert_eq!(row.get::<_, i64>(1), 42);

    let stmt = client.prepare("SELECT name FROM items WHERE id = $1").await.unwrap();
    for id in [3i32, 7] {
        let row = client.query_one(&stmt, &[&id]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), format!("item {id}"));
    }
    let tx = client.transaction().await.unwrap();
    tx.execute("UPDATE items SET name = $1 WHERE id = $2", &[&"renamed", &5i32])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        h.pg.sql("app", "SELECT name FROM items WHERE id = 5").unwrap(),
        "renamed"
    );
    drop(client);
    let _ = conn.await;

    eventually("records settled", Duration::from_secs(10), || async {
        let st = statements(&h);
        st.len() >= 6 && st.iter().all(|(_, e)| e.is_some())
    })
    .await;
    let st = statements(&h);
    let view: Vec<(String, serde_json::Value)> = st
        .iter()
        .map(|(s, _)| (s["text"].as_str().unwrap().to_owned(), s["params"].clone()))
        .collect();
    assert_eq!(
        view,
        vec![
            // Binary parameters: int8 42 is eight bytes big-endian, text "hi" is its UTF-8 bytes.
            (
                "SELECT $1::bytea, $2::int8, $3::text".into(),
                json!(["\\x010203", "\\x000000000000002a", "\\x6869"])
            ),
            ("SELECT name FROM items WHERE id = $1".into(), json!(["\\x00000003"])),
            ("SELECT name FROM items WHERE id = $1".into(), json!(["\\x00000007"])),
            ("START TRANSACTION".into(), serde_json::Value::Null),
            (
                "UPDATE items SET name = $1 WHERE id = $2".into(),
                json!(["\\x72656e616d6564", "\\x00000005"])
            ),
            ("COMMIT".into(), serde_json::Value::Null),
        ]
    );
    assert!(st.iter().all(|(_, e)| e.as_ref().unwrap()["outcome"]["status"] == "ok"));
    // Statements with parameters went through Parse/Bind/Execute; the driver sends
    // transaction control as simple queries.
    for i in [0, 1, 2, 4] {
        assert_eq!(st[i].0["protocol"], "extended", "{}", st[i].0);
    }
    assert_eq!(st[3].0["protocol"], "simple");
    assert_eq!(
        st[4].1.as_ref().unwrap()["outcome"],
        json!({"status": "ok", "tag": "UPDATE 1", "rows": 1})
    );
}
