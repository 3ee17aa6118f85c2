"""The name book (fake pools, LRU reuse, remembered answers, TTL on a
virtual clock) and its cache file (round trip, corrupt and oversized files)."""

from __future__ import annotations

import ipaddress
import json
import os

import pytest

from tun2xray.dns import cachefile
from tun2xray.dns.book import NameBook
from tun2xray.dns.settings import DnsSettings, DnsSettingsError, default_upstream, parse_upstream_url


def ip(text) -> bytes:
    return ipaddress.ip_address(text).packed


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_each_name_gets_one_address_per_family_inside_the_pool():
    b = NameBook("198.19.0.0/16", "fd00:7478:f::/64")
    a4 = b.fake_address("example.com", 4)
    a6 = b.fake_address("example.com", 6)
    assert ipaddress.ip_address(a4) in ipaddress.ip_network("198.19.0.0/16")
    assert ipaddress.ip_address(a6) in ipaddress.ip_network("fd00:7478:f::/64")
    assert b.fake_address("example.com", 4) == a4            # stable
    assert b.fake_address("other.org", 4) != a4
    assert b.lookup(a4) == b.lookup(a6) == "example.com"
    assert b.is_fake(a4) and b.is_fake(ip("198.19.200.200")) and not b.is_fake(ip("1.1.1.1"))
    assert b.lookup(ip("198.19.200.200")) is None              # in the pool, never handed out
    assert b.size() == 3


def test_the_pool_never_hands_out_the_tun_or_dns_addresses_nor_network_broadcast():
    b = NameBook("198.18.0.0/29", None, avoid=["198.18.0.1", "198.18.0.2"])
    got = {b.fake_address(f"n{i}.test", 4) for i in range(20)}
    assert got == {ip(f"198.18.0.{i}") for i in (3, 4, 5, 6)}   # not .0, .1 (TUN), .2 (DNS), .7


def test_a_full_pool_reuses_the_least_recently_used_address():
    b = NameBook("10.0.0.0/29", None)        # 6 usable
    addrs = [b.fake_address(f"n{i}.test", 4) for i in range(6)]
    assert b.lookup(addrs[0]) == "n0.test"   # n0 used again: n1 is now the oldest
    new = b.fake_address("late.test", 4)
    assert new == addrs[1]
    assert b.lookup(addrs[1]) == "late.test"
    assert b.fake_address("n0.test", 4) == addrs[0]
    assert b.status()["evicted"] == 1 and b.size() == 6


def test_remembered_addresses_expire_with_their_ttl_on_the_clock():
    clock = Clock()
    b = NameBook(None, None, clock=clock)
    b.remember(ip("93.184.216.34"), "example.com", 300)
    assert b.lookup(ip("93.184.216.34")) == "example.com"
    clock.now += 299.9
    assert b.lookup(ip("93.184.216.34")) == "example.com"
    clock.now += 0.2
    assert b.lookup(ip("93.184.216.34")) is None
    assert b.status()["remember_expired"] == 1 and b.status()["remembered_addresses"] == 0


def test_short_ttls_are_remembered_for_the_floor():
    clock = Clock()
    b = NameBook(None, None, clock=clock, remember_min_ttl=60)
    b.remember(ip("192.0.2.1"), "zero.test", 0)
    clock.now += 59.9
    assert b.lookup(ip("192.0.2.1")) == "zero.test"
    clock.now += 0.2
    assert b.lookup(ip("192.0.2.1")) is None


def test_remembering_is_bounded_oldest_first():
    b = NameBook(None, None, remember_capacity=3, clock=Clock())
    for i in range(5):
        b.remember(bytes([10, 0, 0, i]), f"n{i}.test", 60)
    assert [b.lookup(bytes([10, 0, 0, i])) for i in range(5)] == [None, None, "n2.test", "n3.test", "n4.test"]


def test_cache_file_round_trip_keeps_mappings_and_their_order(tmp_path):
    path = str(tmp_path / "fake.json")
    b = NameBook("10.0.0.0/29", "fd00::/120")
    a = [b.fake_address(f"n{i}.test", 4) for i in range(6)]
    a6 = b.fake_address("n0.test", 6)
    b.lookup(a[0])
    cachefile.save(path, b)
    assert not [f for f in os.listdir(tmp_path) if f != "fake.json"]     # no temporary left
    c = NameBook("10.0.0.0/29", "fd00::/120")
    assert cachefile.load(path, c) == 7
    # the order came back too: n1 is the oldest, so the next new name takes its address
    assert c.fake_address("new.test", 4) == a[1]
    assert [c.lookup(x) for x in a] == ["n0.test", "new.test"] + [f"n{i}.test" for i in range(2, 6)]
    assert c.lookup(a6) == "n0.test"
    # a new name after a restart never gets an address a restored name holds
    d = NameBook("10.0.0.0/24", None)
    cachefile.load(path, d)
    assert d.fake_address("fresh.test", 4) not in a


@pytest.mark.parametrize("content", [b"{not json", b"[]", b'{"version": 9}', b"\xff\xfe\x00",
                                     b'{"version": 1, "ipv4": [["10.0.0.1", "bad name!"], ["300.1.1.1", "x.y"], '
                                     b'["10.9.9.9", "outside.pool"], 5, ["10.0.0.2", "ok.test"]]}'])
def test_a_corrupt_cache_file_is_a_warning_not_a_failed_start(tmp_path, content, caplog):
    path = tmp_path / "fake.json"
    path.write_bytes(content)
    b = NameBook("10.0.0.0/24", None)
    n = cachefile.load(str(path), b)
    assert n == (1 if b"ok.test" in content else 0)
    assert b.lookup(ip("10.0.0.2")) == ("ok.test" if n else None)
    if not n:
        assert "not read" in caplog.text


def test_an_oversized_cache_file_is_not_read(tmp_path, monkeypatch, caplog):
    path = tmp_path / "fake.json"
    path.write_bytes(json.dumps({"version": 1, "ipv4": [["10.0.0.1", "a.test"]]}).encode() + b" " * 100)
    monkeypatch.setattr(cachefile, "MAX_BYTES", 64)
    b = NameBook("10.0.0.0/24", None)
    assert cachefile.load(str(path), b) == 0 and "larger than" in caplog.text


def test_a_missing_cache_file_is_an_empty_book(tmp_path):
    assert cachefile.load(str(tmp_path / "none.json"), NameBook("10.0.0.0/24", None)) == 0


def test_upstream_urls():
    up, base, server = parse_upstream_url("socks5://127.0.0.1:1080?server=9.9.9.9:5353")
    assert (up.host, up.port, base, server) == ("127.0.0.1", 1080, "socks5://127.0.0.1:1080", ("9.9.9.9", 5353))
    assert parse_upstream_url("dokodemo://127.0.0.1:10853")[2] == ("1.1.1.1", 53)
    for bad in ("dokodemo://127.0.0.1:10853?server=1.1.1.1", "socks5://h:1?x=1", "socks5://h:1?server=nope",
                "http://h:1"):
        with pytest.raises(DnsSettingsError):
            parse_upstream_url(bad)


def test_settings_reject_a_bad_mode_and_pools():
    with pytest.raises(DnsSettingsError, match="fake-ip, remember or off"):
        DnsSettings("fake")
    with pytest.raises(DnsSettingsError, match="dns.fake_ipv4"):
        DnsSettings("fake-ip", fake_ipv4="fd00::/64")


def test_default_upstream_is_the_udp_53_rule():
    from tun2xray.rules import Router, parse_map
    r = Router(default=None, rules=[parse_map("tcp:80=dokodemo://127.0.0.1:1"),
                                    parse_map("udp:53=dokodemo://127.0.0.1:10853")])
    assert default_upstream(r) == "dokodemo://127.0.0.1:10853"
    assert default_upstream(Router(default=None)) is None


def test_remember_mode_without_an_upstream_is_refused():
    from tun2xray.dns.settings import check_upstream
    from tun2xray.rules import Router, parse_map
    with pytest.raises(DnsSettingsError, match="needs an upstream"):
        check_upstream(DnsSettings("remember"), Router(default=None))
    check_upstream(DnsSettings("remember"), Router(default=None, rules=[parse_map("udp:53=dokodemo://127.0.0.1:1")]))
    check_upstream(DnsSettings("fake-ip"), Router(default=None))      # fake-ip answers A/AAAA without one


def test_the_cli_refuses_remember_without_upstream_and_workers_with_dns(tmp_path):
    import subprocess
    import sys
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    base = [sys.executable, "-m", "tun2xray", "run", "--device", "tun://dnx0", "--proxy", "socks5://127.0.0.1:9",
            "--control", "none"]
    r = subprocess.run(base + ["--dns", "remember"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and "needs an upstream" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run(base + ["--dns", "fake-ip", "--dns-upstream", "http://x:1"], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 2 and "--dns-upstream" in r.stderr and "unsupported scheme" in r.stderr
    r = subprocess.run(base + ["--dns-upstream", "dokodemo://127.0.0.1:53"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 2 and "DNS handling is off" in r.stderr


def test_dns_runs_with_one_worker(tmp_path):
    import socket
    import subprocess
    import sys
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with socket.socket() as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen()
        port = lst.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "tun2xray", "run", "--device", "tun://dnx0", "--control", "none",
                            "--proxy", f"socks5://127.0.0.1:{port}", "--dns", "fake-ip", "--workers", "2"],
                           capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and "needs one worker" in r.stderr, r.stderr


def test_dnspython_is_loaded_only_when_dns_is_on():
    import subprocess
    import sys
    code = r"""
import sys
from tun2xray import cli, host
from tun2xray.device import memory_pair
from tun2xray.rules import Router
from tun2xray.upstream.url import parse_upstream
up = parse_upstream("socks5://127.0.0.1:9")
dev, _ = memory_pair()
s = host.EngineSettings(Router(default=up, default_url="socks5://127.0.0.1:9"))
host.make_engine(dev, s)
off = "dns" in sys.modules
from tun2xray.dns.settings import DnsSettings
s.dns = DnsSettings("fake-ip")
e = host.make_engine(dev, s)
print(off, "dns" in sys.modules, e.names is e.dns.book)
"""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert r.stdout.split() == ["False", "True", "True"], r.stderr


def test_the_dns_room_stays_below_the_engine():
    import ast
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tun2xray", "dns")
    for f in os.listdir(root):
        if not f.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(root, f)).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                mod = node.module or ""
                assert not mod.startswith(("engine", "host", "cli", "bridge", "workers", "xray", "profile")), (f, mod)


@pytest.mark.parametrize("inbound", [
    {"listen": "127.0.0.1", "port": 10853, "protocol": "dokodemo-door",
     "settings": {"address": "1.1.1.1", "port": 53, "network": "tcp,udp"}},
    {"listen": "127.0.0.1", "port": 10853, "protocol": "tunnel",
     "settings": {"rewriteAddress": "1.1.1.1", "rewritePort": 53, "allowedNetwork": "udp"}}])
def test_the_xray_configs_dns_inbound_is_the_default_upstream(tmp_path, inbound):
    from tun2xray import xray
    from tun2xray.rules import Router
    socks = {"listen": "127.0.0.1", "port": 10808, "protocol": "socks", "settings": {"auth": "noauth", "udp": True}}
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"inbounds": [socks, inbound]}))
    d = xray.derive(str(path))
    r = Router(default=d.proxy, default_url=d.proxy_url, rules=list(d.rules))
    assert default_upstream(r) == "dokodemo://127.0.0.1:10853"


def test_a_cache_file_that_cannot_be_written_is_refused_at_start(tmp_path):
    class Args:
        dns = "fake-ip"
        dns_upstream = None
    from tun2xray.profile import load_profile
    for path, why in ((str(tmp_path / "no" / "such" / "f.json"), "no directory"), (str(tmp_path), "is a directory")):
        prof = load_profile(json.dumps({"dns": {"cache_file": path}}))
        with pytest.raises(DnsSettingsError, match=why):
            DnsSettings.from_run(Args, prof, ["198.18.0.1/15"])
    prof = load_profile(json.dumps({"dns": {"cache_file": str(tmp_path / "ok.json")}}))
    assert DnsSettings.from_run(Args, prof, ["198.18.0.1/15"]).cache_file.endswith("ok.json")


def test_pool_capacity_counts_only_usable_addresses():
    b = NameBook("10.0.0.0/18", "fd00::/114", avoid=["10.0.0.1"])
    assert b.pools[4].capacity == 16384 - 3 and b.pools[6].capacity == 16383
    v6 = NameBook(None, "fd00::/126")
    got = {v6.fake_address(f"n{i}.test", 6) for i in range(10)}
    assert got == {ipaddress.ip_address(f"fd00::{i}").packed for i in (1, 2, 3)}
