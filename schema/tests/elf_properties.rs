//! Property tests of reading a schema from an uploaded object
//! (`Schema::from_elf`): every real stage object with a few edits, and
//! arbitrary bytes after an ELF header, give a schema or an error, never
//! a panic; a schema read from a mutated object still encodes every map's
//! zeroed key and value or says why not. (`from_btf` on mutated BTF and
//! the codec's round trips are in roundtrip.rs and hostile.rs.)
#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failure is the test failing"
)]

#[path = "../../bundle/tests/common/mutate.rs"]
mod mutate;

use proptest::prelude::*;
use rootlet_schema::Schema;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(384))]

    #[test]
    fn mutated_objects_never_panic_the_schema_reader(
        which in 0..rootlet_ebpf::STAGES.len(),
        edits in mutate::edits(4),
    ) {
        let input = mutate::apply(rootlet_ebpf::STAGES[which].object, &edits);
        match Schema::from_elf(&input) {
            Ok(schema) => {
                for m in &schema.maps {
                    let _ = m.encode_key(&vec![0; m.key_size as usize]);
                    let _ = m.encode_value(&vec![0; m.value_size as usize]);
                }
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn arbitrary_bytes_after_an_elf_header_are_refused(
        head in 0usize..128,
        tail in prop::collection::vec(any::<u8>(), 0..1024),
    ) {
        let mut input = rootlet_ebpf::DDOS[..head].to_vec();
        input.extend_from_slice(&tail);
        prop_assert!(Schema::from_elf(&input).is_err());
    }
}
