//! `jitgate recording list|show|export`, and the recordings check of `jitgate audit verify`.
//!
//! Shell recordings are found through the audit log, not the directory: each `session.end`
//! of an SSH session with shells names its recordings with their SHA-256, and the hash chain
//! covers those records. A recording whose bytes no longer hash to what the log says was
//! edited (or replaced); one that is gone is missing. Both fail `audit verify`, and `export`
//! refuses to hand out either.

use std::io::{BufRead as _, Read as _, Write as _};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use clap::{Args, Subcommand};
use serde_json::Value;

use crate::cli::AuditLogArgs;

/// One recording named by the audit log.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Recording {
    /// `seq` of the `session.end` record naming it.
    pub seq: u64,
    /// When the session ended.
    pub ended: String,
    pub session_id: String,
    pub user: String,
    pub target: String,
    pub grant_id: String,
    pub duration_ms: u64,
    pub file: PathBuf,
    pub sha256: String,
    pub bytes: u64,
}

impl Recording {
    /// The file name without `.cast`: `SESSION-N`.
    pub fn id(&self) -> String {
        self.file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Where the file is: as recorded, or by its name in `dir`.
    pub fn path(&self, dir: Option<&Path>) -> PathBuf {
        match (dir, self.file.file_name()) {
            (Some(dir), Some(name)) => dir.join(name),
            _ => self.file.clone(),
        }
    }
}

/// What a recording's file is now.
#[derive(Debug)]
pub enum State {
    Intact,
    Missing(std::io::Error),
    /// Its bytes hash to this, not to what the audit log says.
    Edited(String),
}

impl State {
    pub fn word(&self) -> &'static str {
        match self {
            Self::Intact => "intact",
            Self::Missing(_) => "MISSING",
            Self::Edited(_) => "EDITED",
        }
    }
}

/// The recordings named in the log's files (in chain order).
pub fn from_log(files: &[PathBuf]) -> Result<Vec<Recording>> {
    let mut out = Vec::new();
    for f in files {
        let reader = crate::audit::siblings::open(f).with_context(|| format!("{}", f.display()))?;
        for line in reader.split(b'\n') {
            let line = line.with_context(|| format!("{}", f.display()))?;
            // Cheap test first: most records name no recording.
            if !line.windows(14).any(|w| w == b"\"recordings\":[") {
                continue;
            }
            let Ok(v) = serde_json::from_slice::<Value>(&line) else {
                continue;
            };
            if v["event"] != "session.end" {
                continue;
            }
            let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
            for r in v["recordings"].as_array().into_iter().flatten() {
                out.push(Recording {
                    seq: v["seq"].as_u64().unwrap_or_default(),
                    ended: s("ts"),
                    session_id: s("session_id"),
                    user: s("user"),
                    target: s("target"),
                    grant_id: s("grant_id"),
                    duration_ms: v["duration_ms"].as_u64().unwrap_or_default(),
                    file: PathBuf::from(r["file"].as_str().unwrap_or_default()),
                    sha256: r["sha256"].as_str().unwrap_or_default().to_owned(),
                    bytes: r["bytes"].as_u64().unwrap_or_default(),
                });
            }
        }
    }
    Ok(out)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(hex(ctx.finish().as_ref()))
}

/// Hashes the recording's file and compares it with the audit log.
pub fn check(r: &Recording, dir: Option<&Path>) -> State {
    match sha256_file(&r.path(dir)) {
        Ok(hash) if hash == r.sha256 => State::Intact,
        Ok(hash) => State::Edited(hash),
        Err(e) => State::Missing(e),
    }
}

/// The problem `audit verify` reports for a recording that is not intact.
pub fn problem(r: &Recording, state: &State, dir: Option<&Path>) -> Option<String> {
    let what = format!(
        "recording {} (session {}, session.end seq {})",
        r.path(dir).display(),
        r.session_id,
        r.seq
    );
    match state {
        State::Intact => None,
        State::Missing(e) => Some(format!("{what}: missing: {e}")),
        State::Edited(hash) => Some(format!(
            "{what}: edited: its SHA-256 is {hash}, the audit log says {}",
            r.sha256
        )),
    }
}

#[derive(Debug, Subcommand)]
pub enum RecordingCommand {
    /// List the shell recordings the audit log names, oldest first, each with whether its
    /// file still matches the SHA-256 in the log.
    List {
        #[command(flatten)]
        at: Where,
        /// Print JSON (an array).
        #[arg(long)]
        json: bool,
    },
    /// Show one recording (by id SESSION-N, file name, or session id): who, where, when,
    /// its file and whether it is intact.
    Show {
        id: String,
        #[command(flatten)]
        at: Where,
    },
    /// Write a recording's asciicast v2 file to stdout (or --output FILE), for
    /// `asciinema play`; refused when the file does not match the audit log.
    Export {
        id: String,
        /// Write here instead of stdout (created; never overwritten).
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Only the terminal output, as text (what `asciinema cat` prints).
        #[arg(long)]
        text: bool,
        #[command(flatten)]
        at: Where,
    },
}

/// Which audit log names the recordings, and where their files are.
#[derive(Debug, Args)]
pub struct Where {
    #[command(flatten)]
    pub(crate) log: AuditLogArgs,
    /// Look for the files by name in DIR instead of where the audit log says they were
    /// written (recordings copied elsewhere).
    #[arg(long)]
    pub recordings: Option<PathBuf>,
}

fn find<'a>(all: &'a [Recording], id: &str) -> Result<&'a Recording> {
    let id = id.trim_end_matches(".cast");
    all.iter()
        .find(|r| r.id() == id)
        .or_else(|| all.iter().find(|r| r.session_id == id))
        .with_context(|| format!("no recording {id} in the audit log (jitgate recording list shows them)"))
}

pub fn run(command: RecordingCommand) -> Result<()> {
    let at = match &command {
        RecordingCommand::List { at, .. } | RecordingCommand::Show { at, .. } | RecordingCommand::Export { at, .. } => {
            at
        }
    };
    let all = from_log(&at.log.files()?)?;
    let dir = at.recordings.as_deref();
    let mut out = std::io::stdout().lock();
    match &command {
        RecordingCommand::List { json, .. } => {
            if *json {
                let rows: Vec<Value> = all
                    .iter()
                    .map(|r| {
                        let mut v = serde_json::to_value(r).unwrap_or(Value::Null);
                        v["id"] = r.id().into();
                        v["state"] = check(r, dir).word().to_lowercase().into();
                        v
                    })
                    .collect();
                writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?;
                return Ok(());
            }
            writeln!(out, "ID  USER  TARGET  ENDED  DURATION  BYTES  STATE")?;
            for r in &all {
                writeln!(
                    out,
                    "{}  {}  {}  {}  {}s  {}  {}",
                    r.id(),
                    r.user,
                    r.target,
                    r.ended,
                    r.duration_ms / 1000,
                    r.bytes,
                    check(r, dir).word()
                )?;
            }
        }
        RecordingCommand::Show { id, .. } => {
            let r = find(&all, id)?;
            let state = check(r, dir);
            writeln!(out, "id:       {}", r.id())?;
            writeln!(out, "session:  {} (grant {})", r.session_id, r.grant_id)?;
            writeln!(out, "user:     {}", r.user)?;
            writeln!(out, "target:   {}", r.target)?;
            writeln!(out, "ended:    {} after {}s", r.ended, r.duration_ms / 1000)?;
            writeln!(out, "file:     {}", r.path(dir).display())?;
            writeln!(out, "bytes:    {}", r.bytes)?;
            writeln!(out, "sha256:   {} (session.end seq {})", r.sha256, r.seq)?;
            match problem(r, &state, dir) {
                None => writeln!(out, "state:    intact")?,
                Some(p) => writeln!(out, "state:    {}", p)?,
            }
        }
        RecordingCommand::Export { id, output, text, .. } => {
            let r = find(&all, id)?;
            let path = r.path(dir);
            let bytes = std::fs::read(&path).with_context(|| format!("{}", path.display()))?;
            let hash = hex(ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref());
            if hash != r.sha256 {
                let p = problem(r, &State::Edited(hash), dir).unwrap_or_default();
                bail!("{p}; not exported");
            }
            let body = if *text { cast_text(&bytes) } else { bytes };
            match output {
                Some(file) => {
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(file)
                        .with_context(|| format!("{}", file.display()))?;
                    f.write_all(&body)?;
                    f.sync_all()?;
                }
                None => out.write_all(&body)?,
            }
        }
    }
    Ok(())
}

/// The output events of an asciicast, concatenated.
fn cast_text(bytes: &[u8]) -> Vec<u8> {
    let mut out = String::new();
    for line in bytes.split(|&b| b == b'\n').skip(1) {
        if let Ok(Value::Array(event)) = serde_json::from_slice::<Value>(line) {
            if event.get(1).and_then(Value::as_str) == Some("o") {
                out.push_str(event.get(2).and_then(Value::as_str).unwrap_or_default());
            }
        }
    }
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn recordings_are_read_from_session_end_records_and_checked_by_hash() {
        let dir = tempfile::tempdir().unwrap();
        let cast = dir.path().join("s-1-1.cast");
        std::fs::write(&cast, b"{\"version\":2}\n[0.1, \"o\", \"hi\"]\n").unwrap();
        let hash = sha256_file(&cast).unwrap();
        let log = dir.path().join("audit.jsonl");
        let record = serde_json::json!({
            "seq": 7, "event": "session.end", "session_id": "s-1", "user": "alice", "target": "web-1",
            "recordings": [{"file": cast.display().to_string(), "sha256": hash, "bytes": 30}],
        });
        std::fs::write(&log, format!("{{\"seq\":6,\"event\":\"statement\"}}\n{record}\n")).unwrap();
        let all = from_log(&[log]).unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!((all[0].id().as_str(), all[0].seq), ("s-1-1", 7));
        assert!(matches!(check(&all[0], None), State::Intact));
        assert_eq!(find(&all, "s-1").unwrap().id(), "s-1-1");
        assert_eq!(cast_text(&std::fs::read(&cast).unwrap()), b"hi");
        std::fs::write(&cast, b"{\"version\":2}\n[0.1, \"o\", \"ho\"]\n").unwrap();
        let state = check(&all[0], None);
        assert!(matches!(state, State::Edited(_)));
        assert!(problem(&all[0], &state, None).unwrap().contains("edited"));
        std::fs::remove_file(&cast).unwrap();
        assert!(matches!(check(&all[0], None), State::Missing(_)));
    }
}
