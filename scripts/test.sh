#!/usr/bin/env bash
# The whole test suite, on a fresh machine too: installs what it needs, checks
# formatting and lints, runs every test natively (this kernel: tail-call
# backend), then runs the data-plane, agent and policy suites (and the crash
# suite where a cell names it) again inside Debian's
# 6.12 and 6.1 kernels booted under qemu (the VM tier), where freplace is
# permitted, with each backend.
#
#   ROOTLET_EXPECT_EXT   what the probe must find on this host: "refused"
#                        (default: this sandbox forbids BPF_PROG_TYPE_EXT) or
#                        "permitted" on hosts that allow freplace.
#   ROOTLET_SKIP_VM=1    skip the VM tier (says so loudly; CI never sets it).
#   ROOTLET_VM_JOBS      VM cells run at once (default 2: one vCPU each).
#   ROOTLET_VM_MATRIX    the VM tier's KERNEL:BACKEND[:SUITES] cells (default:
#                        6.12 and 6.1, each with freplace and tailcall, and
#                        the crash suite on 6.12 with freplace; the agent
#                        suite runs in the 6.12 freplace cell; see below).
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
export CARGO_TERM_COLOR=never

scripts/install-deps.sh

echo "== checks: rustfmt, clippy"
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
scripts/check-layers.sh
echo "== checks passed ($(( $(date +%s) - started )) s since the start)"

echo "== native tier: kernel $(uname -r), tail-call backend"
ROOTLET_TEST_BACKEND=tailcall ROOTLET_EXPECT_EXT="${ROOTLET_EXPECT_EXT:-refused}" \
    cargo test --workspace --locked
echo "== native tier passed ($(( $(date +%s) - started )) s since the start)"

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

echo "== VM tier: Debian kernels under qemu (TCG)"
# The suites that exercise the kernel: the data plane, the agent over it,
# and policies through the agent.
# The native tier's own build, not a new one: `cargo test -p` (or `cargo
# build --bins`) unifies features over fewer packages, so it would compile the
# server, client and test crates a second time, with their ~12 executables
# (minutes of linking, GBs of disk). The bins the suites start (rootletd) are
# the ones `cargo test --workspace` put in target/debug.
vm_tests=$(cargo test --workspace --locked --no-run --message-format=json 2>/dev/null |
    python3 -c 'import sys, json
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "rootlet-integration-tests" in m["package_id"] \
            and m["target"]["kind"] == ["test"] and m["target"]["name"] in ("dataplane", "agent", "policy", "crash"):
        print(m["target"]["name"] + "=" + m["executable"])')
[ "$(echo "$vm_tests" | wc -l)" = 4 ] || { echo "cannot find the dataplane, agent, policy and crash test binaries" >&2; exit 1; }
[ -x target/debug/rootletd ] || { echo "target/debug/rootletd is missing after the workspace build" >&2; exit 1; }
# The guest's command for a comma-separated list of suites: every suite runs
# even when one fails; the guest exits non-zero if any did.
# The crash sweeps in a guest (the crash suite, and the agent suite's sweep
# of an apply): the two sides of the data plane's swap point (built:
# everything of the new generation built, nothing live; swapped: just after
# BPF_LINK_UPDATE or the generation flip) and the policy's swap; what the
# backend does there is what this tier is for. The agent's own steps
# (rootlet-loaded, bundle-*, policy-pending) and the points inside a build
# sit above the backend trait and run, with every other point, in the
# native tier.
crash_vm_steps=built,swapped,policy-swapped
guest_run() {
    local run="rc=0" suite t found
    for suite in ${1//,/ }; do
        found=""
        for t in $vm_tests; do
            [ "${t%%=*}" = "$suite" ] && found="${t#*=}"
        done
        [ -n "$found" ] || { echo "no VM suite named $suite (dataplane, agent, policy, crash)" >&2; return 1; }
        # The crash suite sends fewer packets in a guest (20-35x slower),
        # judged by what the data plane counted all the same, and sweeps the
        # crash points on either side of each swap point (every point runs
        # in the native tier).
        [ "$suite" = crash ] && found="ROOTLET_CRASH_PPS=100 ROOTLET_CRASH_STEPS=$crash_vm_steps $found"
        # The agent suite's crash sweep of an apply, likewise (every point
        # runs natively).
        [ "$suite" = agent ] && found="ROOTLET_CRASH_STEPS=$crash_vm_steps $found"
        run="$run; $found --test-threads=2 || rc=1"
    done
    echo "$run; exit \$rc"
}
# The kernel matrix (#21): each guest kernel CI supports, with each backend.
# ROOTLET_VM_MATRIX: space-separated KERNEL:BACKEND[:SUITES] (KERNEL: a
# /boot/vmlinuz- prefix that names one series, the newest installed image of
# it is used; SUITES: comma-separated, default dataplane,agent,policy).
# The crash suite has a cell of its own (6.12, freplace: the backend the
# native tier cannot run), sweeping $crash_vm_steps; about 17 min there
# (two rootletd starts per crash point, 15 points; see docs/VM-TIER.md).
# The agent suite runs in a guest once, on 6.12 with freplace: it drives
# the agent, which sits above the backend trait, and runs natively with the
# tail-call backend; what differs on 6.1 (its verifier, no tcx) is what the
# data-plane suite loads and probes. So 6.1 runs the data-plane and policy
# suites with freplace, and the data-plane suite with the tail-call
# backend; 6.12 runs the data-plane and policy suites with the tail-call
# backend. Each suite each kernel runs keeps its full test list; what is
# left out is a repeat of a layer above the kernel, which is what keeps the
# tier within CI's 60 minutes (the agent suite was 60-70% of a freplace
# cell, about 17 min on CI's machine).
# Cells run two at a time (ROOTLET_VM_JOBS), in this order, which balances
# the two slots (6.12 freplace, then the crash cell; each slot takes the
# next cell as it frees): a guest has one vCPU, so two guests use the two
# cores of a CI machine; each cell's output is printed whole when it ends,
# and every cell runs even when one fails.
cells=(${ROOTLET_VM_MATRIX:-6.12:freplace 6.12:freplace:crash 6.1:freplace:dataplane,policy 6.12:tailcall:dataplane,policy 6.1:tailcall:dataplane})
vm_logs=$(mktemp -d)
run_cell() {
    local i="$1" cell="$2" series backend suites kernel t0 run
    series="${cell%%:*}" backend="${cell#*:}" suites="dataplane,agent,policy"
    case "$backend" in *:*) suites="${backend#*:}" backend="${backend%%:*}" ;; esac
    if ! run="$(guest_run "$suites" 2>&1)"; then
        echo "$run" >"$vm_logs/$i.log"
        echo 1 >"$vm_logs/$i.rc"
        return
    fi
    kernel="$(ls -1 /boot/vmlinuz-"$series"[.-]* 2>/dev/null | sort -V | tail -n 1 || true)"
    if [ -z "$kernel" ]; then
        echo "no /boot/vmlinuz-$series* (scripts/install-deps.sh installs it)" >"$vm_logs/$i.log"
        echo 1 >"$vm_logs/$i.rc"
        return
    fi
    echo "$(basename "$kernel"), $backend backend, suites $suites" >"$vm_logs/$i.name"
    t0=$(date +%s)
    set +e
    # A cell's whole run, boot included, is bounded (vm-run's own default,
    # 1500 s, is for one command; a freplace cell takes about 25 min).
    ROOTLET_VM_TIMEOUT="${ROOTLET_VM_TIMEOUT:-2700}" scripts/vm-run --kernel "$kernel" --env ROOTLET_TEST_BACKEND="$backend" --env ROOTLET_EXPECT_EXT=permitted \
        --env RUST_BACKTRACE=1 -- "$run" >"$vm_logs/$i.log" 2>&1
    echo $? >"$vm_logs/$i.rc"
    echo $(( $(date +%s) - t0 )) >"$vm_logs/$i.secs"
}
for i in "${!cells[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "${ROOTLET_VM_JOBS:-2}" ]; do wait -n || true; done
    echo "-- VM tier: starting cell ${cells[$i]}"
    run_cell "$i" "${cells[$i]}" &
done
wait
vm_failed=""
for i in "${!cells[@]}"; do
    echo "== VM tier: $(cat "$vm_logs/$i.name" 2>/dev/null || echo "${cells[$i]}") ($(cat "$vm_logs/$i.secs" 2>/dev/null || echo '?') s)"
    cat "$vm_logs/$i.log"
    [ "$(cat "$vm_logs/$i.rc" 2>/dev/null)" = 0 ] || vm_failed="$vm_failed ${cells[$i]}"
done
# A summary last, where a reader of CI's tail sees it: each cell's time and
# result, and for a failed cell the failing tests and their panics (the
# whole output is above).
echo "== VM tier summary (native tier and checks passed; $(( $(date +%s) - started )) s so far)"
for i in "${!cells[@]}"; do
    rc="$(cat "$vm_logs/$i.rc" 2>/dev/null || echo '?')"
    echo "-- ${cells[$i]}: $(cat "$vm_logs/$i.secs" 2>/dev/null || echo '?') s, exit $rc"
    grep -E '^test result:|^running [0-9]+ tests' "$vm_logs/$i.log" | sed 's/^/   /' || true
    if [ "$rc" != 0 ]; then
        grep -E ' \.\.\. FAILED$|panicked at|^thread .* panicked|not retried|Kernel panic|timed out|guest killed' "$vm_logs/$i.log" |
            head -n 40 | sed 's/^/   !! /' || true
        grep -A3 -E 'panicked at' "$vm_logs/$i.log" | grep -vE 'panicked at|^--$' | head -n 40 | sed 's/^/      /' || true
    fi
done
rm -rf "$vm_logs"
if [ -n "$vm_failed" ]; then
    echo "== VM tier FAILED in:$vm_failed" >&2
    exit 1
fi

echo "== all tiers passed in $(( $(date +%s) - started )) s"
