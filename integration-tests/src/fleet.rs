//! A fleet of real `rootletd` agents on one machine, for the fleet rollout
//! tests (`tests/fleet.rs`) and benchmark (`rootlet-fleet-bench`).
//!
//! Each host is a [`VethPair`] (its own `host` and `peer` namespaces, `rl0`
//! in `host`) and an agent process running *inside* the host namespace
//! (`nsenter --net`, which unlike `ip netns exec` keeps the bpffs mount),
//! so a bundle that targets `interface = "rl0"` (no `netns`) means each
//! host's own `rl0`. Each agent has its own config, state directory and
//! bpffs root (under one bpffs instance mounted for the fleet), trusts the
//! fleet's signing key, and listens on a Unix socket (reachable from any
//! namespace). Hosts asked for with `mtls` also listen on TCP
//! `127.0.0.1:50051` inside their namespace with mutual TLS; a small
//! forwarder in the caller's namespace ([`Forwarder`]) makes that
//! reachable as `127.0.0.1:<port>`, so the client's real mTLS path is
//! exercised end to end.
//!
//! Traffic: [`RealFleet::start_traffic`] runs a [`Blaster`] per host (peer
//! to host, UDP); [`RealFleet::traffic_flows`] checks that packets reach a
//! socket in the host namespace.
//!
//! Everything is bounded in time, and torn down on drop: agents are
//! killed (and continued first, if stopped), then the namespaces go, then
//! the bpffs instance is unmounted.
#![forbid(unsafe_code)]

use std::{
    collections::BTreeSet,
    fs,
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use nix::{
    sched::{CloneFlags, setns},
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use rootlet_client::{
    inventory::{Address, Host, Security, TlsSettings},
    transport::{Fleet, TransportOptions},
};

use crate::{
    netns::{HOST_IP, VethPair},
    packet::{payload_seq, seq_payload},
    pki::Pki,
    traffic::{BlastConfig, Blaster, RawSocket, UdpSink},
    witness::StackDrops,
};

/// The UDP port traffic goes to in each host namespace.
pub const SINK_PORT: u16 = 7000;
/// Sequence numbers of [`RealFleet::traffic_flows`]' probes start here,
/// far above any the background traffic uses.
const PROBE_SEQ_BASE: u64 = 1 << 40;
/// The TCP port mTLS agents listen on inside their namespace.
pub const AGENT_TCP_PORT: u16 = 50051;
/// The client certificate's CN, an admin on every agent.
pub const CLIENT_CN: &str = "rootletctl";
/// How long an agent may take to report SERVING.
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// `target/<profile>/<name>` next to the running test or benchmark binary.
pub fn sibling_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from(name));
    let dir = exe
        .parent()
        .map(|d| {
            if d.ends_with("deps") {
                d.parent().unwrap_or(d)
            } else {
                d
            }
        })
        .unwrap_or(Path::new("."));
    dir.join(name)
}

/// Copies bytes between a TCP connection accepted in the caller's
/// namespace and one opened in a host namespace.
pub struct Forwarder {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Forwarder {
    /// Listens on `127.0.0.1:0` here and forwards every connection to
    /// `target` inside the namespace whose file is `netns`.
    pub fn start(netns: &Path, target: SocketAddr) -> io::Result<Forwarder> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let netns = netns.to_path_buf();
        let thread = thread::Builder::new()
            .name("forwarder".into())
            .spawn(move || {
                // Bounded by the stop flag, checked every 20 ms.
                while !flag.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((down, _)) => {
                            let netns = netns.clone();
                            let _ = thread::Builder::new().name("forward-conn".into()).spawn(
                                move || {
                                    let _ = forward(down, &netns, target);
                                },
                            );
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(20));
                        }
                        Err(_) => thread::sleep(Duration::from_millis(20)),
                    }
                }
            })?;
        Ok(Forwarder {
            addr,
            stop,
            thread: Some(thread),
        })
    }
}

impl Forwarder {
    /// The other way: listens on `target` (a loopback address) inside the
    /// namespace whose file is `netns`, and forwards every connection to
    /// `target` in the caller's namespace. An agent in its host namespace
    /// then reaches a server on this namespace's loopback (the test
    /// registry) at the same address, so a certificate for it still holds.
    pub fn start_into(netns: &Path, target: SocketAddr) -> io::Result<Forwarder> {
        let home = fs::File::open("/proc/thread-self/ns/net")?;
        let ns = fs::File::open(netns)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let (ready, listening) = std::sync::mpsc::channel::<io::Result<()>>();
        let thread = thread::Builder::new()
            .name("forwarder-in".into())
            .spawn(move || {
                let listener = setns(&ns, CloneFlags::CLONE_NEWNET)
                    .map_err(io::Error::other)
                    .and_then(|()| TcpListener::bind(target))
                    .and_then(|l| l.set_nonblocking(true).map(|()| l));
                let listener = match listener {
                    Ok(l) => {
                        let _ = ready.send(Ok(()));
                        l
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                // Bounded by the stop flag, checked every 20 ms.
                while !flag.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((down, _)) => {
                            let Ok(home) = home.try_clone() else { continue };
                            let _ = thread::Builder::new().name("forward-conn".into()).spawn(
                                move || {
                                    // This thread was made in the host
                                    // namespace: back home to connect.
                                    let _ = setns(&home, CloneFlags::CLONE_NEWNET)
                                        .map_err(io::Error::other)
                                        .and_then(|()| pump(down, target));
                                },
                            );
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(20));
                        }
                        Err(_) => thread::sleep(Duration::from_millis(20)),
                    }
                }
            })?;
        listening
            .recv_timeout(Duration::from_secs(5))
            .map_err(io::Error::other)??;
        Ok(Forwarder {
            addr: target,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One forwarded connection: this thread moves into the namespace to
/// connect (the socket stays there), then bytes flow both ways until
/// either side closes.
fn forward(down: TcpStream, netns: &Path, target: SocketAddr) -> io::Result<()> {
    let ns = fs::File::open(netns)?;
    setns(&ns, CloneFlags::CLONE_NEWNET).map_err(io::Error::other)?;
    pump(down, target)
}

/// Connects to `target` from this thread's namespace and copies bytes both
/// ways until either side closes.
fn pump(down: TcpStream, target: SocketAddr) -> io::Result<()> {
    down.set_nonblocking(false)?;
    let up = TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
    up.set_nodelay(true)?;
    down.set_nodelay(true)?;
    let (mut up_r, mut down_w) = (up.try_clone()?, down.try_clone()?);
    let back = thread::spawn(move || {
        let _ = copy(&mut up_r, &mut down_w);
        let _ = down_w.shutdown(Shutdown::Write);
    });
    let (mut down_r, mut up_w) = (down, up);
    let _ = copy(&mut down_r, &mut up_w);
    let _ = up_w.shutdown(Shutdown::Write);
    let _ = back.join();
    Ok(())
}

/// `io::copy` that ends at EOF or the first error (each side closes when
/// the test drops its client or the agent dies).
fn copy(r: &mut TcpStream, w: &mut TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        w.write_all(&buf[..n])?;
    }
}

/// Starts the agent of the host whose namespaces are `pair` and whose
/// config is in `state_dir`, with `ROOTLETD_CRASH_AT=crash_at` if given;
/// its output is appended to `rootletd.log`.
fn spawn_agent(
    pair: &VethPair,
    state_dir: &Path,
    rootletd: &Path,
    crash_at: Option<&str>,
) -> io::Result<Child> {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(state_dir.join("rootletd.log"))?;
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", pair.host().path().display()))
        .arg("--")
        .arg(rootletd)
        .arg("--config")
        .arg(state_dir.join("rootletd.toml"))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    if let Some(step) = crash_at {
        cmd.env("ROOTLETD_CRASH_AT", step);
    }
    cmd.spawn()
}

/// One host of the fleet.
pub struct RealHost {
    pub name: String,
    pub pair: VethPair,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub forwarder: Option<Forwarder>,
    child: Option<Child>,
    sink: UdpSink,
    raw: RawSocket,
    blaster: Option<Blaster>,
    stopped: bool,
}

impl RealHost {
    /// The agent's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

/// N real agents; see the module docs.
pub struct RealFleet {
    pub dir: PathBuf,
    pub pki: Pki,
    pub hosts: Vec<RealHost>,
    /// The private key every agent trusts (PEM), and its public half.
    pub signing_key: PathBuf,
    pub public_key: PathBuf,
    bpffs: PathBuf,
    /// Appended to every agent's configuration.
    extra: String,
    /// See [`RealFleet::reach`].
    reached: Vec<Forwarder>,
    _tmp: tempfile::TempDir,
}

fn backend_name() -> &'static str {
    match std::env::var("ROOTLET_TEST_BACKEND").as_deref() {
        Ok("freplace") => "freplace",
        Ok("tailcall") => "tailcall",
        _ => "auto",
    }
}

fn toml_str(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

impl RealFleet {
    /// Starts `n` agents (hosts `host-00`...), those whose index is in
    /// `mtls` also on TCP with mutual TLS. Returns when every agent
    /// reports SERVING (or fails after [`READY_TIMEOUT`]).
    pub async fn start(n: usize, mtls: &[usize]) -> io::Result<RealFleet> {
        Self::start_with(n, mtls, "").await
    }

    /// [`RealFleet::start`], with `extra` (TOML tables, e.g. `[[registry]]`)
    /// appended to every agent's configuration.
    pub async fn start_with(n: usize, mtls: &[usize], extra: &str) -> io::Result<RealFleet> {
        let rootletd = sibling_binary("rootletd");
        if !rootletd.exists() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "{} is missing: build it first (cargo build -p rootlet-server, with the same profile)",
                    rootletd.display()
                ),
            ));
        }
        let tmp = tempfile::Builder::new()
            .prefix("rootlet-fleet-")
            .tempdir()?;
        let dir = tmp.path().to_path_buf();
        let pki = Pki::new();
        let signing_key = dir.join("release.key");
        let public_key = dir.join("release.pub");
        rootlet_bundle::keygen(&signing_key, &public_key).map_err(io::Error::other)?;
        // One bpffs instance for the fleet, outside /sys (which namespaced
        // tools remount).
        let bpffs = dir.join("bpffs");
        fs::create_dir_all(&bpffs)?;
        run(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&bpffs))?;
        let mut fleet = RealFleet {
            dir: dir.clone(),
            pki,
            hosts: Vec::new(),
            signing_key,
            public_key,
            bpffs,
            extra: extra.to_owned(),
            reached: Vec::new(),
            _tmp: tmp,
        };
        for i in 0..n {
            let host = fleet.start_host(i, mtls.contains(&i), &rootletd)?;
            fleet.hosts.push(host);
        }
        fleet.wait_ready().await?;
        Ok(fleet)
    }

    fn start_host(&self, i: usize, mtls: bool, rootletd: &Path) -> io::Result<RealHost> {
        let name = format!("host-{i:02}");
        let pair = VethPair::new()?;
        let state_dir = self.dir.join(&name);
        fs::create_dir_all(&state_dir)?;
        let socket = state_dir.join("rootletd.sock");
        let mut cfg = format!("[listen]\nunix = {}\n", toml_str(&socket));
        if mtls {
            let tls = self.pki.tls_config();
            cfg.push_str(&format!(
                "tcp = \"127.0.0.1:{AGENT_TCP_PORT}\"\n[tls]\ncert = {}\nkey = {}\nclient_ca = {}\n",
                toml_str(&tls.cert),
                toml_str(&tls.key),
                toml_str(&tls.client_ca)
            ));
        }
        cfg.push_str(&format!(
            "[log]\nlevel = \"warn\"\n[dataplane]\nbpffs_root = {}\nstate_dir = {}\nbackend = \"{}\"\n\
             [bundles]\ntrusted_keys = [{}]\nhistory = 5\n\
             [[authz.identity]]\nname = \"{CLIENT_CN}\"\nrole = \"admin\"\n",
            toml_str(&self.bpffs.join(&name)),
            toml_str(&state_dir),
            backend_name(),
            toml_str(&self.public_key)
        ));
        cfg.push_str(&self.extra);
        let config = state_dir.join("rootletd.toml");
        fs::write(&config, cfg)?;
        let child = spawn_agent(&pair, &state_dir, rootletd, None)?;
        let forwarder = if mtls {
            Some(Forwarder::start(
                pair.host().path(),
                SocketAddr::from(([127, 0, 0, 1], AGENT_TCP_PORT)),
            )?)
        } else {
            None
        };
        let sink = UdpSink::bind(pair.host(), SocketAddrV4::new(HOST_IP, SINK_PORT))?;
        let raw = RawSocket::open(pair.peer(), pair.peer_if())?;
        Ok(RealHost {
            name,
            pair,
            socket,
            state_dir,
            forwarder,
            child: Some(child),
            sink,
            raw,
            blaster: None,
            stopped: false,
        })
    }

    /// Makes `addr` (a server on this namespace's loopback) reachable at
    /// the same address from every agent's namespace; the forwarders live
    /// as long as the fleet.
    pub fn reach(&mut self, addr: SocketAddr) -> io::Result<()> {
        for h in &self.hosts {
            let f = Forwarder::start_into(h.pair.host().path(), addr)?;
            self.reached.push(f);
        }
        Ok(())
    }

    /// The inventory hosts: Unix sockets, or TCP with mTLS through the
    /// forwarder. Labels: `zone` (a, b by index parity), `role = "edge"`.
    pub fn inventory(&self) -> Vec<Host> {
        let client = self.pki.client(CLIENT_CN);
        self.hosts
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let (address, security) = match &h.forwarder {
                    Some(f) => (
                        Address::Tcp(f.addr.to_string()),
                        Security::Tls(TlsSettings {
                            ca: self.pki.ca_path().to_path_buf(),
                            cert: client.cert_path.clone(),
                            key: client.key_path.clone(),
                            server_name: Some("localhost".into()),
                        }),
                    ),
                    None => (Address::Unix(h.socket.clone()), Security::Local),
                };
                Host {
                    name: h.name.clone(),
                    address,
                    labels: [
                        (
                            "zone".to_string(),
                            if i % 2 == 0 { "a" } else { "b" }.to_string(),
                        ),
                        ("role".to_string(), "edge".to_string()),
                    ]
                    .into(),
                    security,
                }
            })
            .collect()
    }

    /// The inventory as a file `rootletctl` reads.
    pub fn inventory_toml(&self) -> String {
        let mut out = String::new();
        for h in self.inventory() {
            out.push_str(&format!("[[hosts]]\nname = \"{}\"\n", h.name));
            let labels: Vec<String> = h
                .labels
                .iter()
                .map(|(k, v)| format!("{k} = \"{v}\""))
                .collect();
            out.push_str(&format!("labels = {{ {} }}\n", labels.join(", ")));
            match (&h.address, &h.security) {
                (Address::Tcp(a), Security::Tls(t)) => out.push_str(&format!(
                    "address = \"{a}\"\ntls = {{ ca = {}, cert = {}, key = {}, server_name = \"localhost\" }}\n",
                    toml_str(&t.ca),
                    toml_str(&t.cert),
                    toml_str(&t.key)
                )),
                (a, _) => out.push_str(&format!("address = \"{a}\"\n")),
            }
        }
        out
    }

    /// Waits until every agent reports SERVING.
    pub async fn wait_ready(&mut self) -> io::Result<()> {
        let fleet = Fleet::new(
            self.inventory(),
            TransportOptions {
                rpc_timeout: Duration::from_secs(2),
                retries: 0,
                ..TransportOptions::default()
            },
        );
        let end = Instant::now() + READY_TIMEOUT;
        for (i, h) in self.hosts.iter_mut().enumerate() {
            // Bounded by READY_TIMEOUT.
            loop {
                if fleet.health(i).await.unwrap_or(false) {
                    break;
                }
                if let Some(Ok(Some(status))) = h.child.as_mut().map(Child::try_wait) {
                    let log =
                        fs::read_to_string(h.state_dir.join("rootletd.log")).unwrap_or_default();
                    return Err(io::Error::other(format!(
                        "{}: rootletd exited ({status}) before serving:\n{log}",
                        h.name
                    )));
                }
                if Instant::now() > end {
                    let log =
                        fs::read_to_string(h.state_dir.join("rootletd.log")).unwrap_or_default();
                    return Err(io::Error::other(format!(
                        "{}: rootletd not SERVING within {READY_TIMEOUT:?}:\n{log}",
                        h.name
                    )));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// A signed bundle `edge` at `version` from the sample manifest
    /// (`deploy/bundles/edge/manifest.toml`, objects from `rootlet_ebpf`),
    /// plus a first stage that aborts every packet if `abort`.
    pub fn sample_bundle(&self, version: &str, abort: bool) -> io::Result<PathBuf> {
        sample_bundle(&self.dir, version, abort, Some(&self.signing_key))
    }

    /// [`sample_bundle_objects`] with the `_v2` objects, signed with the
    /// fleet's key.
    pub fn sample_bundle_v2(&self, version: &str) -> io::Result<PathBuf> {
        sample_bundle_objects(&self.dir, version, false, true, Some(&self.signing_key))
    }

    /// A policy for stage `stage` at `version` setting map `map` to
    /// `entries` (key and value as TOML values, e.g. `"192.0.2.0/24"` and
    /// `1`), signed with the fleet's key: a document written as a person
    /// would, then read with its file:line:col checks.
    pub fn signed_policy(
        &self,
        stage: &str,
        version: u64,
        map: &str,
        entries: &[(&str, &str)],
    ) -> io::Result<PathBuf> {
        let lines: Vec<String> = entries
            .iter()
            .map(|(k, v)| format!("  {{ key = {k}, value = {v} }},"))
            .collect();
        let text = format!(
            "stage = \"{stage}\"\nversion = {version}\n\n[maps.{map}]\nentries = [\n{}\n]\n",
            lines.join("\n")
        );
        let src = self.dir.join(format!("policy-{stage}-v{version}.toml"));
        fs::write(&src, &text)?;
        let doc = rootlet_bundle::PolicyDocument::parse(&text, &src).map_err(io::Error::other)?;
        let mut signed = rootlet_bundle::SignedPolicy::new(doc);
        signed
            .sign(&rootlet_bundle::read_signing_key(&self.signing_key).map_err(io::Error::other)?);
        let out = self.dir.join(format!("policy-{stage}-v{version}.rlp"));
        fs::write(&out, signed.to_bytes())?;
        Ok(out)
    }

    /// Sends `n` UDP packets from host `i`'s peer to the host with source
    /// address `src` (as if from another machine behind the peer).
    pub fn send_from(&self, i: usize, src: std::net::Ipv4Addr, n: u64) -> io::Result<()> {
        let h = self
            .hosts
            .get(i)
            .ok_or_else(|| io::Error::other(format!("no host {i}")))?;
        let mut frame = h.pair.udp_to_host(40002, SINK_PORT, vec![0; 32]);
        frame.src_ip = src;
        let bytes = frame.to_bytes();
        for _ in 0..n {
            h.raw.send(&bytes)?;
        }
        Ok(())
    }

    /// Sends UDP from every peer to its host at `pps` (until stopped or
    /// five minutes pass).
    pub fn start_traffic(&mut self, pps: u64) -> io::Result<()> {
        for h in &mut self.hosts {
            let template = h.pair.udp_to_host(40000, SINK_PORT, Vec::new());
            let mut cfg = BlastConfig::new(template, pps.saturating_mul(300));
            cfg.rate_pps = pps.max(1);
            cfg.max_duration = Duration::from_secs(300);
            h.blaster = Some(Blaster::start(&h.raw, cfg)?);
        }
        Ok(())
    }

    pub fn stop_traffic(&mut self) {
        for h in &mut self.hosts {
            if let Some(b) = h.blaster.take() {
                b.stop();
            }
        }
    }

    /// Whether packets sent now from host `i`'s peer go through its
    /// pipeline: `n` probes (numbered apart from the background traffic,
    /// which keeps flowing), every one of them received by the host's
    /// socket or counted by the host namespace's stack as dropped after the
    /// data plane passed it ([`StackDrops`]): a starved socket cannot fail
    /// this, and background packets cannot pass it.
    pub fn traffic_flows(&self, i: usize, n: u64) -> io::Result<bool> {
        static NEXT_PROBE: AtomicU64 = AtomicU64::new(PROBE_SEQ_BASE);
        let h = self
            .hosts
            .get(i)
            .ok_or_else(|| io::Error::other(format!("no host {i}")))?;
        let first = NEXT_PROBE.fetch_add(n, Ordering::Relaxed);
        let probes = first..first + n;
        let before = StackDrops::read(h.pair.host())?;
        let template = h.pair.udp_to_host(40001, SINK_PORT, Vec::new());
        for seq in probes.clone() {
            h.raw
                .send(&template.with_payload(seq_payload(seq, 64)).to_bytes())?;
        }
        let mut got = BTreeSet::new();
        let end = Instant::now() + Duration::from_secs(5);
        while (got.len() as u64) < n && Instant::now() < end {
            let batch = h.sink.recv_until_idle(Duration::from_millis(300), end)?;
            if batch.is_empty() {
                break;
            }
            got.extend(
                batch
                    .iter()
                    .filter_map(|p| payload_seq(p))
                    .filter(|s| probes.contains(s)),
            );
        }
        let dropped = StackDrops::read(h.pair.host())?.since(&before).total();
        Ok(got.len() as u64 + dropped >= n)
    }

    /// Stops (SIGSTOP) or continues (SIGCONT) host `i`'s agent: a stopped
    /// agent accepts connections but never answers.
    pub fn freeze(&mut self, i: usize, stop: bool) -> io::Result<()> {
        let h = self
            .hosts
            .get_mut(i)
            .ok_or_else(|| io::Error::other(format!("no host {i}")))?;
        let pid = h.pid().ok_or_else(|| io::Error::other("no agent"))?;
        // nsenter execs rootletd, so the child is the agent itself.
        kill(
            Pid::from_raw(i32::try_from(pid).map_err(io::Error::other)?),
            if stop {
                Signal::SIGSTOP
            } else {
                Signal::SIGCONT
            },
        )
        .map_err(io::Error::other)?;
        h.stopped = stop;
        Ok(())
    }

    /// Kills host `i`'s agent (SIGKILL, continuing it first if stopped)
    /// and starts it again, with `ROOTLETD_CRASH_AT=crash_at` if given (it
    /// then aborts at that step of its next change). Returns once the new
    /// agent reports SERVING.
    pub async fn restart(&mut self, i: usize, crash_at: Option<&str>) -> io::Result<()> {
        let rootletd = sibling_binary("rootletd");
        let h = self
            .hosts
            .get_mut(i)
            .ok_or_else(|| io::Error::other(format!("no host {i}")))?;
        if let Some(mut child) = h.child.take() {
            if h.stopped
                && let Ok(pid) = i32::try_from(child.id())
            {
                let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        h.stopped = false;
        h.child = Some(spawn_agent(&h.pair, &h.state_dir, &rootletd, crash_at)?);
        self.wait_ready().await
    }

    /// Kills host `i`'s agent (SIGKILL, continuing it first if stopped)
    /// and leaves it down; [`RealFleet::restart`] starts it again. Its
    /// rootlets stay attached (their links are pinned), so traffic keeps
    /// going through the last pipeline it applied.
    pub fn kill(&mut self, i: usize) -> io::Result<()> {
        let h = self
            .hosts
            .get_mut(i)
            .ok_or_else(|| io::Error::other(format!("no host {i}")))?;
        let mut child = h.child.take().ok_or_else(|| io::Error::other("no agent"))?;
        if h.stopped
            && let Ok(pid) = i32::try_from(child.id())
        {
            let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
        }
        h.stopped = false;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// Whether host `i`'s agent process has exited (it crashed, or was
    /// killed).
    pub fn agent_exited(&mut self, i: usize) -> bool {
        self.hosts
            .get_mut(i)
            .and_then(|h| h.child.as_mut())
            .is_none_or(|c| matches!(c.try_wait(), Ok(Some(_))))
    }

    /// The agent log of host `i`.
    pub fn log(&self, i: usize) -> String {
        self.hosts
            .get(i)
            .and_then(|h| fs::read_to_string(h.state_dir.join("rootletd.log")).ok())
            .unwrap_or_default()
    }
}

impl Drop for RealFleet {
    fn drop(&mut self) {
        self.stop_traffic();
        for h in &mut self.hosts {
            if let Some(mut child) = h.child.take() {
                if h.stopped
                    && let Ok(pid) = i32::try_from(child.id())
                {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
                }
                let _ = child.kill();
                let _ = child.wait();
            }
            h.forwarder.take();
        }
        // The namespaces (and with them the veths and XDP programs) go
        // with the hosts; then the bpffs instance.
        self.hosts.clear();
        if let Err(e) = run(Command::new("umount").arg(&self.bpffs)) {
            eprintln!("rootlet fleet: unmounting {}: {e}", self.bpffs.display());
        }
    }
}

/// Writes the sample bundle's manifest (with `version`, and an aborting
/// first stage if `abort`) and its objects under `dir`, builds it, signs it
/// with `key` if given, and returns the bundle file.
pub fn sample_bundle(
    dir: &Path,
    version: &str,
    abort: bool,
    key: Option<&Path>,
) -> io::Result<PathBuf> {
    sample_bundle_objects(dir, version, abort, false, key)
}

/// [`sample_bundle`], with the `_v2` builds of the sampler and ddos objects
/// if `v2` (so that applying it loads new programs rather than only
/// recording a new version).
pub fn sample_bundle_objects(
    dir: &Path,
    version: &str,
    abort: bool,
    v2: bool,
    key: Option<&Path>,
) -> io::Result<PathBuf> {
    let src = dir.join(format!("bundle-{version}"));
    let objects = src.join("objects");
    fs::create_dir_all(&objects)?;
    let (sampler, ddos) = if v2 {
        (rootlet_ebpf::SAMPLER_V2, rootlet_ebpf::DDOS_V2)
    } else {
        (rootlet_ebpf::SAMPLER, rootlet_ebpf::DDOS)
    };
    for (name, bytes) in [
        ("sampler.o", sampler),
        ("ddos.o", ddos),
        ("l4lb.o", rootlet_ebpf::L4LB),
        ("test_abort.o", rootlet_ebpf::TEST_ABORT),
    ] {
        fs::write(objects.join(name), bytes)?;
    }
    let mut manifest = SAMPLE_MANIFEST.replacen(
        "version = \"1.0.0\"",
        &format!("version = \"{version}\""),
        1,
    );
    if abort {
        manifest.push_str(
            "\n# Test only: a stage that aborts every packet.\n[[stages]]\nname = \"abort_all\"\nobject = \"objects/test_abort.o\"\nprogram = \"verdict\"\npriority = 1\nowner = \"netsec\"\n",
        );
    }
    let path = src.join("manifest.toml");
    fs::write(&path, manifest)?;
    let bundle = rootlet_bundle::Bundle::build(&path).map_err(io::Error::other)?;
    let mut signed = rootlet_bundle::SignedBundle::new(bundle);
    if let Some(k) = key {
        signed.sign(&rootlet_bundle::read_signing_key(k).map_err(io::Error::other)?);
    }
    let out = dir.join(format!("edge-{version}.rlb"));
    fs::write(&out, signed.to_bytes())?;
    Ok(out)
}

/// `deploy/bundles/edge/manifest.toml`.
pub const SAMPLE_MANIFEST: &str = include_str!("../../deploy/bundles/edge/manifest.toml");

fn run(cmd: &mut Command) -> io::Result<()> {
    let out = cmd.output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{cmd:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}
