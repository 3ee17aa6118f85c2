#!/usr/bin/env bash
# The README's first command on a fresh, minimal Debian 12 (bookworm) or
# Ubuntu 24.04 (noble), as a new user would run it: debootstrap a minbase
# system into a temporary directory, copy this checkout into it (tracked files
# and new ones git does not ignore) and run the command in a chroot as root.
#
#   bash tools/fresh-debian-check.sh [--ubuntu] [--with-python3] [--keep]
#
#   --ubuntu        Ubuntu 24.04 from archive.ubuntu.com instead of Debian 12
#                   (Debian has no Ubuntu keyring: its Release file is not
#                   checked, --no-check-gpg)
#   --with-python3  install Debian's python3 (not python3-venv) first, as a
#                   cloud image has it; without it the image has no Python
#   --keep          leave the temporary system in place for a look
#
# Needs root, debootstrap and the network (the Debian mirror this machine's
# apt uses, and PyPI). Mounts live in a private mount namespace: they go away
# with it, also on failure. Exit status: the command's.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SUITE=bookworm

WITH_PY=0 KEEP=0 UBUNTU=0
for arg in "$@"; do
    case $arg in
        --ubuntu) UBUNTU=1 ;;
        --with-python3) WITH_PY=1 ;;
        --keep) KEEP=1 ;;
        *) echo "fresh-debian-check: unknown option '$arg'" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "fresh-debian-check: needs root (debootstrap, chroot)" >&2; exit 2; }
command -v debootstrap >/dev/null || { echo "fresh-debian-check: needs debootstrap (apt-get install debootstrap)" >&2; exit 2; }

mirror() {  # the first Debian archive this machine's apt uses (not -security)
    local m=
    if [ -r /etc/apt/sources.list.d/debian.sources ]; then
        m=$(awk '/^URIs:/ {print $2}' /etc/apt/sources.list.d/debian.sources | grep -v security | head -n1)
    fi
    if [ -z "$m" ] && [ -r /etc/apt/sources.list ]; then
        m=$(awk '$1 == "deb" && $0 !~ /security/ {print $2; exit}' /etc/apt/sources.list)
    fi
    echo "${m:-http://deb.debian.org/debian}"
}

cmd=$(sed -n '/<!-- install-command -->/,/<!-- \/install-command -->/{/^[^<`]/p}' README.md | head -n 1)
[ -n "$cmd" ] || { echo "fresh-debian-check: no install-command in README.md" >&2; exit 2; }

DIR=$(mktemp -d "${TMPDIR:-/tmp}/tun2xray-fresh-debian.XXXXXX")
SYS=$DIR/root
done_() {
    if ((KEEP)); then echo "fresh-debian-check: kept $SYS"; else rm -rf "$DIR"; fi
}
trap done_ EXIT

t0=$SECONDS
MIRROR=$(mirror)
opts=(--variant=minbase)
script=()
if ((UBUNTU)); then
    SUITE=noble MIRROR=http://archive.ubuntu.com/ubuntu
    opts+=(--no-check-gpg)
    # this debootstrap may predate noble; every Ubuntu suite uses the same script
    [ -e "/usr/share/debootstrap/scripts/$SUITE" ] || script=(/usr/share/debootstrap/scripts/gutsy)
fi
echo "fresh-debian-check: debootstrap ${opts[*]} $SUITE from $MIRROR"
debootstrap "${opts[@]}" "$SUITE" "$SYS" "$MIRROR" "${script[@]}" >"$DIR/debootstrap.log" 2>&1 \
    || { echo "fresh-debian-check: debootstrap failed:" >&2; tail -n 5 "$DIR/debootstrap.log" >&2; exit 1; }
echo "fresh-debian-check: base system in $((SECONDS - t0)) s"
cp /etc/resolv.conf "$SYS/etc/resolv.conf"
# the package sources a stock image has (debootstrap leaves only the release's main)
rm -f "$SYS/etc/apt/sources.list"
if ((UBUNTU)); then
    cat >"$SYS/etc/apt/sources.list.d/ubuntu.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: noble noble-updates noble-backports
Components: main universe restricted multiverse
Signed-By: /usr/share/keyrings/ubuntu-archive-keyring.gpg

Types: deb
URIs: http://security.ubuntu.com/ubuntu
Suites: noble-security
Components: main universe restricted multiverse
Signed-By: /usr/share/keyrings/ubuntu-archive-keyring.gpg
EOF
else
    cat >"$SYS/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${MIRROR%/debian}/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
fi
# the machine's own local CAs (e.g. a TLS-inspecting egress proxy): Debian's
# ca-certificates, pulled in with python3, adds them to the chroot's bundle
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    mkdir -p "$SYS/usr/local/share/ca-certificates"
    cp /usr/local/share/ca-certificates/*.crt "$SYS/usr/local/share/ca-certificates/"
fi
mkdir -p "$SYS/root/tun2xray"
if [ -e .git ]; then
    git ls-files -z --cached --others --exclude-standard \
        | tar --null -T - --ignore-failed-read -cf - | tar -xf - -C "$SYS/root/tun2xray"
else
    tar --exclude=.venv --exclude='*.egg-info' --exclude=__pycache__ -cf - . | tar -xf - -C "$SYS/root/tun2xray"
fi

inner=$(cat <<'EOF'
set -u
mount -t proc proc "$SYS/proc" && mount --rbind /dev "$SYS/dev" && mount -t sysfs sys "$SYS/sys" || exit 97
run() { chroot "$SYS" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        HOME=/root LANG=C.UTF-8 bash -c "$1"; }
if [ "$WITH_PY" = 1 ]; then
    echo "fresh-debian-check: apt-get install python3 (as a cloud image has it)"
    run 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3' \
        >"$SYS/../python3.log" 2>&1 || { echo "fresh-debian-check: apt-get install python3 failed" >&2; exit 98; }
fi
echo "fresh-debian-check: in the chroot: $CMD"
t1=$SECONDS
run "cd /root/tun2xray && $CMD"
rc=$?
echo "fresh-debian-check: the command exited $rc after $((SECONDS - t1)) s"
# what it must not have done: install into Debian's Python
run 'cd / && ! python3 -c "import tun2xray" 2>/dev/null' \
    || { echo "fresh-debian-check: the system python3 imports tun2xray" >&2; rc=1; }
run 'test -f "$(python3 -c "import sysconfig; print(sysconfig.get_path(\"stdlib\"))")/EXTERNALLY-MANAGED"' \
    || echo "fresh-debian-check: note: no PEP 668 marker in the chroot's python3" >&2
exit $rc
EOF
)
set +e
SYS=$SYS CMD=$cmd WITH_PY=$WITH_PY unshare --mount --propagation private bash -c "$inner"
rc=$?
set -e
echo "fresh-debian-check: $([ $rc = 0 ] && echo passed || echo "FAILED ($rc)") in $((SECONDS - t0)) s"
exit $rc
