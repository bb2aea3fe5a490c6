//! `rootletctl`, the Rootlet fleet client: builds and signs bundles, and
//! rolls them out to the `rootletd` agents of a fleet one host, then a few,
//! then a wave at a time, each step gated on what the agents' own health,
//! apply status and per-stage counters say, rolling every changed host
//! back by itself when something looks wrong. It only speaks the
//! `rootlet.v1` API.
//!
//! # Layout
//!
//! - [`cli`]: the command line (clap) and one function per command; exit
//!   codes.
//! - [`config`]: reading the TOML files people write, with errors that
//!   name `file:line:col` and the field; durations.
//! - [`inventory`]: hosts, labels, TLS settings, selectors, order.
//! - [`plan`]: canary, waves, pauses, gates and limits; how percentages
//!   round.
//! - [`transport`]: connections (mTLS, plain TCP, Unix sockets), deadlines,
//!   retries with backoff on UNAVAILABLE, bounded concurrency.
//! - [`rollout`]: the rollout engine (of bundles, removals and policies),
//!   its gates, journal, operator controls, progress display and
//!   summaries.
//! - [`status`]: hosts × rootlets read back from the agents.
//! - [`bundle_cmd`]: `bundle build|sign|verify|inspect|keygen` (`bundle
//!   remove` is a rollout: [`rollout`]).
//! - [`registry_cmd`]: `bundle push|pull`: bundles as OCI artifacts in a
//!   registry (`rootlet-oci`).
//! - [`policy_cmd`]: `policy build|sign|verify|inspect|diff`.
//! - [`generate`]: shell completions and manual pages, from the clap
//!   definitions.
//! - [`host`]: `host TARGET caps|list|get|load|unload|link|replace|unlink|
//!   pin|unpin|stats|watch`: one agent, one call per command (and a held
//!   lease over KeepAlive).
//!
//! The simulated agent the tests and the fleet benchmark use is the
//! `rootlet-client-sim` crate (`client/sim/`), outside this library.
#![forbid(unsafe_code)]

pub mod bundle_cmd;
pub mod cli;
pub mod config;
pub mod generate;
pub mod host;
pub mod inventory;
pub mod plan;
pub mod policy_cmd;
pub mod registry_cmd;
pub mod rollout;
pub mod status;
pub mod transport;
