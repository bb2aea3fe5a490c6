//! Loading ELF objects with aya: a rootlet, an XDP stage, or a freplace
//! stage against a rootlet placeholder. aya's `Ebpf` lives only for the
//! duration of a load; what survives is the program's file descriptor.
//!
//! Maps are reused (rather than created) by pinning the existing map in a
//! transient directory and pointing aya at that pin ([`MapReuse`]). One
//! mechanism serves the rootlet's shared maps, the tail-call maps a stage
//! shares with its rootlet, and a stage's maps kept across a replacement.

use crate::budget::{self, Step};
use std::{
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::PathBuf,
    sync::atomic::{AtomicU64, Ordering},
};

use aya::{
    EbpfError, EbpfLoader,
    programs::{Extension, ProgramError, Xdp},
};

use super::{
    error::{Error, Result},
    pins::{self, Layout},
    sys,
};

/// Existing maps to use instead of creating new ones, by name, in a
/// transient directory of the load's own, where maps the object asks to pin
/// by name are pinned too (and so are not pinned anywhere once it goes).
pub struct MapReuse {
    dir: PathBuf,
    maps: Vec<(String, PathBuf)>,
}

impl MapReuse {
    pub fn new(layout: &Layout) -> Result<Self> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = layout.tmp_dir().join(format!(
            "{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).map_err(|source| Error::Pin {
            what: "transient pin directory",
            path: dir.clone(),
            source,
        })?;
        Ok(MapReuse { dir, maps: vec![] })
    }

    /// Uses the map `fd` for the object's map `name`.
    pub fn add(&mut self, name: &str, fd: BorrowedFd<'_>) -> Result<()> {
        let path = self.dir.join(name);
        sys::obj_pin(fd, &path)?;
        self.maps.push((name.to_owned(), path));
        Ok(())
    }

    /// Uses a pinned map for `name` (created and pinned there if absent).
    pub fn pinned(&mut self, name: &str, path: PathBuf) {
        self.maps.push((name.to_owned(), path));
    }

    /// The object map names this reuse sets a path for.
    fn names(&self) -> impl Iterator<Item = &str> {
        self.maps.iter().map(|(name, _)| name.as_str())
    }

    fn apply<'a>(&'a self, loader: &mut EbpfLoader<'a>) {
        // A map the object asks to pin by name (LIBBPF_PIN_BY_NAME) is
        // pinned here, in this load's own transient directory, which goes
        // when the load is done: never under /sys/fs/bpf (aya's default,
        // libbpf's), and never an existing map found by its name. The stage
        // gets a map of its own, like any other; only the maps added above
        // (the rootlet's, the stage's twin's, those kept on request) are
        // shared.
        loader.default_map_pin_directory(&self.dir);
        for (name, path) in &self.maps {
            loader.map_pin_path(name.as_str(), path.as_path());
        }
    }
}

impl Drop for MapReuse {
    fn drop(&mut self) {
        if let Err(e) = pins::remove(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot remove transient pins");
        }
        // The parent goes too once no other load uses it (fails while one does).
        if let Some(parent) = self.dir.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// What a load is for, in errors.
pub struct What<'a> {
    pub stage: Option<&'a str>,
    pub program: &'a str,
}

fn load_error(what: &What<'_>, e: impl Into<LoadFailure>) -> Error {
    match e.into() {
        LoadFailure::Verifier { errno, log } => Error::Verifier {
            stage: what.stage.unwrap_or("-").to_owned(),
            program: what.program.to_owned(),
            errno,
            log,
        },
        LoadFailure::Other(message) => Error::Load {
            what: match what.stage {
                Some(s) => format!("stage `{s}` (program `{}`)", what.program),
                None => format!("program `{}`", what.program),
            },
            message,
        },
    }
}

enum LoadFailure {
    Verifier { errno: std::io::Error, log: String },
    Other(String),
}

impl From<ProgramError> for LoadFailure {
    fn from(e: ProgramError) -> Self {
        match e {
            ProgramError::LoadError {
                io_error,
                verifier_log,
            } => LoadFailure::Verifier {
                errno: io_error,
                log: verifier_log.to_string(),
            },
            other => LoadFailure::Other(error_chain(&other)),
        }
    }
}

impl From<EbpfError> for LoadFailure {
    fn from(e: EbpfError) -> Self {
        match e {
            EbpfError::ProgramError(p) => p.into(),
            other => LoadFailure::Other(error_chain(&other)),
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// An object being loaded: globals to set and maps to reuse.
pub struct Load<'a> {
    pub bytes: &'a [u8],
    pub what: What<'a>,
    pub globals: Vec<(&'a str, &'a [u8], bool)>,
    /// Always set for a stage's object (it may declare pin-by-name maps):
    /// None only for Rootlet's own programs.
    pub reuse: Option<&'a MapReuse>,
}

/// The kernel's BTF, parsed once per process, the first time an object
/// needs it: aya would otherwise read and parse /sys/kernel/btf/vmlinux
/// (megabytes) on every load, and it holds megabytes once parsed.
fn kernel_btf() -> Option<&'static aya::Btf> {
    static BTF: std::sync::OnceLock<Option<aya::Btf>> = std::sync::OnceLock::new();
    BTF.get_or_init(|| aya::Btf::from_sys_fs().ok()).as_ref()
}

/// The kernel BTF for loading `bytes`: aya uses it only to apply the
/// object's CO-RE relocations (`relocate_btf`; an XDP program or an
/// extension attaches without it), so an object without any loads
/// without it, and a process whose objects have none never parses it.
/// An object aya cannot parse gets it too, and fails in aya's load.
fn kernel_btf_for(bytes: &[u8]) -> Option<&'static aya::Btf> {
    let relocated = crate::object::parse(bytes).map_or(true, |o| o.has_btf_relocations());
    if relocated { kernel_btf() } else { None }
}

impl<'a> Load<'a> {
    /// Sets this load's BTF, globals and maps on `loader`. Every setting
    /// aya's builder holds is one this sets each time (BTF, the default
    /// pin directory) or sets by name (globals, map pin paths); nothing
    /// else is ever set on a loader of an XDP load. [`Kept`] relies on it.
    fn configure(&'a self, loader: &mut EbpfLoader<'a>) {
        loader.btf(budget::time(Step::Parse, || kernel_btf_for(self.bytes)));
        for &(name, value, must_exist) in &self.globals {
            loader.override_global(name, value, must_exist);
        }
        if let Some(reuse) = self.reuse {
            reuse.apply(loader);
        }
    }

    fn loader(&'a self) -> EbpfLoader<'a> {
        // A loader made ahead of time (`warm.rs`): aya 0.14's `new()` parses
        // the kernel BTF, which `configure` replaces anyway.
        let mut loader = crate::warm::take();
        self.configure(&mut loader);
        loader
    }

    /// Loads the object's program as an XDP program; returns its fd.
    pub fn xdp(&self) -> Result<OwnedFd> {
        Ok(self.xdp_target()?.fd)
    }

    /// Loads the object and keeps aya's handle, for a rootlet that
    /// extensions will be loaded against.
    pub fn xdp_target(&self) -> Result<Target> {
        self.load_xdp(&mut self.loader())
    }

    /// As [`Load::xdp`], and keeps the loader for one more load of the same
    /// object with the same globals ([`Load::xdp_after`]).
    pub fn xdp_keeping(&'a self) -> Result<(OwnedFd, Kept<'a>)> {
        let mut loader = self.loader();
        let fd = self.load_xdp(&mut loader)?.fd;
        let kept = Kept {
            loader,
            bytes: self.bytes,
            globals: self.globals.iter().map(|g| g.0).collect(),
            maps: self
                .reuse
                .map(|r| r.names().map(str::to_owned).collect())
                .unwrap_or_default(),
        };
        Ok((fd, kept))
    }

    /// Loads the object's program as an XDP program with the loader `kept`
    /// if that is the same as a new one: aya 0.14's builder only
    /// accumulates settings (and `EbpfLoader::load` changes none), so a
    /// used loader, configured again, holds exactly what a new one would
    /// when this load sets the same object, the same globals by name, and a
    /// path for every map name the first load set one for. Otherwise (or
    /// for an object without map reuse) it takes a new loader.
    pub fn xdp_after(&'a self, kept: Kept<'a>) -> Result<OwnedFd> {
        let Kept {
            mut loader,
            bytes,
            globals,
            maps,
        } = kept;
        let same_globals = {
            let mut now: Vec<&str> = self.globals.iter().map(|g| g.0).collect();
            let mut was = globals;
            now.sort_unstable();
            was.sort_unstable();
            now == was
        };
        let covers = self.reuse.is_some_and(|r| {
            let names: std::collections::BTreeSet<&str> = r.names().collect();
            maps.iter().all(|m| names.contains(m.as_str()))
        });
        if bytes != self.bytes || !same_globals || !covers {
            return self.xdp();
        }
        self.configure(&mut loader);
        Ok(self.load_xdp(&mut loader)?.fd)
    }

    fn load_xdp(&self, loader: &mut EbpfLoader<'_>) -> Result<Target> {
        let mut ebpf = budget::time(Step::Parse, || loader.load(self.bytes))
            .map_err(|e| load_error(&self.what, e))?;
        let prog: &mut Xdp = ebpf
            .program_mut(self.what.program)
            .ok_or_else(|| load_error(&self.what, LoadFailure::Other("no such program".into())))?
            .try_into()
            .map_err(|e: ProgramError| load_error(&self.what, e))?;
        budget::time(Step::Verify, || prog.load()).map_err(|e| load_error(&self.what, e))?;
        let fd = prog.fd().map_err(|e| load_error(&self.what, e))?;
        let owned = sys::dup(fd.as_fd())?;
        let aya_fd = fd
            .try_clone()
            .map_err(|e| load_error(&self.what, LoadFailure::Other(e.to_string())))?;
        Ok(Target { fd: owned, aya_fd })
    }

    /// Loads the object's program as an extension of `func` in `target`.
    pub fn extension(&self, target: &Target, func: &str) -> Result<OwnedFd> {
        // EbpfLoader::new() parses the kernel BTF: part of the parse.
        let mut loader = budget::time(Step::Parse, || self.loader());
        loader.extension(self.what.program);
        let mut ebpf = budget::time(Step::Parse, || loader.load(self.bytes))
            .map_err(|e| load_error(&self.what, e))?;
        let ext: &mut Extension = ebpf
            .program_mut(self.what.program)
            .ok_or_else(|| load_error(&self.what, LoadFailure::Other("no such program".into())))?
            .try_into()
            .map_err(|e: ProgramError| load_error(&self.what, e))?;
        let target_fd = target
            .aya_fd
            .try_clone()
            .map_err(|e| load_error(&self.what, LoadFailure::Other(e.to_string())))?;
        budget::time(Step::Verify, || ext.load(target_fd, func))
            .map_err(|e| load_error(&self.what, e))?;
        let fd = ext.fd().map_err(|e| load_error(&self.what, e))?;
        Ok(sys::dup(fd.as_fd())?)
    }
}

/// A loader that has loaded once, with what it was configured with: for a
/// second load of the same object ([`Load::xdp_after`]), which then costs no
/// new loader (aya 0.14 parses the kernel BTF in each `EbpfLoader::new()`).
pub struct Kept<'a> {
    loader: EbpfLoader<'a>,
    bytes: &'a [u8],
    globals: Vec<&'a str>,
    maps: Vec<String>,
}

/// A freshly loaded rootlet: our fd, and aya's (to load extensions against).
pub struct Target {
    pub fd: OwnedFd,
    aya_fd: aya::programs::ProgramFd,
}
