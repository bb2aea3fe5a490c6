//! Property tests of the inspection of uploaded stage objects
//! (`object::inspect`, `object::stage_maps`): every real stage object
//! with a few edits (bit flips, truncation, inserted and repeated bytes)
//! and arbitrary bytes after an ELF header are accepted or refused with
//! an error; never a panic. So is every stage's BTF with a few edits. An object the checks accept still has the
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

/// The sampler stage's object, and the file offset of each of its section
/// headers but the null one (ELF64: `e_shoff` at 0x28, `e_shentsize` at
/// 0x3a, `e_shnum` at 0x3c).
fn sampler_section_headers() -> (&'static rootlet_ebpf::Entry, Vec<usize>) {
    let e = rootlet_ebpf::STAGES
        .iter()
        .find(|e| e.name == "sampler")
        .unwrap();
    let le16 = |at: usize| usize::from(u16::from_le_bytes([e.object[at], e.object[at + 1]]));
    let shoff = u64::from_le_bytes(e.object[0x28..0x30].try_into().unwrap()) as usize;
    let (shentsize, shnum) = (le16(0x3a), le16(0x3c));
    (e, (1..shnum).map(|i| shoff + i * shentsize).collect())
}

/// `object` with the 8 bytes at `at` set to `value`, little-endian.
fn with_u64(object: &[u8], at: usize, value: u64) -> Vec<u8> {
    let mut input = object.to_vec();
    input[at..at + 8].copy_from_slice(&value.to_le_bytes());
    input
}

/// How many of the two checks (`inspect`, `stage_maps`) refuse `input`
/// with an ELF error containing `why`.
fn refusals(input: &[u8], program: &str, why: &str) -> usize {
    [
        object::inspect(input, program, 0).err(),
        object::stage_maps(input).err(),
    ]
    .into_iter()
    .filter(|got| matches!(got, Some(object::CheckError::Elf(said)) if said.contains(why)))
    .count()
}

/// The case the property below found in CI: an edit that gives a
/// section a non-zero address (`sh_addr`, at 0x10 in its header), so that
/// a program symbol's offset in its section, which aya-obj 0.3's
/// `Object::parse` computes as `symbol.address - section.address`,
/// subtracts with overflow: it panicked inside `inspect` (and in a release
/// build wraps instead). Each section of a real stage object gets address
/// 1 in turn: every such object is refused by both checks, with the
/// reason, before aya-obj sees it, so the outcome is the same with
/// overflow checks or without.
#[test]
fn a_section_with_an_address_is_refused_before_aya_obj_sees_it() {
    let (e, headers) = sampler_section_headers();
    for (i, h) in headers.into_iter().enumerate() {
        let input = with_u64(e.object, h + 0x10, 1);
        assert!(
            refusals(&input, e.program, "has address 0x1;") == 2,
            "section {}: {:?} / {:?}",
            i + 1,
            object::inspect(&input, e.program, 0).err(),
            object::stage_maps(&input).err()
        );
    }
}

/// The second case the property found in CI: an edit that makes a
/// zero-filled section (`SHT_NOBITS` = 8 in `sh_type`, at 0x4; the
/// `.bss.rootlet` every stage.h stage has) declare 2^51 bytes in
/// `sh_size` (at 0x20). aya-obj allocates a `.bss` section's contents, the
/// allocation failed, and the process aborted: no panic to catch. Such an
/// object is refused with the reason, just past the limit too; at the
/// limit it is not refused for its size.
#[test]
fn a_zero_filled_section_larger_than_the_kernel_takes_is_refused_not_an_abort() {
    let (e, headers) = sampler_section_headers();
    let nobits: Vec<usize> = headers
        .into_iter()
        .filter(|&h| e.object[h + 0x4..h + 0x8] == 8u32.to_le_bytes())
        .collect();
    assert!(!nobits.is_empty(), "the sampler has no SHT_NOBITS section");
    let refused = |size: u64| {
        nobits
            .iter()
            .map(|&h| {
                let input = with_u64(e.object, h + 0x20, size);
                refusals(&input, e.program, "bytes of zeroed data")
            })
            .sum::<usize>()
    };
    assert_eq!(refused(1 << 51), 2 * nobits.len());
    assert_eq!(
        refused(object::MAX_UNINITIALISED_SECTION + 1),
        2 * nobits.len()
    );
    assert_eq!(refused(object::MAX_UNINITIALISED_SECTION), 0);
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

    /// Edits confined to a stage's `.BTF` (where random edits of the whole
    /// object rarely land, and where the name lookup's panic was): the
    /// data plane's BTF reader, the one freplace's attach also uses,
    /// answers or refuses. A function it finds is a FUNC of that name.
    #[test]
    fn mutated_btf_never_panics_the_lookup_or_the_signature_check(
        which in 0..rootlet_ebpf::STAGES.len(),
        edits in mutate::edits(4),
    ) {
        use ::object::{Object as _, ObjectSection as _};
        let e = &rootlet_ebpf::STAGES[which];
        let elf = ::object::File::parse(e.object).unwrap();
        let btf = elf.section_by_name(".BTF").unwrap().data().unwrap();
        let input = mutate::apply(btf, &edits);
        if let Ok(parsed) = rootlet_dataplane::btf::Btf::parse(&input) {
            let _ = parsed.func_id(e.program);
            let _ = parsed.check_xdp_signature(e.program);
            let _ = parsed.func_id("rootlet_slot_0");
        }
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

/// Names for the keep-maps properties: distinct even as the kernel keeps
/// them (15 bytes), some longer than that, some cut inside a multi-byte
/// character (the cut of issue #16's panic).
const MAP_NAMES: [&str; 8] = [
    "blocklist",
    "ddos_blocklist_v2_long",
    "counts",
    "ééééééééé_cut_inside",
    "ratelimit_per_source",
    "x",
    "日本語のマップ名前",
    "sampler_ring",
];

/// What the running stage has under a new map's name.
#[derive(Debug, Clone)]
enum Running {
    Absent,
    Same,
    /// These of the five parameters (bit i: `object::MAP_FIELDS[i]`)
    /// differ, each by a non-zero amount.
    Differs(u8, [u32; 5]),
}

fn map_def(name: &str, p: [u32; 5]) -> object::MapDef {
    object::MapDef {
        name: name.to_owned(),
        map_type: p[0],
        key_size: p[1],
        value_size: p[2],
        max_entries: p[3],
        map_flags: p[4],
    }
}

fn map_info(name: &str, p: [u32; 5]) -> rootlet_dataplane::sys::MapInfo {
    rootlet_dataplane::sys::MapInfo {
        id: 1,
        map_type: p[0],
        name: object::truncate(name).to_owned(),
        key_size: p[1],
        value_size: p[2],
        max_entries: p[3],
        map_flags: p[4],
    }
}

fn params() -> impl Strategy<Value = [u32; 5]> {
    prop::array::uniform5(prop_oneof![0u32..64, any::<u32>()])
}

fn running() -> impl Strategy<Value = Running> {
    prop_oneof![
        Just(Running::Absent),
        Just(Running::Same),
        (1u8..32, prop::array::uniform5(1u32..=u32::MAX))
            .prop_map(|(mask, by)| Running::Differs(mask, by)),
    ]
}

fn stage_object(maps: Vec<object::MapDef>) -> object::StageObject {
    object::StageObject {
        maps,
        chainable: true,
        stack: 0,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Keep-maps' check against a running stage built from the new
    /// object's maps: each map absent there, the same, or different in a
    /// chosen set of parameters; plus running maps the new object does
    /// not have, which never matter. The check accepts exactly when no
    /// map present on both sides differs, and otherwise names the first
    /// such map of the new object and exactly the parameters that differ.
    #[test]
    fn keep_maps_accepts_exactly_the_compatible_and_names_map_and_fields(
        picked in prop::sample::subsequence(MAP_NAMES.to_vec(), 0..=MAP_NAMES.len()),
        plans in prop::collection::vec((params(), running()), MAP_NAMES.len()),
        extra in prop::collection::vec(params(), MAP_NAMES.len()),
        split in 0usize..=MAP_NAMES.len(),
    ) {
        // The first `split` picked names are the new object's; the rest
        // run only in the old stage.
        let split = split.min(picked.len());
        let (new_names, old_only) = picked.split_at(split);
        let mut defs = vec![];
        let mut live = vec![];
        let mut expected = None;
        for (i, name) in new_names.iter().enumerate() {
            let (p, plan) = &plans[i];
            defs.push(map_def(name, *p));
            match plan {
                Running::Absent => {}
                Running::Same => live.push(map_info(name, *p)),
                Running::Differs(mask, by) => {
                    let mut q = *p;
                    let mut fields = vec![];
                    for (f, field) in object::MAP_FIELDS.iter().enumerate() {
                        if mask & (1 << f) != 0 {
                            q[f] = q[f].wrapping_add(by[f]);
                            fields.push(*field);
                        }
                    }
                    live.push(map_info(name, q));
                    if expected.is_none() {
                        expected = Some(((*name).to_owned(), fields));
                    }
                }
            }
        }
        for (i, name) in old_only.iter().enumerate() {
            live.push(map_info(name, extra[i]));
        }
        // The kernel lists maps in its own order, not the object's.
        live.reverse();
        let got = stage_object(defs).check_keep(&live);
        match (expected, got) {
            (None, Ok(())) => {}
            (Some((name, fields)), Err(err)) => {
                let text = err.to_string();
                match err {
                    object::CheckError::IncompatibleMap { name: n, fields: f, .. } => {
                        prop_assert_eq!(&n, &name);
                        prop_assert_eq!(&f.names(), &fields);
                    }
                    other => prop_assert!(false, "not IncompatibleMap: {other:?}"),
                }
                prop_assert!(text.contains(&format!("`{name}`")), "{text}");
                for field in &fields {
                    prop_assert!(text.contains(field), "{field} in {text}");
                }
            }
            (expected, got) => prop_assert!(false, "expected {expected:?}, got {got:?}"),
        }
    }

    /// Arbitrary names (any UTF-8, long ones included) and parameters on
    /// both sides: the check never panics, and a refusal names a map of
    /// the new object that runs under its kernel name with exactly the
    /// parameters that differ, none of them equal.
    #[test]
    fn keep_maps_never_panics_and_a_refusal_is_precise(
        new in prop::collection::vec(("\\PC{0,24}", params()), 0..6),
        old in prop::collection::vec((prop::sample::select(vec![0usize, 1, 2, 3, 4, 5]), params()), 0..6),
    ) {
        let defs: Vec<_> = new.iter().map(|(n, p)| map_def(n, *p)).collect();
        let live: Vec<_> = old
            .iter()
            .filter_map(|(i, p)| new.get(*i).map(|(n, _)| map_info(n, *p)))
            .collect();
        match stage_object(defs.clone()).check_keep(&live) {
            Ok(()) => {
                // Every map present on both sides (first match) is the same.
                for d in &defs {
                    if let Some(l) = live.iter().find(|l| l.name == object::truncate(&d.name)) {
                        prop_assert_eq!(
                            [l.map_type, l.key_size, l.value_size, l.max_entries, l.map_flags],
                            [d.map_type, d.key_size, d.value_size, d.max_entries, d.map_flags]
                        );
                    }
                }
            }
            Err(object::CheckError::IncompatibleMap { name, fields, .. }) => {
                // A map of that name (names may repeat) runs under its
                // kernel name, and exactly `fields` differ.
                prop_assert!(!fields.is_empty());
                let fields = fields.names();
                let precise = defs.iter().filter(|d| d.name == name).any(|d| {
                    live.iter()
                        .find(|l| l.name == object::truncate(&d.name))
                        .is_some_and(|l| {
                            let pairs = [
                                (l.map_type, d.map_type),
                                (l.key_size, d.key_size),
                                (l.value_size, d.value_size),
                                (l.max_entries, d.max_entries),
                                (l.map_flags, d.map_flags),
                            ];
                            let differ: Vec<&str> = object::MAP_FIELDS
                                .iter()
                                .zip(pairs)
                                .filter(|(_, (a, b))| a != b)
                                .map(|(f, _)| *f)
                                .collect();
                            differ == fields
                        })
                });
                prop_assert!(precise, "{name}: {fields:?}");
            }
            Err(other) => prop_assert!(false, "not IncompatibleMap: {other:?}"),
        }
    }
}
