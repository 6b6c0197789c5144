//! Errors from decoding PostgreSQL messages.

/// Why a byte sequence is not an acceptable PostgreSQL message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    /// The length field is below the smallest length the message can have (4 for a tagged
    /// message: the length field itself; 8 for a startup-phase message).
    #[error("message length {len} is below {min}")]
    TooShort { len: usize, min: usize },
    /// The length field is above the configured maximum.
    #[error("message length {len} is above {max}")]
    TooLong { len: usize, max: usize },
    /// A tagged frontend message whose type byte names no message a client may send after
    /// startup.
    #[error("invalid frontend message type {0}")]
    UnknownType(u8),
    /// The startup request code is not one this proxy knows.
    #[error("unsupported startup request code {0}")]
    UnknownRequestCode(i32),
    /// The body does not have the expected shape.
    #[error("malformed message: {0}")]
    Malformed(&'static str),
    /// The server sent an authentication exchange we cannot complete.
    #[error("authentication: {0}")]
    Auth(String),
}
