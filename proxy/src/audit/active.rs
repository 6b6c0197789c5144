//! The file the writer appends to: opened with its tail repaired, appended to a whole batch at
//! a time (or not at all), rotated and synced. Touched only under the writer's lock; the periodic
//! sync syncs a second handle of it ([`ActiveFile::sync_handle`]) with the lock released.
//!
//! After every append the path is checked to still name the open file (same device and inode,
//! so still linked, and not shorter than what was written): a log renamed, removed or
//! truncated behind the writer's back ([`AppendError::Moved`]) fails the batch, which is cut
//! back out of the old file where it still exists. One `stat` of the path per batch; the
//! open file is `fstat`ed only when the path no longer names it, to tell a removal from a
//! rename.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{FileExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use super::chain;
use super::event::ReopenReason;
use super::files;
use super::tip::Tip;

/// (device, inode) of a file.
pub type Ident = (u64, u64);

/// Why an append failed.
#[derive(Debug)]
pub enum AppendError {
    /// The write (or a rotation before it) failed.
    Io(std::io::Error),
    /// The path no longer names the file written to.
    Moved(ReopenReason),
}

impl From<std::io::Error> for AppendError {
    fn from(e: std::io::Error) -> Self {
        AppendError::Io(e)
    }
}

/// The active audit file.
pub struct ActiveFile {
    path: PathBuf,
    file: File,
    /// Bytes in the file, as far as this writer knows.
    len: u64,
    /// (device, inode) for regular files; `None` for devices and pipes, which are never read,
    /// checked, truncated or rotated.
    ident: Option<Ident>,
    /// Seq of the file's first record; `None` while the file is empty.
    first_seq: Option<u64>,
    /// Written since the last sync.
    unsynced: bool,
}

fn open_regular(path: &Path) -> std::io::Result<(File, Ident)> {
    let file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o640)
        .open(path)?;
    let m = file.metadata()?;
    Ok((file, (m.dev(), m.ino())))
}

impl ActiveFile {
    /// Opens `path` for appending (creating it if needed), cuts an incomplete last line left by
    /// a crash, and returns where the file's own chain ends (`None` when it holds no record,
    /// was set aside for holding no chain, or is a device).
    pub fn open(path: &Path) -> std::io::Result<(ActiveFile, Option<Tip>)> {
        let existed = match std::fs::metadata(path) {
            Ok(m) if !m.is_file() => {
                let file = OpenOptions::new().append(true).open(path)?;
                let active = ActiveFile {
                    path: path.to_owned(),
                    file,
                    len: 0,
                    ident: None,
                    first_seq: None,
                    unsynced: false,
                };
                return Ok((active, None));
            }
            Ok(_) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(e),
        };
        let (file, ident) = open_regular(path)?;
        if !existed {
            files::sync_parent(path)?;
        }
        let mut active = ActiveFile {
            path: path.to_owned(),
            len: file.metadata()?.len(),
            file,
            ident: Some(ident),
            first_seq: None,
            unsynced: false,
        };
        let tip = active.repair()?;
        Ok((active, tip))
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
            return Ok(Some(Tip::after(last.seq, last.hash)));
        }
        // Written before records were chained (or by something else): keep it out of the log.
        let to = files::unchained_path(&self.path);
        tracing::warn!(
            path = %self.path.display(),
            to = %to.display(),
            "audit log holds records without a hash chain; set aside, a chained file starts"
        );
        std::fs::rename(&self.path, &to)?;
        let (file, ident) = open_regular(&self.path)?;
        self.file = file;
        self.ident = Some(ident);
        files::sync_parent(&self.path)?;
        self.len = 0;
        Ok(None)
    }

    /// The file's last complete line, without its newline (`None` for an empty file or a
    /// device).
    pub fn last_line(&self) -> std::io::Result<Option<Vec<u8>>> {
        if !self.is_regular() || self.len == 0 {
            return Ok(None);
        }
        Ok(files::last_line(&self.file, self.len)?.1)
    }

    /// Whether this is a regular file (its chain can be read back).
    pub fn is_regular(&self) -> bool {
        self.ident.is_some()
    }

    /// (device, inode) of a regular file.
    pub fn ident(&self) -> Option<Ident> {
        self.ident
    }

    /// Whether appending `bytes` more would take a non-empty file past `max`.
    pub fn needs_rotation(&self, bytes: u64, max: u64) -> bool {
        self.is_regular() && self.len > 0 && self.len + bytes > max
    }

    /// Appends `buf` (whole lines, the first with `first_seq`) with one write, then checks that
    /// the path still names this file, whole. On failure no part of `buf` stays in the file
    /// where the writer can tell it is its own, and a file shortened by someone else is never
    /// extended.
    pub fn append(&mut self, buf: &[u8], first_seq: u64) -> Result<(), AppendError> {
        if let Err(error) = self.file.write_all(buf) {
            self.cut_back_to_len();
            return Err(AppendError::Io(error));
        }
        let Some(ident) = self.ident else {
            self.unsynced = true;
            return Ok(());
        };
        let expected = self.len + buf.len() as u64;
        let reason = match std::fs::metadata(&self.path) {
            // The path names the open file, so the file is linked.
            Ok(m) if (m.dev(), m.ino()) == ident && m.len() >= expected => {
                self.len = m.len();
                self.first_seq.get_or_insert(first_seq);
                self.unsynced = true;
                return Ok(());
            }
            Ok(m) if (m.dev(), m.ino()) == ident => ReopenReason::Truncated,
            Ok(_) => self.unlinked_or_renamed(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => self.unlinked_or_renamed(),
            Err(error) => {
                self.cut_back_to_len();
                return Err(AppendError::Io(error));
            }
        };
        if reason != ReopenReason::Deleted {
            self.cut_back_own(buf);
        }
        Err(AppendError::Moved(reason))
    }

    /// Why the path no longer names the open file: removed (no link left) or renamed.
    fn unlinked_or_renamed(&self) -> ReopenReason {
        match self.file.metadata() {
            Ok(m) if m.nlink() == 0 => ReopenReason::Deleted,
            _ => ReopenReason::Renamed,
        }
    }

    /// Whether the path still names this file, whole, without writing: `None` when it does
    /// (and always for devices).
    pub fn moved(&self) -> Option<ReopenReason> {
        let ident = self.ident?;
        match std::fs::metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == ident && m.len() >= self.len => None,
            Ok(m) if (m.dev(), m.ino()) == ident => Some(ReopenReason::Truncated),
            _ => Some(self.unlinked_or_renamed()),
        }
    }

    /// After a failed write: cuts the file back to its length before, only ever shortening it
    /// (a file truncated by someone else keeps its length; an incomplete line left at its end
    /// is cut when it is reopened).
    fn cut_back_to_len(&self) {
        if !self.is_regular() {
            return;
        }
        let cut = match self.file.metadata() {
            Ok(m) if m.len() > self.len => self.file.set_len(self.len),
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(error) = cut {
            tracing::error!(
                path = %self.path.display(),
                %error,
                "cannot cut a failed audit batch back out; the file is repaired when reopened"
            );
        }
    }

    /// After a write that landed in a file the path no longer names whole: removes `buf` from
    /// the end of the file if that is where it is, and touches nothing otherwise.
    fn cut_back_own(&self, buf: &[u8]) {
        let cut = (|| -> std::io::Result<bool> {
            let size = self.file.metadata()?.len();
            let Some(start) = size.checked_sub(buf.len() as u64) else {
                return Ok(false);
            };
            let mut tail = vec![0; buf.len()];
            self.file.read_exact_at(&mut tail, start)?;
            if tail != buf {
                return Ok(false);
            }
            self.file.set_len(start)?;
            Ok(true)
        })();
        match cut {
            Ok(true) => {}
            Ok(false) => tracing::warn!(
                path = %self.path.display(),
                "a refused audit batch is not at the end of the moved file; left as it is"
            ),
            Err(error) => tracing::error!(
                path = %self.path.display(),
                %error,
                "cannot cut a refused audit batch out of the moved file"
            ),
        }
    }

    /// Flushes written records to stable storage, then lets their pages go
    /// ([`drop_cached`]); a no-op when nothing was written since the last sync. Returns
    /// whether a sync ran.
    pub fn sync(&mut self) -> std::io::Result<bool> {
        if !self.unsynced {
            return Ok(false);
        }
        self.unsynced = false;
        if self.is_regular() {
            self.file.sync_data()?;
            drop_cached(&self.file, self.len);
        }
        Ok(true)
    }

    /// A second handle on the file to sync it with, outside the writer's lock, and the bytes
    /// that sync covers; `None` when nothing was written since the last sync, or for a pipe
    /// or device. Marks the file synced: the caller syncs the handle (and counts a failure).
    pub fn sync_handle(&mut self) -> std::io::Result<Option<(File, u64)>> {
        if !self.unsynced || !self.is_regular() {
            self.unsynced = false;
            return Ok(None);
        }
        let handle = self.file.try_clone()?;
        self.unsynced = false;
        Ok(Some((handle, self.len)))
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
        let (file, ident) = open_regular(&self.path)?;
        self.file = file;
        self.ident = Some(ident);
        self.len = 0;
        self.first_seq = None;
        files::sync_parent(&self.path)?;
        Ok(to)
    }
}

/// Lets the kernel drop the page cache of `file`'s first `synced` bytes (whole pages only: the
/// last one is still being appended to), after an `fsync` made them durable. The log is
/// written once and read rarely, so its pages would otherwise fill memory; reused, they also
/// spare every append the cost of a page the kernel has not handed out lately (zeroing it,
/// and on a VM with free page reporting, the host mapping it again). Advice only: a failure
/// changes nothing that was written.
pub fn drop_cached(file: &File, synced: u64) {
    const PAGE: u64 = 4096;
    if let Some(len) = std::num::NonZeroU64::new(synced / PAGE * PAGE) {
        if let Err(error) = rustix::fs::fadvise(file, 0, Some(len), rustix::fs::Advice::DontNeed) {
            tracing::debug!(%error, "cannot drop the synced audit log from the page cache");
        }
    }
}
