#!/usr/bin/env bash
# Install tun2xray and what its tests use on a fresh Debian/Ubuntu machine.
# Idempotent: skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBS=(v2ray iperf3 curl dnsutils dnsmasq-base socat tcpdump iproute2 ethtool nginx-light wrk)
need=()
for p in "${DEBS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if ((${#need[@]})); then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    else
        echo "install.sh: missing Debian packages (install them as root): ${need[*]}" >&2
    fi
fi
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -e '.[test]'
