//! The file the writer appends to: opened with its tail repaired, appended to a whole batch at
//! a time (or not at all), rotated and synced. Only the writer thread touches it.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use super::chain::{self, Hash, GENESIS};
use super::files;

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
}

/// The active audit file.
pub struct ActiveFile {
    path: PathBuf,
    file: File,
    /// Bytes in the file, as far as this writer knows.
    len: u64,
    /// False for devices and pipes, which are never read, truncated or rotated.
    regular: bool,
    /// Seq of the file's first record; `None` while the file is empty.
    first_seq: Option<u64>,
    /// Written since the last sync.
    unsynced: bool,
}

fn open_regular(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o640)
        .open(path)
}

impl ActiveFile {
    /// Opens `path` for appending (creating it if needed), cuts an incomplete last line left by
    /// a crash, and returns where the chain continues: after the file's last record, or after
    /// the newest rotated file's when the file is empty.
    pub fn open(path: &Path) -> std::io::Result<(ActiveFile, Tip)> {
        let existed = match std::fs::metadata(path) {
            Ok(m) if !m.is_file() => {
                let file = OpenOptions::new().append(true).open(path)?;
                let active = ActiveFile {
                    path: path.to_owned(),
                    file,
                    len: 0,
                    regular: false,
                    first_seq: None,
                    unsynced: false,
                };
                return Ok((active, rotated_tip(path)?));
            }
            Ok(_) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(e),
        };
        let file = open_regular(path)?;
        if !existed {
            files::sync_parent(path)?;
        }
        let mut active = ActiveFile {
            path: path.to_owned(),
            len: file.metadata()?.len(),
            file,
            regular: true,
            first_seq: None,
            unsynced: false,
        };
        if let Some(tip) = active.repair()? {
            return Ok((active, tip));
        }
        Ok((active, rotated_tip(path)?))
    }

    /// Cuts an incomplete last line and reads where the file's chain ends; `None` when the
    /// file is empty (or was set aside for holding no chain).
    fn repair(&mut self) -> std::io::Result<Option<Tip>> {
        if self.len == 0 {
            return Ok(None);
        }
        let (end, last) = files::last_line(&self.file, self.len)?;
        if end < self.len {
            tracing::warn!(
                path = %self.path.display(),
                bytes = self.len - end,
                "audit log ends with an incomplete record, never acknowledged; cutting it"
            );
            self.file.set_len(end)?;
            self.file.sync_data()?;
            self.len = end;
        }
        let Some(last) = last else {
            return Ok(None);
        };
        let first = files::first_line(&self.file)?;
        let ends = chain::parse(&last)
            .ok()
            .zip(first.as_deref().and_then(|l| chain::parse(l).ok()));
        if let Some((last, first)) = ends {
            if !last.intact {
                tracing::warn!(
                    path = %self.path.display(),
                    seq = last.seq,
                    "last audit record does not match its hash; the chain continues after it and `jitgate audit verify` names it"
                );
            }
            self.first_seq = Some(first.seq);
            return Ok(Some(Tip {
                next_seq: last.seq.saturating_add(1),
                prev: last.hash,
            }));
        }
        // Written before records were chained (or by something else): keep it out of the log.
        let to = files::unchained_path(&self.path);
        tracing::warn!(
            path = %self.path.display(),
            to = %to.display(),
            "audit log holds records without a hash chain; set aside, a chained file starts"
        );
        std::fs::rename(&self.path, &to)?;
        self.file = open_regular(&self.path)?;
        files::sync_parent(&self.path)?;
        self.len = 0;
        Ok(None)
    }

    /// Whether this is a regular file (its chain can be read back).
    pub fn is_regular(&self) -> bool {
        self.regular
    }

    /// Whether appending `bytes` more would take a non-empty file past `max`.
    pub fn needs_rotation(&self, bytes: u64, max: u64) -> bool {
        self.regular && self.len > 0 && self.len + bytes > max
    }

    /// Appends `buf` (whole lines, the first with `first_seq`) with one write. On failure the
    /// file is cut back to its length before, so no part of `buf` stays.
    pub fn append(&mut self, buf: &[u8], first_seq: u64) -> std::io::Result<()> {
        match self.file.write_all(buf) {
            Ok(()) => {
                self.len += buf.len() as u64;
                self.first_seq.get_or_insert(first_seq);
                self.unsynced = true;
                Ok(())
            }
            Err(error) => {
                if self.regular {
                    if let Err(cut) = self.file.set_len(self.len) {
                        tracing::error!(
                            path = %self.path.display(),
                            error = %cut,
                            "cannot cut a failed audit batch back out; the file is repaired when reopened"
                        );
                    }
                }
                Err(error)
            }
        }
    }

    /// Flushes written records to stable storage; a no-op when nothing was written since the
    /// last sync. Returns whether a sync ran.
    pub fn sync(&mut self) -> std::io::Result<bool> {
        if !self.unsynced {
            return Ok(false);
        }
        self.unsynced = false;
        if self.regular {
            self.file.sync_data()?;
        }
        Ok(true)
    }

    /// Syncs the file, renames it to `PATH.<first seq>` and continues in a fresh `PATH`.
    pub fn rotate(&mut self) -> std::io::Result<PathBuf> {
        self.sync()?;
        let first = self
            .first_seq
            .ok_or_else(|| std::io::Error::other("an empty audit file is never rotated"))?;
        let to = files::rotated_path(&self.path, first);
        if to.exists() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("cannot rotate the audit log: {} already exists", to.display()),
            ));
        }
        std::fs::rename(&self.path, &to)?;
        self.file = open_regular(&self.path)?;
        self.len = 0;
        self.first_seq = None;
        files::sync_parent(&self.path)?;
        Ok(to)
    }
}

/// Where the chain continues after the newest rotated file of `active` (the genesis when
/// there is none).
fn rotated_tip(active: &Path) -> std::io::Result<Tip> {
    let Some((_, newest)) = files::rotated_files(active)?.pop() else {
        return Ok(Tip::GENESIS);
    };
    let file = File::open(&newest)?;
    let (_, last) = files::last_line(&file, file.metadata()?.len())?;
    let link = last.as_deref().and_then(|l| chain::parse(l).ok()).ok_or_else(|| {
        std::io::Error::other(format!(
            "{}: the last line is not a chained audit record, so the chain cannot continue; \
             restore the file or move it out of the way",
            newest.display()
        ))
    })?;
    Ok(Tip {
        next_seq: link.seq.saturating_add(1),
        prev: link.hash,
    })
}
