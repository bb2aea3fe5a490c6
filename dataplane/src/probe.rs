//! Which mechanisms the kernel permits, found by trying tiny programs once
//! per process in a private network namespace (so no real interface is
//! touched), cached, logged in one line and reported in the state.
//!
//! Two kinds of answer are kept apart. A *probe* asks the kernel about a
//! feature with the smallest program that needs it (nothing of Rootlet's
//! own), so a refusal means the kernel refuses the feature. A *check* loads
//! Rootlet's own programs for a backend (the rootlets and their gates); if
//! the verifier rejects one, that is a bug in Rootlet on this kernel, never
//! a missing feature: it carries the verifier log and the kernel, and
//! `auto` does not fall back on it.

use std::{fmt, os::fd::AsFd, sync::OnceLock};

use serde::Serialize;

use super::{
    error::{Error, Result},
    loader::{Load, What},
    spec::{Backend, BackendChoice},
    sys,
};

/// A kernel release, as far as features go: `major.minor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct KernelVersion {
    pub major: u32,
    pub minor: u32,
}

impl KernelVersion {
    pub const fn new(major: u32, minor: u32) -> Self {
        KernelVersion { major, minor }
    }

    /// From a `uname -r` release such as `6.1.0-57-amd64` or
    /// `6.12.117+deb12-amd64`.
    pub fn parse(release: &str) -> Option<Self> {
        let mut parts = release.split(|c: char| !c.is_ascii_digit());
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        Some(KernelVersion { major, minor })
    }
}

impl fmt::Display for KernelVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// The first kernel with tcx links (`BPF_TCX_INGRESS`).
pub const TCX_SINCE: KernelVersion = KernelVersion::new(6, 6);

/// The outcome of one probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "lowercase")]
pub enum Probe {
    Permitted,
    /// The kernel does not know the feature (it answered as a kernel older
    /// than `requires` does, e.g. EINVAL for an unknown attach type).
    Unsupported {
        requires: KernelVersion,
        reason: String,
    },
    /// The kernel knows the feature but refused it (e.g. EPERM).
    Refused {
        reason: String,
    },
}

impl Probe {
    pub fn permitted(&self) -> bool {
        matches!(self, Probe::Permitted)
    }

    /// Why not, for an operator; None when permitted.
    pub fn reason(&self) -> Option<String> {
        match self {
            Probe::Permitted => None,
            Probe::Unsupported { requires, reason } => Some(format!(
                "not supported (requires Linux >= {requires}): {reason}"
            )),
            Probe::Refused { reason } => Some(reason.clone()),
        }
    }

    fn from<T, E: fmt::Display>(r: &std::result::Result<T, E>) -> Probe {
        match r {
            Ok(_) => Probe::Permitted,
            Err(e) => Probe::Refused {
                reason: e.to_string(),
            },
        }
    }

    fn short(&self) -> &'static str {
        match self {
            Probe::Permitted => "yes",
            Probe::Unsupported { .. } => "unsupported",
            Probe::Refused { .. } => "no",
        }
    }
}

/// Whether Rootlet's own programs for one backend pass this kernel's
/// verifier. `Rejected` is a bug report, not a kernel limitation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "lowercase")]
pub enum Check {
    Verified,
    Rejected {
        /// The program that failed.
        program: String,
        /// The error (errno, or what else went wrong).
        message: String,
        /// The verifier log, when the verifier rejected it.
        log: String,
    },
}

impl Check {
    pub fn verified(&self) -> bool {
        matches!(self, Check::Verified)
    }

    fn from(program: &str, r: Result<()>) -> Check {
        match r {
            Ok(()) => Check::Verified,
            Err(Error::Verifier { errno, log, .. }) => Check::Rejected {
                program: program.to_owned(),
                message: format!("the verifier rejected it: {errno}"),
                log,
            },
            Err(e) => Check::Rejected {
                program: program.to_owned(),
                message: e.to_string(),
                log: String::new(),
            },
        }
    }

    fn short(&self) -> &'static str {
        if self.verified() { "ok" } else { "REJECTED" }
    }
}

/// What this kernel lets Rootlet do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Capabilities {
    /// `uname -r`.
    pub kernel: String,
    /// Load an XDP program.
    pub xdp: Probe,
    /// Attach XDP through a bpf_link.
    pub xdp_link: Probe,
    /// Swap a link's program with BPF_LINK_UPDATE.
    pub link_update: Probe,
    /// Put a program in a program array (tail calls).
    pub tail_call: Probe,
    /// Load a minimal BPF_PROG_TYPE_EXT program against a minimal target.
    pub ext_load: Probe,
    /// Attach it (BPF_LINK_CREATE with a target BTF id) and see it run.
    pub ext_attach: Probe,
    /// Attach a tcx program through a bpf_link (Linux >= 6.6).
    pub tcx: Probe,
    /// The freplace rootlet, every position enabled, passes the verifier.
    pub freplace_programs: Check,
    /// The tail-call rootlet and its gates pass the verifier.
    pub tailcall_programs: Check,
}

impl Capabilities {
    pub fn summary(&self) -> String {
        format!(
            "kernel {}: xdp={} xdp_link={} link_update={} tail_call={} ext_load={} ext_attach={} tcx={}; our programs: freplace={} tailcall={}",
            self.kernel,
            self.xdp.short(),
            self.xdp_link.short(),
            self.link_update.short(),
            self.tail_call.short(),
            self.ext_load.short(),
            self.ext_attach.short(),
            self.tcx.short(),
            self.freplace_programs.short(),
            self.tailcall_programs.short(),
        )
    }

    /// The release this kernel reports, if it parses.
    pub fn kernel_version(&self) -> Option<KernelVersion> {
        KernelVersion::parse(&self.kernel)
    }

    /// The check of Rootlet's own programs for `backend`.
    pub fn programs(&self, backend: Backend) -> &Check {
        match backend {
            Backend::Freplace => &self.freplace_programs,
            Backend::TailCall => &self.tailcall_programs,
        }
    }

    /// Whether the kernel permits `backend`, or which probe rules it out.
    fn kernel_permits(&self, backend: Backend) -> Result<()> {
        let mut needs = vec![
            ("xdp", &self.xdp),
            ("xdp_link", &self.xdp_link),
            ("link_update", &self.link_update),
        ];
        match backend {
            Backend::Freplace => needs.extend([
                ("ext_load", &self.ext_load),
                ("ext_attach", &self.ext_attach),
            ]),
            Backend::TailCall => needs.push(("tail_call", &self.tail_call)),
        }
        for (probe, result) in needs {
            if let Some(reason) = result.reason() {
                return Err(Error::BackendUnavailable {
                    backend,
                    probe,
                    reason,
                });
            }
        }
        Ok(())
    }

    /// Whether Rootlet's programs for `backend` verified here.
    fn programs_verified(&self, backend: Backend) -> Result<()> {
        match self.programs(backend) {
            Check::Verified => Ok(()),
            Check::Rejected {
                program,
                message,
                log,
            } => Err(Error::ProgramsRejected {
                backend,
                kernel: self.kernel.clone(),
                program: program.clone(),
                message: message.clone(),
                log: log.clone(),
            }),
        }
    }

    /// The backend to use for `choice`. `Auto` falls back to tail calls
    /// only when the kernel refuses freplace; if Rootlet's own freplace
    /// programs fail the verifier, that is reported as the bug it is.
    ///
    /// # Errors
    /// [`Error::BackendUnavailable`] names the probe the kernel failed;
    /// [`Error::ProgramsRejected`] carries the verifier log of Rootlet's
    /// program and the kernel.
    pub fn choose(&self, choice: BackendChoice) -> Result<Backend> {
        let backend = match choice {
            BackendChoice::Freplace => Backend::Freplace,
            BackendChoice::TailCall => Backend::TailCall,
            BackendChoice::Auto => {
                if self.kernel_permits(Backend::Freplace).is_ok() {
                    Backend::Freplace
                } else {
                    Backend::TailCall
                }
            }
        };
        self.kernel_permits(backend)?;
        self.programs_verified(backend)?;
        Ok(backend)
    }
}

/// The cached capabilities of this kernel (probed on first call).
pub fn capabilities() -> &'static Capabilities {
    static CAPS: OnceLock<Capabilities> = OnceLock::new();
    CAPS.get_or_init(|| {
        let caps = run();
        tracing::info!("probe: {}", caps.summary());
        for backend in [Backend::Freplace, Backend::TailCall] {
            if let Err(e) = caps.programs_verified(backend) {
                // The error shows one line of the log; the bug report
                // needs all of it.
                match &e {
                    Error::ProgramsRejected { log, .. } => {
                        tracing::error!("{e}\nverifier log:\n{log}");
                    }
                    _ => tracing::error!("{e}"),
                }
            }
        }
        caps
    })
}

// mov64 r0, imm; exit
fn ret(imm: i32) -> [u64; 2] {
    [0xb7 | ((imm as u32 as u64) << 32), 0x95]
}

/// A tcx failure: EINVAL is how a kernel without tcx answers the unknown
/// attach type; anything else is a refusal.
fn tcx_probe(r: &sys::Result<std::os::fd::OwnedFd>) -> Probe {
    match r {
        Ok(_) => Probe::Permitted,
        Err(e) if e.errno() == Some(nix::libc::EINVAL) => Probe::Unsupported {
            requires: TCX_SINCE,
            reason: e.to_string(),
        },
        Err(e) => Probe::Refused {
            reason: e.to_string(),
        },
    }
}

/// The minimal extension: loads `probe_ext` in place of `probe_func` in
/// `probe_target`, attaches it, and runs the target once to see the
/// extension's verdict (DROP) instead of the function's (PASS).
fn ext_probe() -> (Probe, Probe) {
    const FUNC: &str = "probe_func";
    let load = |program| Load {
        bytes: rootlet_ebpf::PROBE_EXT,
        what: What {
            stage: None,
            program,
        },
        globals: vec![],
        reuse: None,
    };
    let target = match load("probe_target").xdp_target() {
        Ok(t) => t,
        Err(e) => {
            let r = Probe::Refused {
                reason: format!("the minimal target would not load: {e}"),
            };
            return (r.clone(), r);
        }
    };
    let ext = load("probe_ext").extension(&target, FUNC);
    let attach = match &ext {
        Ok(ext) => super::freplace::attach(ext.as_fd(), target.fd.as_fd(), FUNC)
            .and_then(|link| {
                let packet = [0u8; 64];
                let (verdict, _) = sys::prog_test_run(target.fd.as_fd(), &packet, 1)?;
                drop(link);
                if verdict == 1 {
                    Ok(())
                } else {
                    Err(Error::Load {
                        what: "the minimal extension".into(),
                        message: format!(
                            "attached, but the target still returns {verdict}, not the extension's XDP_DROP"
                        ),
                    })
                }
            })
            .map_err(|e| e.to_string()),
        Err(_) => Err("needs ext_load".to_string()),
    };
    (Probe::from(&ext), Probe::from(&attach))
}

fn run() -> Capabilities {
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    // A private network namespace: probes attach to its loopback only.
    let scoped = std::thread::spawn(move || {
        if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
            let refused = Probe::Refused {
                reason: format!("unshare(CLONE_NEWNET): {e}"),
            };
            return (refused.clone(), refused.clone(), refused);
        }
        const LO: u32 = 1;
        let p1 = sys::prog_load_raw(sys::BPF_PROG_TYPE_XDP, 0, &ret(2), "rootlet_probe");
        let p2 = sys::prog_load_raw(sys::BPF_PROG_TYPE_XDP, 0, &ret(2), "rootlet_probe");
        let link = p1.as_ref().map_err(|e| e.to_string()).and_then(|p| {
            sys::xdp_link_create(p.as_fd(), LO, sys::XDP_FLAGS_SKB_MODE).map_err(|e| e.to_string())
        });
        let update = match (&link, &p1, &p2) {
            (Ok(l), Ok(a), Ok(b)) => {
                sys::link_update(l.as_fd(), b.as_fd(), a.as_fd()).map_err(|e| e.to_string())
            }
            _ => Err("needs xdp_link".to_string()),
        };
        let tcx = sys::prog_load_raw(
            sys::BPF_PROG_TYPE_SCHED_CLS,
            sys::BPF_TCX_INGRESS,
            &ret(-1),
            "rootlet_probe",
        )
        .and_then(|p| sys::tcx_link_create(p.as_fd(), LO));
        (Probe::from(&link), Probe::from(&update), tcx_probe(&tcx))
    });
    let (xdp_link, link_update, tcx) = scoped.join().unwrap_or_else(|_| {
        let r = Probe::Refused {
            reason: "probe thread panicked".into(),
        };
        (r.clone(), r.clone(), r)
    });

    let xdp = sys::prog_load_raw(sys::BPF_PROG_TYPE_XDP, 0, &ret(2), "rootlet_probe");
    let tail_call = match &xdp {
        Ok(p) => {
            sys::map_create(sys::BPF_MAP_TYPE_PROG_ARRAY, 4, 4, 1, "rootlet_probe").and_then(|m| {
                sys::map_update(
                    m.as_fd(),
                    &0u32.to_ne_bytes(),
                    &(std::os::fd::AsRawFd::as_raw_fd(p) as u32).to_ne_bytes(),
                )
            })
        }
        Err(e) => Err(sys::SysError {
            call: "needs xdp",
            source: std::io::Error::other(e.to_string()),
        }),
    };
    let (ext_load, ext_attach) = ext_probe();

    Capabilities {
        kernel,
        xdp: Probe::from(&xdp),
        xdp_link,
        link_update,
        tail_call: Probe::from(&tail_call),
        ext_load,
        ext_attach,
        tcx,
        freplace_programs: Check::from(
            super::abi::FREPLACE_PROGRAM,
            super::freplace::verify_programs(),
        ),
        tailcall_programs: Check::from(
            super::abi::CHAIN_PROGRAM,
            super::tailcall::verify_programs(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(ext: Probe, freplace_programs: Check) -> Capabilities {
        Capabilities {
            kernel: "6.1.0-57-amd64".into(),
            xdp: Probe::Permitted,
            xdp_link: Probe::Permitted,
            link_update: Probe::Permitted,
            tail_call: Probe::Permitted,
            ext_load: ext.clone(),
            ext_attach: ext,
            tcx: Probe::Unsupported {
                requires: TCX_SINCE,
                reason: "EINVAL".into(),
            },
            freplace_programs,
            tailcall_programs: Check::Verified,
        }
    }

    fn rejected() -> Check {
        Check::Rejected {
            program: "rootlet".into(),
            message: "the verifier rejected it: Permission denied (os error 13)".into(),
            log: "R1 unbounded memory access".into(),
        }
    }

    #[test]
    fn kernel_versions_parse_from_uname() {
        assert_eq!(
            KernelVersion::parse("6.1.0-57-amd64"),
            Some(KernelVersion::new(6, 1))
        );
        assert_eq!(
            KernelVersion::parse("6.12.117+deb12-amd64"),
            Some(KernelVersion::new(6, 12))
        );
        assert_eq!(
            KernelVersion::parse("6.18"),
            Some(KernelVersion::new(6, 18))
        );
        assert_eq!(KernelVersion::parse("garbage"), None);
        assert!(KernelVersion::new(6, 1) < TCX_SINCE && TCX_SINCE < KernelVersion::new(6, 12));
    }

    #[test]
    fn auto_takes_freplace_where_the_kernel_permits_it() {
        let c = caps(Probe::Permitted, Check::Verified);
        assert_eq!(c.choose(BackendChoice::Auto).unwrap(), Backend::Freplace);
    }

    #[test]
    fn auto_falls_back_only_when_the_kernel_refuses_ext() {
        let refused = Probe::Refused {
            reason: "BPF_PROG_LOAD: Operation not permitted".into(),
        };
        let c = caps(refused, Check::Verified);
        assert_eq!(c.choose(BackendChoice::Auto).unwrap(), Backend::TailCall);
        let err = c.choose(BackendChoice::Freplace).unwrap_err();
        assert!(
            matches!(
                err,
                Error::BackendUnavailable {
                    probe: "ext_load",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_rootlet_the_verifier_rejects_is_a_bug_not_a_fallback() {
        let c = caps(Probe::Permitted, rejected());
        for choice in [BackendChoice::Auto, BackendChoice::Freplace] {
            let err = c.choose(choice).unwrap_err();
            let Error::ProgramsRejected {
                backend,
                kernel,
                log,
                ..
            } = &err
            else {
                panic!("{choice:?}: a bug report, not {err}");
            };
            assert_eq!(*backend, Backend::Freplace);
            assert_eq!(kernel, "6.1.0-57-amd64");
            assert!(log.contains("unbounded"), "carries the log: {err}");
            let shown = err.to_string();
            assert!(
                shown.contains("bug")
                    && shown.contains("6.1.0-57-amd64")
                    && shown.contains("unbounded"),
                "{shown}"
            );
        }
        // The tail-call backend does not run the freplace rootlet.
        assert_eq!(
            c.choose(BackendChoice::TailCall).unwrap(),
            Backend::TailCall
        );
    }

    #[test]
    fn an_unsupported_feature_says_which_kernel_has_it() {
        let c = caps(Probe::Permitted, Check::Verified);
        let reason = c.tcx.reason().unwrap();
        assert!(reason.contains("requires Linux >= 6.6"), "{reason}");
        assert_eq!(c.tcx.short(), "unsupported");
    }
}
