//! The bpf(2) commands Rootlet issues itself, on owned file descriptors.
//!
//! aya loads ELF objects; everything that happens to a kernel object after it
//! is loaded (links, pins, updates, info, map elements, test runs) goes
//! through here, through aya where its public API takes a raw file
//! descriptor (map info) and by bpf(2) with aya-obj's bindings of the
//! attribute layouts where it does not (each wrapper says what aya lacks).
//! This is the only module with `unsafe`; every block says why it is sound.

use std::{
    ffi::CString,
    io,
    mem::{size_of, zeroed},
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

use aya_obj::generated::{
    self, bpf_attach_type, bpf_attr, bpf_btf_info, bpf_cmd, bpf_link_info, bpf_link_type,
    bpf_map_type, bpf_prog_info, bpf_prog_type,
};

/// A failed bpf(2) command: which one, and the errno.
#[derive(Debug, thiserror::Error)]
#[error("{call}: {source}")]
pub struct SysError {
    pub call: &'static str,
    #[source]
    pub source: io::Error,
}

impl SysError {
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

pub type Result<T> = std::result::Result<T, SysError>;

// What aya 0.14 covers, and why the rest is here. aya's public API works on
// the objects it loaded itself (`Ebpf`, `Xdp`, `Extension`, `ProgramFd`,
// `FdLink`, typed maps); Rootlet keeps its kernel objects as `OwnedFd`s
// (pinned, adopted by id after a restart, passed between generations), and
// aya has no public way to turn an `OwnedFd` into a program, a link or a
// `ProgramFd` (`FdLink::new` and `ProgramInfo::new_from_fd` are
// `pub(crate)`). Maps are the exception: `MapData::from_fd` takes an
// `OwnedFd`, so [`map_info`] uses aya. Every other wrapper below says what
// aya lacks. The attribute layouts and constants are aya-obj's bindgen of
// include/uapi/linux/bpf.h (`aya_obj::generated`), not hand-written.

pub const BPF_PROG_TYPE_SCHED_CLS: u32 = bpf_prog_type::BPF_PROG_TYPE_SCHED_CLS as u32;
pub const BPF_PROG_TYPE_XDP: u32 = bpf_prog_type::BPF_PROG_TYPE_XDP as u32;
pub const BPF_PROG_TYPE_EXT: u32 = bpf_prog_type::BPF_PROG_TYPE_EXT as u32;
pub const BPF_MAP_TYPE_PROG_ARRAY: u32 = bpf_map_type::BPF_MAP_TYPE_PROG_ARRAY as u32;
pub const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = bpf_map_type::BPF_MAP_TYPE_PERCPU_ARRAY as u32;
pub const BPF_XDP: u32 = bpf_attach_type::BPF_XDP as u32;
pub const BPF_TCX_INGRESS: u32 = bpf_attach_type::BPF_TCX_INGRESS as u32;
pub const BPF_LINK_TYPE_XDP: u32 = bpf_link_type::BPF_LINK_TYPE_XDP as u32;
pub const BPF_LINK_TYPE_TRACING: u32 = bpf_link_type::BPF_LINK_TYPE_TRACING as u32;
pub const XDP_FLAGS_SKB_MODE: u32 = generated::XDP_FLAGS_SKB_MODE;
pub const XDP_FLAGS_DRV_MODE: u32 = generated::XDP_FLAGS_DRV_MODE;

/// The attribute block every command takes, all zero: the kernel requires
/// zero beyond the fields a command uses.
fn attr() -> bpf_attr {
    // SAFETY: bpf_attr is a union of plain integer structs; all-zero is a
    // valid value of every member.
    unsafe { zeroed() }
}

fn bpf(call: &'static str, cmd: bpf_cmd, attr: &mut bpf_attr) -> Result<i64> {
    // SAFETY: `attr` is a valid, writable bpf_attr, and we pass its size;
    // pointers inside it point to buffers that outlive the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            (attr as *mut bpf_attr).cast::<u8>(),
            size_of::<bpf_attr>() as libc::c_long,
        )
    };
    if ret < 0 {
        Err(SysError {
            call,
            source: io::Error::last_os_error(),
        })
    } else {
        Ok(ret)
    }
}

fn bpf_fd(call: &'static str, cmd: bpf_cmd, attr: &mut bpf_attr) -> Result<OwnedFd> {
    let fd = bpf(call, cmd, attr)?;
    // SAFETY: the kernel returned a new file descriptor that nothing else
    // owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Sets the calling thread's nice value (Linux applies PRIO_PROCESS with a
/// thread id to that thread alone). nix has no setpriority.
pub fn nice_this_thread(nice: i32) -> Result<()> {
    let tid = nix::unistd::gettid().as_raw();
    // SAFETY: setpriority takes plain integers and touches no memory.
    let ret = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) };
    if ret != 0 {
        return Err(SysError {
            call: "setpriority",
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn raw(fd: BorrowedFd<'_>) -> u32 {
    fd.as_raw_fd() as u32
}

fn cpath(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| SysError {
        call: "path",
        source: io::Error::new(io::ErrorKind::InvalidInput, e),
    })
}

/// A name of at most 15 bytes, NUL-padded, as the kernel takes it.
fn obj_name(name: &str) -> [libc::c_char; 16] {
    let mut out = [0; 16];
    for (d, s) in out.iter_mut().zip(name.bytes().take(15)) {
        *d = s as libc::c_char;
    }
    out
}

// ---------------------------------------------------------------- pins

/// Pins a program, map or link at `path` in bpffs. aya pins only what it
/// owns (`FdLink::pin`, `MapData::pin`, `ProgramData::pin`); these are raw
/// file descriptors of any kind.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> Result<()> {
    let p = cpath(path)?;
    let mut a = attr();
    a.__bindgen_anon_4.pathname = p.as_ptr() as u64;
    a.__bindgen_anon_4.bpf_fd = raw(fd);
    bpf("BPF_OBJ_PIN", bpf_cmd::BPF_OBJ_PIN, &mut a).map(drop)
}

/// Opens the object pinned at `path`. aya opens pins only as typed objects
/// (`PinnedLink::from_pin`, `MapData::from_pin`, `ProgramInfo::from_pin`),
/// each with an extra info call, and none hands back the file descriptor.
pub fn obj_get(path: &Path) -> Result<OwnedFd> {
    let p = cpath(path)?;
    let mut a = attr();
    a.__bindgen_anon_4.pathname = p.as_ptr() as u64;
    bpf_fd("BPF_OBJ_GET", bpf_cmd::BPF_OBJ_GET, &mut a)
}

// ---------------------------------------------------------------- ids

// aya opens objects by id only inside `loaded_programs()`/`MapData::from_id`
// and keeps the file descriptor; these return it.

fn fd_by_id(call: &'static str, cmd: bpf_cmd, id: u32) -> Result<OwnedFd> {
    let mut a = attr();
    a.__bindgen_anon_6.__bindgen_anon_1.start_id = id;
    bpf_fd(call, cmd, &mut a)
}

pub fn prog_fd_by_id(id: u32) -> Result<OwnedFd> {
    fd_by_id("BPF_PROG_GET_FD_BY_ID", bpf_cmd::BPF_PROG_GET_FD_BY_ID, id)
}

pub fn map_fd_by_id(id: u32) -> Result<OwnedFd> {
    fd_by_id("BPF_MAP_GET_FD_BY_ID", bpf_cmd::BPF_MAP_GET_FD_BY_ID, id)
}

pub fn link_fd_by_id(id: u32) -> Result<OwnedFd> {
    fd_by_id("BPF_LINK_GET_FD_BY_ID", bpf_cmd::BPF_LINK_GET_FD_BY_ID, id)
}

fn btf_fd_by_id(id: u32) -> Result<OwnedFd> {
    fd_by_id("BPF_BTF_GET_FD_BY_ID", bpf_cmd::BPF_BTF_GET_FD_BY_ID, id)
}

// ---------------------------------------------------------------- info

fn obj_info<T: Copy>(fd: BorrowedFd<'_>, info: &mut T) -> Result<()> {
    let mut a = attr();
    a.info.bpf_fd = raw(fd);
    a.info.info_len = size_of::<T>() as u32;
    a.info.info = (info as *mut T) as u64;
    bpf(
        "BPF_OBJ_GET_INFO_BY_FD",
        bpf_cmd::BPF_OBJ_GET_INFO_BY_FD,
        &mut a,
    )
    .map(drop)
}

/// What the kernel says about a loaded program.
#[derive(Debug, Clone)]
pub struct ProgInfo {
    pub id: u32,
    pub prog_type: u32,
    pub name: String,
    pub tag: [u8; 8],
    pub load_time_ns: u64,
    pub verified_insns: u32,
    pub btf_id: u32,
    pub map_ids: Vec<u32>,
}

/// aya's `ProgramInfo` has the same fields, but is made from a file
/// descriptor only inside aya (`ProgramInfo::new_from_fd` is `pub(crate)`);
/// from outside, only from a pin or by listing every program.
pub fn prog_info(fd: BorrowedFd<'_>) -> Result<ProgInfo> {
    // SAFETY: bpf_prog_info is plain old data; all-zero is valid.
    let mut info: bpf_prog_info = unsafe { zeroed() };
    obj_info(fd, &mut info)?;
    let mut map_ids = vec![0u32; info.nr_map_ids as usize];
    if !map_ids.is_empty() {
        // SAFETY: as above.
        let mut again: bpf_prog_info = unsafe { zeroed() };
        again.nr_map_ids = map_ids.len() as u32;
        again.map_ids = map_ids.as_mut_ptr() as u64;
        obj_info(fd, &mut again)?;
        map_ids.truncate(again.nr_map_ids.min(map_ids.len() as u32) as usize);
    }
    Ok(ProgInfo {
        id: info.id,
        prog_type: info.type_,
        name: cstr_name(&info.name),
        tag: info.tag,
        load_time_ns: info.load_time,
        verified_insns: info.verified_insns,
        btf_id: info.btf_id,
        map_ids,
    })
}

/// What the kernel says about a map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapInfo {
    pub id: u32,
    pub map_type: u32,
    pub name: String,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub map_flags: u32,
}

/// Through aya: `MapData::from_fd` takes the map's (duplicated) file
/// descriptor and `MapData::info` asks the kernel.
pub fn map_info(fd: BorrowedFd<'_>) -> Result<MapInfo> {
    let map = aya::maps::MapData::from_fd(dup(fd)?).map_err(map_error)?;
    let info = map.info().map_err(map_error)?;
    let map_type = info.map_type().map_err(map_error)?;
    Ok(MapInfo {
        id: info.id(),
        map_type: map_type as u32,
        name: String::from_utf8_lossy(info.name()).into_owned(),
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        map_flags: info.map_flags(),
    })
}

/// An aya map error as a [`SysError`]: the syscall and errno when there is
/// one.
fn map_error(e: aya::maps::MapError) -> SysError {
    match e {
        aya::maps::MapError::SyscallError(aya::sys::SyscallError { call, io_error }) => SysError {
            call,
            source: io_error,
        },
        other => SysError {
            call: "BPF_OBJ_GET_INFO_BY_FD",
            source: io::Error::other(other.to_string()),
        },
    }
}

/// What the kernel says about a link. `ifindex` is set for XDP links; 0
/// means the link was detached (its interface went away, or someone called
/// BPF_LINK_DETACH on it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkInfo {
    pub id: u32,
    pub link_type: u32,
    pub prog_id: u32,
    pub ifindex: u32,
}

/// aya's `LinkInfo` has no XDP ifindex and is made only from an `FdLink`,
/// which cannot be made from a file descriptor outside aya.
pub fn link_info(fd: BorrowedFd<'_>) -> Result<LinkInfo> {
    // SAFETY: bpf_link_info is plain old data; all-zero is valid.
    let mut info: bpf_link_info = unsafe { zeroed() };
    obj_info(fd, &mut info)?;
    let ifindex = if info.type_ == BPF_LINK_TYPE_XDP {
        // SAFETY: for an XDP link the kernel fills the `xdp` member.
        unsafe { info.__bindgen_anon_1.xdp.ifindex }
    } else {
        0
    };
    Ok(LinkInfo {
        id: info.id,
        link_type: info.type_,
        prog_id: info.prog_id,
        ifindex,
    })
}

/// The raw BTF blob a loaded program carries, or None without BTF. aya
/// reads BTF only from files (`Btf::from_sys_fs`, `Btf::parse_file`), not
/// from the kernel by id.
pub fn prog_btf(fd: BorrowedFd<'_>) -> Result<Option<(OwnedFd, Vec<u8>)>> {
    let info = prog_info(fd)?;
    if info.btf_id == 0 {
        return Ok(None);
    }
    let btf = btf_fd_by_id(info.btf_id)?;
    // SAFETY: bpf_btf_info is plain old data; all-zero is valid.
    let mut bi: bpf_btf_info = unsafe { zeroed() };
    obj_info(btf.as_fd(), &mut bi)?;
    let mut buf = vec![0u8; bi.btf_size as usize];
    // SAFETY: as above.
    let mut again: bpf_btf_info = unsafe { zeroed() };
    again.btf = buf.as_mut_ptr() as u64;
    again.btf_size = buf.len() as u32;
    obj_info(btf.as_fd(), &mut again)?;
    buf.truncate(again.btf_size as usize);
    Ok(Some((btf, buf)))
}

fn cstr_name(raw: &[libc::c_char]) -> String {
    let bytes: Vec<u8> = raw
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

// ---------------------------------------------------------------- links

// aya creates links only for programs it loaded (`Xdp::attach`,
// `SchedClassifier::attach_with_options`, `Extension::attach_to_program`,
// all on `&mut self` of the aya program); these take raw file descriptors.

fn link_create(
    call: &'static str,
    prog: u32,
    target: u32,
    attach_type: u32,
    flags: u32,
    target_btf_id: u32,
) -> Result<OwnedFd> {
    let mut a = attr();
    a.link_create.__bindgen_anon_1.prog_fd = prog;
    a.link_create.__bindgen_anon_2.target_fd = target;
    a.link_create.attach_type = attach_type;
    a.link_create.flags = flags;
    a.link_create.__bindgen_anon_3.target_btf_id = target_btf_id;
    bpf_fd(call, bpf_cmd::BPF_LINK_CREATE, &mut a)
}

/// Attaches an XDP program to `ifindex` (in the calling thread's network
/// namespace) through a bpf_link.
pub fn xdp_link_create(prog: BorrowedFd<'_>, ifindex: u32, flags: u32) -> Result<OwnedFd> {
    link_create(
        "BPF_LINK_CREATE(xdp)",
        raw(prog),
        ifindex,
        BPF_XDP,
        flags,
        0,
    )
}

/// Attaches a tcx program to `ifindex` ingress (used by the probe only).
pub fn tcx_link_create(prog: BorrowedFd<'_>, ifindex: u32) -> Result<OwnedFd> {
    link_create(
        "BPF_LINK_CREATE(tcx)",
        raw(prog),
        ifindex,
        BPF_TCX_INGRESS,
        0,
        0,
    )
}

/// Attaches an extension (freplace) program in place of the function with
/// BTF id `btf_id` of `target`. The extension must have been verified
/// against a function with the same signature; it is not verified again.
pub fn ext_link_create(
    ext: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    btf_id: u32,
) -> Result<OwnedFd> {
    link_create(
        "BPF_LINK_CREATE(freplace)",
        raw(ext),
        raw(target),
        0,
        0,
        btf_id,
    )
}

/// Atomically points `link` at `new_prog`, but only if it still runs
/// `expected_old` (BPF_F_REPLACE): a link changed behind our back makes this
/// fail with EPERM instead of being overwritten. aya has no link update.
pub fn link_update(
    link: BorrowedFd<'_>,
    new_prog: BorrowedFd<'_>,
    expected_old: BorrowedFd<'_>,
) -> Result<()> {
    let mut a = attr();
    a.link_update.link_fd = raw(link);
    a.link_update.__bindgen_anon_1.new_prog_fd = raw(new_prog);
    a.link_update.flags = generated::BPF_F_REPLACE;
    a.link_update.__bindgen_anon_2.old_prog_fd = raw(expected_old);
    bpf("BPF_LINK_UPDATE", bpf_cmd::BPF_LINK_UPDATE, &mut a).map(drop)
}

/// Detaches a link from its hook while it stays open (BPF_LINK_DETACH).
/// aya detaches only by closing its own link objects.
pub fn link_detach(link: BorrowedFd<'_>) -> Result<()> {
    let mut a = attr();
    a.link_detach.link_fd = raw(link);
    bpf("BPF_LINK_DETACH", bpf_cmd::BPF_LINK_DETACH, &mut a).map(drop)
}

// ---------------------------------------------------------------- maps

// aya's typed maps (`Array<_, V>`, `PerCpuArray<_, V>`, `ProgramArray`)
// need the value type at compile time and a `MapData` per map (one more
// BPF_OBJ_GET_INFO_BY_FD each time one is made), and `ProgramArray::set`
// takes a `ProgramFd`, which cannot be made from a raw file descriptor.
// These take bytes of the sizes the kernel reported.

fn elem(map: BorrowedFd<'_>, key: &[u8], value: u64, flags: u64) -> bpf_attr {
    let mut a = attr();
    a.__bindgen_anon_2.map_fd = raw(map);
    a.__bindgen_anon_2.key = key.as_ptr() as u64;
    a.__bindgen_anon_2.__bindgen_anon_1.value = value;
    a.__bindgen_anon_2.flags = flags;
    a
}

/// Looks up `key`; `value` must be exactly the map's value size (times the
/// number of possible CPUs, rounded to 8 bytes each, for per-CPU maps).
/// Returns false when the key is absent.
pub fn map_lookup(map: BorrowedFd<'_>, key: &[u8], value: &mut [u8]) -> Result<bool> {
    let mut a = elem(map, key, value.as_mut_ptr() as u64, 0);
    match bpf("BPF_MAP_LOOKUP_ELEM", bpf_cmd::BPF_MAP_LOOKUP_ELEM, &mut a) {
        Ok(_) => Ok(true),
        Err(e) if e.errno() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

pub fn map_update(map: BorrowedFd<'_>, key: &[u8], value: &[u8]) -> Result<()> {
    let mut a = elem(
        map,
        key,
        value.as_ptr() as u64,
        u64::from(generated::BPF_ANY),
    );
    bpf("BPF_MAP_UPDATE_ELEM", bpf_cmd::BPF_MAP_UPDATE_ELEM, &mut a).map(drop)
}

/// Deletes `key`; absent keys are not an error.
pub fn map_delete(map: BorrowedFd<'_>, key: &[u8]) -> Result<()> {
    let mut a = elem(map, key, 0, 0);
    match bpf("BPF_MAP_DELETE_ELEM", bpf_cmd::BPF_MAP_DELETE_ELEM, &mut a) {
        Err(e) if e.errno() != Some(libc::ENOENT) => Err(e),
        _ => Ok(()),
    }
}

/// Creates a map named `name` (at most 15 bytes kept). aya creates maps
/// only from an object's map definitions.
pub fn map_create(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    name: &str,
) -> Result<OwnedFd> {
    let mut a = attr();
    a.__bindgen_anon_1.map_type = map_type;
    a.__bindgen_anon_1.key_size = key_size;
    a.__bindgen_anon_1.value_size = value_size;
    a.__bindgen_anon_1.max_entries = max_entries;
    a.__bindgen_anon_1.map_name = obj_name(name);
    bpf_fd("BPF_MAP_CREATE", bpf_cmd::BPF_MAP_CREATE, &mut a)
}

/// A map's key and value types: the BTF object and the type ids in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapBtf {
    pub btf_id: u32,
    pub key_type_id: u32,
    pub value_type_id: u32,
}

/// The BTF of a map's key and value, or None when it has none. aya's
/// `MapInfo` has no BTF type ids.
pub fn map_btf(fd: BorrowedFd<'_>) -> Result<Option<MapBtf>> {
    // SAFETY: bpf_map_info is plain old data; all-zero is valid.
    let mut info: generated::bpf_map_info = unsafe { zeroed() };
    obj_info(fd, &mut info)?;
    Ok((info.btf_id != 0).then_some(MapBtf {
        btf_id: info.btf_id,
        key_type_id: info.btf_key_type_id,
        value_type_id: info.btf_value_type_id,
    }))
}

/// Opens a BTF object by id (a program's or a map's).
pub fn btf_by_id(id: u32) -> Result<OwnedFd> {
    btf_fd_by_id(id)
}

/// Creates a map with `flags` (BPF_F_NO_PREALLOC, …) and, given `btf` (the
/// BTF object's fd and the key and value type ids in it), typed: the inner
/// map of a policy map, made with the parameters of the template or of the
/// live one (kernels before 6.2 accept an inner map only if it has BTF
/// where the template has it, for a struct value). aya creates maps only
/// from an object's map definitions (`MapData::create` is `pub(crate)`).
pub fn map_create_with_flags(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    name: &str,
    btf: Option<(BorrowedFd<'_>, u32, u32)>,
) -> Result<OwnedFd> {
    let mut a = attr();
    a.__bindgen_anon_1.map_type = map_type;
    a.__bindgen_anon_1.key_size = key_size;
    a.__bindgen_anon_1.value_size = value_size;
    a.__bindgen_anon_1.max_entries = max_entries;
    a.__bindgen_anon_1.map_flags = map_flags;
    a.__bindgen_anon_1.map_name = obj_name(name);
    if let Some((fd, key, value)) = btf {
        a.__bindgen_anon_1.btf_fd = raw(fd);
        a.__bindgen_anon_1.btf_key_type_id = key;
        a.__bindgen_anon_1.btf_value_type_id = value;
    }
    bpf_fd("BPF_MAP_CREATE", bpf_cmd::BPF_MAP_CREATE, &mut a)
}

/// The key after `key` (the first key when `key` is None, or when `key` is
/// no longer in the map: the kernel then starts over) into `next`, which
/// must be the map's key size. Returns false at the end of the map. aya
/// iterates keys only through its typed maps (`Keys<K>`), with the key type
/// fixed at compile time.
pub fn map_next_key(map: BorrowedFd<'_>, key: Option<&[u8]>, next: &mut [u8]) -> Result<bool> {
    let mut a = attr();
    a.__bindgen_anon_2.map_fd = raw(map);
    a.__bindgen_anon_2.key = key.map_or(0, |k| k.as_ptr() as u64);
    a.__bindgen_anon_2.__bindgen_anon_1.next_key = next.as_mut_ptr() as u64;
    match bpf(
        "BPF_MAP_GET_NEXT_KEY",
        bpf_cmd::BPF_MAP_GET_NEXT_KEY,
        &mut a,
    ) {
        Ok(_) => Ok(true),
        Err(e) if e.errno() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// A failed batch update: how many elements the kernel had written first.
#[derive(Debug)]
pub struct BatchError {
    pub done: usize,
    pub error: SysError,
}

/// Writes `count` elements at once (BPF_MAP_UPDATE_BATCH, Linux 5.6):
/// `keys` and `values` are the elements' keys and values back to back.
/// On failure the kernel has written the first `done`. A map type without
/// batch operations fails with EINVAL or ENOTSUPP and `done` 0. aya has
/// no batch operations.
pub fn map_update_batch(
    map: BorrowedFd<'_>,
    keys: &[u8],
    values: &[u8],
    count: usize,
) -> std::result::Result<(), BatchError> {
    let mut a = attr();
    a.batch.map_fd = raw(map);
    a.batch.keys = keys.as_ptr() as u64;
    a.batch.values = values.as_ptr() as u64;
    a.batch.count = count as u32;
    a.batch.elem_flags = u64::from(generated::BPF_ANY);
    match bpf(
        "BPF_MAP_UPDATE_BATCH",
        bpf_cmd::BPF_MAP_UPDATE_BATCH,
        &mut a,
    ) {
        Ok(_) => Ok(()),
        Err(error) => Err(BatchError {
            // SAFETY: `batch` is the member this command uses; the kernel
            // wrote the count it processed there.
            done: unsafe { a.batch.count } as usize,
            error,
        }),
    }
}

// ---------------------------------------------------------------- programs

/// Loads a program made of raw instructions (8 bytes each), without BTF:
/// what the probe uses to ask the kernel whether a program type may load.
/// aya loads only ELF objects, and its feature probes
/// (`aya::sys::is_program_supported`) answer yes or no, where the probe
/// needs the errno and a program to attach.
pub fn prog_load_raw(
    prog_type: u32,
    expected_attach_type: u32,
    insns: &[u64],
    name: &str,
) -> Result<OwnedFd> {
    let license = c"GPL";
    let mut a = attr();
    a.__bindgen_anon_3.prog_type = prog_type;
    a.__bindgen_anon_3.insn_cnt = insns.len() as u32;
    a.__bindgen_anon_3.insns = insns.as_ptr() as u64;
    a.__bindgen_anon_3.license = license.as_ptr() as u64;
    a.__bindgen_anon_3.prog_name = obj_name(name);
    a.__bindgen_anon_3.expected_attach_type = expected_attach_type;
    bpf_fd("BPF_PROG_LOAD", bpf_cmd::BPF_PROG_LOAD, &mut a)
}

/// Runs `prog` on `packet` `repeat` times in the kernel (BPF_PROG_TEST_RUN).
/// Returns the program's last return value and the mean duration per run in
/// nanoseconds as the kernel measured it. aya 0.14 has no public test run.
pub fn prog_test_run(prog: BorrowedFd<'_>, packet: &[u8], repeat: u32) -> Result<(u32, u32)> {
    let mut out = vec![0u8; packet.len() + 256];
    let mut a = attr();
    a.test.prog_fd = raw(prog);
    a.test.data_size_in = packet.len() as u32;
    a.test.data_size_out = out.len() as u32;
    a.test.data_in = packet.as_ptr() as u64;
    a.test.data_out = out.as_mut_ptr() as u64;
    a.test.repeat = repeat;
    bpf("BPF_PROG_TEST_RUN", bpf_cmd::BPF_PROG_TEST_RUN, &mut a)?;
    // SAFETY: `test` is the member this command uses; the kernel wrote its
    // results there.
    let (retval, duration) = unsafe { (a.test.retval, a.test.duration) };
    Ok((retval, duration))
}

/// The `OwnedFd` of a borrowed one, for storing.
pub fn dup(fd: impl AsFd) -> Result<OwnedFd> {
    fd.as_fd().try_clone_to_owned().map_err(|source| SysError {
        call: "dup",
        source,
    })
}

// ---------------------------------------------------------------- RCU

/// Waits for an RCU grace period: every RCU read-side section running when
/// it is called (every BPF program run, XDP included) has ended when it
/// returns. `membarrier(MEMBARRIER_CMD_GLOBAL)` is implemented with
/// `synchronize_rcu()`; kernels booted with nohz_full refuse it (EINVAL).
/// Not a bpf(2) command; neither aya nor libc wraps it.
pub fn synchronize_rcu() -> Result<()> {
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: membarrier takes no pointers; the arguments are plain integers.
    let ret = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if ret < 0 {
        return Err(SysError {
            call: "membarrier(MEMBARRIER_CMD_GLOBAL)",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}
