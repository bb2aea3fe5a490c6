//! Checks on a stage's ELF object before anything touches the kernel: the
//! program exists and is XDP, BTF is present, the signature is
//! `int f(struct xdp_md *)`, the licence is GPL-compatible, it is not a
//! rootlet, and its stack plus the rootlet's fits the kernel's limit. Also
//! reads the map definitions, for the keep-maps compatibility check.

use object::{Object as _, ObjectSection as _, ObjectSymbol as _};

use super::{abi, btf::Btf, btf::BtfError, sys::MapInfo};

/// The kernel's per-program stack limit (MAX_BPF_STACK).
pub const STACK_LIMIT: u32 = 512;

/// Licences the kernel treats as GPL-compatible (license_is_gpl_compatible).
const GPL_COMPATIBLE: &[&str] = &[
    "GPL",
    "GPL v2",
    "GPL and additional rights",
    "Dual BSD/GPL",
    "Dual MIT/GPL",
    "Dual MPL/GPL",
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CheckError {
    #[error("not a BPF ELF object: {0}")]
    Elf(String),
    #[error("no program `{program}` in the object (it has: {available})")]
    NoProgram { program: String, available: String },
    #[error(
        "program `{program}` is the tail-call half of stage `{stage}` (<rootlet/stage.h>): name `{stage}`; Rootlet loads this half itself"
    )]
    ChainHalf { program: String, stage: String },
    #[error("program `{program}` is not an XDP program (section kind {section})")]
    NotXdp { program: String, section: String },
    #[error("the object has no BTF (.BTF section); compile it with clang -g")]
    NoBtf,
    #[error("{0}")]
    Signature(#[from] BtfError),
    #[error("the object is a rootlet: a rootlet cannot be a stage of itself or of another rootlet")]
    IsRootlet,
    #[error("licence `{0}` is not GPL-compatible; the rootlet is GPL-2.0")]
    License(String),
    #[error(
        "stack: the stage needs ~{stage} bytes and the rootlet {rootlet}; together over the kernel's {limit}-byte limit"
    )]
    Stack {
        stage: u32,
        rootlet: u32,
        limit: u32,
    },
    #[error(
        "map `{name}` cannot be kept: its {} differ{}: the running one is {old}, the new object wants {new}; nothing was changed",
        .fields.names().join(", "), if .fields.names().len() == 1 { "s" } else { "" }
    )]
    IncompatibleMap {
        name: String,
        /// The parameters that differ.
        fields: MapFields,
        old: String,
        new: String,
    },
    /// A kept map of the same sizes whose BTF types changed meaning (a
    /// member renamed or retyped): the kept entries would be read as
    /// something else.
    #[error("map `{name}` cannot be kept: {reason}; nothing was changed")]
    MapTypeChanged { name: String, reason: String },
}

/// A map definition from the object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapDef {
    pub name: String,
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub map_flags: u32,
}

impl MapDef {
    fn describe(&self) -> String {
        describe(
            self.map_type,
            self.key_size,
            self.value_size,
            self.max_entries,
            self.map_flags,
        )
    }
}

fn describe(map_type: u32, key: u32, value: u32, max: u32, flags: u32) -> String {
    format!("type {map_type}, key {key} B, value {value} B, {max} entries, flags {flags:#x}")
}

/// A map as [`describe`] shows it, from what the kernel says.
pub(crate) fn describe_info(i: &MapInfo) -> String {
    describe(
        i.map_type,
        i.key_size,
        i.value_size,
        i.max_entries,
        i.map_flags,
    )
}

/// What the checks learnt about a stage object.
#[derive(Debug, Clone)]
pub struct StageObject {
    /// The stage's own maps (not the rootlet's, not .rodata/.data/.bss).
    pub maps: Vec<MapDef>,
    /// Built with <rootlet/stage.h>: has the program `NAME__chain`
    /// ([`abi::chain_program`]), which the tail-call backend loads instead
    /// of `NAME` and which can continue a tail-call chain.
    pub chainable: bool,
    /// Estimated stack of the program and its deepest callee, rounded up as
    /// the verifier does (32 bytes a frame).
    pub stack: u32,
}

impl StageObject {
    /// Checks that `self`'s maps can reuse the running stage's maps.
    pub fn check_keep(&self, running: &[MapInfo]) -> Result<(), CheckError> {
        for new in &self.maps {
            let Some(old) = running.iter().find(|m| m.name == truncate(&new.name)) else {
                continue;
            };
            let fields = differing_fields(old, new);
            if !fields.is_empty() {
                return Err(CheckError::IncompatibleMap {
                    name: new.name.clone(),
                    fields,
                    old: describe(
                        old.map_type,
                        old.key_size,
                        old.value_size,
                        old.max_entries,
                        old.map_flags,
                    ),
                    new: new.describe(),
                });
            }
        }
        Ok(())
    }
}

/// The parameters of a map that must stay the same for it to be kept,
/// by the names of `bpf_map_info`'s fields.
pub const MAP_FIELDS: [&str; 5] = [
    "map_type",
    "key_size",
    "value_size",
    "max_entries",
    "map_flags",
];

/// A set of [`MAP_FIELDS`] (bit i: `MAP_FIELDS[i]`): one byte, so that
/// the error that carries it stays small.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MapFields(u8);

impl MapFields {
    /// The fields in the set, in [`MAP_FIELDS`] order.
    pub fn names(&self) -> Vec<&'static str> {
        MAP_FIELDS
            .iter()
            .enumerate()
            .filter(|(i, _)| self.0 & (1 << i) != 0)
            .map(|(_, f)| *f)
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.0 == 0
    }
}

/// Which of [`MAP_FIELDS`] differ between a running map and a definition.
pub(crate) fn differing_fields(old: &MapInfo, new: &MapDef) -> MapFields {
    let pairs = [
        (old.map_type, new.map_type),
        (old.key_size, new.key_size),
        (old.value_size, new.value_size),
        (old.max_entries, new.max_entries),
        (old.map_flags, new.map_flags),
    ];
    let mut set = 0u8;
    for (i, (o, n)) in pairs.into_iter().enumerate() {
        if o != n {
            set |= 1 << i;
        }
    }
    MapFields(set)
}

/// The kernel keeps 15 bytes of a map name. A name from an uploaded object
/// may be any UTF-8: the cut falls back to the last character boundary at
/// or before byte 15, so it never splits (and panics on) a character.
pub fn truncate(name: &str) -> &str {
    let mut end = name.len().min(15);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

/// aya-obj's parse of an object, which is outside input here (uploaded in
/// a bundle or a stage request). aya-obj 0.3 assumes a well-formed ELF in
/// places, and panics where it is not; its panic is caught
/// (`rootlet_schema::untrusted`, which lists the cases found) and becomes
/// the object's refusal. Every aya-obj parse of an object goes through this
/// function.
///
/// Two kinds of bad input are refused before aya-obj sees them
/// ([`sections_aya_obj_can_take`]), because catching does not cover them:
/// - a failed allocation aborts the process. aya-obj allocates one thing
///   whose size the object only declares: a `.bss` section's zeroed
///   contents (`vec![0; sh_size]`), so an uploaded object declaring a
///   2^51-byte `.bss` aborted the agent (found by the property in CI);
/// - a section with a non-zero address makes aya-obj compute a program's
///   offset as `symbol.address - section.address`. With overflow checks
///   (debug builds) that panics; in a release build, the agent's, it
///   wraps, and what follows depends on the wrapped value. A relocatable
///   object's sections have address 0, so any other is refused outright,
///   the same way in every build.
pub fn parse(bytes: &[u8]) -> Result<aya_obj::Object, CheckError> {
    sections_aya_obj_can_take(bytes)?;
    match rootlet_schema::untrusted::catching(|| aya_obj::Object::parse(bytes)) {
        Ok(parsed) => parsed.map_err(|e| CheckError::Elf(e.to_string())),
        Err(why) => Err(CheckError::Elf(format!(
            "malformed object (aya-obj: {why})"
        ))),
    }
}

/// The largest section without file contents (`SHT_NOBITS`, `.bss`) an
/// object may declare: the largest array-map value the kernel accepts on
/// x86-64 (`KMALLOC_MAX_SIZE`, 4 MiB with 4 KiB pages and
/// `MAX_PAGE_ORDER` 10), which a `.bss` becomes. Anything larger the kernel
/// would refuse anyway, and making it would mean allocating it here first.
pub const MAX_UNINITIALISED_SECTION: u64 = 4 << 20;

/// Refuses an object with a section aya-obj would mishandle (see
/// [`parse`]): one with a non-zero address, or one that occupies no bytes
/// of the file but declares more than [`MAX_UNINITIALISED_SECTION`]. A
/// section with file contents is bounded by the file, which the caller
/// already holds.
fn sections_aya_obj_can_take(bytes: &[u8]) -> Result<(), CheckError> {
    let elf = object::File::parse(bytes).map_err(|e| CheckError::Elf(e.to_string()))?;
    for section in elf.sections() {
        let name = section.name().unwrap_or("?");
        if section.address() != 0 {
            return Err(CheckError::Elf(format!(
                "section `{name}` has address {:#x}; a relocatable BPF object's sections have address 0",
                section.address()
            )));
        }
        if section.file_range().is_none() && section.size() > MAX_UNINITIALISED_SECTION {
            return Err(CheckError::Elf(format!(
                "section `{name}` declares {} bytes of zeroed data; the limit is {} (the kernel's largest map value)",
                section.size(),
                MAX_UNINITIALISED_SECTION
            )));
        }
    }
    Ok(())
}

/// The names of the stage's own maps in `bytes` (see [`is_stage_map`]).
pub fn stage_maps(bytes: &[u8]) -> Result<Vec<String>, CheckError> {
    let obj = parse(bytes)?;
    Ok(obj
        .maps
        .keys()
        .filter(|n| is_stage_map(n))
        .cloned()
        .collect())
}

/// Whether a map of an object is Rootlet's own (shared with the rootlet) or
/// compiler-made (.rodata etc.), rather than the stage's.
pub fn is_stage_map(name: &str) -> bool {
    !name.starts_with("rootlet_") && !name.starts_with('.')
}

/// Runs every check on `bytes` for program `program`. `rootlet_stack` is
/// the stack the rootlet's own frame uses while a stage runs (0 for the
/// tail-call backend, whose tail calls replace the caller's frame).
pub fn inspect(bytes: &[u8], program: &str, rootlet_stack: u32) -> Result<StageObject, CheckError> {
    let elf = object::File::parse(bytes).map_err(|e| CheckError::Elf(e.to_string()))?;
    if elf.architecture() != object::Architecture::Bpf {
        return Err(CheckError::Elf(format!(
            "architecture {:?}, not BPF",
            elf.architecture()
        )));
    }
    let obj = parse(bytes)?;

    let symbols: Vec<String> = elf
        .symbols()
        .filter_map(|s| s.name().ok().map(str::to_owned))
        .collect();
    if symbols.iter().any(|s| s == "ROOTLET_CONFIG") || obj.programs.contains_key("rootlet_chain") {
        return Err(CheckError::IsRootlet);
    }

    // `NAME__chain` is the half of a stage.h stage that only the tail-call
    // backend may load: loaded as a stage of its own it would read an
    // unwritten hop configuration and never count.
    if let Some(stage) = program.strip_suffix(abi::CHAIN_SUFFIX)
        && obj.programs.contains_key(stage)
    {
        return Err(CheckError::ChainHalf {
            program: program.to_owned(),
            stage: stage.to_owned(),
        });
    }
    if !obj.programs.contains_key(program) {
        let mut names: Vec<&str> = obj.programs.keys().map(String::as_str).collect();
        names.sort_unstable();
        return Err(CheckError::NoProgram {
            program: program.to_owned(),
            available: names.join(", "),
        });
    }
    let btf = elf.section_by_name(".BTF").ok_or(CheckError::NoBtf)?;
    let btf = btf.data().map_err(|e| CheckError::Elf(e.to_string()))?;
    let btf = Btf::parse(btf)?;

    // Built with <rootlet/stage.h>: `program` is the standalone program and
    // `program__chain` the one the tail-call backend loads. Every check
    // below applies to each program that may be loaded.
    let chain_name = abi::chain_program(program);
    let chainable = obj.programs.contains_key(&chain_name)
        && symbols.iter().any(|s| s == abi::HOP_CONFIG_GLOBAL);
    let mut stack = 0;
    for name in std::iter::once(program).chain(chainable.then_some(chain_name.as_str())) {
        let prog = &obj.programs[name];
        if !matches!(prog.section, aya_obj::ProgramSection::Xdp { .. }) {
            return Err(CheckError::NotXdp {
                program: name.to_owned(),
                section: format!("{:?}", prog.section),
            });
        }
        btf.check_xdp_signature(name)?;
        stack = stack.max(estimate_stack(&obj, prog.section_index, prog.address));
    }

    let license = obj.license.to_string_lossy().into_owned();
    if !GPL_COMPATIBLE.contains(&license.as_str()) {
        return Err(CheckError::License(license));
    }

    if stack + rootlet_stack > STACK_LIMIT {
        return Err(CheckError::Stack {
            stage: stack,
            rootlet: rootlet_stack,
            limit: STACK_LIMIT,
        });
    }

    let mut maps: Vec<MapDef> = obj
        .maps
        .iter()
        .filter(|(name, _)| is_stage_map(name))
        .map(|(name, m)| MapDef {
            name: name.clone(),
            map_type: m.map_type(),
            key_size: m.key_size(),
            value_size: m.value_size(),
            max_entries: m.max_entries(),
            map_flags: m.map_flags(),
        })
        .collect();
    maps.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(StageObject {
        maps,
        chainable,
        stack,
    })
}

/// The stack the freplace rootlet's own frame holds while a stage runs,
/// computed from the embedded rootlet object.
pub fn rootlet_frame(rootlet_elf: &[u8], program: &str) -> u32 {
    parse(rootlet_elf)
        .ok()
        .and_then(|obj| {
            let p = obj.programs.get(program)?;
            obj.functions
                .get(&(p.section_index, p.address))
                .map(|f| round_frame(frame_of(&f.instructions)))
        })
        .unwrap_or(32)
}

fn estimate_stack(obj: &aya_obj::Object, section: usize, address: u64) -> u32 {
    let Some(main) = obj.functions.get(&(section, address)) else {
        return 0;
    };
    let calls = main
        .instructions
        .iter()
        .any(|i| i.code == 0x85 && i.src_reg() == 1);
    let deepest_callee = if calls {
        obj.functions
            .iter()
            .filter(|(k, _)| **k != (section, address))
            .map(|(_, f)| round_frame(frame_of(&f.instructions)))
            .max()
            .unwrap_or(0)
    } else {
        0
    };
    round_frame(frame_of(&main.instructions)) + deepest_callee
}

fn round_frame(bytes: u32) -> u32 {
    bytes.max(1).div_ceil(32) * 32
}

/// The deepest offset below the frame pointer (r10) a function touches:
/// loads and stores through r10, and pointers derived as `rX = r10; rX += -N`.
fn frame_of(insns: &[aya_obj::generated::bpf_insn]) -> u32 {
    const CLASS_LDX: u8 = 0x01;
    const CLASS_ST: u8 = 0x02;
    const CLASS_STX: u8 = 0x03;
    const MOV64_X: u8 = 0xbf;
    const ADD64_K: u8 = 0x07;
    let mut deepest: i64 = 0;
    let mut fp_copy = [false; 11];
    for insn in insns {
        let (dst, src) = (insn.dst_reg() as usize, insn.src_reg() as usize);
        let class = insn.code & 0x07;
        match class {
            CLASS_ST | CLASS_STX if dst == 10 => deepest = deepest.max(-(insn.off as i64)),
            CLASS_LDX if src == 10 => deepest = deepest.max(-(insn.off as i64)),
            _ => {}
        }
        if dst <= 10 {
            if insn.code == MOV64_X {
                fp_copy[dst] = src == 10;
                continue;
            }
            if insn.code == ADD64_K && fp_copy[dst] {
                deepest = deepest.max(-(insn.imm as i64));
            }
            if class == 0x07 || class == 0x04 || class == CLASS_LDX {
                fp_copy[dst] = false;
            }
        }
    }
    deepest.clamp(0, 4096) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_never_splits_a_character() {
        assert_eq!(truncate("short"), "short");
        assert_eq!(truncate("exactly_fifteen"), "exactly_fifteen");
        assert_eq!(truncate("a_longer_map_name"), "a_longer_map_na");
        // 14 ASCII bytes, then a 2-byte character across byte 15: the cut
        // used to land inside it and panic.
        assert_eq!(truncate("fourteen_bytesé_more"), "fourteen_bytes");
        assert_eq!(truncate("ééééééééé"), "ééééééé");
        assert_eq!(truncate("🦀🦀🦀🦀🦀"), "🦀🦀🦀");
    }

    #[test]
    fn sample_stages_pass_every_check() {
        for (obj, prog) in [
            (rootlet_ebpf::SAMPLER, "sampler"),
            (rootlet_ebpf::DDOS, "ddos"),
            (rootlet_ebpf::L4LB, "l4lb"),
        ] {
            let o = inspect(obj, prog, 32).unwrap_or_else(|e| panic!("{prog}: {e}"));
            assert!(o.chainable, "{prog} is built with stage.h");
            assert!(o.stack < 256, "{prog} stack {}", o.stack);
        }
        let ddos = inspect(rootlet_ebpf::DDOS, "ddos", 32).unwrap();
        assert_eq!(
            ddos.maps
                .iter()
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>(),
            ["ddos_blocklist", "ddos_hits"]
        );
    }

    /// Whether `program` in `bytes` calls bpf_tail_call (helper 12).
    fn calls_tail_call(bytes: &[u8], program: &str) -> bool {
        let obj = aya_obj::Object::parse(bytes).unwrap();
        let p = &obj.programs[program];
        obj.functions[&(p.section_index, p.address)]
            .instructions
            .iter()
            .any(|i| i.code == 0x85 && i.src_reg() == 0 && i.imm == 12)
    }

    #[test]
    fn a_stage_h_object_has_a_standalone_program_without_tail_call() {
        // libxdp's dispatcher (freplace) refuses an extension that "changes
        // packet data" where its placeholder does not; a tail call does. So
        // the standalone program has none, and the chain program is apart.
        for (obj, prog) in [
            (rootlet_ebpf::SAMPLER, "sampler"),
            (rootlet_ebpf::DDOS, "ddos"),
            (rootlet_ebpf::L4LB, "l4lb"),
            (rootlet_ebpf::TEST_PASS, "verdict"),
            (rootlet_ebpf::TEST_WITNESS, "witness"),
        ] {
            assert!(!calls_tail_call(obj, prog), "{prog} has no tail call");
            assert!(
                calls_tail_call(obj, &abi::chain_program(prog)),
                "{prog}__chain continues the chain"
            );
            assert!(inspect(obj, prog, 0).unwrap().chainable);
        }
        // Loaders that take the first program take the standalone one.
        let obj = aya_obj::Object::parse(rootlet_ebpf::TEST_PASS).unwrap();
        let (first, _) = obj
            .programs
            .iter()
            .min_by_key(|(_, p)| (p.section_index, p.address))
            .unwrap();
        assert_eq!(first, "verdict");
    }

    #[test]
    fn each_bad_object_fails_its_own_check() {
        assert!(matches!(
            inspect(b"not an elf", "x", 0),
            Err(CheckError::Elf(_))
        ));
        assert!(matches!(
            inspect(rootlet_ebpf::DDOS, "nope", 0),
            Err(CheckError::NoProgram { .. })
        ));
        assert_eq!(
            inspect(rootlet_ebpf::ROOTLET, "rootlet", 0).unwrap_err(),
            CheckError::IsRootlet
        );
        assert_eq!(
            inspect(rootlet_ebpf::ROOTLET_CHAIN, "rootlet_chain", 0).unwrap_err(),
            CheckError::IsRootlet
        );
        assert_eq!(
            inspect(rootlet_ebpf::TEST_PROPRIETARY, "proprietary", 0).unwrap_err(),
            CheckError::License("Proprietary".into())
        );
        let frame = rootlet_frame(rootlet_ebpf::ROOTLET, "rootlet");
        assert!(
            matches!(
                inspect(rootlet_ebpf::TEST_BIGSTACK, "bigstack", frame),
                Err(CheckError::Stack { .. })
            ),
            "rootlet frame {frame}"
        );
        let plain = inspect(rootlet_ebpf::TEST_PLAIN, "plain", 0).unwrap();
        assert!(!plain.chainable);
        // The tail-call half of a stage.h stage is not a stage of its own.
        assert_eq!(
            inspect(rootlet_ebpf::DDOS, "ddos__chain", 0).unwrap_err(),
            CheckError::ChainHalf {
                program: "ddos__chain".into(),
                stage: "ddos".into()
            }
        );
    }

    #[test]
    fn incompatible_maps_are_named() {
        let new = inspect(rootlet_ebpf::TEST_DDOS_INCOMPATIBLE, "ddos", 0).unwrap();
        let running = MapInfo {
            id: 1,
            map_type: 11,
            name: "ddos_blocklist".into(),
            key_size: 8,
            value_size: 8,
            max_entries: 65536,
            map_flags: 1,
        };
        let err = new.check_keep(&[running]).unwrap_err();
        assert!(
            matches!(err, CheckError::IncompatibleMap { ref name, ref fields, .. } if name == "ddos_blocklist" && fields.names()[..] == MAP_FIELDS[..]),
            "{err}"
        );
    }
}
