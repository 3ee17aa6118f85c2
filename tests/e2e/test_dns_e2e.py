"""DNS in the engine, end to end: real dig in the client namespace, through
a real TUN and tun2xray, with the real v2ray core and dnsmasq behind its DNS
dokodemo inbound.

- fake-ip: dig over UDP and TCP, to the TUN's DNS address and to addresses
  that are not there at all (9.9.9.9, 2620:fe::fe), gets fake answers (A
  and AAAA) from the pools; the IPv6 pool is routed into the TUN.
- remember: dig gets dnsmasq's real answer through the dokodemo inbound,
  and status counts the remembered addresses.
- a restart with the same cache file keeps a fake address's name (asked
  back with a PTR query, and the same A answer).

Its own lab (prefix dn: namespaces dn-cli / dn-srv, TUNs dn*).
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys

import pytest

import netlab
from netlab import DNS_NAMES, TARGET4, TARGET6

pytestmark = pytest.mark.e2e

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
ENV.pop("TUN2XRAY_WORKERS", None)
T2X = [sys.executable, "-m", "tun2xray"]
POOL4, POOL6 = ipaddress.ip_network("198.19.0.0/16"), ipaddress.ip_network("fd00:7478:f::/64")
ELSEWHERE4, ELSEWHERE6 = "9.9.9.9", "2620:fe::fe"       # not in either namespace: only the hijack answers
NAME = "web.e2.test"                                      # dnsmasq's name in the lab


def ctl_url(lab, tun):
    return f"unix://{lab.workdir}/{tun}.sock"


def status(lab, tun):
    from tun2xray.control import query
    return query(ctl_url(lab, tun), timeout=5)


def logs(lab, name="t2x"):
    return "\n--- tun2xray log (tail) ---\n" + lab.log(name)[-4000:]


def start(lab, tun, mode, *, cache=None, upstream=None):
    profile = {"dns": {"mode": mode}}
    if upstream is not None:
        profile["dns"]["upstream"] = upstream
    if cache is not None:
        profile["dns"]["cache_file"] = cache
    path = os.path.join(lab.workdir, f"{tun}-profile.json")
    with open(path, "w") as f:
        json.dump(profile, f)
    argv = T2X + ["run", "--device", f"tun://{tun}", "--control", ctl_url(lab, tun), "--config", path,
                  "--address", "198.18.0.1/15", "--address6", "fd00:7478::1/64",
                  "--proxy", f"socks5://127.0.0.1:{netlab.SOCKS_PORT}",
                  "--map", f"udp:53=dokodemo://127.0.0.1:{netlab.DOKODEMO_PORT}"]
    p = lab.run_tun2xray(argv, tun, name="t2x", env=ENV, describe=lambda: logs(lab))
    # addresses that exist nowhere: only the TUN takes queries to them
    lab.ip(lab.cli_ns, "route", "replace", f"{ELSEWHERE4}/32", "dev", tun)
    lab.ip(lab.cli_ns, "-6", "route", "replace", f"{ELSEWHERE6}/128", "dev", tun)
    return p


def stop(lab):
    rc = lab.stop("t2x", timeout=10)
    lab.unroute()
    return rc


def dig(lab, server, name, rdtype="A", tcp=False, short=True):
    argv = ["dig", f"@{server}", name, rdtype, "+tries=1", "+time=3"]
    if short:
        argv.append("+short")
    if tcp:
        argv.append("+tcp")
    r = lab.cli_run(argv, timeout=15)
    out = r.stdout.decode()
    assert r.returncode == 0, f"{' '.join(argv)}: exit {r.returncode}: {out} {r.stderr.decode()}" + logs(lab)
    return [line for line in out.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def dlab():
    if os.geteuid() != 0:
        pytest.skip("e2e tests need root (network namespaces, veth, TUN); CI runs them as root")
    lab = netlab.Lab(prefix="dn", files={})
    with lab:
        yield lab
    assert not netlab.netns_exists(lab.cli_ns) and not netlab.netns_exists(lab.srv_ns)


@pytest.fixture
def fake_ip(dlab):
    start(dlab, "dntun0", "fake-ip")
    yield dlab
    stop(dlab)


@pytest.mark.deadline(120)
def test_fake_ip_answers_udp_and_tcp_to_any_address(fake_ip):
    lab = fake_ip
    seen = {}
    for server in ("198.18.0.2", ELSEWHERE4, ELSEWHERE6):
        for tcp in (False, True):
            for rdtype, pool in (("A", POOL4), ("AAAA", POOL6)):
                (addr,) = dig(lab, server, NAME, rdtype, tcp)
                assert ipaddress.ip_address(addr) in pool, (server, tcp, rdtype, addr)
                seen.setdefault(rdtype, set()).add(addr)
    # one name, one address per family, whoever was asked and however
    assert len(seen["A"]) == 1 and len(seen["AAAA"]) == 1
    # another name gets another address
    (other,) = dig(lab, ELSEWHERE4, "other.example", "A")
    assert other not in seen["A"]
    st = status(lab, "dntun0")
    d = st["dns"]
    assert d["mode"] == "fake-ip" and d["queries"] == {"A": 7, "AAAA": 6} and d["fake_answers"] == 13
    assert d["cache_size"] == 3 and d["forwarded"] == 0
    assert "fd00:7478:f::/64" in st["network"]["routes_added"]          # the IPv6 pool goes into the TUN
    # dnsmasq never saw these: no query went to the dokodemo inbound
    assert not [f for f in st["closed_flows"] + st["flows"] if f["inbound"] and "10853" in f["inbound"]]


@pytest.mark.deadline(90)
def test_fake_ip_forwards_other_types_through_the_dns_inbound(fake_ip):
    lab = fake_ip
    out = dig(lab, ELSEWHERE4, NAME, "TXT", short=False)
    assert any("status: NOERROR" in line for line in out), out     # dnsmasq answered (no TXT: empty)
    d = status(lab, "dntun0")["dns"]
    assert d["forwarded"] == 1 and d["forward_replies"] == 1 and d["upstream"].endswith(f":{netlab.DOKODEMO_PORT}")


@pytest.mark.deadline(90)
def test_remember_mode_gives_the_real_answer_and_remembers_it(dlab):
    lab = dlab
    start(lab, "dntun1", "remember")
    try:
        assert dig(lab, "198.18.0.2", NAME, "A") == [TARGET4]
        assert dig(lab, ELSEWHERE4, NAME, "AAAA", tcp=True) == [TARGET6]
        assert dig(lab, ELSEWHERE6, "dns.e2.test", "A") == [DNS_NAMES["dns.e2.test"][0]]
        d = status(lab, "dntun1")["dns"]
        assert d["mode"] == "remember" and d["forwarded"] == 3 and d["fake_answers"] == 0
        assert d["remembered_addresses"] == 3 and d["queries"] == {"A": 2, "AAAA": 1}
    finally:
        stop(lab)


@pytest.mark.deadline(90)
def test_remember_mode_through_the_socks_inbounds_udp_associate(dlab):
    # the upstream is the core's socks inbound: queries travel as UDP ASSOCIATE
    # datagrams addressed to dnsmasq, over the core's hop to the far side
    lab = dlab
    start(lab, "dntun3", "remember", upstream=f"socks5://127.0.0.1:{netlab.SOCKS_PORT}?server={netlab.DNS4}")
    try:
        assert dig(lab, ELSEWHERE4, NAME, "A") == [TARGET4]
        assert dig(lab, ELSEWHERE4, NAME, "AAAA", tcp=True) == [TARGET6]
        d = status(lab, "dntun3")["dns"]
        assert d["upstream"] == f"socks5://127.0.0.1:{netlab.SOCKS_PORT}" and d["forward_replies"] == 2
        assert d["remembered_addresses"] == 2
    finally:
        stop(lab)


@pytest.mark.deadline(120)
def test_a_restart_with_the_same_cache_file_keeps_the_fake_addresses(dlab):
    lab = dlab
    cache = os.path.join(lab.workdir, "fake-ip.json")
    start(lab, "dntun2", "fake-ip", cache=cache)
    try:
        (a4,) = dig(lab, ELSEWHERE4, "kept.example", "A")
        (a6,) = dig(lab, ELSEWHERE4, "kept.example", "AAAA")
    finally:
        assert stop(lab) == 0
    with open(cache) as f:
        saved = json.load(f)
    assert [a4, "kept.example"] in saved["ipv4"] and [a6, "kept.example"] in saved["ipv6"]
    start(lab, "dntun2", "fake-ip", cache=cache)
    try:
        assert status(lab, "dntun2")["dns"]["cache_size"] == 2
        assert dig(lab, "198.18.0.2", ipaddress.ip_address(a4).reverse_pointer, "PTR") == ["kept.example."]
        assert dig(lab, "198.18.0.2", ipaddress.ip_address(a6).reverse_pointer, "PTR") == ["kept.example."]
        assert dig(lab, ELSEWHERE4, "kept.example", "A") == [a4]
        # a name asked for the first time gets an address no restored name holds
        (fresh,) = dig(lab, ELSEWHERE4, "fresh.example", "A")
        assert fresh != a4
    finally:
        stop(lab)
