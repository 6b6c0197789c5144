//! The access core, the same for every data path: who may reach which target, for how long,
//! and the one place a session is admitted and cut.
//!
//! - [`table`]: the in-memory grant table, changed by typed changes, with one expiry loop.
//! - `admission`: (identity, target, protocol, client address) gives a `Lease` or a typed
//!   `Refusal`, which each protocol renders natively.
//! - `lease`: a session's proof of access: its grant, target and level, its registration,
//!   and the one cut future (shutdown, grant, session, certificate).
//! - `dialer`: opens the upstream connection from the lease's own target.
//! - `wave`: the two phases of a cut across sessions: every client told, then the teardowns.
//!
//! Nothing here knows a wire protocol.

pub mod admission;
pub mod dialer;
pub mod lease;
pub mod refusal;
pub mod table;
pub mod wave;

pub use admission::{Admission, Ask, Protocol};
pub use dialer::{BoxedIo, Dialer, Io, TcpDialer};
pub use lease::{Lease, Notice};
pub use refusal::{Reason, Refusal};
pub use table::GrantPermit;
pub use wave::CutWave;
