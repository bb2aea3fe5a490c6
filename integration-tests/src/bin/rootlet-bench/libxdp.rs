//! libxdp's dispatcher as a baseline: `xdp-loader` (Debian's xdp-tools)
//! loads k copies of `test_pass` on the peer end of the bench's veth, and
//! the bench test-runs the dispatcher program, interleaved with the rootlet.

use std::{process::Command, time::Instant};

use super::*;

/// How many programs libxdp's dispatcher holds at most
/// (`MAX_DISPATCHER_ACTIONS` in xdp-tools' `xdp_dispatcher.h`).
pub(crate) const LIBXDP_MAX_PROGS: u32 = 10;

/// One `xdp-loader` on one interface of one namespace, with the object it
/// loads. Drop unloads everything it attached (and the bpffs directory
/// libxdp made, if it was not there before and is empty now).
pub(crate) struct Libxdp<'a> {
    ns: &'a rootlet_integration_tests::netns::Netns,
    iface: &'a str,
    object: tempfile::NamedTempFile,
    made_xdp_dir: bool,
}

const LIBXDP_DIR: &str = "/sys/fs/bpf/xdp";

/// What running `xdp-loader ARGS` gave: success, stdout, stderr, wall time.
struct Run {
    ok: bool,
    out: String,
    err: String,
    took: Duration,
}

impl<'a> Libxdp<'a> {
    /// `None` with the reason if `xdp-loader` is not installed.
    pub(crate) fn new(
        ns: &'a rootlet_integration_tests::netns::Netns,
        iface: &'a str,
    ) -> Result<std::result::Result<Libxdp<'a>, String>> {
        let entry = rootlet_ebpf::stage("test_pass").ok_or("no embedded test_pass")?;
        let mut object = tempfile::Builder::new().suffix(".o").tempfile()?;
        std::io::Write::write_all(&mut object, entry.object)?;
        let made_xdp_dir = !Path::new(LIBXDP_DIR).exists();
        let me = Libxdp {
            ns,
            iface,
            object,
            made_xdp_dir,
        };
        match me.run(&["--help"]) {
            Ok(_) => Ok(Ok(me)),
            Err(e) => Ok(Err(format!(
                "cannot run xdp-loader (scripts/install-deps.sh installs xdp-tools): {e}"
            ))),
        }
    }

    /// Runs `xdp-loader ARGS` in the namespace with nsenter, so the host's
    /// bpffs (where libxdp pins its dispatcher) stays visible, which
    /// `ip netns exec` would hide.
    fn run(&self, args: &[&str]) -> Result<Run> {
        let start = Instant::now();
        let out = Command::new("nsenter")
            .arg(format!("--net={}", self.ns.path().display()))
            .arg("xdp-loader")
            .args(args)
            .output()?;
        Ok(Run {
            ok: out.status.success(),
            out: String::from_utf8_lossy(&out.stdout).into_owned(),
            err: String::from_utf8_lossy(&out.stderr).into_owned(),
            took: start.elapsed(),
        })
    }

    /// Loads `k` more copies of `test_pass` in one `xdp-loader load`.
    fn load(&self, k: u32) -> Result<Run> {
        let path = self.object.path().to_str().ok_or("temp path not UTF-8")?;
        let mut args = vec!["load", "-m", "skb", self.iface];
        args.extend(std::iter::repeat_n(path, k as usize));
        self.run(&args)
    }

    fn unload_all(&self) -> Result<()> {
        let r = self.run(&["unload", "-a", self.iface])?;
        if !r.ok && self.attached_id()?.is_some() {
            return Err(format!("xdp-loader unload -a: {}{}", r.out, r.err).into());
        }
        Ok(())
    }

    /// The id of the program attached to the interface, from `ip -j link`.
    fn attached_id(&self) -> Result<Option<u32>> {
        let shown = self.ns.ip(&["-j", "link", "show", "dev", self.iface])?;
        let v: serde_json::Value = serde_json::from_str(&shown)?;
        let xdp = &v[0]["xdp"];
        let id = xdp["prog"]["id"]
            .as_u64()
            .or_else(|| xdp["attached"][0]["prog"]["id"].as_u64());
        Ok(id.map(|i| i as u32))
    }

    /// Replaces whatever is attached with libxdp's dispatcher holding `k`
    /// copies of `test_pass`. `Err` of the reason when libxdp cannot (more
    /// than it holds, or no dispatcher because the kernel refuses EXT and
    /// libxdp fell back to the program alone).
    pub(crate) fn dispatcher(
        &self,
        k: u32,
    ) -> Result<std::result::Result<(OwnedFd, sys::ProgInfo), String>> {
        self.unload_all()?;
        let r = self.load(k)?;
        if !r.ok {
            let why = r.err.lines().last().unwrap_or("").trim().to_owned();
            return Ok(Err(format!(
                "xdp-loader load of {k} programs failed: {why}"
            )));
        }
        if r.err
            .contains("Falling back to loading single prog without dispatcher")
        {
            return Ok(Err(
                "libxdp fell back to the program alone, without its dispatcher \
                 (the kernel refuses BPF_PROG_TYPE_EXT here)"
                    .into(),
            ));
        }
        let id = self.attached_id()?.ok_or("xdp-loader attached nothing")?;
        let fd = sys::prog_fd_by_id(id)?;
        let info = sys::prog_info(fd.as_fd())?;
        if info.name != "xdp_dispatcher" {
            return Ok(Err(format!(
                "the attached program is {}, not libxdp's xdp_dispatcher: libxdp fell back to \
                 the program alone (the kernel refuses BPF_PROG_TYPE_EXT?)",
                info.name
            )));
        }
        Ok(Ok((fd, info)))
    }

    /// Wall time of `xdp-loader load` adding one program to `k - 1`
    /// already loaded, `times` times (everything is unloaded in between).
    pub(crate) fn time_adding(
        &self,
        k: u32,
        times: u32,
    ) -> Result<std::result::Result<Vec<Duration>, String>> {
        let mut took = vec![];
        for _ in 0..times {
            self.unload_all()?;
            if k > 1 {
                let r = self.load(k - 1)?;
                if !r.ok {
                    return Ok(Err(format!("xdp-loader load of {} programs failed", k - 1)));
                }
            }
            let r = self.load(1)?;
            if !r.ok {
                let why = r.err.lines().last().unwrap_or("").trim().to_owned();
                return Ok(Err(format!("xdp-loader load of program {k} failed: {why}")));
            }
            took.push(r.took);
        }
        self.unload_all()?;
        Ok(Ok(took))
    }
}

impl Drop for Libxdp<'_> {
    fn drop(&mut self) {
        let _ = self.unload_all();
        if self.made_xdp_dir {
            // Only if empty: other users of libxdp may have pinned there since.
            let _ = std::fs::remove_dir(LIBXDP_DIR);
        }
    }
}

/// `bpftool -j prog show id ID`: (bytes_xlated, bytes_jited), if bpftool
/// is installed (the kernel's own lengths of the two images).
pub(crate) fn image_sizes(id: u32) -> Option<(u64, u64)> {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show", "id", &id.to_string()])
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some((v["bytes_xlated"].as_u64()?, v["bytes_jited"].as_u64()?))
}
