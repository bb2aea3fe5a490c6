//! What a rootlet looks like, read back from the kernel: program and link
//! ids, tags, verified instruction counts, load times, and the per-slot
//! per-action counters. The store contributes only what the kernel cannot
//! hold (names, owners, priorities, digests).

use std::{
    os::fd::{AsFd, BorrowedFd},
    path::PathBuf,
    time::{Duration, SystemTime},
};

use serde::Serialize;

use super::{
    abi,
    error::Result,
    spec::{ActionSet, Backend, RootletKey, XdpAction, XdpMode},
    sys,
};

/// A loaded program as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProgState {
    pub id: u32,
    pub name: String,
    /// The kernel's program tag (hex).
    pub tag: String,
    pub verified_insns: u32,
    /// When the kernel loaded it.
    #[serde(with = "unix_time")]
    pub loaded_at: SystemTime,
}

impl ProgState {
    /// A program the kernel no longer reports (id 0).
    pub fn unknown() -> Self {
        ProgState {
            id: 0,
            name: String::new(),
            tag: String::new(),
            verified_insns: 0,
            loaded_at: SystemTime::UNIX_EPOCH,
        }
    }

    pub fn read(fd: BorrowedFd<'_>) -> Result<Self> {
        let info = sys::prog_info(fd)?;
        Ok(ProgState {
            id: info.id,
            name: info.name,
            tag: hex::encode(info.tag),
            verified_insns: info.verified_insns,
            loaded_at: boot_to_wall(info.load_time_ns),
        })
    }
}

/// Converts the kernel's ns-since-boot to wall-clock time.
fn boot_to_wall(ns: u64) -> SystemTime {
    let since_boot = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32))
        .unwrap_or_default();
    let ago = since_boot.saturating_sub(Duration::from_nanos(ns));
    SystemTime::now() - ago
}

mod unix_time {
    use std::time::{SystemTime, UNIX_EPOCH};

    pub fn serialize<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(
            t.duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        )
    }
}

/// Packets a slot's stage returned each action for (summed over CPUs), and
/// `empty`: packets that found the slot enabled but empty and went on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub aborted: u64,
    pub drop: u64,
    pub pass: u64,
    pub tx: u64,
    pub redirect: u64,
    pub empty: u64,
}

impl Counters {
    pub fn get(&self, a: XdpAction) -> u64 {
        match a {
            XdpAction::Aborted => self.aborted,
            XdpAction::Drop => self.drop,
            XdpAction::Pass => self.pass,
            XdpAction::Tx => self.tx,
            XdpAction::Redirect => self.redirect,
        }
    }

    pub fn total(&self) -> u64 {
        self.aborted + self.drop + self.pass + self.tx + self.redirect + self.empty
    }

    /// A slot's counts, as `tally` keeps them.
    pub fn of(counts: &[u64; abi::NUM_COUNTERS]) -> Counters {
        Counters {
            aborted: counts[0],
            drop: counts[1],
            pass: counts[2],
            tx: counts[3],
            redirect: counts[4],
            empty: counts[abi::COUNT_EMPTY],
        }
    }
}

/// One slot of a rootlet.
#[derive(Debug, Clone, Serialize)]
pub struct SlotState {
    pub slot: u32,
    /// Position in execution order (0 runs first).
    pub position: usize,
    pub stage: String,
    pub owner: String,
    pub priority: i32,
    pub proceed_on: Vec<XdpAction>,
    pub digest: String,
    pub pinned: bool,
    /// The stage's program, or None when the slot is empty (an unpinned
    /// stage whose owner exited): packets go on through the placeholder.
    pub prog: Option<ProgState>,
    /// freplace: the link of the program into the live rootlet instance.
    pub link_id: Option<u32>,
    /// tail-call: the id of the stage's instance for the other generation
    /// parity, loaded with it, which the next change runs if the stage
    /// stays.
    pub twin_id: Option<u32>,
    pub pin_path: Option<PathBuf>,
    /// The stage's counts since `linked_generation`, across replacements.
    pub counters: Counters,
    /// Whether the rootlet sees the stage's verdicts: false for a plain XDP
    /// program (not built with <rootlet/stage.h>) last in a tail-call
    /// chain, which returns its verdict to the kernel; its counters then
    /// stay zero whatever it does.
    pub counted: bool,
    /// The generation that linked the stage into this slot (0: before this
    /// was recorded): where its counters start.
    pub linked_generation: u64,
    /// The generation that loaded its build: with `digest`, an identity that
    /// stays while the build runs, whatever program ids it has.
    pub loaded_generation: u64,
    /// The kernel programs running the build: freplace, one (parity 0);
    /// tail-call, one per generation parity.
    pub instances: Vec<Instance>,
    /// The stage's own maps (not the rootlet's, not its global data), as
    /// the kernel reports them for the running program.
    pub maps: Vec<StageMap>,
}

/// One kernel program running a stage's build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Instance {
    /// The generation parity it runs in (freplace: 0).
    pub parity: u32,
    pub id: u32,
    /// Whether the live generation runs it.
    pub live: bool,
}

/// One map of a stage. Rootlet pins no stage map, whatever the object asks
/// (a `LIBBPF_PIN_BY_NAME` map gets a new map of its own, like any other),
/// and shares a stage's maps only between its own instances (tail-call:
/// one per parity) and, with `MapPolicy::Keep`, with the stage it replaces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StageMap {
    /// The kernel's name (at most 15 characters).
    pub name: String,
    pub id: u32,
    /// Other stages of this rootlet whose programs use this very map; empty
    /// unless something outside Rootlet made them share it.
    pub shared_with: Vec<String>,
}

impl StageMap {
    /// The stage maps of program `prog` (see [`SlotState::maps`]).
    pub fn of(prog: BorrowedFd<'_>) -> Result<Vec<StageMap>> {
        let mut maps = vec![];
        for id in sys::prog_info(prog)?.map_ids {
            let info = sys::map_info(sys::map_fd_by_id(id)?.as_fd())?;
            // Rootlet's own maps start with `rootlet_`; global data
            // (`<obj>.rodata`, `.bss.rootlet`, …) has a dot in its name.
            if info.name.starts_with("rootlet_") || info.name.contains('.') {
                continue;
            }
            maps.push(StageMap {
                name: info.name,
                id,
                shared_with: vec![],
            });
        }
        maps.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(maps)
    }
}

/// One rootlet.
#[derive(Debug, Clone, Serialize)]
pub struct RootletState {
    pub key: RootletKey,
    pub ifname: String,
    pub netns: Option<PathBuf>,
    pub backend: Backend,
    pub mode: XdpMode,
    pub final_verdict: XdpAction,
    /// The generation of the set of stages (increases with every change).
    pub generation: u64,
    pub rootlet: ProgState,
    pub xdp_link_id: u32,
    /// Why the kernel no longer runs what the store describes, if it doesn't.
    pub drift: Option<String>,
    /// Packets the rootlet handled with `final_verdict` (every stage
    /// proceeded, or there was none), since the rootlet was loaded.
    pub final_verdict_count: u64,
    pub slots: Vec<SlotState>,
}

impl SlotState {
    pub fn proceed_set(&self) -> ActionSet {
        ActionSet::of(&self.proceed_on)
    }
}
