//! The *shape* of a query: its text with the digits of numeric literals replaced by `0`.
//! Texts of one shape classify alike, so a cache keyed by shape serves `WHERE aid = 48393`
//! and `WHERE aid = 12011` with one classification.
//!
//! Only texts that cannot hide a number from a plain scan get a shape: no quotes (strings,
//! quoted identifiers), no `$` (parameters, dollar quotes), no backslash, no comments. In
//! such a text every run of ASCII digits that does not continue an identifier (ASCII letters,
//! digits, `_`, or any non-ASCII byte, which PostgreSQL accepts in identifiers) is part of a
//! numeric literal. A literal's value never changes what a statement is, which tables it
//! names or which session setting it changes: class, kind, tables, WHERE and session changes
//! come from keywords, identifiers and strings, all left as they were. Digits are replaced one
//! for one, so every statement sits at the same byte offsets in the text and its shape.

use std::borrow::Cow;

/// The text's shape, or `None` when the text holds quotes, `$`, backslashes or comments.
/// `Cow::Borrowed` when it has no numeric literal.
pub fn shape(sql: &str) -> Option<Cow<'_, str>> {
    let b = sql.as_bytes();
    if b.iter().any(|c| matches!(c, b'\'' | b'"' | b'$' | b'\\')) || sql.contains("--") || sql.contains("/*") {
        return None;
    }
    let mut out: Option<Vec<u8>> = None;
    let mut in_word = false;
    for (i, &c) in b.iter().enumerate() {
        let digit = c.is_ascii_digit();
        if digit && !in_word && c != b'0' {
            out.get_or_insert_with(|| b.to_vec())[i] = b'0';
        }
        // A digit run that starts a literal stays a literal ("12e5", "3.14"): only an
        // identifier character before the run makes it part of a word.
        in_word = if digit {
            in_word
        } else {
            c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
        };
    }
    match out {
        // Only ASCII digits were replaced by an ASCII digit: still UTF-8.
        Some(bytes) => String::from_utf8(bytes).ok().map(Cow::Owned),
        None => Some(Cow::Borrowed(sql)),
    }
}

#[cfg(test)]
mod tests {
    use super::shape;

    #[test]
    fn numeric_literals_are_zeroed_one_digit_for_one() {
        let s = shape("UPDATE pgbench_accounts SET abalance = abalance + -3241 WHERE aid = 48393;").unwrap();
        assert_eq!(
            s,
            "UPDATE pgbench_accounts SET abalance = abalance + -0000 WHERE aid = 00000;"
        );
        // An exponent's digits follow a letter: kept, which only makes another shape.
        assert_eq!(shape("SELECT 1.5e10, 42").unwrap(), "SELECT 0.0e10, 00");
        assert!(matches!(shape("SELECT now()").unwrap(), std::borrow::Cow::Borrowed(_)));
    }

    #[test]
    fn digits_inside_identifiers_are_kept() {
        assert_eq!(
            shape("SELECT c2 FROM t1, s3.tab_9 WHERE x1 = 7").unwrap(),
            "SELECT c2 FROM t1, s3.tab_9 WHERE x1 = 0"
        );
        // Non-ASCII letters start identifiers too.
        assert_eq!(
            shape("SELECT * FROM tablé1 WHERE n = 5").unwrap(),
            "SELECT * FROM tablé1 WHERE n = 0"
        );
    }

    #[test]
    fn texts_that_could_hide_a_number_have_no_shape() {
        for text in [
            "SELECT '1'",
            "SELECT \"col1\" FROM t",
            "SELECT $1",
            "SELECT $$1$$",
            "SELECT E'\\x31'",
            "SELECT 1 -- 2",
            "SELECT 1 /* 2 */",
        ] {
            assert!(shape(text).is_none(), "{text}");
        }
    }

    #[test]
    fn texts_of_one_shape_classify_alike() {
        for (a, b) in [
            (
                "SELECT abalance FROM pgbench_accounts WHERE aid = 7",
                "SELECT abalance FROM pgbench_accounts WHERE aid = 3",
            ),
            (
                "DELETE FROM t1 WHERE id = 1; SET statement_timeout = 5",
                "DELETE FROM t1 WHERE id = 9; SET statement_timeout = 0",
            ),
            ("INSERT INTO h VALUES (1, 2.5, -3)", "INSERT INTO h VALUES (9, 8.1, -7)"),
        ] {
            assert_eq!(shape(a), shape(b));
            let (ca, cb) = (crate::sql::classify(a), crate::sql::classify(b));
            assert_eq!(ca.len(), cb.len());
            for (x, y) in ca.iter().zip(&cb) {
                assert_eq!(
                    (x.class, x.kind, &x.tables, x.has_where, &x.session_change),
                    (y.class, y.kind, &y.tables, y.has_where, &y.session_change)
                );
            }
        }
    }
}
