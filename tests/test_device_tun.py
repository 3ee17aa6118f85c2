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

def qdisc_sent(name):
    r = subprocess.run(["tc", "-s", "-j", "qdisc", "show", "dev", name], capture_output=True, text=True,
                       check=True)
    return sum(q.get("packets", 0) for q in json.loads(r.stdout))

def wait_sent(name, n, timeout=10.0):
    # the TUN's qdisc counts a packet as sent when it hands it to the TUN
    # (which queues it for the reader): wait for that, not for a fixed time
    deadline = time.monotonic() + timeout
    while qdisc_sent(name) < n:
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}: {qdisc_sent(name)} of {n} packets through the qdisc")
        time.sleep(0.005)

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
        with open("/proc/sys/net/ipv6/conf/dvtun0/router_solicitations") as f:
            result["router_solicitations"] = f.read().strip()
        result["first_packets"] = [p.hex() for p in dev.read_batch()]
        dev.close()
        dev.close()  # idempotent
        result["exists_after_close"] = exists("dvtun0")
        try:
            dev.read_batch()
        except DeviceError as e:
            result["read_after_close"] = str(e)
        # no name: the kernel picks one, and it is still ours to remove
        auto = open_device("tun://")
        result["auto"] = [auto.name, auto.created, exists(auto.name)]
        auto.close()
        result["auto_after_close"] = exists(auto.name)
        """,
    )
    assert res["auto"][0].startswith("tun") and res["auto"][1:] == [True, True]
    assert res["auto_after_close"] is False
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
    # no IPv6 router solicitations (ICMPv6 type 133) from a TUN we made: the
    # kernel is told to send none (a wait for their absence could not fail)
    assert res["router_solicitations"] == "0"
    rs = [p for p in map(bytes.fromhex, res["first_packets"]) if p[0] >> 4 == 6 and p[6] == 58 and p[40] == 133]
    assert rs == []


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
        base = qdisc_sent("dvtun3")
        for i in range(50):
            s.sendto(b"n%02d" % i, ("10.64.0.2", 6000))
        wait_sent("dvtun3", base + 50)
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


OFFLOAD_CHILD = """
import ipaddress, struct
V6 = {v6}
LOCAL, PEER = {local!r}, {peer!r}
dev = open_device("tun://dvtun8?offload=1", mtu=1500, addresses=[LOCAL + ("/64" if V6 else "/24")])
result["offload"] = [dev.offload, dev.gso_max]
result["ethtool"] = subprocess.run(["ethtool", "-k", "dvtun8"], capture_output=True, text=True).stdout
lip, pip = ipaddress.ip_address(LOCAL).packed, ipaddress.ip_address(PEER).packed

def csum(b):
    if len(b) % 2: b += b"\\0"
    s = int.from_bytes(b, "big") % 0xFFFF
    return ~s & 0xFFFF if s else 0

def tcp(seq, ack, flags, payload=b"", opts=b""):
    # a TCP packet PEER:8080 -> LOCAL:sport with a full, correct checksum
    off = (20 + len(opts)) // 4
    th = struct.pack("!HHIIBBHHH", 8080, sport, seq, ack, off << 4, flags, 65535, 0, 0) + opts + payload
    tl = len(th)
    if V6:
        pseudo = pip + lip + struct.pack("!IxxxB", tl, 6)
        ip = struct.pack("!IHBB", 0x60000000, tl, 6, 64) + pip + lip
    else:
        pseudo = pip + lip + struct.pack("!xBH", 6, tl)
        ip = bytearray(struct.pack("!BBHHHBBH", 0x45, 0, 20 + tl, 1, 0x4000, 64, 6, 0) + pip + lip)
        ip[10:12] = csum(bytes(ip)).to_bytes(2, "big")
        ip = bytes(ip)
    c = csum(pseudo + th)
    return ip + th[:16] + c.to_bytes(2, "big") + th[18:]

def tcp_fields(p):
    ihl = 40 if V6 else (p[0] & 15) * 4
    if (p[6] if V6 else p[9]) != 6:
        return None
    sp, dp, seq, ack, off, fl = struct.unpack_from("!HHIIBB", p, ihl)
    return dict(sport=sp, seq=seq, ack=ack, flags=fl, data=p[ihl + (off >> 4) * 4:], len=len(p))

cli = socket.socket(socket.AF_INET6 if V6 else socket.AF_INET, socket.SOCK_STREAM)
cli.setblocking(False)
cli.connect_ex((PEER, 8080))
syn, _ = wait_packets(dev, lambda p: (tcp_fields(p) or {{}}).get("flags") == 0x02)
f = tcp_fields(syn)
sport = f["sport"]
iss = 1000
# SYN-ACK: MSS 1440, window scale 7
dev.write_batch([tcp(iss, f["seq"] + 1, 0x12, opts=b"\\x02\\x04\\x05\\xa0\\x01\\x03\\x03\\x07")])
select.select([], [cli], [], 3)
result["connected"] = cli.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
# upload: the kernel should hand us super-segments
unsent = 100000
got = 0  # in-order bytes received (retransmissions not counted twice)
big = 0
deadline = time.monotonic() + 5
while got < 100000 and time.monotonic() < deadline:
    if unsent:
        try:
            unsent -= cli.send(b"u" * unsent)
        except BlockingIOError:
            pass
    select.select([dev.fileno()], [], [], 0.05)
    for p in dev.read_batch():
        t = tcp_fields(p)
        if not t or not t["data"]:
            continue
        big = max(big, t["len"])
        start = (t["seq"] - f["seq"] - 1) & 0xFFFFFFFF
        if start <= got:
            got = max(got, start + len(t["data"]))
        # ack everything so far, keep the window open
        dev.write_batch([tcp(iss + 1, (f["seq"] + 1 + got) & 0xFFFFFFFF, 0x10)])
result["upload_bytes"] = got
result["largest_read"] = big
# download: one 30000-byte segment; the kernel must accept it
payload = bytes(range(256)) * 117 + bytes(48)
n = dev.write_batch([tcp(iss + 1, (f["seq"] + 1 + got) & 0xFFFFFFFF, 0x18, payload)])
result["written"] = n
buf = b""
cli.setblocking(True)
cli.settimeout(3)
while len(buf) < len(payload):
    chunk = cli.recv(65536)
    if not chunk:
        break
    buf += chunk
result["download_ok"] = buf == payload
result["stats"] = dev.stats
dev.close()
"""


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_offload_tun_passes_tcp_super_segments_both_ways(netns, v6):
    local, peer = ("fd00:68::1", "fd00:68::2") if v6 else ("10.68.0.1", "10.68.0.2")
    res = run_child(netns, OFFLOAD_CHILD.format(v6=v6, local=local, peer=peer))
    assert res["offload"] == [True, 65535 - 120]
    assert "tcp-segmentation-offload: on" in res["ethtool"]
    assert res["connected"] is True
    assert res["upload_bytes"] == 100000
    assert res["largest_read"] > 1500  # a super-segment, not wire-sized packets
    assert res["stats"]["rx_gso"] >= 1
    assert res["written"] == 1
    assert res["download_ok"] is True
    assert res["stats"]["tx_gso"] == 1
    assert res["stats"]["tx_dropped"] == 0


FORWARD_CHILD = """
import ipaddress, struct
V6 = {v6}
if V6:
    subprocess.run(["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"], check=True)
    SRC, DST = "fd00:70::2", "fd00:71::2"
    a = open_device("tun://dvtun10?offload=1", mtu=1500, addresses=["fd00:70::1/64"])
    b = open_device("tun://dvtun11?offload=0", mtu=1500, addresses=["fd00:71::1/64"])
else:
    subprocess.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True)
    SRC, DST = "10.70.0.2", "10.71.0.2"
    a = open_device("tun://dvtun10?offload=1", mtu=1500, addresses=["10.70.0.1/24"])
    b = open_device("tun://dvtun11?offload=0", mtu=1500, addresses=["10.71.0.1/24"])
sip, dip = ipaddress.ip_address(SRC).packed, ipaddress.ip_address(DST).packed
b.read_batch(1000)    # what came first (router solicitations); the reads below keep only TCP

def csum(b):
    if len(b) % 2: b += b"\\0"
    s = int.from_bytes(b, "big") % 0xFFFF
    return ~s & 0xFFFF if s else 0

def pseudo(tl):
    return sip + dip + (struct.pack("!IxxxB", tl, 6) if V6 else struct.pack("!xBH", 6, tl))

payload = bytes((i * 7) & 0xFF for i in range(40000))
opts = b"\\x01\\x01\\x08\\x0a" + struct.pack("!II", 12345, 678)  # NOP NOP timestamps
th = struct.pack("!HHIIBBHHH", 8080, 5555, 0xFFFFF000, 1, (20 + len(opts)) // 4 << 4, 0x18, 512, 0, 0) + opts + payload
tl = len(th)
th = th[:16] + csum(pseudo(tl) + th).to_bytes(2, "big") + th[18:]
if V6:
    ip = struct.pack("!IHBB", 0x60000000, tl, 6, 64) + sip + dip
else:
    ip = bytearray(struct.pack("!BBHHHBBH", 0x45, 0, 20 + tl, 1, 0x4000, 64, 6, 0) + sip + dip)
    ip[10:12] = csum(bytes(ip)).to_bytes(2, "big")
    ip = bytes(ip)
result["written"] = a.write_batch([ip + th])
segs = []
deadline = time.monotonic() + 3
while sum(len(s[1]) for s in segs) < len(payload) and time.monotonic() < deadline:
    select.select([b.fileno()], [], [], 0.1)
    for p in b.read_batch():
        ihl = 40 if V6 else (p[0] & 15) * 4
        if (p[6] if V6 else p[9]) != 6:
            continue
        t = p[ihl:]
        off = (t[12] >> 4) * 4
        ok_ip = V6 or csum(bytes(p[:ihl])) == 0
        ok_tcp = csum(pseudo(len(t)) + t) == 0
        seq = struct.unpack_from("!I", t, 4)[0]
        segs.append([len(p), t[off:], seq, ok_ip and ok_tcp, t[20:off] == opts])
result["sizes"] = [s[0] for s in segs]
result["checksums_ok"] = all(s[3] for s in segs)
result["options_kept"] = all(s[4] for s in segs)
result["seqs_ok"] = all(s[2] == (0xFFFFF000 + sum(len(x[1]) for x in segs[:i])) & 0xFFFFFFFF for i, s in enumerate(segs))
result["payload_ok"] = b"".join(s[1] for s in segs) == payload
result["tx_gso"] = a.stats["tx_gso"]
a.close(); b.close()
"""


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_offload_gso_write_is_segmented_correctly_when_forwarded(netns, v6):
    # The kernel cuts our 40 KB super-segment into wire segments, fixing each
    # checksum from the pseudo-header sum we put in; a plain TUN on the far
    # side of a forwarding hop shows exactly what a real next hop would get.
    res = run_child(netns, FORWARD_CHILD.format(v6=v6))
    assert res["written"] == 1 and res["tx_gso"] == 1
    hdr = (40 if v6 else 20) + 32
    per_seg = 1500 - hdr
    assert res["sizes"] == [1500] * (40000 // per_seg) + [hdr + 40000 % per_seg]
    assert res["checksums_ok"] and res["options_kept"] and res["seqs_ok"] and res["payload_ok"]


def test_bench_runs_and_moves_every_packet():
    # The throughput tool in its own namespace: all packets read and delivered.
    r = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "bench", "device_bench.py"), "--packets", "3000"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(res) == {f"{k}/{s}B" for k in ("tun", "fd-raw", "fd-af") for s in (20, 1400)}
    for size in (20, 1400):
        tun = res[f"tun/{size}B"]
        assert tun["read_packets"] == 3000
        assert tun["write_delivered"] == 3000
        assert tun["stats"]["tx_dropped"] == 0
    assert all(v["read_pps"] > 0 and v["write_pps"] > 0 for v in res.values())


def test_multiqueue_spreads_flows_over_queues(netns):
    res = run_child(
        netns,
        """
        q1 = open_device("tun://dvtun12?multiqueue=1", addresses=["10.72.0.1/24"])
        q2 = q1.open_queue()
        result["flags"] = [q1.multiqueue, q2.multiqueue, q1.created, q2.created, q2.fileno() != q1.fileno()]
        q1.read_batch(1000); q2.read_batch(1000)   # whatever came first (the UDP below is told apart)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        socks = []
        base = qdisc_sent("dvtun12")
        for flow in range(64):
            c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            c.bind(("10.72.0.1", 20000 + flow))
            socks.append(c)
            for k in range(3):
                c.sendto(b"f%d" % flow, ("10.72.0.2", 9999))
        wait_sent("dvtun12", base + 192)
        seen = {}
        for qi, q in enumerate((q1, q2)):
            for p in q.read_batch(10000):
                if p[0] >> 4 == 4 and p[9] == 17:
                    sport = int.from_bytes(p[20:22], "big")
                    seen.setdefault(str(sport), []).append(qi)
        result["seen"] = seen
        # either queue can write; the kernel takes it
        from tools.bench.device_bench import _udp4
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); rx.bind(("10.72.0.1", 7000)); rx.settimeout(2)
        q2.write_batch([_udp4(bytes([10, 72, 0, 2]), bytes([10, 72, 0, 1]), 4000, 7000, b"via-q2")])
        result["rx"] = rx.recv(100).decode()
        q1.close()
        result["exists_after_q1"] = exists("dvtun12")
        q2.close()
        result["exists_after_q2"] = exists("dvtun12")
        plain = open_device("tun://dvtun13")
        try:
            plain.open_queue()
        except DeviceError as e:
            result["plain"] = str(e)
        plain.close()
        """,
    )
    assert res["flags"] == [True, True, True, False, True]
    seen = res["seen"]
    assert sorted(int(k) for k in seen) == list(range(20000, 20064))
    assert all(len(v) == 3 and len(set(v)) == 1 for v in seen.values())  # a flow sticks to a queue
    per_queue = [sum(1 for v in seen.values() if v[0] == q) for q in (0, 1)]
    assert min(per_queue) > 0, per_queue  # and flows are spread
    assert res["rx"] == "via-q2"
    assert res["exists_after_q1"] is True and res["exists_after_q2"] is False
    assert "not a multiqueue TUN" in res["plain"]


def test_link_down_drops_writes_but_keeps_the_device(netns):
    res = run_child(
        netns,
        """
        from tools.bench.device_bench import _udp4
        for url in ("tun://dvtun14", "tun://dvtun15?offload=1"):
            dev = open_device(url, addresses=["10.73.0.1/24"] if "14" in url else ["10.74.0.1/24"])
            net = 73 if "14" in url else 74
            rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); rx.bind((f"10.{net}.0.1", 7000)); rx.settimeout(2)
            pkt = _udp4(bytes([10, net, 0, 2]), bytes([10, net, 0, 1]), 4000, 7000, b"after")
            subprocess.run(["ip", "link", "set", dev.name, "down"], check=True)
            down = [dev.write_batch([pkt, pkt]), dict(dev.stats), isinstance(dev.read_batch(), list)]
            subprocess.run(["ip", "link", "set", dev.name, "up"], check=True)
            up = dev.write_batch([pkt])
            result[url] = [down, up, rx.recv(100).decode()]
            dev.close()
        """,
    )
    for url in ("tun://dvtun14", "tun://dvtun15?offload=1"):
        (n_down, stats, read_ok), n_up, got = res[url]
        assert n_down == 2 and read_ok is True  # reading a downed TUN is no error either
        assert stats["tx_errors"] == 2 and stats["tx_dropped"] == 2 and stats["tx_packets"] == 0
        assert n_up == 1 and got == "after"
