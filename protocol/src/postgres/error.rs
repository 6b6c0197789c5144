//! Errors from decoding PostgreSQL messages.

/// Why a byte sequence is not an acceptable PostgreSQL message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    /// The length field is below the minimum or above the configured maximum.
    #[error("message length {len} is outside 4..={max}")]
    BadLength { len: usize, max: usize },
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
