#!/usr/bin/env bash
# The layering rule of ARCHITECTURE.md ("Invariants"), checked on the crate
# graph: each crate below must not reach the crates listed for it, through
# any normal or build dependency. `cargo tree` is the source of truth, so a
# new `use` of a forbidden crate fails to compile and a new dependency
# fails here.
set -euo pipefail
cd "$(dirname "$0")/.."

fail=0
forbid() {
    local crate=$1
    shift
    local deps
    deps=$(cargo tree --locked -p "$crate" -e normal,build --prefix none --format '{p}' |
        awk '{print $1}' | sort -u)
    for bad in "$@"; do
        if grep -qx -- "$bad" <<<"$deps"; then
            echo "check-layers: $crate depends on $bad:" >&2
            cargo tree --locked -p "$crate" -e normal,build -i "$bad" >&2 || true
            fail=1
        fi
    done
}

# The vocabulary depends on serde alone.
forbid rootlet-types rootlet-dataplane rootlet-bundle tokio tonic prost aya
# The data plane: no gRPC, no async runtime, no bundle format or signing.
forbid rootlet-dataplane tonic prost tokio hyper rootlet-bundle ed25519-dalek rootlet-proto rootlet-agent rootlet-server
# The agent: no gRPC.
forbid rootlet-agent tonic prost hyper rootlet-proto rootlet-server
# The map schema is pure: BTF in, types and JSON out (aya-obj parses BTF
# and never touches the kernel; aya does).
forbid rootlet-schema aya tokio tonic prost rootlet-bundle rootlet-dataplane
# The bundle format knows nothing of the kernel or the API.
forbid rootlet-bundle aya rootlet-dataplane rootlet-agent rootlet-proto tonic tokio
# The OCI distribution client moves signed bundles' bytes and checks their
# digests; it knows nothing of gRPC, the agent or the kernel, so the agent
# side of a pull (the API layer) and rootletctl can both use it.
forbid rootlet-oci tonic prost aya rootlet-dataplane rootlet-agent rootlet-server rootlet-proto
# The fleet client only speaks the API.
forbid rootlet-client rootlet-dataplane rootlet-agent rootlet-server aya rootlet-client-sim

if [ "$fail" = 0 ]; then
    echo "check-layers: the crate graph keeps the layers"
fi
exit "$fail"
