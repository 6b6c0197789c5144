//! jitgate's benchmarks: shared fixtures for the criterion benches in `benches/benches/`
//! ([`traffic`]) and the pieces of the `jitgate-e2e` helper that `benches/e2e.sh` drives: a
//! fake PostgreSQL upstream ([`fake_pg`]), a client that opens and holds many mTLS sessions
//! ([`sessions`]), session start and query latency ([`latency`]), the results table
//! ([`report`]), and the shared store's propagation and resync times ([`store`]).
//!
//! Nothing here is used by the proxy; numbers and how to reproduce them are in
//! `benches/README.md` and `benches/RESULTS.md`.

pub mod fake_pg;
pub mod latency;
pub mod report;
pub mod sessions;
pub mod stats;
pub mod store;
pub mod traffic;
