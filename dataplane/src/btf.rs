//! A minimal reader of raw BTF: enough to find a function by name and check
//! that its signature is `int f(struct xdp_md *)`, which is what a stage must
//! have to replace a rootlet placeholder or to run as an XDP program.

use std::collections::HashMap;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("BTF is truncated or malformed: {0}")]
    Malformed(&'static str),
    #[error("no function `{0}` in BTF")]
    NoSuchFunction(String),
    #[error("function `{name}` has signature {found}, expected int {name}(struct xdp_md *)")]
    WrongSignature { name: String, found: String },
}

const BTF_MAGIC: u16 = 0xeb9f;

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

/// Parsed BTF: types by id (id 0 is void) and the string section.
#[derive(Debug)]
pub struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
    funcs: HashMap<String, u32>,
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, BtfError> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(BtfError::Malformed("read past end"))
}

impl Btf {
    /// Parses a little-endian BTF blob (an ELF `.BTF` section, or what the
    /// kernel returns for a loaded program).
    pub fn parse(b: &[u8]) -> Result<Self, BtfError> {
        let magic = b
            .get(0..2)
            .map(|s| u16::from_le_bytes([s[0], s[1]]))
            .ok_or(BtfError::Malformed("no header"))?;
        if magic != BTF_MAGIC {
            return Err(BtfError::Malformed("bad magic (not little-endian BTF)"));
        }
        let hdr_len = u32_at(b, 4)? as usize;
        let type_off = u32_at(b, 8)? as usize;
        let type_len = u32_at(b, 12)? as usize;
        let str_off = u32_at(b, 16)? as usize;
        let str_len = u32_at(b, 20)? as usize;
        let types_bytes = b
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .ok_or(BtfError::Malformed("type section out of bounds"))?;
        let strings = b
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(BtfError::Malformed("string section out of bounds"))?
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
                _ => return Err(BtfError::Malformed("unknown BTF kind")),
            };
            types.push(Type {
                name_off,
                kind,
                size_or_type,
                params,
            });
        }
        let mut btf = Btf {
            types,
            strings,
            funcs: HashMap::new(),
        };
        for (id, t) in btf.types.iter().enumerate() {
            if t.kind == KIND_FUNC {
                btf.funcs
                    .insert(btf.str_at(t.name_off).to_owned(), id as u32);
            }
        }
        Ok(btf)
    }

    fn str_at(&self, off: u32) -> &str {
        let s = self.strings.get(off as usize..).unwrap_or_default();
        let end = s.iter().position(|&c| c == 0).unwrap_or(s.len());
        std::str::from_utf8(&s[..end]).unwrap_or("?")
    }

    fn ty(&self, id: u32) -> Option<&Type> {
        self.types.get(id as usize)
    }

    /// The BTF id of function `name` (what BPF_LINK_CREATE wants as
    /// `target_btf_id` for freplace).
    pub fn func_id(&self, name: &str) -> Result<u32, BtfError> {
        self.funcs
            .get(name)
            .copied()
            .ok_or_else(|| BtfError::NoSuchFunction(name.to_owned()))
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

    fn describe(&self, id: u32) -> String {
        match self.resolve(id) {
            None => "?".into(),
            Some(t) if id == 0 || t.kind == 0 => "void".into(),
            Some(t) => match t.kind {
                KIND_INT => self.str_at(t.name_off).into(),
                KIND_PTR => format!("{} *", self.describe(t.size_or_type)),
                KIND_STRUCT | KIND_FWD => format!("struct {}", self.str_at(t.name_off)),
                KIND_UNION => format!("union {}", self.str_at(t.name_off)),
                KIND_ENUM | KIND_ENUM64 => format!("enum {}", self.str_at(t.name_off)),
                _ => format!("<kind {}>", t.kind),
            },
        }
    }

    /// Checks that function `name` is `int name(struct xdp_md *)`.
    pub fn check_xdp_signature(&self, name: &str) -> Result<(), BtfError> {
        let func = self
            .ty(self.func_id(name)?)
            .ok_or(BtfError::Malformed("dangling FUNC"))?;
        let proto = self
            .ty(func.size_or_type)
            .filter(|t| t.kind == KIND_FUNC_PROTO)
            .ok_or(BtfError::Malformed("FUNC without FUNC_PROTO"))?;
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
