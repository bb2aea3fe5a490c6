//! The freplace backend. Every change builds a new rootlet instance (one
//! *generation*), attaches every stage to it as an extension of the
//! placeholder at the stage's position (new stages are loaded and verified
//! against it; unchanged ones are only attached, not verified again), then
//! swaps the instance in with BPF_LINK_UPDATE and releases the old one.
//!
//! Kernel objects of a generation: the rootlet instance (pinned at
//! `gen-N/rootlet`), and per stage an extension program held by its link,
//! pinned at `gen-N/slot-K` for pinned stages and held only by this process
//! otherwise. A [`Built`] generation that is dropped before it is committed
//! removes its pins, so a failed change leaves nothing behind.

use std::{
    collections::BTreeMap,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::PathBuf,
};

use super::{
    Ctx, abi,
    backend::{self, Build, Linker, SlotKernel},
    btf::Btf,
    crash::{self, Step},
    error::{Error, Result},
    hook,
    loader::{Load, MapReuse, Target, What},
    object, pins, policy,
    spec::{Pipeline, Plan, RootletKey, Source, StageRecord, XdpAction},
    state::{Instance, ProgState},
    store::Generation,
    sys,
    tally::{self, Tally},
};

/// A stage attached to the live rootlet instance.
#[derive(Debug)]
pub struct Attached {
    pub prog: OwnedFd,
    pub link: OwnedFd,
}

/// The live generation of one rootlet.
#[derive(Debug)]
pub struct Live {
    pub generation: u64,
    pub rootlet: OwnedFd,
    pub stages: BTreeMap<u32, Attached>,
}

/// Attaches extension `ext` in place of function `func` of `target`.
pub fn attach(ext: BorrowedFd<'_>, target: BorrowedFd<'_>, func: &str) -> Result<OwnedFd> {
    let (_btf, blob) = sys::prog_btf(target)?.ok_or_else(|| Error::Load {
        what: "rootlet".into(),
        message: "the rootlet program has no BTF".into(),
    })?;
    let id = Btf::parse(&blob)
        .and_then(|b| b.func_id(func))
        .map_err(|e| Error::Load {
            what: "rootlet BTF".into(),
            message: e.to_string(),
        })?;
    Ok(sys::ext_link_create(ext, target, id)?)
}

/// A generation built but not yet live. Dropping it uncommitted removes its
/// pins; its programs and links go with the file descriptors.
#[derive(Debug)]
pub struct Built {
    dir: PathBuf,
    /// Set once everything is built; taken by [`Built::commit`].
    live: Option<Live>,
    committed: bool,
}

impl Built {
    pub fn rootlet(&self) -> BorrowedFd<'_> {
        self.live
            .as_ref()
            .map(|l| l.rootlet.as_fd())
            .expect("built until committed")
    }

    /// The generation is live: keep its pins.
    pub fn commit(mut self) -> Live {
        self.committed = true;
        self.live.take().expect("committed once")
    }
}

impl Drop for Built {
    fn drop(&mut self) {
        if !self.committed
            && let Err(e) = pins::remove(&self.dir)
        {
            tracing::error!(dir = %self.dir.display(), error = %e, "cannot remove the pins of a failed generation");
        }
    }
}

/// Builds generation `next` of `key` from `plan`. `current` supplies the
/// programs of unchanged stages; `keep` the maps kept across replacements.
pub fn build(
    ctx: &Ctx,
    key: RootletKey,
    next: &Generation,
    final_verdict: XdpAction,
    plan: &Plan,
    current: Option<&Live>,
    keep: &mut BTreeMap<u32, MapReuse>,
) -> Result<Built> {
    let dir = ctx.layout.gen_dir(key, next.number);
    std::fs::create_dir_all(&dir).map_err(|source| Error::Pin {
        what: "generation directory",
        path: dir.clone(),
        source,
    })?;
    // From here on, an early return drops `built` and removes the pins.
    let mut built = Built {
        dir,
        live: None,
        committed: false,
    };

    let mut shared = MapReuse::new(&ctx.layout)?;
    shared.pinned(abi::STATS_MAP, ctx.layout.stats(key));
    shared.pinned(abi::FINAL_MAP, ctx.layout.final_counts(key));
    let target = load_instance(&next.pipeline, final_verdict, Some(&shared))?;
    pin(
        target.fd.as_fd(),
        ctx.layout.gen_rootlet(key, next.number),
        "rootlet instance",
    )?;
    crash::point(ctx.crash_at, Step::RootletLoaded);

    let mut stages = BTreeMap::new();
    for (position, stage) in next.pipeline.stages.iter().enumerate() {
        let func = abi::placeholder(position);
        let prog = match plan.sources.get(&stage.slot) {
            Some(Source::New(spec)) => {
                // The stage's own transient directory even without maps to
                // keep: maps it asks to pin by name are pinned there only.
                let fresh;
                let reuse = match keep.get(&stage.slot) {
                    Some(k) => k,
                    None => {
                        fresh = MapReuse::new(&ctx.layout)?;
                        &fresh
                    }
                };
                Load {
                    bytes: &spec.object,
                    what: What {
                        stage: Some(&spec.name),
                        program: &spec.program,
                    },
                    globals: vec![],
                    reuse: Some(reuse),
                }
                .extension(&target, &func)
                .and_then(|prog| {
                    // Before it is attached to an instance that can run.
                    policy::install_empty(prog.as_fd(), &spec.object, &spec.name)?;
                    Ok(prog)
                })?
            }
            Some(Source::Existing) | None => {
                let running = current
                    .and_then(|c| c.stages.get(&stage.slot))
                    .ok_or_else(|| Error::Load {
                        what: format!("stage `{}`", stage.name),
                        message: "its program is no longer loaded".into(),
                    })?;
                sys::dup(running.prog.as_fd())?
            }
        };
        let link = attach(prog.as_fd(), target.fd.as_fd(), &func)?;
        if stage.pin {
            pin(
                link.as_fd(),
                ctx.layout.gen_slot_link(key, next.number, stage.slot),
                "stage link",
            )?;
        }
        stages.insert(stage.slot, Attached { prog, link });
        crash::point(ctx.crash_at, Step::StageAttached);
    }
    built.live = Some(Live {
        generation: next.number,
        rootlet: target.fd,
        stages,
    });
    crash::point(ctx.crash_at, Step::Built);
    Ok(built)
}

/// Loads a rootlet instance running `pipeline`'s positions, for stages to
/// be attached to.
pub fn load_instance(
    pipeline: &Pipeline,
    final_verdict: XdpAction,
    reuse: Option<&MapReuse>,
) -> Result<Target> {
    let config = abi::rootlet_config(pipeline, final_verdict);
    Load {
        bytes: rootlet_ebpf::ROOTLET,
        what: What {
            stage: None,
            program: abi::FREPLACE_PROGRAM,
        },
        globals: vec![(abi::CONFIG_GLOBAL, &config, true)],
        reuse,
    }
    .xdp_target()
}

/// Loads a rootlet instance with every position enabled (so the verifier
/// sees every path, and every placeholder is reachable), against maps of
/// its own, and drops it: the probe's check of the freplace rootlet.
pub fn verify_programs() -> Result<()> {
    let full = Pipeline {
        stages: (0..abi::MAX_SLOTS as u32)
            .map(|slot| super::spec::StageRecord {
                name: format!("check-{slot}"),
                slot,
                priority: slot as i32,
                proceed_on: Default::default(),
                pin: false,
                owner: String::new(),
                program: String::new(),
                digest: String::new(),
                chainable: true,
                linked_generation: 0,
                loaded_generation: 0,
                counts_base: Default::default(),
            })
            .collect(),
    };
    load_instance(&full, XdpAction::Pass, None).map(drop)
}

fn pin(fd: BorrowedFd<'_>, path: PathBuf, what: &'static str) -> Result<()> {
    sys::obj_pin(fd, &path).map_err(|e| Error::Pin {
        what,
        path,
        source: e.source,
    })
}

/// Releases a generation that is no longer live: its pins go, and with the
/// file descriptors its links and rootlet instance.
pub fn release(ctx: &Ctx, key: RootletKey, old: Live) {
    let dir = ctx.layout.gen_dir(key, old.generation);
    if let Err(e) = pins::remove(&dir) {
        tracing::error!(dir = %dir.display(), error = %e, "cannot remove the pins of a released generation");
    }
    drop(old);
}

/// Finds which generation the XDP link runs (`live_prog_id`), removes the
/// pins of every other generation, and opens the live one's objects. Stages
/// of `pipeline` that were not pinned died with their owner and are left
/// out. Returns None when no generation of ours is live (drift).
pub fn adopt(
    ctx: &Ctx,
    key: RootletKey,
    live_prog_id: u32,
    generations: &[&Generation],
) -> Result<Option<Live>> {
    let mut found = None;
    let on_disk = ctx.layout.generations(key).unwrap_or_default();
    for &n in &on_disk {
        let Ok(fd) = sys::obj_get(&ctx.layout.gen_rootlet(key, n)) else {
            continue;
        };
        if sys::prog_info(fd.as_fd())?.id == live_prog_id {
            found = Some((n, fd));
        }
    }
    let Some((number, rootlet)) = found else {
        return Ok(None);
    };
    for &n in on_disk.iter().filter(|&&n| n != number) {
        tracing::info!(%key, generation = n, "removing the pins of a generation that is not live");
        if let Err(e) = pins::remove(&ctx.layout.gen_dir(key, n)) {
            tracing::error!(%key, generation = n, error = %e, "cannot remove stale generation");
        }
    }
    let Some(generation) = generations.iter().find(|g| g.number == number) else {
        return Ok(None);
    };
    let mut stages = BTreeMap::new();
    for stage in generation.pipeline.stages.iter().filter(|s| s.pin) {
        let link = sys::obj_get(&ctx.layout.gen_slot_link(key, number, stage.slot))?;
        let prog = sys::prog_fd_by_id(sys::link_info(link.as_fd())?.prog_id)?;
        stages.insert(stage.slot, Attached { prog, link });
    }
    Ok(Some(Live {
        generation: number,
        rootlet,
        stages,
    }))
}

/// The freplace backend of one rootlet: its live generation; during a
/// change, the generation built beside it, then the one it replaced until
/// that is released.
#[derive(Debug)]
pub struct Freplace {
    live: Live,
    built: Option<Built>,
    old: Option<Live>,
}

impl Freplace {
    /// Builds and commits the first generation (no stages).
    pub fn create(
        ctx: &Ctx,
        key: RootletKey,
        first: &Generation,
        final_verdict: XdpAction,
    ) -> Result<Self> {
        let plan = Plan {
            pipeline: Pipeline::default(),
            sources: BTreeMap::new(),
            retired: vec![],
        };
        let built = build(
            ctx,
            key,
            first,
            final_verdict,
            &plan,
            None,
            &mut BTreeMap::new(),
        )?;
        Ok(Self::adopted(built.commit()))
    }

    pub fn adopted(live: Live) -> Self {
        Freplace {
            live,
            built: None,
            old: None,
        }
    }
}

impl Linker for Freplace {
    fn generation(&self) -> u64 {
        self.live.generation
    }

    fn rootlet(&self) -> BorrowedFd<'_> {
        self.live.rootlet.as_fd()
    }

    fn stage_prog(&self, slot: u32) -> Option<BorrowedFd<'_>> {
        self.live.stages.get(&slot).map(|a| a.prog.as_fd())
    }

    fn rootlet_stack(&self) -> u32 {
        object::rootlet_frame(rootlet_ebpf::ROOTLET, abi::FREPLACE_PROGRAM)
    }

    fn keeps_previous(&self) -> bool {
        false
    }

    fn counts_before(
        &self,
        ctx: &Ctx,
        key: RootletKey,
        _next: &Generation,
        _tally: &mut Tally,
    ) -> Result<tally::Slots> {
        Ok(tally::read(sys::obj_get(&ctx.layout.stats(key))?.as_fd())?[0])
    }

    fn build(
        &mut self,
        ctx: &Ctx,
        key: RootletKey,
        next: &Generation,
        how: Build<'_>,
    ) -> Result<()> {
        let Build::Plan {
            plan,
            final_verdict,
            keep,
        } = how
        else {
            return Err(backend::out_of_order("a restored freplace generation"));
        };
        self.built = Some(build(
            ctx,
            key,
            next,
            final_verdict,
            plan,
            Some(&self.live),
            keep,
        )?);
        Ok(())
    }

    fn restore(&mut self, key: RootletKey, _next: &Generation) -> Result<()> {
        Err(Error::NoRollback {
            key,
            reason: "the freplace backend releases the previous generation; apply its stages again",
        })
    }

    /// BPF_LINK_UPDATE of the hook's link from the live rootlet instance
    /// to the built one.
    fn swap(&mut self, link: &hook::Link, _next: &Generation) -> Result<()> {
        let built = self
            .built
            .take()
            .ok_or_else(|| backend::out_of_order("swap"))?;
        // On failure `built` drops here, uncommitted: its pins go.
        link.update(built.rootlet(), self.live.rootlet.as_fd())?;
        self.old = Some(std::mem::replace(&mut self.live, built.commit()));
        Ok(())
    }

    fn abandon(&mut self, _ctx: &Ctx, _key: RootletKey, _committed: &Generation) {
        self.built = None;
    }

    fn release(&mut self, ctx: &Ctx, key: RootletKey, _next: &Generation) {
        if let Some(old) = self.old.take() {
            release(ctx, key, old);
        }
    }

    fn counts(&self, ctx: &Ctx, key: RootletKey, _tally: &Tally) -> Result<(tally::Slots, u64)> {
        let raw = tally::read(sys::obj_get(&ctx.layout.stats(key))?.as_fd())?;
        let (parity, slot, counter) = abi::FINAL_COUNTER;
        // What rootlets built before FINAL_COUNTER counted in rootlet_final,
        // which every later generation keeps pinned: it only grows while
        // such a rootlet (adopted after an upgrade) is live, and stays once
        // a generation of this version replaces it. Each packet is counted
        // in one of the two, so their sum is exact in either layout.
        let earlier = match sys::obj_get(&ctx.layout.final_counts(key)) {
            Ok(fd) => tally::read_final(fd.as_fd())?,
            // Never pinned: no generation of a version that had the map.
            Err(e) if e.errno() == Some(libc::ENOENT) => 0,
            Err(e) => return Err(e.into()),
        };
        Ok((raw[0], raw[parity][slot][counter] + earlier))
    }

    fn slot(&self, ctx: &Ctx, key: RootletKey, stage: &StageRecord) -> Result<SlotKernel> {
        let Some(a) = self.live.stages.get(&stage.slot) else {
            return Ok(SlotKernel {
                counted: true,
                ..SlotKernel::default()
            });
        };
        let prog = ProgState::read(a.prog.as_fd())?;
        Ok(SlotKernel {
            link_id: Some(sys::link_info(a.link.as_fd())?.id),
            pin_path: stage.pin.then(|| {
                ctx.layout
                    .gen_slot_link(key, self.live.generation, stage.slot)
            }),
            instances: vec![Instance {
                parity: 0,
                id: prog.id,
                live: true,
            }],
            prog: Some(prog),
            twin_id: None,
            counted: true,
        })
    }
}
