#!/usr/bin/env bash
# Install tun2xray from this checkout into a virtual environment, .venv.
#
#   bash tools/install.sh           what running tun2xray needs
#   bash tools/install.sh --test    also the test and benchmark world (v2ray,
#                                   iperf3, nginx, wrk, dnsmasq, pytest, ...)
#   bash tools/install.sh --abi     also what building the C library needs
#                                   (python3 -m tun2xray.abi build): cffi in
#                                   the venv; gcc, libc6-dev, python3-dev
#                                   (--test includes it)
#
# Python: Debian's /usr/bin/python3 when there is one, else python3 on PATH;
# 3.11 or newer. Nothing is pip-installed into that Python (Debian forbids it,
# PEP 668, and it may carry other projects' packages): the venv gets it all.
# As root on Debian/Ubuntu, missing system packages are apt-installed and the
# command is linked as /usr/local/bin/tun2xray. Running it again is cheap:
# what is already there is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=$ROOT/.venv
LINK=/usr/local/bin/tun2xray
TEST_DEBS=(v2ray iperf3 curl dnsutils dnsmasq-base socat tcpdump iproute2 ethtool nginx-light wrk debootstrap)
ABI_DEBS=(gcc libc6-dev python3-dev)    # a C compiler and Python.h/libpython for cffi

LOG=$(mktemp "${TMPDIR:-/tmp}/tun2xray-install.XXXXXX")
trap 'rm -f "$LOG"' EXIT

say() { echo "install.sh: $*"; }
fail() {  # one line; the full output stays in the log
    trap - EXIT
    echo "install.sh: error: $* (full output: $LOG)" >&2
    exit 1
}
die() { echo "install.sh: error: $*" >&2; exit 1; }

TEST=0
ABI=0
for arg in "$@"; do
    case $arg in
        --test) TEST=1; ABI=1 ;;
        --abi) ABI=1 ;;
        -h|--help) sed -n '2,/^set /{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
        *) die "unknown option '$arg' (usage: bash tools/install.sh [--test] [--abi])" ;;
    esac
done

ROOT_USER=0; [ "$(id -u)" = 0 ] && ROOT_USER=1
APT=0; command -v apt-get >/dev/null && command -v dpkg-query >/dev/null && APT=1

missing_debs() {
    local p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
    done
}

apt_install() {
    say "apt-get install $*"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >>"$LOG" 2>&1 || fail "apt-get update failed: $(grep '^E:' "$LOG" | tail -n1)"
    apt-get install -y -qq --no-install-recommends "$@" >>"$LOG" 2>&1 \
        || fail "apt-get install $* failed: $(grep '^E:' "$LOG" | tail -n1)"
}

pick_python() {
    if [ -x /usr/bin/python3 ]; then echo /usr/bin/python3; else command -v python3 || true; fi
}

venv_ok() {  # a venv we can use: its python runs and is new enough
    [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}

check_version() {  # before anything is installed for a Python we cannot use
    "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
        || die "tun2xray needs Python 3.11 or newer; $1 is $("$1" -V 2>&1)"
}

# --- system packages: a Python that can make a venv, and the test world ---
debs=()
PY=$(pick_python)
if ! venv_ok; then
    [ -z "$PY" ] || check_version "$PY"
    if [ -z "$PY" ]; then
        debs+=(python3 python3-venv)
    elif [ "$PY" = /usr/bin/python3 ] && ! "$PY" -c 'import ensurepip, venv' 2>/dev/null; then
        debs+=(python3-venv)    # Debian keeps ensurepip out of python3 itself
    fi
fi
if ((TEST)) && ((APT)); then
    mapfile -t more < <(missing_debs "${TEST_DEBS[@]}")
    debs+=("${more[@]}")
fi
if ((ABI)) && ((APT)); then
    mapfile -t more < <(missing_debs "${ABI_DEBS[@]}")
    debs+=("${more[@]}")
fi
if ((${#debs[@]})); then
    if ((ROOT_USER && APT)); then
        apt_install "${debs[@]}"
    elif [[ " ${debs[*]} " == *" python3"* ]]; then
        ((APT)) || die "no python3 found: tun2xray needs Python 3.11 or newer (with its venv module)"
        die "missing Debian packages: ${debs[*]}; as root run: apt-get install ${debs[*]}"
    else
        say "warning: --test/--abi need Debian packages that are missing (install them as root): ${debs[*]}" >&2
    fi
fi
PY=$(pick_python)
[ -n "$PY" ] || die "no python3 found: tun2xray needs Python 3.11 or newer"

# --- the virtual environment ---
if ! venv_ok; then
    check_version "$PY"
    rm -rf "$VENV"
    "$PY" -m venv "$VENV" >>"$LOG" 2>&1 || { rm -rf "$VENV"; fail "$PY -m venv .venv failed"; }
    say "made .venv with $PY ($("$PY" -V 2>&1))"
fi
base=$("$VENV/bin/python" -c 'import sys; print(sys._base_executable)')

# --- the project (editable: the checkout is the code that runs) ---
spec=.
((ABI)) && spec='.[abi]'
((TEST)) && spec='.[test]'
hash=$( { echo "$ROOT"; cat pyproject.toml; } | sha256sum | cut -d' ' -f1)
stamp=$VENV/.tun2xray-installed
have=$(cat "$stamp" 2>/dev/null || true)
if { [ "$have" = "$hash $spec" ] || [ "$have" = "$hash .[test]" ]; } \
        && "$VENV/bin/tun2xray" --version >/dev/null 2>&1; then
    :   # same checkout, same pyproject.toml, same extras (or more): nothing to do
else
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q -e "$spec" >>"$LOG" 2>&1 \
        || fail "pip install -e '$spec' into .venv failed: $(grep -E '^ *ERROR:' "$LOG" | tail -n1 | sed 's/^ *//')"
    echo "$hash $spec" >"$stamp"
fi
version=$("$VENV/bin/tun2xray" --version 2>&1) \
    || fail "the installed tun2xray does not start: $(tail -n1 <<<"$version")"
extra=
((TEST)) && extra=", with the test tools"
say "$version in $VENV (Python $("$VENV/bin/python" -c 'import platform; print(platform.python_version())') from $base)$extra"

# --- the command ---
if ((ROOT_USER)); then
    if [ -L "$LINK" ] || [ ! -e "$LINK" ]; then
        mkdir -p "${LINK%/*}"
        ln -sfn "$VENV/bin/tun2xray" "$LINK"
        say "command: $LINK -> $VENV/bin/tun2xray"
        found=$(type -P tun2xray || true)
        if [ "$found" != "$LINK" ]; then
            say "note: 'tun2xray' on this PATH is ${found:-nothing} (${LINK%/*} is not on PATH or comes later)"
        fi
    else
        say "warning: $LINK exists and is not a link, left alone; run $VENV/bin/tun2xray"
    fi
else
    say "command: $VENV/bin/tun2xray (not root: nothing linked; add $VENV/bin to PATH)"
fi
