"""DNS through the bridge: a profile with "dns" gives a packet-flow host the
engine's answers (fake-IP) and the cache file on stop."""

from __future__ import annotations

import ipaddress
import json
import os
import sys

import dns.message

sys.path.insert(0, os.path.dirname(__file__))
from test_bridge import Host, addrs, hosts, socks, udp_packet, udp_payload  # noqa: E402,F401

from tun2xray import bridge  # noqa: E402


def test_the_bridge_answers_dns_from_the_fake_pool_and_saves_the_cache(socks, hosts, tmp_path):  # noqa: F811
    cache = str(tmp_path / "fake.json")
    cfg = json.dumps({"proxy": f"socks5://127.0.0.1:{socks.port}",
                      "dns": {"mode": "fake-ip", "cache_file": cache, "fake_ipv4": "10.111.0.0/16"}})
    host = Host(cfg, poll=True)
    hosts.append(host)
    src, _ = addrs(4)
    q = dns.message.make_query("bridge.example.com", "A")
    host.send(udp_packet(4, src, bytes([8, 8, 8, 8]), 5353, 53, q.to_wire()), 4)
    p, _ = host.next()
    r = dns.message.from_wire(udp_payload(p))
    (rd,) = r.answer[0]
    assert ipaddress.ip_address(rd.address) in ipaddress.ip_network("10.111.0.0/16")
    st = bridge.status(host.handle)
    assert st["dns"]["fake_answers"] == 1 and st["dns"]["pools"]["ipv4"]["prefix"] == "10.111.0.0/16"
    # what the host must route into the tunnel besides its routes
    assert st["network"]["dns"]["fake_pools"] == ["10.111.0.0/16", "fd00:7478:f::/64"]
    host.stop()
    with open(cache) as f:
        assert [rd.address, "bridge.example.com"] in json.load(f)["ipv4"]


def test_bad_dns_settings_name_their_key(socks):  # noqa: F811
    import pytest
    base = {"proxy": f"socks5://127.0.0.1:{socks.port}"}
    with pytest.raises(ValueError, match=r"^dns.upstream: "):
        bridge.start(json.dumps({**base, "dns": {"mode": "remember", "upstream": "http://x:1"}}))
    with pytest.raises(ValueError, match="remember mode needs an upstream"):
        bridge.start(json.dumps({**base, "dns": {"mode": "remember"}}))
