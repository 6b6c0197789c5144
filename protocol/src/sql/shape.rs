//! The *shape* of a query: its text with the digits of numeric literals replaced by `0`.
//! Texts of one shape classify alike, so a cache keyed by shape serves `WHERE aid = 48393`
//! and `WHERE aid = 12011` with one classification.
//!
//! Only texts that cannot hide a number from a plain scan get a shape: no quotes (strings,
//! quoted identifiers), no `$` (parameters, dollar quotes), no backslash, no comments, and
//! none of `@ # ? : \``, which sqlparser may read as part of a variable, placeholder or
//! name (`@a=1` becomes a table name). In
//! such a text a run of ASCII digits that neither continues an identifier (ASCII letters,
//! digits, `_`, or any non-ASCII byte, which PostgreSQL accepts in identifiers) nor runs into
//! one (`7x591` would become the hex literal `0x591`; `5e10` keeps its digits) is a numeric
//! literal, and its value never changes what a statement is, which tables it names or whether
//! it has a WHERE: those come from keywords, identifiers and strings, all left as they were.
//! A number can be the *value* of a session change (`SET role = 5`, `SET search_path = 3`),
//! so texts with the word `role`, `authorization`, `search_path` or `set_config` get no shape.
//! Digits are replaced one for one, so every statement sits at the same byte offsets in the
//! text and its shape.

use std::borrow::Cow;

/// Words of texts that may change a session setting to a number: never shaped.
const SESSION_WORDS: &[&str] = &["role", "authorization", "search_path", "set_config"];

/// Whether one of [`SESSION_WORDS`] is a word of `b` (ASCII case ignored), in one pass.
fn mentions_session_word(b: &[u8]) -> bool {
    b.split(|&c| !(c.is_ascii_alphanumeric() || c == b'_'))
        .any(|w| SESSION_WORDS.iter().any(|s| w.eq_ignore_ascii_case(s.as_bytes())))
}

/// The text's shape, or `None` when the text holds quotes, `$`, backslashes, comments or any of
/// `@ # ? : \``.
/// `Cow::Borrowed` when it has no numeric literal.
pub fn shape(sql: &str) -> Option<Cow<'_, str>> {
    let b = sql.as_bytes();
    if b.iter()
        .any(|c| matches!(c, b'\'' | b'"' | b'$' | b'\\' | b'@' | b'#' | b'?' | b':' | b'`'))
        || sql.contains("--")
        || sql.contains("/*")
    {
        return None;
    }
    if mentions_session_word(b) {
        return None;
    }
    let word = |c: u8| c.is_ascii_alphabetic() || c == b'_' || c >= 0x80;
    let mut out: Option<Vec<u8>> = None;
    let mut i = 0;
    while i < b.len() {
        if !b[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        // Part of a word before it ("t1"), or running into one after it ("7x591", "5e10").
        let inside_word = start > 0 && word(b[start - 1]) || b.get(i).copied().is_some_and(word);
        if !inside_word && b[start..i].iter().any(|&d| d != b'0') {
            out.get_or_insert_with(|| b.to_vec())[start..i].fill(b'0');
        }
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
        // Digits next to a letter (an exponent, a radix prefix) are kept, which only makes
        // another shape.
        assert_eq!(shape("SELECT 1.5e10, 42").unwrap(), "SELECT 0.5e10, 00");
        assert_eq!(shape("SELECT 7x591").unwrap(), "SELECT 7x591");
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
            "SET role = 5",
            "SET SESSION AUTHORIZATION 5",
            "SET search_path = 3",
            "SELECT set_config(a, 5, false)",
        ] {
            assert!(shape(text).is_none(), "{text}");
        }
    }

    #[test]
    fn the_fuzzers_findings_get_no_shared_shape() {
        // fuzz/findings: a numeric role or search_path is a value, not a literal to zero...
        assert_eq!(shape("SET ROLE =5; SET search_p =; SET sear =0"), None);
        assert_eq!(shape("SET search_path = 3"), None);
        // ...and zeroing `7x591` would make the hex literal `0x591`.
        assert_eq!(shape("SELECT 7x591").as_deref(), Some("SELECT 7x591"));
        // ...and sqlparser reads `@a=1` as a name, digits and all.
        for text in [
            "SELECT a?al WHERE  iid ?7x591;",
            "UPDATE @a=1 SET x=1",
            "SELECT ?1",
            "SELECT :1",
        ] {
            assert_eq!(shape(text), None, "{text}");
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
