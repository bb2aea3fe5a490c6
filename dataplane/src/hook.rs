//! The attach point of a rootlet, an axis apart from its backend: where on
//! the interface the rootlet program runs (today XDP; next tcx ingress and
//! egress). A [`Hook`] creates the one link of a rootlet; every later
//! operation on it ([`Link`]: replace its program, read it back, detach) is
//! the same bpf_link call whatever the hook, so a new hook is one small
//! implementation of [`Hook`], not a copy of each backend.

use std::{
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::Path,
};

use super::{
    error::Result,
    netns,
    spec::{HookKind, XdpMode},
    sys,
};

/// Creates the link that runs a rootlet program at one attach point.
pub trait Hook: Send + Sync {
    /// How errors and drift name the link ("XDP link").
    fn name(&self) -> &'static str;

    /// Attaches `prog` to interface `ifindex` of namespace `netns` through
    /// a new link; returns it with the XDP mode the kernel took.
    ///
    /// # Errors
    /// The namespace cannot be entered; the kernel refuses the attach.
    fn attach(
        &self,
        netns: Option<&Path>,
        prog: BorrowedFd<'_>,
        ifindex: u32,
    ) -> Result<(OwnedFd, XdpMode)>;
}

/// The hook of `kind`: the one place that turns a kind into an attach
/// point. `mode` is the XDP mode asked for.
pub fn of(kind: HookKind, mode: XdpMode) -> Box<dyn Hook> {
    match kind {
        HookKind::Xdp => Box::new(Xdp { mode }),
    }
}

/// XDP: a BPF_LINK_TYPE_XDP link, in driver mode where the driver allows
/// it and `mode` does not say otherwise.
pub struct Xdp {
    pub mode: XdpMode,
}

impl Hook for Xdp {
    fn name(&self) -> &'static str {
        "XDP link"
    }

    fn attach(
        &self,
        netns: Option<&Path>,
        prog: BorrowedFd<'_>,
        ifindex: u32,
    ) -> Result<(OwnedFd, XdpMode)> {
        let prog = sys::dup(prog)?;
        let mode = self.mode;
        netns::run_in(netns, move || attach_xdp(prog.as_fd(), ifindex, mode))
    }
}

/// Attaches `prog` to `ifindex` in the calling thread's namespace.
fn attach_xdp(prog: BorrowedFd<'_>, ifindex: u32, mode: XdpMode) -> Result<(OwnedFd, XdpMode)> {
    let driver = || sys::xdp_link_create(prog, ifindex, sys::XDP_FLAGS_DRV_MODE);
    let generic = || sys::xdp_link_create(prog, ifindex, sys::XDP_FLAGS_SKB_MODE);
    Ok(match mode {
        XdpMode::Driver => (driver()?, XdpMode::Driver),
        XdpMode::Generic => (generic()?, XdpMode::Generic),
        XdpMode::Auto => match driver() {
            Ok(l) => (l, XdpMode::Driver),
            Err(e) => {
                tracing::info!(ifindex, error = %e, "driver-mode XDP refused; using generic mode");
                (generic()?, XdpMode::Generic)
            }
        },
    })
}

/// The link of a rootlet at its hook, as this process holds it (the link
/// itself lives on through its pin). Dropping it detaches nothing.
#[derive(Debug)]
pub struct Link {
    fd: OwnedFd,
    /// The hook's name, for messages.
    name: &'static str,
}

impl Link {
    pub fn new(fd: OwnedFd, hook: &dyn Hook) -> Self {
        Link {
            fd,
            name: hook.name(),
        }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub fn info(&self) -> Result<sys::LinkInfo> {
        Ok(sys::link_info(self.fd.as_fd())?)
    }

    /// Replaces the program the link runs, `expected_old`, with `new` in
    /// one BPF_LINK_UPDATE (BPF_F_REPLACE: refused if another program runs).
    pub fn update(&self, new: BorrowedFd<'_>, expected_old: BorrowedFd<'_>) -> Result<()> {
        Ok(sys::link_update(self.fd.as_fd(), new, expected_old)?)
    }

    /// Takes the link off its interface (its pin, if any, stays).
    pub fn detach(&self) -> Result<()> {
        Ok(sys::link_detach(self.fd.as_fd())?)
    }

    /// Why the link no longer runs `rootlet_id` on its interface, if it
    /// doesn't.
    pub fn drift(&self, rootlet_id: Option<u32>) -> Option<String> {
        let name = self.name;
        match sys::link_info(self.fd.as_fd()) {
            Err(e) => Some(format!("cannot read the {name}: {e}")),
            Ok(i) if i.ifindex == 0 => Some(detached(name)),
            Ok(i) if Some(i.prog_id) != rootlet_id => Some(format!(
                "the {name} runs program {} instead of rootlet program {}",
                i.prog_id,
                rootlet_id.unwrap_or(0)
            )),
            Ok(_) => None,
        }
    }
}

/// The drift of a link that is no longer on its interface.
pub fn detached(name: &str) -> String {
    format!(
        "the {name} was detached from the interface (the interface went away, or another tool detached it)"
    )
}
