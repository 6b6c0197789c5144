//! What an SFTP channel did to which file, read from the packets relayed both ways.
//!
//! The client's requests are remembered by id; the server's answer completes them. An open
//! becomes a file (by its handle) that counts the bytes read and written through it; its
//! close is audited with those counts. Renames, removes, directories, links, attributes and
//! every extension that is not known to only read are audited with their paths and the
//! server's status. A file still open when the channel ends is audited as not closed.

use std::collections::HashMap;

use jitgate_protocol::sftp::{self, pflags, Extended, PathText, Request, Response};

/// Requests awaiting their answer, and files open, at most: an SFTP client pipelines 64 or so.
const MAX_PENDING: usize = 4096;
const MAX_OPEN: usize = 4096;

/// One audited file operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileOp {
    pub op: &'static str,
    pub path: String,
    pub to: Option<String>,
    /// For `open`: `read`, `write` or `read+write`, with `+create`, `+truncate`, `+append`,
    /// `+exclusive`.
    pub mode: Option<String>,
    /// The server's status (`ok`, `no_such_file`, `permission_denied`, ...), or `not_closed`.
    pub status: String,
    pub bytes_read: Option<u64>,
    pub bytes_written: Option<u64>,
}

impl FileOp {
    fn new(op: &'static str, path: &[u8], to: Option<&[u8]>) -> Self {
        Self {
            op,
            path: PathText(path).to_string(),
            to: to.map(|t| PathText(t).to_string()),
            mode: None,
            status: String::new(),
            bytes_read: None,
            bytes_written: None,
        }
    }
}

/// Why the relay ends an SFTP channel: it cannot audit what follows.
#[derive(Debug, thiserror::Error)]
pub enum TrackError {
    #[error(transparent)]
    Wire(#[from] sftp::Error),
    #[error("more than {MAX_PENDING} SFTP requests unanswered")]
    TooManyPending,
    #[error("more than {MAX_OPEN} SFTP files open")]
    TooManyOpen,
}

struct OpenFile {
    path: String,
    mode: String,
    read: u64,
    written: u64,
}

enum Pending {
    Open { path: Vec<u8>, mode: String },
    OpenDir,
    Read { handle: Vec<u8> },
    Write { handle: Vec<u8>, len: u64 },
    Close { handle: Vec<u8> },
    Copy { to: Vec<u8>, len: u64, op: FileOp },
    Op(FileOp),
}

/// Both directions of one SFTP channel.
#[derive(Default)]
pub struct Tracker {
    from_client: sftp::Framer,
    from_server: sftp::Framer,
    pending: HashMap<u32, Pending>,
    files: HashMap<Vec<u8>, OpenFile>,
    /// Directory handles: listed, not audited.
    dirs: HashMap<Vec<u8>, ()>,
}

fn open_mode(flags: u32) -> String {
    let mut mode = match (flags & pflags::READ != 0, flags & pflags::WRITE != 0) {
        (true, true) => "read+write",
        (false, true) => "write",
        _ => "read",
    }
    .to_owned();
    for (bit, name) in [
        (pflags::CREAT, "+create"),
        (pflags::TRUNC, "+truncate"),
        (pflags::APPEND, "+append"),
        (pflags::EXCL, "+exclusive"),
    ] {
        if flags & bit != 0 {
            mode.push_str(name);
        }
    }
    mode
}

impl Tracker {
    /// Bytes the client sent.
    pub fn client(&mut self, data: &[u8]) -> Result<(), TrackError> {
        self.from_client.push(data);
        while let Some(packet) = self.from_client.next_packet()? {
            let request = Request::parse(&packet)?;
            self.request(request)?;
        }
        Ok(())
    }

    /// Bytes the server sent; returns the operations they completed.
    pub fn server(&mut self, data: &[u8]) -> Result<Vec<FileOp>, TrackError> {
        self.from_server.push(data);
        let mut done = Vec::new();
        while let Some(packet) = self.from_server.next_packet()? {
            let response = Response::parse(&packet)?;
            self.response(response, &mut done)?;
        }
        Ok(done)
    }

    /// The channel ended: files still open are audited as not closed.
    pub fn finish(&mut self) -> Vec<FileOp> {
        let mut out: Vec<FileOp> = self
            .files
            .drain()
            .map(|(_, f)| FileOp {
                op: "close",
                path: f.path,
                to: None,
                mode: Some(f.mode),
                status: "not_closed".into(),
                bytes_read: Some(f.read),
                bytes_written: Some(f.written),
            })
            .collect();
        out.sort_by(|a, b| a.path.cmp(&b.path));
        out
    }

    fn remember(&mut self, id: u32, p: Pending) -> Result<(), TrackError> {
        if self.pending.len() >= MAX_PENDING {
            return Err(TrackError::TooManyPending);
        }
        self.pending.insert(id, p);
        Ok(())
    }

    fn request(&mut self, request: Request) -> Result<(), TrackError> {
        let (id, pending) = match request {
            Request::Init { .. } => return Ok(()),
            Request::Open { id, path, pflags } => (
                id,
                Pending::Open {
                    path,
                    mode: open_mode(pflags),
                },
            ),
            Request::Other { id: Some(id), kind: 11 } => (id, Pending::OpenDir),
            Request::Close { id, handle } => (id, Pending::Close { handle }),
            Request::Read { id, handle, .. } => (id, Pending::Read { handle }),
            Request::Write { id, handle, len } => (
                id,
                Pending::Write {
                    handle,
                    len: u64::from(len),
                },
            ),
            Request::Remove { id, path } => (id, Pending::Op(FileOp::new("remove", &path, None))),
            Request::Rename { id, from, to } => (id, Pending::Op(FileOp::new("rename", &from, Some(&to)))),
            Request::Mkdir { id, path } => (id, Pending::Op(FileOp::new("mkdir", &path, None))),
            Request::Rmdir { id, path } => (id, Pending::Op(FileOp::new("rmdir", &path, None))),
            Request::Setstat { id, path } => (id, Pending::Op(FileOp::new("setstat", &path, None))),
            Request::Fsetstat { id, handle } => {
                let path = self.handle_path(&handle);
                (id, Pending::Op(FileOp::new("setstat", path.as_bytes(), None)))
            }
            Request::Symlink { id, target, link } => (id, Pending::Op(FileOp::new("symlink", &link, Some(&target)))),
            Request::Extended { id, name, op } => match op {
                Extended::Rename { from, to } => (id, Pending::Op(FileOp::new("rename", &from, Some(&to)))),
                Extended::Hardlink { from, to } => (id, Pending::Op(FileOp::new("hardlink", &to, Some(&from)))),
                Extended::Lsetstat { path } => (id, Pending::Op(FileOp::new("setstat", &path, None))),
                Extended::CopyData { from, to, len } => {
                    let op = FileOp::new(
                        "copy",
                        self.handle_path(&from).as_bytes(),
                        Some(self.handle_path(&to).as_bytes()),
                    );
                    (id, Pending::Copy { to, len, op })
                }
                Extended::ReadOnly => return Ok(()),
                Extended::Unknown => (id, Pending::Op(FileOp::new("extended", name.as_bytes(), None))),
            },
            Request::Other { .. } => return Ok(()),
        };
        self.remember(id, pending)
    }

    fn handle_path(&self, handle: &[u8]) -> String {
        self.files
            .get(handle)
            .map_or_else(|| format!("(handle {})", PathText(handle)), |f| f.path.clone())
    }

    fn response(&mut self, response: Response, done: &mut Vec<FileOp>) -> Result<(), TrackError> {
        let (id, status, handle, data) = match response {
            Response::Status { id, code, .. } => (id, Some(code), None, None),
            Response::Handle { id, handle } => (id, None, Some(handle), None),
            Response::Data { id, len } => (id, None, None, Some(len)),
            Response::Version { .. } | Response::Other { .. } => return Ok(()),
        };
        let Some(pending) = self.pending.remove(&id) else {
            return Ok(());
        };
        let status_text = |code: Option<u32>| code.map_or("ok", sftp::status_name).to_owned();
        match pending {
            Pending::Open { path, mode } => {
                let mut op = FileOp::new("open", &path, None);
                op.mode = Some(mode.clone());
                op.status = status_text(status);
                if let Some(handle) = handle {
                    if self.files.len() >= MAX_OPEN {
                        return Err(TrackError::TooManyOpen);
                    }
                    self.files.insert(
                        handle,
                        OpenFile {
                            path: op.path.clone(),
                            mode,
                            read: 0,
                            written: 0,
                        },
                    );
                }
                done.push(op);
            }
            Pending::OpenDir => {
                if let Some(handle) = handle {
                    if self.dirs.len() >= MAX_OPEN {
                        return Err(TrackError::TooManyOpen);
                    }
                    self.dirs.insert(handle, ());
                }
            }
            Pending::Read { handle } => {
                if let (Some(len), Some(f)) = (data, self.files.get_mut(&handle)) {
                    f.read += len as u64;
                }
            }
            Pending::Write { handle, len } => {
                if let (Some(sftp::status::OK), Some(f)) = (status, self.files.get_mut(&handle)) {
                    f.written += len;
                }
            }
            Pending::Close { handle } => {
                if self.dirs.remove(&handle).is_some() {
                    return Ok(());
                }
                if let Some(f) = self.files.remove(&handle) {
                    done.push(FileOp {
                        op: "close",
                        path: f.path,
                        to: None,
                        mode: Some(f.mode),
                        status: status_text(status),
                        bytes_read: Some(f.read),
                        bytes_written: Some(f.written),
                    });
                }
            }
            Pending::Copy { to, len, mut op } => {
                op.status = status_text(status);
                if status == Some(sftp::status::OK) && len > 0 {
                    op.bytes_written = Some(len);
                    if let Some(f) = self.files.get_mut(&to) {
                        f.written += len;
                    }
                }
                done.push(op);
            }
            Pending::Op(mut op) => {
                op.status = status_text(status);
                done.push(op);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn packet(kind: u8, id: u32, fields: &[&[u8]]) -> Vec<u8> {
        let mut body = vec![kind];
        body.extend_from_slice(&id.to_be_bytes());
        for f in fields {
            body.extend_from_slice(f);
        }
        let mut out = (body.len() as u32).to_be_bytes().to_vec();
        out.extend(body);
        out
    }

    fn s(text: &[u8]) -> Vec<u8> {
        let mut out = (text.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(text);
        out
    }

    fn ok(id: u32) -> Vec<u8> {
        packet(101, id, &[&0u32.to_be_bytes(), &s(b"Success"), &s(b"")])
    }

    #[test]
    fn an_upload_is_an_open_for_write_and_a_close_with_its_bytes() {
        let mut t = Tracker::default();
        let flags = (pflags::WRITE | pflags::CREAT | pflags::TRUNC).to_be_bytes();
        t.client(&packet(3, 1, &[&s(b"/tmp/up"), &flags, &0u32.to_be_bytes()]))
            .unwrap();
        let opened = t.server(&packet(102, 1, &[&s(b"h0")])).unwrap();
        assert_eq!(opened[0].op, "open");
        assert_eq!(opened[0].mode.as_deref(), Some("write+create+truncate"));
        assert_eq!(opened[0].status, "ok");
        // Two pipelined writes, answered out of order; one refused.
        t.client(&packet(6, 2, &[&s(b"h0"), &0u64.to_be_bytes(), &s(&[7u8; 100])]))
            .unwrap();
        t.client(&packet(6, 3, &[&s(b"h0"), &100u64.to_be_bytes(), &s(&[7u8; 50])]))
            .unwrap();
        let mut answers = ok(3);
        answers.extend(packet(101, 2, &[&4u32.to_be_bytes(), &s(b"Failure"), &s(b"")]));
        assert!(t.server(&answers).unwrap().is_empty());
        t.client(&packet(4, 4, &[&s(b"h0")])).unwrap();
        let closed = t.server(&ok(4)).unwrap();
        assert_eq!(closed.len(), 1);
        assert_eq!((closed[0].op, closed[0].path.as_str()), ("close", "/tmp/up"));
        assert_eq!((closed[0].bytes_written, closed[0].bytes_read), (Some(50), Some(0)));
        assert!(t.finish().is_empty());
    }

    #[test]
    fn downloads_renames_removes_and_unknown_extensions_are_all_reported() {
        let mut t = Tracker::default();
        t.client(&packet(
            3,
            1,
            &[&s(b"/etc/hosts"), &pflags::READ.to_be_bytes(), &0u32.to_be_bytes()],
        ))
        .unwrap();
        t.server(&packet(102, 1, &[&s(b"7")])).unwrap();
        t.client(&packet(5, 2, &[&s(b"7"), &0u64.to_be_bytes(), &32768u32.to_be_bytes()]))
            .unwrap();
        t.server(&packet(103, 2, &[&s(&[1u8; 321])])).unwrap();
        t.client(&packet(
            200,
            3,
            &[&s(b"posix-rename@openssh.com"), &s(b"/a"), &s(b"/b")],
        ))
        .unwrap();
        t.client(&packet(13, 4, &[&s(b"/b")])).unwrap();
        t.client(&packet(200, 5, &[&s(b"sneaky@example.com"), &s(b"/c")]))
            .unwrap();
        t.client(&packet(11, 6, &[&s(b"/tmp")])).unwrap();
        let mut answers = ok(3);
        answers.extend(packet(101, 4, &[&2u32.to_be_bytes(), &s(b"No such file"), &s(b"")]));
        answers.extend(ok(5));
        answers.extend(packet(102, 6, &[&s(b"d1")]));
        let ops = t.server(&answers).unwrap();
        let seen: Vec<(&str, &str, Option<&str>, &str)> = ops
            .iter()
            .map(|o| (o.op, o.path.as_str(), o.to.as_deref(), o.status.as_str()))
            .collect();
        assert_eq!(
            seen,
            vec![
                ("rename", "/a", Some("/b"), "ok"),
                ("remove", "/b", None, "no_such_file"),
                ("extended", "sneaky@example.com", None, "ok"),
            ]
        );
        // The directory handle's close is not a file close; the file left open is reported.
        t.client(&packet(4, 7, &[&s(b"d1")])).unwrap();
        assert!(t.server(&ok(7)).unwrap().is_empty());
        let left = t.finish();
        assert_eq!(left.len(), 1);
        assert_eq!(
            (left[0].path.as_str(), left[0].status.as_str(), left[0].bytes_read),
            ("/etc/hosts", "not_closed", Some(321))
        );
    }

    #[test]
    fn a_flood_of_unanswered_requests_ends_the_channel() {
        let mut t = Tracker::default();
        let mut err = None;
        for id in 0..=MAX_PENDING as u32 {
            if let Err(e) = t.client(&packet(13, id, &[&s(b"/x")])) {
                err = Some(e);
                break;
            }
        }
        assert!(matches!(err, Some(TrackError::TooManyPending)));
    }
}
