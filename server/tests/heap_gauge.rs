//! The heap gauges (`rootlet_heap_in_use_bytes`, `rootlet_heap_free_bytes`)
//! read glibc's process-wide counts, so this test has a binary of its own:
//! in the library's test binary, other tests allocating at the same moment
//! (a TLS client's root store is about a megabyte) hid the 8 MiB it holds.
#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failure is the test failing"
)]

use rootlet_server::metrics::Metrics;

fn lines(text: &str, prefix: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .map(str::to_owned)
        .collect()
}

/// The heap gauge counts what is allocated and not freed: 8 MiB held
/// show in it (in whole, as glibc mmaps a block that large), and go
/// when freed.
#[test]
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn the_heap_gauges_count_what_is_allocated_and_not_freed() {
    let in_use = |text: &str| -> i64 {
        lines(text, "rootlet_heap_in_use_bytes ")
            .first()
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or_else(|| panic!("no rootlet_heap_in_use_bytes in {text}"))
    };
    let m = Metrics::new();
    // The gauge is process-wide: this test has its binary to itself
    // (no other test allocates meanwhile); a few tries all the same.
    let mut seen = vec![];
    for _ in 0..5 {
        let before = in_use(&m.encode());
        let held = vec![1u8; 8 << 20];
        let during = in_use(&m.encode());
        assert_eq!(std::hint::black_box(&held).len(), 8 << 20);
        drop(held);
        let after = in_use(&m.encode());
        if during - before >= 8 << 20 && during - after >= 8 << 20 {
            assert_eq!(
                lines(&m.encode(), "# TYPE rootlet_heap_free_bytes gauge").len(),
                1
            );
            return;
        }
        seen.push((before, during, after));
    }
    panic!("8 MiB held never showed in the gauge: {seen:?}");
}
