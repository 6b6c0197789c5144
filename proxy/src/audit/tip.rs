//! Where the chain continues ([`Tip`]), and the small tip file that remembers it outside the
//! log (`DATA_DIR/audit.tip`), so a restart continues the chain even when the log files were
//! renamed, compressed, moved to another directory or deleted behind the proxy's back.
//!
//! The tip file is one fixed-length line, `jitgate-audit-tip 1 <seq, 20 digits> <hash> <check>`,
//! rewritten in place with one `pwrite` (by the writer thread after each timed sync, at
//! rotation and reopen, and synced at close). `check` is the first 16 hex digits of the
//! SHA-256 of what comes before it, so a torn write is ignored rather than believed. It is a
//! hint that may lag by up to `audit.fsync_interval`: at start-up the chain continues after
//! the highest `seq` found in it, the active file and the files beside it.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::chain::{self, Hash, GENESIS};

/// Where the chain continues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tip {
    pub next_seq: u64,
    pub prev: Hash,
}

impl Tip {
    /// The start of a new log.
    pub const GENESIS: Tip = Tip {
        next_seq: 1,
        prev: GENESIS,
    };

    /// The tip after a record with `seq` and `hash`.
    pub fn after(seq: u64, hash: Hash) -> Tip {
        Tip {
            next_seq: seq.saturating_add(1),
            prev: hash,
        }
    }

    /// The later of two tips (the one with more records behind it).
    pub fn max(self, other: Option<Tip>) -> Tip {
        match other {
            Some(o) if o.next_seq > self.next_seq => o,
            _ => self,
        }
    }
}

const MAGIC: &str = "jitgate-audit-tip 1 ";
/// `MAGIC` + 20 digits + space + 64 hex + space + 16 hex + newline.
const LEN: usize = MAGIC.len() + 20 + 1 + 64 + 1 + 16 + 1;

/// The open tip file.
pub struct TipFile {
    path: PathBuf,
    file: File,
    /// The tip last written, so an unchanged tip costs nothing.
    written: Option<Tip>,
}

impl TipFile {
    /// Opens (creating) the tip file.
    pub fn open(path: &Path) -> std::io::Result<TipFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o640)
            .open(path)?;
        Ok(TipFile {
            path: path.to_owned(),
            file,
            written: None,
        })
    }

    /// The tip recorded in the file, if it holds a whole, intact one.
    pub fn read(&self) -> Option<Tip> {
        let mut buf = [0u8; LEN];
        let n = self.file.read_at(&mut buf, 0).ok()?;
        let tip = decode(buf.get(..n)?);
        if tip.is_none() && n > 0 {
            tracing::warn!(path = %self.path.display(), "audit tip file is unreadable; ignored");
        }
        tip
    }

    /// Records `tip` (no-op when it is the one last written).
    pub fn write(&mut self, tip: Tip) -> std::io::Result<()> {
        if self.written == Some(tip) || tip.next_seq <= 1 {
            return Ok(());
        }
        self.file.write_all_at(encode(tip).as_bytes(), 0)?;
        self.written = Some(tip);
        Ok(())
    }

    /// Flushes the tip to stable storage.
    pub fn sync(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }
}

fn check(text: &str) -> String {
    chain::hex(&Sha256::digest(text.as_bytes()).into())[..16].to_owned()
}

/// The line for `tip` (which has at least one record behind it).
pub fn encode(tip: Tip) -> String {
    let head = format!(
        "{MAGIC}{:020} {}",
        tip.next_seq.saturating_sub(1),
        chain::hex(&tip.prev)
    );
    let sum = check(&head);
    format!("{head} {sum}\n")
}

/// The tip in a tip-file line, if it is whole and intact.
pub fn decode(bytes: &[u8]) -> Option<Tip> {
    let text = std::str::from_utf8(bytes).ok()?;
    if text.len() != LEN || !text.ends_with('\n') {
        return None;
    }
    let (head, sum) = text[..LEN - 1].rsplit_once(' ')?;
    if check(head) != sum {
        return None;
    }
    let mut fields = head.strip_prefix(MAGIC)?.split(' ');
    let seq: u64 = fields.next()?.parse().ok()?;
    let hash = chain::parse_hash(fields.next()?.as_bytes())?;
    (seq > 0).then(|| Tip::after(seq, hash))
}
