//! Named network namespaces (`ip netns`) and a veth pair joining two of them.
//!
//! [`Netns`] is one namespace, created with a name unique to the process and
//! call and deleted on drop. [`VethPair`] is the usual test topology: `rl0`
//! in a `host` namespace, `rl1` in a `peer` namespace, `169.254.77.0/24`
//! addresses and static neighbour entries both ways.
//!
//! # XDP_TX on veth
//!
//! A frame an XDP program on `rl0` returns `XDP_TX` for goes back out of
//! `rl0`, i.e. to `rl1`'s receive side. In generic (skb) mode that just
//! works. In native (driver) mode veth hands the frame to `rl1`'s XDP ring,
//! which exists only while `rl1` runs NAPI (it has an XDP program, or GRO is
//! enabled); with neither, the frames are counted as `xdp_tx_errors` and
//! dropped. GRO alone is **not** enough either: the frames are queued
//! (`xdp_tx` counts them as sent) but `rl1`'s NAPI is only kicked after
//! `XDP_TX` if `rl1` has an XDP program, so they sit in `rl1`'s ring until
//! something else happens to schedule it; in a test, they never arrive
//! (checked on Linux 6.18). For native-mode `XDP_TX` tests call
//! [`VethPair::attach_peer_xdp_pass`], which attaches an `XDP_PASS` program
//! to `rl1`.
#![forbid(unsafe_code)]

use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::panic;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;

use nix::sched::{CloneFlags, setns};

use crate::packet::{MacAddr, UdpFrame, mac_to_string};
use crate::sys;

/// Per-process counter making namespace and temporary file names unique.
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// Where `ip netns` keeps its bind mounts (`/var/run` is `/run` on Debian).
const NETNS_DIRS: [&str; 2] = ["/run/netns", "/var/run/netns"];

/// Attempts at finding an unused name before giving up.
const NAME_ATTEMPTS: usize = 64;

/// A named network namespace, created with `ip netns add` and deleted with
/// `ip netns del` on drop.
///
/// Deleting the name does not destroy the namespace while something still
/// uses it (a socket opened inside keeps it alive until it is closed).
#[derive(Debug)]
pub struct Netns {
    name: String,
    path: PathBuf,
}

impl Netns {
    /// A new namespace named `rlit-<pid>-<n>` (see [`Netns::with_prefix`]).
    pub fn new() -> io::Result<Netns> {
        Netns::with_prefix("rlit")
    }

    /// A new namespace named `<prefix>-<pid>-<n>`, `n` counting up within
    /// the process, zero-padded so that names with one prefix sort in the
    /// order they were made: a bundle applies its rootlets in its canonical
    /// order, by (interface, netns path), and a test that makes the second
    /// of two rootlets fail relies on the second namespace sorting after the
    /// first (unpadded, `…-10` sorted before `…-9`, which reversed the order
    /// whenever the counter gained a digit). A name left over from an
    /// earlier process with the same pid is skipped. `prefix` is ASCII
    /// letters, digits, `-` and `_`.
    pub fn with_prefix(prefix: &str) -> io::Result<Netns> {
        let valid = !prefix.is_empty()
            && prefix.len() <= 32
            && prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad netns prefix {prefix:?}"),
            ));
        }
        let pid = std::process::id();
        for _ in 0..NAME_ATTEMPTS {
            let name = format!(
                "{prefix}-{pid}-{:06}",
                NEXT_ID.fetch_add(1, Ordering::Relaxed)
            );
            if find_netns_path(&name).is_some() {
                continue;
            }
            run_command(Command::new("ip").args(["netns", "add", &name]))?;
            let ns = Netns {
                path: find_netns_path(&name)
                    .unwrap_or_else(|| Path::new(NETNS_DIRS[0]).join(&name)),
                name,
            };
            if !ns.path.exists() {
                // Dropping `ns` deletes whatever `ip` made.
                return Err(io::Error::other(format!(
                    "`ip netns add {}` succeeded but no {NETNS_DIRS:?}/{} exists",
                    ns.name, ns.name
                )));
            }
            return Ok(ns);
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("no free netns name {prefix}-{pid}-* after {NAME_ATTEMPTS} attempts"),
        ))
    }

    /// The namespace's name, as `ip netns list` shows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's bind mount, e.g. `/run/netns/<name>`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on a new thread that has entered this namespace
    /// (`setns(CLONE_NEWNET)`), waits for it and returns its result. A panic
    /// in `f` is resumed on the calling thread. Sockets `f` creates belong to
    /// this namespace and keep working from any thread afterwards.
    ///
    /// # Panics
    ///
    /// If the namespace cannot be entered; see [`Netns::try_run`].
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        match self.try_run(f) {
            Ok(value) => value,
            Err(e) => panic!("cannot enter netns {}: {e}", self.name),
        }
    }

    /// [`Netns::run`], failing instead of panicking if the namespace cannot
    /// be opened or entered or the thread cannot be spawned.
    pub fn try_run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> io::Result<T> {
        let ns_file = fs::File::open(&self.path).map_err(|e| {
            io::Error::new(e.kind(), format!("opening {}: {e}", self.path.display()))
        })?;
        thread::scope(|scope| {
            let handle = thread::Builder::new()
                .name(format!("netns {}", self.name))
                .spawn_scoped(scope, move || -> io::Result<T> {
                    setns(&ns_file, CloneFlags::CLONE_NEWNET)
                        .map_err(|e| io::Error::other(format!("setns(CLONE_NEWNET): {e}")))?;
                    Ok(f())
                })?;
            match handle.join() {
                Ok(result) => result,
                Err(payload) => panic::resume_unwind(payload),
            }
        })
    }

    /// Runs `args` (program and arguments) inside the namespace with
    /// `ip netns exec` and returns its stdout; a non-zero exit is an error
    /// carrying the command, status and stderr.
    pub fn exec(&self, args: &[&str]) -> io::Result<String> {
        run_command(
            Command::new("ip")
                .args(["netns", "exec", &self.name])
                .args(args),
        )
    }

    /// Runs `ip -n <name> <args>` and returns its stdout; errors as
    /// [`Netns::exec`].
    pub fn ip(&self, args: &[&str]) -> io::Result<String> {
        run_command(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// The index of interface `ifname` in this namespace.
    pub fn ifindex(&self, ifname: &str) -> io::Result<u32> {
        self.try_run(|| nix::net::if_::if_nametoindex(ifname))?
            .map_err(|e| {
                io::Error::other(format!("interface {ifname} in netns {}: {e}", self.name))
            })
    }

    /// Writes a sysctl of this namespace, e.g.
    /// `sysctl("net.ipv4.ip_forward", "1")` (dots become slashes, so keys
    /// naming an interface with a dot in it cannot be written this way).
    pub fn sysctl(&self, key: &str, value: &str) -> io::Result<()> {
        let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
        self.try_run(|| fs::write(&path, value))?.map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("sysctl {key}={value} in netns {}: {e}", self.name),
            )
        })
    }

    /// Whether GRO is enabled on `ifname` (`ethtool -k`; done with the
    /// ethtool ioctl since `ethtool` may not be installed).
    pub fn gro(&self, ifname: &str) -> io::Result<bool> {
        self.try_run(|| sys::ethtool_gro(ifname, None))?
    }

    /// Enables or disables GRO on `ifname` (`ethtool -K <if> gro on|off`).
    pub fn set_gro(&self, ifname: &str, on: bool) -> io::Result<()> {
        let now = self.try_run(|| sys::ethtool_gro(ifname, Some(on)))??;
        if now != on {
            return Err(io::Error::other(format!(
                "GRO on {ifname} stayed {now} after setting {on}"
            )));
        }
        Ok(())
    }

    /// Attaches the XDP program in section `section` of the ELF `object`
    /// (e.g. one of `rootlet_ebpf`'s objects) to `ifname` with
    /// `ip link set dev <if> xdpdrv|xdpgeneric obj <file> sec <section>`.
    /// Fails if a program is attached already.
    pub fn attach_xdp(
        &self,
        ifname: &str,
        object: &[u8],
        section: &str,
        mode: XdpMode,
    ) -> io::Result<()> {
        let file = std::env::temp_dir().join(format!(
            "rootlet-it-{}-{}.o",
            std::process::id(),
            NEXT_ID.fetch_add(1, Ordering::Relaxed)
        ));
        fs::write(&file, object)?;
        let file_arg = file.to_string_lossy().into_owned();
        let result = self.ip(&[
            "link",
            "set",
            "dev",
            ifname,
            mode.keyword(),
            "obj",
            &file_arg,
            "sec",
            section,
        ]);
        if let Err(e) = fs::remove_file(&file) {
            eprintln!(
                "rootlet-integration-tests: removing {}: {e}",
                file.display()
            );
        }
        result.map(drop)
    }

    /// Detaches the XDP program attached to `ifname` in `mode`, if any.
    pub fn detach_xdp(&self, ifname: &str, mode: XdpMode) -> io::Result<()> {
        self.ip(&["link", "set", "dev", ifname, mode.keyword(), "off"])
            .map(drop)
    }

    /// The names `ip netns list` shows, for every namespace on the host.
    pub fn list() -> io::Result<Vec<String>> {
        let out = run_command(Command::new("ip").args(["netns", "list"]))?;
        // Lines are "<name>" or "<name> (id: <n>)".
        Ok(out
            .lines()
            .filter_map(|line| line.split_whitespace().next())
            .map(str::to_owned)
            .collect())
    }

    /// Whether a namespace named `name` is listed by `ip netns list`.
    pub fn exists(name: &str) -> io::Result<bool> {
        Ok(Netns::list()?.iter().any(|n| n == name))
    }

    /// Turns IPv6 off for interfaces created from now on (and those present)
    /// so no router solicitations, MLD reports or DAD probes show up in the
    /// captures. Does nothing on a kernel without IPv6.
    fn disable_ipv6(&self) -> io::Result<()> {
        for key in [
            "net.ipv6.conf.default.disable_ipv6",
            "net.ipv6.conf.all.disable_ipv6",
        ] {
            match self.sysctl(key, "1") {
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                other => other?,
            }
        }
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run_command(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!(
                "rootlet-integration-tests: deleting netns {}: {e}",
                self.name
            );
        }
    }
}

/// How [`Netns::attach_xdp`] attaches a program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpMode {
    /// Driver mode (`xdpdrv`), what production uses; veth supports it.
    Native,
    /// Generic (skb) mode (`xdpgeneric`).
    Generic,
}

impl XdpMode {
    fn keyword(self) -> &'static str {
        match self {
            XdpMode::Native => "xdpdrv",
            XdpMode::Generic => "xdpgeneric",
        }
    }
}

/// `rl0`, the interface in the host namespace (where a rootlet attaches).
pub const HOST_IF: &str = "rl0";
/// `rl1`, the interface in the peer namespace (the traffic source).
pub const PEER_IF: &str = "rl1";
/// The MAC address of [`HOST_IF`].
pub const HOST_MAC: MacAddr = [0x02, 0, 0, 0, 0, 0x01];
/// The MAC address of [`PEER_IF`].
pub const PEER_MAC: MacAddr = [0x02, 0, 0, 0, 0, 0x02];
/// The subnet every address of a [`VethPair`] lies in.
pub const SUBNET: Ipv4Addr = Ipv4Addr::new(169, 254, 77, 0);
/// The prefix length of [`SUBNET`].
pub const SUBNET_PREFIX_LEN: u8 = 24;
/// The address of [`HOST_IF`].
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 77, 1);
/// The address of [`PEER_IF`].
pub const PEER_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 77, 2);

/// Whether `ip` lies in [`SUBNET`]`/`[`SUBNET_PREFIX_LEN`].
pub fn in_subnet(ip: Ipv4Addr) -> bool {
    ip.octets()[..3] == SUBNET.octets()[..3]
}

/// Two fresh namespaces joined by a veth pair:
///
/// | side   | netns  | interface | MAC               | address         |
/// |--------|--------|-----------|-------------------|-----------------|
/// | host   | `rlh-*`| `rl0`     | 02:00:00:00:00:01 | 169.254.77.1/24 |
/// | peer   | `rlp-*`| `rl1`     | 02:00:00:00:00:02 | 169.254.77.2/24 |
///
/// Both links and both `lo` are up, each side has a permanent neighbour
/// entry for the other (no ARP), and IPv6 is disabled in both namespaces
/// so captures hold only the test's own traffic. Dropping the pair deletes
/// the veth and both namespaces. See the [module docs](self) for what
/// native-mode `XDP_TX` needs.
#[derive(Debug)]
pub struct VethPair {
    host: Netns,
    peer: Netns,
    host_ifindex: u32,
    peer_ifindex: u32,
}

impl VethPair {
    /// Builds the namespaces, the veth pair and its configuration.
    pub fn new() -> io::Result<VethPair> {
        let host = Netns::with_prefix("rlh")?;
        let peer = Netns::with_prefix("rlp")?;
        for ns in [&host, &peer] {
            ns.disable_ipv6()?;
            ns.ip(&["link", "set", "lo", "up"])?;
        }
        // Created from inside `host` with the peer end placed straight into
        // `peer`, so the names never exist in (or clash in) any other netns.
        host.ip(&[
            "link",
            "add",
            HOST_IF,
            "address",
            &mac_to_string(&HOST_MAC),
            "type",
            "veth",
            "peer",
            "name",
            PEER_IF,
            "address",
            &mac_to_string(&PEER_MAC),
            "netns",
            peer.name(),
        ])?;
        let sides = [
            (&host, HOST_IF, HOST_IP, PEER_IP, PEER_MAC),
            (&peer, PEER_IF, PEER_IP, HOST_IP, HOST_MAC),
        ];
        for (ns, ifname, ip, other_ip, other_mac) in sides {
            ns.ip(&[
                "addr",
                "add",
                &format!("{ip}/{SUBNET_PREFIX_LEN}"),
                "dev",
                ifname,
            ])?;
            ns.ip(&["link", "set", "dev", ifname, "up"])?;
            ns.ip(&[
                "neigh",
                "replace",
                &other_ip.to_string(),
                "lladdr",
                &mac_to_string(&other_mac),
                "dev",
                ifname,
                "nud",
                "permanent",
            ])?;
        }
        let host_ifindex = host.ifindex(HOST_IF)?;
        let peer_ifindex = peer.ifindex(PEER_IF)?;
        Ok(VethPair {
            host,
            peer,
            host_ifindex,
            peer_ifindex,
        })
    }

    /// The host namespace (holds [`HOST_IF`]).
    pub fn host(&self) -> &Netns {
        &self.host
    }

    /// The peer namespace (holds [`PEER_IF`]).
    pub fn peer(&self) -> &Netns {
        &self.peer
    }

    /// [`HOST_IF`].
    pub fn host_if(&self) -> &'static str {
        HOST_IF
    }

    /// [`PEER_IF`].
    pub fn peer_if(&self) -> &'static str {
        PEER_IF
    }

    /// [`HOST_MAC`].
    pub fn host_mac(&self) -> MacAddr {
        HOST_MAC
    }

    /// [`PEER_MAC`].
    pub fn peer_mac(&self) -> MacAddr {
        PEER_MAC
    }

    /// [`HOST_IP`].
    pub fn host_ip(&self) -> Ipv4Addr {
        HOST_IP
    }

    /// [`PEER_IP`].
    pub fn peer_ip(&self) -> Ipv4Addr {
        PEER_IP
    }

    /// The index of [`HOST_IF`] inside the host namespace (what an XDP
    /// attach there needs).
    pub fn host_ifindex(&self) -> u32 {
        self.host_ifindex
    }

    /// The index of [`PEER_IF`] inside the peer namespace.
    pub fn peer_ifindex(&self) -> u32 {
        self.peer_ifindex
    }

    /// A frame from the peer to the host: peer MAC/IP to host MAC/IP.
    pub fn udp_to_host(&self, src_port: u16, dst_port: u16, payload: Vec<u8>) -> UdpFrame {
        UdpFrame {
            src_mac: PEER_MAC,
            dst_mac: HOST_MAC,
            src_ip: PEER_IP,
            dst_ip: HOST_IP,
            src_port,
            dst_port,
            payload,
        }
    }

    /// A frame from the host to the peer: host MAC/IP to peer MAC/IP.
    pub fn udp_to_peer(&self, src_port: u16, dst_port: u16, payload: Vec<u8>) -> UdpFrame {
        UdpFrame {
            src_mac: HOST_MAC,
            dst_mac: PEER_MAC,
            src_ip: HOST_IP,
            dst_ip: PEER_IP,
            src_port,
            dst_port,
            payload,
        }
    }

    /// Adds `ip/32` to [`HOST_IF`] (e.g. a VIP). Only addresses in
    /// [`SUBNET`] are accepted.
    pub fn add_host_ip(&self, ip: Ipv4Addr) -> io::Result<()> {
        add_ip(&self.host, HOST_IF, ip)
    }

    /// Adds `ip/32` to [`PEER_IF`] (e.g. a backend an L4 load balancer
    /// rewrites towards, so a [`crate::traffic::UdpSink`] in the peer
    /// namespace can receive it). Only addresses in [`SUBNET`] are accepted.
    pub fn add_peer_ip(&self, ip: Ipv4Addr) -> io::Result<()> {
        add_ip(&self.peer, PEER_IF, ip)
    }

    /// Attaches an `XDP_PASS` program (`rootlet_ebpf::TEST_PLAIN`) to
    /// [`PEER_IF`] in native mode. Needed for frames that a native-mode XDP
    /// program on [`HOST_IF`] sends back with `XDP_TX` to reach the peer;
    /// see the [module docs](self). Side effects, per the veth driver:
    /// [`HOST_IF`]'s maximum MTU drops to about 3500 and it loses software
    /// GSO while the program is attached.
    pub fn attach_peer_xdp_pass(&self) -> io::Result<()> {
        self.peer
            .attach_xdp(PEER_IF, rootlet_ebpf::TEST_PLAIN, "xdp", XdpMode::Native)
    }

    /// Detaches what [`VethPair::attach_peer_xdp_pass`] attached.
    pub fn detach_peer_xdp(&self) -> io::Result<()> {
        self.peer.detach_xdp(PEER_IF, XdpMode::Native)
    }

    /// Enables or disables GRO on [`PEER_IF`]. GRO gives the peer a NAPI
    /// context (so native `XDP_TX` from the host is no longer counted as an
    /// error) but does **not** make those frames arrive; use
    /// [`VethPair::attach_peer_xdp_pass`] for that.
    pub fn set_peer_gro(&self, on: bool) -> io::Result<()> {
        self.peer.set_gro(PEER_IF, on)
    }

    /// Whether GRO is enabled on [`PEER_IF`].
    pub fn peer_gro(&self) -> io::Result<bool> {
        self.peer.gro(PEER_IF)
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        // Delete the link first: a socket still open in a namespace keeps the
        // namespace (and with it the veth and any XDP program) alive after
        // its name is gone.
        if let Err(e) = self.host.ip(&["link", "del", HOST_IF]) {
            eprintln!(
                "rootlet-integration-tests: deleting {HOST_IF} in {}: {e}",
                self.host.name
            );
        }
        // The namespaces themselves go when the fields drop.
    }
}

fn add_ip(ns: &Netns, ifname: &str, ip: Ipv4Addr) -> io::Result<()> {
    if !in_subnet(ip) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{ip} is outside {SUBNET}/{SUBNET_PREFIX_LEN}"),
        ));
    }
    ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", ifname])
        .map(drop)
}

fn find_netns_path(name: &str) -> Option<PathBuf> {
    NETNS_DIRS
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|path| path.exists())
}

/// Runs `cmd`; its stdout on success, else an error with the command line,
/// exit status and stderr.
fn run_command(cmd: &mut Command) -> io::Result<String> {
    let line = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let out = cmd
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("running `{line}`: {e}")))?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
