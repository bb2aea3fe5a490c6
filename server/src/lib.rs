//! rootletd, the per-host Rootlet agent, and the data plane layer it drives.
//!
//! # Layout
//! - [`dataplane`]: rootlets, stages, generations, pins (no gRPC).
//! - [`agent`]: authorization, leases, bundles, apply status (no gRPC).
//! - [`api`]: the rootlet.v1 gRPC service; the only layer that knows gRPC.
//! - [`config`], [`runtime`], [`metrics`]: running `rootletd`.
//! - [`kv`]: the redb store both layers keep their records in.
pub mod agent;
pub mod api;
pub mod config;
pub mod dataplane;
pub mod kv;
pub mod metrics;
pub mod runtime;
