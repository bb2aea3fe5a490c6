//! Compiles every eBPF program under `src/` with clang and writes
//! `objects.rs`, which embeds them. Without clang or the libbpf headers the
//! build fails with one line naming the packages to install.

use std::{env, fs, path::PathBuf, process::Command};

const INSTALL_HINT: &str = "install them with: apt-get install clang-19 libbpf-dev";

/// (const name, source, extra clang flags)
const OBJECTS: &[(&str, &str, &[&str])] = &[
    ("ROOTLET", "src/rootlet.c", &[]),
    ("ROOTLET_CHAIN", "src/rootlet_chain.c", &[]),
    ("SAMPLER", "src/sampler.c", &[]),
    ("SAMPLER_V2", "src/sampler.c", &["-DROOTLET_BUILD=2"]),
    ("DDOS", "src/ddos.c", &[]),
    ("DDOS_V2", "src/ddos.c", &["-DROOTLET_BUILD=2"]),
    ("L4LB", "src/l4lb.c", &[]),
    ("PROBE_EXT", "src/probe/ext.c", &[]),
    ("TEST_PASS", "src/test/verdict.c", &["-DVERDICT=XDP_PASS"]),
    ("TEST_DROP", "src/test/verdict.c", &["-DVERDICT=XDP_DROP"]),
    (
        "TEST_ABORT",
        "src/test/verdict.c",
        &["-DVERDICT=XDP_ABORTED"],
    ),
    ("TEST_TX", "src/test/verdict.c", &["-DVERDICT=XDP_TX"]),
    ("TEST_BAD_VERIFIER", "src/test/bad_verifier.c", &[]),
    ("TEST_LONG_LOG", "src/test/long_log.c", &[]),
    (
        "TEST_DDOS_INCOMPATIBLE",
        "src/test/ddos_incompatible.c",
        &[],
    ),
    (
        "TEST_DDOS_RETYPED",
        "src/test/ddos_incompatible.c",
        &["-DDDOS_VALUE=__s32", "-DDDOS_MAX=262144"],
    ),
    ("TEST_PLAIN", "src/test/plain.c", &[]),
    ("TEST_PROPRIETARY", "src/test/proprietary.c", &[]),
    ("TEST_BIGSTACK", "src/test/bigstack.c", &[]),
    ("TEST_WITNESS", "src/test/witness.c", &[]),
    ("TEST_LOSSY", "src/test/lossy.c", &[]),
    ("TEST_PINNED", "src/test/pinned.c", &[]),
    ("BENCH_MONO", "src/bench/mono.c", &[]),
    ("BENCH_BARE_CHAIN", "src/bench/bare_chain.c", &[]),
    ("BENCH_POLICY_LOOKUP", "src/bench/policy_lookup.c", &[]),
    ("BENCH_ROOTLET_BEFORE", "src/bench/rootlet_before.c", &[]),
];

fn find_clang() -> Option<String> {
    if let Ok(clang) = env::var("CLANG") {
        return Some(clang);
    }
    ["clang-19", "clang-18", "clang-17", "clang-16", "clang"]
        .into_iter()
        .find(|c| {
            Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(str::to_owned)
}

fn fail(msg: &str) -> ! {
    eprintln!("error: rootlet-ebpf: {msg}; {INSTALL_HINT}");
    std::process::exit(1);
}

fn main() {
    let manifest =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo:rerun-if-env-changed=CLANG");
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=include");

    let Some(clang) = find_clang() else {
        fail("clang not found");
    };
    let multiarch = format!("/usr/include/{}-linux-gnu", env::consts::ARCH);
    if !PathBuf::from("/usr/include/bpf/bpf_helpers.h").exists() {
        fail("libbpf headers (/usr/include/bpf/bpf_helpers.h) not found");
    }

    let mut rs = String::new();
    for (name, src, extra) in OBJECTS {
        let obj = out.join(format!("{}.o", name.to_lowercase()));
        let output = Command::new(&clang)
            .args([
                "-target", "bpf", "-g", "-O2", "-Wall", "-Werror", "-mcpu=v3",
            ])
            .arg("-I")
            .arg(manifest.join("include"))
            .arg("-I")
            .arg(&multiarch)
            .args(*extra)
            .arg("-c")
            .arg(manifest.join(src))
            .arg("-o")
            .arg(&obj)
            .output()
            .unwrap_or_else(|e| fail(&format!("running {clang}: {e}")));
        if !output.status.success() {
            eprintln!("{}", String::from_utf8_lossy(&output.stderr));
            fail(&format!("{clang} failed on {src}"));
        }
        rs.push_str(&format!(
            "/// `{src}` {extra:?}, compiled by clang.\npub static {name}: &[u8] = {{ const A: &crate::Aligned<[u8]> = &crate::Aligned(*include_bytes!({obj:?})); &A.0 }};\n"
        ));
    }
    fs::write(out.join("objects.rs"), rs).expect("write objects.rs");
}
