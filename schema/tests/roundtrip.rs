//! Property tests of the codec on the real objects' maps: any bytes encode;
//! decoding what was encoded gives the same bytes where the bytes are
//! canonical (no padding, bools 0/1, LPM keys without host bits) and an
//! entry that encodes the same otherwise; and JSON written in another
//! accepted spelling (integers as decimal or hex strings) decodes to the
//! entry that encodes as the normalised JSON. And BTF with bytes changed
//! at random never panics the parser.
#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failure is the test failing"
)]

mod common;

use proptest::prelude::*;
use rootlet_schema::{MapSchema, Schema};
use serde_json::Value;

fn maps() -> Vec<MapSchema> {
    let mut out = Vec::new();
    for obj in [
        rootlet_ebpf::DDOS,
        rootlet_ebpf::L4LB,
        rootlet_ebpf::SAMPLER,
    ] {
        out.extend(Schema::from_elf(obj).unwrap().maps);
    }
    out
}

/// Maps whose key and value have no padding, no bool and no LPM key:
/// every byte string is canonical.
const EXACT: &[&str] = &[
    "l4lb_service",
    "l4lb_backends",
    "rootlet_stats",
    "rootlet_final",
];

/// Another spelling of the same JSON: integers as strings, decimal or hex,
/// chosen by `seed`.
fn respell(v: &Value, seed: &mut u64) -> Value {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let pick = (*seed >> 33) % 3;
    match v {
        Value::Number(n) => match (pick, n.as_u64(), n.as_i64()) {
            (1, _, _) => Value::String(n.to_string()),
            (2, Some(u), _) => Value::String(format!("0x{u:x}")),
            (2, None, Some(i)) => Value::String(format!("-0x{:x}", i.unsigned_abs())),
            _ => v.clone(),
        },
        Value::Array(a) => Value::Array(a.iter().map(|x| respell(x, seed)).collect()),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, x)| (k.clone(), respell(x, seed)))
                .collect(),
        ),
        _ => v.clone(),
    }
}

fn check(m: &MapSchema, key: &[u8], value: &[u8], seed: u64) -> Result<(), TestCaseError> {
    let exact = EXACT.contains(&m.name.as_str());
    for (what, bytes, is_key) in [("key", key, true), ("value", value, false)] {
        let enc = |b: &[u8]| {
            if is_key {
                m.encode_key(b)
            } else {
                m.encode_value(b)
            }
        };
        let dec = |j: &Value| {
            if is_key {
                m.decode_key(j)
            } else {
                m.decode_value(j)
            }
        };
        let j = enc(bytes).map_err(|e| TestCaseError::fail(format!("{}: {e}", m.name)))?;
        match dec(&j) {
            Ok(back) => {
                if exact {
                    prop_assert_eq!(&back, &bytes.to_vec(), "{} {} {}", m.name, what, j);
                }
                prop_assert_eq!(enc(&back).unwrap(), j.clone(), "{} {}", m.name, what);
                let mut s = seed;
                let other = respell(&j, &mut s);
                let again = dec(&other).map_err(|e| {
                    TestCaseError::fail(format!("{} {what}: {other} does not decode: {e}", m.name))
                })?;
                prop_assert_eq!(enc(&again).unwrap(), j, "{} {}", m.name, what);
            }
            // Only an LPM key the kernel could hold but not in prefix form
            // (host bits set, or prefix too long) fails, and it is shown
            // in its struct form.
            Err(e) => {
                prop_assert!(is_key && m.map_type.name() == "lpm_trie", "{}: {e}", m.name);
                prop_assert!(j.is_object(), "{}: {j}", m.name);
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn entries_round_trip(
        which in 0usize..64,
        key in proptest::collection::vec(any::<u8>(), 64),
        value in proptest::collection::vec(any::<u8>(), 256),
        seed in any::<u64>(),
        short_prefix in 0u32..=32,
    ) {
        let maps = maps();
        let m = &maps[which % maps.len()];
        let mut key = key;
        key.resize(m.key_size as usize, 0);
        // Half the LPM keys with a valid prefix, so that canonical keys
        // are tested too (random bytes almost never are).
        if m.map_type.name() == "lpm_trie" && seed % 2 == 0 {
            let mut k = vec![0u8; m.key_size as usize];
            k[..4].copy_from_slice(&short_prefix.to_le_bytes());
            for (i, b) in k[4..].iter_mut().enumerate() {
                let bit = i as u32 * 8;
                *b = if bit + 8 <= short_prefix {
                    key[4 + i]
                } else if bit < short_prefix {
                    key[4 + i] & (0xff << (8 - (short_prefix - bit)))
                } else {
                    0
                };
            }
            key = k;
        }
        let stride = if m.map_type.is_per_cpu() { (m.value_size as usize).div_ceil(8) * 8 } else { m.value_size as usize };
        let mut value = value;
        value.resize(stride, 0);
        value[m.value_size as usize..].fill(0);
        check(m, &key, &value, seed)?;
    }
}

/// The test object's maps, with types of every kind.
fn all_kinds() -> Schema {
    Schema::from_elf(common::schema_object()).unwrap()
}

#[test]
fn every_kind_round_trips() {
    let s = all_kinds();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(512));
    for m in &s.maps {
        let m = m.entries().unwrap().clone();
        let stride = if m.map_type.is_per_cpu() {
            (m.value_size as usize).div_ceil(8) * 8
        } else {
            m.value_size as usize
        };
        let strategy = (
            proptest::collection::vec(any::<u8>(), m.key_size as usize),
            proptest::collection::vec(any::<u8>(), stride),
            any::<u64>(),
        );
        runner
            .run(&strategy, |(key, mut value, seed)| {
                value[m.value_size as usize..].fill(0);
                if m.name == "schema_pointer" {
                    // Pointers encode but are never decoded.
                    prop_assert!(m.encode_value(&value).is_ok());
                    prop_assert!(m.decode_value(&m.encode_value(&value).unwrap()).is_err());
                    return Ok(());
                }
                check(&m, &key, &value, seed)
            })
            .unwrap_or_else(|e| panic!("{}: {e}", m.name));
    }
}

/// The `.BTF` section of an object.
fn btf_of(obj: &[u8]) -> Vec<u8> {
    use object::{Object as _, ObjectSection as _};
    let elf = object::read::File::parse(obj).unwrap();
    elf.section_by_name(".BTF")
        .unwrap()
        .data()
        .unwrap()
        .to_vec()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Bytes changed at random in real BTF: an error or a schema, never a
    /// panic, and whatever schema results encodes and decodes zeroed
    /// entries without panicking.
    #[test]
    fn mangled_btf_never_panics(
        which in 0usize..3,
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let obj = [rootlet_ebpf::DDOS, rootlet_ebpf::L4LB, rootlet_ebpf::SAMPLER][which];
        let mut b = btf_of(obj);
        for (i, v) in edits {
            let i = i.index(b.len());
            b[i] = v;
        }
        if truncate {
            let n = cut.index(b.len());
            b.truncate(n);
        }
        if let Ok(s) = Schema::from_btf(&b) {
            for m in &s.maps {
                let k = vec![0; m.key_size as usize];
                let v = vec![0; m.value_size.div_ceil(8) as usize * 8];
                let _ = m.encode_key(&k).map(|j| m.decode_key(&j));
                let _ = m.encode_value(&v[..m.value_size as usize]).map(|j| m.decode_value(&j));
            }
        }
    }
}
