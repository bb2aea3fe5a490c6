#!/usr/bin/env bash
# The whole test suite, on a fresh machine too: installs what it needs, checks
# formatting and lints, runs every test natively (this kernel: tail-call
# backend), then runs the data-plane and agent suites again inside Debian's
# 6.12 and 6.1 kernels booted under qemu (the VM tier), where freplace is
# permitted, with each backend.
#
#   ROOTLET_EXPECT_EXT   what the probe must find on this host: "refused"
#                        (default: this sandbox forbids BPF_PROG_TYPE_EXT) or
#                        "permitted" on hosts that allow freplace.
#   ROOTLET_SKIP_VM=1    skip the VM tier (says so loudly; CI never sets it).
#   ROOTLET_VM_MATRIX    the VM tier's KERNEL:BACKEND cells (default: 6.12 and
#                        6.1, each with freplace and tailcall).
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
export CARGO_TERM_COLOR=never

scripts/install-deps.sh

echo "== checks: rustfmt, clippy"
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== native tier: kernel $(uname -r), tail-call backend"
ROOTLET_TEST_BACKEND=tailcall ROOTLET_EXPECT_EXT="${ROOTLET_EXPECT_EXT:-refused}" \
    cargo test --workspace --locked

if [ "${ROOTLET_SKIP_VM:-0}" = 1 ]; then
    echo "!! VM tier SKIPPED (ROOTLET_SKIP_VM=1): freplace was not tested"
    exit 0
fi

echo "== VM tier: Debian kernels under qemu (TCG)"
# The suites that exercise the kernel: the data plane, and the agent over it.
vm_tests=$(cargo test -p rootlet-integration-tests --test dataplane --test agent --locked --no-run --message-format=json 2>/dev/null |
    python3 -c 'import sys, json
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in ("dataplane", "agent"):
        print(m["executable"])')
[ "$(echo "$vm_tests" | wc -l)" = 2 ] || { echo "cannot find the dataplane and agent test binaries" >&2; exit 1; }
cargo build -p rootlet-integration-tests -p rootlet-server --bins --locked
run=""
for t in $vm_tests; do run="$run${run:+ && }$t --test-threads=2"; done
# The kernel matrix (#21): each guest kernel CI supports, with each backend.
# ROOTLET_VM_MATRIX: space-separated KERNEL:BACKEND (KERNEL: a /boot/vmlinuz-
# prefix that names one series; the newest installed image of it is used).
for cell in ${ROOTLET_VM_MATRIX:-6.12:freplace 6.12:tailcall 6.1:freplace 6.1:tailcall}; do
    series="${cell%%:*}" backend="${cell#*:}"
    kernel="$(ls -1 /boot/vmlinuz-"$series"[.-]* 2>/dev/null | sort -V | tail -n 1 || true)"
    [ -n "$kernel" ] || { echo "no /boot/vmlinuz-$series* (scripts/install-deps.sh installs it)" >&2; exit 1; }
    echo "== VM tier: $(basename "$kernel"), $backend backend"
    scripts/vm-run --kernel "$kernel" --env ROOTLET_TEST_BACKEND="$backend" --env ROOTLET_EXPECT_EXT=permitted \
        --env RUST_BACKTRACE=1 -- "$run"
done

echo "== all tiers passed in $(( $(date +%s) - started )) s"
