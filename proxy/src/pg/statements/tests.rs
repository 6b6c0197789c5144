//! The tracker's per-session classification cache gives the same decisions as classifying
//! afresh, for repeated texts and after the cache starts over.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use jitgate_protocol::postgres::messages::{encode_parse, encode_query};

use super::{TextLimits, Tracker, CACHED_TEXTS};
use crate::audit::AuditEvent;
use crate::model::{AccessLevel, GrantId, SessionId, SessionMeta, TargetName, UserName};
use crate::pg::guard::Guard;

fn read_tracker() -> Tracker {
    let session = SessionMeta {
        id: SessionId::generate(),
        grant_id: GrantId::generate(),
        user: UserName::new("alice").unwrap(),
        roles: Vec::new(),
        target: TargetName::new("prod-db").unwrap(),
        database: "app".into(),
        access: AccessLevel::Read,
        client_addr: "127.0.0.1:5555".parse().unwrap(),
        upstream_role: "jit_reader".into(),
    };
    let limits = TextLimits {
        max_statement_bytes: 1024,
        max_param_bytes: 64,
        redact_params_matching: vec!["password".into()],
    };
    Tracker::new(session, Guard::new(AccessLevel::Read, "prod-db", &[]), limits)
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
            } => (class.into_owned(), kind.into_owned(), format!("{decision:?}")),
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

/// `denied_by` of every `statement` record of one client batch.
fn denied_by(t: &mut Tracker, msgs: &[u8]) -> Vec<Option<String>> {
    t.client_batch(msgs)
        .unwrap()
        .records
        .into_iter()
        .map(|r| match r {
            AuditEvent::Statement { denied_by, .. } => denied_by,
            other => panic!("not a statement record: {other:?}"),
        })
        .collect()
}

#[test]
fn text_that_reads_differently_waits_for_every_answer() {
    use jitgate_protocol::postgres::frontend::encode_tagged;
    let mut t = read_tracker();
    let text = "SELECT E'\u{4e2d}\\'', 1 --'";
    let ready = b"I";
    let refused = || vec![Some("setting_dependent".to_owned())];
    // Settled at the start: read as sent.
    assert_eq!(denied_by(&mut t, &encode_query(text)), [None]);
    // Behind it, unanswered: refused.
    let mut batch = encode_query("SELECT 1");
    batch.extend(encode_query(text));
    assert_eq!(denied_by(&mut t, &batch), [vec![None], refused()].concat());
    // Text that reads the same under every setting is never held back.
    assert_eq!(denied_by(&mut t, &encode_query("SELECT 'M\u{fc}ller'")), [None]);
    // One ReadyForQuery per Query; the last one settles the session.
    for _ in 0..3 {
        let _ = t.backend_end(b'Z', ready);
        assert!(!t.settled);
    }
    let _ = t.backend_end(b'Z', ready);
    assert!(t.settled);

    // The extended protocol: a Parse behind an Execute that has no answer yet is refused...
    let mut batch = encode_parse("", text);
    batch.extend(encode_tagged(b'B', b"\0\0\0\0\0\0\0\0"));
    batch.extend(encode_tagged(b'E', b"\0\0\0\0\0"));
    assert_eq!(denied_by(&mut t, &batch), [None]);
    assert_eq!(denied_by(&mut t, &encode_parse("", text)), refused());
    // ...and stays refused when every message is answered but no ReadyForQuery has come: the
    // server reports changed settings only before ReadyForQuery.
    for tag in [b'1', b'2', b'C'] {
        let _ = t.backend_end(tag, b"SELECT 1\0");
    }
    assert_eq!(denied_by(&mut t, &encode_parse("", text)), refused());
    let _ = t.backend_end(b'E', b"");
    assert_eq!(denied_by(&mut t, &encode_tagged(b'S', b"")), []);
    let _ = t.backend_end(b'Z', ready);
    assert!(t.settled);
    // Describe, Close and Flush run nothing on the server: the session stays settled.
    let mut quiet = encode_tagged(b'D', b"S\0");
    quiet.extend(encode_tagged(b'C', b"S\0"));
    quiet.extend(encode_tagged(b'H', b""));
    quiet.extend(encode_query(text));
    assert_eq!(denied_by(&mut t, &quiet), [None]);
}
