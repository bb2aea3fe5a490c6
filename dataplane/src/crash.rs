//! Crash injection: the steps of a change, in order, and a hook that aborts
//! the process at a chosen one. Tests run a change in a child process with a
//! crash point set, then adopt the state from a fresh process and check that
//! the interface runs exactly the old or exactly the new pipeline.

use serde::{Deserialize, Serialize};

/// The steps of one change, in the order they happen, then those of an
/// unload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Step {
    /// The next generation is recorded as pending in the store.
    StorePending,
    /// freplace: the new rootlet instance is loaded and pinned.
    RootletLoaded,
    /// A stage is loaded (if new) and attached/placed for the new generation.
    StageAttached,
    /// Everything of the new generation is built; nothing is live yet.
    Built,
    /// The swap happened (BPF_LINK_UPDATE, or the generation flip).
    Swapped,
    /// The store records the new generation as committed.
    StoreCommitted,
    /// The old generation is released.
    Released,
    /// Unload: under the rootlet's lock, its guard passed; nothing is
    /// written yet (a crash here keeps the whole rootlet).
    UnloadBegun,
    /// Unload: the record is marked `unloading`; nothing else changed.
    UnloadMarked,
    /// Unload: the link is off the interface; the pins and the record stay.
    UnloadDetached,
    /// Unload: the pins are gone; the record (marked) stays.
    UnloadPinsRemoved,
}

impl Step {
    /// The steps of a change (load, apply, rollback), in order.
    pub const ALL: [Step; 7] = [
        Step::StorePending,
        Step::RootletLoaded,
        Step::StageAttached,
        Step::Built,
        Step::Swapped,
        Step::StoreCommitted,
        Step::Released,
    ];

    /// The steps of an unload, in order. From the marker on, adoption
    /// finishes the unload ([`super::Dataplane::open`]); before it, the
    /// rootlet stays whole.
    pub const UNLOAD: [Step; 4] = [
        Step::UnloadBegun,
        Step::UnloadMarked,
        Step::UnloadDetached,
        Step::UnloadPinsRemoved,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Step::StorePending => "store-pending",
            Step::RootletLoaded => "rootlet-loaded",
            Step::StageAttached => "stage-attached",
            Step::Built => "built",
            Step::Swapped => "swapped",
            Step::StoreCommitted => "store-committed",
            Step::Released => "released",
            Step::UnloadBegun => "unload-begun",
            Step::UnloadMarked => "unload-marked",
            Step::UnloadDetached => "unload-detached",
            Step::UnloadPinsRemoved => "unload-pins-removed",
        }
    }

    pub fn from_name(s: &str) -> Option<Step> {
        Step::ALL
            .into_iter()
            .chain(Step::UNLOAD)
            .find(|st| st.name() == s)
    }
}

/// Aborts the process if `at` is `step`: what a crash there would leave.
pub fn point(at: Option<Step>, step: Step) {
    if at == Some(step) {
        tracing::warn!(step = step.name(), "injected crash");
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::Step;

    #[test]
    fn every_step_is_found_by_its_name_and_no_two_share_one() {
        let all: Vec<Step> = Step::ALL.into_iter().chain(Step::UNLOAD).collect();
        for step in &all {
            assert_eq!(Step::from_name(step.name()), Some(*step), "{step:?}");
        }
        let names: std::collections::BTreeSet<&str> = all.iter().map(|s| s.name()).collect();
        assert_eq!(names.len(), all.len());
        assert_eq!(Step::from_name("unload"), None);
    }
}
