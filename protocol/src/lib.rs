//! Sans-I/O wire formats for jitgate.
//!
//! This crate owns the byte-level encodings the proxy speaks: PostgreSQL startup-phase
//! frontend messages, backend message framing, the `ErrorResponse`/`NoticeResponse` the proxy
//! sends itself, the client side of upstream authentication (SCRAM-SHA-256, md5), and the
//! classification of SQL text for guardrails and audit.
//! It contains no networking code: bytes in, typed values out, and back. The tokio adapters
//! live in the `jitgate` crate, where the sockets are. The one exception is [`tunnel`], the
//! agent link's hello and its HTTP/2 stream adapter, shared by the proxy and `jitgate-agent`
//! (it wraps `h2` streams; the sockets stay with its callers). [`sftp`] reads the SFTP packets
//! relayed over SSH, for the audit.

pub mod pin;
pub mod postgres;
pub mod sftp;
pub mod sql;
pub mod tunnel;
