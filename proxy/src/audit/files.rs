//! Which files make up the log, and reading the ends of a file.
//!
//! The active file is `PATH` (`audit.path`); when it would pass `max_file_bytes`, it is renamed
//! to `PATH.<seq of its first record, 20 digits>`, so the rotated files sort in chain order by
//! name. A file set aside because it holds no chain (written before chaining existed) is
//! renamed to `PATH.unchained-<unix ms>` and is not part of the log. Files renamed by others
//! (logrotate) are found by [`super::siblings`].

use std::fs::File;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

/// Width of the zero-padded seq in rotated file names.
const SEQ_DIGITS: usize = 20;

/// `PATH.<first_seq>`.
pub fn rotated_path(active: &Path, first_seq: u64) -> PathBuf {
    let mut name = active.as_os_str().to_owned();
    name.push(format!(".{first_seq:0SEQ_DIGITS$}"));
    PathBuf::from(name)
}

/// `PATH.unchained-<unix ms>`.
pub fn unchained_path(active: &Path) -> PathBuf {
    let ms = crate::timefmt::to_millis(std::time::SystemTime::now());
    let mut name = active.as_os_str().to_owned();
    name.push(format!(".unchained-{ms}"));
    PathBuf::from(name)
}

/// The first seq encoded in `file`'s name if it is a rotated file of `active`.
pub fn rotated_seq(active: &Path, file: &Path) -> Option<u64> {
    let base = active.file_name()?.to_str()?;
    let name = file.file_name()?.to_str()?;
    let digits = name.strip_prefix(base)?.strip_prefix('.')?;
    if digits.len() != SEQ_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Rotated files of `active`, oldest first, with the seq their name carries.
pub fn rotated_files(active: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let dir = parent(active);
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = dir.join(entry?.file_name());
        if let Some(seq) = rotated_seq(active, &path) {
            files.push((seq, path));
        }
    }
    files.sort();
    Ok(files)
}

/// Every file of the log in chain order: the rotated files, then `active` if it exists.
pub fn chain_files(active: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = rotated_files(active)?.into_iter().map(|(_, p)| p).collect();
    if active.exists() {
        files.push(active.to_owned());
    }
    Ok(files)
}

const CHUNK: u64 = 1 << 16;

/// The last line of a file of `len` bytes: `(end of the last complete line, that line without
/// its newline)`. Bytes after the returned end are an incomplete line.
pub fn last_line(file: &File, len: u64) -> std::io::Result<(u64, Option<Vec<u8>>)> {
    let Some(last_nl) = rfind_newline(file, len)? else {
        return Ok((0, None));
    };
    let start = rfind_newline(file, last_nl)?.map_or(0, |p| p + 1);
    let mut line = vec![0; usize::try_from(last_nl - start).map_err(std::io::Error::other)?];
    file.read_exact_at(&mut line, start)?;
    Ok((last_nl + 1, Some(line)))
}

/// Position of the last `\n` before `end`.
fn rfind_newline(file: &File, end: u64) -> std::io::Result<Option<u64>> {
    let mut buf = vec![0; CHUNK as usize];
    let mut hi = end;
    while hi > 0 {
        let lo = hi.saturating_sub(CHUNK);
        let chunk = &mut buf[..(hi - lo) as usize];
        file.read_exact_at(chunk, lo)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            return Ok(Some(lo + i as u64));
        }
        hi = lo;
    }
    Ok(None)
}

/// The first line of `file` without its newline, if it has a complete one.
pub fn first_line(file: &File) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    let mut buf = vec![0; CHUNK as usize];
    let mut pos = 0;
    loop {
        let n = file.read_at(&mut buf, pos)?;
        if n == 0 {
            return Ok(None);
        }
        if let Some(i) = buf[..n].iter().position(|&b| b == b'\n') {
            line.extend_from_slice(&buf[..i]);
            return Ok(Some(line));
        }
        line.extend_from_slice(&buf[..n]);
        pos += n as u64;
    }
}

/// Reads from `file` at `pos` to its end, appending to `out`; returns the new position.
pub fn read_from(file: &mut File, pos: u64, out: &mut Vec<u8>) -> std::io::Result<u64> {
    file.seek(SeekFrom::Start(pos))?;
    let n = file.read_to_end(out)?;
    Ok(pos + n as u64)
}

/// Makes a rename or creation in `path`'s directory durable.
pub fn sync_parent(path: &Path) -> std::io::Result<()> {
    File::open(parent(path))?.sync_all()
}
