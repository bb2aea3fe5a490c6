#!/usr/bin/env bash
# The main demo, end to end (as root): installs what it needs, builds, then
#  1. the data plane alone: the three-stage pipeline (sampler, ddos, l4lb) on
#     a veth pair with real traffic (drops, XDP_TX rewrites), the state read
#     back from the kernel, and a live replacement with no packet lost;
#  2. the product: rootletd managing a veth pair in its own namespace, driven
#     only through rootletctl: the signed sample bundle applied, traffic,
#     state and counters, the ddos blocklist pushed as a signed policy (its
#     drops in status), a bad policy that blocks everything rolled back by
#     the canary's drop-rate gate, a new version applied live, and rolled
#     back.
# The backend is chosen by probing the kernel (freplace where permitted,
# else tail calls); ROOTLET_DEMO_BACKEND=freplace|tailcall forces one.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release --locked -p rootlet-integration-tests -p rootlet-server -p rootlet-client --bins
export ROOTLET_TEST_BACKEND="${ROOTLET_DEMO_BACKEND:-auto}"
echo "=== 1. the data plane"
target/release/rootlet-demo
echo
echo "=== 2. rootletd + rootletctl"
exec target/release/rootlet-agent-demo
