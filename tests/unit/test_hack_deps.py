"""hack/lib.sh's private containerd/runc installs: the .deb cache and the fallbacks when Debian
dropped the pinned version or the mirror cannot be reached.

Hermetic and fast: lib.sh is sourced by bash with fake `apt-get` and `apt-cache` first on PATH,
serving small .debs built here with dpkg-deb (a "runc" that is a shell script); no network, no
root (pyshim_require_root is stubbed), nothing outside tmp_path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
LIB = REPO_ROOT / "hack" / "lib.sh"

pytestmark = pytest.mark.skipif(
    not (shutil.which("bash") and shutil.which("dpkg-deb") and shutil.which("dpkg")),
    reason="needs bash and dpkg (Debian)",
)

# apt-get: logs each call to $FAKE_LOG.raw, and without its -o options to $FAKE_LOG; `update`
# exits $FAKE_UPDATE_RC; `download pkg=ver|pkg/suite` copies the .deb from $FAKE_REPO/<suite>/
# unless $FAKE_NET=down.
FAKE_APT_GET = r"""#!/bin/bash
echo "$*" >>"$FAKE_LOG.raw"
args=()
while [ $# -gt 0 ]; do
    case "$1" in -o) shift 2 ;; *) args+=("$1"); shift ;; esac
done
echo "apt-get ${args[*]}" >>"$FAKE_LOG"
case "${args[0]}" in
    update)
        [ "${FAKE_UPDATE_RC:-0}" -eq 0 ] || { echo "E: Failed to fetch (fake)"; exit "$FAKE_UPDATE_RC"; }
        mkdir -p "$FAKE_REPO" && touch "$FAKE_REPO/.listed" ;;
    download)
        [ "${FAKE_NET:-up}" = up ] || { echo "E: Could not connect (fake)"; exit 100; }
        spec="${args[1]}"
        case "$spec" in
            */*) pkg="${spec%%/*}"; pat="$FAKE_REPO/${spec#*/}/${pkg}_*.deb" ;;
            *=*) pkg="${spec%%=*}"; ver="${spec#*=}"; pat="$FAKE_REPO/*/${pkg}_${ver/:/%3a}_amd64.deb" ;;
        esac
        for f in $pat; do [ -f "$f" ] && cp "$f" . && exit 0; done
        echo "E: Version '$spec' not found"; exit 100 ;;
esac
"""

# apt-cache madison PKG: one line per .deb of PKG in $FAKE_REPO/<suite>/, as the real one prints
# them, once an `apt-get update` has succeeded (no lists before that).
FAKE_APT_CACHE = r"""#!/bin/bash
args=()
while [ $# -gt 0 ]; do
    case "$1" in -o) shift 2 ;; *) args+=("$1"); shift ;; esac
done
echo "apt-cache ${args[*]}" >>"$FAKE_LOG"
[ "${args[0]}" = madison ] && [ -e "$FAKE_REPO/.listed" ] || exit 0
pkg="${args[1]}"
for f in "$FAKE_REPO"/*/"${pkg}"_*.deb; do
    [ -f "$f" ] || continue
    suite="$(basename "$(dirname "$f")")"
    printf '%10s | %s | http://fake.invalid/debian %s/main amd64 Packages\n' \
        "$pkg" "$(dpkg-deb -f "$f" Version)" "$suite"
done
"""


def build_deb(dest_dir: Path, pkg: str, version: str, files: dict[str, str]) -> Path:
    """A minimal .deb of PKG VERSION holding FILES (path -> content; usr/*bin/* executable),
    named as apt-get download names it."""
    root = dest_dir / f".build-{pkg}-{version}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {pkg}\nVersion: {version}\nArchitecture: amd64\n"
        "Maintainer: test <test@invalid>\nDescription: fake\n"
    )
    for rel, content in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(content)
        p.chmod(0o755 if "bin/" in rel else 0o644)
    out = dest_dir / f"{pkg}_{version.replace(':', '%3a')}_amd64.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-Zgzip", "-z1", "-b", str(root), str(out)],
        check=True, capture_output=True,
    )
    shutil.rmtree(root)
    return out


def runc_deb(dest_dir: Path, version: str) -> Path:
    script = f"#!/bin/sh\necho 'runc version {version}'\n"
    return build_deb(dest_dir, "runc", version, {"usr/sbin/runc": script})


class Env:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.deps = tmp / "deps"
        self.cache = tmp / "deps" / "debs"
        self.repo = tmp / "repo"
        self.log = tmp / "apt.log"
        self.bin = tmp / "fakebin"
        self.bin.mkdir()
        for name, text in (("apt-get", FAKE_APT_GET), ("apt-cache", FAKE_APT_CACHE)):
            (self.bin / name).write_text(text)
            (self.bin / name).chmod(0o755)
        self.env = {
            "PATH": f"{self.bin}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": str(tmp), "TMPDIR": str(tmp),
            "PYSHIM_DEPS": str(self.deps), "PYSHIM_DEB_CACHE": str(self.cache),
            "FAKE_REPO": str(self.repo), "FAKE_LOG": str(self.log),
        }

    def publish(self, suite: str, version: str) -> Path:
        d = self.repo / suite
        d.mkdir(parents=True, exist_ok=True)
        return runc_deb(d, version)

    def unpublish(self) -> None:
        shutil.rmtree(self.repo, ignore_errors=True)

    def run(self, script: str, specs: str = "runc-1.3.6 runc sid 1.3.6", **env: str):
        self.log.unlink(missing_ok=True)
        Path(f"{self.log}.raw").unlink(missing_ok=True)
        full = textwrap.dedent(f"""\
            set -euo pipefail
            source {LIB}
            pyshim_require_root() {{ :; }}
            PYSHIM_PRIVATE_DEPS=("{specs}")
            """) + textwrap.dedent(script)
        return subprocess.run(
            ["bash", "-c", full], env={**self.env, **env}, capture_output=True, text=True,
            timeout=60,
        )

    def install(self, **env: str):
        return self.run("pyshim_private_deps\n", **env)

    def apt_calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def version_file(self, slot: str = "runc-1.3.6") -> dict[str, str]:
        text = (self.deps / slot / "VERSION").read_text()
        return dict(ln.split(": ", 1) for ln in text.splitlines())


@pytest.fixture
def env(tmp_path):
    return Env(tmp_path)


def test_installs_the_pinned_version_and_keeps_its_deb(env):
    env.publish("sid", "1.3.6+ds1-1")
    r = env.install()
    assert r.returncode == 0, r.stderr
    assert env.version_file() == {
        "package": "runc", "version": "1.3.6+ds1-1", "suite": "sid", "wanted": "1.3.6"
    }
    out = subprocess.run([env.deps / "runc-1.3.6/bin/runc", "--version"], capture_output=True,
                         text=True).stdout
    assert out == "runc version 1.3.6+ds1-1\n"
    assert (env.cache / "runc-1.3.6" / "runc_1.3.6+ds1-1_amd64.deb").is_file()
    assert "apt-get download runc=1.3.6+ds1-1" in env.apt_calls()
    assert "warning" not in r.stderr


def test_second_run_is_silent_and_calls_no_apt(env):
    env.publish("sid", "1.3.6+ds1-1")
    assert env.install().returncode == 0
    r = env.install()
    assert (r.returncode, r.stderr, env.apt_calls()) == (0, "", [])


def test_cached_deb_installs_without_apt_or_network(env):
    env.publish("sid", "1.3.6+ds1-1")
    assert env.install().returncode == 0
    shutil.rmtree(env.deps / "runc-1.3.6")
    env.unpublish()
    r = env.install(FAKE_NET="down", FAKE_UPDATE_RC="100")
    assert r.returncode == 0, r.stderr
    assert env.apt_calls() == []
    assert env.version_file()["version"] == "1.3.6+ds1-1"


def test_pinned_version_gone_takes_the_suites_version_into_the_same_slot(env):
    env.publish("sid", "1.3.7+ds1-1")
    env.publish("trixie", "1.1.15+ds1-2")   # another suite's version is not a candidate
    r = env.install()
    assert r.returncode == 0, r.stderr
    assert "runc 1.3.6 is no longer in Debian sid; taking 1.3.7+ds1-1 instead" in r.stderr
    assert "holds runc 1.3.7+ds1-1, not the wanted 1.3.6" in r.stderr
    assert env.version_file() == {
        "package": "runc", "version": "1.3.7+ds1-1", "suite": "sid", "wanted": "1.3.6"
    }
    # the fallback stays put (no apt on later runs), and keeps saying so
    r = env.install()
    assert r.returncode == 0 and env.apt_calls() == []
    assert "not the wanted 1.3.6" in r.stderr


def test_epoch_and_suffixes_are_not_part_of_the_upstream_version(env):
    env.publish("sid", "1:1.3.6~rc1-2")
    r = env.install()
    assert r.returncode == 0, r.stderr
    assert env.version_file()["version"] == "1:1.3.6~rc1-2"
    assert "warning" not in r.stderr and "note" not in r.stderr


def test_cached_deb_of_the_wanted_version_beats_the_suites_newer_one(env):
    (env.cache / "runc-1.3.6").mkdir(parents=True)
    runc_deb(env.cache / "runc-1.3.6", "1.3.6+ds1-1")
    env.publish("sid", "1.3.7+ds1-1")
    r = env.install()
    assert r.returncode == 0, r.stderr
    assert env.version_file()["version"] == "1.3.6+ds1-1"
    assert env.apt_calls() == []


def test_mirror_unreachable_takes_the_newest_cached_deb_of_the_slot(env):
    slot_cache = env.cache / "runc-1.3.6"
    slot_cache.mkdir(parents=True)
    runc_deb(slot_cache, "1.3.5+ds1-1")
    runc_deb(slot_cache, "1.3.7+ds1-1")
    (env.cache / "runc-9").mkdir()
    runc_deb(env.cache / "runc-9", "9.0.0-1")   # another slot's cache is not a candidate
    r = env.install(FAKE_NET="down", FAKE_UPDATE_RC="100")
    assert r.returncode == 0, r.stderr
    assert "apt-get update of the private sources" in r.stderr
    assert "taking the cached 1.3.7+ds1-1" in r.stderr
    assert env.version_file()["version"] == "1.3.7+ds1-1"
    assert env.apt_calls().count("apt-get update --error-on=any") == 1


def test_update_fails_but_download_works_with_old_lists(env):
    env.publish("sid", "1.3.6+ds1-1")
    (env.repo / ".listed").touch()        # lists an earlier run left
    r = env.install(FAKE_UPDATE_RC="100")
    assert r.returncode == 0, r.stderr
    assert env.version_file()["version"] == "1.3.6+ds1-1"


def test_nothing_to_be_had_is_a_hard_error(env):
    r = env.install(FAKE_NET="down", FAKE_UPDATE_RC="100")
    assert r.returncode != 0
    assert "cannot get runc 1.3.6 (Debian sid)" in r.stderr
    assert not (env.deps / "runc-1.3.6").exists()


def test_broken_cached_deb_is_dropped_and_fetched_again(env):
    env.publish("sid", "1.3.6+ds1-1")
    slot_cache = env.cache / "runc-1.3.6"
    slot_cache.mkdir(parents=True)
    good = runc_deb(slot_cache, "1.3.6+ds1-1")
    good.write_bytes(good.read_bytes()[:-200])   # control member intact, data truncated
    r = env.install()
    assert r.returncode == 0, r.stderr
    assert "does not unpack" in r.stderr
    assert env.version_file()["version"] == "1.3.6+ds1-1"
    assert "apt-get download runc=1.3.6+ds1-1" in env.apt_calls()


def libc_debs(dest: Path) -> None:
    build_deb(dest, "libc6", "2.41-12", {
        "usr/lib/x86_64-linux-gnu/libc.so.6": "fake libc",
        "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2": "fake ld",
    })
    build_deb(dest, "libseccomp2", "2.6.0-2",
              {"usr/lib/x86_64-linux-gnu/libseccomp.so.2": "fake seccomp"})


def test_private_glibc_comes_from_the_cache_without_apt(env):
    cache = env.cache / "glibc-trixie"
    cache.mkdir(parents=True)
    libc_debs(cache)
    r = env.run(f"_pyshim_priv_glibc {env.tmp}/slot\n", FAKE_NET="down", FAKE_UPDATE_RC="100")
    assert r.returncode == 0, r.stderr
    lib = env.tmp / "slot" / "lib"
    assert {p.name for p in lib.iterdir()} >= {
        "libc.so.6", "ld-linux-x86-64.so.2", "libseccomp.so.2", ".complete"
    }
    assert (lib / ".libc6-version").read_text().strip() == "2.41-12"
    assert env.apt_calls() == []


def test_private_glibc_is_fetched_into_the_cache(env):
    libc_debs(env.repo / "trixie")
    r = env.run(f"_pyshim_priv_glibc {env.tmp}/slot\n")
    assert r.returncode == 0, r.stderr
    assert (env.tmp / "slot/lib/libc.so.6").is_file()
    assert sorted(p.name for p in (env.cache / "glibc-trixie").glob("*.deb")) == [
        "libc6_2.41-12_amd64.deb", "libseccomp2_2.6.0-2_amd64.deb"
    ]
    assert "apt-get download libc6/trixie" in env.apt_calls()


def test_valid_until_check_is_off_for_the_private_sources_only(env):
    r = env.run("""\
        _pyshim_priv_apt_opts
        echo ---
        _pyshim_pkg_installed() { return 1; }
        PYSHIM_APT_PACKAGES=(hello)
        pyshim_apt_packages
        """)
    assert r.returncode == 0, r.stderr
    private, _ = r.stdout.split("---")
    assert "Acquire::Check-Valid-Until=false" in private.splitlines()
    assert env.apt_calls() == ["apt-get update", "apt-get install -y --no-install-recommends hello"]
    raw = Path(f"{env.log}.raw").read_text()
    assert "DPkg::Lock::Timeout" in raw and "Valid-Until" not in raw
