//! What a pipeline should be, computed before anything touches the kernel:
//! the vocabulary (actions, modes, backends, stage specs, changes) and
//! [`Pipeline::plan`], which turns a set of changes into the next pipeline
//! with stable slot ids and a deterministic execution order.

use std::{collections::BTreeMap, fmt, path::PathBuf, sync::Arc};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::abi::{MAX_SLOTS, NUM_COUNTERS};

/// The vocabulary a bundle manifest spells, shared so that a bundle's
/// stage becomes a [`StageSpec`] without translation.
pub use rootlet_types::{Backend, BackendChoice, HookKind, MapPolicy, XdpAction, XdpMode};

/// A set of XDP actions: after which verdicts the pipeline goes on to the
/// next stage ("proceed-on").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ActionSet(u32);

impl ActionSet {
    pub const EMPTY: ActionSet = ActionSet(0);

    pub fn of(actions: &[XdpAction]) -> Self {
        ActionSet(actions.iter().fold(0, |m, &a| m | (1 << a as u32)))
    }

    pub fn contains(self, a: XdpAction) -> bool {
        self.0 & (1 << a as u32) != 0
    }

    pub fn bits(self) -> u32 {
        self.0
    }

    pub fn actions(self) -> Vec<XdpAction> {
        XdpAction::ALL
            .into_iter()
            .filter(|&a| self.contains(a))
            .collect()
    }
}

impl Default for ActionSet {
    /// Proceed after XDP_PASS only, as libxdp does.
    fn default() -> Self {
        ActionSet::of(&[XdpAction::Pass])
    }
}

/// An interface in a network namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceRef {
    /// A network-namespace file (`/run/netns/NAME`, `/proc/PID/ns/net`);
    /// None for the caller's own namespace.
    pub netns: Option<PathBuf>,
    pub ifname: String,
}

/// Identifies a rootlet: the interface's network-namespace inode and
/// ifindex (an ifindex alone collides across namespaces).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RootletKey {
    pub netns_ino: u64,
    pub ifindex: u32,
}

impl fmt::Display for RootletKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "netns:{}/if:{}", self.netns_ino, self.ifindex)
    }
}

/// What to load on an interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootletSpec {
    pub iface: InterfaceRef,
    pub mode: XdpMode,
    /// Returned when every stage proceeds.
    pub final_verdict: XdpAction,
}

/// A stage to link: an ELF object and which program of it to run.
#[derive(Clone, PartialEq, Eq)]
pub struct StageSpec {
    pub name: String,
    pub object: Arc<Vec<u8>>,
    pub program: String,
    /// Lower runs first; ties run in name order.
    pub priority: i32,
    pub proceed_on: ActionSet,
    /// Pinned stages outlive this process; unpinned ones are detached when
    /// it exits.
    pub pin: bool,
    pub maps: MapPolicy,
    pub owner: String,
}

impl fmt::Debug for StageSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StageSpec")
            .field("name", &self.name)
            .field("object", &format_args!("{} bytes", self.object.len()))
            .field("program", &self.program)
            .field("priority", &self.priority)
            .field("proceed_on", &self.proceed_on)
            .field("pin", &self.pin)
            .field("maps", &self.maps)
            .field("owner", &self.owner)
            .finish()
    }
}

impl StageSpec {
    pub fn digest(&self) -> String {
        hex::encode(Sha256::digest(self.object.as_slice()))
    }
}

/// One change to a pipeline.
#[derive(Debug, Clone)]
pub enum Change {
    Link(StageSpec),
    Replace(StageSpec),
    Unlink {
        name: String,
    },
    /// Pins or unpins a running stage; its program is kept as it is.
    SetPin {
        name: String,
        pin: bool,
    },
}

/// A stage as recorded: everything but the object bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageRecord {
    pub name: String,
    /// Stable for the stage's life in this rootlet; keys its counters.
    pub slot: u32,
    pub priority: i32,
    pub proceed_on: ActionSet,
    pub pin: bool,
    pub owner: String,
    pub program: String,
    /// sha256 of the ELF object.
    pub digest: String,
    /// Whether the object was built with <rootlet/stage.h> and can continue
    /// a tail-call chain.
    pub chainable: bool,
    /// The generation that linked the stage into its slot: its counters
    /// count from there, across replacements (0: linked by a version that
    /// did not record it; its counters then count from the slot's first
    /// use).
    #[serde(default)]
    pub linked_generation: u64,
    /// The generation that loaded the running program (its link, or the
    /// last replacement that loaded a new object): with the digest, the
    /// stable identity of the build, whatever instances run it.
    #[serde(default)]
    pub loaded_generation: u64,
    /// The slot's counts (as `tally` keeps them) when the stage was linked:
    /// what it reports is the slot's counts less these.
    #[serde(default)]
    pub counts_base: [u64; NUM_COUNTERS],
}

/// The ordered set of stages of one rootlet.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Pipeline {
    /// In execution order.
    pub stages: Vec<StageRecord>,
}

/// Where a stage's program comes from in a planned pipeline.
#[derive(Debug, Clone)]
pub enum Source {
    /// The program already running in this slot: not loaded or verified again.
    Existing,
    /// A new object to load (and verify).
    New(StageSpec),
}

/// The next pipeline and, by slot, where each of its programs comes from.
#[derive(Debug, Clone)]
pub struct Plan {
    pub pipeline: Pipeline,
    pub sources: BTreeMap<u32, Source>,
    /// Slots of the previous pipeline whose programs are replaced or
    /// unlinked.
    pub retired: Vec<u32>,
}

/// Why a set of changes cannot apply; nothing has touched the kernel.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("stage `{0}` is already linked (use replace)")]
    AlreadyLinked(String),
    #[error("no stage `{0}` is linked")]
    NotLinked(String),
    #[error("stage `{0}` appears more than once in one change set")]
    Duplicate(String),
    #[error("a rootlet has at most {max} slots; this change needs {wanted}")]
    TooManyStages { max: usize, wanted: usize },
    #[error("invalid stage name `{0}`: use 1-64 characters from [A-Za-z0-9_.-]")]
    InvalidName(String),
}

pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

impl Pipeline {
    /// The stage in `slot`.
    pub fn by_slot(&self, slot: u32) -> Option<&StageRecord> {
        self.stages.iter().find(|s| s.slot == slot)
    }

    pub fn by_name(&self, name: &str) -> Option<&StageRecord> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// Applies `changes` in order. The execution order is by priority, lower
    /// first, then by name (bytewise), so it never depends on the order in
    /// which stages were linked. A new stage takes the lowest slot id used
    /// neither by the next pipeline, nor by this one, nor in `in_use` (the
    /// generation the kernel runs), so that no packet still counts a
    /// departed stage in the slot a new one counts in; only when every id
    /// is taken does it reuse one this pipeline frees. A replaced stage
    /// keeps its slot and its counters.
    ///
    /// A replacement whose object, program and map policy are unchanged
    /// reuses the running program (only its placement or proceed-on
    /// changes). `chainable` says, for a new object, whether it was built
    /// with <rootlet/stage.h>; it is computed by [`super::object`].
    pub fn plan(
        &self,
        changes: &[Change],
        chainable: impl Fn(&StageSpec) -> bool,
    ) -> Result<Plan, PlanError> {
        self.plan_beside(changes, chainable, &[])
    }

    /// [`Pipeline::plan`], keeping the slot ids `in_use` for new stages as
    /// long as others are free.
    pub fn plan_beside(
        &self,
        changes: &[Change],
        chainable: impl Fn(&StageSpec) -> bool,
        in_use: &[u32],
    ) -> Result<Plan, PlanError> {
        let mut stages: BTreeMap<String, StageRecord> = self
            .stages
            .iter()
            .map(|s| (s.name.clone(), s.clone()))
            .collect();
        let mut sources: BTreeMap<u32, Source> = BTreeMap::new();
        let mut retired = vec![];
        let mut touched = std::collections::HashSet::new();

        for change in changes {
            let name = match change {
                Change::Link(s) | Change::Replace(s) => &s.name,
                Change::Unlink { name } | Change::SetPin { name, .. } => name,
            };
            if !valid_name(name) {
                return Err(PlanError::InvalidName(name.clone()));
            }
            if !touched.insert(name.clone()) {
                return Err(PlanError::Duplicate(name.clone()));
            }
            match change {
                Change::Link(spec) => {
                    if stages.contains_key(&spec.name) {
                        return Err(PlanError::AlreadyLinked(spec.name.clone()));
                    }
                    let used: Vec<u32> = stages.values().map(|s| s.slot).collect();
                    let running =
                        |i: &u32| self.stages.iter().any(|s| s.slot == *i) || in_use.contains(i);
                    let slot = (0..MAX_SLOTS as u32)
                        .find(|i| !used.contains(i) && !running(i))
                        .or_else(|| (0..MAX_SLOTS as u32).find(|i| !used.contains(i)))
                        .ok_or(PlanError::TooManyStages {
                            max: MAX_SLOTS,
                            wanted: stages.len() + 1,
                        })?;
                    stages.insert(spec.name.clone(), record(spec, slot, chainable(spec)));
                    sources.insert(slot, Source::New(spec.clone()));
                }
                Change::Replace(spec) => {
                    let old = stages
                        .get(&spec.name)
                        .ok_or_else(|| PlanError::NotLinked(spec.name.clone()))?;
                    let slot = old.slot;
                    // The same object and program: keep the running program
                    // (and so its maps); only placement or proceed-on change.
                    let same_program = old.digest == spec.digest() && old.program == spec.program;
                    let mut rec = record(
                        spec,
                        slot,
                        if same_program {
                            old.chainable
                        } else {
                            chainable(spec)
                        },
                    );
                    // The same stage's life in its slot goes on.
                    rec.linked_generation = old.linked_generation;
                    rec.counts_base = old.counts_base;
                    rec.loaded_generation = old.loaded_generation;
                    if same_program {
                        sources.entry(slot).or_insert(Source::Existing);
                    } else {
                        retired.push(slot);
                        sources.insert(slot, Source::New(spec.clone()));
                    }
                    stages.insert(spec.name.clone(), rec);
                }
                Change::Unlink { name } => {
                    let old = stages
                        .remove(name)
                        .ok_or_else(|| PlanError::NotLinked(name.clone()))?;
                    sources.remove(&old.slot);
                    retired.push(old.slot);
                }
                Change::SetPin { name, pin } => {
                    let rec = stages
                        .get_mut(name)
                        .ok_or_else(|| PlanError::NotLinked(name.clone()))?;
                    rec.pin = *pin;
                    sources.entry(rec.slot).or_insert(Source::Existing);
                }
            }
        }
        for s in stages.values() {
            sources.entry(s.slot).or_insert(Source::Existing);
        }
        let mut ordered: Vec<StageRecord> = stages.into_values().collect();
        ordered.sort_by(|a, b| {
            a.priority
                .cmp(&b.priority)
                .then_with(|| a.name.as_bytes().cmp(b.name.as_bytes()))
        });
        retired.sort_unstable();
        retired.dedup();
        Ok(Plan {
            pipeline: Pipeline { stages: ordered },
            sources,
            retired,
        })
    }
}

fn record(spec: &StageSpec, slot: u32, chainable: bool) -> StageRecord {
    StageRecord {
        name: spec.name.clone(),
        slot,
        priority: spec.priority,
        proceed_on: spec.proceed_on,
        pin: spec.pin,
        owner: spec.owner.clone(),
        program: spec.program.clone(),
        digest: spec.digest(),
        chainable,
        linked_generation: 0,
        loaded_generation: 0,
        counts_base: [0; NUM_COUNTERS],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, prio: i32, obj: &[u8]) -> StageSpec {
        StageSpec {
            name: name.into(),
            object: Arc::new(obj.to_vec()),
            program: "p".into(),
            priority: prio,
            proceed_on: ActionSet::default(),
            pin: true,
            maps: MapPolicy::Fresh,
            owner: "team".into(),
        }
    }

    fn names(p: &Pipeline) -> Vec<(&str, u32)> {
        p.stages.iter().map(|s| (s.name.as_str(), s.slot)).collect()
    }

    #[test]
    fn order_is_priority_then_name_and_slots_are_stable() {
        let p0 = Pipeline::default();
        let plan = p0
            .plan(
                &[
                    Change::Link(spec("lb", 30, b"a")),
                    Change::Link(spec("ddos", 10, b"b")),
                    Change::Link(spec("sampler", 10, b"c")),
                ],
                |_| true,
            )
            .unwrap();
        assert_eq!(
            names(&plan.pipeline),
            [("ddos", 1), ("sampler", 2), ("lb", 0)]
        );

        let plan2 = plan
            .pipeline
            .plan(
                &[
                    Change::Unlink {
                        name: "ddos".into(),
                    },
                    Change::Link(spec("aaa", 10, b"d")),
                ],
                |_| true,
            )
            .unwrap();
        // ddos is counted in slot 1 until the swap: aaa takes another.
        assert_eq!(
            names(&plan2.pipeline),
            [("aaa", 3), ("sampler", 2), ("lb", 0)]
        );
        assert_eq!(plan2.retired, [1]);
        assert!(matches!(plan2.sources[&3], Source::New(_)));
        assert!(matches!(plan2.sources[&2], Source::Existing));
        // Once free, a slot id is reused.
        let plan3 = plan2
            .pipeline
            .plan(&[Change::Link(spec("bbb", 10, b"e"))], |_| true)
            .unwrap();
        assert_eq!(plan3.pipeline.by_name("bbb").map(|s| s.slot), Some(1));
    }

    #[test]
    fn new_stages_avoid_the_slots_the_kernel_still_counts_in() {
        let full: Vec<Change> = (0..MAX_SLOTS)
            .map(|i| Change::Link(spec(&format!("s{i:02}"), 1, b"x")))
            .collect();
        let p = Pipeline::default().plan(&full, |_| true).unwrap().pipeline;
        // Slot 4 is free in this pipeline but the running generation (say,
        // with a dead stage dropped) still counts in it.
        let p = p
            .plan(
                &[
                    Change::Unlink { name: "s04".into() },
                    Change::Unlink { name: "s05".into() },
                ],
                |_| true,
            )
            .unwrap()
            .pipeline;
        let plan = p
            .plan_beside(&[Change::Link(spec("new", 1, b"y"))], |_| true, &[4])
            .unwrap();
        assert_eq!(plan.pipeline.by_name("new").map(|s| s.slot), Some(5));
        // With every id taken but one the change frees, that one is reused.
        let plan = p
            .plan(
                &[
                    Change::Unlink { name: "s00".into() },
                    Change::Link(spec("a", 1, b"y")),
                    Change::Link(spec("b", 1, b"y")),
                    Change::Link(spec("c", 1, b"y")),
                ],
                |_| true,
            )
            .unwrap();
        let mut slots: Vec<u32> = ["a", "b", "c"]
            .iter()
            .filter_map(|n| plan.pipeline.by_name(n).map(|s| s.slot))
            .collect();
        slots.sort_unstable();
        assert_eq!(slots, [0, 4, 5]);
    }

    #[test]
    fn replace_with_same_object_reuses_the_program() {
        let p = Pipeline::default()
            .plan(&[Change::Link(spec("a", 1, b"x"))], |_| true)
            .unwrap()
            .pipeline;
        let same = p
            .plan(&[Change::Replace(spec("a", 5, b"x"))], |_| true)
            .unwrap();
        assert!(matches!(same.sources[&0], Source::Existing));
        assert!(same.retired.is_empty());
        assert_eq!(same.pipeline.stages[0].priority, 5);
        let new = p
            .plan(&[Change::Replace(spec("a", 1, b"y"))], |_| true)
            .unwrap();
        assert!(matches!(new.sources[&0], Source::New(_)));
        assert_eq!(new.retired, [0]);
    }

    #[test]
    fn set_pin_keeps_the_program() {
        let p = Pipeline::default()
            .plan(&[Change::Link(spec("a", 1, b"x"))], |_| true)
            .unwrap()
            .pipeline;
        let plan = p
            .plan(
                &[Change::SetPin {
                    name: "a".into(),
                    pin: false,
                }],
                |_| true,
            )
            .unwrap();
        assert!(matches!(plan.sources[&0], Source::Existing));
        assert!(!plan.pipeline.stages[0].pin);
        assert!(plan.retired.is_empty());
    }

    #[test]
    fn errors_name_the_problem() {
        let p = Pipeline::default()
            .plan(&[Change::Link(spec("a", 1, b"x"))], |_| true)
            .unwrap()
            .pipeline;
        assert_eq!(
            p.plan(&[Change::Link(spec("a", 1, b"x"))], |_| true)
                .unwrap_err(),
            PlanError::AlreadyLinked("a".into())
        );
        assert_eq!(
            p.plan(&[Change::Unlink { name: "b".into() }], |_| true)
                .unwrap_err(),
            PlanError::NotLinked("b".into())
        );
        assert_eq!(
            p.plan(
                &[
                    Change::Replace(spec("a", 1, b"y")),
                    Change::Unlink { name: "a".into() }
                ],
                |_| true
            )
            .unwrap_err(),
            PlanError::Duplicate("a".into())
        );
        assert_eq!(
            p.plan(&[Change::Link(spec("a b", 1, b"x"))], |_| true)
                .unwrap_err(),
            PlanError::InvalidName("a b".into())
        );
        let many: Vec<Change> = (0..MAX_SLOTS)
            .map(|i| Change::Link(spec(&format!("s{i}"), 0, b"x")))
            .collect();
        assert_eq!(
            p.plan(&many, |_| true).unwrap_err(),
            PlanError::TooManyStages {
                max: MAX_SLOTS,
                wanted: MAX_SLOTS + 1
            }
        );
    }
}
