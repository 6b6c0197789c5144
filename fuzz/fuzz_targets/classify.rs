//! The statement splitter and classifier (`sql::classify`), `sql::redact` and `sql::shape`.
//!
//! Input: any bytes; UTF-8 ones are the query text (the relay refuses other text).
//! Checked, beside "no panic, no stack overflow":
//! - `classify` returns at least one statement, each kind is in `KINDS`, `empty` only alone,
//!   and each statement's text is found in the input after the previous one (the tracker's
//!   spans);
//! - a statement that was classified (not `unknown`) classifies alike on its own;
//! - `shape`: same length, only ASCII digits changed and only to `0`; a text of the same
//!   shape (the shape itself, and the text with its literal digits changed) classifies alike
//!   statement for statement, and each of its statements sits at the same offsets, which is
//!   what the tracker's shape-keyed cache relies on;
//! - `redact` leaves text without `password` unchanged and is idempotent.
#![no_main]

use std::ops::Range;

use jitgate_protocol::sql::{
    classify, contains_ignore_ascii_case, redact, shape, Classified, SessionChange, StatementClass, KINDS,
};
use libfuzzer_sys::fuzz_target;

type Decision<'a> = (
    StatementClass,
    &'static str,
    &'a [String],
    Option<bool>,
    &'a Option<SessionChange>,
);

fn decision(c: &Classified) -> Decision<'_> {
    (c.class, c.kind, &c.tables, c.has_where, &c.session_change)
}

/// Where each statement's text sits in `input`, found in order, as the tracker finds it.
fn spans(input: &str, list: &[Classified]) -> Option<Vec<Range<usize>>> {
    let mut out = Vec::with_capacity(list.len());
    let mut from = 0;
    for c in list {
        let start = from + input.get(from..)?.find(c.text.as_str())?;
        out.push(start..start + c.text.len());
        from = start + c.text.len();
    }
    Some(out)
}

fn same_shape(a: &str, list_a: &[Classified], spans_a: &[Range<usize>], b: &str) {
    let list_b = classify(b);
    assert_eq!(list_a.len(), list_b.len(), "{a:?} and {b:?} split differently");
    for ((x, y), span) in list_a.iter().zip(&list_b).zip(spans_a) {
        assert_eq!(decision(x), decision(y), "{a:?} and {b:?} classify differently");
        assert_eq!(b.get(span.clone()), Some(y.text.as_str()), "{b:?}: statement moved");
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(sql) = std::str::from_utf8(data) else {
        return;
    };
    let list = classify(sql);
    assert!(!list.is_empty());
    for c in &list {
        assert!(KINDS.contains(&c.kind), "kind {}", c.kind);
        if c.kind == "empty" {
            assert_eq!(list.len(), 1, "empty beside statements");
            assert!(c.text.is_empty());
        }
    }
    let spans = spans(sql, &list);
    assert!(spans.is_some(), "a statement text is not a slice of the input");

    for c in list
        .iter()
        .filter(|c| c.class != StatementClass::Unknown && c.kind != "empty")
    {
        let alone = classify(&c.text);
        assert_eq!(alone.len(), 1, "{:?} splits again on its own", c.text);
        assert_eq!(decision(&alone[0]), decision(c), "{:?} alone", c.text);
        assert_eq!(alone[0].text, c.text);
    }

    if let Some(shaped) = shape(sql) {
        assert_eq!(shaped.len(), sql.len());
        for (&s, &o) in shaped.as_bytes().iter().zip(sql.as_bytes()) {
            assert!(s == o || (s == b'0' && o.is_ascii_digit()), "shape changed {o} to {s}");
        }
        if let Some(spans) = &spans {
            same_shape(sql, &list, spans, &shaped);
            // Another text of that shape: the same literals with other digits.
            let other: Vec<u8> = sql
                .bytes()
                .zip(shaped.bytes())
                .map(|(o, s)| if o != s { b'1' + (o - b'0') % 9 } else { o })
                .collect();
            let other = String::from_utf8(other).expect("only ASCII digits changed");
            assert_eq!(shape(&other).as_deref(), Some(&*shaped), "{other:?} has another shape");
            same_shape(sql, &list, spans, &other);
        }
    }

    let redacted = redact(sql);
    if !contains_ignore_ascii_case(sql, "password") {
        assert_eq!(redacted, sql);
    }
    assert_eq!(redact(&redacted), redacted, "redact is not idempotent");
});
