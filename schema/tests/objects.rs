//! Schemas and the JSON codec on real objects: the sample stages embedded
//! by `rootlet-ebpf`, and `ebpf/src/test/schema.c` (compiled here by clang,
//! as ebpf/build.rs compiles the others) for enums, arrays, unions,
//! bitfields, addresses, IPv6 LPM keys and a policy map.
#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failure is the test failing"
)]

mod common;

use common::schema_object;
use rootlet_schema::{MapSchema, Schema};
use serde_json::{Value, json};

fn test_schema() -> Schema {
    Schema::from_elf(schema_object()).expect("schema of schema.o")
}

fn map<'a>(s: &'a Schema, name: &str) -> &'a MapSchema {
    s.map(name).unwrap_or_else(|| panic!("no map {name}"))
}

#[test]
fn ddos_blocklist_is_an_lpm_trie_of_prefixes() {
    let s = Schema::from_elf(rootlet_ebpf::DDOS).unwrap();
    // A policy map: an array of one inner map, whose entries a policy sets.
    let outer = map(&s, "ddos_blocklist");
    assert!(outer.is_policy_map());
    assert_eq!(outer.map_type.name(), "array_of_maps");
    let m = outer.entries().expect("the inner map's entries");
    assert_eq!(m.map_type.name(), "lpm_trie");
    assert_eq!((m.key_size, m.value_size, m.max_entries), (8, 4, 262144));
    assert_eq!(m.map_flags, 1, "BPF_F_NO_PREALLOC");
    assert!(!m.is_policy_map());
    assert_eq!(
        serde_json::to_value(&m.key).unwrap(),
        json!({"struct": "ddos_key", "size": 8, "members": [
            {"name": "prefixlen", "offset": 0, "type": "u32"},
            {"name": "addr", "offset": 4, "type": "ipv4"},
        ]})
    );
    assert_eq!(serde_json::to_value(&m.value).unwrap(), json!("u32"));

    let key = m.decode_key(&json!("192.0.2.0/24")).unwrap();
    assert_eq!(key, [24, 0, 0, 0, 192, 0, 2, 0]);
    assert_eq!(m.encode_key(&key).unwrap(), json!("192.0.2.0/24"));
    assert_eq!(
        m.decode_key(&json!("198.51.100.7/32")).unwrap(),
        [32, 0, 0, 0, 198, 51, 100, 7]
    );
    assert_eq!(m.decode_key(&json!("0.0.0.0/0")).unwrap(), [0; 8]);
    // The stage's own maps are in the schema too (the data plane filters).
    assert!(s.map("rootlet_next").is_some());
}

#[test]
fn lpm_keys_are_checked_against_their_prefix() {
    let s = Schema::from_elf(rootlet_ebpf::DDOS).unwrap();
    let m = map(&s, "ddos_blocklist").entries().expect("inner");
    let e = |v: Value| m.decode_key(&v).unwrap_err().to_string();
    assert_eq!(
        e(json!("192.0.2.1/24")),
        "key: \"192.0.2.1/24\" has bits set beyond its /24 prefix (the prefix is 192.0.2.0/24)"
    );
    assert_eq!(
        e(json!("192.0.2.0/33")),
        "key: \"192.0.2.0/33\": prefix length 33 is longer than 32"
    );
    assert_eq!(
        e(json!("300.1.1.1/32")),
        "key: \"300.1.1.1/32\": \"300.1.1.1\" is not an IPv4 address"
    );
    assert_eq!(
        e(json!("2001:db8::/32")),
        "key: \"2001:db8::/32\": \"2001:db8::\" is not an IPv4 address"
    );
    assert_eq!(
        e(json!("192.0.2.0")),
        "key: \"192.0.2.0\" is not an IPv4 prefix (address/length)"
    );
    assert_eq!(
        e(json!(5)),
        "key: 5 is not an IPv4 prefix such as \"192.0.2.0/24\""
    );
    // The struct form is accepted, with the same checks.
    assert_eq!(
        m.decode_key(&json!({"prefixlen": 16, "addr": "192.168.0.0"}))
            .unwrap(),
        [16, 0, 0, 0, 0xc0, 0xa8, 0, 0]
    );
    assert!(
        m.decode_key(&json!({"prefixlen": 8, "addr": "192.168.0.0"}))
            .is_err()
    );
    // A key the kernel holds with bits beyond its prefix is shown in the
    // struct form (it has no prefix form).
    assert_eq!(
        m.encode_key(&[8, 0, 0, 0, 10, 0, 0, 1]).unwrap(),
        json!({"prefixlen": 8, "addr": "10.0.0.1"})
    );
    assert!(m.encode_key(&[0; 7]).is_err());
}

#[test]
fn ipv6_lpm_keys_whatever_their_member_names() {
    let s = test_schema();
    let m = map(&s, "schema_lpm6");
    let key = m.decode_key(&json!("2001:db8::/32")).unwrap();
    let mut want = vec![32, 0, 0, 0, 0x20, 0x01, 0x0d, 0xb8];
    want.resize(20, 0);
    assert_eq!(key, want);
    assert_eq!(m.encode_key(&key).unwrap(), json!("2001:db8::/32"));
    assert_eq!(
        m.decode_key(&json!("2001:db8::1/64"))
            .unwrap_err()
            .to_string(),
        "key: \"2001:db8::1/64\" has bits set beyond its /64 prefix (the prefix is 2001:db8::/64)"
    );
    assert!(m.decode_key(&json!("2001:db8::/129")).is_err());
    assert!(m.decode_key(&json!("192.0.2.0/24")).is_err());
    // Enum values by name, or by number.
    assert_eq!(m.decode_value(&json!("BLUE")).unwrap(), [7, 0, 0, 0]);
    assert_eq!(m.decode_value(&json!(1)).unwrap(), [1, 0, 0, 0]);
    assert_eq!(m.encode_value(&[1, 0, 0, 0]).unwrap(), json!("GREEN"));
    assert_eq!(m.encode_value(&[9, 0, 0, 0]).unwrap(), json!(9));
    assert_eq!(
        m.decode_value(&json!("PURPLE")).unwrap_err().to_string(),
        "value: \"PURPLE\" is not an enumerator of enum color (RED, GREEN, BLUE)"
    );
}

#[test]
fn l4lb_service_and_backends() {
    let s = Schema::from_elf(rootlet_ebpf::L4LB).unwrap();
    let svc = map(&s, "l4lb_services").entries().expect("a policy map");
    let k = svc
        .decode_key(&json!({"vip": "10.0.0.1", "port": 80, "proto": 17}))
        .unwrap();
    assert_eq!(k, [0x0a, 0, 0, 1, 80, 0, 17, 0]);
    assert_eq!(
        svc.encode_key(&k).unwrap(),
        json!({"vip": "10.0.0.1", "port": 80, "proto": 17, "pad": 0})
    );
    let v = svc
        .decode_value(&json!({"num_backends": 1, "backends": [{"ip": "10.0.0.2", "mac": "02:00:00:00:00:01"}]}))
        .unwrap();
    assert_eq!(v.len(), svc.value_size as usize);
    assert_eq!(&v[..16], [1, 0, 0, 0, 10, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0, 0]);
    assert!(
        v[16..].iter().all(|&b| b == 0),
        "the other backends are zero"
    );
    assert_eq!(
        svc.encode_value(&v).unwrap()["backends"][0],
        json!({"ip": "10.0.0.2", "mac": "02:00:00:00:00:01", "pad": 0})
    );
}

#[test]
fn pointers_are_shown_but_never_written() {
    let s = test_schema();
    let m = map(&s, "schema_pointer");
    assert_eq!(serde_json::to_value(&m.key).unwrap(), json!("ipv6"));
    assert_eq!(
        m.encode_value(&[1, 2, 3, 4, 5, 6, 7, 8]).unwrap(),
        json!("0x0102030405060708")
    );
    assert_eq!(
        m.decode_value(&json!("0x0102030405060708"))
            .unwrap_err()
            .to_string(),
        "value: cannot be written: it is a pointer, which a map entry written from outside cannot hold"
    );
}

#[test]
fn kept_maps_must_keep_their_meaning() {
    let ddos = Schema::from_elf(rootlet_ebpf::DDOS).unwrap();
    let v2 = Schema::from_elf(rootlet_ebpf::DDOS_V2).unwrap();
    let bad = Schema::from_elf(rootlet_ebpf::TEST_DDOS_INCOMPATIBLE).unwrap();
    let old = map(&ddos, "ddos_blocklist");
    assert_eq!(old.compatible_with(map(&v2, "ddos_blocklist")), Ok(()));
    assert_eq!(
        old.compatible_with(map(&bad, "ddos_blocklist"))
            .unwrap_err()
            .to_string(),
        "map ddos_blocklist: inner map: value size 4 became 8"
    );

    // The same sizes with a renamed member, or another type of the same
    // size, are refused too.
    let mut renamed = old.clone();
    if let rootlet_schema::Type::Struct(c) = &mut renamed.inner.as_mut().unwrap().key {
        c.members[1].name = Some("saddr".into());
    }
    assert_eq!(
        old.compatible_with(&renamed).unwrap_err().to_string(),
        "map ddos_blocklist: inner map: key.addr: member addr at byte 4 became saddr at byte 4"
    );
    let mut signed = old.clone();
    signed.inner.as_mut().unwrap().value = rootlet_schema::Type::Int {
        size: 4,
        signed: true,
    };
    assert_eq!(
        old.compatible_with(&signed).unwrap_err().to_string(),
        "map ddos_blocklist: inner map: value: \"u32\" became \"i32\""
    );
    let mut tag = old.clone();
    if let rootlet_schema::Type::Struct(c) = &mut tag.inner.as_mut().unwrap().key {
        c.name = "other_key".into();
    }
    assert_eq!(
        old.compatible_with(&tag),
        Ok(()),
        "a struct tag is not compared"
    );

    // Inner maps of policy maps compare too.
    let s = test_schema();
    let p = map(&s, "schema_policy_with_a_long_name");
    let mut bigger = p.clone();
    if let Some(inner) = bigger.inner.as_deref_mut() {
        inner.max_entries = 5;
    }
    assert_eq!(
        p.compatible_with(&bigger).unwrap_err().to_string(),
        "map schema_policy_with_a_long_name: inner map: max entries 100000 became 5"
    );
    assert_eq!(
        p.compatible_with(map(&s, "schema_lpm4"))
            .unwrap_err()
            .to_string(),
        "map schema_policy_with_a_long_name: map type array_of_maps (12) became lpm_trie (11)"
    );
}

#[test]
fn every_embedded_stage_has_a_schema() {
    for e in rootlet_ebpf::STAGES {
        let s = Schema::from_elf(e.object).unwrap_or_else(|err| panic!("{}: {err}", e.name));
        for m in &s.maps {
            assert_eq!(m.key.size(), m.key_size, "{}.{}", e.name, m.name);
            assert_eq!(m.value.size(), m.value_size, "{}.{}", e.name, m.name);
            // A zeroed entry always encodes and decodes back.
            let k = vec![0; m.key_size as usize];
            let json = m.encode_key(&k).unwrap();
            assert_eq!(m.decode_key(&json).unwrap(), k, "{}.{}", e.name, m.name);
        }
    }
}

#[test]
fn the_kernel_btf_parses_and_has_no_maps() {
    // Raw BTF as the kernel gives it (header, types, strings), with every
    // BTF kind a modern kernel uses (ENUM64, FLOAT, DECL_TAG, TYPE_TAG).
    let Ok(raw) = std::fs::read("/sys/kernel/btf/vmlinux") else {
        panic!("/sys/kernel/btf/vmlinux: the kernels Rootlet supports have BTF");
    };
    assert_eq!(Schema::from_btf(&raw).unwrap().maps, vec![]);
}

#[test]
fn not_btf_is_an_error() {
    assert!(Schema::from_elf(b"not an elf").is_err());
    assert!(Schema::from_btf(&[]).is_err());
    assert!(Schema::from_btf(&[0x9f, 0xeb, 1, 0]).is_err());
}
