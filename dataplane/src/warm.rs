//! aya loaders made before a change needs them.
//!
//! aya 0.14's `EbpfLoader::new()` reads and parses the kernel's BTF
//! (`/sys/kernel/btf/vmlinux`, 5.5 MB, about 50 ms here) on every call, and
//! it has no constructor without that (aya issue #1172; aya 0.15 and later
//! parse lazily, but need Rust 1.98, newer than the toolchain this project
//! builds with). Rootlet sets its own BTF on every load (`loader.rs`: the
//! kernel BTF parsed once per process, only for objects with CO-RE
//! relocations), so that parse is never used: it was 70-85% of a change's
//! time (docs/BENCHMARKS.md). Here it happens on a background thread ahead
//! of time, and the parsed BTF is dropped at once (`btf(None)`), so a
//! waiting loader holds only empty tables. A change takes a waiting loader
//! and the thread makes another. The CPU is still spent, off the path of a
//! change; a burst of changes larger than the pool waits for the parse as
//! before. Remove this module when aya can be upgraded.

use std::sync::{
    Condvar, Mutex, MutexGuard, OnceLock, PoisonError,
    atomic::{AtomicUsize, Ordering},
};

use aya::EbpfLoader;

/// How many loaders wait: set by [`set_depth`] (`Config::warm_loaders`).
static DEPTH: AtomicUsize = AtomicUsize::new(0);

struct Pool {
    ready: Mutex<Vec<EbpfLoader<'static>>>,
    /// Signalled when a loader is taken or the depth changes.
    wanted: Condvar,
}

fn lock<'m>(m: &'m Mutex<Vec<EbpfLoader<'static>>>) -> MutexGuard<'m, Vec<EbpfLoader<'static>>> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A loader with no BTF: what a waiting loader is.
fn fresh() -> EbpfLoader<'static> {
    let mut loader = EbpfLoader::new();
    loader.btf(None);
    loader
}

static POOL: OnceLock<Option<&'static Pool>> = OnceLock::new();

/// Called on the loader thread each time the pool is full again.
static AFTER_REFILL: OnceLock<fn()> = OnceLock::new();

/// Runs `f` on the loader thread each time it has refilled the pool (the
/// parses leave freed memory in the allocator: rootletd trims it here).
pub fn after_refill(f: fn()) {
    let _ = AFTER_REFILL.set(f);
}

/// The pool and its thread, started on first use; None where no thread can
/// be started (every loader is then made when it is needed).
fn pool() -> Option<&'static Pool> {
    *POOL.get_or_init(|| {
        let pool: &'static Pool = Box::leak(Box::new(Pool {
            ready: Mutex::new(vec![]),
            wanted: Condvar::new(),
        }));
        match std::thread::Builder::new()
            .name("rootlet-warm".into())
            .spawn(move || refill(pool))
        {
            Ok(_) => Some(pool),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the loader thread; loaders are made when needed");
                None
            }
        }
    })
}

fn refill(pool: &'static Pool) {
    lower_priority();
    loop {
        {
            let mut ready = lock(&pool.ready);
            while ready.len() >= DEPTH.load(Ordering::Relaxed) {
                ready = pool
                    .wanted
                    .wait(ready)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        }
        // Outside the lock: a change takes a waiting loader meanwhile.
        let loader = fresh();
        let full = {
            let mut ready = lock(&pool.ready);
            ready.push(loader);
            ready.len() >= DEPTH.load(Ordering::Relaxed)
        };
        if full && let Some(f) = AFTER_REFILL.get() {
            f();
        }
    }
}

/// The loader thread yields to everything else the host runs: it works
/// ahead of need, so a change, an RPC or the traffic the host serves must
/// never wait for it (on a host with one busy CPU a refill of the whole
/// pool after a restart is seconds of parsing). Nice 19 applies to this
/// thread alone (Linux: a thread id as PRIO_PROCESS). Where it is refused,
/// the thread runs at the process's priority, as before.
fn lower_priority() {
    if let Err(e) = crate::sys::nice_this_thread(19) {
        tracing::debug!(error = %e, "cannot lower the loader thread's priority");
    }
}

/// Keeps `depth` loaders waiting (0: none, every loader is made when it is
/// needed). Process-wide, like aya's own state.
pub fn set_depth(depth: usize) {
    DEPTH.store(depth, Ordering::Relaxed);
    // Depth 0 starts no thread; a pool already started drops the surplus.
    let pool = if depth > 0 {
        pool()
    } else {
        POOL.get().copied().flatten()
    };
    if let Some(pool) = pool {
        lock(&pool.ready).truncate(depth);
        pool.wanted.notify_one();
    }
}

/// A loader with no BTF and nothing set: a waiting one if there is one.
pub fn take() -> EbpfLoader<'static> {
    if DEPTH.load(Ordering::Relaxed) == 0 {
        return fresh();
    }
    let Some(pool) = pool() else {
        return fresh();
    };
    let taken = lock(&pool.ready).pop();
    pool.wanted.notify_one();
    taken.unwrap_or_else(fresh)
}

/// How many loaders wait now.
pub fn waiting() -> usize {
    POOL.get()
        .copied()
        .flatten()
        .map_or(0, |p| lock(&p.ready).len())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    fn wait_for(n: usize) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if waiting() == n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    #[test]
    fn the_pool_refills_what_is_taken_and_its_loaders_load() {
        set_depth(2);
        assert!(wait_for(2), "the pool did not fill: {}", waiting());
        let mut loader = take();
        assert!(wait_for(2), "the pool did not refill: {}", waiting());
        // A waiting loader is a working one: it loads an object (here a
        // real map-less stage, which needs no kernel BTF) to the point of
        // the program, which it returns unloaded.
        let ebpf = loader.load(rootlet_ebpf::TEST_PASS);
        assert!(
            ebpf.as_ref().is_ok_and(|e| e.programs().count() >= 1),
            "{:?}",
            ebpf.err()
        );
        set_depth(0);
        assert_eq!(waiting(), 0);
    }
}
