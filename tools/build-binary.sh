#!/usr/bin/env bash
# Build dist/tun2xray: one self-contained executable for Linux (PyInstaller
# onefile) with the interpreter, tun2xray, netstack, uvloop, pyroute2, dpkt and dnspython
# inside. Needs nothing on the machine that runs it but glibc (2.36 or newer
# when built on Debian 12) and zlib.
#
# Self-contained and idempotent: it makes (or reuses) its own virtual
# environment in build/binary-venv, from /usr/bin/python3 when there is one,
# installs the project (not editable) and PyInstaller into it and never
# touches a system Python. A second run reuses the venv and PyInstaller's
# cache (about 30 s on two cores).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=build/binary-venv
WORK=build/binary-work
OUT=dist
PYINSTALLER='pyinstaller>=6.10,<7'     # 6.9+: workers started through sys.executable reuse the unpacked files

say() { echo "build-binary: $*"; }
die() { echo "build-binary: error: $*" >&2; exit 1; }

[ "$(uname -s)/$(uname -m)" = Linux/x86_64 ] || say "warning: built and tested on Linux x86_64 only"

if [ -x /usr/bin/python3 ]; then PY=/usr/bin/python3; else PY=$(command -v python3) || die "no python3"; fi

# What the freezer needs from the OS: venv + ensurepip, the shared libpython
# it bundles, and objdump (binutils). Installed with apt-get when missing.
debs_needed() {
    local ver libdir
    ver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    "$PY" -c 'import venv, ensurepip' 2>/dev/null || echo "python3-venv python$ver-venv"
    libdir=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR") or "")')
    ls "$libdir"/libpython"$ver"*.so* >/dev/null 2>&1 || echo "libpython$ver"
    command -v objdump >/dev/null || echo binutils
}
need=$(debs_needed | tr '\n' ' ')
if [ -n "${need// /}" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        say "installing Debian packages: $need"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        # shellcheck disable=SC2086
        apt-get install -y -qq --no-install-recommends $need >/dev/null
    else
        die "missing (install them as root): $need"
    fi
fi

if ! "$VENV/bin/python" -c 'import pip' 2>/dev/null; then
    say "making $VENV from $PY ($("$PY" --version 2>&1))"
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip -q --disable-pip-version-check --no-input "$@"; }
pip install "$PYINSTALLER"
# the project, not editable: pip rebuilds a local folder on every install (so
# the bundle holds this checkout); its dependencies only when they are missing
rm -rf build/lib build/bdist.*      # setuptools' staging: a module removed here must not linger in the wheel
pip install .

PYI_CONFIG_DIR=$PWD/build/pyinstaller-cache
export PYINSTALLER_CONFIG_DIR=$PYI_CONFIG_DIR
# What the code imports (pytun too, while it is a dependency) is found by
# PyInstaller's import analysis; pyroute2 imports many of its modules by name
# at run time: tools/pyinstaller-hooks/hook-pyroute2.py names them. dnspython
# loads a record type's module when it first meets the type: dns.rdtypes whole.
start=$(date +%s)
"$VENV/bin/python" -m PyInstaller --noconfirm --log-level WARN --onefile --strip --name tun2xray \
    --distpath "$OUT" --workpath "$WORK" --specpath "$WORK" \
    --collect-submodules tun2xray --collect-submodules netstack \
    --collect-data tun2xray --copy-metadata tun2xray \
    --collect-submodules uvloop --collect-submodules dpkt --collect-submodules dns.rdtypes \
    --additional-hooks-dir tools/pyinstaller-hooks --exclude-module tkinter --exclude-module test \
    tools/binary_entry.py
size=$(stat -c %s "$OUT/tun2xray")
say "built $OUT/tun2xray in $(( $(date +%s) - start ))s: $size bytes ($(( size / 1024 / 1024 )) MiB)"
"$OUT/tun2xray" --help >/dev/null || die "$OUT/tun2xray --help failed"
