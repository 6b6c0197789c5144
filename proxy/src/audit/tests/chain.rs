//! The line format and the verifier, tamper case by tamper case.

use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::super::chain::{encode, hex, parse, verify_files, Problem, Summary, Verifier, VerifyError, GENESIS};
use super::super::files::rotated_path;
use super::super::siblings;

/// `n` chained records, one `Vec` per line (newline included).
fn lines(n: u64) -> Vec<Vec<u8>> {
    let mut prev = GENESIS;
    (1..=n)
        .map(|seq| {
            let body = format!(r#"{{"v":1,"ts":"2026-11-22T05:40:01.123Z","event":"grant.expired","grant_id":"g-{seq}","user":"alice"}}"#);
            let mut line = Vec::new();
            prev = encode(seq, &prev, body.as_bytes(), &mut line);
            line
        })
        .collect()
}

fn check(lines: &[Vec<u8>]) -> Result<Summary, VerifyError> {
    let mut v = Verifier::new();
    v.check_reader(Path::new("audit.jsonl"), &lines.concat()[..])?;
    Ok(v.finish())
}

fn check_bytes(bytes: &[u8]) -> Result<Summary, VerifyError> {
    let mut v = Verifier::new();
    v.check_reader(Path::new("audit.jsonl"), bytes)?;
    Ok(v.finish())
}

#[test]
fn a_line_is_canonical_by_construction() {
    let l = lines(2);
    let first = std::str::from_utf8(&l[0]).unwrap();
    assert!(
        first.starts_with(&format!(r#"{{"seq":1,"prev":"{}","v":1,"ts":"#, "0".repeat(64))),
        "{first}"
    );
    assert!(first.ends_with("\"}\n"));
    // hash = SHA-256 of the line without its hash field, as written.
    let (content, hash) = first.trim_end().rsplit_once(r#","hash":""#).unwrap();
    let expected = hex(&Sha256::digest(format!("{content}}}").as_bytes()).into());
    assert_eq!(hash.trim_end_matches("\"}"), expected);
    let json: serde_json::Value = serde_json::from_str(first).unwrap();
    assert_eq!(json["seq"], 1);
    assert_eq!(json["event"], "grant.expired");
    assert_eq!(json["hash"], expected.as_str());
    // The second record points at the first.
    let second: serde_json::Value = serde_json::from_slice(&l[1]).unwrap();
    assert_eq!(second["prev"], json["hash"]);
    let link = parse(l[1].strip_suffix(b"\n").unwrap()).unwrap();
    assert_eq!((link.seq, link.intact), (2, true));
    assert_eq!(hex(&link.prev), json["hash"].as_str().unwrap());
}

#[test]
fn an_untouched_chain_verifies() {
    let s = check(&lines(10)).unwrap();
    assert_eq!(s.records, 10);
    assert_eq!(s.seqs, Some((1, 10)));
    assert_eq!(s.to_string(), "ok: 10 records, seq 1..10");
    assert_eq!(check(&[]).unwrap().to_string(), "ok: 0 records");
}

fn failure(result: Result<Summary, VerifyError>) -> (u64, Option<u64>, Problem, String) {
    let e = result.unwrap_err();
    let text = e.to_string();
    (e.line, e.seq, e.problem, text)
}

#[test]
fn an_edited_byte_is_named() {
    let mut l = lines(6);
    let at = l[3].windows(5).position(|w| w == b"alice").unwrap();
    l[3][at + 4] = b'x';
    let (line, seq, problem, text) = failure(check(&l));
    assert_eq!((line, seq), (4, Some(4)));
    assert!(matches!(problem, Problem::Edited), "{text}");
    assert_eq!(
        text,
        "audit.jsonl: line 4, seq 4: edited: the hash does not match the record"
    );
}

#[test]
fn an_edited_seq_or_hash_is_named() {
    let mut l = lines(6);
    l[2] = String::from_utf8(l[2].clone())
        .unwrap()
        .replacen(r#""seq":3"#, r#""seq":7"#, 1)
        .into_bytes();
    let (line, seq, problem, _) = failure(check(&l));
    assert_eq!((line, seq), (3, Some(7)));
    assert!(matches!(problem, Problem::Edited));

    let mut l = lines(6);
    let n = l[4].len();
    l[4][n - 5] = if l[4][n - 5] == b'0' { b'1' } else { b'0' };
    let (line, _, problem, _) = failure(check(&l));
    assert_eq!(line, 5);
    assert!(matches!(problem, Problem::Edited));
}

#[test]
fn a_deleted_line_is_named() {
    let mut l = lines(6);
    l.remove(2);
    let (line, seq, problem, text) = failure(check(&l));
    assert_eq!((line, seq), (3, Some(4)));
    assert!(matches!(problem, Problem::Missing { expected: 3 }), "{text}");
    assert!(text.contains("removed"), "{text}");
}

#[test]
fn a_deleted_last_line_of_a_prefix_shows_as_an_earlier_end() {
    // Cutting whole records off the end leaves a valid, shorter chain: the summary's last
    // seq and hash are what tell it apart from the full log.
    let full = check(&lines(6)).unwrap();
    let cut = check(&lines(6)[..5]).unwrap();
    assert_eq!(cut.seqs, Some((1, 5)));
    assert_ne!(full.last_hash, cut.last_hash);
}

#[test]
fn swapped_lines_are_named() {
    let mut l = lines(6);
    l.swap(2, 3);
    let (line, seq, problem, text) = failure(check(&l));
    assert_eq!((line, seq), (3, Some(4)));
    assert!(
        matches!(
            problem,
            Problem::Reordered {
                expected: 3,
                found_at: 4
            }
        ),
        "{text}"
    );
    assert!(text.contains("reordered"), "{text}");
}

#[test]
fn a_duplicated_line_goes_backwards() {
    let mut l = lines(4);
    let dup = l[1].clone();
    l.push(dup);
    let (line, seq, problem, _) = failure(check(&l));
    assert_eq!((line, seq), (5, Some(2)));
    assert!(matches!(problem, Problem::Backwards { expected: 5 }));
}

#[test]
fn a_replaced_record_breaks_the_next_link() {
    // Someone rewrites record 3 and recomputes its hash: record 4 no longer points at it.
    let mut l = lines(6);
    let prev = parse(l[1].strip_suffix(b"\n").unwrap()).unwrap().hash;
    let mut forged = Vec::new();
    encode(
        3,
        &prev,
        br#"{"v":1,"event":"grant.expired","user":"mallory"}"#,
        &mut forged,
    );
    l[2] = forged;
    let (line, seq, problem, _) = failure(check(&l));
    assert_eq!((line, seq), (4, Some(4)));
    assert!(matches!(problem, Problem::PrevMismatch));
}

#[test]
fn a_line_cut_mid_way_is_named() {
    let l = lines(5);
    let mut bytes = l.concat();
    bytes.truncate(bytes.len() - l[4].len() / 2);
    let (line, seq, problem, text) = failure(check_bytes(&bytes));
    assert_eq!((line, seq), (5, Some(5)));
    assert!(matches!(problem, Problem::Truncated), "{text}");
}

#[test]
fn lines_that_are_not_chained_records_are_named() {
    let mut l = lines(3);
    l.insert(1, b"{\"v\":1,\"event\":\"grant.expired\"}\n".to_vec());
    let (line, seq, problem, _) = failure(check(&l));
    assert_eq!((line, seq), (2, None));
    assert!(matches!(problem, Problem::Malformed(_)));

    let mut first = Vec::new();
    encode(1, &[7; 32], br#"{"v":1}"#, &mut first);
    let (line, _, problem, _) = failure(check(&[first]));
    assert_eq!(line, 1);
    assert!(matches!(problem, Problem::NotGenesis));
}

#[test]
fn a_log_may_start_after_seq_1() {
    let l = lines(8);
    let s = check(&l[3..]).unwrap();
    assert_eq!(s.seqs, Some((4, 8)));
}

/// Writes `lines` split into files of `per_file` lines, named like rotated files.
fn write_files(dir: &Path, lines: &[Vec<u8>], per_file: usize) -> Vec<PathBuf> {
    let active = dir.join("audit.jsonl");
    let mut files: Vec<PathBuf> = lines
        .chunks(per_file)
        .enumerate()
        .map(|(i, chunk)| {
            let path = rotated_path(&active, (i * per_file + 1) as u64);
            std::fs::write(&path, chunk.concat()).unwrap();
            path
        })
        .collect();
    let last = files.pop().unwrap();
    std::fs::rename(&last, &active).unwrap();
    files.push(active);
    files
}

#[test]
fn the_chain_runs_across_files() {
    let dir = tempfile::tempdir().unwrap();
    let files = write_files(dir.path(), &lines(10), 3);
    assert_eq!(files.len(), 4);
    let s = verify_files(&files).unwrap();
    assert_eq!((s.records, s.seqs), (10, Some((1, 10))));
}

#[test]
fn a_missing_middle_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = write_files(dir.path(), &lines(10), 3);
    let dropped = files.remove(1);
    let e = verify_files(&files).unwrap_err();
    assert_eq!((e.file.clone(), e.line, e.seq), (files[1].clone(), 1, Some(7)));
    assert!(
        matches!(&e.problem, Problem::FileGap { expected: 4, previous } if *previous == files[0]),
        "{e}"
    );
    assert!(e.to_string().contains("truncated or removed"), "{e}");
    drop(dropped);
}

#[test]
fn a_rotated_file_cut_short_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let files = write_files(dir.path(), &lines(9), 3);
    // Whole last record removed from the first file.
    let text = std::fs::read(&files[0]).unwrap();
    let cut = text[..text.len() - 1].iter().rposition(|&b| b == b'\n').unwrap() + 1;
    std::fs::write(&files[0], &text[..cut]).unwrap();
    let e = verify_files(&files).unwrap_err();
    assert_eq!((e.file.clone(), e.line, e.seq), (files[1].clone(), 1, Some(4)));
    assert!(matches!(e.problem, Problem::FileGap { expected: 3, .. }));
    // Cut mid-line instead.
    std::fs::write(&files[0], &text[..text.len() - 10]).unwrap();
    let e = verify_files(&files).unwrap_err();
    assert_eq!((e.file.clone(), e.line, e.seq), (files[0].clone(), 3, Some(3)));
    assert!(matches!(e.problem, Problem::Truncated));
}

#[test]
fn files_are_found_by_their_names_and_put_in_chain_order_by_their_records() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("audit.jsonl");
    assert_eq!(rotated_path(&a, 9), dir.path().join("audit.jsonl.00000000000000000009"));
    let all: Vec<u8> = lines(12).concat();
    let split = |from: usize, to: usize| -> Vec<u8> { lines(12)[from..to].concat() };
    // Names that sort against chain order: logrotate's numbers count backwards.
    let newest = dir.path().join("audit.jsonl.1");
    let middle = dir.path().join("audit.jsonl-20261201.gz");
    let oldest = dir.path().join("audit.jsonl.00000000000000000001");
    std::fs::write(&oldest, split(0, 4)).unwrap();
    let mut gz = flate2::write::GzEncoder::new(std::fs::File::create(&middle).unwrap(), flate2::Compression::fast());
    gz.write_all(&split(4, 8)).unwrap();
    gz.finish().unwrap();
    std::fs::write(&newest, split(8, 11)).unwrap();
    std::fs::write(&a, split(11, 12)).unwrap();
    // Not part of the log: set aside, another log's file, an unrelated name.
    std::fs::write(dir.path().join("audit.jsonl.unchained-1"), b"{}\n").unwrap();
    std::fs::write(dir.path().join("other.jsonl.1"), &all).unwrap();
    std::fs::write(dir.path().join("audit.jsonlx"), &all).unwrap();
    let mut found = siblings::find(&a).unwrap();
    found.sort();
    let mut want = vec![newest.clone(), middle.clone(), oldest.clone()];
    want.sort();
    assert_eq!(found, want);
    let ordered = siblings::chain_order(vec![a.clone(), newest.clone(), middle.clone(), oldest.clone()]);
    assert_eq!(ordered, vec![oldest, middle, newest, a.clone()]);
    let s = verify_files(&ordered).unwrap();
    assert_eq!((s.records, s.seqs), (12, Some((1, 12))));
    // An empty file orders last and holds nothing.
    let empty = dir.path().join("audit.jsonl.9");
    std::fs::write(&empty, b"").unwrap();
    assert_eq!(siblings::chain_order(vec![empty.clone(), a.clone()]), vec![a, empty]);
}

#[test]
fn seq_must_be_canonical() {
    let mut line = Vec::new();
    encode(5, &GENESIS, br#"{"v":1}"#, &mut line);
    let text = String::from_utf8(line).unwrap().replace(r#""seq":5"#, r#""seq":05"#);
    assert!(parse(text.trim_end().as_bytes()).is_err());
}
