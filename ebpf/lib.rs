//! Rootlet's eBPF programs, compiled from `ebpf/src` by clang in `build.rs`
//! and embedded as ELF bytes, 8-byte aligned as ELF parsers expect.
//!
//! - [`ROOTLET`]: the freplace rootlet (placeholders `stage_0..stage_15`).
//! - [`ROOTLET_CHAIN`]: the tail-call rootlet.
//! - [`SAMPLER`], [`DDOS`], [`L4LB`]: the sample stages.
//! - `TEST_*`: stages that exist to exercise one behaviour in tests.
//! - `BENCH_*`: baselines the benchmarks compare the rootlets against.
#![forbid(unsafe_code)]

#[repr(C, align(8))]
struct Aligned<B: ?Sized>(B);

include!(concat!(env!("OUT_DIR"), "/objects.rs"));
