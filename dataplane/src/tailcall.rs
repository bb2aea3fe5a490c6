//! The tail-call backend, for kernels that refuse BPF_PROG_TYPE_EXT.
//!
//! One `rootlet_chain` program per interface, loaded once. Packets are
//! routed by hop arrays, two entries each, indexed by generation parity:
//! `rootlet_first` holds the first stage, and `hop-K` (slot K's
//! `rootlet_next`, bound when its stage is loaded) the stage after slot K.
//! Each stage is loaded once per parity (`ROOTLET_STAGE_PARITY`), and an
//! instance of parity p only ever tail-calls entry p: which instances a
//! packet runs is its parity, so no program reads the parity at run time. A
//! stage that proceeds makes one static tail call into its hop array, so a
//! packet costs one tail call per stage. Each program of the chain has its
//! own hop configuration (`struct rootlet_hop_config`, global data read
//! with one load): its proceed-on mask and the final verdict.
//!
//! A change to generation N+1 rebuilds the inactive parity (every hop entry
//! and the hop configuration of every program placed in it), then flips
//! `rootlet_gen` to N+1 with one map update. A packet reads the generation
//! once, at entry, so it never sees a mix; the previous parity stays intact,
//! ready for an instant rollback, until the next change. A stage whose
//! neighbours change keeps its programs: only hop entries change, so it is
//! never loaded or verified again. A new stage is verified twice, once per
//! parity, in the change that brings it, with one aya loader (the second
//! load reuses the first's, `Load::xdp_after`).
//!
//! Each slot has an owner array (`slot-K`, four entries): entry p holds the
//! instance parity p runs, entry 2+p the parity-p instance of the stage the
//! other parity runs, for the next rebuild of p. It is pinned for a pinned
//! stage; for an unpinned one it is held only by this process's file
//! descriptor, and the kernel empties a program array when its last
//! descriptor and pin go. Hop arrays, which are always pinned, hold a pinned
//! stage directly and an unpinned one through its slot's gate of that
//! parity (`rootlet_gate`), which tail-calls the owner array and, once the
//! owner is gone and the array empty, counts the slot as empty and goes on.
//!
//! Counting: see [`super::tally`]. A stage whose PASS goes on to a program
//! that counts every packet it gets does not count that PASS.
//!
//! A packet that read the generation just before a flip may still be
//! running the parity that became inactive. XDP runs inside an RCU
//! read-side section, so after one RCU grace period no such packet is left:
//! each flip starts that wait in the background ([`Quiescence`]), and the
//! next rebuild of the inactive parity waits for it first. A packet never
//! meets an entry rewritten under it.

use std::{
    collections::BTreeMap,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    path::PathBuf,
    sync::{Mutex, PoisonError},
    thread::JoinHandle,
    time::Duration,
};

use super::{
    Ctx, abi,
    backend::{self, Build, Linker, Progs, SlotKernel},
    crash::{self, Step},
    error::{Error, Result},
    hook,
    loader::{Load, MapReuse, What},
    object, pins, policy,
    spec::{Plan, RootletKey, Source, StageRecord, XdpAction},
    state::{Instance, ProgState},
    store::Generation,
    sys,
    tally::{self, Tally},
};

/// The maps a tail-call rootlet shares with its stages.
#[derive(Debug)]
pub struct Shared {
    pub generation: OwnedFd,
    pub stats: OwnedFd,
    /// The final verdict's count (`rootlet_final`).
    pub finals: OwnedFd,
    /// Hop array to the first stage.
    pub first: OwnedFd,
    /// Hop array after each slot (pinned).
    pub hops: Vec<OwnedFd>,
    /// Owner array of each slot (pinned while it holds a pinned stage).
    pub owners: Vec<OwnedFd>,
}

/// The live state of one tail-call rootlet.
#[derive(Debug)]
pub struct Live {
    pub generation: u64,
    pub rootlet: OwnedFd,
    pub maps: Shared,
    /// Programs of the live parity, by slot.
    pub stages: BTreeMap<u32, OwnedFd>,
    /// The RCU grace period after the last flip.
    pub quiescence: Quiescence,
    /// The counts last reported.
    pub reported: tally::Monotonic,
}

/// The wait for the packets of the inactive parity to be gone: one RCU
/// grace period after a flip, waited for in a background thread.
#[derive(Debug, Default)]
pub struct Quiescence(Mutex<Option<JoinHandle<()>>>);

/// Used where the kernel refuses `membarrier` (nohz_full): far longer than
/// any XDP program run, though not a guarantee as a grace period is.
const QUIESCENCE_FALLBACK: Duration = Duration::from_millis(50);

impl Quiescence {
    fn grace_period() {
        if let Err(e) = sys::synchronize_rcu() {
            tracing::warn!(error = %e, wait = ?QUIESCENCE_FALLBACK, "no RCU grace period from the kernel; sleeping instead");
            std::thread::sleep(QUIESCENCE_FALLBACK);
        }
    }

    /// Starts the wait (after a flip, or when adopting a rootlet whose last
    /// flip this process did not see).
    pub fn start(&self) {
        let mut slot = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(previous) = slot.take() {
            let _ = previous.join();
        }
        match std::thread::Builder::new()
            .name("rootlet-quiesce".into())
            .spawn(Self::grace_period)
        {
            Ok(handle) => *slot = Some(handle),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start a thread; waiting for the grace period now");
                Self::grace_period();
            }
        }
    }

    /// Returns once no packet can still be running the inactive parity.
    pub fn wait(&self) {
        let handle = self.0.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(h) = handle {
            let _ = crate::budget::time(crate::budget::Step::Grace, || h.join());
        }
    }
}

/// The maps of a loaded program, by kernel name.
pub fn maps_of(prog: BorrowedFd<'_>) -> Result<BTreeMap<String, OwnedFd>> {
    let mut out = BTreeMap::new();
    for id in sys::prog_info(prog)?.map_ids {
        let fd = sys::map_fd_by_id(id)?;
        out.insert(sys::map_info(fd.as_fd())?.name, fd);
    }
    Ok(out)
}

fn take(maps: &mut BTreeMap<String, OwnedFd>, what: &str, name: &str) -> Result<OwnedFd> {
    maps.remove(name).ok_or_else(|| Error::Load {
        what: what.into(),
        message: format!("map {name} missing"),
    })
}

/// The parity of generation `number`: which entry of every hop array, and
/// which instance of every stage, its packets use.
pub fn parity(number: u64) -> u32 {
    (number & 1) as u32
}

/// The counters, once no packet runs the inactive parity any more: what
/// closes that parity's counting epoch before it is rebuilt.
pub fn quiesced_counts(live: &Live) -> Result<tally::Raw> {
    live.quiescence.wait();
    tally::read(live.maps.stats.as_fd())
}

/// Entries of an owner array: by parity the instance it runs, then by
/// parity the instance kept for the next rebuild.
const OWNER_ENTRIES: u32 = 4;

/// The owner array entry of the instance parity `parity` runs.
fn running(parity: u32) -> u32 {
    parity
}

/// The owner array entry of the parity-`parity` instance of the stage the
/// other parity runs.
fn kept(parity: u32) -> u32 {
    2 + parity
}

/// A program array (indexed by parity), named as the programs name it.
fn prog_array(name: &str, entries: u32) -> Result<OwnedFd> {
    Ok(sys::map_create(
        sys::BPF_MAP_TYPE_PROG_ARRAY,
        4,
        4,
        entries,
        name,
    )?)
}

/// The hop arrays: pinned, so created (and pinned) if missing.
fn hops(ctx: &Ctx, key: RootletKey) -> Result<Vec<OwnedFd>> {
    (0..abi::MAX_SLOTS as u32)
        .map(|slot| {
            let path = ctx.layout.chain_hop(key, slot);
            match sys::obj_get(&path) {
                Ok(fd) => Ok(fd),
                Err(e) if e.errno() == Some(libc::ENOENT) => {
                    let fd = prog_array(abi::NEXT_MAP, 2)?;
                    pin(fd.as_fd(), path, "hop array")?;
                    Ok(fd)
                }
                Err(e) => Err(e.into()),
            }
        })
        .collect()
}

/// The owner array of `slot`: its pin; else the one a gate uses (an
/// unpinned stage's array, found again after a restart); else a new one.
fn owner(ctx: &Ctx, key: RootletKey, slot: u32) -> Result<OwnedFd> {
    if let Ok(fd) = sys::obj_get(&ctx.layout.chain_slot(key, slot)) {
        return Ok(fd);
    }
    for parity in 0..2 {
        if let Ok(gate) = sys::obj_get(&ctx.layout.chain_gate(key, slot, parity)) {
            return take(&mut maps_of(gate.as_fd())?, "gate", abi::OWNER_MAP);
        }
    }
    prog_array(abi::OWNER_MAP, OWNER_ENTRIES)
}

/// The interface's counters: pinned, so created (and pinned) if missing.
fn stats(ctx: &Ctx, key: RootletKey) -> Result<OwnedFd> {
    counters(ctx.layout.stats(key), abi::PERCPU_SIZE, abi::STATS_MAP)
}

/// The interface's count of the final verdict: pinned, so created (and
/// pinned) if missing (a rootlet loaded before it existed).
fn finals(ctx: &Ctx, key: RootletKey) -> Result<OwnedFd> {
    counters(
        ctx.layout.final_counts(key),
        abi::FINAL_SIZE,
        abi::FINAL_MAP,
    )
}

fn counters(path: PathBuf, size: usize, name: &str) -> Result<OwnedFd> {
    match sys::obj_get(&path) {
        Ok(fd) => Ok(fd),
        Err(e) if e.errno() == Some(libc::ENOENT) => {
            let fd = sys::map_create(sys::BPF_MAP_TYPE_PERCPU_ARRAY, 4, size as u32, 1, name)?;
            pin(fd.as_fd(), path, "counters")?;
            Ok(fd)
        }
        Err(e) => Err(e.into()),
    }
}

fn shared_of(ctx: &Ctx, key: RootletKey, rootlet: BorrowedFd<'_>) -> Result<Shared> {
    let mut maps = maps_of(rootlet)?;
    let what = "tail-call rootlet";
    Ok(Shared {
        generation: take(&mut maps, what, abi::GEN_MAP)?,
        stats: stats(ctx, key)?,
        finals: finals(ctx, key)?,
        first: take(&mut maps, what, abi::FIRST_MAP)?,
        hops: hops(ctx, key)?,
        owners: (0..abi::MAX_SLOTS as u32)
            .map(|slot| owner(ctx, key, slot))
            .collect::<Result<_>>()?,
    })
}

/// Loads and pins the interface's chain rootlet (generation 0: empty).
pub fn create(ctx: &Ctx, key: RootletKey, final_verdict: XdpAction) -> Result<Live> {
    let dir = ctx.layout.chain_dir(key);
    std::fs::create_dir_all(&dir).map_err(|source| Error::Pin {
        what: "chain directory",
        path: dir.clone(),
        source,
    })?;
    let mut reuse = MapReuse::new(&ctx.layout)?;
    for name in [abi::GEN_MAP, abi::FIRST_MAP] {
        reuse.pinned(name, ctx.layout.chain_obj(key, name));
    }
    reuse.pinned(abi::FINAL_MAP, ctx.layout.final_counts(key));
    let rootlet = Load {
        bytes: rootlet_ebpf::ROOTLET_CHAIN,
        what: What {
            stage: None,
            program: abi::CHAIN_PROGRAM,
        },
        globals: vec![],
        reuse: Some(&reuse),
    }
    .xdp()?;
    pin(
        rootlet.as_fd(),
        ctx.layout.chain_obj(key, "rootlet"),
        "chain rootlet",
    )?;
    let maps = shared_of(ctx, key, rootlet.as_fd())?;
    for parity in 0..2u32 {
        configure(rootlet.as_fd(), parity, 0, final_verdict)?;
    }
    Ok(Live {
        generation: 0,
        rootlet,
        maps,
        stages: BTreeMap::new(),
        quiescence: Quiescence::default(),
        reported: tally::Monotonic::default(),
    })
}

/// Binds the maps a program in `slot` shares with the rootlet.
fn slot_reuse(ctx: &Ctx, maps: &Shared, slot: u32, keep: Option<MapReuse>) -> Result<MapReuse> {
    let mut reuse = match keep {
        Some(k) => k,
        None => MapReuse::new(&ctx.layout)?,
    };
    reuse.add(abi::STATS_MAP, maps.stats.as_fd())?;
    reuse.add(abi::FINAL_MAP, maps.finals.as_fd())?;
    reuse.add(abi::NEXT_MAP, maps.hops[slot as usize].as_fd())?;
    Ok(reuse)
}

/// Loads the chain rootlet and the gate of the last slot in each parity,
/// against maps of their own, and drops them: the probe's check of the
/// tail-call backend's own programs.
pub fn verify_programs() -> Result<()> {
    fn load(program: &str, globals: Vec<(&str, &[u8], bool)>) -> Result<()> {
        Load {
            bytes: rootlet_ebpf::ROOTLET_CHAIN,
            what: What {
                stage: None,
                program,
            },
            globals,
            reuse: None,
        }
        .xdp()
        .map(drop)
    }
    load(abi::CHAIN_PROGRAM, vec![])?;
    for parity in 0..2 {
        let chain = ChainMode::new(abi::MAX_SLOTS as u32 - 1, parity);
        load(abi::GATE_PROGRAM, chain.globals())?;
    }
    Ok(())
}

/// The values of the globals that put a program in tail-call mode in
/// `slot`, as the instance of parity `parity`.
struct ChainMode {
    slot: [u8; 4],
    parity: [u8; 4],
}

impl ChainMode {
    fn new(slot: u32, parity: u32) -> Self {
        ChainMode {
            slot: slot.to_ne_bytes(),
            parity: parity.to_ne_bytes(),
        }
    }

    fn globals(&self) -> Vec<(&'static str, &[u8], bool)> {
        vec![
            (abi::STAGE_SLOT_GLOBAL, &self.slot, true),
            (abi::STAGE_PARITY_GLOBAL, &self.parity, true),
        ]
    }
}

/// The parity-`parity` gate of `slot`, bound to its current owner array:
/// the pinned one, or a new one loaded and pinned in its place.
fn gate(ctx: &Ctx, key: RootletKey, maps: &Shared, slot: u32, parity: u32) -> Result<OwnedFd> {
    let path = ctx.layout.chain_gate(key, slot, parity);
    let owner_id = sys::map_info(maps.owners[slot as usize].as_fd())?.id;
    if let Ok(gate) = sys::obj_get(&path) {
        let bound = maps_of(gate.as_fd())?
            .get(abi::OWNER_MAP)
            .map(|m| sys::map_info(m.as_fd()).map(|i| i.id))
            .transpose()?;
        if bound == Some(owner_id) {
            return Ok(gate);
        }
        pins::remove(&path).map_err(|source| Error::Pin {
            what: "stale gate",
            path: path.clone(),
            source,
        })?;
    }
    let mut reuse = slot_reuse(ctx, maps, slot, None)?;
    reuse.add(abi::OWNER_MAP, maps.owners[slot as usize].as_fd())?;
    reuse.add(abi::GEN_MAP, maps.generation.as_fd())?;
    reuse.add(abi::FIRST_MAP, maps.first.as_fd())?;
    let chain = ChainMode::new(slot, parity);
    let gate = Load {
        bytes: rootlet_ebpf::ROOTLET_CHAIN,
        what: What {
            stage: None,
            program: abi::GATE_PROGRAM,
        },
        globals: chain.globals(),
        reuse: Some(&reuse),
    }
    .xdp()?;
    pin(gate.as_fd(), path, "gate")?;
    Ok(gate)
}

/// The inactive parity of `live`, rebuilt for `next`: returns the programs
/// by slot. Nothing is visible to packets until [`swap`]. On failure the
/// inactive parity is emptied, so no program of the attempt stays loaded.
pub fn build(
    ctx: &Ctx,
    key: RootletKey,
    live: &Live,
    next: &Generation,
    final_verdict: XdpAction,
    plan: &Plan,
    keep: &mut BTreeMap<u32, MapReuse>,
) -> Result<BTreeMap<u32, OwnedFd>> {
    live.quiescence.wait();
    let result = build_parity(ctx, key, live, next, final_verdict, plan, keep);
    if result.is_err() {
        let parity = parity(next.number);
        let entries = |map: &OwnedFd, entries: &[u32]| {
            for &entry in entries {
                if let Err(e) = set_entry(map.as_fd(), entry, None) {
                    tracing::error!(%key, error = %e, "cannot empty the inactive parity after a failed change");
                }
            }
        };
        for owner in &live.maps.owners {
            entries(owner, &[running(parity), kept(1 - parity)]);
        }
        for hop in live.maps.hops.iter().chain([&live.maps.first]) {
            entries(hop, &[parity]);
        }
    }
    result
}

/// Loads a new stage for `slot`: its instance for `parity`, and the one
/// for the other parity, which shares its maps (but for its read-only data
/// and hop configuration). A stage that cannot chain is one program that
/// serves both.
fn load_instances(
    ctx: &Ctx,
    maps: &Shared,
    slot: u32,
    parity: u32,
    spec: &super::spec::StageSpec,
    chainable: bool,
    keep: Option<MapReuse>,
) -> Result<(OwnedFd, OwnedFd)> {
    // A stage built with stage.h runs its chain program here; any other is
    // loaded as it is.
    let program = if chainable {
        abi::chain_program(&spec.program)
    } else {
        spec.program.clone()
    };
    let first = slot_reuse(ctx, maps, slot, keep)?;
    if !chainable {
        let prog = Load {
            bytes: &spec.object,
            what: What {
                stage: Some(&spec.name),
                program: &program,
            },
            globals: vec![],
            reuse: Some(&first),
        }
        .xdp()?;
        policy::install_empty(prog.as_fd(), &spec.object, &spec.name)?;
        let same = sys::dup(prog.as_fd())?;
        return Ok((prog, same));
    }
    let (mode, twin_mode) = (
        ChainMode::new(slot, parity),
        ChainMode::new(slot, 1 - parity),
    );
    fn load<'a>(
        spec: &'a super::spec::StageSpec,
        program: &'a str,
        chain: &'a ChainMode,
        reuse: &'a MapReuse,
    ) -> Load<'a> {
        Load {
            bytes: &spec.object,
            what: What {
                stage: Some(&spec.name),
                program,
            },
            globals: chain.globals(),
            reuse: Some(reuse),
        }
    }
    // The twin's maps outlive the loader the first load keeps for it.
    let mut twin = slot_reuse(ctx, maps, slot, None)?;
    let one = load(spec, &program, &mode, &first);
    let (prog, kept) = one.xdp_keeping()?;
    // Before any hop array can reach it; the twin shares these maps.
    policy::install_empty(prog.as_fd(), &spec.object, &spec.name)?;
    let mut own = maps_of(prog.as_fd())?;
    let names = object::stage_maps(&spec.object).map_err(|source| Error::Check {
        stage: spec.name.clone(),
        source,
    })?;
    for name in names {
        if let Some(fd) = own.remove(object::truncate(&name)) {
            twin.add(&name, fd.as_fd())?;
        }
    }
    let twin_load = load(spec, &program, &twin_mode, &twin);
    // The same object with the other parity: the first load's loader
    // (one kernel BTF parse per stage, not per instance) where that is
    // exactly a new one, see `Load::xdp_after`.
    let twin = twin_load.xdp_after(kept)?;
    Ok((prog, twin))
}

fn build_parity(
    ctx: &Ctx,
    key: RootletKey,
    live: &Live,
    next: &Generation,
    final_verdict: XdpAction,
    plan: &Plan,
    keep: &mut BTreeMap<u32, MapReuse>,
) -> Result<BTreeMap<u32, OwnedFd>> {
    let parity = parity(next.number);
    let other = 1 - parity;
    let total = next.pipeline.stages.len();
    for (position, stage) in next.pipeline.stages.iter().enumerate() {
        if !stage.chainable && position + 1 != total {
            return Err(Error::Placement {
                stage: stage.name.clone(),
                position: position + 1,
                total,
                reason: "it was not built with this version of <rootlet/stage.h>, so it cannot pass packets on \
                         to the next stage; an unmodified XDP program can only be the last stage",
            });
        }
    }
    let maps = &live.maps;
    let chain = tally::chain(&next.pipeline);
    let mut progs = BTreeMap::new();
    // The hop array whose entry leads to the stage being placed.
    let mut hop = maps.first.as_fd();
    for (stage, link) in next.pipeline.stages.iter().zip(&chain) {
        let owner = maps.owners[stage.slot as usize].as_fd();
        let (prog, twin) = match plan.sources.get(&stage.slot) {
            Some(Source::New(spec)) => load_instances(
                ctx,
                maps,
                stage.slot,
                parity,
                spec,
                stage.chainable,
                keep.remove(&stage.slot),
            )?,
            Some(Source::Existing) | None => {
                let gone = || Error::Load {
                    what: format!("stage `{}`", stage.name),
                    message: "its program is no longer loaded".into(),
                };
                let running_there = live.stages.get(&stage.slot).ok_or_else(gone)?;
                let prog = entry_prog(owner, kept(parity))?.ok_or_else(gone)?;
                (prog, sys::dup(running_there.as_fd())?)
            }
        };
        if stage.chainable {
            configure(prog.as_fd(), parity, link.mask(), final_verdict)?;
        }
        set_entry(owner, running(parity), Some(prog.as_fd()))?;
        set_entry(owner, kept(other), Some(twin.as_fd()))?;
        if stage.pin {
            set_entry(hop, parity, Some(prog.as_fd()))?;
        } else {
            let gate = gate(ctx, key, maps, stage.slot, parity)?;
            configure(gate.as_fd(), parity, link.mask(), final_verdict)?;
            set_entry(hop, parity, Some(gate.as_fd()))?;
        }
        hop = maps.hops[stage.slot as usize].as_fd();
        progs.insert(stage.slot, prog);
        crash::point(ctx.crash_at, Step::StageAttached);
    }
    // The last stage's hop, and every slot without a stage, lead nowhere.
    set_entry(hop, parity, None)?;
    for slot in 0..abi::MAX_SLOTS as u32 {
        if !progs.contains_key(&slot) {
            let owner = maps.owners[slot as usize].as_fd();
            set_entry(owner, running(parity), None)?;
            set_entry(owner, kept(other), None)?;
            set_entry(maps.hops[slot as usize].as_fd(), parity, None)?;
        }
    }
    configure(live.rootlet.as_fd(), parity, 0, final_verdict)?;
    pin_arrays(ctx, key, live, next)?;
    crash::point(ctx.crash_at, Step::Built);
    Ok(progs)
}

/// Pins the arrays of `next`'s pinned stages. Done before a swap, so that a
/// crash right after it cannot take them down with this process.
pub fn pin_arrays(ctx: &Ctx, key: RootletKey, live: &Live, next: &Generation) -> Result<()> {
    for stage in next.pipeline.stages.iter().filter(|s| s.pin) {
        let path = ctx.layout.chain_slot(key, stage.slot);
        if !path.exists() {
            pin(
                live.maps.owners[stage.slot as usize].as_fd(),
                path,
                "slot owner array",
            )?;
        }
    }
    Ok(())
}

/// The programs of `next`'s stages as its parity holds them, or None if
/// one is missing (an unpinned stage whose owner went away).
pub fn parity_progs(live: &Live, next: &Generation) -> Result<Option<BTreeMap<u32, OwnedFd>>> {
    let parity = parity(next.number);
    let mut progs = BTreeMap::new();
    for stage in &next.pipeline.stages {
        let owner = live.maps.owners[stage.slot as usize].as_fd();
        let Some(prog) = entry_prog(owner, running(parity))? else {
            return Ok(None);
        };
        progs.insert(stage.slot, prog);
    }
    Ok(Some(progs))
}

/// The program in entry `entry` of a program array.
fn entry_prog(map: BorrowedFd<'_>, entry: u32) -> Result<Option<OwnedFd>> {
    let mut id = [0u8; 4];
    if !sys::map_lookup(map, &entry.to_ne_bytes(), &mut id)? {
        return Ok(None);
    }
    Ok(Some(sys::prog_fd_by_id(u32::from_ne_bytes(id))?))
}

/// Writes parity `parity` of the hop configuration of `prog` (the rootlet,
/// a gate or a chainable stage); the other parity's entries, which packets
/// may be reading, keep their values.
fn configure(
    prog: BorrowedFd<'_>,
    parity: u32,
    proceed_mask: u32,
    final_verdict: XdpAction,
) -> Result<()> {
    let what = "chain program";
    let map = take(&mut maps_of(prog)?, what, abi::HOP_CONFIG_MAP)?;
    let size = sys::map_info(map.as_fd())?.value_size as usize;
    if size != abi::HOP_CONFIG_SIZE {
        return Err(Error::Load {
            what: what.into(),
            message: format!(
                "its {} is {size} bytes, not {}: built with another <rootlet/stage.h>",
                abi::HOP_CONFIG_MAP,
                abi::HOP_CONFIG_SIZE
            ),
        });
    }
    let mut config = [0u8; abi::HOP_CONFIG_SIZE];
    let zero = 0u32.to_ne_bytes();
    sys::map_lookup(map.as_fd(), &zero, &mut config)?;
    abi::set_hop_config(&mut config, parity, proceed_mask, final_verdict);
    sys::map_update(map.as_fd(), &zero, &config)?;
    Ok(())
}

fn set_entry(map: BorrowedFd<'_>, entry: u32, prog: Option<BorrowedFd<'_>>) -> Result<()> {
    match prog {
        Some(p) => {
            let fd = p.as_raw_fd() as u32;
            sys::map_update(map, &entry.to_ne_bytes(), &fd.to_ne_bytes())?;
        }
        None => sys::map_delete(map, &entry.to_ne_bytes())?,
    }
    Ok(())
}

/// Makes generation `number` live: one map update. The parity it leaves
/// is not rebuilt before the grace period this starts has passed.
pub fn swap(live: &Live, number: u64) -> Result<()> {
    sys::map_update(
        live.maps.generation.as_fd(),
        &0u32.to_ne_bytes(),
        &number.to_ne_bytes(),
    )?;
    live.quiescence.start();
    Ok(())
}

/// After a swap: unpins the arrays of slots without a pinned stage.
pub fn release(ctx: &Ctx, key: RootletKey, next: &Generation) {
    for slot in 0..abi::MAX_SLOTS as u32 {
        if !next.pipeline.by_slot(slot).is_some_and(|s| s.pin) {
            let path = ctx.layout.chain_slot(key, slot);
            if let Err(e) = pins::remove(&path) {
                tracing::error!(path = %path.display(), error = %e, "cannot unpin slot array");
            }
        }
    }
}

/// The generation the kernel runs.
pub fn kernel_generation(maps: &Shared) -> Result<u64> {
    let mut v = [0u8; 8];
    sys::map_lookup(maps.generation.as_fd(), &0u32.to_ne_bytes(), &mut v)?;
    Ok(u64::from_ne_bytes(v))
}

/// Opens the pinned chain rootlet of `key`. Stages of the live generation
/// whose owner died (unpinned) are emptied and left out.
pub fn adopt(ctx: &Ctx, key: RootletKey, generations: &[&Generation]) -> Result<Option<Live>> {
    let rootlet = sys::obj_get(&ctx.layout.chain_obj(key, "rootlet"))?;
    let maps = shared_of(ctx, key, rootlet.as_fd())?;
    let number = kernel_generation(&maps)?;
    let Some(generation) = generations.iter().find(|g| g.number == number) else {
        return Ok(None);
    };
    let parity = parity(number);
    let mut live = Live {
        generation: number,
        rootlet,
        maps,
        stages: BTreeMap::new(),
        quiescence: Quiescence::default(),
        reported: tally::Monotonic::default(),
    };
    // The last flip may have been the previous process's, just now.
    live.quiescence.start();
    for stage in &generation.pipeline.stages {
        let owner = live.maps.owners[stage.slot as usize].as_fd();
        if !stage.pin {
            for entry in 0..OWNER_ENTRIES {
                set_entry(owner, entry, None)?;
            }
            continue;
        }
        if let Some(prog) = entry_prog(owner, running(parity))? {
            live.stages.insert(stage.slot, prog);
        }
    }
    release(ctx, key, generation);
    Ok(Some(live))
}

/// The program in `slot` of the live parity, as the kernel reports it.
pub fn slot_prog_id(live: &Live, slot: u32) -> Result<Option<u32>> {
    owner_entry_id(live, slot, running(parity(live.generation)))
}

/// The instance kept for the other parity of the stage in `slot`.
pub fn slot_twin_id(live: &Live, slot: u32) -> Result<Option<u32>> {
    owner_entry_id(live, slot, kept(1 - parity(live.generation)))
}

fn owner_entry_id(live: &Live, slot: u32, entry: u32) -> Result<Option<u32>> {
    let mut id = [0u8; 4];
    Ok(sys::map_lookup(
        live.maps.owners[slot as usize].as_fd(),
        &entry.to_ne_bytes(),
        &mut id,
    )?
    .then(|| u32::from_ne_bytes(id)))
}

fn pin(fd: BorrowedFd<'_>, path: PathBuf, what: &'static str) -> Result<()> {
    sys::obj_pin(fd, &path).map_err(|e| Error::Pin {
        what,
        path,
        source: e.source,
    })
}

/// The tail-call backend of one rootlet: its live state and, during a
/// change, the programs of the parity built for the next generation.
#[derive(Debug)]
pub struct TailCall {
    live: Live,
    next: Option<Progs>,
}

impl TailCall {
    /// Loads the chain rootlet and flips it to generation `first` (no
    /// stages).
    pub fn create(
        ctx: &Ctx,
        key: RootletKey,
        first: &Generation,
        final_verdict: XdpAction,
    ) -> Result<Self> {
        let live = create(ctx, key, final_verdict)?;
        swap(&live, first.number)?;
        Ok(Self::adopted(Live {
            generation: first.number,
            ..live
        }))
    }

    pub fn adopted(live: Live) -> Self {
        TailCall { live, next: None }
    }
}

impl Linker for TailCall {
    fn generation(&self) -> u64 {
        self.live.generation
    }

    fn rootlet(&self) -> BorrowedFd<'_> {
        self.live.rootlet.as_fd()
    }

    fn stage_prog(&self, slot: u32) -> Option<BorrowedFd<'_>> {
        self.live.stages.get(&slot).map(|p| p.as_fd())
    }

    /// Stages run as programs of their own: no frame below them.
    fn rootlet_stack(&self) -> u32 {
        0
    }

    fn keeps_previous(&self) -> bool {
        true
    }

    /// Waits out the grace period of the parity `next` rebuilds, and opens
    /// its counting epoch in `tally`.
    fn counts_before(
        &self,
        _ctx: &Ctx,
        _key: RootletKey,
        next: &Generation,
        tally: &mut Tally,
    ) -> Result<tally::Slots> {
        let raw = quiesced_counts(&self.live)?;
        tally.begin(parity(next.number), &raw, tally::chain(&next.pipeline));
        Ok(tally.counts(&raw))
    }

    fn build(
        &mut self,
        ctx: &Ctx,
        key: RootletKey,
        next: &Generation,
        how: Build<'_>,
    ) -> Result<()> {
        match how {
            Build::Plan {
                plan,
                final_verdict,
                keep,
            } => {
                self.next = Some(build(
                    ctx,
                    key,
                    &self.live,
                    next,
                    final_verdict,
                    plan,
                    keep,
                )?);
            }
            Build::Restored => {
                if self.next.is_none() {
                    return Err(backend::out_of_order("a restored generation"));
                }
                pin_arrays(ctx, key, &self.live, next)?;
            }
        }
        Ok(())
    }

    fn restore(&mut self, key: RootletKey, next: &Generation) -> Result<()> {
        let progs = parity_progs(&self.live, next)?.ok_or(Error::NoRollback {
            key,
            reason: "a stage of the previous generation is gone (its owner exited)",
        })?;
        self.next = Some(progs);
        Ok(())
    }

    /// One write of the generation word; the hook's link is untouched.
    fn swap(&mut self, _link: &hook::Link, next: &Generation) -> Result<()> {
        let progs = self
            .next
            .take()
            .ok_or_else(|| backend::out_of_order("swap"))?;
        swap(&self.live, next.number)?;
        self.live.generation = next.number;
        self.live.stages = progs;
        Ok(())
    }

    fn abandon(&mut self, ctx: &Ctx, key: RootletKey, committed: &Generation) {
        self.next = None;
        release(ctx, key, committed);
    }

    fn release(&mut self, ctx: &Ctx, key: RootletKey, next: &Generation) {
        release(ctx, key, next);
    }

    /// The inactive parity holds the stages of the interrupted build (its
    /// hop entries are pinned arrays): empty it, as the next build would
    /// have rewritten it. Its owner entries for the next rebuild of the
    /// live parity go too; those that rebuild the inactive one stay; and
    /// so do the pins of the inactive parity's gates (an unpinned stage's).
    fn discard_unswapped(&mut self, ctx: &Ctx, key: RootletKey) -> Result<()> {
        let live = &self.live;
        let active = parity(live.generation);
        let inactive = 1 - active;
        // No packet runs the inactive parity after the grace period of the
        // last flip (the interrupted build had waited for it already).
        live.quiescence.wait();
        set_entry(live.maps.first.as_fd(), inactive, None)?;
        for hop in &live.maps.hops {
            set_entry(hop.as_fd(), inactive, None)?;
        }
        for owner in &live.maps.owners {
            set_entry(owner.as_fd(), running(inactive), None)?;
            set_entry(owner.as_fd(), kept(active), None)?;
        }
        for slot in 0..abi::MAX_SLOTS as u32 {
            let path = ctx.layout.chain_gate(key, slot, inactive);
            pins::remove(&path).map_err(|source| Error::Pin {
                what: "gate of a dropped generation",
                path,
                source,
            })?;
        }
        Ok(())
    }

    fn counts(&self, _ctx: &Ctx, _key: RootletKey, tally: &Tally) -> Result<(tally::Slots, u64)> {
        let live = &self.live;
        Ok((
            live.reported
                .report(tally.counts(&tally::read(live.maps.stats.as_fd())?)),
            tally::read_final(live.maps.finals.as_fd())?,
        ))
    }

    fn slot(&self, ctx: &Ctx, key: RootletKey, stage: &StageRecord) -> Result<SlotKernel> {
        let live = &self.live;
        let prog = match slot_prog_id(live, stage.slot)? {
            Some(id) => Some(ProgState::read(sys::prog_fd_by_id(id)?.as_fd())?),
            None => None,
        };
        let twin_id = match prog {
            Some(_) => slot_twin_id(live, stage.slot)?,
            None => None,
        };
        let parity = parity(live.generation);
        let mut instances = vec![];
        if let Some(p) = &prog {
            instances.push(Instance {
                parity,
                id: p.id,
                live: true,
            });
        }
        if let Some(id) = twin_id {
            instances.push(Instance {
                parity: 1 - parity,
                id,
                live: false,
            });
        }
        Ok(SlotKernel {
            prog,
            link_id: None,
            twin_id,
            pin_path: stage.pin.then(|| ctx.layout.chain_slot(key, stage.slot)),
            instances,
            // A plain XDP program last in the chain returns its verdict to
            // the kernel: nothing sees it.
            counted: stage.chainable,
        })
    }
}
