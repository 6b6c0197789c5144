//! jitgate: a just-in-time access proxy for PostgreSQL.
//!
//! The library holds the whole gateway so tests can run a real server in-process with
//! [`server::run`]; the `jitgate` binary is a thin CLI over it ([`cli`]).
//!
//! Data flow: client (psql) --mTLS--> [`pg`] listener --grant lookup ([`grants`])--> upstream
//! login with the access level's credentials --> relay until the grant ends.

pub mod access;
pub mod agents;
pub mod api;
pub mod audit;
pub mod budget;
pub mod cli;
pub mod client;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod connect;
pub mod console;
pub mod credentials;
pub mod demo;
pub mod grants;
pub mod lanes;
pub mod login;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod pg;
pub mod pki;
pub mod policy;
pub mod recordings;
pub mod requests;
pub mod sandbox;
pub mod seal;
pub mod server;
pub mod sessions;
pub mod slack;
pub mod ssh;
pub mod sshca;
pub mod store;
pub mod timefmt;
pub mod tls;

pub use server::{run, BoundAddrs, Listeners};
