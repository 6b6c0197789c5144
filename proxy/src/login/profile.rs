//! The engineer's own identity on their machine: `~/.jitgate/` (or `$JITGATE_HOME`), written
//! by `jitgate login` and read by every later command that needs a certificate when no flag
//! or environment variable names one. The directory is 0700, every file 0600.
//!
//! - `cert.pem`, `key.pem`: the certificate and its key (the key never left this machine);
//! - `ca.pem`: the proxy's CA, as pinned at the first login;
//! - `profile.json`: where the proxy is (`api`, `postgres`).

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

pub const CERT: &str = "cert.pem";
pub const KEY: &str = "key.pem";
pub const CA: &str = "ca.pem";
pub const SETTINGS: &str = "profile.json";

/// Where the proxy is, as the last login found it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    /// The control API, `HOST:PORT`.
    pub api: String,
    /// The PostgreSQL listener, `HOST:PORT`.
    pub postgres: String,
}

/// The profile directory: `$JITGATE_HOME`, else `$HOME/.jitgate`.
pub fn dir() -> Option<PathBuf> {
    if let Some(home) = std::env::var_os("JITGATE_HOME").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(home));
    }
    std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .map(|h| PathBuf::from(h).join(".jitgate"))
}

/// A file of the profile, when the profile has it.
pub fn file(name: &str) -> Option<PathBuf> {
    dir().map(|d| d.join(name)).filter(|p| p.exists())
}

/// The saved settings, when there are any.
pub fn settings() -> Option<Settings> {
    let text = std::fs::read_to_string(file(SETTINGS)?).ok()?;
    serde_json::from_str(&text).ok()
}

/// Writes `contents` to `dir/name` with mode 0600, through a temporary file and a rename, so
/// a reader never sees half a key.
fn write_private(dir: &Path, name: &str, contents: &str) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = dir.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name)).with_context(|| format!("cannot write {}", dir.join(name).display()))?;
    Ok(())
}

/// Saves a login's result; returns the directory.
pub fn save(cert: &str, key: &str, ca: &str, settings: &Settings) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = dir().context("no home directory: set HOME or JITGATE_HOME")?;
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot restrict {}", dir.display()))?;
    // The key first: a certificate is never saved beside a key that does not match it.
    write_private(&dir, KEY, key)?;
    write_private(&dir, CERT, cert)?;
    write_private(&dir, CA, ca)?;
    write_private(&dir, SETTINGS, &serde_json::to_string_pretty(settings)?)?;
    Ok(dir)
}

/// Removes the profile's files; returns those that were there.
pub fn remove() -> Result<Vec<PathBuf>> {
    let Some(dir) = dir() else {
        return Ok(Vec::new());
    };
    let mut removed = Vec::new();
    for name in [KEY, CERT, CA, SETTINGS] {
        let path = dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot remove {}", path.display())),
        }
    }
    // Only when nothing else was left in it.
    let _ = std::fs::remove_dir(&dir);
    Ok(removed)
}
