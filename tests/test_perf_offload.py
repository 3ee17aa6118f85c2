"""Offloads as the default of tun://, the fallback, and checksum offload on write.

Runs device code in a child process inside a private network namespace
(as tests/test_device_tun.py does): the kernel's own sockets see what the
TUN delivers, so a wrong partial checksum or GSO header shows up as data
that never arrives.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="TUN devices and network namespaces need root")

PRELUDE = """
import json, os, select, socket, struct, subprocess, sys, time
from tun2xray.device import open_device, DeviceError
result = {}
"""


@pytest.fixture(scope="module")
def netns():
    name = f"pf-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def run_child(ns: str, body: str, timeout: float = 30) -> dict:
    code = PRELUDE + textwrap.dedent(body) + "\nprint(json.dumps(result))\n"
    r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], capture_output=True,
                       text=True, timeout=timeout, env=dict(os.environ, PYTHONPATH=REPO))
    assert r.returncode == 0, f"child failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_offload_is_the_default_and_offload0_forces_plain(netns):
    res = run_child(netns, """
        for url in ("tun://pftun1", "tun://pftun1?offload=0", "tun://pftun1?offload=1"):
            dev = open_device(url, mtu=1500, addresses=["10.81.0.1/24"])
            k = subprocess.run(["ethtool", "-k", "pftun1"], capture_output=True, text=True).stdout
            result[url] = [type(dev).__name__, dev.offload, dev.gso_max, dev.offload_refused,
                           "tcp-segmentation-offload: on" in k]
            dev.close()
    """)
    assert res["tun://pftun1"] == ["OffloadTunDevice", True, 65535 - 120, None, True]
    assert res["tun://pftun1?offload=1"] == ["OffloadTunDevice", True, 65535 - 120, None, True]
    assert res["tun://pftun1?offload=0"] == ["TunDevice", False, 0, None, False]


def test_refused_offloads_fall_back_to_a_plain_tun_unless_required(netns):
    res = run_child(netns, """
        import errno
        import tun2xray.device.offload as off

        def refuse(fd):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        off.enable_offloads = refuse
        dev = open_device("tun://pftun2", mtu=1500, addresses=["10.82.0.1/24"])
        result["auto"] = [type(dev).__name__, dev.offload, dev.offload_refused]
        # the plain TUN works: a datagram from the kernel arrives without a vnet header
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.sendto(b"plain", ("10.82.0.2", 9))
        p = None
        deadline = time.monotonic() + 3
        while p is None and time.monotonic() < deadline:
            select.select([dev.fileno()], [], [], 0.1)
            for q in dev.read_batch():
                if q[0] >> 4 == 4 and q[9] == 17:
                    p = q
        result["first_byte"] = p[0] if p else None
        result["payload"] = p[28:].decode() if p else None
        dev.close()
        try:
            open_device("tun://pftun2?offload=1", mtu=1500)
            result["required"] = "opened"
        except DeviceError as e:
            result["required"] = str(e)
        result["left"] = subprocess.run(["ip", "link", "show", "pftun2"], capture_output=True).returncode
    """)
    assert res["auto"] == ["TunDevice", False, "the kernel refused TUN offloads: Invalid argument"]
    assert res["first_byte"] == 0x45 and res["payload"] == "plain"
    assert res["required"] == "tun://pftun2?offload=1: the kernel refused TUN offloads: Invalid argument"
    assert res["left"] != 0          # no TUN left behind by either attempt


PARTIAL_CHILD = """
import ipaddress
from netstack import StackConfig
from netstack.tcp import GsoSegment
from netstack.wire.templates import TcpTemplate, UdpTemplate
V6 = {v6}
LOCAL, PEER = ("fd00:83::1", "fd00:83::2") if V6 else ("10.83.0.1", "10.83.0.2")
fam = socket.AF_INET6 if V6 else socket.AF_INET
dev = open_device("tun://pftun3", mtu=1500, addresses=[LOCAL + ("/64" if V6 else "/24")])
assert dev.offload
dev.tx_csum_partial = True
cfg = StackConfig(mtu=1500, checksum_offload=True)
lip, pip = ipaddress.ip_address(LOCAL).packed, ipaddress.ip_address(PEER).packed
family = 6 if V6 else 4
# UDP: a datagram with only the pseudo-header sum must reach a kernel socket
u = socket.socket(fam, socket.SOCK_DGRAM)
u.bind((LOCAL, 7000))
u.settimeout(3)
udp = UdpTemplate(family, pip, lip, 4000, 7000, cfg)
dev.write_batch(udp.build(b"partial-udp"))
result["udp"] = u.recv(100).decode()
# TCP: handshake by hand, then one 40000-byte super-segment with gso_size 1000
srv = socket.socket(fam, socket.SOCK_STREAM)
srv.setblocking(False)
srv.connect_ex((PEER, 8080))
def tcp_fields(p):
    ihl = 40 if V6 else (p[0] & 15) * 4
    if (p[6] if V6 else p[9]) != 6:
        return None
    return struct.unpack_from("!HHIIBB", p, ihl)
syn = None
deadline = time.monotonic() + 3
while syn is None and time.monotonic() < deadline:
    select.select([dev.fileno()], [], [], 0.1)
    for p in dev.read_batch():
        f = tcp_fields(p)
        if f and f[5] == 0x02:
            syn = f
sport, cseq = syn[0], syn[2]
tpl = TcpTemplate(family, pip, lip, 8080, sport, cfg)
dev.write_batch([tpl.build(5000, (cseq + 1) & 0xFFFFFFFF, 0x12, 65535, b"\\x02\\x04\\x05\\xb4", b"")])
select.select([], [srv], [], 3)
result["connected"] = srv.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
payload = bytes((i * 13) & 0xFF for i in range(40000))
pkt = GsoSegment(tpl.build(5001, (cseq + 1) & 0xFFFFFFFF, 0x18, 65535, b"", payload))
pkt.gso_size = 1000
result["written"] = dev.write_batch([pkt])
srv.setblocking(True)
srv.settimeout(3)
buf = b""
while len(buf) < len(payload):
    chunk = srv.recv(65536)
    if not chunk:
        break
    buf += chunk
result["tcp_ok"] = buf == payload
result["stats"] = dev.stats
dev.close()
"""


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_partial_checksums_are_completed_by_the_kernel(netns, v6):
    # The engine's offload mode: the stack writes only pseudo-header sums
    # (StackConfig.checksum_offload) and the device marks the packets
    # NEEDS_CSUM; a super-segment goes out with no copy, cut at gso_size.
    res = run_child(netns, PARTIAL_CHILD.format(v6=v6))
    assert res["udp"] == "partial-udp"
    assert res["connected"] is True
    assert res["written"] == 1 and res["stats"]["tx_gso"] == 1
    assert res["tcp_ok"] is True
    assert res["stats"]["tx_dropped"] == 0 and res["stats"]["tx_errors"] == 0


def test_created_tun_queues_4096_packets_an_existing_one_is_left_alone(netns):
    res = run_child(netns, """
        def qlen(name):
            r = subprocess.run(["ip", "-j", "link", "show", name], capture_output=True, text=True)
            return json.loads(r.stdout)[0]["txqlen"]
        dev = open_device("tun://pftun4?offload=0", addresses=["10.84.0.1/24"])
        result["created"] = qlen("pftun4")
        dev.close()
        subprocess.run(["ip", "tuntap", "add", "dev", "pftun5", "mode", "tun"], check=True)
        subprocess.run(["ip", "link", "set", "pftun5", "txqueuelen", "777"], check=True)
        dev = open_device("tun://pftun5", addresses=["10.85.0.1/24"])
        result["existing"] = qlen("pftun5")
        dev.close()
        subprocess.run(["ip", "link", "del", "pftun5"], check=True)
    """)
    assert res == {"created": 4096, "existing": 777}


def test_tun_devices_declare_their_capabilities(netns):
    res = run_child(netns, """
        from tun2xray.device import Capabilities
        for url in ("tun://pftun5", "tun://pftun5?offload=0", "tun://pftun5?multiqueue=1&offload=0"):
            dev = open_device(url, mtu=1500, addresses=["10.85.0.1/24"])
            result[url] = [dev.capabilities == c for c in (
                Capabilities(offload=True, gso_max=65535 - 120, vouches_for_checksums=True,
                             checksum_offload=True, framing="vnet"),
                Capabilities(vouches_for_checksums=True),
                Capabilities(vouches_for_checksums=True, multiqueue=True))]
            if dev.capabilities.checksum_offload:
                result["partial"] = [dev.tx_csum_partial, dev.use_checksum_offload(), dev.tx_csum_partial]
            dev.close()
    """)
    assert res["tun://pftun5"] == [True, False, False]
    assert res["tun://pftun5?offload=0"] == [False, True, False]
    assert res["tun://pftun5?multiqueue=1&offload=0"] == [False, False, True]
    assert res["partial"] == [False, True, True]
