#!/usr/bin/env bash
# The whole test suite, on a fresh machine too: installs what it needs, checks
# formatting and lints, runs every test natively (this kernel: tail-call
# backend), then runs the data-plane suite again inside a Debian 6.12 kernel
# booted under qemu (the VM tier), where freplace is permitted.
#
#   ROOTLET_EXPECT_EXT   what the probe must find on this host: "refused"
#                        (default: this sandbox forbids BPF_PROG_TYPE_EXT) or
#                        "permitted" on hosts that allow freplace.
#   ROOTLET_SKIP_VM=1    skip the VM tier (says so loudly; CI never sets it).
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

echo "== VM tier: a guest that dies fails the run, once, with its console"
# scripts/vm-run never reruns a guest that died: a kernel oops that the code
# under test triggers now and then must fail CI, not go green on a retry.
panic_log=$(mktemp)
vm_started=$(date +%s)
set +e
scripts/vm-run -- 'echo c > /proc/sysrq-trigger' >"$panic_log" 2>&1
panic_rc=$?
set -e
if [ "$panic_rc" != 255 ] || ! grep -q "Kernel panic - not syncing: sysrq triggered crash" "$panic_log" ||
    [ "$(grep -c "the guest died without an exit status (255); not retried" "$panic_log")" != 1 ]; then
    cat "$panic_log" >&2
    echo "vm-run did not fail a dying guest cleanly (exit $panic_rc)" >&2
    exit 1
fi
rm -f "$panic_log"
echo "ok: exit 255, one boot, the panic shown ($(( $(date +%s) - vm_started )) s)"

echo "== VM tier: Debian 6.12 kernel under qemu (TCG), freplace backend"
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
scripts/vm-run --env ROOTLET_TEST_BACKEND=freplace --env ROOTLET_EXPECT_EXT=permitted \
    --env RUST_BACKTRACE=1 -- "$run"

echo "== all tiers passed in $(( $(date +%s) - started )) s"
