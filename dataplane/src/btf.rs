//! A stage's BTF: aya-obj validates it; a small reader here finds functions
//! by name and checks that a function's signature is
//! `int f(struct xdp_md *)`, which is what a stage must have to replace a
//! rootlet placeholder or to run as an XDP program.
//!
//! Why the reading is hand-written: aya-obj 0.3 parses and validates BTF
//! (`aya_obj::btf::Btf::parse`, called through
//! `rootlet_schema::untrusted::validate_btf`, which catches its panics). But
//! it gives no way to read a type back: `type_by_id`, `resolve_type`,
//! `type_name` and `types()` are `pub(crate)`, and so are the fields of
//! `FuncProto`, `Ptr`, `Struct` and the other `BtfType` variants. A
//! signature check must follow FUNC -> FUNC_PROTO -> return and parameter
//! types -> PTR -> STRUCT and read names, so [`Types`] reads the type section
//! itself. It finds functions by name too: aya-obj's public
//! `id_by_type_name_kind` slices its string section at a name offset checked
//! only against the header's `str_off + str_len`, and panicked on a stage
//! whose BTF had one bit flipped (found by `tests/object_properties.rs`);
//! here every string read is bounded by the strings themselves.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("BTF is truncated or malformed: {0}")]
    Malformed(String),
    #[error("no function `{0}` in BTF")]
    NoSuchFunction(String),
    #[error("function `{name}` has signature {found}, expected int {name}(struct xdp_md *)")]
    WrongSignature { name: String, found: String },
}

fn malformed(what: &str) -> BtfError {
    BtfError::Malformed(what.to_owned())
}

const BTF_MAGIC: u16 = 0xeb9f;

/// How many pointers deep an error message follows a type (`int ****`).
const MAX_POINTERS: u32 = 8;
const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, Clone)]
struct Type {
    name_off: u32,
    kind: u32,
    /// size, or the referenced type id, depending on kind
    size_or_type: u32,
    /// FUNC_PROTO parameter type ids
    params: Vec<u32>,
}

/// BTF that aya-obj has validated, read by [`Types`].
#[derive(Debug)]
pub struct Btf {
    types: Types,
}

/// The type section, read by hand (see the module comment for why): types
/// by id (id 0 is void) and the string section.
#[derive(Debug)]
struct Types {
    types: Vec<Type>,
    strings: Vec<u8>,
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, BtfError> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or_else(|| malformed("read past end"))
}

impl Btf {
    /// Parses a little-endian BTF blob (an ELF `.BTF` section, or what the
    /// kernel returns for a loaded program).
    pub fn parse(b: &[u8]) -> Result<Self, BtfError> {
        let magic = b
            .get(0..2)
            .map(|s| u16::from_le_bytes([s[0], s[1]]))
            .ok_or_else(|| malformed("no header"))?;
        if magic != BTF_MAGIC {
            return Err(malformed("bad magic (not little-endian BTF)"));
        }
        rootlet_schema::untrusted::validate_btf(b).map_err(|e| match e {
            rootlet_schema::SchemaError::Malformed(why) => BtfError::Malformed(why),
            other => BtfError::Malformed(other.to_string()),
        })?;
        Ok(Btf {
            types: Types::parse(b)?,
        })
    }

    /// The BTF id of function `name`, the first FUNC of that name (what
    /// BPF_LINK_CREATE wants as `target_btf_id` for freplace).
    pub fn func_id(&self, name: &str) -> Result<u32, BtfError> {
        self.types.func_id(name)
    }

    /// Checks that function `name` is `int name(struct xdp_md *)`.
    pub fn check_xdp_signature(&self, name: &str) -> Result<(), BtfError> {
        let id = self.func_id(name)?;
        self.types.check_xdp_signature(id, name)
    }
}

impl Types {
    /// Reads the type section of a blob aya-obj has accepted.
    fn parse(b: &[u8]) -> Result<Self, BtfError> {
        let hdr_len = u32_at(b, 4)? as usize;
        let type_off = u32_at(b, 8)? as usize;
        let type_len = u32_at(b, 12)? as usize;
        let str_off = u32_at(b, 16)? as usize;
        let str_len = u32_at(b, 20)? as usize;
        let types_bytes = b
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .ok_or_else(|| malformed("type section out of bounds"))?;
        let strings = b
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or_else(|| malformed("string section out of bounds"))?
            .to_vec();

        let mut types = vec![Type {
            name_off: 0,
            kind: 0,
            size_or_type: 0,
            params: vec![],
        }];
        let mut off = 0;
        while off < types_bytes.len() {
            let name_off = u32_at(types_bytes, off)?;
            let info = u32_at(types_bytes, off + 4)?;
            let size_or_type = u32_at(types_bytes, off + 8)?;
            off += 12;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let mut params = vec![];
            off += match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
                KIND_ENUM => 8 * vlen,
                KIND_FUNC_PROTO => {
                    for i in 0..vlen {
                        params.push(u32_at(types_bytes, off + i * 8 + 4)?);
                    }
                    8 * vlen
                }
                KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
                | KIND_FUNC | 16 | KIND_TYPE_TAG => 0,
                _ => return Err(malformed("unknown BTF kind")),
            };
            types.push(Type {
                name_off,
                kind,
                size_or_type,
                params,
            });
        }
        Ok(Types { types, strings })
    }

    fn str_at(&self, off: u32) -> &str {
        let s = self.strings.get(off as usize..).unwrap_or_default();
        let end = s.iter().position(|&c| c == 0).unwrap_or(s.len());
        std::str::from_utf8(&s[..end]).unwrap_or("?")
    }

    fn func_id(&self, name: &str) -> Result<u32, BtfError> {
        (1..self.types.len())
            .find(|&id| {
                let t = &self.types[id];
                t.kind == KIND_FUNC && self.str_at(t.name_off) == name
            })
            .and_then(|id| u32::try_from(id).ok())
            .ok_or_else(|| BtfError::NoSuchFunction(name.to_owned()))
    }

    fn ty(&self, id: u32) -> Option<&Type> {
        self.types.get(id as usize)
    }

    /// Skips typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let t = self.ty(id)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type
                }
                _ => return Some(t),
            }
        }
        None
    }

    /// A type as C would print it, for an error message. Pointers are
    /// followed at most [`MAX_POINTERS`] deep: a PTR may point at itself in
    /// uploaded BTF, and following it unbounded overflowed the stack (found
    /// by `tests/object_properties.rs`; a stack overflow aborts the agent).
    fn describe(&self, id: u32) -> String {
        self.describe_within(id, MAX_POINTERS)
    }

    fn describe_within(&self, id: u32, pointers: u32) -> String {
        match self.resolve(id) {
            None => "?".into(),
            Some(t) if id == 0 || t.kind == 0 => "void".into(),
            Some(t) => match t.kind {
                KIND_INT => self.str_at(t.name_off).into(),
                KIND_PTR if pointers == 0 => "… *".into(),
                KIND_PTR => format!("{} *", self.describe_within(t.size_or_type, pointers - 1)),
                KIND_STRUCT | KIND_FWD => format!("struct {}", self.str_at(t.name_off)),
                KIND_UNION => format!("union {}", self.str_at(t.name_off)),
                KIND_ENUM | KIND_ENUM64 => format!("enum {}", self.str_at(t.name_off)),
                _ => format!("<kind {}>", t.kind),
            },
        }
    }

    /// Checks that function `name`, type `id`, is `int name(struct xdp_md *)`.
    fn check_xdp_signature(&self, id: u32, name: &str) -> Result<(), BtfError> {
        let func = self
            .ty(id)
            .filter(|t| t.kind == KIND_FUNC)
            .ok_or_else(|| malformed("dangling FUNC"))?;
        let proto = self
            .ty(func.size_or_type)
            .filter(|t| t.kind == KIND_FUNC_PROTO)
            .ok_or_else(|| malformed("FUNC without FUNC_PROTO"))?;
        let ret_ok = self
            .resolve(proto.size_or_type)
            .is_some_and(|t| t.kind == KIND_INT);
        let param_ok = proto.params.len() == 1
            && self
                .resolve(proto.params[0])
                .filter(|t| t.kind == KIND_PTR)
                .and_then(|p| self.resolve(p.size_or_type))
                .is_some_and(|s| {
                    (s.kind == KIND_STRUCT || s.kind == KIND_FWD)
                        && self.str_at(s.name_off) == "xdp_md"
                });
        if ret_ok && param_ok {
            return Ok(());
        }
        let params: Vec<String> = proto.params.iter().map(|&p| self.describe(p)).collect();
        Err(BtfError::WrongSignature {
            name: name.to_owned(),
            found: format!(
                "{} {name}({})",
                self.describe(proto.size_or_type),
                params.join(", ")
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob of `types` (each already encoded) and `strings`.
    fn blob(types: &[u32], strings: &[u8]) -> Vec<u8> {
        let type_len = (types.len() * 4) as u32;
        let mut b = Vec::new();
        b.extend_from_slice(&BTF_MAGIC.to_le_bytes());
        b.extend_from_slice(&[1, 0]); // version, flags
        for v in [24, 0, type_len, type_len, strings.len() as u32] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        for t in types {
            b.extend_from_slice(&t.to_le_bytes());
        }
        b.extend_from_slice(strings);
        b
    }

    fn info(kind: u32, vlen: u32) -> u32 {
        (kind << 24) | vlen
    }

    /// `int good(struct xdp_md *)` and `int bad(int)`.
    fn two_functions() -> Vec<u8> {
        // offsets:          0  1    5       12    17
        let strings = b"\0int\0xdp_md\0good\0bad\0";
        #[rustfmt::skip]
        let types = [
            // 1: int (32 bits, signed)
            1, info(KIND_INT, 0), 4, (1 << 24) | 32,
            // 2: struct xdp_md {} (members do not matter here)
            5, info(KIND_STRUCT, 0), 0,
            // 3: struct xdp_md *
            0, info(KIND_PTR, 0), 2,
            // 4: int (struct xdp_md *)
            0, info(KIND_FUNC_PROTO, 1), 1, 0, 3,
            // 5: int good(struct xdp_md *), global linkage
            12, info(KIND_FUNC, 1), 4,
            // 6: int (int)
            0, info(KIND_FUNC_PROTO, 1), 1, 0, 1,
            // 7: int bad(int)
            17, info(KIND_FUNC, 1), 6,
        ];
        blob(&types, strings)
    }

    #[test]
    fn finds_functions_and_checks_their_signature() {
        let b = two_functions();
        let btf = Btf::parse(&b).unwrap();
        assert_eq!(btf.func_id("good"), Ok(5));
        assert_eq!(btf.func_id("bad"), Ok(7));
        assert_eq!(btf.check_xdp_signature("good"), Ok(()));
        assert_eq!(
            btf.check_xdp_signature("bad").unwrap_err().to_string(),
            "function `bad` has signature int bad(int), expected int bad(struct xdp_md *)"
        );
        assert_eq!(
            btf.func_id("missing"),
            Err(BtfError::NoSuchFunction("missing".into()))
        );
        // A struct is not a function.
        assert_eq!(
            btf.check_xdp_signature("xdp_md"),
            Err(BtfError::NoSuchFunction("xdp_md".into()))
        );
    }

    #[test]
    fn a_real_stage_has_the_xdp_signature() {
        let elf = object::read::File::parse(rootlet_ebpf::DDOS).unwrap();
        use object::{Object as _, ObjectSection as _};
        let data = elf.section_by_name(".BTF").unwrap().data().unwrap();
        let btf = Btf::parse(data).unwrap();
        assert_eq!(btf.check_xdp_signature("ddos"), Ok(()));
    }

    /// A name offset past the strings but inside the header's
    /// `str_off + str_len` (one flipped bit in a real stage's BTF did
    /// this): aya-obj accepts the blob, and its name lookup panicked. The
    /// function with that name is simply not found; the others still are.
    #[test]
    fn a_name_past_the_strings_is_not_found_not_a_panic() {
        let strings_len = b"\0int\0xdp_md\0good\0bad\0".len();
        let mut b = two_functions();
        // Type 7 (`bad`) is the last: its name_off is 12 bytes from the end
        // of the type section, which the strings follow.
        let name_off = 24 + (b.len() - 24 - strings_len) - 12;
        let past = (strings_len + 8) as u32;
        assert!(24 + (b.len() - 24 - strings_len) + strings_len > past as usize);
        b[name_off..name_off + 4].copy_from_slice(&past.to_le_bytes());
        let btf = Btf::parse(&b).expect("aya-obj accepts it");
        assert_eq!(
            btf.func_id("bad"),
            Err(BtfError::NoSuchFunction("bad".into()))
        );
        assert_eq!(btf.func_id("good"), Ok(5));
        assert_eq!(btf.check_xdp_signature("good"), Ok(()));
    }

    /// A pointer to itself as the parameter (the stack overflow the
    /// property found): the signature is refused and described, cut off.
    #[test]
    fn a_pointer_to_itself_is_described_not_followed_forever() {
        let strings = b"\0int\0loop\0";
        #[rustfmt::skip]
        let types = [
            // 1: int
            1, info(KIND_INT, 0), 4, (1 << 24) | 32,
            // 2: a pointer to type 2
            0, info(KIND_PTR, 0), 2,
            // 3: int (<2>)
            0, info(KIND_FUNC_PROTO, 1), 1, 0, 2,
            // 4: int loop(<2>)
            5, info(KIND_FUNC, 1), 3,
        ];
        let b = blob(&types, strings);
        let btf = Btf::parse(&b).expect("aya-obj accepts it");
        let found = "int loop(… * * * * * * * * *)".to_owned();
        assert_eq!(
            btf.check_xdp_signature("loop"),
            Err(BtfError::WrongSignature {
                name: "loop".into(),
                found
            })
        );
    }

    #[test]
    fn broken_blobs_are_malformed() {
        let b = two_functions();
        for cut in [0, 1, 10, 30, b.len() - 1] {
            assert!(
                matches!(Btf::parse(&b[..cut]), Err(BtfError::Malformed(_))),
                "cut at {cut}"
            );
        }
        let mut big_endian = b.clone();
        big_endian[..2].copy_from_slice(&BTF_MAGIC.to_be_bytes());
        assert_eq!(
            Btf::parse(&big_endian).unwrap_err(),
            BtfError::Malformed("bad magic (not little-endian BTF)".into())
        );
    }
}
