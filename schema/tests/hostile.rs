//! BTF built by hand to be hostile: typedef loops, a struct that contains
//! itself, types that fan out exponentially, dangling ids. Each is an
//! error, never a stack overflow or a hang.
#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failure is the test failing"
)]

use rootlet_schema::{Schema, SchemaError};

const INT: u32 = 1;
const PTR: u32 = 2;
const ARRAY: u32 = 3;
const STRUCT: u32 = 4;
const TYPEDEF: u32 = 8;
const VAR: u32 = 14;
const DATASEC: u32 = 15;

/// A BTF blob under construction; ids are assigned in order from 1.
struct Blob {
    words: Vec<u32>,
    strings: Vec<u8>,
    next: u32,
}

impl Blob {
    fn new() -> Self {
        Blob {
            words: vec![],
            strings: vec![0],
            next: 1,
        }
    }

    fn s(&mut self, name: &str) -> u32 {
        if name.is_empty() {
            return 0;
        }
        let off = self.strings.len() as u32;
        self.strings.extend_from_slice(name.as_bytes());
        self.strings.push(0);
        off
    }

    fn push(&mut self, words: &[u32]) -> u32 {
        self.words.extend_from_slice(words);
        self.next += 1;
        self.next - 1
    }

    fn int(&mut self, name: &str, size: u32) -> u32 {
        let n = self.s(name);
        self.push(&[n, INT << 24, size, size * 8])
    }

    fn ptr(&mut self, to: u32) -> u32 {
        self.push(&[0, PTR << 24, to])
    }

    fn array(&mut self, elem: u32, len: u32, index: u32) -> u32 {
        self.push(&[0, ARRAY << 24, 0, elem, index, len])
    }

    fn typedef(&mut self, name: &str, to: u32) -> u32 {
        let n = self.s(name);
        self.push(&[n, TYPEDEF << 24, to])
    }

    /// members: (name, type, bit offset)
    fn strukt(&mut self, name: &str, size: u32, members: &[(&str, u32, u32)]) -> u32 {
        let n = self.s(name);
        let mut w = vec![n, (STRUCT << 24) | members.len() as u32, size];
        for (m, ty, off) in members {
            let mn = self.s(m);
            w.extend_from_slice(&[mn, *ty, *off]);
        }
        self.push(&w)
    }

    /// A `.maps` section with one hash map `name` whose key is `key`.
    fn map_with_key(&mut self, name: &str, key: u32) {
        let int = self.int("int", 4);
        let idx = self.int("__ARRAY_SIZE_TYPE__", 4);
        let one = self.array(int, 1, idx);
        let ty = self.ptr(one);
        let kp = self.ptr(key);
        let def = self.strukt("", 16, &[("type", ty, 0), ("key", kp, 64)]);
        let n = self.s(name);
        let var = self.push(&[n, VAR << 24, def, 1]);
        let sec = self.s(".maps");
        self.push(&[sec, (DATASEC << 24) | 1, 16, var, 0, 16]);
    }

    fn bytes(&self) -> Vec<u8> {
        let type_len = (self.words.len() * 4) as u32;
        let mut b = Vec::new();
        b.extend_from_slice(&0xeb9fu16.to_le_bytes());
        b.extend_from_slice(&[1, 0]);
        for v in [24, 0, type_len, type_len, self.strings.len() as u32] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        for w in &self.words {
            b.extend_from_slice(&w.to_le_bytes());
        }
        b.extend_from_slice(&self.strings);
        b
    }
}

fn inner(e: SchemaError) -> SchemaError {
    match e {
        SchemaError::Map { error, .. } => *error,
        e => e,
    }
}

#[test]
fn a_well_formed_blob_parses() {
    // The builder itself is right: a plain u32 key gives a schema.
    let mut b = Blob::new();
    let u32_ = b.int("unsigned int", 4);
    b.map_with_key("m", u32_);
    let s = Schema::from_btf(&b.bytes()).unwrap();
    assert_eq!(s.maps.len(), 1);
    assert_eq!(s.maps[0].key_size, 4);
}

#[test]
fn a_typedef_loop_is_an_error() {
    let mut b = Blob::new();
    // 1 -> 2 -> 1
    let t1 = b.typedef("a_t", 2);
    b.typedef("b_t", t1);
    b.map_with_key("m", t1);
    let e = inner(Schema::from_btf(&b.bytes()).unwrap_err());
    assert_eq!(e, SchemaError::Malformed("a typedef loop".into()));
}

#[test]
fn a_struct_that_contains_itself_is_an_error() {
    let mut b = Blob::new();
    // struct s { struct s inner[1]; }: id 1 is the struct, 2 the array.
    let idx_id = 3;
    let s = b.strukt("s", 4, &[("inner", 2, 0)]);
    b.array(s, 1, idx_id);
    b.int("__ARRAY_SIZE_TYPE__", 4);
    b.map_with_key("m", s);
    let e = inner(Schema::from_btf(&b.bytes()).unwrap_err());
    assert!(
        matches!(&e, SchemaError::TooComplex(m) if m.contains("deeper than")),
        "{e}"
    );
}

#[test]
fn exponential_types_are_an_error() {
    let mut b = Blob::new();
    let mut t = b.int("unsigned char", 1);
    // 8 levels of 64 one-byte members each, all at offset 0 (BTF allows
    // overlapping members): 64^8 leaves if expanded.
    for level in 0..8 {
        let members: Vec<String> = (0..64).map(|i| format!("m{i}")).collect();
        let refs: Vec<(&str, u32, u32)> = members.iter().map(|n| (n.as_str(), t, 0)).collect();
        t = b.strukt(&format!("level{level}"), 1, &refs);
    }
    b.map_with_key("m", t);
    let started = std::time::Instant::now();
    let e = inner(Schema::from_btf(&b.bytes()).unwrap_err());
    assert!(matches!(e, SchemaError::TooComplex(_)), "{e}");
    assert!(started.elapsed().as_secs() < 5, "bounded work");
}

#[test]
fn dangling_and_wrong_ids_are_errors() {
    let mut b = Blob::new();
    b.map_with_key("m", 999);
    let e = inner(Schema::from_btf(&b.bytes()).unwrap_err());
    assert_eq!(e, SchemaError::Malformed("type id 999 out of range".into()));

    // A member outside its struct.
    let mut b = Blob::new();
    let u = b.int("unsigned int", 4);
    let s = b.strukt("s", 4, &[("x", u, 32)]);
    b.map_with_key("m", s);
    let e = inner(Schema::from_btf(&b.bytes()).unwrap_err());
    assert_eq!(
        e,
        SchemaError::Malformed("member x of s lies outside it".into())
    );
}
