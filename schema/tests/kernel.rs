//! The schema of BTF as the kernel returns it for a loaded program's
//! `btf_id` (what the agent reads; aya sanitizes and fixes up an object's
//! BTF before loading it) is the schema of the object's own `.BTF`.
#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failure is the test failing"
)]

mod common;

use std::os::fd::AsFd as _;

use aya::programs::Xdp;
use rootlet_schema::Schema;

/// Loads `program` of `object` and returns the raw BTF of the loaded program.
fn kernel_btf(object: &[u8], program: &str) -> Vec<u8> {
    let mut ebpf = aya::EbpfLoader::new().load(object).unwrap();
    let prog: &mut Xdp = ebpf.program_mut(program).unwrap().try_into().unwrap();
    prog.load().unwrap();
    let fd = prog.fd().unwrap();
    let (_btf_fd, raw) = rootlet_dataplane::sys::prog_btf(fd.as_fd())
        .unwrap()
        .expect("a stage loaded with BTF has a btf_id");
    raw
}

#[test]
fn kernel_btf_gives_the_objects_schema() {
    // schema.o: enums, unions, bitfields, addresses and a policy map
    // with its inner definition, all through the kernel's BTF checks.
    for (object, program) in [
        (rootlet_ebpf::DDOS, "ddos"),
        (rootlet_ebpf::L4LB, "l4lb"),
        (common::schema_object(), "schema"),
    ] {
        let raw = kernel_btf(object, program);
        let from_kernel = Schema::from_btf(&raw).unwrap();
        let from_elf = Schema::from_elf(object).unwrap();
        assert!(!from_kernel.maps.is_empty(), "{program}");
        assert_eq!(from_kernel, from_elf, "{program}");
    }
}
