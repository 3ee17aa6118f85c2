"""tun:// against a real Linux TUN inside a network namespace this module makes.

Each test runs the device code in a child process inside the namespace
(``ip netns exec``), where the kernel's own sockets, ping and routes talk to
the TUN; the child prints one JSON line of observations that the test checks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid

import dpkt
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="TUN devices and network namespaces need root")

PRELUDE = """
import json, os, select, socket, subprocess, sys, time
import asyncio
from tun2xray.device import open_device, DeviceError

def wait_packets(dev, want, timeout=3.0):
    # read batches until want(packet) matches one; returns (match, all_read)
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        select.select([dev.fileno()], [], [], 0.1)
        for p in dev.read_batch():
            seen.append(p)
            if want(p):
                return p, seen
    return None, seen

def ip_json(name):
    r = subprocess.run(["ip", "-j", "addr", "show", "dev", name], capture_output=True, text=True)
    return json.loads(r.stdout)[0] if r.returncode == 0 else None

def exists(name):
    try:
        socket.if_nametoindex(name)
        return True
    except OSError:
        return False

result = {}
"""


@pytest.fixture(scope="module")
def netns():
    name = f"dv-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def run_child(ns: str, body: str, *, prefix: list[str] | None = None, timeout: float = 30) -> dict:
    code = PRELUDE + textwrap.dedent(body) + "\nprint(json.dumps(result))\n"
    cmd = ["ip", "netns", "exec", ns] + (prefix or []) + [sys.executable, "-c", code]
    env = dict(os.environ, PYTHONPATH=REPO)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, f"child failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_created_tun_gets_mtu_addresses_up_and_is_removed_on_close(netns):
    res = run_child(
        netns,
        """
        dev = open_device("tun://dvtun0", mtu=1400, addresses=["10.61.0.1/24", "fd00:61::1/64"])
        result["created"] = dev.created
        result["name"] = dev.name
        result["mtu"] = dev.mtu
        result["trusted"] = dev.trusted_checksums
        result["blocking"] = os.get_blocking(dev.fileno())
        result["link"] = ip_json("dvtun0")
        dev.close()
        dev.close()  # idempotent
        result["exists_after_close"] = exists("dvtun0")
        try:
            dev.read_batch()
        except DeviceError as e:
            result["read_after_close"] = str(e)
        """,
    )
    assert res["created"] is True
    assert res["name"] == "dvtun0"
    assert res["mtu"] == 1400 and res["link"]["mtu"] == 1400
    assert res["trusted"] is True
    assert res["blocking"] is False
    assert "UP" in res["link"]["flags"]
    addrs = {(a["local"], a["prefixlen"]) for a in res["link"]["addr_info"]}
    assert ("10.61.0.1", 24) in addrs
    assert ("fd00:61::1", 64) in addrs
    v6 = [a for a in res["link"]["addr_info"] if a["local"] == "fd00:61::1"][0]
    assert not v6.get("tentative", False)
    assert res["exists_after_close"] is False
    assert "closed" in res["read_after_close"]


def test_existing_tun_is_attached_and_left_in_place(netns):
    subprocess.run(["ip", "-n", netns, "tuntap", "add", "dev", "dvtun9", "mode", "tun"], check=True)
    try:
        res = run_child(
            netns,
            """
            dev = open_device("tun://dvtun9", mtu=1300, addresses=["10.69.0.1/24"])
            result["created"] = dev.created
            result["mtu"] = dev.mtu
            dev.close()
            result["exists_after_close"] = exists("dvtun9")
            # opening twice re-adds the same address: must not fail
            dev = open_device("tun://dvtun9", addresses=["10.69.0.1/24"])
            result["mtu_kept"] = dev.mtu
            dev.close()
            """,
        )
        assert res["created"] is False
        assert res["mtu"] == 1300
        assert res["exists_after_close"] is True
        assert res["mtu_kept"] == 1300
    finally:
        subprocess.run(["ip", "-n", netns, "link", "del", "dvtun9"], check=False)


def test_kernel_udp_and_echo_request_reach_us_and_our_echo_reply_reaches_the_kernel(netns):
    res = run_child(
        netns,
        """
        dev = open_device("tun://dvtun1", mtu=1500, addresses=["10.62.0.1/24"])
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.sendto(b"dv-probe", ("10.62.0.2", 5000))
        udp, _ = wait_packets(dev, lambda p: p[0] >> 4 == 4 and p[9] == 17)
        result["udp"] = udp.hex() if udp else None
        # the kernel's ICMP: a raw socket sends an echo request to the far side
        icmp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        icmp.settimeout(3)
        def csum(b):
            if len(b) % 2: b = b + b"\\0"
            s = sum(int.from_bytes(b[i:i+2], "big") for i in range(0, len(b), 2))
            while s >> 16: s = (s & 0xFFFF) + (s >> 16)
            return (~s & 0xFFFF).to_bytes(2, "big")
        echo = bytearray(b"\\x08\\x00\\x00\\x00\\x12\\x34\\x00\\x01dv-ping-payload")
        echo[2:4] = csum(bytes(echo))
        icmp.sendto(bytes(echo), ("10.62.0.2", 0))
        req, _ = wait_packets(dev, lambda p: p[0] >> 4 == 4 and p[9] == 1 and p[20] == 8)
        result["echo_request"] = req.hex() if req else None
        if req:
            # echo reply: swap addresses, type 0, fix both checksums
            ihl = (req[0] & 15) * 4
            ip = bytearray(req)
            ip[12:16], ip[16:20] = req[16:20], req[12:16]
            ip[10:12] = b"\\0\\0"
            ip[10:12] = csum(bytes(ip[:ihl]))
            ip[ihl] = 0
            ip[ihl+2:ihl+4] = b"\\0\\0"
            ip[ihl+2:ihl+4] = csum(bytes(ip[ihl:]))
            result["written"] = dev.write_batch([bytes(ip)])
        reply, addr = icmp.recvfrom(2000)
        ihl = (reply[0] & 15) * 4
        result["reply"] = [addr[0], reply[ihl], reply[ihl+4:ihl+8].hex(), reply[ihl+8:].decode()]
        result["stats"] = dev.stats
        dev.close()
        """,
    )
    ip = dpkt.ip.IP(bytes.fromhex(res["udp"]))
    assert ip.src == bytes([10, 62, 0, 1]) and ip.dst == bytes([10, 62, 0, 2])
    assert ip.data.dport == 5000 and ip.data.data == b"dv-probe"
    assert res["echo_request"] is not None
    assert res["written"] == 1
    assert res["reply"] == ["10.62.0.2", 0, "12340001", "dv-ping-payload"]
    st = res["stats"]
    assert st["tx_packets"] == 1 and st["tx_dropped"] == 0
    assert st["rx_packets"] >= 2 and st["rx_bytes"] >= len(ip) + 28


def _udp_packet(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    import ipaddress

    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    u = dpkt.udp.UDP(sport=sport, dport=dport, data=payload)
    u.ulen = len(u)
    if s.version == 4:
        pkt = dpkt.ip.IP(src=s.packed, dst=d.packed, p=17, ttl=64, data=u)
        pkt.len = len(pkt)
        return bytes(pkt)
    pkt = dpkt.ip6.IP6(src=s.packed, dst=d.packed, nxt=17, hlim=64, data=u, plen=len(u))
    pkt.extension_hdrs = {}
    # dpkt does not fill the v6 UDP checksum on its own: compute it here.
    pseudo = s.packed + d.packed + len(u).to_bytes(4, "big") + b"\0\0\0\x11"
    u.sum = 0
    raw = pseudo + bytes(u)
    if len(raw) % 2:
        raw += b"\0"
    total = sum(int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    u.sum = (~total & 0xFFFF) or 0xFFFF
    return bytes(pkt)


def test_crafted_udp_written_to_tun_is_delivered_to_kernel_sockets(netns):
    pkts = [
        _udp_packet("10.63.0.2", "10.63.0.1", 4000, 7000, b"to-v4-socket"),
        _udp_packet("fd00:63::2", "fd00:63::1", 4000, 7000, b"to-v6-socket"),
    ]
    res = run_child(
        netns,
        f"""
        dev = open_device("tun://dvtun2", addresses=["10.63.0.1/24", "fd00:63::1/64"])
        s4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s4.bind(("10.63.0.1", 7000))
        s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s6.bind(("fd00:63::1", 7000))
        s4.settimeout(3); s6.settimeout(3)
        pkts = [bytes.fromhex(h) for h in {[p.hex() for p in pkts]!r}]
        result["written"] = dev.write_batch(pkts)
        data, addr = s4.recvfrom(100); result["v4"] = [data.decode(), addr[0], addr[1]]
        data, addr = s6.recvfrom(100); result["v6"] = [data.decode(), addr[0], addr[1]]
        # a packet the kernel refuses outright (not IP) is skipped and counted
        result["written_bad"] = dev.write_batch([b"\\x00" * 20, pkts[0]])
        data, addr = s4.recvfrom(100); result["v4_again"] = data.decode()
        result["stats"] = dev.stats
        dev.close()
        """,
    )
    assert res["written"] == 2
    assert res["v4"] == ["to-v4-socket", "10.63.0.2", 4000]
    assert res["v6"] == ["to-v6-socket", "fd00:63::2", 4000]
    assert res["written_bad"] == 2
    assert res["v4_again"] == "to-v4-socket"
    st = res["stats"]
    assert st["tx_packets"] == 3
    assert st["tx_errors"] == 1 and st["tx_dropped"] == 1
    assert st["tx_bytes"] == 2 * len(pkts[0]) + len(pkts[1])


def test_read_batch_respects_max_and_drains_to_eagain(netns):
    res = run_child(
        netns,
        """
        dev = open_device("tun://dvtun3", addresses=["10.64.0.1/24"])
        dev.read_batch()  # router solicitations etc.
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for i in range(50):
            s.sendto(b"n%02d" % i, ("10.64.0.2", 6000))
        time.sleep(0.2)
        first = dev.read_batch(max_packets=10)
        rest = dev.read_batch(max_packets=1000)
        udp = [p for p in first + rest if p[9] == 17]
        result["first"] = len(first)
        result["payloads"] = [p[28:].decode() for p in udp]
        result["empty"] = len(dev.read_batch())
        dev.close()
        """,
    )
    assert res["first"] == 10
    assert res["payloads"] == ["n%02d" % i for i in range(50)]
    assert res["empty"] == 0


def test_open_inside_running_event_loops(netns):
    # pyroute2's synchronous API cannot run inside a running loop; the device
    # must still open from the engine's coroutine (asyncio and uvloop).
    res = run_child(
        netns,
        """
        async def main():
            dev = open_device("tun://dvtun4", mtu=9000, addresses=["10.65.0.1/24"])
            mtu = dev.mtu
            dev.close()
            return mtu
        result["asyncio"] = asyncio.run(main())
        import uvloop
        result["uvloop"] = uvloop.run(main())
        """,
    )
    assert res == {"asyncio": 9000, "uvloop": 9000}


def test_deleted_interface_and_bad_names_give_device_errors(netns):
    res = run_child(
        netns,
        """
        dev = open_device("tun://dvtun5", addresses=["10.66.0.1/24"])
        subprocess.run(["ip", "link", "del", "dvtun5"], check=True)
        for op in ("read", "write"):
            try:
                dev.read_batch() if op == "read" else dev.write_batch([b"E" + bytes(19)])
                result[op] = "no error"
            except DeviceError as e:
                result[op] = str(e)
        dev.close()
        errs = {}
        for url, kw in [("tun://lo", {}), ("tun://dv-this-name-is-too-long", {}),
                        ("tun://dvtun6", {"addresses": ["10.0.0.300/24"]}),
                        ("tun://dvtun6", {"mtu": 20}), ("tun://dvtun6?x=1", {})]:
            try:
                open_device(url, **kw)
                errs[url] = "opened"
            except DeviceError as e:
                errs[url + repr(kw)] = str(e)
        result["errs"] = errs
        result["dvtun6_exists"] = exists("dvtun6")
        """,
    )
    assert res["read"].startswith("tun://dvtun5: read failed")
    assert res["write"].startswith("tun://dvtun5:")
    errs = res["errs"]
    assert "not a TUN" in errs["tun://lo{}"]
    assert "not a valid interface name" in errs["tun://dv-this-name-is-too-long{}"]
    assert "is not an address/prefix" in errs["tun://dvtun6{'addresses': ['10.0.0.300/24']}"]
    assert "MTU 20" in errs["tun://dvtun6{'mtu': 20}"]
    assert "unknown option" in errs["tun://dvtun6?x=1{}"]
    assert all("\n" not in e for e in errs.values())
    assert res["dvtun6_exists"] is False


def test_missing_privileges_is_a_device_error(netns):
    res = run_child(
        netns,
        """
        try:
            open_device("tun://dvtun7")
            result["err"] = "opened"
        except DeviceError as e:
            result["err"] = str(e)
        result["exists"] = exists("dvtun7")
        """,
        # root without CAP_NET_ADMIN: TUNSETIFF is refused
        prefix=["setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin"],
    )
    assert res["err"] == "tun://dvtun7: cannot open TUN: permission denied (needs root or CAP_NET_ADMIN)"
    assert res["exists"] is False
