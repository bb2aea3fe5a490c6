//! The transaction driver: the order of the steps of every change to a
//! rootlet, whatever its backend ([`Linker`]) and hook ([`Hook`]). It owns
//! the crash points ([`crash::Step`]), the store records (pending, then
//! committed, and the previous generation a backend keeps), the failure
//! handling and the timing of each step ([`budget`]).
//!
//! A change to generation N+1 is: checks, planning, map reuse and the
//! counts it starts from; the pending record (`StorePending`); the build
//! beside generation N; the swap (`Swapped`); the committed record
//! (`StoreCommitted`); the release of what only N needed (`Released`).
//! Anything that fails before the swap drops what was built and clears the
//! pending record: the interface keeps generation N. After a crash,
//! adoption ([`settle`], from [`super::Dataplane::open`]) decides from the
//! kernel whether the pending generation became live.
//!
//! An unload is: its guard passed under the lock, nothing written
//! (`UnloadBegun`); the record marked `unloading` (`UnloadMarked`); the
//! detach (`UnloadDetached`); the pins removed (`UnloadPinsRemoved`); the
//! record deleted. After a crash past the marker, adoption finishes it
//! ([`finish_unload`]).

use std::{collections::BTreeMap, os::fd::AsFd, path::Path};

use super::{
    Ctx, Rootlet,
    backend::{self, Build, Linker},
    budget::{self, Step},
    crash,
    error::{Error, Result},
    hook::{self, Hook},
    loader::MapReuse,
    object, pins, prog_maps,
    spec::{self, Change, Pipeline, Plan, Source},
    store::{Generation, RootletRecord, Store},
    sys, tally,
};

/// Loads a rootlet whose `record` holds its first generation as pending:
/// creates that generation, attaches it at `hook` and pins the link. On
/// failure nothing of it remains, not even the record.
pub(crate) fn load(
    ctx: &Ctx,
    store: &Store,
    mut record: RootletRecord,
    hook: &dyn Hook,
    netns: Option<&Path>,
) -> Result<Rootlet> {
    let key = record.key;
    let first = record
        .pending
        .clone()
        .ok_or_else(|| backend::out_of_order("load"))?;
    store.put(&record)?;
    crash::point(ctx.crash_at, crash::Step::StorePending);

    let attempt = (|| -> Result<_> {
        let live = backend::create(record.backend, ctx, key, &first, record.spec.final_verdict)?;
        let (link, mode) = hook.attach(netns, live.rootlet(), key.ifindex)?;
        let path = ctx.layout.link(key);
        sys::obj_pin(link.as_fd(), &path).map_err(|e| Error::Pin {
            what: hook.name(),
            path,
            source: e.source,
        })?;
        Ok((hook::Link::new(link, hook), live, mode))
    })();
    let (link, live, mode) = match attempt {
        Ok(ok) => ok,
        Err(e) => {
            let _ = pins::remove(&ctx.layout.rootlet_dir(key));
            store.delete(key)?;
            return Err(e);
        }
    };
    crash::point(ctx.crash_at, crash::Step::Swapped);
    record.attached_mode = mode;
    record.committed = first;
    record.pending = None;
    store.put(&record)?;
    crash::point(ctx.crash_at, crash::Step::StoreCommitted);
    Ok(Rootlet {
        record,
        link: Some(link),
        live: Some(live),
        drift: None,
    })
}

/// After a restart: finishes or forgets the change a crash interrupted,
/// from the generation the kernel runs (`live`).
pub(crate) fn settle(
    ctx: &Ctx,
    store: &Store,
    record: &mut RootletRecord,
    live: &mut dyn Linker,
) -> Result<()> {
    let key = record.key;
    let Some(pending) = record.pending.take() else {
        return Ok(());
    };
    if pending.number == live.generation() {
        tracing::info!(%key, generation = pending.number, "a change interrupted after its swap: committing it");
        let old = std::mem::replace(&mut record.committed, pending);
        record.previous = live.keeps_previous().then_some(old);
    } else {
        tracing::info!(%key, generation = pending.number, "a change interrupted before its swap: dropping it");
        // The inactive parity may be half rewritten: what it holds of the
        // dropped generation goes, and no rollback returns to it.
        record.previous = None;
        live.discard_unswapped(ctx, key)?;
    }
    store.put(record)
}

/// Applies `changes` as one new generation (see [`super::Dataplane::apply`]).
pub(crate) fn apply(
    ctx: &Ctx,
    store: &Store,
    r: &mut Rootlet,
    changes: &[Change],
    expected_generation: Option<u64>,
) -> Result<u64> {
    let _timed = budget::begin();
    let key = r.record.key;
    if let Some(drift) = budget::time(Step::Drift, || r.check_drift(&ctx.layout)) {
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
    let no_live = || Error::Drifted {
        key,
        reason: "no live generation".into(),
    };

    let rootlet_stack = r.live.as_ref().ok_or_else(no_live)?.rootlet_stack();
    let mut inspected = BTreeMap::new();
    let check = budget::span();
    for change in changes {
        if let Change::Link(spec) | Change::Replace(spec) = change {
            let obj =
                object::inspect(&spec.object, &spec.program, rootlet_stack).map_err(|source| {
                    Error::Check {
                        stage: spec.name.clone(),
                        source,
                    }
                })?;
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

    let live = r.live.as_deref().ok_or_else(no_live)?;
    planning.end(Step::Plan);
    let reusing = budget::span();
    let mut keep = kept_maps(ctx, live, &plan, &inspected)?;
    reusing.end(Step::MapReuse);
    let counting = budget::span();

    let mut next = Generation {
        number: current + 1,
        pipeline: plan.pipeline.clone(),
    };
    // Stored with the pending generation, before it can run.
    let counts_now = live.counts_before(ctx, key, &next, &mut r.record.tally)?;
    stamp(&mut next, &base, &plan, &counts_now);
    counting.end(Step::Plan);
    let final_verdict = r.record.spec.final_verdict;
    run(
        ctx,
        store,
        r,
        next,
        Build::Plan {
            plan: &plan,
            final_verdict,
            keep: &mut keep,
        },
    )
}

/// Returns to the previous generation, as a new generation, from what the
/// backend kept of it (see [`super::Dataplane::rollback_guarded`]): drift,
/// then `expected_generation`, then what is kept, then `guard` on the
/// committed and the previous pipeline; nothing is written before all of
/// them pass. Returns the new generation and the one it restores.
pub(crate) fn rollback<E: From<Error>>(
    ctx: &Ctx,
    store: &Store,
    r: &mut Rootlet,
    expected_generation: Option<u64>,
    guard: impl FnOnce(&Pipeline, &Pipeline) -> std::result::Result<(), E>,
) -> std::result::Result<(u64, u64), E> {
    let key = r.record.key;
    if let Some(drift) = r.check_drift(&ctx.layout) {
        r.drift = Some(drift.clone());
        return Err(Error::Drifted { key, reason: drift }.into());
    }
    let current = r.record.committed.number;
    if let Some(expected) = expected_generation
        && expected != current
    {
        return Err(Error::VersionMismatch {
            key,
            expected,
            current,
        }
        .into());
    }
    let live = r.live.as_deref_mut().ok_or_else(|| Error::Drifted {
        key,
        reason: "no live generation".into(),
    })?;
    if !live.keeps_previous() {
        // The backend says why it has nothing to return to.
        live.restore(key, &r.record.committed)?;
        return Err(backend::out_of_order("a rollback where nothing is kept").into());
    }
    let previous = r.record.previous.clone().ok_or(Error::NoRollback {
        key,
        reason: "no previous generation is kept (none yet, or the last change failed)",
    })?;
    guard(&r.record.committed.pipeline, &previous.pipeline)?;
    let next = Generation {
        number: current + 1,
        pipeline: previous.pipeline,
    };
    debug_assert_eq!(next.number % 2, previous.number % 2, "same parity");
    live.restore(key, &next)?;
    let number = run(ctx, store, r, next, Build::Restored)?;
    tracing::info!(%key, generation = number, restored = previous.number, "rolled back to the previous generation");
    Ok((number, previous.number))
}

/// Detaches the rootlet and removes every pin and the record of it; works
/// on drifted rootlets too (a drifted link is not detached: it may run
/// another tool's program now).
///
/// The intent is recorded first: the record marked `unloading`
/// (`UnloadMarked`), so that a crash at any later step leaves a record
/// that adoption finishes ([`finish_unload`]); a crash before it
/// (`UnloadBegun`) leaves the whole rootlet.
pub(crate) fn unload(ctx: &Ctx, store: &Store, r: &mut Rootlet) -> Result<()> {
    crash::point(ctx.crash_at, crash::Step::UnloadBegun);
    r.record.unloading = true;
    if let Err(e) = store.put(&r.record) {
        r.record.unloading = false;
        return Err(e);
    }
    crash::point(ctx.crash_at, crash::Step::UnloadMarked);
    finish_unload(ctx, store, r)
}

/// The steps of an unload after its marker: detach (only a link that still
/// runs this rootlet), `UnloadDetached`, remove the pins,
/// `UnloadPinsRemoved`, delete the record. Each step is idempotent, so
/// adoption runs them again after a crash between them.
pub(crate) fn finish_unload(ctx: &Ctx, store: &Store, r: &mut Rootlet) -> Result<()> {
    let key = r.record.key;
    // The drift rule, against the kernel now: a link that runs another
    // program (another tool's, through our pin) is left on its interface.
    if let Some(drift) = r.check_drift(&ctx.layout) {
        r.drift = Some(drift);
    }
    if let Some(link) = &r.link
        && r.drift.is_none()
    {
        link.detach()?;
    }
    crash::point(ctx.crash_at, crash::Step::UnloadDetached);
    r.live = None;
    r.link = None;
    pins::remove(&ctx.layout.rootlet_dir(key)).map_err(|source| Error::Pin {
        what: "rootlet directory",
        path: ctx.layout.rootlet_dir(key),
        source,
    })?;
    crash::point(ctx.crash_at, crash::Step::UnloadPinsRemoved);
    store.delete(key)?;
    Ok(())
}

/// The steps every change shares, from the pending record to the release:
/// builds `next` the way `how` says, swaps it in and commits it.
fn run(ctx: &Ctx, store: &Store, r: &mut Rootlet, next: Generation, how: Build<'_>) -> Result<u64> {
    let key = r.record.key;
    r.record.pending = Some(next.clone());
    store.put(&r.record)?;
    crash::point(ctx.crash_at, crash::Step::StorePending);

    let (Some(live), Some(link)) = (r.live.as_deref_mut(), r.link.as_ref()) else {
        return fail(
            ctx,
            store,
            r,
            Error::Drifted {
                key,
                reason: "no live generation".into(),
            },
        );
    };
    let swapped = budget::time(Step::Build, || live.build(ctx, key, &next, how))
        .and_then(|()| budget::time(Step::Swap, || live.swap(link, &next)));
    if let Err(e) = swapped {
        live.abandon(ctx, key, &r.record.committed);
        return fail(ctx, store, r, e);
    }
    crash::point(ctx.crash_at, crash::Step::Swapped);

    let keeps_previous = live.keeps_previous();
    let before = std::mem::replace(&mut r.record.committed, next.clone());
    r.record.previous = keeps_previous.then_some(before);
    r.record.pending = None;
    store.put(&r.record)?;
    crash::point(ctx.crash_at, crash::Step::StoreCommitted);
    if let Some(live) = r.live.as_deref_mut() {
        budget::time(Step::Release, || live.release(ctx, key, &next));
    }
    crash::point(ctx.crash_at, crash::Step::Released);
    tracing::info!(%key, generation = next.number, stages = next.pipeline.stages.len(), "applied");
    Ok(next.number)
}

/// A change failed before its swap: the interface keeps the committed
/// generation; the pending record goes, and no previous generation is kept
/// (a failed tail-call build emptied the inactive parity).
fn fail(ctx: &Ctx, store: &Store, r: &mut Rootlet, e: Error) -> Result<u64> {
    let key = r.record.key;
    r.record.pending = None;
    r.record.previous = None;
    if let Err(store_err) = store.put(&r.record) {
        tracing::error!(%key, error = %store_err, "cannot clear the pending generation");
    }
    if let Some(drift) = r.check_drift(&ctx.layout) {
        r.drift = Some(drift);
    }
    Err(e)
}

/// The maps each `keep` stage of `plan` takes over from the stage running
/// in its slot, checked against what the new object declares.
fn kept_maps(
    ctx: &Ctx,
    live: &dyn Linker,
    plan: &Plan,
    inspected: &BTreeMap<String, object::StageObject>,
) -> Result<BTreeMap<u32, MapReuse>> {
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
        // A kept policy map keeps its inner map: the new object must
        // describe the same one.
        crate::policy::check_keep_inner(&spec.name, &spec.object, &running_maps)?;
        // And every kept map must mean the same: its BTF types.
        crate::policy::check_keep_types(&spec.name, &spec.object, running)?;
        let mut reuse = MapReuse::new(&ctx.layout)?;
        for def in &new.maps {
            if let Some(fd) = running_maps.get(object::truncate(&def.name)) {
                reuse.add(&def.name, fd.as_fd())?;
            }
        }
        keep.insert(*slot, reuse);
    }
    Ok(keep)
}

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
