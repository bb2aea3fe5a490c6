#!/usr/bin/env bash
# Installs what Rootlet needs on a fresh Debian bookworm machine (run as
# root). Idempotent, and fast when everything is already there: it runs
# `apt-get update` only if something is missing, and prints one line per
# thing it installs.
#
#   - the eBPF toolchain: clang-19 llvm-19 libbpf-dev, plus iproute2 bpftool
#   - the VM tier (scripts/vm-run, docs/VM-TIER.md): qemu-system-x86,
#     busybox-static, the newest linux-image-6.12.*+deb12-amd64-unsigned
#     and linux-image-6.1.0-*-amd64-unsigned (the guest kernels CI runs),
#     and virtme-ng in a venv at /opt/vng
#   - xdp-tools (Debian's xdp-loader and xdpfilt_*.o: the foreign-loader
#     and foreign-object tests)
#   - Python grpcio, grpcio-tools and grpcio-status from PyPI (pinned) in a
#     venv at /opt/rootlet-grpcio: the non-Rust client test (tests/grpcio.rs)
#   - bpffs mounted at /sys/fs/bpf
#
# Environment: ROOTLET_VNG_VERSION (default 1.42, the version measured with
# scripts/vm-run; "latest" installs the newest).
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
VNG_DIR=/opt/vng
VNG_VERSION="${ROOTLET_VNG_VERSION:-1.42}"

if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: must run as root" >&2
    exit 1
fi

apt_updated=0
apt_update_once() {
    if [ "$apt_updated" -eq 0 ]; then
        apt-get update -qq >/dev/null
        apt_updated=1
    fi
}

installed() {
    dpkg-query -W -f='${Status}\n' "$1" 2>/dev/null | grep -q '^install ok installed$'
}

apt_install() {
    apt_update_once
    echo "install-deps: installing $*"
    if ! apt-get install -y -qq "$@" >/tmp/rootlet-install-deps.log 2>&1; then
        tail -n 30 /tmp/rootlet-install-deps.log >&2
        echo "install-deps: apt-get install $* failed (log: /tmp/rootlet-install-deps.log)" >&2
        exit 1
    fi
}

# python3-venv: `python3 -m venv` needs ensurepip, which Debian ships apart.
# groff-base: the test that renders the generated manual pages.
# dpkg-dev (dpkg-shlibdeps, for the package's Depends), binutils (strip)
# and systemd (systemd-analyze verify): the .deb's build and test.
# docker-registry: the OCI registry the registry tests start themselves on
# 127.0.0.1 (integration-tests/src/registry.rs); its own service stays off.
# apache2-utils: htpasswd, the bcrypt password file of that registry's
# basic auth (the registry accepts bcrypt only).
packages=(clang-19 llvm-19 libbpf-dev iproute2 bpftool qemu-system-x86 busybox-static python3 python3-venv xdp-tools groff-base dpkg-dev binutils systemd docker-registry apache2-utils)
missing=()
for p in "${packages[@]}"; do
    installed "$p" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    apt_install "${missing[@]}"
fi
# The package's postinst enables a registry on :5000; the tests run their
# own, so a system-wide one is neither wanted nor listening.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl disable --now docker-registry.service >/dev/null 2>&1 || true
fi

# Guest kernels for the VM tier, one per kernel CI runs (docs/VM-TIER.md):
# Debian 12's backports 6.12 and its default 6.1. For each, any installed
# image will do; otherwise the newest one the archive has.
#   $1: dpkg-query pattern of the -unsigned package; $2: apt-cache regex.
install_guest_kernel() {
    local have_kernel=0 status pkg kpkg
    while read -r status pkg; do
        if [ "$status" = "installed" ] && [ -e "/boot/vmlinuz-${pkg#linux-image-}" ]; then
            have_kernel=1
        fi
    done < <(dpkg-query -W -f='${db:Status-Status} ${Package}\n' "$1" 2>/dev/null | sed 's/-unsigned$//')
    if [ "$have_kernel" -eq 0 ]; then
        apt_update_once
        kpkg="$(apt-cache search --names-only "$2" | awk '{print $1}' | sort -V | tail -n 1)"
        if [ -z "$kpkg" ]; then
            echo "install-deps: no $1 in the apt sources" >&2
            exit 1
        fi
        apt_install "$kpkg"
    fi
}
install_guest_kernel 'linux-image-6.12.*+deb12-amd64-unsigned' '^linux-image-6\.12\.[0-9]+\+deb12-amd64-unsigned$'
install_guest_kernel 'linux-image-6.1.0-*-amd64-unsigned' '^linux-image-6\.1\.0-[0-9]+-amd64-unsigned$'

# virtme-ng (vng) in its own venv.
if [ ! -x "$VNG_DIR/bin/vng" ]; then
    if [ "$VNG_VERSION" = latest ]; then spec=virtme-ng; else spec="virtme-ng==$VNG_VERSION"; fi
    echo "install-deps: installing $spec into $VNG_DIR"
    python3 -m venv "$VNG_DIR"
    if ! "$VNG_DIR/bin/pip" install -q --disable-pip-version-check "$spec" >/tmp/rootlet-install-deps.log 2>&1; then
        tail -n 30 /tmp/rootlet-install-deps.log >&2
        echo "install-deps: pip install $spec failed (log: /tmp/rootlet-install-deps.log)" >&2
        exit 1
    fi
fi

# Python grpcio for the non-Rust client test, in its own venv (pinned; the
# test generates its stubs from proto/ at run time).
GRPCIO_DIR=/opt/rootlet-grpcio
GRPCIO_VERSION=1.85.1
if ! "$GRPCIO_DIR/bin/python3" -c "import grpc, grpc_tools, grpc_status, sys; sys.exit(grpc.__version__ != '$GRPCIO_VERSION')" 2>/dev/null; then
    echo "install-deps: installing grpcio $GRPCIO_VERSION into $GRPCIO_DIR"
    python3 -m venv "$GRPCIO_DIR"
    if ! "$GRPCIO_DIR/bin/pip" install -q --disable-pip-version-check \
        "grpcio==$GRPCIO_VERSION" "grpcio-tools==$GRPCIO_VERSION" "grpcio-status==$GRPCIO_VERSION" \
        >/tmp/rootlet-install-deps.log 2>&1; then
        tail -n 30 /tmp/rootlet-install-deps.log >&2
        echo "install-deps: pip install grpcio failed (log: /tmp/rootlet-install-deps.log)" >&2
        exit 1
    fi
fi

# kubernetes-validate (PyPI; it carries the Kubernetes schemas, so it
# validates offline) for the DaemonSet's test, in its own venv (pinned).
K8S_DIR=/opt/rootlet-k8s
K8S_VALIDATE_VERSION=1.37.0
if ! "$K8S_DIR/bin/kubernetes-validate" --version 2>/dev/null | grep -q "$K8S_VALIDATE_VERSION"; then
    echo "install-deps: installing kubernetes-validate $K8S_VALIDATE_VERSION into $K8S_DIR"
    python3 -m venv "$K8S_DIR"
    if ! "$K8S_DIR/bin/pip" install -q --disable-pip-version-check "kubernetes-validate==$K8S_VALIDATE_VERSION" \
        >/tmp/rootlet-install-deps.log 2>&1; then
        tail -n 30 /tmp/rootlet-install-deps.log >&2
        echo "install-deps: pip install kubernetes-validate failed (log: /tmp/rootlet-install-deps.log)" >&2
        exit 1
    fi
fi

if ! mountpoint -q /sys/fs/bpf; then
    echo "install-deps: mounting bpffs at /sys/fs/bpf"
    mkdir -p /sys/fs/bpf
    mount -t bpf bpf /sys/fs/bpf
fi

# cargo-deb (crates.io), pinned: scripts/build-deb.sh makes the `rootlet`
# package with it, and the package test installs that package.
CARGO_DEB_VERSION=3.8.0
if ! cargo deb --version 2>/dev/null | grep -qx "cargo-deb $CARGO_DEB_VERSION\|$CARGO_DEB_VERSION"; then
    echo "install-deps: installing cargo-deb $CARGO_DEB_VERSION"
    if ! cargo install -q --locked cargo-deb --version "$CARGO_DEB_VERSION" >/tmp/rootlet-install-deps.log 2>&1; then
        tail -n 30 /tmp/rootlet-install-deps.log >&2
        echo "install-deps: cargo install cargo-deb failed (log: /tmp/rootlet-install-deps.log)" >&2
        exit 1
    fi
fi
