//! The bpf(2) commands Rootlet issues itself, on owned file descriptors.
//!
//! aya loads ELF objects; everything that happens to a kernel object after it
//! is loaded (links, pins, updates, info, map elements, test runs) goes
//! through here. This is the only module with `unsafe`; every block says why
//! it is sound.

use std::{
    ffi::CString,
    io,
    mem::{size_of, zeroed},
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

use aya_obj::generated::{bpf_btf_info, bpf_link_info, bpf_map_info, bpf_prog_info};

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

// bpf(2) commands (include/uapi/linux/bpf.h).
const BPF_MAP_CREATE: u32 = 0;
const BPF_MAP_LOOKUP_ELEM: u32 = 1;
const BPF_MAP_UPDATE_ELEM: u32 = 2;
const BPF_MAP_DELETE_ELEM: u32 = 3;
const BPF_PROG_LOAD: u32 = 5;
const BPF_OBJ_PIN: u32 = 6;
const BPF_OBJ_GET: u32 = 7;
const BPF_PROG_TEST_RUN: u32 = 10;
const BPF_PROG_GET_FD_BY_ID: u32 = 13;
const BPF_MAP_GET_FD_BY_ID: u32 = 14;
const BPF_OBJ_GET_INFO_BY_FD: u32 = 15;
const BPF_BTF_GET_FD_BY_ID: u32 = 19;
const BPF_LINK_CREATE: u32 = 28;
const BPF_LINK_UPDATE: u32 = 29;
const BPF_LINK_GET_FD_BY_ID: u32 = 30;
const BPF_LINK_DETACH: u32 = 34;

pub const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
pub const BPF_PROG_TYPE_XDP: u32 = 6;
pub const BPF_PROG_TYPE_EXT: u32 = 28;
pub const BPF_MAP_TYPE_PROG_ARRAY: u32 = 3;
pub const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
pub const BPF_XDP: u32 = 37;
pub const BPF_TCX_INGRESS: u32 = 46;
pub const BPF_LINK_TYPE_XDP: u32 = 6;
pub const BPF_LINK_TYPE_TRACING: u32 = 2;
pub const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
pub const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
const BPF_F_REPLACE: u32 = 1 << 2;
const BPF_ANY: u64 = 0;

/// The attribute block every command takes: large enough for all of ours,
/// zero beyond the fields a command uses, as the kernel requires.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new<T: Copy>(fields: T) -> Self {
        const { assert!(size_of::<T>() <= 128) };
        let mut attr = Attr([0; 128]);
        // SAFETY: T is a plain #[repr(C)] struct of integers no larger than
        // the buffer (checked above); copying its bytes is what the kernel
        // reads.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (&raw const fields).cast::<u8>(),
                attr.0.as_mut_ptr(),
                size_of::<T>(),
            );
        }
        attr
    }

    fn read<T: Copy>(&self) -> T {
        const { assert!(size_of::<T>() <= 128) };
        // SAFETY: as in `new`; the kernel may have written results in place.
        unsafe { std::ptr::read_unaligned(self.0.as_ptr().cast::<T>()) }
    }
}

fn bpf(call: &'static str, cmd: u32, attr: &mut Attr) -> Result<i64> {
    // SAFETY: `attr` is a valid, writable 128-byte block, and we pass its
    // size; pointers inside it point to buffers that outlive the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr.0.as_mut_ptr(),
            attr.0.len() as libc::c_long,
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

fn bpf_fd(call: &'static str, cmd: u32, attr: &mut Attr) -> Result<OwnedFd> {
    let fd = bpf(call, cmd, attr)?;
    // SAFETY: the kernel returned a new file descriptor that nothing else
    // owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
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

// ---------------------------------------------------------------- pins

#[derive(Clone, Copy)]
#[repr(C)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// Pins a program, map or link at `path` in bpffs.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> Result<()> {
    let p = cpath(path)?;
    let mut attr = Attr::new(ObjAttr {
        pathname: p.as_ptr() as u64,
        bpf_fd: raw(fd),
        file_flags: 0,
    });
    bpf("BPF_OBJ_PIN", BPF_OBJ_PIN, &mut attr).map(drop)
}

/// Opens the object pinned at `path`.
pub fn obj_get(path: &Path) -> Result<OwnedFd> {
    let p = cpath(path)?;
    let mut attr = Attr::new(ObjAttr {
        pathname: p.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    });
    bpf_fd("BPF_OBJ_GET", BPF_OBJ_GET, &mut attr)
}

// ---------------------------------------------------------------- ids

#[derive(Clone, Copy)]
#[repr(C)]
struct IdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

fn fd_by_id(call: &'static str, cmd: u32, id: u32) -> Result<OwnedFd> {
    let mut attr = Attr::new(IdAttr {
        id,
        next_id: 0,
        open_flags: 0,
    });
    bpf_fd(call, cmd, &mut attr)
}

pub fn prog_fd_by_id(id: u32) -> Result<OwnedFd> {
    fd_by_id("BPF_PROG_GET_FD_BY_ID", BPF_PROG_GET_FD_BY_ID, id)
}

pub fn map_fd_by_id(id: u32) -> Result<OwnedFd> {
    fd_by_id("BPF_MAP_GET_FD_BY_ID", BPF_MAP_GET_FD_BY_ID, id)
}

pub fn link_fd_by_id(id: u32) -> Result<OwnedFd> {
    fd_by_id("BPF_LINK_GET_FD_BY_ID", BPF_LINK_GET_FD_BY_ID, id)
}

fn btf_fd_by_id(id: u32) -> Result<OwnedFd> {
    fd_by_id("BPF_BTF_GET_FD_BY_ID", BPF_BTF_GET_FD_BY_ID, id)
}

// ---------------------------------------------------------------- info

#[derive(Clone, Copy)]
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

fn obj_info<T: Copy>(fd: BorrowedFd<'_>, info: &mut T) -> Result<()> {
    let mut attr = Attr::new(InfoAttr {
        bpf_fd: raw(fd),
        info_len: size_of::<T>() as u32,
        info: (info as *mut T) as u64,
    });
    bpf("BPF_OBJ_GET_INFO_BY_FD", BPF_OBJ_GET_INFO_BY_FD, &mut attr).map(drop)
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

pub fn map_info(fd: BorrowedFd<'_>) -> Result<MapInfo> {
    // SAFETY: bpf_map_info is plain old data; all-zero is valid.
    let mut info: bpf_map_info = unsafe { zeroed() };
    obj_info(fd, &mut info)?;
    Ok(MapInfo {
        id: info.id,
        map_type: info.type_,
        name: cstr_name(&info.name),
        key_size: info.key_size,
        value_size: info.value_size,
        max_entries: info.max_entries,
        map_flags: info.map_flags,
    })
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

/// The raw BTF blob a loaded program carries, or None without BTF.
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

#[derive(Clone, Copy)]
#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target: u32,
    attach_type: u32,
    flags: u32,
    target_btf_id: u32,
}

/// Attaches an XDP program to `ifindex` (in the calling thread's network
/// namespace) through a bpf_link.
pub fn xdp_link_create(prog: BorrowedFd<'_>, ifindex: u32, flags: u32) -> Result<OwnedFd> {
    let mut attr = Attr::new(LinkCreateAttr {
        prog_fd: raw(prog),
        target: ifindex,
        attach_type: BPF_XDP,
        flags,
        target_btf_id: 0,
    });
    bpf_fd("BPF_LINK_CREATE(xdp)", BPF_LINK_CREATE, &mut attr)
}

/// Attaches a tcx program to `ifindex` ingress (used by the probe only).
pub fn tcx_link_create(prog: BorrowedFd<'_>, ifindex: u32) -> Result<OwnedFd> {
    let mut attr = Attr::new(LinkCreateAttr {
        prog_fd: raw(prog),
        target: ifindex,
        attach_type: BPF_TCX_INGRESS,
        flags: 0,
        target_btf_id: 0,
    });
    bpf_fd("BPF_LINK_CREATE(tcx)", BPF_LINK_CREATE, &mut attr)
}

/// Attaches an extension (freplace) program in place of the function with
/// BTF id `btf_id` of `target`. The extension must have been verified
/// against a function with the same signature; it is not verified again.
pub fn ext_link_create(
    ext: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    btf_id: u32,
) -> Result<OwnedFd> {
    let mut attr = Attr::new(LinkCreateAttr {
        prog_fd: raw(ext),
        target: raw(target),
        attach_type: 0,
        flags: 0,
        target_btf_id: btf_id,
    });
    bpf_fd("BPF_LINK_CREATE(freplace)", BPF_LINK_CREATE, &mut attr)
}

#[derive(Clone, Copy)]
#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// Atomically points `link` at `new_prog`, but only if it still runs
/// `expected_old` (BPF_F_REPLACE): a link changed behind our back makes this
/// fail with EPERM instead of being overwritten.
pub fn link_update(
    link: BorrowedFd<'_>,
    new_prog: BorrowedFd<'_>,
    expected_old: BorrowedFd<'_>,
) -> Result<()> {
    let mut attr = Attr::new(LinkUpdateAttr {
        link_fd: raw(link),
        new_prog_fd: raw(new_prog),
        flags: BPF_F_REPLACE,
        old_prog_fd: raw(expected_old),
    });
    bpf("BPF_LINK_UPDATE", BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// Detaches a link from its hook while it stays open (BPF_LINK_DETACH).
pub fn link_detach(link: BorrowedFd<'_>) -> Result<()> {
    let mut attr = Attr::new(raw(link));
    bpf("BPF_LINK_DETACH", BPF_LINK_DETACH, &mut attr).map(drop)
}

// ---------------------------------------------------------------- maps

#[derive(Clone, Copy)]
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// Looks up `key`; `value` must be exactly the map's value size (times the
/// number of possible CPUs, rounded to 8 bytes each, for per-CPU maps).
/// Returns false when the key is absent.
pub fn map_lookup(map: BorrowedFd<'_>, key: &[u8], value: &mut [u8]) -> Result<bool> {
    let mut attr = Attr::new(ElemAttr {
        map_fd: raw(map),
        _pad: 0,
        key: key.as_ptr() as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    });
    match bpf("BPF_MAP_LOOKUP_ELEM", BPF_MAP_LOOKUP_ELEM, &mut attr) {
        Ok(_) => Ok(true),
        Err(e) if e.errno() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

pub fn map_update(map: BorrowedFd<'_>, key: &[u8], value: &[u8]) -> Result<()> {
    let mut attr = Attr::new(ElemAttr {
        map_fd: raw(map),
        _pad: 0,
        key: key.as_ptr() as u64,
        value: value.as_ptr() as u64,
        flags: BPF_ANY,
    });
    bpf("BPF_MAP_UPDATE_ELEM", BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
}

/// Deletes `key`; absent keys are not an error.
pub fn map_delete(map: BorrowedFd<'_>, key: &[u8]) -> Result<()> {
    let mut attr = Attr::new(ElemAttr {
        map_fd: raw(map),
        _pad: 0,
        key: key.as_ptr() as u64,
        value: 0,
        flags: 0,
    });
    match bpf("BPF_MAP_DELETE_ELEM", BPF_MAP_DELETE_ELEM, &mut attr) {
        Err(e) if e.errno() != Some(libc::ENOENT) => Err(e),
        _ => Ok(()),
    }
}

#[derive(Clone, Copy)]
#[repr(C)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
}

/// Creates a map named `name` (at most 15 bytes kept).
pub fn map_create(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    name: &str,
) -> Result<OwnedFd> {
    let mut map_name = [0u8; 16];
    for (d, s) in map_name.iter_mut().zip(name.bytes().take(15)) {
        *d = s;
    }
    let mut attr = Attr::new(MapCreateAttr {
        map_type,
        key_size,
        value_size,
        max_entries,
        map_flags: 0,
        inner_map_fd: 0,
        numa_node: 0,
        map_name,
    });
    bpf_fd("BPF_MAP_CREATE", BPF_MAP_CREATE, &mut attr)
}

// ---------------------------------------------------------------- programs

#[derive(Clone, Copy)]
#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// Loads a program made of raw instructions (8 bytes each), without BTF:
/// what the probe uses to ask the kernel whether a program type may load.
pub fn prog_load_raw(
    prog_type: u32,
    expected_attach_type: u32,
    insns: &[u64],
    name: &str,
) -> Result<OwnedFd> {
    let license = c"GPL";
    let mut prog_name = [0u8; 16];
    for (d, s) in prog_name.iter_mut().zip(name.bytes().take(15)) {
        *d = s;
    }
    let mut attr = Attr::new(ProgLoadAttr {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name,
        prog_ifindex: 0,
        expected_attach_type,
    });
    bpf_fd("BPF_PROG_LOAD", BPF_PROG_LOAD, &mut attr)
}

#[derive(Clone, Copy)]
#[repr(C)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
}

/// Runs `prog` on `packet` `repeat` times in the kernel (BPF_PROG_TEST_RUN).
/// Returns the program's last return value and the mean duration per run in
/// nanoseconds as the kernel measured it.
pub fn prog_test_run(prog: BorrowedFd<'_>, packet: &[u8], repeat: u32) -> Result<(u32, u32)> {
    let mut out = vec![0u8; packet.len() + 256];
    let mut attr = Attr::new(TestRunAttr {
        prog_fd: raw(prog),
        retval: 0,
        data_size_in: packet.len() as u32,
        data_size_out: out.len() as u32,
        data_in: packet.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat,
        duration: 0,
    });
    bpf("BPF_PROG_TEST_RUN", BPF_PROG_TEST_RUN, &mut attr)?;
    let done: TestRunAttr = attr.read();
    Ok((done.retval, done.duration))
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
