# shellcheck shell=bash
# Shared install helpers for hack/test, hack/demo and .ci/run.  Source it; do not execute it.
#
# Every function is idempotent and prints nothing when all is already in place; output of
# the commands it runs is kept in a log and shown only when a command fails.
#
#   pyshim_install_all          everything below
#   pyshim_apt_packages         Debian (bookworm) packages from the system's apt sources
#   pyshim_private_deps         containerd 1.7.24 (trixie), containerd 2.1.9 and runc 1.3.6 (sid)
#                               unpacked under $PYSHIM_DEPS without touching the system's apt state
#   pyshim_venv                 $PYSHIM_ROOT/.venv from /usr/bin/python3 with `pip install -e .[test]`
#   pyshim_vm_deps              (not in "all") qemu and the cgroup v2 test VM's kernel and initramfs
#
# Environment:
#   PYSHIM_DEPS   where the private binaries go (default /opt/pyshim-deps)
#   PYSHIM_VM_ASSETS  where hack/vm/build-assets keeps the VM's kernel and initramfs
#                 (default $PYSHIM_DEPS/v2vm)

PYSHIM_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYSHIM_DEPS="${PYSHIM_DEPS:-/opt/pyshim-deps}"
PYSHIM_VENV="$PYSHIM_ROOT/.venv"
PYSHIM_VM_ASSETS="${PYSHIM_VM_ASSETS:-$PYSHIM_DEPS/v2vm}"
export PYSHIM_ROOT PYSHIM_DEPS PYSHIM_VM_ASSETS

# Debian packages the project and its tests need on the machine itself.
#   containerd 1.6.20 + runc 1.1.5: the "1.6" e2e target (and runc for the "1.7" one)
#   crun, criu: alternative OCI runtime / checkpointing, used by shim tests
#   busybox-static: the payload of the locally built test image
#   patchelf: lets sid's runc (built against glibc >= 2.38) run on bookworm (see below)
PYSHIM_APT_PACKAGES=(
    containerd runc crun criu busybox-static
    python3 python3-venv
    patchelf util-linux procps ca-certificates debian-archive-keyring
    gcc libc6-dev  # tests/e2e/pause.c, the CRI tests' pod sandbox, is built with gcc -static
)

# name  source-package  suite   wanted upstream version
PYSHIM_PRIVATE_DEPS=(
    "containerd-1.7.24 containerd trixie 1.7.24"
    "containerd-2.1.9  containerd sid    2.1.9"
    "runc-1.3.6        runc       sid    1.3.6"
)
# Suite from which a newer glibc (and libseccomp) is taken when a private binary needs one.
PYSHIM_GLIBC_SUITE=trixie

pyshim_log() { printf '%s\n' "hack: $*" >&2; }
pyshim_die() { printf '%s\n' "hack: error: $*" >&2; exit 1; }

# Run a command quietly: its output goes to a log that is shown only if it fails.
pyshim_quiet() {
    local out rc=0
    out="$(mktemp "${TMPDIR:-/tmp}/pyshim-hack.XXXXXX")"
    "$@" >"$out" 2>&1 || rc=$?
    if [ "$rc" -ne 0 ]; then
        printf 'hack: command failed (exit %s): %s\n' "$rc" "$*" >&2
        tail -n 60 "$out" >&2
    fi
    rm -f "$out"
    return "$rc"
}

pyshim_require_root() {
    [ "$(id -u)" -eq 0 ] || pyshim_die "must run as root (installs Debian packages, runs containerd)"
}

# ---------------------------------------------------------------------------------------------
# System apt packages
# ---------------------------------------------------------------------------------------------

_PYSHIM_APT_UPDATED=0
_pyshim_apt_update_once() {
    [ "$_PYSHIM_APT_UPDATED" -eq 1 ] && return 0
    pyshim_quiet apt-get -o DPkg::Lock::Timeout=300 update
    _PYSHIM_APT_UPDATED=1
}

_pyshim_pkg_installed() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = "installed" ]
}

pyshim_apt_packages() {
    local missing=() p
    for p in "${PYSHIM_APT_PACKAGES[@]}"; do
        _pyshim_pkg_installed "$p" || missing+=("$p")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    pyshim_require_root
    pyshim_log "installing Debian packages: ${missing[*]}"
    _pyshim_apt_update_once
    DEBIAN_FRONTEND=noninteractive pyshim_quiet apt-get -o DPkg::Lock::Timeout=300 install -y \
        --no-install-recommends "${missing[@]}"
}

# ---------------------------------------------------------------------------------------------
# Private containerd / runc builds from newer Debian suites
# ---------------------------------------------------------------------------------------------
# apt gets its own sources list, lists and cache under $PYSHIM_DEPS/.apt, so the system's apt
# configuration and state stay as they are.  Packages are only downloaded and unpacked with
# `dpkg -x`; nothing is installed into the system.

_PYSHIM_PRIV_APT_UPDATED=0
_pyshim_priv_apt_opts() {
    local a="$PYSHIM_DEPS/.apt"
    printf '%s\n' \
        -o "Dir::Etc::SourceList=$a/sources.list" \
        -o "Dir::Etc::SourceParts=/dev/null" \
        -o "Dir::State::Lists=$a/lists" \
        -o "Dir::Cache=$a/cache" \
        -o "Dir::Etc::Preferences=/dev/null" \
        -o "Dir::Etc::PreferencesParts=/dev/null" \
        -o "APT::Get::List-Cleanup=0" \
        -o "APT::Sandbox::User=root"
}

_pyshim_priv_apt() { # apt-get|apt-cache args...
    local tool="$1"; shift
    local opts; mapfile -t opts < <(_pyshim_priv_apt_opts)
    "$tool" "${opts[@]}" "$@"
}

_pyshim_priv_apt_update_once() {
    [ "$_PYSHIM_PRIV_APT_UPDATED" -eq 1 ] && return 0
    local a="$PYSHIM_DEPS/.apt"
    mkdir -p "$a/lists/partial" "$a/cache/archives/partial"
    cat >"$a/sources.list" <<'EOF'
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian sid main
EOF
    pyshim_quiet _pyshim_priv_apt apt-get update
    _PYSHIM_PRIV_APT_UPDATED=1
}

# Print the Debian version of PKG in SUITE whose upstream version is WANT (e.g. 1.7.24 matches
# 1.7.24~ds1-6+deb13u1); if the suite no longer has it, the suite's version, with a warning.
_pyshim_priv_pick_version() { # pkg suite want
    local pkg="$1" suite="$2" want="$3" line ver src fallback=""
    while IFS='|' read -r _ ver src; do
        ver="$(echo "$ver" | tr -d ' ')"
        case "$src" in *" $suite/"*) ;; *) continue ;; esac
        # strip an epoch, then compare the upstream part before any ~ + - suffix
        local up="${ver#*:}"; up="${up%%[~+-]*}"
        if [ "$up" = "$want" ]; then echo "$ver"; return 0; fi
        [ -z "$fallback" ] && fallback="$ver"
    done < <(_pyshim_priv_apt apt-cache madison "$pkg" 2>/dev/null)
    [ -n "$fallback" ] || return 1
    pyshim_log "warning: $pkg $want is no longer in $suite; taking $fallback instead"
    echo "$fallback"
}

# Fetch trixie's glibc + libseccomp into DIR/lib (for binaries that need glibc > bookworm's).
_pyshim_priv_glibc() { # dir
    local dir="$1" tmp
    [ -e "$dir/lib/.complete" ] && return 0
    tmp="$(mktemp -d "$PYSHIM_DEPS/.tmp.XXXXXX")"
    (cd "$tmp" && pyshim_quiet _pyshim_priv_apt apt-get download \
        "libc6/$PYSHIM_GLIBC_SUITE" "libseccomp2/$PYSHIM_GLIBC_SUITE") || { rm -rf "$tmp"; return 1; }
    mkdir -p "$tmp/x"
    local deb; for deb in "$tmp"/*.deb; do dpkg -x "$deb" "$tmp/x"; done
    local libc; libc="$(find "$tmp/x" -name libc.so.6 | head -n1)"
    [ -n "$libc" ] || { rm -rf "$tmp"; return 1; }
    rm -rf "$dir/lib"; mkdir -p "$dir/lib"
    cp -a "$(dirname "$libc")/." "$dir/lib/"
    touch "$dir/lib/.complete"
    rm -rf "$tmp"
}

# If BIN does not run on this glibc, point it at the private glibc in DIR/lib.
_pyshim_priv_fix_glibc() { # dir bin
    local dir="$1" bin="$2" ld
    local out
    out="$("$bin" --version 2>&1)" && return 0
    case "$out" in *GLIBC_*) ;; *) return 0 ;; esac   # fails for another reason: leave it
    _pyshim_priv_glibc "$dir" || return 1
    ld="$(ls "$dir"/lib/ld-linux*.so.* | head -n1)"
    patchelf --set-interpreter "$ld" --set-rpath "$dir/lib" "$bin"
    echo "glibc: $PYSHIM_GLIBC_SUITE libc6 via patchelf (interpreter $ld)" >>"$dir/VERSION"
}

_pyshim_priv_one() { # name pkg suite want
    local name="$1" pkg="$2" suite="$3" want="$4"
    local dir="$PYSHIM_DEPS/$name" ver tmp b
    if [ -e "$dir/.complete" ]; then
        local ok=1
        for b in "$dir"/bin/*; do "$b" --version >/dev/null 2>&1 || [ "${b##*/}" = containerd-shim-runc-v2 ] || ok=0; done
        [ "$ok" -eq 1 ] && return 0
        pyshim_log "$dir is broken; reinstalling"
    fi
    pyshim_require_root
    _pyshim_priv_apt_update_once
    ver="$(_pyshim_priv_pick_version "$pkg" "$suite" "$want")" \
        || pyshim_die "no package $pkg in Debian $suite"
    pyshim_log "installing $pkg $ver (Debian $suite) into $dir"
    tmp="$(mktemp -d "$PYSHIM_DEPS/.tmp.XXXXXX")"
    (cd "$tmp" && pyshim_quiet _pyshim_priv_apt apt-get download "$pkg=$ver") \
        || { rm -rf "$tmp"; pyshim_die "apt-get download $pkg=$ver failed"; }
    mkdir -p "$tmp/root"
    dpkg -x "$tmp"/*.deb "$tmp/root"
    rm -f "$tmp"/*.deb
    mkdir -p "$tmp/bin"
    for b in containerd ctr containerd-shim-runc-v2 runc; do
        local f=""
        for f in "$tmp/root/usr/bin/$b" "$tmp/root/usr/sbin/$b"; do
            [ -f "$f" ] && [ ! -L "$f" ] && break
            f=""
        done
        [ -n "$f" ] && cp -a "$f" "$tmp/bin/$b"
    done
    rm -rf "$tmp/root"
    printf 'package: %s\nversion: %s\nsuite: %s\nwanted: %s\n' "$pkg" "$ver" "$suite" "$want" \
        >"$tmp/VERSION"
    chmod 755 "$tmp"
    rm -rf "$dir"
    mv "$tmp" "$dir"
    for b in "$dir"/bin/*; do
        [ "${b##*/}" = containerd-shim-runc-v2 ] && continue   # has no --version flag
        _pyshim_priv_fix_glibc "$dir" "$b" || pyshim_die "cannot make $b run here"
        pyshim_quiet "$b" --version || pyshim_die "$b does not run here"
    done
    touch "$dir/.complete"
}

pyshim_private_deps() {
    mkdir -p "$PYSHIM_DEPS"
    local spec
    (
        flock 9
        for spec in "${PYSHIM_PRIVATE_DEPS[@]}"; do
            # shellcheck disable=SC2086
            _pyshim_priv_one $spec
        done
    ) 9>"$PYSHIM_DEPS/.lock"
}

# ---------------------------------------------------------------------------------------------
# The virtualenv
# ---------------------------------------------------------------------------------------------

pyshim_venv() {
    local stamp="$PYSHIM_VENV/.pyshim-stamp" want
    want="$( (cat "$PYSHIM_ROOT/pyproject.toml" /usr/bin/python3; echo editable_mode=compat) 2>/dev/null \
        | sha256sum | cut -d' ' -f1)"
    if [ -x "$PYSHIM_VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] \
        && [ -x "$PYSHIM_VENV/bin/containerd-shim-pyshim-v2" ]; then
        return 0
    fi
    mkdir -p "$PYSHIM_VENV"
    (
        flock 9
        if [ ! -x "$PYSHIM_VENV/bin/python" ]; then
            pyshim_log "creating $PYSHIM_VENV"
            pyshim_quiet /usr/bin/python3 -m venv "$PYSHIM_VENV"
        fi
        pyshim_log "pip install -e '.[test]' into $PYSHIM_VENV"
        rm -f "$stamp"
        # editable_mode=compat puts the checkout on sys.path with a plain .pth line; the
        # default mode installs an import finder that costs every shim command ~15 ms of
        # start-up (pathlib, re, ...), which an installed pyshim would not pay.
        pyshim_quiet "$PYSHIM_VENV/bin/python" -m pip install --disable-pip-version-check -q \
            --config-settings editable_mode=compat -e "$PYSHIM_ROOT[test]"
        echo "$want" >"$stamp"
    ) 9>"$PYSHIM_VENV/.pyshim.lock"
}

# ---------------------------------------------------------------------------------------------
# The cgroup v2 test VM (hack/vm): qemu, plus a kernel and initramfs built outside the checkout
# ---------------------------------------------------------------------------------------------

PYSHIM_VM_APT_PACKAGES=(qemu-system-x86 busybox-static)

pyshim_vm_deps() {
    local missing=() p
    for p in "${PYSHIM_VM_APT_PACKAGES[@]}"; do
        _pyshim_pkg_installed "$p" || missing+=("$p")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        pyshim_require_root
        pyshim_log "installing Debian packages for the cgroup v2 VM: ${missing[*]}"
        _pyshim_apt_update_once
        DEBIAN_FRONTEND=noninteractive pyshim_quiet apt-get -o DPkg::Lock::Timeout=300 install -y \
            --no-install-recommends "${missing[@]}"
    fi
    pyshim_quiet /usr/bin/python3 "$PYSHIM_ROOT/hack/vm/build-assets" "$PYSHIM_VM_ASSETS"
}

pyshim_install_all() {
    pyshim_apt_packages
    pyshim_private_deps
    pyshim_venv
}
