//! The hash chain: how a record becomes a line, and how a sequence of lines is checked.
//!
//! A line is `{"seq":N,"prev":"<64 hex>",<record fields>,"hash":"<64 hex>"}` and a newline.
//! `hash` is the last field and is the SHA-256 of the line with `,"hash":"..."` cut out, so
//! verification hashes the bytes as written and never re-serializes. `seq` counts from 1
//! across files; `prev` is the previous record's `hash` (64 zeros for the first record).
//!
//! This module does no file I/O of its own beyond reading what it is handed; the writer and
//! the CLI decide which files make up the log ([`super::siblings`] finds and orders them).

use std::borrow::Cow;
use std::fmt;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

/// A SHA-256 digest.
pub type Hash = [u8; 32];

/// `prev` of the first record of a log.
pub const GENESIS: Hash = [0; 32];

const PREFIX_SEQ: &[u8] = b"{\"seq\":";
const PREFIX_PREV: &[u8] = b",\"prev\":\"";
const HASH_FIELD: &[u8] = b",\"hash\":\"";
/// `,"hash":"` + 64 hex digits + `"}`.
const SUFFIX_LEN: usize = HASH_FIELD.len() + 64 + 2;

/// Appends the chained line for `body` (a serialized record: a JSON object with at least one
/// field) to `out`, newline included, and returns the line's hash.
pub fn encode(seq: u64, prev: &Hash, body: &[u8], out: &mut Vec<u8>) -> Hash {
    debug_assert!(body.len() > 2 && body.starts_with(b"{") && body.ends_with(b"}"));
    let start = out.len();
    out.extend_from_slice(PREFIX_SEQ);
    push_decimal(seq, out);
    out.extend_from_slice(PREFIX_PREV);
    push_hex(prev, out);
    out.extend_from_slice(b"\",");
    // The body's own `{` is replaced by the chain fields; its `}` closes the hashed text.
    out.extend_from_slice(body.get(1..).unwrap_or_default());
    let hash = sha256(&out[start..]);
    out.pop();
    out.extend_from_slice(HASH_FIELD);
    push_hex(&hash, out);
    out.extend_from_slice(b"\"}\n");
    hash
}

/// SHA-256 through ring, whose assembly uses the CPU's SHA extensions where it has them and
/// vector code elsewhere.
pub fn sha256(bytes: &[u8]) -> Hash {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut hash = [0u8; 32];
    hash.copy_from_slice(digest.as_ref());
    hash
}

/// `n` in decimal, without an allocation.
fn push_decimal(mut n: u64, out: &mut Vec<u8>) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// The chain fields of one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    pub seq: u64,
    pub prev: Hash,
    /// The hash as written in the line.
    pub hash: Hash,
    /// Whether `hash` is the hash of the line's content.
    pub intact: bool,
}

/// Reads the chain fields of `line` (without its newline) and checks its hash. `Err` names
/// what is missing when the line is not a chained record at all.
pub fn parse(line: &[u8]) -> Result<Link, &'static str> {
    let seq = peek_seq(line).ok_or("no seq field first")?;
    let after_seq = PREFIX_SEQ.len() + seq.to_string().len();
    let rest = &line[after_seq..];
    let prev = rest
        .strip_prefix(PREFIX_PREV)
        .and_then(|r| r.get(..64))
        .and_then(parse_hex)
        .ok_or("no prev field after seq")?;
    let fields_start = after_seq + PREFIX_PREV.len() + 64;
    if line.get(fields_start..fields_start + 2) != Some(b"\",") {
        return Err("no record fields after prev");
    }
    if line.len() < fields_start + 2 + SUFFIX_LEN || !line.ends_with(b"\"}") {
        return Err("no hash field last");
    }
    let cut = line.len() - SUFFIX_LEN;
    if &line[cut..cut + HASH_FIELD.len()] != HASH_FIELD {
        return Err("no hash field last");
    }
    let hash = parse_hex(&line[cut + HASH_FIELD.len()..line.len() - 2]).ok_or("hash is not 64 hex digits")?;
    let mut hasher = Sha256::new();
    hasher.update(&line[..cut]);
    hasher.update(b"}");
    let actual: Hash = hasher.finalize().into();
    Ok(Link {
        seq,
        prev,
        hash,
        intact: actual == hash,
    })
}

/// The `seq` a line starts with, if it starts like a chained record (also for a cut line).
pub fn peek_seq(line: &[u8]) -> Option<u64> {
    let digits = line.strip_prefix(PREFIX_SEQ)?;
    let n = digits.iter().take_while(|b| b.is_ascii_digit()).count();
    // Canonical decimal: no sign, no leading zero, and seq 0 is never written.
    if n == 0 || n > 20 || digits[0] == b'0' {
        return None;
    }
    std::str::from_utf8(&digits[..n]).ok()?.parse().ok()
}

/// Lower-case hex of a hash.
pub fn hex(hash: &Hash) -> String {
    let mut out = Vec::with_capacity(64);
    push_hex(hash, &mut out);
    String::from_utf8(out).unwrap_or_default()
}

fn push_hex(bytes: &Hash, out: &mut Vec<u8>) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)]);
        out.push(DIGITS[usize::from(b & 0xf)]);
    }
}

/// A hash from its 64 lower-case hex digits.
pub fn parse_hash(text: &[u8]) -> Option<Hash> {
    parse_hex(text)
}

fn parse_hex(text: &[u8]) -> Option<Hash> {
    if text.len() != 64 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0; 32];
    for (i, pair) in text.chunks_exact(2).enumerate() {
        out[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

/// Why a record breaks the chain.
#[derive(Debug)]
pub enum Problem {
    /// The line is not a chained record at all.
    Malformed(&'static str),
    /// The hash does not match the line's content.
    Edited,
    /// `seq` skips ahead of the expected value.
    Missing { expected: u64 },
    /// `seq` skips ahead at the start of a file: the previous file ends early or a file is
    /// missing between them.
    FileGap { expected: u64, previous: PathBuf },
    /// `seq` skips ahead, and the expected record comes later in the same file.
    Reordered { expected: u64, found_at: u64 },
    /// `seq` goes backwards.
    Backwards { expected: u64 },
    /// `seq` follows on, but `prev` is not the previous record's hash.
    PrevMismatch,
    /// The first record of the log (`seq` 1) has a `prev` other than zeros.
    NotGenesis,
    /// The record names another replica than the records before it (`None`: no replica):
    /// each replica's records are a chain of their own, in files of their own.
    OtherReplica {
        before: Option<String>,
        this: Option<String>,
    },
    /// The file ends in the middle of a line.
    Truncated,
    /// The file could not be read.
    Io(std::io::Error),
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Malformed(what) => write!(f, "edited: not a chained audit record ({what})"),
            Self::Edited => write!(f, "edited: the hash does not match the record"),
            Self::Missing { expected } => write!(f, "removed: expected seq {expected}, records are missing before it"),
            Self::FileGap { expected, previous } => write!(
                f,
                "truncated or removed: expected seq {expected}; {} ends before it, or a file between them is missing",
                previous.display()
            ),
            Self::Reordered { expected, found_at } => {
                write!(
                    f,
                    "reordered: expected seq {expected}, which comes later, at line {found_at}"
                )
            }
            Self::Backwards { expected } => write!(f, "reordered: seq goes backwards (expected {expected})"),
            Self::PrevMismatch => write!(f, "removed or reordered: prev is not the hash of the record before it"),
            Self::NotGenesis => write!(f, "edited: the first record (seq 1) must have a prev of zeros"),
            Self::OtherReplica { before, this } => write!(
                f,
                "mixed replicas: this record is of {}, the records before it of {}",
                super::replica::label(this.as_deref()),
                super::replica::label(before.as_deref())
            ),
            Self::Truncated => write!(f, "truncated: the last line is incomplete"),
            Self::Io(e) => write!(f, "cannot read: {e}"),
        }
    }
}

/// The first record that breaks the chain.
#[derive(Debug)]
pub struct VerifyError {
    pub file: PathBuf,
    /// 1-based line number in `file` (0 when the file could not be opened).
    pub line: u64,
    /// The record's `seq`, when it could be read.
    pub seq: Option<u64>,
    pub problem: Problem,
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ": line {}", self.line)?;
        }
        if let Some(seq) = self.seq {
            write!(f, ", seq {seq}")?;
        }
        write!(f, ": {}", self.problem)
    }
}

impl std::error::Error for VerifyError {}

/// What a successful verification covered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub records: u64,
    /// `(first seq, last seq)`, `None` for an empty log.
    pub seqs: Option<(u64, u64)>,
    /// Hash of the last record: compare it with a copy kept elsewhere to detect a log cut
    /// short at its end.
    pub last_hash: Option<Hash>,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.seqs {
            Some((a, b)) => write!(f, "ok: {} records, seq {a}..{b}", self.records),
            None => write!(f, "ok: 0 records"),
        }
    }
}

/// Checks lines in order, file after file. A log whose oldest files were removed may start
/// at any `seq`; from there on every record must follow the one before it, and name the same
/// replica as the first (or, like it, none).
#[derive(Debug, Default)]
pub struct Verifier {
    last: Option<(u64, Hash)>,
    /// The replica the chain's first record names (`Some(None)`: none).
    replica: Option<Option<String>>,
    first: Option<u64>,
    records: u64,
    previous_file: Option<PathBuf>,
}

impl Verifier {
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks every line of `path` (read through gzip when it is compressed).
    pub fn check_file(&mut self, path: &Path) -> Result<(), VerifyError> {
        let reader = super::siblings::open(path).map_err(|e| VerifyError {
            file: path.to_owned(),
            line: 0,
            seq: None,
            problem: Problem::Io(e),
        })?;
        self.check_reader(path, reader)
    }

    /// Checks every line read from `reader`; `name` is used in errors.
    pub fn check_reader(&mut self, name: &Path, mut reader: impl BufRead) -> Result<(), VerifyError> {
        let mut buf = Vec::new();
        let mut line_no = 0;
        let at_file_start = self.previous_file.take();
        let fail = |line: u64, seq: Option<u64>, problem: Problem| VerifyError {
            file: name.to_owned(),
            line,
            seq,
            problem,
        };
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => return Err(fail(line_no + 1, None, Problem::Io(e))),
            }
            line_no += 1;
            let Some(line) = buf.strip_suffix(b"\n") else {
                return Err(fail(line_no, peek_seq(&buf), Problem::Truncated));
            };
            let link = parse(line).map_err(|what| fail(line_no, peek_seq(line), Problem::Malformed(what)))?;
            let seq = Some(link.seq);
            if !link.intact {
                return Err(fail(line_no, seq, Problem::Edited));
            }
            let replica = super::replica::of_line(line)
                .map_err(|_| fail(line_no, seq, Problem::Malformed("not a JSON object")))?;
            match &self.replica {
                None => self.replica = Some(replica.map(Cow::into_owned)),
                Some(before) if before.as_deref() != replica.as_deref() => {
                    let problem = Problem::OtherReplica {
                        before: before.clone(),
                        this: replica.map(Cow::into_owned),
                    };
                    return Err(fail(line_no, seq, problem));
                }
                Some(_) => {}
            }
            match self.last {
                None if link.seq == 1 && link.prev != GENESIS => {
                    return Err(fail(line_no, seq, Problem::NotGenesis));
                }
                None => self.first = Some(link.seq),
                Some((last_seq, last_hash)) => {
                    let expected = last_seq + 1;
                    if link.seq < expected {
                        return Err(fail(line_no, seq, Problem::Backwards { expected }));
                    }
                    if link.seq > expected {
                        let problem = match (&at_file_start, line_no) {
                            (Some(previous), 1) => Problem::FileGap {
                                expected,
                                previous: previous.clone(),
                            },
                            _ => match find_later(&mut reader, expected, line_no) {
                                Some(found_at) => Problem::Reordered { expected, found_at },
                                None => Problem::Missing { expected },
                            },
                        };
                        return Err(fail(line_no, seq, problem));
                    }
                    if link.prev != last_hash {
                        return Err(fail(line_no, seq, Problem::PrevMismatch));
                    }
                }
            }
            self.last = Some((link.seq, link.hash));
            self.records += 1;
        }
        self.previous_file = Some(name.to_owned());
        Ok(())
    }

    /// What was verified.
    pub fn finish(self) -> Summary {
        Summary {
            records: self.records,
            seqs: self.first.zip(self.last.map(|(seq, _)| seq)),
            last_hash: self.last.map(|(_, hash)| hash),
        }
    }
}

/// The line number at which a record with `seq` follows in `reader`, if it does.
fn find_later(reader: &mut impl BufRead, seq: u64, mut line_no: u64) -> Option<u64> {
    let mut buf = Vec::new();
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf).ok()? == 0 {
            return None;
        }
        line_no += 1;
        if peek_seq(&buf) == Some(seq) {
            return Some(line_no);
        }
    }
}

/// Verifies `files` as one log, oldest first.
pub fn verify_files(files: &[PathBuf]) -> Result<Summary, VerifyError> {
    let mut v = Verifier::new();
    for f in files {
        v.check_file(f)?;
    }
    Ok(v.finish())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_writers_sha256_agrees_with_the_verifiers_and_seq_is_canonical_decimal() {
        // The writer hashes with ring, the verifier with sha2: one checks the other.
        for len in [0usize, 1, 55, 56, 63, 64, 65, 1000, 4097] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let want: Hash = Sha256::digest(&bytes).into();
            assert_eq!(sha256(&bytes), want, "{len} bytes");
        }
        for n in [0u64, 7, 10, 99, 1_000_000, u64::MAX] {
            let mut out = Vec::new();
            push_decimal(n, &mut out);
            assert_eq!(out, n.to_string().as_bytes());
        }
        let mut line = Vec::new();
        let hash = encode(18_446_744_073_709_551_615, &GENESIS, br#"{"v":1}"#, &mut line);
        let link = parse(&line[..line.len() - 1]).unwrap();
        assert_eq!((link.seq, link.hash, link.intact), (u64::MAX, hash, true));
    }
}
