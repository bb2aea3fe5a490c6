//! Property tests of the inspection of uploaded stage objects
//! (`object::inspect`, `object::stage_maps`): every real stage object
//! with a few edits (bit flips, truncation, inserted and repeated bytes)
//! and arbitrary bytes after an ELF header are accepted or refused with
//! an error; never a panic. An object the checks accept still has the
//! program asked for, and its stack estimate is within the kernel's limit.
#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failure is the test failing"
)]

#[path = "../../bundle/tests/common/mutate.rs"]
mod mutate;

use proptest::prelude::*;
use rootlet_dataplane::object;

/// The kernel's stack limit for one program and its callees.
const MAX_STACK: u32 = 512;

/// The real objects pass the checks, except the two built to fail one,
/// which fail exactly that one: the starting points of the mutations are
/// the inputs the checks see in production.
#[test]
fn every_real_stage_object_passes_the_checks_or_fails_the_one_it_is_built_for() {
    for e in rootlet_ebpf::STAGES {
        let got = object::inspect(e.object, e.program, 0);
        match e.name {
            "test_proprietary" => assert!(
                matches!(got, Err(object::CheckError::License(_))),
                "{}: {:?}",
                e.name,
                got.err()
            ),
            "test_bigstack" => assert!(
                matches!(
                    object::inspect(e.object, e.program, 256),
                    Err(object::CheckError::Stack { .. })
                ),
                "{}: the stack check",
                e.name
            ),
            _ => {
                got.unwrap_or_else(|err| panic!("{}: {err}", e.name));
            }
        }
        object::stage_maps(e.object).unwrap();
    }
}

/// The case the property below found in CI: an edit that gives a
/// section a non-zero address (`sh_addr`), so that a program symbol's
/// offset in its section, which aya-obj 0.3's `Object::parse` computes as
/// `symbol.address - section.address`, subtracts with overflow: it
/// panicked inside `inspect`. Each section of a real stage object gets
/// address 1 in turn: no edit panics, and the ones aya-obj cannot parse
/// are refused with the reason.
#[test]
fn a_section_address_aya_obj_cannot_parse_is_refused_not_a_panic() {
    let e = rootlet_ebpf::STAGES
        .iter()
        .find(|e| e.name == "sampler")
        .unwrap();
    let le64 = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    let le16 = |b: &[u8], at: usize| u16::from_le_bytes(b[at..at + 2].try_into().unwrap());
    // ELF64: e_shoff at 0x28, e_shentsize at 0x3a, e_shnum at 0x3c; sh_addr
    // at 0x10 in a section header.
    let (shoff, shentsize, shnum) = (
        le64(e.object, 0x28) as usize,
        le16(e.object, 0x3a) as usize,
        le16(e.object, 0x3c) as usize,
    );
    let mut refused = 0;
    for i in 1..shnum {
        let mut input = e.object.to_vec();
        let at = shoff + i * shentsize + 0x10;
        input[at..at + 8].copy_from_slice(&1u64.to_le_bytes());
        if let Err(object::CheckError::Elf(why)) = object::inspect(&input, e.program, 0) {
            refused += usize::from(why.contains("malformed object (aya-obj"));
        }
        let _ = object::stage_maps(&input);
    }
    assert!(
        refused > 0,
        "no section address made aya-obj panic: the case is not exercised"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(384))]

    #[test]
    fn mutated_objects_never_panic_the_checks(
        which in 0..rootlet_ebpf::STAGES.len(),
        edits in mutate::edits(4),
    ) {
        let e = &rootlet_ebpf::STAGES[which];
        let input = mutate::apply(e.object, &edits);
        match object::inspect(&input, e.program, 0) {
            Ok(stage) => prop_assert!(stage.stack <= MAX_STACK, "stack {}", stage.stack),
            Err(err) => prop_assert!(!err.to_string().is_empty()),
        }
        let _ = object::stage_maps(&input);
    }

    #[test]
    fn arbitrary_bytes_after_an_elf_header_never_panic_the_checks(
        head in 0usize..128,
        tail in prop::collection::vec(any::<u8>(), 0..1024),
    ) {
        let mut input = rootlet_ebpf::DDOS[..head].to_vec();
        input.extend_from_slice(&tail);
        prop_assert!(object::inspect(&input, "ddos", 0).is_err());
        let _ = object::stage_maps(&input);
    }
}
