//! What every backend does, behind one trait: [`Linker`] links the stages
//! of a rootlet into it, one generation at a time (freplace in
//! [`super::freplace`], tail calls in [`super::tailcall`]). The order of the
//! steps of a change, its crash points, store records and failure handling
//! are the transaction driver's ([`super::txn`]); a backend holds only what
//! is specific to it. This module is the one place that turns a
//! [`Backend`] kind into a backend.

use std::{
    collections::BTreeMap,
    fmt,
    os::fd::{BorrowedFd, OwnedFd},
    path::PathBuf,
};

use super::{
    Ctx,
    error::Result,
    freplace, hook,
    loader::MapReuse,
    pins::Layout,
    spec::{Backend, Plan, RootletKey, StageRecord, XdpAction},
    state::{Instance, ProgState},
    store::Generation,
    tailcall,
    tally::{self, Tally},
};

/// How the next generation is built beside the live one.
pub enum Build<'a> {
    /// From a plan: new stages loaded (`keep`: the maps they take over from
    /// the stage they replace), unchanged ones reused.
    Plan {
        plan: &'a Plan,
        final_verdict: XdpAction,
        keep: &'a mut BTreeMap<u32, MapReuse>,
    },
    /// The generation [`Linker::restore`] found intact (a rollback).
    Restored,
}

/// A slot of the live generation as the kernel holds it.
#[derive(Debug, Default)]
pub struct SlotKernel {
    pub prog: Option<ProgState>,
    /// freplace: the link of the stage's extension.
    pub link_id: Option<u32>,
    /// tail-call: the instance kept for the other parity.
    pub twin_id: Option<u32>,
    pub pin_path: Option<PathBuf>,
    pub instances: Vec<Instance>,
    /// Whether the slot's counters see its verdicts.
    pub counted: bool,
}

/// One rootlet's backend: its live generation and, during a change, the
/// one built beside it. At most one generation is built at a time; the
/// driver calls, in order, [`Linker::build`], [`Linker::swap`], then
/// [`Linker::release`], or [`Linker::abandon`] if anything before the swap
/// failed.
pub trait Linker: Send + fmt::Debug {
    /// The live generation's number.
    fn generation(&self) -> u64;

    /// The rootlet program the hook's link runs.
    fn rootlet(&self) -> BorrowedFd<'_>;

    /// The running program of `slot`, if it has one.
    fn stage_prog(&self, slot: u32) -> Option<BorrowedFd<'_>>;

    /// Stack bytes the rootlet's frame holds below a stage (what a stage
    /// object is checked against).
    fn rootlet_stack(&self) -> u32;

    /// Whether a committed change keeps the generation it replaced, ready
    /// for [`Linker::restore`].
    fn keeps_previous(&self) -> bool;

    /// Every slot's counts now, before `next` is built: where `next`'s new
    /// stages start counting. May record in `tally` (stored with the
    /// pending generation) the epoch `next` opens.
    fn counts_before(
        &self,
        ctx: &Ctx,
        key: RootletKey,
        next: &Generation,
        tally: &mut Tally,
    ) -> Result<tally::Slots>;

    /// Builds `next` beside the live generation; nothing is visible to
    /// packets until [`Linker::swap`].
    fn build(
        &mut self,
        ctx: &Ctx,
        key: RootletKey,
        next: &Generation,
        how: Build<'_>,
    ) -> Result<()>;

    /// Readies `next`, which runs the previous generation's pipeline, to be
    /// swapped in from what the backend kept of it (then built with
    /// [`Build::Restored`]).
    ///
    /// # Errors
    /// `Error::NoRollback` where nothing of it is kept.
    fn restore(&mut self, key: RootletKey, next: &Generation) -> Result<()>;

    /// Makes the built generation `next` live in one kernel operation
    /// (through `link` where the backend replaces the hook's program).
    fn swap(&mut self, link: &hook::Link, next: &Generation) -> Result<()>;

    /// Drops what was built after a failure before the swap; the live
    /// generation, `committed`, stays.
    fn abandon(&mut self, ctx: &Ctx, key: RootletKey, committed: &Generation);

    /// At adoption, after a crash before the swap of a pending generation:
    /// lets go of whatever of it was built beside the live one, which no
    /// record accounts for any more (no rollback returns to it). Nothing
    /// packets run changes. A backend that builds nothing the live
    /// generation's pins or the dead process did not hold has nothing to do.
    fn discard_unswapped(&mut self, _ctx: &Ctx, _key: RootletKey) -> Result<()> {
        Ok(())
    }

    /// After the swap to `next` is committed: lets go of what only the
    /// generation it replaced needed.
    fn release(&mut self, ctx: &Ctx, key: RootletKey, next: &Generation);

    /// Every slot's counts and the final verdict's count, for a state.
    fn counts(&self, ctx: &Ctx, key: RootletKey, tally: &Tally) -> Result<(tally::Slots, u64)>;

    /// The kernel's side of `stage`'s slot in the live generation.
    fn slot(&self, ctx: &Ctx, key: RootletKey, stage: &StageRecord) -> Result<SlotKernel>;
}

/// Creates the first generation, `first` (no stages), of a rootlet of
/// backend `kind`, ready to be attached.
pub fn create(
    kind: Backend,
    ctx: &Ctx,
    key: RootletKey,
    first: &Generation,
    final_verdict: XdpAction,
) -> Result<Box<dyn Linker>> {
    Ok(match kind {
        Backend::Freplace => Box::new(freplace::Freplace::create(ctx, key, first, final_verdict)?),
        Backend::TailCall => Box::new(tailcall::TailCall::create(ctx, key, first, final_verdict)?),
    })
}

/// Opens the live generation of a rootlet of backend `kind` from its pins
/// after a restart: one of `generations` (the committed one and the pending
/// one), as the kernel runs it; `link_prog` is the program its link runs,
/// if the link is there. None when the kernel runs no generation of ours.
pub fn adopt(
    kind: Backend,
    ctx: &Ctx,
    key: RootletKey,
    link_prog: Option<u32>,
    generations: &[&Generation],
) -> Result<Option<Box<dyn Linker>>> {
    Ok(match kind {
        Backend::Freplace => match link_prog {
            Some(id) => freplace::adopt(ctx, key, id, generations)?
                .map(|live| Box::new(freplace::Freplace::adopted(live)) as Box<dyn Linker>),
            None => None,
        },
        Backend::TailCall => tailcall::adopt(ctx, key, generations)?
            .map(|live| Box::new(tailcall::TailCall::adopted(live)) as Box<dyn Linker>),
    })
}

/// Where the rootlet program of generation `number` is pinned, for a
/// rootlet whose backend could not be adopted.
pub fn rootlet_pin(kind: Backend, layout: &Layout, key: RootletKey, number: u64) -> PathBuf {
    match kind {
        Backend::Freplace => layout.gen_rootlet(key, number),
        Backend::TailCall => layout.chain_obj(key, "rootlet"),
    }
}

/// An internal error: the driver called a backend out of order.
pub(crate) fn out_of_order(what: &str) -> crate::Error {
    crate::Error::Load {
        what: "generation".into(),
        message: format!("{what} out of order (nothing built)"),
    }
}

/// Programs by slot.
pub type Progs = BTreeMap<u32, OwnedFd>;
