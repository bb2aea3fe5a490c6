//! The data plane: rootlets on interfaces, stages linked into them, every
//! change applied as a new generation swapped in atomically, pins that keep
//! the data path alive without this process, and a store for what the kernel
//! cannot hold.
//!
//! **Architecture invariant:** this layer knows nothing about gRPC.
//!
//! **Architecture invariant:** the XDP link of a rootlet is created once, at
//! load, and afterwards only ever changed by BPF_LINK_UPDATE with
//! BPF_F_REPLACE (freplace) or not at all (tail-call: the generation word
//! flips instead).
//!
//! # Layout
//! - [`spec`]: vocabulary and planning (no kernel).
//! - [`object`], [`btf`]: checks on a stage object before loading it.
//! - [`loader`]: aya loads ELF objects; [`sys`]: every other bpf(2) call.
//! - [`freplace`], [`tailcall`]: the two backends.
//! - [`probe`]: which backend the kernel permits.
//! - [`pins`]: the bpffs layout; [`store`]: the redb store.
//! - [`state`]: read-back from the kernel; [`crash`]: crash injection.

pub mod abi;
pub mod btf;
pub mod budget;
pub mod crash;
pub mod error;
pub mod freplace;
pub mod kv;
pub mod loader;
pub mod netns;
pub mod object;
pub mod pins;
pub mod probe;
pub mod spec;
pub mod state;
pub mod store;
pub mod sys;
pub mod tailcall;
pub mod tally;

use std::{
    collections::BTreeMap,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
};

use budget::Step;
pub use error::{Error, Result};
use loader::MapReuse;
use pins::Layout;
use probe::Capabilities;
use spec::{
    Backend, BackendChoice, Change, Pipeline, Plan, RootletKey, RootletSpec, Source, StageRecord,
    XdpMode,
};
use state::{Counters, Instance, ProgState, RootletState, SlotState, StageMap};
use store::{Generation, RootletRecord, Store};
use tally::Tally;

/// Where the data plane keeps its state.
#[derive(Debug, Clone)]
pub struct Config {
    /// Under a bpffs mount.
    pub bpffs_root: PathBuf,
    pub store_path: PathBuf,
    pub backend: BackendChoice,
    /// Tests only: abort the process at this step of every change.
    pub crash_at: Option<crash::Step>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            bpffs_root: "/sys/fs/bpf/rootlet".into(),
            store_path: "/var/lib/rootlet/dataplane.redb".into(),
            backend: BackendChoice::Auto,
            crash_at: None,
        }
    }
}

/// What the backends share.
pub struct Ctx {
    pub layout: Layout,
    pub crash_at: Option<crash::Step>,
}

#[derive(Debug)]
enum Live {
    Freplace(freplace::Live),
    TailCall(tailcall::Live),
}

impl Live {
    fn generation(&self) -> u64 {
        match self {
            Live::Freplace(l) => l.generation,
            Live::TailCall(l) => l.generation,
        }
    }

    fn rootlet(&self) -> BorrowedFd<'_> {
        match self {
            Live::Freplace(l) => l.rootlet.as_fd(),
            Live::TailCall(l) => l.rootlet.as_fd(),
        }
    }

    /// The running program of `slot`, if it has one.
    fn stage_prog(&self, slot: u32) -> Option<BorrowedFd<'_>> {
        match self {
            Live::Freplace(l) => l.stages.get(&slot).map(|a| a.prog.as_fd()),
            Live::TailCall(l) => l.stages.get(&slot).map(|p| p.as_fd()),
        }
    }
}

struct Rootlet {
    record: RootletRecord,
    link: Option<OwnedFd>,
    live: Option<Live>,
    drift: Option<String>,
}

impl Rootlet {
    /// The live pipeline without stages whose programs are gone (unpinned
    /// stages whose owner exited): the next change drops them.
    fn effective_pipeline(&self) -> Pipeline {
        let Some(live) = &self.live else {
            return self.record.committed.pipeline.clone();
        };
        Pipeline {
            stages: self
                .record
                .committed
                .pipeline
                .stages
                .iter()
                .filter(|s| live.stage_prog(s.slot).is_some())
                .cloned()
                .collect(),
        }
    }

    /// Compares the kernel with what we expect; returns why they differ.
    fn check_drift(&self, layout: &Layout) -> Option<String> {
        let (Some(link), Some(live)) = (&self.link, &self.live) else {
            return self.drift.clone();
        };
        if !layout.link(self.record.key).exists() {
            return Some(format!(
                "the pin {} was removed",
                layout.link(self.record.key).display()
            ));
        }
        let rootlet_id = sys::prog_info(live.rootlet()).map(|i| i.id).ok();
        match sys::link_info(link.as_fd()) {
            Err(e) => Some(format!("cannot read the XDP link: {e}")),
            Ok(i) if i.ifindex == 0 => Some(
                "the XDP link was detached from the interface (the interface went away, or another tool detached it)"
                    .into(),
            ),
            Ok(i) if Some(i.prog_id) != rootlet_id => Some(format!(
                "the XDP link runs program {} instead of rootlet program {}",
                i.prog_id,
                rootlet_id.unwrap_or(0)
            )),
            Ok(_) => None,
        }
    }
}

/// The data plane of one host. Changes to one rootlet are serialised;
/// different rootlets change in parallel.
pub struct Dataplane {
    ctx: Ctx,
    store: Store,
    caps: &'static Capabilities,
    backend: BackendChoice,
    rootlets: Mutex<BTreeMap<RootletKey, Arc<Mutex<Rootlet>>>>,
}

const BPF_FS_MAGIC: nix::sys::statfs::FsType = nix::sys::statfs::FsType(0xcafe_4a11);

/// Marks where each stage of `next` starts: a stage that `base` does not
/// run in its slot is linked by `next` (its counters start from the slot's
/// counts now, `counts`); a slot that loads a new object loads its build
/// in `next`.
fn stamp(next: &mut Generation, base: &Pipeline, plan: &Plan, counts: &tally::Slots) {
    for s in &mut next.pipeline.stages {
        let continues = base.by_name(&s.name).is_some_and(|old| old.slot == s.slot);
        if !continues {
            s.linked_generation = next.number;
            s.counts_base = counts.get(s.slot as usize).copied().unwrap_or_default();
        }
        if !continues || matches!(plan.sources.get(&s.slot), Some(Source::New(_))) {
            s.loaded_generation = next.number;
        }
    }
}

/// A slot as the store records it, with nothing read from the kernel: no
/// program, zero counters that are no evidence (`counted: false`). The state
/// of a rootlet the agent could not adopt, and the base of every slot's.
fn recorded_slot(s: &StageRecord, position: usize) -> SlotState {
    SlotState {
        slot: s.slot,
        position,
        stage: s.name.clone(),
        owner: s.owner.clone(),
        priority: s.priority,
        proceed_on: s.proceed_on.actions(),
        digest: s.digest.clone(),
        pinned: s.pin,
        prog: None,
        link_id: None,
        twin_id: None,
        pin_path: None,
        counters: Counters::default(),
        counted: false,
        linked_generation: s.linked_generation,
        loaded_generation: s.loaded_generation,
        instances: vec![],
        maps: vec![],
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Dataplane {
    /// Opens the store, probes the kernel, and adopts every recorded
    /// rootlet: checks it against the kernel, finishes or rolls back a change
    /// a crash interrupted, and reports drift.
    ///
    /// # Errors
    /// The bpffs root is not on bpffs; the store is held by another process.
    pub fn open(config: Config) -> Result<Self> {
        let root = &config.bpffs_root;
        std::fs::create_dir_all(root).map_err(|source| Error::Pin {
            what: "bpffs root",
            path: root.clone(),
            source,
        })?;
        if !is_bpffs(root) {
            return Err(Error::Pin {
                what: "bpffs root",
                path: root.clone(),
                source: std::io::Error::other(
                    "not on a bpf filesystem (mount -t bpf bpf /sys/fs/bpf)",
                ),
            });
        }
        let layout = Layout::new(root);
        let store = Store::open(&config.store_path)?;
        // Transient pins of a process that died while loading would keep
        // maps (and unpinned stages) alive: they go first.
        pins::remove(&layout.tmp_dir()).map_err(|source| Error::Pin {
            what: "transient pins",
            path: layout.tmp_dir(),
            source,
        })?;
        let dp = Dataplane {
            ctx: Ctx {
                layout,
                crash_at: config.crash_at,
            },
            store,
            caps: probe::capabilities(),
            backend: config.backend,
            rootlets: Mutex::new(BTreeMap::new()),
        };
        dp.adopt_all()?;
        Ok(dp)
    }

    pub fn capabilities(&self) -> &'static Capabilities {
        self.caps
    }

    /// The backend new rootlets get.
    pub fn backend(&self) -> Result<Backend> {
        self.caps.choose(self.backend)
    }

    pub fn layout(&self) -> &Layout {
        &self.ctx.layout
    }

    fn adopt_all(&self) -> Result<()> {
        let records = self.store.list()?;
        for key in self.ctx.layout.rootlets().unwrap_or_default() {
            if !records.iter().any(|r| r.key == key) {
                tracing::warn!(%key, dir = %self.ctx.layout.rootlet_dir(key).display(), "pins without a record; leaving them alone");
            }
        }
        for record in records {
            let key = record.key;
            if let Some(rootlet) = self.adopt(record)? {
                match &rootlet.drift {
                    Some(d) => tracing::warn!(%key, drift = %d, "adopted a drifted rootlet"),
                    None => {
                        tracing::info!(%key, generation = rootlet.record.committed.number, "adopted rootlet")
                    }
                }
                lock(&self.rootlets).insert(key, Arc::new(Mutex::new(rootlet)));
            }
        }
        Ok(())
    }

    fn adopt(&self, mut record: RootletRecord) -> Result<Option<Rootlet>> {
        let key = record.key;
        let layout = &self.ctx.layout;
        let drifted = |record: RootletRecord, link: Option<OwnedFd>, why: String| Rootlet {
            record,
            link,
            live: None,
            drift: Some(why),
        };
        // A drifted rootlet is still adopted where its pins allow (its
        // programs and counters then read as before the restart); drift
        // only stops changes to it.
        let (link, info, mut drift) = match sys::obj_get(&layout.link(key)) {
            Ok(l) => {
                let info = sys::link_info(l.as_fd())?;
                let detached = (info.ifindex == 0).then(|| {
                    "the XDP link was detached from the interface (the interface went away, or another tool detached it)".to_owned()
                });
                (Some(l), Some(info), detached)
            }
            Err(_) if record.committed.number == 0 => {
                // The first load crashed before the XDP link existed.
                tracing::info!(%key, "removing a rootlet whose first load did not finish");
                let _ = pins::remove(&layout.rootlet_dir(key));
                self.store.delete(key)?;
                return Ok(None);
            }
            Err(e) => (None, None, Some(format!("the XDP link pin is gone ({e})"))),
        };
        let generations: Vec<&Generation> = std::iter::once(&record.committed)
            .chain(record.pending.as_ref())
            .collect();
        let live = match (record.backend, &info) {
            (Backend::Freplace, Some(info)) => {
                freplace::adopt(&self.ctx, key, info.prog_id, &generations)
                    .map(|l| l.map(Live::Freplace))
            }
            (Backend::Freplace, None) => Ok(None),
            (Backend::TailCall, _) => {
                tailcall::adopt(&self.ctx, key, &generations).map(|l| l.map(Live::TailCall))
            }
        };
        // What a drifted rootlet's pins no longer allow is reported as
        // drift, not as a failure to start.
        let live = match live {
            Err(e) if drift.is_some() => {
                tracing::warn!(%key, error = %e, "cannot adopt the programs of a drifted rootlet");
                None
            }
            other => other?,
        };
        let Some(live) = live else {
            let why = match (drift, &info) {
                (Some(d), _) => d,
                (None, Some(info)) => format!(
                    "the XDP link runs program {} which is not a generation of this rootlet",
                    info.prog_id
                ),
                (None, None) => "no generation of this rootlet is pinned".into(),
            };
            return Ok(Some(drifted(record, link, why)));
        };
        if let (None, Some(info)) = (&drift, &info)
            && sys::prog_info(live.rootlet())?.id != info.prog_id
        {
            drift = Some(format!(
                "the XDP link runs program {} instead of the rootlet program",
                info.prog_id
            ));
        }
        // Finish or forget the change a crash interrupted.
        if let Some(pending) = record.pending.take() {
            if pending.number == live.generation() {
                tracing::info!(%key, generation = pending.number, "a change interrupted after its swap: committing it");
                let old = std::mem::replace(&mut record.committed, pending);
                record.previous = (record.backend == Backend::TailCall).then_some(old);
            } else {
                tracing::info!(%key, generation = pending.number, "a change interrupted before its swap: dropping it");
                // The inactive parity may be half rewritten.
                record.previous = None;
            }
            self.store.put(&record)?;
        }
        Ok(Some(Rootlet {
            record,
            link,
            live: Some(live),
            drift,
        }))
    }

    fn get(&self, key: RootletKey) -> Result<Arc<Mutex<Rootlet>>> {
        lock(&self.rootlets)
            .get(&key)
            .cloned()
            .ok_or(Error::NoRootlet(key))
    }

    /// Every rootlet this data plane manages.
    pub fn list(&self) -> Vec<RootletKey> {
        lock(&self.rootlets).keys().copied().collect()
    }

    /// Loads a rootlet on an interface, with no stages, through a pinned XDP
    /// link. Returns its key.
    ///
    /// # Errors
    /// The interface or namespace does not exist; a rootlet is already
    /// there; the kernel refuses the backend or the attach.
    pub fn load_rootlet(&self, spec: RootletSpec) -> Result<RootletKey> {
        let backend = self.backend()?;
        let netns = spec.iface.netns.as_deref();
        let key = RootletKey {
            netns_ino: netns::inode(netns)?,
            ifindex: netns::ifindex(netns, &spec.iface.ifname)?,
        };
        let mut rootlets = lock(&self.rootlets);
        if rootlets.contains_key(&key) || self.store.get(key)?.is_some() {
            return Err(Error::RootletExists(key));
        }
        if self.ctx.layout.rootlet_dir(key).exists() {
            return Err(Error::Pin {
                what: "rootlet directory",
                path: self.ctx.layout.rootlet_dir(key),
                source: std::io::Error::other(
                    "exists without a record (another tool's pins?); remove it first",
                ),
            });
        }
        let first = Generation {
            number: 1,
            pipeline: Pipeline::default(),
        };
        let mut record = RootletRecord {
            key,
            spec: spec.clone(),
            backend,
            attached_mode: spec.mode,
            committed: Generation {
                number: 0,
                pipeline: Pipeline::default(),
            },
            pending: Some(first.clone()),
            previous: None,
            // The counters are created with the rootlet: all zero.
            tally: Tally::default(),
        };
        self.store.put(&record)?;
        crash::point(self.ctx.crash_at, crash::Step::StorePending);

        let attempt = (|| -> Result<(OwnedFd, Live, XdpMode)> {
            let live = match backend {
                Backend::Freplace => {
                    let plan = Plan {
                        pipeline: Pipeline::default(),
                        sources: BTreeMap::new(),
                        retired: vec![],
                    };
                    let built = freplace::build(
                        &self.ctx,
                        key,
                        &first,
                        spec.final_verdict,
                        &plan,
                        None,
                        &mut BTreeMap::new(),
                    )?;
                    Live::Freplace(built.commit())
                }
                Backend::TailCall => {
                    let live = tailcall::create(&self.ctx, key, spec.final_verdict)?;
                    tailcall::swap(&live, first.number)?;
                    Live::TailCall(tailcall::Live {
                        generation: first.number,
                        ..live
                    })
                }
            };
            let prog = sys::dup(live.rootlet())?;
            let (link, mode) = netns::run_in(netns, move || {
                attach_xdp(prog.as_fd(), key.ifindex, spec.mode)
            })?;
            sys::obj_pin(link.as_fd(), &self.ctx.layout.link(key)).map_err(|e| Error::Pin {
                what: "XDP link",
                path: self.ctx.layout.link(key),
                source: e.source,
            })?;
            Ok((link, live, mode))
        })();
        let (link, live, mode) = match attempt {
            Ok(ok) => ok,
            Err(e) => {
                let _ = pins::remove(&self.ctx.layout.rootlet_dir(key));
                self.store.delete(key)?;
                return Err(e);
            }
        };
        crash::point(self.ctx.crash_at, crash::Step::Swapped);
        record.attached_mode = mode;
        record.committed = first;
        record.pending = None;
        self.store.put(&record)?;
        crash::point(self.ctx.crash_at, crash::Step::StoreCommitted);
        tracing::info!(%key, %backend, ?mode, ifname = %spec.iface.ifname, "rootlet loaded");
        rootlets.insert(
            key,
            Arc::new(Mutex::new(Rootlet {
                record,
                link: Some(link),
                live: Some(live),
                drift: None,
            })),
        );
        Ok(key)
    }

    /// Applies `changes` to a rootlet as one new generation: every stage is
    /// checked, every new program loaded and verified, the new pipeline
    /// assembled beside the running one and swapped in at once. On any error
    /// the interface keeps its previous pipeline and nothing of the attempt
    /// remains. `expected_generation`, if given, must be the current one.
    /// Returns the new generation (the current one if nothing changed).
    pub fn apply(
        &self,
        key: RootletKey,
        changes: &[Change],
        expected_generation: Option<u64>,
    ) -> Result<u64> {
        self.apply_guarded(key, changes, expected_generation, |_| Ok::<(), Error>(()))
    }

    /// [`Dataplane::apply`], with `guard` run first under the rootlet's
    /// lock on the committed pipeline (the stages, their owners): whatever
    /// it refuses is refused before anything is checked or built, and
    /// nothing can change the rootlet between the guard and the change.
    /// The agent authorises changes here.
    pub fn apply_guarded<E: From<Error>>(
        &self,
        key: RootletKey,
        changes: &[Change],
        expected_generation: Option<u64>,
        guard: impl FnOnce(&Pipeline) -> std::result::Result<(), E>,
    ) -> std::result::Result<u64, E> {
        let rootlet = self.get(key)?;
        let mut r = lock(&rootlet);
        guard(&r.record.committed.pipeline)?;
        Ok(self.apply_locked(key, &mut r, changes, expected_generation)?)
    }

    fn apply_locked(
        &self,
        key: RootletKey,
        r: &mut Rootlet,
        changes: &[Change],
        expected_generation: Option<u64>,
    ) -> Result<u64> {
        let _timed = budget::begin();
        if let Some(drift) = budget::time(Step::Drift, || r.check_drift(&self.ctx.layout)) {
            r.drift = Some(drift.clone());
            return Err(Error::Drifted { key, reason: drift });
        }
        let current = r.record.committed.number;
        if let Some(expected) = expected_generation
            && expected != current
        {
            return Err(Error::VersionMismatch {
                key,
                expected,
                current,
            });
        }

        let rootlet_stack = match r.record.backend {
            Backend::Freplace => {
                object::rootlet_frame(rootlet_ebpf::ROOTLET, abi::FREPLACE_PROGRAM)
            }
            Backend::TailCall => 0,
        };
        let mut inspected = BTreeMap::new();
        let check = budget::span();
        for change in changes {
            if let Change::Link(spec) | Change::Replace(spec) = change {
                let obj = object::inspect(&spec.object, &spec.program, rootlet_stack).map_err(
                    |source| Error::Check {
                        stage: spec.name.clone(),
                        source,
                    },
                )?;
                inspected.insert(spec.name.clone(), obj);
            }
        }
        check.end(Step::Check);
        let planning = budget::span();
        let base = r.effective_pipeline();
        let running: Vec<u32> = r
            .record
            .committed
            .pipeline
            .stages
            .iter()
            .map(|s| s.slot)
            .collect();
        let plan = base.plan_beside(
            changes,
            |spec| inspected.get(&spec.name).is_some_and(|o| o.chainable),
            &running,
        )?;
        let dropped_dead = base != r.record.committed.pipeline;
        if plan.pipeline == base
            && !dropped_dead
            && plan.sources.values().all(|s| matches!(s, Source::Existing))
        {
            return Ok(current);
        }

        let live = r.live.as_ref().ok_or_else(|| Error::Drifted {
            key,
            reason: "no live generation".into(),
        })?;
        planning.end(Step::Plan);
        let reusing = budget::span();
        let mut keep = BTreeMap::new();
        for (slot, source) in &plan.sources {
            let Source::New(spec) = source else { continue };
            if spec.maps != spec::MapPolicy::Keep {
                continue;
            }
            let Some(running) = live.stage_prog(*slot) else {
                continue;
            };
            let running_maps = prog_maps(running)?;
            let infos: Vec<sys::MapInfo> = running_maps
                .iter()
                .filter(|(name, _)| object::is_stage_map(name))
                .map(|(_, fd)| sys::map_info(fd.as_fd()))
                .collect::<std::result::Result<_, _>>()?;
            let new = &inspected[&spec.name];
            new.check_keep(&infos).map_err(|source| Error::Check {
                stage: spec.name.clone(),
                source,
            })?;
            let mut reuse = MapReuse::new(&self.ctx.layout)?;
            for def in &new.maps {
                if let Some(fd) = running_maps.get(object::truncate(&def.name)) {
                    reuse.add(&def.name, fd.as_fd())?;
                }
            }
            keep.insert(*slot, reuse);
        }
        reusing.end(Step::MapReuse);
        let counting = budget::span();

        let mut next = Generation {
            number: current + 1,
            pipeline: plan.pipeline.clone(),
        };
        let counts_now = match live {
            Live::TailCall(l) => {
                // Stored with the pending generation, before it can run.
                let raw = tailcall::quiesced_counts(l)?;
                let chain = tally::chain(&next.pipeline);
                r.record
                    .tally
                    .begin(tailcall::parity(next.number), &raw, chain);
                r.record.tally.counts(&raw)
            }
            Live::Freplace(_) => {
                tally::read(sys::obj_get(&self.ctx.layout.stats(key))?.as_fd())?[0]
            }
        };
        stamp(&mut next, &base, &plan, &counts_now);
        counting.end(Step::Plan);
        r.record.pending = Some(next.clone());
        self.store.put(&r.record)?;
        crash::point(self.ctx.crash_at, crash::Step::StorePending);

        let final_verdict = r.record.spec.final_verdict;
        let link = r.link.as_ref().map(|l| sys::dup(l.as_fd())).transpose()?;
        let result = match (r.live.take(), link) {
            (Some(Live::Freplace(old)), Some(link)) => {
                match budget::time(Step::Build, || {
                    freplace::build(
                        &self.ctx,
                        key,
                        &next,
                        final_verdict,
                        &plan,
                        Some(&old),
                        &mut keep,
                    )
                })
                .and_then(|built| {
                    budget::time(Step::Swap, || {
                        sys::link_update(link.as_fd(), built.rootlet(), old.rootlet.as_fd())
                    })?;
                    Ok(built)
                }) {
                    Ok(built) => {
                        crash::point(self.ctx.crash_at, crash::Step::Swapped);
                        r.live = Some(Live::Freplace(built.commit()));
                        Ok(Some(old))
                    }
                    Err(e) => {
                        r.live = Some(Live::Freplace(old));
                        Err(e)
                    }
                }
            }
            (Some(Live::TailCall(mut live)), Some(_)) => {
                match budget::time(Step::Build, || {
                    tailcall::build(
                        &self.ctx,
                        key,
                        &live,
                        &next,
                        final_verdict,
                        &plan,
                        &mut keep,
                    )
                })
                .and_then(|progs| {
                    budget::time(Step::Swap, || tailcall::swap(&live, next.number)).map(|()| progs)
                }) {
                    Ok(progs) => {
                        crash::point(self.ctx.crash_at, crash::Step::Swapped);
                        live.generation = next.number;
                        live.stages = progs;
                        r.live = Some(Live::TailCall(live));
                        Ok(None)
                    }
                    Err(e) => {
                        tailcall::release(&self.ctx, key, &r.record.committed);
                        r.live = Some(Live::TailCall(live));
                        Err(e)
                    }
                }
            }
            (live, _) => {
                r.live = live;
                Err(Error::Drifted {
                    key,
                    reason: "no live generation".into(),
                })
            }
        };
        let old = match result {
            Ok(old) => old,
            Err(e) => {
                r.record.pending = None;
                // A failed tail-call build emptied the inactive parity.
                r.record.previous = None;
                if let Err(store_err) = self.store.put(&r.record) {
                    tracing::error!(%key, error = %store_err, "cannot clear the pending generation");
                }
                if let Some(drift) = r.check_drift(&self.ctx.layout) {
                    r.drift = Some(drift);
                }
                return Err(e);
            }
        };
        let before = std::mem::replace(&mut r.record.committed, next.clone());
        r.record.previous = (r.record.backend == Backend::TailCall).then_some(before);
        r.record.pending = None;
        self.store.put(&r.record)?;
        crash::point(self.ctx.crash_at, crash::Step::StoreCommitted);
        budget::time(Step::Release, || match old {
            Some(old) => freplace::release(&self.ctx, key, old),
            None => tailcall::release(&self.ctx, key, &next),
        });
        crash::point(self.ctx.crash_at, crash::Step::Released);
        tracing::info!(%key, generation = next.number, stages = next.pipeline.stages.len(), "applied");
        Ok(next.number)
    }

    /// Tail-call backend: returns to the previous generation at once. Its
    /// programs and chain still sit in the inactive parity, so nothing is
    /// loaded or verified: one write of the generation word, as a new
    /// generation. freplace releases the previous rootlet instance, so there
    /// (and after a failed change) this is `Error::NoRollback`.
    pub fn rollback(&self, key: RootletKey) -> Result<u64> {
        let rootlet = self.get(key)?;
        let mut guard = lock(&rootlet);
        if let Some(drift) = guard.check_drift(&self.ctx.layout) {
            guard.drift = Some(drift.clone());
            return Err(Error::Drifted { key, reason: drift });
        }
        let r = &mut *guard;
        let Some(Live::TailCall(live)) = &mut r.live else {
            return Err(Error::NoRollback {
                key,
                reason: "the freplace backend releases the previous generation; apply its stages again",
            });
        };
        let previous = r.record.previous.clone().ok_or(Error::NoRollback {
            key,
            reason: "no previous generation is kept (none yet, or the last change failed)",
        })?;
        let next = Generation {
            number: r.record.committed.number + 1,
            pipeline: previous.pipeline,
        };
        debug_assert_eq!(
            tailcall::parity(next.number),
            tailcall::parity(previous.number),
            "same parity"
        );
        let progs = tailcall::parity_progs(live, &next)?.ok_or(Error::NoRollback {
            key,
            reason: "a stage of the previous generation is gone (its owner exited)",
        })?;
        r.record.pending = Some(next.clone());
        self.store.put(&r.record)?;
        crash::point(self.ctx.crash_at, crash::Step::StorePending);
        tailcall::pin_arrays(&self.ctx, key, live, &next)?;
        tailcall::swap(live, next.number)?;
        crash::point(self.ctx.crash_at, crash::Step::Swapped);
        live.generation = next.number;
        live.stages = progs;
        let before = std::mem::replace(&mut r.record.committed, next.clone());
        r.record.previous = Some(before);
        r.record.pending = None;
        self.store.put(&r.record)?;
        tailcall::release(&self.ctx, key, &next);
        tracing::info!(%key, generation = next.number, "rolled back to the previous generation");
        Ok(next.number)
    }

    /// Detaches the rootlet from its interface and removes every pin and
    /// record of it. Works on drifted rootlets too.
    pub fn unload_rootlet(&self, key: RootletKey) -> Result<()> {
        self.unload_rootlet_if(key, |_| Ok::<bool, Error>(true))
            .map(|_| ())
    }

    /// [`Dataplane::unload_rootlet`] if `guard`, run under the rootlet's
    /// lock on its committed pipeline, says so; returns whether it did.
    pub fn unload_rootlet_if<E: From<Error>>(
        &self,
        key: RootletKey,
        guard: impl FnOnce(&Pipeline) -> std::result::Result<bool, E>,
    ) -> std::result::Result<bool, E> {
        let rootlet = self.get(key)?;
        let mut r = lock(&rootlet);
        if !guard(&r.record.committed.pipeline)? {
            return Ok(false);
        }
        if let Some(link) = &r.link
            && r.drift.is_none()
        {
            sys::link_detach(link.as_fd()).map_err(Error::from)?;
        }
        r.live = None;
        r.link = None;
        pins::remove(&self.ctx.layout.rootlet_dir(key)).map_err(|source| Error::Pin {
            what: "rootlet directory",
            path: self.ctx.layout.rootlet_dir(key),
            source,
        })?;
        self.store.delete(key)?;
        lock(&self.rootlets).remove(&key);
        tracing::info!(%key, "rootlet unloaded");
        Ok(true)
    }

    /// Why the kernel no longer runs what this data plane built for `key`,
    /// if it doesn't (cheaper than [`Dataplane::state`]).
    pub fn drift(&self, key: RootletKey) -> Result<Option<String>> {
        let rootlet = self.get(key)?;
        let mut r = lock(&rootlet);
        if let Some(d) = r.check_drift(&self.ctx.layout) {
            r.drift = Some(d);
        }
        Ok(r.drift.clone())
    }

    /// Reads a rootlet back from the kernel. A slot's counters are its
    /// stage's since it was linked: the slot's counts less those it had
    /// then.
    pub fn state(&self, key: RootletKey) -> Result<RootletState> {
        let rootlet = self.get(key)?;
        let mut r = lock(&rootlet);
        let drift = r.check_drift(&self.ctx.layout);
        if drift.is_some() {
            r.drift = drift.clone();
        }
        let layout = &self.ctx.layout;
        let Some(live) = r.live.as_ref() else {
            return Ok(self.unadopted_state(key, &r));
        };
        let (counts, final_count) = match live {
            Live::Freplace(_) => (
                tally::read(sys::obj_get(&layout.stats(key))?.as_fd())?[0],
                match sys::obj_get(&layout.final_counts(key)) {
                    Ok(fd) => tally::read_final(fd.as_fd())?,
                    // Not built yet: no generation since this version.
                    Err(e) if e.errno() == Some(libc::ENOENT) => 0,
                    Err(e) => return Err(e.into()),
                },
            ),
            Live::TailCall(l) => (
                l.reported
                    .report(r.record.tally.counts(&tally::read(l.maps.stats.as_fd())?)),
                tally::read_final(l.maps.finals.as_fd())?,
            ),
        };
        let mut slots = vec![];
        for (position, s) in r.record.committed.pipeline.stages.iter().enumerate() {
            let (prog, link_id, twin_id, pin_path) = match live {
                Live::Freplace(l) => match l.stages.get(&s.slot) {
                    Some(a) => (
                        Some(ProgState::read(a.prog.as_fd())?),
                        Some(sys::link_info(a.link.as_fd())?.id),
                        None,
                        s.pin
                            .then(|| layout.gen_slot_link(key, l.generation, s.slot)),
                    ),
                    None => (None, None, None, None),
                },
                Live::TailCall(l) => {
                    let prog = match tailcall::slot_prog_id(l, s.slot)? {
                        Some(id) => Some(ProgState::read(sys::prog_fd_by_id(id)?.as_fd())?),
                        None => None,
                    };
                    let twin = match prog {
                        Some(_) => tailcall::slot_twin_id(l, s.slot)?,
                        None => None,
                    };
                    let pin_path = s.pin.then(|| layout.chain_slot(key, s.slot));
                    (prog, None, twin, pin_path)
                }
            };
            let maps = match &prog {
                Some(p) => StageMap::of(sys::prog_fd_by_id(p.id)?.as_fd())?,
                None => vec![],
            };
            let mut instances = vec![];
            match live {
                Live::Freplace(_) => {
                    if let Some(p) = &prog {
                        instances.push(Instance {
                            parity: 0,
                            id: p.id,
                            live: true,
                        });
                    }
                }
                Live::TailCall(l) => {
                    let parity = tailcall::parity(l.generation);
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
                }
            }
            // A plain XDP program last in the chain returns its verdict to
            // the kernel: nothing sees it.
            let counted = s.chainable || !matches!(live, Live::TailCall(_));
            let mut slot_counts = counts.get(s.slot as usize).copied().unwrap_or_default();
            for (c, b) in slot_counts.iter_mut().zip(&s.counts_base) {
                *c = c.saturating_sub(*b);
            }
            slots.push(SlotState {
                prog,
                link_id,
                twin_id,
                pin_path,
                counters: Counters::of(&slot_counts),
                counted,
                instances,
                maps,
                ..recorded_slot(s, position)
            });
        }
        let users: Vec<(u32, String)> = slots
            .iter()
            .flat_map(|s| s.maps.iter().map(move |m| (m.id, s.stage.clone())))
            .collect();
        for slot in &mut slots {
            for map in &mut slot.maps {
                map.shared_with = users
                    .iter()
                    .filter(|(id, stage)| *id == map.id && *stage != slot.stage)
                    .map(|(_, stage)| stage.clone())
                    .collect();
            }
        }
        Ok(RootletState {
            key,
            ifname: r.record.spec.iface.ifname.clone(),
            netns: r.record.spec.iface.netns.clone(),
            backend: r.record.backend,
            mode: r.record.attached_mode,
            final_verdict: r.record.spec.final_verdict,
            generation: r.record.committed.number,
            rootlet: ProgState::read(live.rootlet())?,
            xdp_link_id: r
                .link
                .as_ref()
                .map(|l| sys::link_info(l.as_fd()))
                .transpose()?
                .map_or(0, |i| i.id),
            drift: r.drift.clone(),
            final_verdict_count: final_count,
            slots,
        })
    }

    /// The state of a drifted rootlet whose programs this process could
    /// not adopt (its pins were gone or the link ran another program when
    /// it started): what the store records, with the drift, the rootlet
    /// program if its pin still holds it, and stages without programs or
    /// counts (the kernel no longer runs them as built).
    fn unadopted_state(&self, key: RootletKey, r: &Rootlet) -> RootletState {
        let layout = &self.ctx.layout;
        let pin = match r.record.backend {
            Backend::Freplace => layout.gen_rootlet(key, r.record.committed.number),
            Backend::TailCall => layout.chain_obj(key, "rootlet"),
        };
        let rootlet = sys::obj_get(&pin)
            .ok()
            .and_then(|fd| ProgState::read(fd.as_fd()).ok())
            .unwrap_or_else(ProgState::unknown);
        let slots = r
            .record
            .committed
            .pipeline
            .stages
            .iter()
            .enumerate()
            .map(|(position, s)| recorded_slot(s, position))
            .collect();
        RootletState {
            key,
            ifname: r.record.spec.iface.ifname.clone(),
            netns: r.record.spec.iface.netns.clone(),
            backend: r.record.backend,
            mode: r.record.attached_mode,
            final_verdict: r.record.spec.final_verdict,
            generation: r.record.committed.number,
            rootlet,
            xdp_link_id: r
                .link
                .as_ref()
                .and_then(|l| sys::link_info(l.as_fd()).ok())
                .map_or(0, |i| i.id),
            drift: r.drift.clone(),
            slots,
            final_verdict_count: 0,
        }
    }

    /// A map of a linked stage, by name: to configure a stage (a blocklist,
    /// a service table) or read what it records.
    pub fn stage_map(&self, key: RootletKey, stage: &str, map: &str) -> Result<OwnedFd> {
        let rootlet = self.get(key)?;
        let r = lock(&rootlet);
        let not_found = || Error::Load {
            what: format!("stage `{stage}`"),
            message: format!("no map `{map}`"),
        };
        let slot = r
            .record
            .committed
            .pipeline
            .by_name(stage)
            .ok_or_else(|| Error::Plan(spec::PlanError::NotLinked(stage.into())))?
            .slot;
        let prog = r
            .live
            .as_ref()
            .and_then(|l| l.stage_prog(slot))
            .ok_or_else(not_found)?;
        prog_maps(prog)?
            .remove(object::truncate(map))
            .ok_or_else(not_found)
    }
}

/// The maps a loaded program uses, by kernel name (15 characters at most).
pub fn prog_maps(prog: BorrowedFd<'_>) -> Result<BTreeMap<String, OwnedFd>> {
    tailcall::maps_of(prog)
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

/// Whether `path` is on bpffs (used by tools that prepare a root).
pub fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|fs| fs.filesystem_type() == BPF_FS_MAGIC)
}
