//! How the proxy reaches a target: a [`Dialer`] opens a byte stream to a target: TCP to its
//! address, or a stream of its agent's link (`crate::agents`), behind the same trait. What runs over the stream (PostgreSQL's
//! `SSLRequest` and TLS, SSH) is the data path's business, not the dialer's.

use std::io;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::config::Target;

/// A bidirectional byte stream to a target.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// An open stream to a target, whatever carries it.
pub type BoxedIo = Box<dyn Io>;

/// Opens streams to targets. Only a [`Lease`](super::Lease) calls it, with its own target's
/// address, so nothing reaches a target without a live grant for it.
#[async_trait]
pub trait Dialer: Send + Sync + std::fmt::Debug {
    /// A stream to `target`.
    async fn dial(&self, target: &Target) -> io::Result<BoxedIo>;
}

/// Plain TCP, with Nagle off.
#[derive(Debug, Default, Clone, Copy)]
pub struct TcpDialer;

#[async_trait]
impl Dialer for TcpDialer {
    async fn dial(&self, target: &Target) -> io::Result<BoxedIo> {
        let tcp = TcpStream::connect(&target.address).await?;
        // Disabling Nagle is an optimisation only; a failure changes nothing else.
        let _ = tcp.set_nodelay(true);
        Ok(Box::new(tcp))
    }
}
