#!/usr/bin/env bash
# Builds the `rootlet` Debian package (rootletd, rootletctl, the systemd
# unit, a local-only /etc/rootlet/rootletd.toml, the full example config,
# manual pages and shell completions) with cargo-deb, into target/debian/.
#
#   scripts/build-deb.sh [--profile release|dev] [--no-build]
#
# --no-build packages the binaries already in target/<profile dir>/ (the
# package test uses the dev binaries the test run built). Prints the path
# of the .deb last.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=release build=1
while [ $# -gt 0 ]; do
    case "$1" in
        --profile) profile="$2"; shift 2 ;;
        --no-build) build=0; shift ;;
        *) echo "usage: $0 [--profile release|dev] [--no-build]" >&2; exit 2 ;;
    esac
done
dir=release
[ "$profile" = dev ] && dir=debug
command -v cargo-deb >/dev/null || { echo "cargo-deb is missing (scripts/install-deps.sh installs it)" >&2; exit 1; }
if [ "$build" = 1 ]; then
    cargo build --locked --profile "$profile" -p rootlet-server -p rootlet-client --bins
fi
for b in rootletd rootletctl; do
    [ -x "target/$dir/$b" ] || { echo "target/$dir/$b is missing" >&2; exit 1; }
done
# What the package installs that is generated: the unit with the package's
# paths, and the manual pages and completions from the binaries themselves.
out=deploy/debian/build
rm -rf "$out"
mkdir -p "$out/man/man1" "$out/man/man8" "$out/completions/bash" "$out/completions/zsh" "$out/completions/fish"
sed 's|/usr/local/bin/rootletd|/usr/bin/rootletd|g' deploy/rootletd.service >"$out/rootletd.service"
if grep -q /usr/local "$out/rootletd.service"; then
    echo "deploy/rootletd.service names /usr/local paths build-deb.sh does not rewrite" >&2
    exit 1
fi
"target/$dir/rootletd" --man "$out/man/man8" >/dev/null
"target/$dir/rootletctl" man "$out/man/man1" >/dev/null
for b in rootletd rootletctl; do
    if [ "$b" = rootletd ]; then gen=(--completions); else gen=(completions); fi
    "target/$dir/$b" "${gen[@]}" bash >"$out/completions/bash/$b"
    "target/$dir/$b" "${gen[@]}" zsh >"$out/completions/zsh/_$b"
    "target/$dir/$b" "${gen[@]}" fish >"$out/completions/fish/$b.fish"
done
# cargo-deb rewrites the assets' target/release/ to the profile's directory.
cargo deb --locked -p rootlet-server --no-build --profile "$profile" -o target/debian/ | tail -n 1
