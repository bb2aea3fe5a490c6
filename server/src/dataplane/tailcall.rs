//! The tail-call backend, for kernels that refuse BPF_PROG_TYPE_EXT.
//!
//! One `rootlet_chain` program per interface, loaded once. Each slot has a
//! two-entry program array (`rootlet_slot_K`) indexed by generation parity;
//! `rootlet_chains[parity]` holds the order and proceed-on masks. A change
//! to generation N+1 rebuilds the inactive parity (entries and chain), then
//! flips `rootlet_gen` to N+1 with one map update. A packet reads the
//! generation once, at entry, so it never sees a mix; the previous parity
//! stays intact, ready for an instant rollback, until the next change.
//!
//! Lifetimes follow freplace's: a pinned stage's slot array is pinned
//! (`chain/slot-K`); an unpinned stage's is held only by this process's file
//! descriptor, and the kernel empties a program array when the last
//! descriptor and pin go, so the slot falls back to "empty, proceed" when the
//! owner exits.

use std::{
    collections::BTreeMap,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::PathBuf,
};

use super::{
    Ctx, abi,
    crash::{self, Step},
    error::{Error, Result},
    loader::{Load, MapReuse, What},
    pins,
    spec::{Plan, RootletKey, Source, XdpAction},
    store::Generation,
    sys,
};

/// The maps a tail-call rootlet shares with its stages.
#[derive(Debug)]
pub struct Shared {
    pub generation: OwnedFd,
    pub chains: OwnedFd,
    pub scratch: OwnedFd,
    pub stats: OwnedFd,
    pub slots: Vec<OwnedFd>,
    /// Holds rootlet_continue; pinned, so the chain outlives this process.
    pub cont: OwnedFd,
}

/// The live state of one tail-call rootlet.
#[derive(Debug)]
pub struct Live {
    pub generation: u64,
    pub rootlet: OwnedFd,
    pub maps: Shared,
    /// Programs of the live parity, by slot.
    pub stages: BTreeMap<u32, OwnedFd>,
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

fn shared_of(ctx: &Ctx, key: RootletKey, rootlet: BorrowedFd<'_>) -> Result<Shared> {
    let mut maps = maps_of(rootlet)?;
    let mut take = |name: &str| {
        maps.remove(name).ok_or_else(|| Error::Load {
            what: "tail-call rootlet".into(),
            message: format!("map {name} missing"),
        })
    };
    Ok(Shared {
        generation: take(abi::GEN_MAP)?,
        chains: take(abi::CHAINS_MAP)?,
        scratch: take(abi::SCRATCH_MAP)?,
        stats: take(abi::STATS_MAP)?,
        slots: (0..abi::MAX_SLOTS as u32)
            .map(|k| take(&abi::slot_map(k)))
            .collect::<Result<_>>()?,
        cont: sys::obj_get(&ctx.layout.chain_obj(key, abi::CONT_MAP))?,
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
    for name in [
        abi::GEN_MAP,
        abi::CHAINS_MAP,
        abi::SCRATCH_MAP,
        abi::CONT_MAP,
    ] {
        reuse.pinned(name, ctx.layout.chain_obj(key, name));
    }
    reuse.pinned(abi::STATS_MAP, ctx.layout.stats(key));
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
    // The continuation every stage that proceeds tail-calls; loaded and
    // verified once, held by the pinned rootlet_cont array.
    let mut reuse = stage_reuse(ctx, &maps, None)?;
    reuse.add(abi::GEN_MAP, maps.generation.as_fd())?;
    let cont = Load {
        bytes: rootlet_ebpf::ROOTLET_CHAIN,
        what: What {
            stage: None,
            program: abi::CONTINUE_PROGRAM,
        },
        globals: vec![],
        reuse: Some(&reuse),
    }
    .xdp()?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&cont) as u32;
    sys::map_update(maps.cont.as_fd(), &0u32.to_ne_bytes(), &fd.to_ne_bytes())?;
    let empty = abi::rootlet_chain(&Default::default(), final_verdict);
    for parity in 0..2u32 {
        sys::map_update(maps.chains.as_fd(), &parity.to_ne_bytes(), &empty)?;
    }
    Ok(Live {
        generation: 0,
        rootlet,
        maps,
        stages: BTreeMap::new(),
    })
}

/// Reuses every map a stage shares with the rootlet.
fn stage_reuse(ctx: &Ctx, maps: &Shared, keep: Option<MapReuse>) -> Result<MapReuse> {
    let mut reuse = match keep {
        Some(k) => k,
        None => MapReuse::new(&ctx.layout)?,
    };
    reuse.add(abi::CHAINS_MAP, maps.chains.as_fd())?;
    reuse.add(abi::SCRATCH_MAP, maps.scratch.as_fd())?;
    reuse.add(abi::STATS_MAP, maps.stats.as_fd())?;
    reuse.add(abi::CONT_MAP, maps.cont.as_fd())?;
    for (k, fd) in maps.slots.iter().enumerate() {
        reuse.add(&abi::slot_map(k as u32), fd.as_fd())?;
    }
    Ok(reuse)
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
    let result = build_parity(ctx, key, live, next, final_verdict, plan, keep);
    if result.is_err() {
        let parity = (next.number & 1) as u32;
        for slot in 0..abi::MAX_SLOTS as u32 {
            if let Err(e) = set_slot(live, slot, parity, None) {
                tracing::error!(%key, slot, error = %e, "cannot empty the inactive parity after a failed change");
            }
        }
    }
    result
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
    let parity = (next.number & 1) as u32;
    let total = next.pipeline.stages.len();
    for (position, stage) in next.pipeline.stages.iter().enumerate() {
        if !stage.chainable && position + 1 != total {
            return Err(Error::Placement {
                stage: stage.name.clone(),
                position: position + 1,
                total,
                reason: "it was not built with <rootlet/stage.h>, so it cannot pass packets on to the next stage; \
                         an unmodified XDP program can only be the last stage",
            });
        }
    }
    let mode = abi::MODE_CHAIN.to_ne_bytes();
    let mut progs = BTreeMap::new();
    for stage in &next.pipeline.stages {
        let prog = match plan.sources.get(&stage.slot) {
            Some(Source::New(spec)) => {
                let reuse = stage_reuse(ctx, &live.maps, keep.remove(&stage.slot))?;
                let globals = if stage.chainable {
                    vec![(abi::STAGE_MODE_GLOBAL, &mode[..], true)]
                } else {
                    vec![]
                };
                Load {
                    bytes: &spec.object,
                    what: What {
                        stage: Some(&spec.name),
                        program: &spec.program,
                    },
                    globals,
                    reuse: Some(&reuse),
                }
                .xdp()?
            }
            Some(Source::Existing) | None => {
                let running = live.stages.get(&stage.slot).ok_or_else(|| Error::Load {
                    what: format!("stage `{}`", stage.name),
                    message: "its program is no longer loaded".into(),
                })?;
                sys::dup(running.as_fd())?
            }
        };
        set_slot(live, stage.slot, parity, Some(prog.as_fd()))?;
        progs.insert(stage.slot, prog);
        crash::point(ctx.crash_at, Step::StageAttached);
    }
    for slot in 0..abi::MAX_SLOTS as u32 {
        if !progs.contains_key(&slot) {
            set_slot(live, slot, parity, None)?;
        }
    }
    let chain = abi::rootlet_chain(&next.pipeline, final_verdict);
    sys::map_update(live.maps.chains.as_fd(), &parity.to_ne_bytes(), &chain)?;
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
                live.maps.slots[stage.slot as usize].as_fd(),
                path,
                "slot program array",
            )?;
        }
    }
    Ok(())
}

/// The programs of `next`'s stages as its parity holds them, or None if
/// one is missing (an unpinned stage whose owner went away).
pub fn parity_progs(live: &Live, next: &Generation) -> Result<Option<BTreeMap<u32, OwnedFd>>> {
    let parity = (next.number & 1) as u32;
    let mut progs = BTreeMap::new();
    for stage in &next.pipeline.stages {
        let mut id = [0u8; 4];
        let slot = live.maps.slots[stage.slot as usize].as_fd();
        if !sys::map_lookup(slot, &parity.to_ne_bytes(), &mut id)? {
            return Ok(None);
        }
        progs.insert(stage.slot, sys::prog_fd_by_id(u32::from_ne_bytes(id))?);
    }
    Ok(Some(progs))
}

fn set_slot(live: &Live, slot: u32, parity: u32, prog: Option<BorrowedFd<'_>>) -> Result<()> {
    let map = live.maps.slots[slot as usize].as_fd();
    match prog {
        Some(p) => {
            let fd = std::os::fd::AsRawFd::as_raw_fd(&p) as u32;
            sys::map_update(map, &parity.to_ne_bytes(), &fd.to_ne_bytes())?;
        }
        None => sys::map_delete(map, &parity.to_ne_bytes())?,
    }
    Ok(())
}

/// Makes generation `number` live: one map update.
pub fn swap(live: &Live, number: u64) -> Result<()> {
    Ok(sys::map_update(
        live.maps.generation.as_fd(),
        &0u32.to_ne_bytes(),
        &number.to_ne_bytes(),
    )?)
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
    let parity = (number & 1) as u32;
    let mut live = Live {
        generation: number,
        rootlet,
        maps,
        stages: BTreeMap::new(),
    };
    for stage in &generation.pipeline.stages {
        if !stage.pin {
            for p in 0..2u32 {
                set_slot(&live, stage.slot, p, None)?;
            }
            continue;
        }
        let mut id = [0u8; 4];
        if sys::map_lookup(
            live.maps.slots[stage.slot as usize].as_fd(),
            &parity.to_ne_bytes(),
            &mut id,
        )? {
            let prog = sys::prog_fd_by_id(u32::from_ne_bytes(id))?;
            live.stages.insert(stage.slot, prog);
        }
    }
    release(ctx, key, generation);
    Ok(Some(live))
}

/// The program in `slot` of the live parity, as the kernel reports it.
pub fn slot_prog_id(live: &Live, slot: u32) -> Result<Option<u32>> {
    let parity = (live.generation & 1) as u32;
    let mut id = [0u8; 4];
    Ok(sys::map_lookup(
        live.maps.slots[slot as usize].as_fd(),
        &parity.to_ne_bytes(),
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
