//! Which mechanisms the kernel permits, found by trying tiny programs once
//! per process in a private network namespace (so no real interface is
//! touched), cached, logged in one line and reported in the state.

use std::{os::fd::AsFd, sync::OnceLock};

use serde::Serialize;

use super::{
    abi,
    error::{Error, Result},
    loader::{Load, What},
    spec::{Backend, BackendChoice},
    sys,
};

/// The outcome of one probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "lowercase")]
pub enum Probe {
    Permitted,
    Refused { reason: String },
}

impl Probe {
    pub fn permitted(&self) -> bool {
        matches!(self, Probe::Permitted)
    }

    fn from<T, E: std::fmt::Display>(r: &std::result::Result<T, E>) -> Probe {
        match r {
            Ok(_) => Probe::Permitted,
            Err(e) => Probe::Refused {
                reason: e.to_string(),
            },
        }
    }

    fn short(&self) -> &'static str {
        if self.permitted() { "yes" } else { "no" }
    }
}

/// What this kernel lets Rootlet do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Capabilities {
    pub kernel: String,
    /// Load an XDP program.
    pub xdp: Probe,
    /// Attach XDP through a bpf_link.
    pub xdp_link: Probe,
    /// Swap a link's program with BPF_LINK_UPDATE.
    pub link_update: Probe,
    /// Put a program in a program array (tail calls).
    pub tail_call: Probe,
    /// Load a BPF_PROG_TYPE_EXT program against a rootlet placeholder.
    pub ext_load: Probe,
    /// Attach it (BPF_LINK_CREATE with a target BTF id).
    pub ext_attach: Probe,
    /// Attach a tcx program through a bpf_link.
    pub tcx: Probe,
}

impl Capabilities {
    pub fn summary(&self) -> String {
        format!(
            "kernel {}: xdp={} xdp_link={} link_update={} tail_call={} ext_load={} ext_attach={} tcx={}",
            self.kernel,
            self.xdp.short(),
            self.xdp_link.short(),
            self.link_update.short(),
            self.tail_call.short(),
            self.ext_load.short(),
            self.ext_attach.short(),
            self.tcx.short()
        )
    }

    /// The backend to use for `choice`, or which probe rules it out.
    pub fn choose(&self, choice: BackendChoice) -> Result<Backend> {
        let needs = |backend: Backend| -> Vec<(&'static str, &Probe)> {
            let mut v = vec![
                ("xdp", &self.xdp),
                ("xdp_link", &self.xdp_link),
                ("link_update", &self.link_update),
            ];
            match backend {
                Backend::Freplace => v.extend([
                    ("ext_load", &self.ext_load),
                    ("ext_attach", &self.ext_attach),
                ]),
                Backend::TailCall => v.push(("tail_call", &self.tail_call)),
            }
            v
        };
        let check = |backend: Backend| -> Result<Backend> {
            for (probe, result) in needs(backend) {
                if let Probe::Refused { reason } = result {
                    return Err(Error::BackendUnavailable {
                        backend,
                        probe,
                        reason: reason.clone(),
                    });
                }
            }
            Ok(backend)
        };
        match choice {
            BackendChoice::Freplace => check(Backend::Freplace),
            BackendChoice::TailCall => check(Backend::TailCall),
            BackendChoice::Auto => check(Backend::Freplace).or_else(|_| check(Backend::TailCall)),
        }
    }
}

/// The cached capabilities of this kernel (probed on first call).
pub fn capabilities() -> &'static Capabilities {
    static CAPS: OnceLock<Capabilities> = OnceLock::new();
    CAPS.get_or_init(|| {
        let caps = run();
        tracing::info!("probe: {}", caps.summary());
        caps
    })
}

// mov64 r0, imm; exit
fn ret(imm: i32) -> [u64; 2] {
    [0xb7 | ((imm as u32 as u64) << 32), 0x95]
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
        (Probe::from(&link), Probe::from(&update), Probe::from(&tcx))
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

    // One enabled position: kernels that verify global functions lazily
    // drop unreachable placeholders, which then cannot be replaced.
    let one_stage = super::spec::Pipeline {
        stages: vec![super::spec::StageRecord {
            name: "probe".into(),
            slot: 0,
            priority: 0,
            proceed_on: Default::default(),
            pin: false,
            owner: String::new(),
            program: String::new(),
            digest: String::new(),
            chainable: true,
        }],
    };
    let target = super::freplace::load_instance(&one_stage, super::spec::XdpAction::Pass, None);
    let ext = target.as_ref().map_err(|e| e.to_string()).and_then(|t| {
        Load {
            bytes: rootlet_ebpf::TEST_PASS,
            what: What {
                stage: None,
                program: "verdict",
            },
            globals: vec![],
            reuse: None,
        }
        .extension(t, &abi::placeholder(0))
        .map(|ext| (ext, t))
        .map_err(|e| e.to_string())
    });
    let ext_attach = match &ext {
        Ok((ext, t)) => super::freplace::attach(ext.as_fd(), t.fd.as_fd(), &abi::placeholder(0))
            .map_err(|e| e.to_string()),
        Err(_) => Err("needs ext_load".to_string()),
    };

    Capabilities {
        kernel,
        xdp: Probe::from(&xdp),
        xdp_link,
        link_update,
        tail_call: Probe::from(&tail_call),
        ext_load: Probe::from(&ext),
        ext_attach: Probe::from(&ext_attach),
        tcx,
    }
}
