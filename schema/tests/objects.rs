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
    let m = map(&s, "ddos_blocklist");
    assert_eq!(m.map_type.name(), "lpm_trie");
    assert_eq!((m.key_size, m.value_size, m.max_entries), (8, 8, 65536));
    assert_eq!(m.map_flags, 1, "BPF_F_NO_PREALLOC");
    assert!(!m.is_policy_map());
    assert_eq!(
        serde_json::to_value(&m.key).unwrap(),
        json!({"struct": "ddos_key", "size": 8, "members": [
            {"name": "prefixlen", "offset": 0, "type": "u32"},
            {"name": "addr", "offset": 4, "type": "u32"},
        ]})
    );
    assert_eq!(serde_json::to_value(&m.value).unwrap(), json!("u64"));

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
    let m = map(&s, "ddos_blocklist");
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
        m.decode_key(&json!({"prefixlen": 16, "addr": "0x0000a8c0"}))
            .unwrap(),
        [16, 0, 0, 0, 0xc0, 0xa8, 0, 0]
    );
    assert!(
        m.decode_key(&json!({"prefixlen": 8, "addr": 0x0000a8c0}))
            .is_err()
    );
    // A key the kernel holds with bits beyond its prefix is shown in the
    // struct form (it has no prefix form).
    assert_eq!(
        m.encode_key(&[8, 0, 0, 0, 10, 0, 0, 1]).unwrap(),
        json!({"prefixlen": 8, "addr": 0x0100000a})
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
    let svc = map(&s, "l4lb_service");
    let v = svc
        .decode_value(&json!({"vip": "0x0100000a", "port": 80, "proto": 17, "num_backends": 2}))
        .unwrap();
    assert_eq!(v, [0x0a, 0, 0, 1, 80, 0, 17, 0, 2, 0, 0, 0]);
    assert_eq!(
        svc.encode_value(&v).unwrap(),
        json!({"vip": 0x0100000a, "port": 80, "proto": 17, "pad": 0, "num_backends": 2})
    );
    let be = map(&s, "l4lb_backends");
    let v = be
        .decode_value(&json!({"ip": 1, "mac": [2, 0, 0, 0, 0, 1]}))
        .unwrap();
    assert_eq!(v, [1, 0, 0, 0, 2, 0, 0, 0, 0, 1, 0, 0]);
    assert_eq!(
        be.decode_value(&json!({"ip": 1, "mac": [2, 0, 0, 0, 0, 256]}))
            .unwrap_err()
            .to_string(),
        "value.mac[5]: 256 is out of range for u8 (0 to 255)"
    );
    assert_eq!(
        be.decode_value(&json!({"ip": 1, "mac": [2, 0]}))
            .unwrap_err()
            .to_string(),
        "value.mac: an array of 2 elements, not 6"
    );
    assert_eq!(
        be.decode_value(&json!({"ipp": 1})).unwrap_err().to_string(),
        "value.ipp: the struct has no member \"ipp\" (its members: ip, mac, pad)"
    );
    assert_eq!(
        svc.decode_key(&json!(-1)).unwrap_err().to_string(),
        "key: -1 is out of range for u32 (0 to 4294967295)"
    );
    assert_eq!(
        svc.decode_key(&json!(1.5)).unwrap_err().to_string(),
        "key: 1.5 is not an integer"
    );
    assert_eq!(svc.decode_key(&json!("0x10")).unwrap(), [16, 0, 0, 0]);
    assert_eq!(svc.decode_key(&json!("4294967295")).unwrap(), [255; 4]);
}

fn service_json() -> Value {
    json!({
        "label": "web",
        "color": "BLUE",
        "offset": -2,
        "flags": 5,
        "mode": 31,
        "on": 1,
        "up": true,
        "as_u32": 0x04030201,
        "backends": [
            {"ip": "192.0.2.1", "mac": "02:00:00:00:00:01", "weight": 10},
            {"ip": "192.0.2.2", "mac": "02:00:00:00:00:02", "weight": 20},
            {"ip": "198.51.100.7", "mac": "02:00:00:00:00:03", "weight": 65535},
        ],
        "v6": "2001:db8::1",
        "big": u64::MAX,
        "neg": i64::MIN,
        "sign": "NEG",
    })
}

#[test]
fn a_struct_of_every_kind_round_trips() {
    let s = test_schema();
    let m = map(&s, "schema_services");
    assert_eq!(m.value_size, 104);
    let b = m.decode_value(&service_json()).unwrap();
    assert_eq!(&b[0..8], b"web\0\0\0\0\0");
    assert_eq!(&b[8..12], &[7, 0, 0, 0]);
    assert_eq!(&b[12..14], &(-2i16).to_le_bytes());
    assert_eq!(b[14], 5 | (31 << 3), "bitfields flags:3, mode:5");
    assert_eq!((b[15], b[16]), (1, 1));
    assert_eq!(&b[20..24], &[1, 2, 3, 4], "anonymous union, host order");
    assert_eq!(&b[24..36], &[192, 0, 2, 1, 2, 0, 0, 0, 0, 1, 10, 0]);
    assert_eq!(&b[48..52], &[198, 51, 100, 7], "addresses in network order");
    assert_eq!(&b[60..62], &[0x20, 0x01]);
    assert_eq!(b[75], 1);
    assert_eq!(&b[80..88], &[255; 8]);
    assert_eq!(&b[88..96], &i64::MIN.to_le_bytes());
    assert_eq!(&b[96..100], &[255; 4]);
    let mut want = service_json();
    // The union is shown through every member.
    want["as_bytes"] = json!([1, 2, 3, 4]);
    assert_eq!(m.encode_value(&b).unwrap(), want);

    // A missing member is zero.
    let z = m.decode_value(&json!({})).unwrap();
    assert_eq!(z, vec![0; 104]);
    let enc = m.encode_value(&z).unwrap();
    assert_eq!(enc["label"], json!(""));
    assert_eq!(enc["color"], json!("RED"));
    assert_eq!(enc["sign"], json!("ZERO"));
    assert_eq!(enc["v6"], json!("::"));
}

#[test]
fn errors_name_the_field_path() {
    let s = test_schema();
    let m = map(&s, "schema_services");
    let e = |patch: Value| {
        let mut v = service_json();
        let (k, x) = patch.as_object().unwrap().iter().next().unwrap();
        v[k] = x.clone();
        m.decode_value(&v).unwrap_err().to_string()
    };
    let mut v = service_json();
    v["backends"][2]["ip"] = json!("300.1.1.1");
    assert_eq!(
        m.decode_value(&v)
            .unwrap_err()
            .within("entries[3]")
            .to_string(),
        "entries[3].value.backends[2].ip: \"300.1.1.1\" is not an IPv4 address"
    );
    v["backends"][2]["ip"] = json!("192.0.2.9");
    v["backends"][1]["mac"] = json!("02:00:00:00:00");
    assert_eq!(
        m.decode_value(&v).unwrap_err().to_string(),
        "value.backends[1].mac: \"02:00:00:00:00\" is not a MAC address such as \"02:00:00:00:00:01\""
    );
    assert_eq!(
        e(json!({"flags": 8})),
        "value.flags: 8 is out of range for u3 (0 to 7)"
    );
    assert_eq!(
        e(json!({"offset": 32768})),
        "value.offset: 32768 is out of range for i16 (-32768 to 32767)"
    );
    assert_eq!(
        e(json!({"label": "much too long"})),
        "value.label: a string of 13 bytes does not fit char[8] with its NUL"
    );
    assert_eq!(
        e(json!({"up": "yes"})),
        "value.up: \"yes\" is not a bool (true or false)"
    );
    assert_eq!(
        e(json!({"v6": "2001:db8::g"})),
        "value.v6: \"2001:db8::g\" is not an IPv6 address"
    );
    assert_eq!(
        e(json!({"as_bytes": [9, 9, 9, 9]})),
        "value: members as_u32 and as_bytes of the union disagree about byte 0"
    );
    assert_eq!(
        e(json!({"backends": {"ip": 1}})),
        "value.backends: {\"ip\":1} is not an array of 3"
    );
    assert_eq!(
        m.decode_value(&json!([])).unwrap_err().to_string(),
        "value: [] is not an object (struct service)"
    );
}

#[test]
fn integer_spellings_and_ranges() {
    let s = test_schema();
    let m = map(&s, "schema_services");
    let field = |name: &str, v: Value| {
        let mut j = json!({});
        j[name] = v;
        m.decode_value(&j)
            .map(|b| m.encode_value(&b).unwrap()[name].clone())
    };
    assert_eq!(
        field("big", json!("0xFFFFFFFFFFFFFFFF")).unwrap(),
        json!(u64::MAX)
    );
    assert_eq!(
        field("big", json!("18446744073709551615")).unwrap(),
        json!(u64::MAX)
    );
    assert_eq!(
        field("neg", json!("-0x8000000000000000")).unwrap(),
        json!(i64::MIN)
    );
    assert_eq!(field("neg", json!("-0")).unwrap(), json!(0));
    assert_eq!(field("offset", json!("-32768")).unwrap(), json!(-32768));
    for bad in [
        json!("+5"),
        json!(" 5"),
        json!("0x"),
        json!("5e3"),
        json!(""),
        json!(null),
        json!(true),
    ] {
        assert!(field("big", bad.clone()).is_err(), "{bad}");
    }
    assert_eq!(
        field("big", json!("18446744073709551616"))
            .unwrap_err()
            .to_string(),
        "value.big: \"18446744073709551616\" is out of range for u64 (0 to 18446744073709551615)"
    );
    assert_eq!(
        field("neg", json!("-9223372036854775809"))
            .unwrap_err()
            .to_string(),
        "value.neg: \"-9223372036854775809\" is out of range for i64 (-9223372036854775808 to 9223372036854775807)"
    );
    assert!(field("big", json!("340282366920938463463374607431768211456")).is_err());

    // 128-bit integers: beyond 64 bits they are written as strings.
    let w = map(&s, "schema_wide");
    assert_eq!(w.key_size, 16);
    let k = w
        .decode_key(&json!("-170141183460469231731687303715884105728"))
        .unwrap();
    assert_eq!(k, i128::MIN.to_le_bytes());
    assert_eq!(
        w.encode_key(&k).unwrap(),
        json!("-170141183460469231731687303715884105728")
    );
    assert_eq!(w.encode_key(&(-1i128).to_le_bytes()).unwrap(), json!(-1));
    let v = w
        .decode_value(&json!("0xffffffffffffffffffffffffffffffff"))
        .unwrap();
    assert_eq!(v, [255; 16]);
    assert_eq!(w.encode_value(&v).unwrap(), json!(u128::MAX.to_string()));
    assert_eq!(
        w.encode_value(&[7; 16][..8].repeat(2)).unwrap(),
        json!(u128::from_le_bytes([7; 16]).to_string())
    );
}

#[test]
fn a_policy_map_has_its_inner_definition() {
    let s = test_schema();
    let m = map(&s, "schema_policy_with_a_long_name");
    assert_eq!(m.kernel_name, "schema_policy_w");
    assert_eq!(s.map("schema_policy_w"), Some(m), "found by kernel name");
    assert!(m.is_policy_map());
    assert_eq!(m.map_type.name(), "array_of_maps");
    assert_eq!((m.key_size, m.value_size, m.max_entries), (4, 4, 1));
    let inner = m.inner.as_deref().expect("inner definition");
    assert_eq!(inner.map_type.name(), "lpm_trie");
    assert_eq!(
        (inner.key_size, inner.value_size, inner.max_entries),
        (8, 8, 100_000)
    );
    assert_eq!(inner.map_flags, 1);
    assert_eq!(m.entries(), Some(inner));
    assert_eq!(
        m.entries()
            .unwrap()
            .decode_key(&json!("10.0.0.0/8"))
            .unwrap(),
        [8, 0, 0, 0, 10, 0, 0, 0]
    );
    let printed = serde_json::to_value(m).unwrap();
    assert_eq!(
        printed["map_type"],
        json!({"id": 12, "name": "array_of_maps"})
    );
    assert_eq!(
        printed["inner"]["map_type"],
        json!({"id": 11, "name": "lpm_trie"})
    );

    // Plain maps are not policy maps, and their entries are their own.
    let plain = map(&s, "schema_services");
    assert!(!plain.is_policy_map());
    assert_eq!(plain.entries(), Some(plain));
    // A stage's prog array holds programs, which no policy writes.
    let ddos = Schema::from_elf(rootlet_ebpf::DDOS).unwrap();
    assert_eq!(map(&ddos, "rootlet_next").entries(), None);
}

#[test]
fn per_cpu_values_are_one_per_cpu() {
    let s = test_schema();
    let m = map(&s, "schema_percpu");
    // Each CPU's value is padded to 8 bytes, as the kernel returns them.
    let b = m.decode_value(&json!([1, 2, "0xffffffff"])).unwrap();
    assert_eq!(
        b,
        [
            1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 255, 255, 255, 255, 0, 0, 0, 0
        ]
    );
    assert_eq!(m.encode_value(&b).unwrap(), json!([1, 2, 4294967295u32]));
    assert!(m.decode_value(&json!(1)).is_err());
    assert!(m.decode_value(&json!([])).is_err());
    assert!(m.encode_value(&b[..20]).is_err());
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
        "map ddos_blocklist: value size 8 became 4"
    );

    // The same sizes with a renamed member, or another type of the same
    // size, are refused too.
    let mut renamed = old.clone();
    if let rootlet_schema::Type::Struct(c) = &mut renamed.key {
        c.members[1].name = Some("saddr".into());
    }
    assert_eq!(
        old.compatible_with(&renamed).unwrap_err().to_string(),
        "map ddos_blocklist: key.addr: member addr at byte 4 became saddr at byte 4"
    );
    let mut signed = old.clone();
    signed.value = rootlet_schema::Type::Int {
        size: 8,
        signed: true,
    };
    assert_eq!(
        old.compatible_with(&signed).unwrap_err().to_string(),
        "map ddos_blocklist: value: \"u64\" became \"i64\""
    );
    let mut tag = old.clone();
    if let rootlet_schema::Type::Struct(c) = &mut tag.key {
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
