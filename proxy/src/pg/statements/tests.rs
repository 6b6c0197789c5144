//! The tracker's per-session classification cache gives the same decisions as classifying
//! afresh, for repeated texts and after the cache starts over.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use jitgate_protocol::postgres::messages::{encode_parse, encode_query};

use super::{SessionFacts, TextLimits, Tracker, CACHED_TEXTS};
use crate::audit::AuditEvent;
use crate::pg::guard::Guard;
use crate::types::{AccessLevel, GrantId, SessionId, TargetName, UserName};

fn read_tracker() -> Tracker {
    let facts = SessionFacts {
        session_id: SessionId::generate(),
        grant_id: GrantId::generate(),
        user: UserName::new("alice").unwrap(),
        target: TargetName::new("prod-db").unwrap(),
        access: AccessLevel::Read,
    };
    let limits = TextLimits {
        max_statement_bytes: 1024,
        max_param_bytes: 64,
        redact_params_matching: vec!["password".into()],
    };
    Tracker::new(facts, Guard::new(AccessLevel::Read, "prod-db", &[]), limits)
}

/// (class, kind, decision) of the `statement` records of one client message.
fn decisions(t: &mut Tracker, msg: &[u8]) -> Vec<(String, String, String)> {
    t.client_batch(msg)
        .unwrap()
        .records
        .into_iter()
        .map(|r| match r {
            AuditEvent::Statement {
                class, kind, decision, ..
            } => (class, kind, format!("{decision:?}")),
            other => panic!("not a statement record: {other:?}"),
        })
        .collect()
}

#[test]
fn repeated_texts_are_decided_as_the_first_time() {
    let mut t = read_tracker();
    let delete = encode_parse("", "DELETE FROM items WHERE id = $1");
    let select = encode_query("SELECT name FROM items WHERE id = 7; DELETE FROM items");
    let first_delete = decisions(&mut t, &delete);
    let first_select = decisions(&mut t, &select);
    assert_eq!(first_delete, [("write".into(), "delete".into(), "Denied".into())]);
    assert_eq!(first_select.len(), 2);
    assert_eq!(first_select[1].2, "Denied");
    for _ in 0..3 {
        assert_eq!(decisions(&mut t, &delete), first_delete);
        assert_eq!(decisions(&mut t, &select), first_select);
    }
    assert_eq!(t.classified.len(), 2, "one entry per distinct text");

    // More distinct texts than the cache holds: it starts over and stays right.
    for i in 0..CACHED_TEXTS + 10 {
        let d = decisions(&mut t, &encode_query(&format!("SELECT {i}")));
        assert_eq!(d, [("read".into(), "select".into(), "Allowed".into())]);
    }
    assert!(t.classified.len() <= CACHED_TEXTS);
    assert_eq!(decisions(&mut t, &delete), first_delete);
}

#[test]
fn texts_of_one_shape_share_a_classification_and_keep_their_own_text() {
    let mut t = read_tracker();
    let texts = |t: &mut Tracker, sql: &str| -> Vec<(String, Vec<String>)> {
        t.client_batch(&encode_query(sql))
            .unwrap()
            .records
            .into_iter()
            .map(|r| match r {
                AuditEvent::Statement { text, tables, .. } => (text, tables),
                other => panic!("{other:?}"),
            })
            .collect()
    };
    let a = texts(&mut t, "SELECT name FROM items WHERE id = 7; SELECT 1 FROM t1");
    let b = texts(&mut t, "SELECT name FROM items WHERE id = 8; SELECT 5 FROM t1");
    assert_eq!(t.classified.len(), 1, "one shape");
    assert_eq!(a[0].0, "SELECT name FROM items WHERE id = 7");
    assert_eq!(b[0].0, "SELECT name FROM items WHERE id = 8");
    assert_eq!(b[1].0, "SELECT 5 FROM t1");
    assert_eq!(b[1].1, ["t1"]);
    // Digits in identifiers are not numbers: another table, another entry.
    let c = texts(&mut t, "SELECT name FROM items WHERE id = 8; SELECT 5 FROM t2");
    assert_eq!(c[1].1, ["t2"]);
    assert_eq!(t.classified.len(), 2);
    // Strings are never shaped: the decision on a string-bearing text is its own.
    let mut w = read_tracker();
    let first = decisions(&mut w, &encode_query("SET standard_conforming_strings = 'on'"));
    let second = decisions(&mut w, &encode_query("SET standard_conforming_strings = 'of'"));
    assert_eq!(w.classified.len(), 2);
    assert_ne!(first, second, "{first:?} {second:?}");
}
