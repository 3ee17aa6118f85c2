"""Block rules, flows dialled by name and rules by name, through a real TUN
and real v2ray cores.

Lab prefix "nm" (nm-cli, nm-srv), with cores of its own: the local core has
two socks inbounds, "sa" (127.0.0.1:10808, hop as user a@nm) and "sb"
(127.0.0.1:10809, hop as user b@nm), both over VLESS to the far core; the
far core resolves names through the lab's dnsmasq and logs every
connection with the destination as it arrived (by name or by address) and
the user, i.e. which local inbound the flow came in by.

The block rules run through `tun2xray run --config`. The name cases need
the DNS layer's address -> name book: here the test starts an Engine in
its own process (a thread inside nm-cli) with a dict-backed book; the
integration with the DNS layer's fake-IP answers is tested with it.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import os
import re
import socket
import sys
import threading
import uuid

import netlab
import pytest
from netlab import ECHO_PORT, HTTP_PORT, TARGET4

from tun2xray.control import query

pytestmark = pytest.mark.e2e

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOCKS_A, SOCKS_B = netlab.SOCKS_PORT, netlab.SOCKS_PORT + 1
NAMED = "10.99.0.201"          # in the routed target prefix; nothing listens there
UNMAPPED = "10.99.0.250"       # inside the "fake pool", no name
POOL = ipaddress.ip_network("10.99.0.192/26")
NAME = "web.e2.test"           # dnsmasq in nm-srv answers it with TARGET4


def _far_config(lab, users) -> dict:
    return {
        "log": {"loglevel": "warning", "access": os.path.join(lab.workdir, "far-nm.access"),
                "error": os.path.join(lab.workdir, "far-nm.err")},
        "policy": netlab._policy(),
        "dns": {"servers": [netlab.DNS4]},
        "inbounds": [{"tag": "vless", "listen": netlab.VETH_SRV4, "port": netlab.VLESS_PORT,
                      "protocol": "vless",
                      "settings": {"clients": [{"id": uid, "email": email} for email, uid in users.items()],
                                   "decryption": "none"}}],
        "outbounds": [{"tag": "direct", "protocol": "freedom", "settings": {"domainStrategy": "UseIPv4"}}],
    }


def _local_config(lab, users) -> dict:
    def hop(tag, uid):
        return {"tag": tag, "protocol": "vless",
                "settings": {"vnext": [{"address": netlab.VETH_SRV4, "port": netlab.VLESS_PORT,
                                        "users": [{"id": uid, "encryption": "none"}]}]}}

    def socks(tag, port):
        return {"tag": tag, "listen": "127.0.0.1", "port": port, "protocol": "socks",
                "settings": {"auth": "noauth", "udp": True, "ip": "127.0.0.1"}}

    return {
        "log": {"loglevel": "warning", "access": os.path.join(lab.workdir, "local-nm.access")},
        "policy": netlab._policy(),
        "inbounds": [socks("sa", SOCKS_A), socks("sb", SOCKS_B)],
        "outbounds": [hop("hop-a", users["a@nm"]), hop("hop-b", users["b@nm"])],
        "routing": {"rules": [{"type": "field", "inboundTag": ["sb"], "outboundTag": "hop-b"}]},
    }


@pytest.fixture(scope="module")
def nlab():
    if os.geteuid() != 0:
        pytest.skip("e2e tests need root (network namespaces, veth, TUN); CI runs them as root")
    lab = netlab.Lab(prefix="nm", start=False, files={"small.bin": netlab.DEFAULT_FILES["small.bin"]})
    with lab:
        lab.start_servers()
        users = {"a@nm": str(uuid.uuid4()), "b@nm": str(uuid.uuid4())}
        far = lab._write_config("far-nm.json", _far_config(lab, users))
        p = lab.spawn("far-core", lab.srv_ns, netlab.core_cmd(lab.core, far))
        netlab.wait_port(lab.srv_ns, netlab.VLESS_PORT, "tcp", proc=p)
        local = lab._write_config("local-nm.json", _local_config(lab, users))
        p = lab.spawn("local-core", lab.cli_ns, netlab.core_cmd(lab.core, local))
        for port in (SOCKS_A, SOCKS_B):
            netlab.wait_port(lab.cli_ns, port, "tcp", proc=p)
            netlab.wait_port(lab.cli_ns, port, "udp", proc=p)
        yield lab
    assert not netlab.netns_exists(lab.cli_ns)


def far_log(lab) -> str:
    try:
        with open(os.path.join(lab.workdir, "far-nm.access")) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def cli_socket(lab, kind=socket.SOCK_STREAM):
    with lab.in_cli():
        return socket.socket(socket.AF_INET, kind)


def tcp_echo(lab, host, payload=b"ping") -> bytes:
    s = cli_socket(lab)
    with s:
        s.settimeout(10)
        s.connect((host, ECHO_PORT))
        s.sendall(payload)
        return s.recv(len(payload))


def udp_echo(lab, host, payload: bytes, port=ECHO_PORT, tries=5):
    """(reply, source address) of a UDP echo; the datagram is sent again,
    as a UDP client does, when a reply does not come (the association opens
    through two cores with the first one)."""
    u = cli_socket(lab, socket.SOCK_DGRAM)
    with u:
        u.settimeout(3)
        for _ in range(tries):
            u.sendto(payload, (host, port))
            try:
                return u.recvfrom(2048)
            except TimeoutError:
                continue
    raise AssertionError(f"no UDP echo from {host}:{port}")


def curl(lab, url, out="/dev/null"):
    return lab.cli_run(["curl", "-sS", "-o", out, "-w", "%{http_code}", "--max-time", "20", url],
                       timeout=30)


# ---------------------------------------------------------------- block rules


@pytest.mark.deadline(90)
def test_block_rules_refuse_quic_and_tcp_at_once(nlab):
    lab = nlab
    tun = "nmtun0"
    ctl = os.path.join(lab.workdir, "nm-block.sock")
    profile = {"device": f"tun://{tun}", "proxy": f"socks5://127.0.0.1:{SOCKS_A}", "control": f"unix://{ctl}",
               "rules": [{"network": "udp", "port": 443, "to": "block"},
                         {"network": "tcp", "port": HTTP_PORT, "cidr": [f"{TARGET4}/32"], "to": "block"}]}
    path = os.path.join(lab.workdir, "block.json")
    with open(path, "w") as f:
        json.dump(profile, f)
    lab.run_tun2xray([sys.executable, "-m", "tun2xray.cli", "run", "--config", path], tun, name="tun2xray-block")
    try:
        # "block QUIC": the client's UDP socket learns ECONNREFUSED from the ICMP port unreachable
        u = cli_socket(lab, socket.SOCK_DGRAM)
        with u:
            u.settimeout(10)
            u.connect((TARGET4, 443))
            u.send(b"\xc0quic-initial")
            with pytest.raises(ConnectionRefusedError):
                u.recv(2048)
        # TCP to the blocked port: the SYN gets a RST, curl "couldn't connect" (7), not a timeout (28)
        r = curl(lab, f"http://{TARGET4}:{HTTP_PORT}/small.bin")
        assert r.returncode == 7, (r.returncode, r.stderr)
        assert b"refused" in r.stderr.lower() or b"couldn't connect" in r.stderr.lower(), r.stderr
        # what is not blocked still goes through
        assert tcp_echo(lab, TARGET4) == b"ping"
        assert udp_echo(lab, TARGET4, b"not-quic")[0] == b"not-quic"
        eng = query(f"unix://{ctl}")["engine"]
        assert eng.get("udp_blocked", 0) >= 1 and eng.get("tcp_blocked", 0) >= 1, eng
        assert f"{TARGET4}:443" not in far_log(lab) and f"{TARGET4}:{HTTP_PORT}" not in far_log(lab)
    finally:
        lab.stop("tun2xray-block")
        lab.unroute()


# ---------------------------------------------------------------- by name


class Book:
    """The DNS layer's address -> name book (dict-backed, as in the unit tests)."""

    def __init__(self, names: dict, pool):
        self.names = {ipaddress.ip_address(a).packed: n for a, n in names.items()}
        self.pool = pool
        self.unmapped = 0

    def lookup(self, addr: bytes):
        return self.names.get(bytes(addr))

    def is_fake(self, addr: bytes) -> bool:
        return ipaddress.ip_address(bytes(addr)) in self.pool

    def unmapped_hit(self) -> None:
        self.unmapped += 1


class InCliEngine:
    """An Engine on a TUN in nm-cli, run by a thread of this process that
    lives in that namespace (its TUN and its sockets are nm-cli's)."""

    def __init__(self, lab, tun, router, names):
        self.lab, self.tun, self.router, self.names = lab, tun, router, names
        self.engine = None
        self.loop = None
        self.error = None
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self):
        from tun2xray.device import open_device
        from tun2xray.engine import Engine
        dev = None
        try:
            with netlab.netns(self.lab.cli_ns):
                dev = open_device(f"tun://{self.tun}", mtu=1500, addresses=["198.18.0.1/15"])
                self.loop = asyncio.new_event_loop()
                self.engine = Engine(dev, self.router, names=self.names, connect_timeout=10)
                self.engine._started_cb = lambda e: self.ready.set()
                self.loop.run_until_complete(self.engine.run())
        except BaseException as e:      # reported to the test, which fails with it
            self.error = e
        finally:
            self.ready.set()
            if self.loop is not None:
                self.loop.close()
            if dev is not None:
                dev.close()

    def start(self):
        self.thread.start()
        assert self.ready.wait(20) and self.error is None, self.error
        return self

    def call(self, fn):
        """fn() on the engine's loop; its result."""
        fut = asyncio.run_coroutine_threadsafe(_call(fn), self.loop)
        return fut.result(10)

    def stop(self):
        if self.loop is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.engine.stop)
        self.thread.join(10)
        assert not self.thread.is_alive(), "the engine thread did not stop"


async def _call(fn):
    return fn()


@pytest.mark.deadline(120)
def test_flows_to_a_named_address_are_dialled_by_name_and_a_domain_rule_picks_its_inbound(nlab):
    from tun2xray.rules import DomainMatcher, Router, Rule
    from tun2xray.upstream.url import SocksUpstream

    lab = nlab
    tun = "nmtun1"
    url_a, url_b = f"socks5://127.0.0.1:{SOCKS_A}", f"socks5://127.0.0.1:{SOCKS_B}"
    router = Router(default=SocksUpstream("127.0.0.1", SOCKS_A), default_url=url_a, rules=[
        Rule(networks=frozenset({"tcp"}), ports=(HTTP_PORT, HTTP_PORT), to=SocksUpstream("127.0.0.1", SOCKS_B),
             url=url_b, domains=DomainMatcher(["suffix:e2.test"]))])
    book = Book({NAMED: NAME}, POOL)
    eng = InCliEngine(lab, tun, router, book).start()
    try:
        lab.route_via(tun)
        netlab.wait_until(lambda: _echo_ok(lab, TARGET4), 20, "a TCP echo through the engine", interval=0.2)
        before = far_log(lab)

        # HTTP to the named address: CONNECT web.e2.test:80 through inbound sb (the domain rule)
        out = os.path.join(lab.workdir, "named.bin")
        r = curl(lab, f"http://{NAMED}:{HTTP_PORT}/small.bin", out)
        assert r.stdout == b"200", (r.stdout, r.stderr)
        with open(out, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == lab.files["small.bin"][2]
        # TCP and UDP echo to the named address: by name through the default inbound sa
        assert tcp_echo(lab, NAMED, b"named-tcp") == b"named-tcp"
        data, src = udp_echo(lab, NAMED, b"named-udp")
        assert data == b"named-udp" and src == (NAMED, ECHO_PORT)     # the reply comes from the address asked

        netlab.wait_until(lambda: far_log(lab).count(NAME) >= 3, 10, "the far core's access log")
        new = far_log(lab)[len(before):]
        assert re.search(rf"accepted tcp:{re.escape(NAME)}:{HTTP_PORT} .*email: b@nm", new), new
        assert re.search(rf"accepted tcp:{re.escape(NAME)}:{ECHO_PORT} .*email: a@nm", new), new
        assert re.search(rf"accepted udp:{re.escape(NAME)}:{ECHO_PORT} .*email: a@nm", new), new
        assert NAMED not in new                         # never dialled as the address itself

        # an address in the fake pool with no name: refused at once, counted, never dialled
        r = curl(lab, f"http://{UNMAPPED}:{HTTP_PORT}/small.bin")
        assert r.returncode == 7, (r.returncode, r.stderr)
        st = eng.call(eng.engine.status)
        assert st["engine"]["tcp_unmapped_fake"] >= 1 and book.unmapped >= 1
        assert UNMAPPED not in far_log(lab)
        names = {(f["proto"], f["dst"]): f["name"] for f in st["closed_flows"] + st["flows"]}
        assert names[("tcp", f"{NAMED}:{HTTP_PORT}")] == NAME
        assert names[("udp", f"{NAMED}:{ECHO_PORT}")] == NAME
        inbound = {f["dst"]: f["inbound"] for f in st["closed_flows"] + st["flows"] if f["proto"] == "tcp"}
        assert inbound[f"{NAMED}:{HTTP_PORT}"] == url_b and inbound[f"{NAMED}:{ECHO_PORT}"] == url_a
    finally:
        lab.unroute()
        eng.stop()
    assert eng.error is None, eng.error


def _echo_ok(lab, host) -> bool:
    try:
        return tcp_echo(lab, host) == b"ping"
    except OSError:
        return False
