//! The replica id in records. When replicas share a store (`[store]`), each writes its own
//! log and every record of it carries `"replica":"<store.replica_id>"` right after `ts`,
//! covered by the hash like any other field: one chain per replica, each with its own `seq`.
//! Records of a single node carry no `replica` and are one chain, as they always were.
//!
//! Here: the field as the writer adds it, encoded once when the log opens ([`field`]);
//! reading it back from a line ([`of_line`]); and, for `jitgate audit verify` over the files
//! of several replicas, splitting the files into one chain per replica by what their first
//! record names ([`chains`]) and verifying each on its own ([`verify`]). That every record of
//! a chain names the same replica is checked by [`super::chain::Verifier`]. Reads only; never
//! runs on a tokio worker.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use super::chain::{self, Summary, VerifyError};
use super::siblings;

/// The key as the writer writes it. A quote inside a JSON string is escaped, so these bytes
/// occur in a line only as a key (of the record, or of an object inside it).
const KEY: &[u8] = b"\"replica\":";

/// `,"replica":"<id>"`: the bytes the writer puts after `ts` in every record; empty for
/// `None`, so records are the same bytes as without replicas.
pub(crate) fn field(replica: Option<&str>) -> Arc<[u8]> {
    let Some(id) = replica else {
        return Arc::from(Vec::new());
    };
    let mut out = b",".to_vec();
    out.extend_from_slice(KEY);
    out.extend_from_slice(serde_json::Value::from(id).to_string().as_bytes());
    Arc::from(out)
}

/// The top-level field of a record that [`of_line`] reads; every other field is skipped.
#[derive(Deserialize)]
struct Head<'a> {
    #[serde(borrow, default)]
    replica: Option<Cow<'a, str>>,
}

/// The replica a record (one line, without its newline) names: `None` when it names none.
/// An error when the line has a `replica` key but is not a JSON object (or has two).
pub fn of_line(line: &[u8]) -> Result<Option<Cow<'_, str>>, serde_json::Error> {
    // A single node's lines have no such key: nothing to parse.
    if !line.windows(KEY.len()).any(|w| w == KEY) {
        return Ok(None);
    }
    Ok(serde_json::from_slice::<Head<'_>>(line)?.replica)
}

/// `replica ID`, or `no replica` for a single node's records: how `verify` names a chain.
pub fn label(replica: Option<&str>) -> String {
    match replica {
        Some(id) => format!("replica {id}"),
        None => "no replica".to_owned(),
    }
}

/// One chain to verify: the files of one replica, or of a single node (`replica: None`), in
/// chain order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub replica: Option<String>,
    pub files: Vec<PathBuf>,
}

/// What a file's first line says.
enum Start {
    /// The file holds no line.
    Empty,
    /// A record naming `replica` (or none); `seq` when it starts like a chained record.
    Record { seq: Option<u64>, replica: Option<String> },
    /// Unreadable, cut (no newline), or a line with a `replica` key that is not JSON: the
    /// verifier names it.
    Damaged { seq: Option<u64> },
}

fn start(path: &Path) -> Start {
    let mut line = Vec::new();
    match siblings::open(path).and_then(|mut r| r.read_until(b'\n', &mut line)) {
        Ok(0) => Start::Empty,
        Ok(_) => {
            let Some(line) = line.strip_suffix(b"\n") else {
                return Start::Damaged {
                    seq: chain::peek_seq(&line),
                };
            };
            let seq = chain::peek_seq(line);
            match of_line(line) {
                Ok(replica) => Start::Record {
                    seq,
                    replica: replica.map(Cow::into_owned),
                },
                Err(_) => Start::Damaged { seq },
            }
        }
        Err(_) => Start::Damaged { seq: None },
    }
}

/// The `seq` and replica of the first record of `path`; `None` when it is empty, unreadable
/// or does not start with a chained record. Two files with the same are copies of one file.
pub fn first_record(path: &Path) -> Option<(u64, Option<String>)> {
    match start(path) {
        Start::Record {
            seq: Some(seq),
            replica,
        } => Some((seq, replica)),
        _ => None,
    }
}

/// Splits `files` into chains by the replica their first record names: the single node's
/// chain (no replica) first, then by replica id. Each chain is in chain order, by the `seq` of
/// the files' first records (never by name); files without one last, in the order given. A
/// file that tells no replica (empty, unreadable, or starting with a cut line) joins the only
/// chain when there is one; with several, an empty file joins the first (it holds nothing to
/// check) and the others the single node's chain, whose verification names them.
pub fn chains(files: Vec<PathBuf>) -> Vec<Chain> {
    type Keyed = Vec<(u64, usize, PathBuf)>;
    let mut by_replica: BTreeMap<Option<String>, Keyed> = BTreeMap::new();
    let (mut empty, mut damaged): (Keyed, Keyed) = (Vec::new(), Vec::new());
    for (i, f) in files.into_iter().enumerate() {
        match start(&f) {
            Start::Record { seq, replica } => {
                by_replica
                    .entry(replica)
                    .or_default()
                    .push((seq.unwrap_or(u64::MAX), i, f))
            }
            Start::Empty => empty.push((u64::MAX, i, f)),
            Start::Damaged { seq } => damaged.push((seq.unwrap_or(u64::MAX), i, f)),
        }
    }
    if by_replica.len() <= 1 {
        let (replica, mut all) = by_replica.pop_first().unwrap_or((None, Vec::new()));
        all.extend(empty);
        all.extend(damaged);
        return vec![in_order(replica, all)];
    }
    if !damaged.is_empty() {
        by_replica.entry(None).or_default().extend(damaged);
    }
    if let Some(mut first) = by_replica.first_entry() {
        first.get_mut().extend(empty);
    }
    by_replica
        .into_iter()
        .map(|(replica, files)| in_order(replica, files))
        .collect()
}

fn in_order(replica: Option<String>, mut files: Vec<(u64, usize, PathBuf)>) -> Chain {
    files.sort();
    Chain {
        replica,
        files: files.into_iter().map(|(_, _, f)| f).collect(),
    }
}

/// What `verify` found for one chain.
#[derive(Debug)]
pub struct Verified {
    pub chain: Chain,
    pub result: Result<Summary, VerifyError>,
}

/// Verifies each chain of `files` ([`chains`]) on its own: each starts at its own `seq`, and
/// every record in it must name its replica.
pub fn verify(files: Vec<PathBuf>) -> Vec<Verified> {
    chains(files)
        .into_iter()
        .map(|chain| Verified {
            result: chain::verify_files(&chain.files),
            chain,
        })
        .collect()
}
