//! The data plane: rootlets on interfaces, stages linked into them, every
//! change applied as a new generation swapped in atomically, pins that keep
//! the data path alive without this process, and a store for what the kernel
//! cannot hold.
//!
//! **Architecture invariant:** this layer knows nothing about gRPC.
//!
//! **Architecture invariant:** the hook's link of a rootlet (XDP) is
//! created once, at load, and afterwards only ever changed by
//! BPF_LINK_UPDATE with BPF_F_REPLACE (freplace) or not at all (tail-call:
//! the generation word flips instead).
//!
//! **Architecture invariant:** the order of the steps of a change, its
//! crash points and store records are [`txn`]'s alone; a backend
//! ([`backend::Linker`]) holds only what is specific to it, and nothing
//! outside [`backend`] matches on the backend kind to act.
//!
//! # Layout
//! - [`spec`]: vocabulary and planning (no kernel).
//! - [`object`], [`btf`]: checks on a stage object before loading it.
//! - [`loader`]: aya loads ELF objects; [`sys`]: every other bpf(2) call.
//! - [`txn`]: the transaction driver, the steps of every change.
//! - [`backend`]: the [`backend::Linker`] trait; [`freplace`],
//!   [`tailcall`]: the two backends.
//! - [`hook`]: the attach point (XDP), an axis apart from the backend.
//! - [`probe`]: which backend the kernel permits.
//! - [`pins`]: the bpffs layout; [`store`]: the redb store.
//! - [`policy`]: the contents of a stage's maps: list, dump, atomic swap
//!   of a policy map, plain maps entry by entry with undo.
//! - [`state`]: read-back from the kernel; [`crash`]: crash injection.

pub mod abi;
pub mod backend;
pub mod btf;
pub mod budget;
pub mod crash;
pub mod error;
pub mod freplace;
pub mod hook;
pub mod kv;
pub mod loader;
pub mod netns;
pub mod object;
pub mod pins;
pub mod policy;
pub mod probe;
pub mod spec;
pub mod state;
pub mod store;
pub mod sys;
pub mod tailcall;
pub mod tally;
pub mod txn;
pub mod warm;

use std::{
    collections::BTreeMap,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
};

use backend::Linker;
pub use error::{Error, Result};
use pins::Layout;
use probe::Capabilities;
use spec::{
    Backend, BackendChoice, Change, HookKind, Pipeline, RootletKey, RootletSpec, StageRecord,
};
use state::{Counters, ProgState, RootletState, SlotState, StageMap};
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
    /// aya loaders made ahead of time, off the path of a change
    /// ([`warm`]); 0 makes each when it is needed.
    pub warm_loaders: usize,
}

/// The default of [`Config::warm_loaders`]: more than the largest change
/// it must serve, a 3-stage switch (tail-call: one loader per new stage,
/// its second instance reusing it; freplace: the rootlet instance and one
/// per new stage, 4), so that two such switches in a row find loaders.
pub const DEFAULT_WARM_LOADERS: usize = 6;

impl Default for Config {
    fn default() -> Self {
        Config {
            bpffs_root: "/sys/fs/bpf/rootlet".into(),
            store_path: "/var/lib/rootlet/dataplane.redb".into(),
            backend: BackendChoice::Auto,
            crash_at: None,
            warm_loaders: DEFAULT_WARM_LOADERS,
        }
    }
}

/// What the backends share.
pub struct Ctx {
    pub layout: Layout,
    pub crash_at: Option<crash::Step>,
}

/// One rootlet as this process holds it.
struct Rootlet {
    record: RootletRecord,
    /// The hook's link (pinned).
    link: Option<hook::Link>,
    /// The backend and its live generation; None when not adopted (drift).
    live: Option<Box<dyn Linker>>,
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
        link.drift(rootlet_id)
    }
}

/// What a rollback did ([`Dataplane::rollback_guarded`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RolledBack {
    /// The new generation, which runs the restored pipeline.
    pub generation: u64,
    /// The generation whose pipeline it runs again.
    pub restored: u64,
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
    /// a crash interrupted, finishes an interrupted unload, and reports
    /// drift.
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
        // After the probe and adoption, so that the loaders' parses do not
        // delay them.
        warm::set_depth(config.warm_loaders);
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
            if record.unloading {
                self.finish_unload(record)?;
                continue;
            }
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

    /// Finishes an unload a crash interrupted after its marker: adopts
    /// what is left of the rootlet (so that the drift rule decides whether
    /// its link is still ours to detach), then runs the rest of the unload.
    /// A rootlet that cannot be adopted is not detached; its pins and
    /// record go all the same.
    fn finish_unload(&self, record: RootletRecord) -> Result<()> {
        let key = record.key;
        tracing::info!(%key, "an unload was interrupted by a restart: finishing it");
        let mut rootlet = match self.adopt(record.clone()) {
            Ok(Some(rootlet)) => rootlet,
            // Its first load had not finished: nothing of it is left.
            Ok(None) => return Ok(()),
            Err(e) => {
                tracing::warn!(%key, error = %e, "cannot adopt a rootlet being unloaded; not detaching it");
                Rootlet {
                    record,
                    link: None,
                    live: None,
                    drift: Some(format!("cannot be adopted: {e}")),
                }
            }
        };
        txn::finish_unload(&self.ctx, &self.store, &mut rootlet)?;
        tracing::info!(%key, "rootlet unloaded");
        Ok(())
    }

    fn adopt(&self, mut record: RootletRecord) -> Result<Option<Rootlet>> {
        let key = record.key;
        let layout = &self.ctx.layout;
        let hook = hook::of(record.hook, record.spec.mode);
        let name = hook.name();
        let drifted = |record: RootletRecord, link: Option<hook::Link>, why: String| Rootlet {
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
                let link = hook::Link::new(l, hook.as_ref());
                let info = link.info()?;
                let detached = (info.ifindex == 0).then(|| hook::detached(name));
                (Some(link), Some(info), detached)
            }
            Err(_) if record.committed.number == 0 => {
                // The first load crashed before the XDP link existed.
                tracing::info!(%key, "removing a rootlet whose first load did not finish");
                let _ = pins::remove(&layout.rootlet_dir(key));
                self.store.delete(key)?;
                return Ok(None);
            }
            Err(e) => (None, None, Some(format!("the {name} pin is gone ({e})"))),
        };
        let generations: Vec<&Generation> = std::iter::once(&record.committed)
            .chain(record.pending.as_ref())
            .collect();
        let live = backend::adopt(
            record.backend,
            &self.ctx,
            key,
            info.as_ref().map(|i| i.prog_id),
            &generations,
        );
        // What a drifted rootlet's pins no longer allow is reported as
        // drift, not as a failure to start.
        let live = match live {
            Err(e) if drift.is_some() => {
                tracing::warn!(%key, error = %e, "cannot adopt the programs of a drifted rootlet");
                None
            }
            other => other?,
        };
        let Some(mut live) = live else {
            let why = match (drift, &info) {
                (Some(d), _) => d,
                (None, Some(info)) => format!(
                    "the {name} runs program {} which is not a generation of this rootlet",
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
                "the {name} runs program {} instead of the rootlet program",
                info.prog_id
            ));
        }
        txn::settle(&self.ctx, &self.store, &mut record, live.as_mut())?;
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
        let record = RootletRecord {
            key,
            spec: spec.clone(),
            backend,
            hook: HookKind::Xdp,
            attached_mode: spec.mode,
            committed: Generation {
                number: 0,
                pipeline: Pipeline::default(),
            },
            pending: Some(first.clone()),
            previous: None,
            // The counters are created with the rootlet: all zero.
            tally: Tally::default(),
            unloading: false,
        };
        let hook = hook::of(record.hook, spec.mode);
        let rootlet = txn::load(&self.ctx, &self.store, record, hook.as_ref(), netns)?;
        let mode = rootlet.record.attached_mode;
        tracing::info!(%key, %backend, ?mode, ifname = %spec.iface.ifname, "rootlet loaded");
        rootlets.insert(key, Arc::new(Mutex::new(rootlet)));
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
        Ok(txn::apply(
            &self.ctx,
            &self.store,
            &mut r,
            changes,
            expected_generation,
        )?)
    }

    /// Tail-call backend: returns to the previous generation at once. Its
    /// programs and chain still sit in the inactive parity, so nothing is
    /// loaded or verified: one write of the generation word, as a new
    /// generation. freplace releases the previous rootlet instance, so there
    /// (and after a failed change) this is `Error::NoRollback`.
    pub fn rollback(&self, key: RootletKey) -> Result<u64> {
        self.rollback_guarded(key, None, |_, _| Ok::<(), Error>(()))
            .map(|r| r.generation)
    }

    /// [`Dataplane::rollback`], under the rootlet's lock: first drift and
    /// `expected_generation` (which must be the current one), then whether
    /// a previous generation is kept, then `guard` on the committed and the
    /// previous pipeline (the agent authorises the stages they differ in
    /// here). Whatever is refused is refused before anything is written.
    pub fn rollback_guarded<E: From<Error>>(
        &self,
        key: RootletKey,
        expected_generation: Option<u64>,
        guard: impl FnOnce(&Pipeline, &Pipeline) -> std::result::Result<(), E>,
    ) -> std::result::Result<RolledBack, E> {
        let rootlet = self.get(key)?;
        let mut r = lock(&rootlet);
        let (generation, restored) =
            txn::rollback(&self.ctx, &self.store, &mut r, expected_generation, guard)?;
        Ok(RolledBack {
            generation,
            restored,
        })
    }

    /// Detaches the rootlet from its interface and removes every pin and
    /// record of it. Works on drifted rootlets too. Its record is marked
    /// first: after a crash in the middle, [`Dataplane::open`] finishes it.
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
        txn::unload(&self.ctx, &self.store, &mut r)?;
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
        let Some(live) = r.live.as_ref() else {
            return Ok(self.unadopted_state(key, &r));
        };
        let (counts, final_count) = live.counts(&self.ctx, key, &r.record.tally)?;
        let mut slots = vec![];
        for (position, s) in r.record.committed.pipeline.stages.iter().enumerate() {
            let backend::SlotKernel {
                prog,
                link_id,
                twin_id,
                pin_path,
                instances,
                counted,
            } = live.slot(&self.ctx, key, s)?;
            let maps = match &prog {
                Some(p) => StageMap::of(sys::prog_fd_by_id(p.id)?.as_fd())?,
                None => vec![],
            };
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
                .map(|l| l.info())
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
        let pin = backend::rootlet_pin(r.record.backend, layout, key, r.record.committed.number);
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
                .and_then(|l| l.info().ok())
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

/// Whether `path` is on bpffs (used by tools that prepare a root).
pub fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|fs| fs.filesystem_type() == BPF_FS_MAGIC)
}
