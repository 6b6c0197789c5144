use super::{depends_on_settings, semicolons};

#[test]
fn ascii_without_backslashes_reads_the_same_everywhere() {
    assert!(!depends_on_settings("SELECT 1; SELECT 'a;b' FROM t WHERE x = $1"));
    assert!(!depends_on_settings(""));
}

#[test]
fn a_backslash_swallowed_by_a_multibyte_character_is_caught() {
    // SJIS: C3 is a one-byte kana, 81 5C one character: the backslash is gone.
    assert!(depends_on_settings(
        "SELECT E'\u{c1}\\' ; ALTER ROLE r PASSWORD $$x$$; --'"
    ));
    // BIG5, GBK, UHC, GB18030: E4 B8 | AD 5C.
    assert!(depends_on_settings(
        "SELECT E'\u{4e2d}\\' ; ALTER ROLE r PASSWORD $$x$$; --'"
    ));
    // The proxy's own reading fails to lex, another one runs.
    assert!(depends_on_settings("SELECT E'\u{4e2d}\\'; DROP TABLE t; --"));
}

#[test]
fn standard_conforming_strings_off_is_caught() {
    assert!(depends_on_settings("SELECT 'a\\'' ; ALTER ROLE r PASSWORD $$x$$; --'"));
    assert!(depends_on_settings("SELECT 'a\\'' ; SELECT 1; --'"));
    assert!(depends_on_settings("SELECT N'a\\'' ; SELECT 1; --'"));
}

#[test]
fn an_operator_swallowed_into_a_name_is_caught() {
    assert!(depends_on_settings("SELECT \u{4e2d}@x"));
}

#[test]
fn ordinary_text_reads_the_same() {
    for text in [
        "SELECT 'M\u{fc}ller', '\u{4e2d}\u{6587}', \"\u{5217}\" FROM t",
        "SELECT '\u{4e2d}'",
        "SELECT E'\\n', E'\\\\', E'\\''",
        "SELECT 'C:\\temp'",
        "SELECT U&'\\0041'",
        "SELECT 1 -- \u{4e2d}\\\n",
        "SELECT $\u{4e2d}$ x $\u{4e2d}$",
        "SELECT 'a'\n'b'",
        "SELECT B'0101', X'ff' /* \u{4e2d} /* nested */ */",
    ] {
        assert!(!depends_on_settings(text), "{text:?}");
    }
}

#[test]
fn semicolons_are_the_top_level_ones() {
    let text = "SELECT ';' ; SELECT $a$;$b$;$a$; /* ; /* ; */ ; */ SELECT \";\"; -- ;\nSELECT E'\\';'";
    let found = semicolons(text).unwrap();
    assert_eq!(found, vec![11, 31, 61], "{text}");
    assert!(found.iter().all(|&i| &text[i..=i] == ";"));
    assert_eq!(semicolons("SELECT 'open"), None);
    assert_eq!(semicolons("SELECT /* open"), None);
    assert_eq!(semicolons("SELECT $x$ open"), None);
    assert_eq!(semicolons("SELECT 'a'\n  -- c\n'b'; SELECT 1"), Some(vec![21]));
    assert_eq!(semicolons("SELECT 1 +--;\n 2; x"), Some(vec![16]));
}

#[test]
fn texts_too_long_to_check_count_as_depending_unless_plain_ascii() {
    let long = format!("SELECT '{}'", "a".repeat(super::MAX_CHECKED_BYTES));
    assert!(!depends_on_settings(&long));
    let long = format!("SELECT '\u{e9}{}'", "a".repeat(super::MAX_CHECKED_BYTES));
    assert!(depends_on_settings(&long));
}
