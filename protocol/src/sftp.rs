//! SFTP (draft-ietf-secsh-filexfer-02, version 3, as OpenSSH speaks it), read while relayed.
//!
//! The proxy does not answer SFTP itself: it relays the subsystem's bytes to the target's
//! `sftp-server` and reads both directions to audit what happened to which file. [`Framer`]
//! cuts one direction's byte stream into packets; [`Request`] and [`Response`] decode the
//! packets the audit needs and leave every other packet as [`Request::Other`] /
//! [`Response::Other`], relayed unread.
//!
//! Packets are `uint32 length, byte type, payload`; every request but `INIT` carries a
//! `uint32 id` that the server's answer repeats.

use std::fmt;

/// Longest packet either side may send. OpenSSH's `sftp-server` refuses more than 256 KiB;
/// a longer one cannot be audited whole, so the relay ends the channel instead.
pub const MAX_PACKET: usize = 256 * 1024 + 1024;

/// Why a byte stream is not SFTP.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("SFTP packet of {0} bytes is longer than {MAX_PACKET}")]
    TooLong(usize),
    #[error("empty SFTP packet")]
    Empty,
    #[error("SFTP packet type {0} is cut short")]
    Short(u8),
}

/// Cuts one direction's bytes into whole packets (type byte and payload, without the length).
#[derive(Debug, Default)]
pub struct Framer {
    buf: Vec<u8>,
}

impl Framer {
    /// Appends bytes as they arrive.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next whole packet, if one has arrived.
    pub fn next_packet(&mut self) -> Result<Option<Vec<u8>>, Error> {
        let Some(len) = self.buf.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        if len == 0 {
            return Err(Error::Empty);
        }
        if len > MAX_PACKET {
            return Err(Error::TooLong(len));
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let packet = self.buf[4..4 + len].to_vec();
        self.buf.drain(..4 + len);
        Ok(Some(packet))
    }

    /// Bytes held for an unfinished packet.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// `SSH_FXF_*` open flags.
pub mod pflags {
    pub const READ: u32 = 0x01;
    pub const WRITE: u32 = 0x02;
    pub const APPEND: u32 = 0x04;
    pub const CREAT: u32 = 0x08;
    pub const TRUNC: u32 = 0x10;
    pub const EXCL: u32 = 0x20;
}

/// A client request the audit reads. Paths and handles are the bytes sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Init {
        version: u32,
    },
    Open {
        id: u32,
        path: Vec<u8>,
        pflags: u32,
    },
    Close {
        id: u32,
        handle: Vec<u8>,
    },
    Read {
        id: u32,
        handle: Vec<u8>,
        len: u32,
    },
    Write {
        id: u32,
        handle: Vec<u8>,
        len: u32,
    },
    Remove {
        id: u32,
        path: Vec<u8>,
    },
    Rename {
        id: u32,
        from: Vec<u8>,
        to: Vec<u8>,
    },
    Mkdir {
        id: u32,
        path: Vec<u8>,
    },
    Rmdir {
        id: u32,
        path: Vec<u8>,
    },
    Setstat {
        id: u32,
        path: Vec<u8>,
    },
    Fsetstat {
        id: u32,
        handle: Vec<u8>,
    },
    /// OpenSSH sends the link's target first, then the link's own path.
    Symlink {
        id: u32,
        target: Vec<u8>,
        link: Vec<u8>,
    },
    /// `SSH_FXP_EXTENDED`: `name` and, for the extensions that change files, their paths.
    Extended {
        id: u32,
        name: String,
        op: Extended,
    },
    /// Any other request (stat, realpath, readdir, ...): relayed unread, answered by `id`.
    Other {
        id: Option<u32>,
        kind: u8,
    },
}

/// What an `SSH_FXP_EXTENDED` request does, for the ones that change files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Extended {
    /// `posix-rename@openssh.com` (what OpenSSH's `sftp rename` sends).
    Rename { from: Vec<u8>, to: Vec<u8> },
    /// `hardlink@openssh.com`.
    Hardlink { from: Vec<u8>, to: Vec<u8> },
    /// `copy-data` (`sftp cp`): from one open handle into another.
    CopyData { from: Vec<u8>, to: Vec<u8>, len: u64 },
    /// `lsetstat@openssh.com`.
    Lsetstat { path: Vec<u8> },
    /// `fsync@openssh.com`, `statvfs@openssh.com`, `limits@openssh.com`, `expand-path@openssh.com`,
    /// `home-directory`, `users-groups-by-id@openssh.com`: read only.
    ReadOnly,
    /// An extension the proxy does not know: audited by name.
    Unknown,
}

/// A server answer the audit reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Version { version: u32 },
    Status { id: u32, code: u32, message: String },
    Handle { id: u32, handle: Vec<u8> },
    Data { id: u32, len: usize },
    Other { id: Option<u32>, kind: u8 },
}

/// `SSH_FX_*` status codes.
pub mod status {
    pub const OK: u32 = 0;
    pub const EOF: u32 = 1;
}

/// The name of a status code, for the audit.
pub fn status_name(code: u32) -> &'static str {
    match code {
        0 => "ok",
        1 => "eof",
        2 => "no_such_file",
        3 => "permission_denied",
        4 => "failure",
        5 => "bad_message",
        6 => "no_connection",
        7 => "connection_lost",
        8 => "op_unsupported",
        _ => "error",
    }
}

struct Reader<'a> {
    kind: u8,
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(packet: &'a [u8]) -> Result<Self, Error> {
        let (&kind, rest) = packet.split_first().ok_or(Error::Empty)?;
        Ok(Self { kind, rest })
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        if self.rest.len() < n {
            return Err(Error::Short(self.kind));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u32(&mut self) -> Result<u32, Error> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, Error> {
        let hi = u64::from(self.u32()?);
        Ok(hi << 32 | u64::from(self.u32()?))
    }

    fn bytes(&mut self) -> Result<&'a [u8], Error> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    fn string(&mut self) -> Result<Vec<u8>, Error> {
        self.bytes().map(<[u8]>::to_vec)
    }
}

impl Request {
    /// Decodes one client packet (as [`Framer::next_packet`] returns it).
    pub fn parse(packet: &[u8]) -> Result<Self, Error> {
        let mut r = Reader::new(packet)?;
        if r.kind == 1 {
            return Ok(Self::Init { version: r.u32()? });
        }
        let id = r.u32()?;
        Ok(match r.kind {
            3 => {
                let path = r.string()?;
                Self::Open {
                    id,
                    path,
                    pflags: r.u32()?,
                }
            }
            4 => Self::Close {
                id,
                handle: r.string()?,
            },
            5 => {
                let handle = r.string()?;
                r.u64()?;
                Self::Read {
                    id,
                    handle,
                    len: r.u32()?,
                }
            }
            6 => {
                let handle = r.string()?;
                r.u64()?;
                let len = u32::try_from(r.bytes()?.len()).unwrap_or(u32::MAX);
                Self::Write { id, handle, len }
            }
            9 => Self::Setstat { id, path: r.string()? },
            10 => Self::Fsetstat {
                id,
                handle: r.string()?,
            },
            13 => Self::Remove { id, path: r.string()? },
            14 => Self::Mkdir { id, path: r.string()? },
            15 => Self::Rmdir { id, path: r.string()? },
            18 => {
                let from = r.string()?;
                Self::Rename {
                    id,
                    from,
                    to: r.string()?,
                }
            }
            20 => {
                let target = r.string()?;
                Self::Symlink {
                    id,
                    target,
                    link: r.string()?,
                }
            }
            200 => {
                let name = String::from_utf8_lossy(r.bytes()?).into_owned();
                let op = match name.as_str() {
                    "posix-rename@openssh.com" => {
                        let from = r.string()?;
                        Extended::Rename { from, to: r.string()? }
                    }
                    "hardlink@openssh.com" => {
                        let from = r.string()?;
                        Extended::Hardlink { from, to: r.string()? }
                    }
                    "copy-data" => {
                        let from = r.string()?;
                        r.u64()?;
                        let len = r.u64()?;
                        Extended::CopyData {
                            from,
                            to: r.string()?,
                            len,
                        }
                    }
                    "lsetstat@openssh.com" => Extended::Lsetstat { path: r.string()? },
                    "fsync@openssh.com"
                    | "statvfs@openssh.com"
                    | "fstatvfs@openssh.com"
                    | "limits@openssh.com"
                    | "expand-path@openssh.com"
                    | "home-directory"
                    | "users-groups-by-id@openssh.com" => Extended::ReadOnly,
                    _ => Extended::Unknown,
                };
                Self::Extended { id, name, op }
            }
            kind => Self::Other { id: Some(id), kind },
        })
    }
}

impl Response {
    /// Decodes one server packet.
    pub fn parse(packet: &[u8]) -> Result<Self, Error> {
        let mut r = Reader::new(packet)?;
        if r.kind == 2 {
            return Ok(Self::Version { version: r.u32()? });
        }
        let id = r.u32()?;
        Ok(match r.kind {
            101 => {
                let code = r.u32()?;
                // The message is optional in practice (version 3 servers send it; be lenient).
                let message = r
                    .bytes()
                    .map(|m| String::from_utf8_lossy(m).into_owned())
                    .unwrap_or_default();
                Self::Status { id, code, message }
            }
            102 => Self::Handle {
                id,
                handle: r.string()?,
            },
            103 => Self::Data {
                id,
                len: r.bytes()?.len(),
            },
            kind => Self::Other { id: Some(id), kind },
        })
    }
}

/// A path as the audit writes it: UTF-8 as is, other bytes as `\xNN`.
pub struct PathText<'a>(pub &'a [u8]);

impl fmt::Display for PathText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for chunk in self.0.utf8_chunks() {
            for c in chunk.valid().chars() {
                if c.is_control() {
                    write!(f, "{}", c.escape_default())?;
                } else {
                    write!(f, "{c}")?;
                }
            }
            for b in chunk.invalid() {
                write!(f, "\\x{b:02x}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn packet(kind: u8, fields: &[&[u8]]) -> Vec<u8> {
        let mut body = vec![kind];
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

    #[test]
    fn packets_split_anywhere_come_out_whole_and_in_order() {
        let mut stream = packet(
            3,
            &[
                &7u32.to_be_bytes(),
                &s(b"/tmp/a"),
                &0x1au32.to_be_bytes(),
                &0u32.to_be_bytes(),
            ],
        );
        stream.extend(packet(18, &[&8u32.to_be_bytes(), &s(b"/tmp/a"), &s(b"/tmp/b")]));
        for cut in 0..stream.len() {
            let mut f = Framer::default();
            let mut got = Vec::new();
            for part in [&stream[..cut], &stream[cut..]] {
                f.push(part);
                while let Some(p) = f.next_packet().unwrap() {
                    got.push(Request::parse(&p).unwrap());
                }
            }
            assert_eq!(
                got,
                vec![
                    Request::Open {
                        id: 7,
                        path: b"/tmp/a".to_vec(),
                        pflags: pflags::WRITE | pflags::CREAT | pflags::TRUNC
                    },
                    Request::Rename {
                        id: 8,
                        from: b"/tmp/a".to_vec(),
                        to: b"/tmp/b".to_vec()
                    }
                ],
                "cut at {cut}"
            );
            assert_eq!(f.pending(), 0);
        }
    }

    #[test]
    fn the_openssh_extensions_that_change_files_are_read() {
        let p = packet(
            200,
            &[&9u32.to_be_bytes(), &s(b"posix-rename@openssh.com"), &s(b"x"), &s(b"y")],
        );
        let mut f = Framer::default();
        f.push(&p);
        let got = Request::parse(&f.next_packet().unwrap().unwrap()).unwrap();
        assert_eq!(
            got,
            Request::Extended {
                id: 9,
                name: "posix-rename@openssh.com".into(),
                op: Extended::Rename {
                    from: b"x".to_vec(),
                    to: b"y".to_vec()
                }
            }
        );
        let p = packet(200, &[&1u32.to_be_bytes(), &s(b"evil@example.com"), &s(b"x")]);
        f.push(&p);
        let got = Request::parse(&f.next_packet().unwrap().unwrap()).unwrap();
        assert!(matches!(
            got,
            Request::Extended {
                op: Extended::Unknown,
                ..
            }
        ));
    }

    #[test]
    fn bad_streams_are_errors_not_panics() {
        let mut f = Framer::default();
        f.push(&u32::MAX.to_be_bytes());
        assert_eq!(f.next_packet(), Err(Error::TooLong(u32::MAX as usize)));
        let mut f = Framer::default();
        f.push(&0u32.to_be_bytes());
        assert_eq!(f.next_packet(), Err(Error::Empty));
        // A string whose length runs past the packet.
        let p = [3u8, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff, b'a'];
        assert_eq!(Request::parse(&p), Err(Error::Short(3)));
        assert_eq!(Response::parse(&[103, 0, 0, 0, 1, 0, 0, 9]), Err(Error::Short(103)));
        assert_eq!(Request::parse(&[]), Err(Error::Empty));
    }

    #[test]
    fn paths_in_the_audit_keep_every_byte_visible() {
        assert_eq!(PathText(b"/tmp/caf\xc3\xa9").to_string(), "/tmp/caf\u{e9}");
        assert_eq!(PathText(b"/tmp/a\xffb\n").to_string(), "/tmp/a\\xffb\\n");
    }
}
