//! What the test binaries share: `ebpf/src/test/schema.c`, compiled by
//! clang as ebpf/build.rs compiles the embedded objects.

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

/// `ebpf/src/test/schema.c`, compiled once per test binary.
pub fn schema_object() -> &'static [u8] {
    static OBJ: OnceLock<Vec<u8>> = OnceLock::new();
    OBJ.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let clang = std::env::var("CLANG").ok().unwrap_or_else(|| {
            ["clang-19", "clang-18", "clang-17", "clang-16", "clang"]
                .into_iter()
                .find(|c| {
                    Command::new(c)
                        .arg("--version")
                        .output()
                        .is_ok_and(|o| o.status.success())
                })
                .expect("clang, which the workspace build (ebpf/build.rs) needs too")
                .to_owned()
        });
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("schema.o");
        let status = Command::new(&clang)
            .args([
                "-target", "bpf", "-g", "-O2", "-Wall", "-Werror", "-mcpu=v3", "-I",
            ])
            .arg(root.join("ebpf/include"))
            .arg("-I")
            .arg(format!("/usr/include/{}-linux-gnu", std::env::consts::ARCH))
            .arg("-c")
            .arg(root.join("ebpf/src/test/schema.c"))
            .arg("-o")
            .arg(&out)
            .status()
            .expect("run clang");
        assert!(status.success(), "clang failed on ebpf/src/test/schema.c");
        std::fs::read(&out).expect("read schema.o")
    })
}
