//! rootletd, the per-host Rootlet agent, and the data plane layer it drives.
pub mod dataplane;
