//! rootletd's footprint in glibc's allocator: fewer arenas, and the heap
//! handed back to the kernel after the work that inflates it.
//!
//! Every program load parses the kernel's BTF (aya 0.14's `EbpfLoader::new`
//! reads /sys/kernel/btf/vmlinux: some 150k small allocations, freed at
//! the end of the load), and glibc keeps what a thread frees in that
//! thread's arena. Without a trim an idle agent holds the high-water mark
//! of its last changes. The only unsafe code of the crate: three glibc calls.

/// glibc malloc arenas: by default up to 8 per core, one per thread that
/// allocates. rootletd is not allocation-bound: one arena, shared. One,
/// not two: memory freed in a second arena (the loader thread's BTF parses,
/// `dataplane/src/warm.rs`) stayed resident through `malloc_trim`, 16 MiB
/// of it with six loaders made ahead, while the main arena's trim returns
/// it (measured: idle VmRSS 36.0 MiB with two arenas, 19.7 MiB with one).
const MALLOC_ARENAS: i32 = 1;

/// Caps glibc's malloc arenas at [`MALLOC_ARENAS`], unless the operator set
/// `MALLOC_ARENA_MAX` (which glibc has read already). Call before any
/// other thread exists.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets a malloc tunable, and this runs before
        // any other thread that could be allocating exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
        }
    }
}

/// Returns the free memory of every arena to the kernel. Takes the arenas'
/// locks for a moment: call it off the path of a reply (after startup,
/// after a change has answered).
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim is thread-safe (it locks each arena it trims) and
    // touches only memory the allocator already considers free.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The heap as glibc accounts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heap {
    /// Allocated and not freed: the main heap's and the mmap'd chunks'.
    pub in_use: u64,
    /// Freed but still held by the heap.
    pub free: u64,
}

/// The heap now (None where the C library is not glibc). `mallinfo2`
/// walks every arena's free lists under their locks: cheap for rootletd's
/// one arena, and called only when metrics are scraped.
pub fn heap() -> Option<Heap> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's statistics (taking
        // each arena's lock) and returns them by value.
        let m = unsafe { libc::mallinfo2() };
        Some(Heap {
            in_use: (m.uordblks + m.hblkhd) as u64,
            free: m.fordblks as u64,
        })
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    None
}

/// How long after the last change the heap is trimmed.
const IDLE: std::time::Duration = std::time::Duration::from_secs(1);

/// Changes so far, to tell whether another came during the idle wait.
static CHANGES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// After a change: [`trim`] once no other change has come for [`IDLE`], so
/// that a burst of changes does not wait for the arenas' locks. Call from
/// the async runtime.
pub fn trim_when_idle() {
    use std::sync::atomic::Ordering;
    let n = CHANGES.fetch_add(1, Ordering::Relaxed) + 1;
    drop(tokio::spawn(async move {
        tokio::time::sleep(IDLE).await;
        if CHANGES.load(Ordering::Relaxed) == n {
            let _ = tokio::task::spawn_blocking(trim).await;
        }
    }));
}
