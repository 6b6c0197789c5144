//! The files of one log wherever they came from: the proxy's own rotated files
//! (`PATH.<seq>`), and the names logrotate and people give them (`PATH.1`, `PATH.2.gz`,
//! `PATH-20261201`, `PATH-20261201.gz`, ...). They are found by name next to the active file,
//! read through gzip when they start with its magic bytes, and put in chain order by the `seq`
//! of their first record, never by name.
//!
//! Used by `jitgate audit verify` and, at start-up, to find the chain's tip when the active
//! file is missing or was renamed. Reads only; never runs on a tokio worker.

use std::fs::File;
use std::io::{BufRead, BufReader, Read as _};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;

use super::chain::{self, Link};
use super::tip::Tip;

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Whether `name` (a file name in the active file's directory) is a file of the log whose
/// active file is named `base`: `base` followed by `.` or `-` and anything, except the files
/// set aside for holding no chain (`.unchained-`).
fn is_sibling(base: &str, name: &str) -> bool {
    let Some(rest) = name.strip_prefix(base) else {
        return false;
    };
    (rest.starts_with('.') || rest.starts_with('-')) && rest.len() > 1 && !rest.starts_with(".unchained-")
}

/// Every file of the log whose active file is `active`, in chain order: the rotated ones
/// (the proxy's own and logrotate's, compressed or not), then `active` if it exists.
pub fn log_files(active: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = find(active)?;
    if active.exists() {
        files.push(active.to_owned());
    }
    Ok(chain_order(files))
}

/// The files next to `active` that belong to its log (not `active` itself), in no order.
pub fn find(active: &Path) -> std::io::Result<Vec<PathBuf>> {
    let dir = match active.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let Some(base) = active.file_name().and_then(|n| n.to_str()) else {
        return Ok(Vec::new());
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if is_sibling(base, name) && entry.file_type()?.is_file() {
            found.push(dir.join(name));
        }
    }
    Ok(found)
}

/// Whether `path` starts with gzip's magic bytes.
fn is_gzip(path: &Path) -> std::io::Result<bool> {
    let mut magic = [0u8; 2];
    let n = read_up_to(&mut File::open(path)?, &mut magic)?;
    Ok(n == 2 && magic == GZIP_MAGIC)
}

/// Opens `path` for reading lines, through gzip when it starts with gzip's magic bytes.
pub fn open(path: &Path) -> std::io::Result<Box<dyn BufRead + Send>> {
    let gzip = is_gzip(path)?;
    let file = File::open(path)?;
    if gzip {
        Ok(Box::new(BufReader::with_capacity(
            1 << 16,
            MultiGzDecoder::new(BufReader::new(file)),
        )))
    } else {
        Ok(Box::new(BufReader::with_capacity(1 << 16, file)))
    }
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// The `seq` of the first record of `path`; `None` when it is empty or does not start with a
/// chained record.
pub fn first_seq(path: &Path) -> std::io::Result<Option<u64>> {
    let mut line = Vec::new();
    open(path)?.read_until(b'\n', &mut line)?;
    Ok(chain::peek_seq(&line))
}

/// The last whole chained record of `path`: read from its end, or all of it when compressed
/// (gzip has no random access).
fn last_link(path: &Path) -> std::io::Result<Option<Link>> {
    if !is_gzip(path)? {
        let file = File::open(path)?;
        let (_, last) = super::files::last_line(&file, file.metadata()?.len())?;
        return Ok(last.and_then(|l| chain::parse(&l).ok()));
    }
    let mut reader = open(path)?;
    let mut line = Vec::new();
    let mut last = None;
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Ok(last);
        }
        if let Some(l) = line.strip_suffix(b"\n") {
            if let Ok(link) = chain::parse(l) {
                last = Some(link);
            }
        }
    }
}

/// `files` in chain order: by the `seq` of their first record; files without one (empty,
/// or not starting with a record) last, in the order given, so `verify` names them.
pub fn chain_order(files: Vec<PathBuf>) -> Vec<PathBuf> {
    let mut keyed: Vec<(u64, usize, PathBuf)> = files
        .into_iter()
        .enumerate()
        .map(|(i, f)| {
            let seq = first_seq(&f).ok().flatten().unwrap_or(u64::MAX);
            (seq, i, f)
        })
        .collect();
    keyed.sort();
    keyed.into_iter().map(|(_, _, f)| f).collect()
}

/// Where the chain continues after the newest file beside `active` (by first seq), if one
/// holds a chained record. Unreadable files are skipped with a warning.
pub fn newest_tip(active: &Path) -> std::io::Result<Option<Tip>> {
    let mut newest: Option<(u64, PathBuf)> = None;
    for f in find(active)? {
        match first_seq(&f) {
            Ok(Some(seq)) if newest.as_ref().is_none_or(|(s, _)| seq > *s) => newest = Some((seq, f)),
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(file = %f.display(), %error, "audit file beside the log cannot be read; skipped");
            }
        }
    }
    let Some((_, newest)) = newest else {
        return Ok(None);
    };
    match last_link(&newest) {
        Ok(link) => Ok(link.map(|l| Tip::after(l.seq, l.hash))),
        Err(error) => {
            tracing::warn!(file = %newest.display(), %error, "audit file beside the log cannot be read; skipped");
            Ok(None)
        }
    }
}
