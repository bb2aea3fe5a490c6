#!/usr/bin/env bash
# The main demo, end to end: installs what it needs, builds, and runs the
# three-stage pipeline on a veth pair with real traffic and a live stage
# replacement. The backend is chosen by probing the kernel (freplace where
# permitted, else tail calls); ROOTLET_DEMO_BACKEND forces one.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release --locked -p rootlet-integration-tests --bin rootlet-demo
exec target/release/rootlet-demo --backend "${ROOTLET_DEMO_BACKEND:-auto}"
