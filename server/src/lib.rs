//! rootletd, the per-host Rootlet agent: the gRPC API and the daemon around
//! the agent ([`rootlet_agent`]) and the data plane ([`rootlet_dataplane`]).
//!
//! # Layout
//! - [`api`]: the rootlet.v1 gRPC service; the only layer that knows gRPC.
//! - [`config`], [`runtime`], [`metrics`]: running `rootletd`.
//! - [`memory`]: its footprint in glibc's allocator.
//! - [`registry`]: ApplyBundle by reference, the agent's pull from an
//!   allow-listed OCI registry.
pub mod api;
pub mod config;
pub mod memory;
pub mod metrics;
pub mod registry;
pub mod runtime;
