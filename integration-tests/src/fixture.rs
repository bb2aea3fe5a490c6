//! What every data-plane integration test starts from: a veth pair in fresh
//! namespaces, its own bpffs root and store (so tests run concurrently), the
//! backend under test, and helpers to build stages and drive `rootlet-dp`.
//!
//! The backend comes from `ROOTLET_TEST_BACKEND` (`freplace` or
//! `tailcall`); the test command sets it for each tier. Unset, the probe
//! decides (auto), and the tests say which one they got.

use std::{
    io::{BufRead, BufReader},
    os::fd::AsFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use rootlet_dataplane::{
    Config, Dataplane, crash, prog_maps,
    spec::{
        ActionSet, BackendChoice, InterfaceRef, MapPolicy, RootletKey, RootletSpec, StageSpec,
        XdpAction, XdpMode,
    },
    state::RootletState,
    sys,
};

use crate::netns::VethPair;

/// The backend the tests exercise.
pub fn backend() -> BackendChoice {
    match std::env::var("ROOTLET_TEST_BACKEND").as_deref() {
        Ok("freplace") => BackendChoice::Freplace,
        Ok("tailcall") => BackendChoice::TailCall,
        Ok("auto") => BackendChoice::Auto,
        Ok(other) => panic!("ROOTLET_TEST_BACKEND={other}: expected freplace, tailcall or auto"),
        Err(_) => BackendChoice::Auto,
    }
}

pub fn backend_name() -> &'static str {
    match backend() {
        BackendChoice::Freplace => "freplace",
        BackendChoice::TailCall => "tailcall",
        BackendChoice::Auto => "auto",
    }
}

/// Mounts bpffs at /sys/fs/bpf if nothing is mounted there.
pub fn ensure_bpffs() {
    if !rootlet_dataplane::is_bpffs(Path::new("/sys/fs/bpf")) {
        let status = Command::new("mount")
            .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .status();
        assert!(
            status.is_ok_and(|s| s.success()),
            "cannot mount bpffs at /sys/fs/bpf"
        );
    }
}

pub struct Fixture {
    pub pair: VethPair,
    pub root: PathBuf,
    pub store: PathBuf,
    state_dir: PathBuf,
}

impl Fixture {
    pub fn new() -> Fixture {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        ensure_bpffs();
        let id = format!(
            "{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let root = PathBuf::from("/sys/fs/bpf/rootlet-test").join(&id);
        let state_dir = std::env::temp_dir().join(format!("rootlet-test-{id}"));
        let pair = VethPair::new().expect("veth pair");
        Fixture {
            pair,
            root,
            store: state_dir.join("dataplane.redb"),
            state_dir,
        }
    }

    pub fn config(&self) -> Config {
        Config {
            bpffs_root: self.root.clone(),
            store_path: self.store.clone(),
            backend: backend(),
            crash_at: None,
            // Each load makes its own loader, as without a pool: the suites
            // start many processes, which would each fill one in the VM.
            warm_loaders: 0,
        }
    }

    pub fn open(&self) -> Dataplane {
        Dataplane::open(self.config()).expect("open data plane")
    }

    pub fn rootlet_spec(&self, mode: XdpMode) -> RootletSpec {
        RootletSpec {
            iface: InterfaceRef {
                netns: Some(self.pair.host().path().to_owned()),
                ifname: self.pair.host_if().into(),
            },
            mode,
            final_verdict: XdpAction::Pass,
        }
    }

    pub fn load(&self, dp: &Dataplane) -> RootletKey {
        dp.load_rootlet(self.rootlet_spec(XdpMode::Auto))
            .expect("load rootlet")
    }

    /// `rootlet-dp` on this fixture's root and store.
    pub fn dp_command(&self) -> Command {
        let mut cmd = Command::new(dp_binary());
        cmd.arg("--root")
            .arg(&self.root)
            .arg("--store")
            .arg(&self.store)
            .arg("--backend")
            .arg(match backend() {
                BackendChoice::Freplace => "freplace",
                BackendChoice::TailCall => "tailcall",
                BackendChoice::Auto => "auto",
            });
        cmd
    }

    /// Runs `rootlet-dp` with `steps` to completion; panics on failure.
    pub fn dp(&self, steps: &[&str]) {
        let out = self
            .dp_command()
            .args(steps)
            .output()
            .expect("run rootlet-dp");
        assert!(
            out.status.success(),
            "rootlet-dp {steps:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts `rootlet-dp` with `steps` ending in `hold`, waits for "ready".
    pub fn dp_hold(&self, steps: &[&str]) -> Held {
        let mut child = self
            .dp_command()
            .args(steps)
            .arg("hold")
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn rootlet-dp");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_default();
        if line.trim() != "ready" {
            let _ = child.kill();
            let status = child.wait();
            panic!("rootlet-dp {steps:?} did not get ready: {status:?}");
        }
        Held { child }
    }

    /// The kernel's own count of `action` over every slot of every rootlet
    /// under this fixture's root, read straight from the pinned `stats`
    /// maps (no agent needed; DROP, TX, REDIRECT and ABORTED are always
    /// counted where they happen, in both backends).
    pub fn pinned_count(&self, action: XdpAction) -> u64 {
        let layout = rootlet_dataplane::pins::Layout::new(&self.root);
        let cpus = aya_cpus();
        let abi = rootlet_dataplane::abi::PERCPU_SIZE;
        let mut total = 0;
        for key in layout.rootlets().unwrap_or_default() {
            let Ok(map) = sys::obj_get(&layout.stats(key)) else {
                continue;
            };
            let mut value = vec![0u8; abi * cpus];
            if !sys::map_lookup(map.as_fd(), &0u32.to_ne_bytes(), &mut value).unwrap_or(false) {
                continue;
            }
            for cpu in value.chunks_exact(abi) {
                for parity in 0..2 {
                    for slot in 0..rootlet_dataplane::abi::MAX_SLOTS {
                        let at =
                            rootlet_dataplane::abi::counter_offset(parity, slot, action as usize);
                        let word: [u8; 8] = cpu[at..at + 8].try_into().unwrap_or_default();
                        total += u64::from_ne_bytes(word);
                    }
                }
            }
        }
        total
    }

    /// The kernel's own count of the packets every rootlet under this
    /// fixture's root handled with its final verdict (they went through
    /// every stage), read straight from the pinned maps like
    /// [`Fixture::pinned_count`]: the freplace rootlet's
    /// [`abi::FINAL_COUNTER`](rootlet_dataplane::abi::FINAL_COUNTER) in
    /// `stats`, and the tail-call rootlet's `final` map, both parities.
    pub fn pinned_finals(&self) -> u64 {
        use rootlet_dataplane::abi;
        let layout = rootlet_dataplane::pins::Layout::new(&self.root);
        let cpus = aya_cpus();
        let word = |b: &[u8], at: usize| {
            let w: [u8; 8] = b[at..at + 8].try_into().unwrap_or_default();
            u64::from_ne_bytes(w)
        };
        let mut total = 0;
        for key in layout.rootlets().unwrap_or_default() {
            if let Ok(map) = sys::obj_get(&layout.stats(key)) {
                let mut value = vec![0u8; abi::PERCPU_SIZE * cpus];
                if sys::map_lookup(map.as_fd(), &0u32.to_ne_bytes(), &mut value).unwrap_or(false) {
                    let (parity, slot, counter) = abi::FINAL_COUNTER;
                    let at = abi::counter_offset(parity, slot, counter);
                    total += value
                        .chunks_exact(abi::PERCPU_SIZE)
                        .map(|cpu| word(cpu, at))
                        .sum::<u64>();
                }
            }
            if let Ok(map) = sys::obj_get(&layout.final_counts(key)) {
                let mut value = vec![0u8; abi::FINAL_SIZE * cpus];
                if sys::map_lookup(map.as_fd(), &0u32.to_ne_bytes(), &mut value).unwrap_or(false) {
                    total += value
                        .chunks_exact(abi::FINAL_SIZE)
                        .map(|cpu| word(cpu, 0) + word(cpu, 8))
                        .sum::<u64>();
                }
            }
        }
        total
    }

    pub fn netns_path(&self) -> &Path {
        self.pair.host().path()
    }

    /// Every pin under this fixture's root, relative, sorted.
    pub fn pins(&self) -> Vec<String> {
        let mut out = vec![];
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p.clone());
                }
                out.push(
                    p.strip_prefix(&self.root)
                        .unwrap_or(&p)
                        .display()
                        .to_string(),
                );
            }
        }
        out.sort();
        out
    }
}

impl Default for Fixture {
    fn default() -> Self {
        Fixture::new()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // Pins go first: the XDP link goes with them (and with the veth).
        let _ = std::fs::remove_dir_all(&self.root);
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

/// The `rootlet-dp` binary: `ROOTLET_DP`, else beside the test binary
/// (`target/<profile>/deps/<test>` → `target/<profile>/rootlet-dp`).
fn dp_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("ROOTLET_DP") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    let dir = if dir.ends_with("deps") {
        dir.parent().unwrap_or(dir)
    } else {
        dir
    };
    let bin = dir.join("rootlet-dp");
    assert!(
        bin.exists(),
        "{} not built: cargo build -p rootlet-integration-tests --bins",
        bin.display()
    );
    bin
}

/// A `rootlet-dp` process holding what it made; killed on drop.
pub struct Held {
    child: Child,
}

impl Held {
    /// SIGKILL, and wait for it to be gone.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A stage from the embedded catalog, pinned, proceeding on PASS.
pub fn stage(name: &str, object: &str, priority: i32) -> StageSpec {
    let entry =
        rootlet_ebpf::stage(object).unwrap_or_else(|| panic!("no embedded object {object}"));
    StageSpec {
        name: name.into(),
        object: Arc::new(entry.object.to_vec()),
        program: entry.program.into(),
        priority,
        proceed_on: ActionSet::default(),
        pin: true,
        maps: MapPolicy::Fresh,
        owner: "test".into(),
    }
}

/// The counters of stage `name` in `state`.
pub fn slot<'a>(state: &'a RootletState, name: &str) -> &'a rootlet_dataplane::state::SlotState {
    state
        .slots
        .iter()
        .find(|s| s.stage == name)
        .unwrap_or_else(|| panic!("no stage {name} in {state:#?}"))
}

/// Runs the live rootlet program on `packet` in the kernel (BPF_PROG_TEST_RUN)
/// and returns its verdict.
pub fn test_run(state: &RootletState, packet: &[u8]) -> u32 {
    let prog = sys::prog_fd_by_id(state.rootlet.id).expect("rootlet program by id");
    sys::prog_test_run(prog.as_fd(), packet, 1)
        .expect("test run")
        .0
}

/// Reads a u64 array element (summed over CPUs for per-CPU maps).
pub fn read_u64(map: &std::os::fd::OwnedFd, index: u32, percpu: bool) -> u64 {
    let cpus = if percpu { aya_cpus() } else { 1 };
    let mut buf = vec![0u8; 8 * cpus];
    sys::map_lookup(map.as_fd(), &index.to_ne_bytes(), &mut buf).expect("map lookup");
    buf.chunks_exact(8)
        .map(|c| u64::from_ne_bytes(c.try_into().unwrap_or_default()))
        .sum()
}

/// Entry `index` of per-CPU map `map` of u64 values, one per possible CPU;
/// `None` if the map has no such entry or cannot be read.
pub fn read_percpu_u64(map: &std::os::fd::OwnedFd, index: u32) -> Option<Vec<u64>> {
    let mut buf = vec![0u8; 8 * aya_cpus()];
    if !sys::map_lookup(map.as_fd(), &index.to_ne_bytes(), &mut buf).ok()? {
        return None;
    }
    Some(
        buf.chunks_exact(8)
            .map(|c| u64::from_ne_bytes(c.try_into().unwrap_or_default()))
            .collect(),
    )
}

fn aya_cpus() -> usize {
    std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| {
            s.trim()
                .split(',')
                .map(|r| match r.split_once('-') {
                    Some((a, b)) => b
                        .parse::<usize>()
                        .ok()
                        .zip(a.parse::<usize>().ok())
                        .map(|(b, a)| b - a + 1),
                    None => r.parse::<usize>().ok().map(|_| 1),
                })
                .sum::<Option<usize>>()
        })
        .unwrap_or(1)
}

/// The maps of a program by kernel id.
pub fn maps_of_prog(id: u32) -> std::collections::BTreeMap<String, std::os::fd::OwnedFd> {
    prog_maps(sys::prog_fd_by_id(id).expect("prog by id").as_fd()).expect("maps")
}

/// Waits until `f` holds, for at most `limit`.
pub fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

pub use crash::Step;
