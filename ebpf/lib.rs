//! Rootlet's eBPF programs, compiled from `ebpf/src` by clang in `build.rs`
//! and embedded as ELF bytes, 8-byte aligned as ELF parsers expect.
//!
//! - [`ROOTLET`]: the freplace rootlet (placeholders `stage_0..stage_15`).
//! - [`ROOTLET_CHAIN`]: the tail-call rootlet.
//! - [`SAMPLER`], [`DDOS`], [`L4LB`]: the sample stages.
//! - [`SAMPLER_V2`], [`DDOS_V2`]: second builds (`-DROOTLET_BUILD=2`), for
//!   upgrades that load new programs. `SAMPLER_V2` differs in code: it
//!   stamps 2 into `sampler_counts[2]` (another kernel tag, and packets show
//!   which build counted them); `DDOS_V2` differs only in its data.
//! - `TEST_*`: stages that exist to exercise one behaviour in tests.
//! - `BENCH_*`: baselines the benchmarks compare the rootlets against.
#![forbid(unsafe_code)]

#[repr(C, align(8))]
struct Aligned<B: ?Sized>(B);

include!(concat!(env!("OUT_DIR"), "/objects.rs"));

/// An embedded object by name: (name, ELF bytes, program to run).
pub struct Entry {
    pub name: &'static str,
    pub object: &'static [u8],
    pub program: &'static str,
}

/// Every embedded stage object, by the name tools and tests use.
pub const STAGES: &[Entry] = &[
    Entry {
        name: "sampler",
        object: SAMPLER,
        program: "sampler",
    },
    Entry {
        name: "sampler_v2",
        object: SAMPLER_V2,
        program: "sampler",
    },
    Entry {
        name: "ddos",
        object: DDOS,
        program: "ddos",
    },
    Entry {
        name: "ddos_v2",
        object: DDOS_V2,
        program: "ddos",
    },
    Entry {
        name: "l4lb",
        object: L4LB,
        program: "l4lb",
    },
    Entry {
        name: "test_pass",
        object: TEST_PASS,
        program: "verdict",
    },
    Entry {
        name: "test_drop",
        object: TEST_DROP,
        program: "verdict",
    },
    Entry {
        name: "test_abort",
        object: TEST_ABORT,
        program: "verdict",
    },
    Entry {
        name: "test_tx",
        object: TEST_TX,
        program: "verdict",
    },
    Entry {
        name: "test_witness",
        object: TEST_WITNESS,
        program: "witness",
    },
    Entry {
        name: "test_lossy",
        object: TEST_LOSSY,
        program: "lossy",
    },
    Entry {
        name: "test_pinned",
        object: TEST_PINNED,
        program: "pinned",
    },
    Entry {
        name: "test_bad_verifier",
        object: TEST_BAD_VERIFIER,
        program: "bad_verifier",
    },
    Entry {
        name: "test_long_log",
        object: TEST_LONG_LOG,
        program: "long_log",
    },
    Entry {
        name: "test_ddos_incompatible",
        object: TEST_DDOS_INCOMPATIBLE,
        program: "ddos",
    },
    Entry {
        name: "test_ddos_retyped",
        object: TEST_DDOS_RETYPED,
        program: "ddos",
    },
    Entry {
        name: "test_plain",
        object: TEST_PLAIN,
        program: "plain",
    },
    Entry {
        name: "test_proprietary",
        object: TEST_PROPRIETARY,
        program: "proprietary",
    },
    Entry {
        name: "test_bigstack",
        object: TEST_BIGSTACK,
        program: "bigstack",
    },
];

/// Looks up [`STAGES`] by name.
pub fn stage(name: &str) -> Option<&'static Entry> {
    STAGES.iter().find(|e| e.name == name)
}
