//! RollbackRootlet: one rootlet back to its previous generation (not a
//! bundle's history, which `bundles.rs` rolls back), authorised for every
//! stage the two generations differ in and refused where one of those
//! stages is a bundle's.

use rootlet_dataplane::{
    self as dataplane,
    spec::{Pipeline, RootletKey, StageRecord},
};

use crate::{Agent, AgentError, ApplyStatus, Grant, Result, lock};

/// How a rootlet went back to its previous generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RollbackHow {
    /// The previous generation was still built (the tail-call backend's
    /// inactive parity): one write, nothing loaded or verified.
    Instant,
    /// The previous pipeline built again as a new change. No backend does
    /// this yet: freplace keeps nothing to return to and answers
    /// `dataplane::Error::NoRollback`.
    Rebuilt,
}

/// What a rollback did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RollbackOutcome {
    /// The new generation, running the restored pipeline.
    pub generation: u64,
    /// The generation whose pipeline it runs again.
    pub restored: u64,
    pub how: RollbackHow,
}

/// The stages `a` and `b` differ in, by name, with each one's record in
/// each (None: not in that pipeline). A stage that runs the same build in
/// the same slot with the same terms in both is not touched by the
/// rollback.
fn differing<'a>(
    a: &'a Pipeline,
    b: &'a Pipeline,
) -> Vec<(&'a str, Option<&'a StageRecord>, Option<&'a StageRecord>)> {
    let mut names: Vec<&str> = a
        .stages
        .iter()
        .chain(&b.stages)
        .map(|s| s.name.as_str())
        .collect();
    names.sort_unstable();
    names.dedup();
    names
        .into_iter()
        .map(|n| (n, a.by_name(n), b.by_name(n)))
        .filter(|(_, x, y)| x != y)
        .collect()
}

/// The bundle whose stage `stage` is (by identity: [`ApplyStatus::is_bundles`]).
fn bundle_of(status: &ApplyStatus, stage: &StageRecord) -> Option<String> {
    status
        .managed
        .keys()
        .find(|b| status.is_bundles(b, &stage.name, stage.linked_generation))
        .cloned()
}

impl Agent {
    /// Returns the rootlet `key` to its previous generation, as a new
    /// generation. The caller must be allowed to change every stage the
    /// two generations differ in, as its owner in each (admins: any); none
    /// of them may be a bundle's, or the bundle's record would no longer
    /// say what runs ([`AgentError::ManagedByBundle`]: its stages go back
    /// with a bundle rollback). Both checks run under the rootlet's lock,
    /// against the generations the rollback swaps, and under the bundle
    /// lock, so no bundle apply changes what the bundles own meanwhile.
    pub fn rollback_rootlet(
        &self,
        grant: &Grant,
        key: RootletKey,
        expected: Option<u64>,
    ) -> Result<RollbackOutcome> {
        grant.mutate("roll back a rootlet")?;
        let _one_at_a_time = lock(&self.bundle_lock);
        let status = self.status(key)?;
        let mut restored_pipeline = None;
        let done = self
            .dp
            .rollback_guarded(key, expected, |committed, previous| -> Result<()> {
                let touched = differing(committed, previous);
                for (name, now, then) in &touched {
                    for s in [now, then].into_iter().flatten() {
                        grant.stage(name, Some(&s.owner))?;
                    }
                }
                for (name, now, then) in &touched {
                    for s in [now, then].into_iter().flatten() {
                        if let Some(bundle) = bundle_of(&status, s) {
                            return Err(AgentError::ManagedByBundle {
                                rootlet: key.to_string(),
                                stage: (*name).to_owned(),
                                bundle,
                            });
                        }
                    }
                }
                restored_pipeline = Some(previous.clone());
                Ok(())
            });
        if let Err(AgentError::Dataplane(dataplane::Error::Drifted { reason, .. })) = &done {
            self.note_drift(key, Some(reason));
        }
        let done = done?;
        // A lease belongs to the stage it was granted for: one the rollback
        // took away has nothing left to renew.
        if let Some(p) = &restored_pipeline {
            lock(&self.leases).retain(|_, l| l.key != key || p.by_name(&l.stage).is_some());
        }
        self.emit(key, "changed");
        Ok(RollbackOutcome {
            generation: done.generation,
            restored: done.restored,
            how: RollbackHow::Instant,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rootlet_dataplane::spec::ActionSet;

    fn stage(name: &str, digest: &str, linked: u64) -> StageRecord {
        StageRecord {
            name: name.into(),
            slot: 0,
            priority: 0,
            proceed_on: ActionSet::default(),
            pin: true,
            owner: "ops".into(),
            program: "p".into(),
            digest: digest.into(),
            chainable: true,
            linked_generation: linked,
            loaded_generation: linked,
            counts_base: Default::default(),
        }
    }

    #[test]
    fn only_stages_that_differ_are_touched() {
        let a = Pipeline {
            stages: vec![stage("same", "d1", 1), stage("lb", "d2", 1)],
        };
        let b = Pipeline {
            stages: vec![
                stage("same", "d1", 1),
                stage("lb", "d3", 1),
                stage("new", "d4", 3),
            ],
        };
        let names: Vec<&str> = differing(&a, &b).into_iter().map(|(n, _, _)| n).collect();
        assert_eq!(names, ["lb", "new"]);
    }

    #[test]
    fn a_bundle_owns_a_stage_by_identity() {
        let mut status = ApplyStatus::default();
        status.managed.insert("edge".into(), vec!["lb".into()]);
        status
            .linked
            .insert("edge".into(), [("lb".to_owned(), 2)].into_iter().collect());
        assert_eq!(
            bundle_of(&status, &stage("lb", "d", 2)).as_deref(),
            Some("edge")
        );
        // Linked again by hand: another identity, not the bundle's.
        assert_eq!(bundle_of(&status, &stage("lb", "d", 5)), None);
        assert_eq!(bundle_of(&status, &stage("other", "d", 2)), None);
    }
}
