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
#   PYSHIM_DEB_CACHE  where every .deb fetched for them is kept and taken from first
#                 (default $PYSHIM_DEPS/debs)
#   PYSHIM_DEBIAN_MIRROR  the mirror of their private sources list (default
#                 http://deb.debian.org/debian); PYSHIM_PRIV_APT_EXTRA: more apt options for it
#   PYSHIM_VM_ASSETS  where hack/vm/build-assets keeps the VM's kernel and initramfs
#                 (default $PYSHIM_DEPS/v2vm)

PYSHIM_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYSHIM_DEPS="${PYSHIM_DEPS:-/opt/pyshim-deps}"
PYSHIM_VENV="$PYSHIM_ROOT/.venv"
PYSHIM_VM_ASSETS="${PYSHIM_VM_ASSETS:-$PYSHIM_DEPS/v2vm}"
PYSHIM_DEB_CACHE="${PYSHIM_DEB_CACHE:-$PYSHIM_DEPS/debs}"
PYSHIM_DEBIAN_MIRROR="${PYSHIM_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
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
#
# Every .deb fetched is kept in $PYSHIM_DEB_CACHE/<slot>/ (slot: containerd-1.7.24, ...,
# glibc-trixie) and an install takes it from there first, without apt or the network.  Debian
# testing and unstable drop a version when a newer one arrives, so when the pinned version is
# neither cached nor in the suite any more, the suite's current version of the package goes
# into the same slot (the directory name stays; its VERSION file says what is in it), with a
# warning; when apt cannot reach the mirror, the newest cached .deb of the slot does.  Set-up
# fails only when a slot can be had neither from the cache nor from the mirror.

_PYSHIM_PRIV_APT_STATE=""   # "", ok or failed: apt-get update is tried once per run
_PYSHIM_PRIV_GOT=""         # the .deb _pyshim_priv_download fetched last

_pyshim_priv_apt_opts() {
    local a="$PYSHIM_DEPS/.apt" extra
    printf '%s\n' \
        -o "Dir::Etc::SourceList=$a/sources.list" \
        -o "Dir::Etc::SourceParts=/dev/null" \
        -o "Dir::State::Lists=$a/lists" \
        -o "Dir::Cache=$a/cache" \
        -o "Dir::Etc::Preferences=/dev/null" \
        -o "Dir::Etc::PreferencesParts=/dev/null" \
        -o "APT::Get::List-Cleanup=0" \
        -o "APT::Sandbox::User=root" \
        -o "Acquire::Check-Valid-Until=false"
    # Snapshot mirrors serve Release files past their Valid-Until date; the check stays on for
    # the system's own apt calls.  PYSHIM_PRIV_APT_EXTRA adds options (whitespace-separated),
    # e.g. "-o Acquire::http::Proxy=http://127.0.0.1:9" to try an install without the mirror.
    read -ra extra <<<"${PYSHIM_PRIV_APT_EXTRA:-}"
    if [ "${#extra[@]}" -gt 0 ]; then printf '%s\n' "${extra[@]}"; fi
}

_pyshim_priv_apt() { # apt-get|apt-cache args...
    local tool="$1"; shift
    local opts; mapfile -t opts < <(_pyshim_priv_apt_opts)
    "$tool" "${opts[@]}" "$@"
}

# Refresh the private lists, once per run.  On failure (mirror unreachable, ...) warn and return
# 1; callers go on with the cache and whatever lists an earlier run left.
_pyshim_priv_apt_update_once() {
    case "$_PYSHIM_PRIV_APT_STATE" in ok) return 0 ;; failed) return 1 ;; esac
    local a="$PYSHIM_DEPS/.apt" m="$PYSHIM_DEBIAN_MIRROR"
    mkdir -p "$a/lists/partial" "$a/cache/archives/partial"
    cat >"$a/sources.list" <<SOURCES
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $m trixie main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $m sid main
SOURCES
    # --error-on=any: without it apt-get update exits 0 when it could fetch nothing
    if pyshim_quiet _pyshim_priv_apt apt-get update --error-on=any; then
        _PYSHIM_PRIV_APT_STATE=ok
        return 0
    fi
    _PYSHIM_PRIV_APT_STATE=failed
    pyshim_log "warning: apt-get update of the private sources ($m trixie, sid) failed;" \
        "going on with the .deb cache $PYSHIM_DEB_CACHE and what is installed"
    return 1
}

# The upstream part of a Debian version: 1:1.7.24~ds1-6+deb13u1 -> 1.7.24
_pyshim_upstream() { local v="${1#*:}"; echo "${v%%[~+-]*}"; }

# Print the newest .deb of PKG in cache dir DIR whose upstream version is WANT (any version
# when WANT is empty); nothing (and status 1) when there is none.
_pyshim_priv_cache_pick() { # dir pkg [want]
    local dir="$1" pkg="$2" want="${3:-}" f p v best="" bestv=""
    for f in "$dir"/*.deb; do
        [ -f "$f" ] || continue
        p="$(dpkg-deb -f "$f" Package 2>/dev/null)" || continue
        v="$(dpkg-deb -f "$f" Version 2>/dev/null)" || continue
        [ "$p" = "$pkg" ] || continue
        [ -z "$want" ] || [ "$(_pyshim_upstream "$v")" = "$want" ] || continue
        if [ -z "$best" ] || dpkg --compare-versions "$v" gt "$bestv"; then best="$f"; bestv="$v"; fi
    done
    [ -n "$best" ] || return 1
    echo "$best"
}

# apt-get download SPEC (pkg=version or pkg/suite) into cache dir DIR; the .deb's path goes to
# $_PYSHIM_PRIV_GOT.  Run in the calling shell (not in $(...)), so apt-get update runs once.
_pyshim_priv_download() { # dir spec
    local dir="$1" spec="$2" tmp f retries=()
    _PYSHIM_PRIV_GOT=""
    # stale lists from an earlier run may still do; but after a failed update, try only once
    _pyshim_priv_apt_update_once || retries=(-o Acquire::Retries=0)
    mkdir -p "$dir"
    tmp="$(mktemp -d "$dir/.tmp.XXXXXX")"
    if ! (cd "$tmp" && pyshim_quiet _pyshim_priv_apt apt-get "${retries[@]}" download "$spec"); then
        rm -rf "$tmp"
        return 1
    fi
    for f in "$tmp"/*.deb; do
        [ -f "$f" ] || continue
        mv -f "$f" "$dir/"
        _PYSHIM_PRIV_GOT="$dir/${f##*/}"
    done
    rm -rf "$tmp"
    [ -n "$_PYSHIM_PRIV_GOT" ]
}

# Print the Debian version of PKG in SUITE whose upstream version is WANT (e.g. 1.7.24 matches
# 1.7.24~ds1-6+deb13u1); if the suite no longer has it, the suite's version, with a warning.
# Status 1 when the lists have no PKG in SUITE at all.
_pyshim_priv_pick_version() { # pkg suite want
    local pkg="$1" suite="$2" want="$3" ver src fallback=""
    while IFS='|' read -r _ ver src; do
        ver="$(echo "$ver" | tr -d ' ')"
        case "$src" in *" $suite/"*) ;; *) continue ;; esac
        if [ "$(_pyshim_upstream "$ver")" = "$want" ]; then echo "$ver"; return 0; fi
        if [ -z "$fallback" ] || dpkg --compare-versions "$ver" gt "$fallback"; then
            fallback="$ver"
        fi
    done < <(_pyshim_priv_apt apt-cache madison "$pkg" 2>/dev/null)
    [ -n "$fallback" ] || return 1
    pyshim_log "warning: $pkg $want is no longer in Debian $suite; taking $fallback instead"
    echo "$fallback"
}

# The .deb for a slot, into $_PYSHIM_PRIV_GOT: the cached one of the wanted version, else the
# suite's (the wanted version, or the suite's current one), else the newest cached one.
_pyshim_priv_get_deb() { # slot pkg suite want
    local slot="$1" pkg="$2" suite="$3" want="$4" cache ver deb
    cache="$PYSHIM_DEB_CACHE/$slot"
    if deb="$(_pyshim_priv_cache_pick "$cache" "$pkg" "$want")"; then
        _PYSHIM_PRIV_GOT="$deb"
        return 0
    fi
    _pyshim_priv_apt_update_once || true
    if ver="$(_pyshim_priv_pick_version "$pkg" "$suite" "$want")" \
        && _pyshim_priv_download "$cache" "$pkg=$ver"; then
        return 0
    fi
    if deb="$(_pyshim_priv_cache_pick "$cache" "$pkg")"; then
        pyshim_log "warning: $pkg $want cannot be had from Debian $suite; taking the cached" \
            "$(dpkg-deb -f "$deb" Version) ($deb)"
        _PYSHIM_PRIV_GOT="$deb"
        return 0
    fi
    _PYSHIM_PRIV_GOT=""
    return 1
}

# Fetch trixie's glibc + libseccomp into DIR/lib (for binaries that need glibc > bookworm's),
# from the cache slot glibc-$PYSHIM_GLIBC_SUITE when it has them.
_pyshim_priv_glibc() { # dir
    local dir="$1" cache="$PYSHIM_DEB_CACHE/glibc-$PYSHIM_GLIBC_SUITE" tmp p deb debs=()
    [ -e "$dir/lib/.complete" ] && return 0
    for p in libc6 libseccomp2; do
        if ! deb="$(_pyshim_priv_cache_pick "$cache" "$p")"; then
            _pyshim_priv_download "$cache" "$p/$PYSHIM_GLIBC_SUITE" || {
                pyshim_log "$p ($PYSHIM_GLIBC_SUITE) is neither in $cache nor to be had from the mirror"
                return 1
            }
            deb="$_PYSHIM_PRIV_GOT"
        fi
        debs+=("$deb")
    done
    tmp="$(mktemp -d "$PYSHIM_DEPS/.tmp.XXXXXX")"
    mkdir -p "$tmp/x"
    for deb in "${debs[@]}"; do dpkg -x "$deb" "$tmp/x" || { rm -rf "$tmp"; return 1; }; done
    local libc; libc="$(find "$tmp/x" -name libc.so.6 | head -n1)"
    [ -n "$libc" ] || { rm -rf "$tmp"; return 1; }
    rm -rf "${dir:?}/lib"; mkdir -p "$dir/lib"
    cp -a "$(dirname "$libc")/." "$dir/lib/"
    dpkg-deb -f "${debs[0]}" Version >"$dir/lib/.libc6-version"
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
    ld="$(find "$dir/lib" -maxdepth 1 -name 'ld-linux*.so.*' | sort | head -n1)"
    patchelf --set-interpreter "$ld" --set-rpath "$dir/lib" "$bin"
    echo "glibc: $PYSHIM_GLIBC_SUITE libc6 $(cat "$dir/lib/.libc6-version" 2>/dev/null)" \
        "via patchelf (interpreter $ld)" >>"$dir/VERSION"
}

# Say so when slot DIR holds another version than the wanted one (a fallback).
_pyshim_priv_note_fallback() { # dir
    local v w
    v="$(sed -n 's/^version: //p' "$1/VERSION" 2>/dev/null)"
    w="$(sed -n 's/^wanted: //p' "$1/VERSION" 2>/dev/null)"
    [ -n "$v" ] && [ -n "$w" ] && [ "$(_pyshim_upstream "$v")" != "$w" ] || return 0
    pyshim_log "note: $1 holds $(sed -n 's/^package: //p' "$1/VERSION") $v, not the wanted $w"
}

_pyshim_priv_one() { # name pkg suite want
    local name="$1" pkg="$2" suite="$3" want="$4"
    local dir="$PYSHIM_DEPS/$name" ver tmp b deb try
    if [ -e "$dir/.complete" ]; then
        local ok=1
        for b in "$dir"/bin/*; do "$b" --version >/dev/null 2>&1 || [ "${b##*/}" = containerd-shim-runc-v2 ] || ok=0; done
        if [ "$ok" -eq 1 ]; then _pyshim_priv_note_fallback "$dir"; return 0; fi
        pyshim_log "$dir is broken; reinstalling"
    fi
    pyshim_require_root
    mkdir -p "$PYSHIM_DEPS"
    tmp="$(mktemp -d "$PYSHIM_DEPS/.tmp.XXXXXX")"
    for try in 1 2; do
        _pyshim_priv_get_deb "$name" "$pkg" "$suite" "$want" || {
            rm -rf "$tmp"
            pyshim_die "cannot get $pkg $want (Debian $suite): no .deb of it in" \
                "$PYSHIM_DEB_CACHE/$name and none to be had from the mirror (see above)"
        }
        deb="$_PYSHIM_PRIV_GOT"
        rm -rf "$tmp/root"; mkdir -p "$tmp/root"
        dpkg -x "$deb" "$tmp/root" 2>/dev/null && break
        pyshim_log "warning: $deb does not unpack; removing it from the cache"
        rm -f "$deb"
        [ "$try" -eq 2 ] && { rm -rf "$tmp"; pyshim_die "cannot unpack $pkg for $dir"; }
    done
    ver="$(dpkg-deb -f "$deb" Version)"
    pyshim_log "installing $pkg $ver (Debian $suite) into $dir from $deb"
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
    # a private glibc an earlier install fetched is kept (its path stays the same)
    [ -e "$dir/lib/.complete" ] && mv "$dir/lib" "$tmp/lib"
    chmod 755 "$tmp"
    rm -rf "$dir"
    mv "$tmp" "$dir"
    for b in "$dir"/bin/*; do
        [ "${b##*/}" = containerd-shim-runc-v2 ] && continue   # has no --version flag
        _pyshim_priv_fix_glibc "$dir" "$b" || pyshim_die "cannot make $b run here"
        pyshim_quiet "$b" --version || pyshim_die "$b does not run here"
    done
    touch "$dir/.complete"
    _pyshim_priv_note_fallback "$dir"
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
    # the script too: pip copies it into the venv, where an edit of ours would not show
    want="$( (cat "$PYSHIM_ROOT/pyproject.toml" "$PYSHIM_ROOT/shim/scripts/containerd-shim-pyshim-v2" \
        /usr/bin/python3; echo editable_mode=compat shebang=-S) 2>/dev/null \
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
            --config-settings editable_mode=compat -e "${PYSHIM_ROOT}[test]"
        # pip writes the script's first line as `#!<env>/bin/python`, dropping any flag of
        # ours; with -S, `start` and `delete` skip site (~2 ms each; see the script)
        sed -i '1s|^\(#!/[^ ]*python[0-9.]*\)$|\1 -S|' "$PYSHIM_VENV/bin/containerd-shim-pyshim-v2"
        echo "$want" >"$stamp"
    ) 9>"$PYSHIM_VENV/.pyshim.lock"
}

# ---------------------------------------------------------------------------------------------
# The cgroup v2 test VM (hack/vm): qemu, plus a kernel and initramfs built outside the checkout
# ---------------------------------------------------------------------------------------------

# systemd + dbus: the systemd guest boots the host's own (tests/systemd, PYSHIM_VM_INIT=systemd)
PYSHIM_VM_APT_PACKAGES=(qemu-system-x86 busybox-static systemd dbus)

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
