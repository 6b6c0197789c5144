//! Shell recordings: asciicast v2 files (<https://docs.asciinema.org/manual/asciicast/v2/>)
//! under `DATA_DIR/recordings/`, one per shell channel.
//!
//! The first line is the header (terminal size, start time, `TERM`, who and where); each
//! further line is one event, `[seconds, "o", text]` for output, `"i"` for input (only with
//! `[ssh] record_input`), `"r"` for a resize to `COLSxROWS`. Text is UTF-8: a character split
//! between two chunks is held until its rest arrives, and bytes that are not UTF-8 become
//! U+FFFD. The SHA-256 of the bytes written is computed as they are written, and named in the
//! session's `session.end` record with the file, so the audit log's hash chain covers it.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tokio::io::AsyncWriteExt as _;

use crate::audit::RecordingRef;

/// What the header says about the session.
pub struct Header<'a> {
    pub width: u32,
    pub height: u32,
    pub term: &'a str,
    pub title: String,
}

/// One recording being written.
pub struct Recorder {
    file: tokio::io::BufWriter<tokio::fs::File>,
    path: PathBuf,
    hash: ring::digest::Context,
    bytes: u64,
    started: Instant,
    record_input: bool,
    /// The start of a character cut off at the end of the last chunk, per stream.
    carry_out: Vec<u8>,
    carry_in: Vec<u8>,
    line: Vec<u8>,
}

impl Recorder {
    /// Creates `dir/name` (never overwriting, mode 0600) and writes the header.
    pub async fn create(dir: &Path, name: &str, header: Header<'_>, record_input: bool) -> io::Result<Self> {
        let path = dir.join(name);
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .await?;
        let mut r = Self {
            file: tokio::io::BufWriter::with_capacity(16 * 1024, file),
            path,
            hash: ring::digest::Context::new(&ring::digest::SHA256),
            bytes: 0,
            started: Instant::now(),
            record_input,
            carry_out: Vec::new(),
            carry_in: Vec::new(),
            line: Vec::new(),
        };
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let head = serde_json::json!({
            "version": 2,
            // A pty request without a size (ssh -tt from a pipe) gets a terminal's usual
            // 80x24: players lay the text out by these.
            "width": if header.width == 0 { 80 } else { header.width },
            "height": if header.height == 0 { 24 } else { header.height },
            "timestamp": timestamp,
            "title": header.title,
            "env": {"TERM": header.term},
        });
        let mut line = head.to_string().into_bytes();
        line.push(b'\n');
        r.write(&line).await?;
        Ok(r)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.hash.update(bytes);
        self.bytes += bytes.len() as u64;
        self.file.write_all(bytes).await
    }

    async fn event(&mut self, code: &str, text: &str) -> io::Result<()> {
        let mut line = std::mem::take(&mut self.line);
        line.clear();
        let t = self.started.elapsed().as_secs_f64();
        line.extend_from_slice(format!("[{t:.6}, ").as_bytes());
        serde_json::to_writer(&mut line, code).map_err(io::Error::other)?;
        line.extend_from_slice(b", ");
        serde_json::to_writer(&mut line, text).map_err(io::Error::other)?;
        line.extend_from_slice(b"]\n");
        let r = self.write(&line).await;
        self.line = line;
        r
    }

    /// Terminal output (the target's, and the proxy's own lines).
    pub async fn output(&mut self, data: &[u8]) -> io::Result<()> {
        let text = decode(&mut self.carry_out, data);
        if text.is_empty() {
            return Ok(());
        }
        self.event("o", &text).await
    }

    /// Keystrokes; written only with `record_input`.
    pub async fn input(&mut self, data: &[u8]) -> io::Result<()> {
        if !self.record_input {
            return Ok(());
        }
        let text = decode(&mut self.carry_in, data);
        if text.is_empty() {
            return Ok(());
        }
        self.event("i", &text).await
    }

    /// A window-size change.
    pub async fn resize(&mut self, cols: u32, rows: u32) -> io::Result<()> {
        self.event("r", &format!("{cols}x{rows}")).await
    }

    /// Flushes and syncs the file; returns what `session.end` names.
    pub async fn finish(mut self) -> io::Result<RecordingRef> {
        let carry = std::mem::take(&mut self.carry_out);
        if !carry.is_empty() {
            self.event("o", &String::from_utf8_lossy(&carry)).await?;
        }
        self.file.flush().await?;
        self.file.get_ref().sync_all().await?;
        let digest = self.hash.finish();
        Ok(RecordingRef {
            file: self.path.display().to_string(),
            sha256: digest.as_ref().iter().map(|b| format!("{b:02x}")).collect(),
            bytes: self.bytes,
        })
    }
}

/// `carry` and `data` as text; an incomplete character at the end stays in `carry`.
fn decode(carry: &mut Vec<u8>, data: &[u8]) -> String {
    carry.extend_from_slice(data);
    let mut out = String::with_capacity(carry.len());
    let mut rest: &[u8] = carry;
    loop {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                out.push_str(s);
                rest = &[];
                break;
            }
            Err(e) => {
                let (valid, tail) = rest.split_at(e.valid_up_to());
                out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                match e.error_len() {
                    Some(n) => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        rest = &tail[n..];
                    }
                    None => {
                        rest = tail;
                        break;
                    }
                }
            }
        }
    }
    let kept = rest.to_vec();
    *carry = kept;
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn characters_split_between_chunks_come_out_whole() {
        let mut carry = Vec::new();
        let euro = "€".as_bytes();
        assert_eq!(decode(&mut carry, &[b'a', euro[0]]), "a");
        assert_eq!(decode(&mut carry, &euro[1..2]), "");
        assert_eq!(decode(&mut carry, &[euro[2], b'b']), "€b");
        assert!(carry.is_empty());
        assert_eq!(decode(&mut carry, b"x\xffy"), "x\u{fffd}y");
    }

    #[tokio::test]
    async fn a_recording_is_an_asciicast_whose_hash_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let header = Header {
            width: 80,
            height: 24,
            term: "xterm",
            title: "t".into(),
        };
        let mut r = Recorder::create(dir.path(), "a.cast", header, false).await.unwrap();
        r.output(b"hello \x1b[1mworld\x1b[0m\r\n").await.unwrap();
        r.input(b"secret").await.unwrap();
        r.resize(100, 30).await.unwrap();
        let done = r.finish().await.unwrap();
        let bytes = std::fs::read(dir.path().join("a.cast")).unwrap();
        let want: String = ring::digest::digest(&ring::digest::SHA256, &bytes)
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!((done.sha256, done.bytes), (want, bytes.len() as u64));
        let text = String::from_utf8(bytes).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines[0]["version"], 2);
        assert_eq!(lines[1][1], "o");
        assert_eq!(lines[1][2], "hello \u{1b}[1mworld\u{1b}[0m\r\n");
        // Input is not recorded unless asked for.
        assert_eq!(lines[2][1], "r");
        assert_eq!(lines.len(), 3);
        assert!(Recorder::create(
            dir.path(),
            "a.cast",
            Header {
                width: 1,
                height: 1,
                term: "",
                title: String::new()
            },
            false
        )
        .await
        .is_err());
    }
}
