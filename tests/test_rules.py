import ipaddress

import pytest

from tun2xray.profile import load_profile
from tun2xray.rules import Router, parse_map
from tun2xray.upstream.url import parse_upstream


def _ip(s):
    return ipaddress.ip_address(s).packed


def test_first_match_wins_and_default():
    p = load_profile({
        "proxy": "socks5://127.0.0.1:10808",
        "rules": [
            {"network": "udp", "port": 53, "to": "dokodemo://127.0.0.1:10853"},
            {"network": "tcp,udp", "cidr": ["10.0.0.0/8", "fd00::/8"], "port": "1000-2000",
             "to": "socks5://127.0.0.1:10809"},
            {"cidr": ["10.1.0.0/16"], "to": "socks5://127.0.0.1:10810"},
        ],
    })
    default = parse_upstream(p.proxy)
    r = Router(default=default, default_url=p.proxy, rules=p.rules)
    assert r.route("udp", _ip("8.8.8.8"), 53)[1] == "dokodemo://127.0.0.1:10853"
    assert r.route("tcp", _ip("8.8.8.8"), 53)[1] == p.proxy
    assert r.route("tcp", _ip("10.1.2.3"), 1500)[1] == "socks5://127.0.0.1:10809"
    assert r.route("tcp", _ip("fd00::5"), 1000)[1] == "socks5://127.0.0.1:10809"
    assert r.route("tcp", _ip("10.1.2.3"), 2001)[1] == "socks5://127.0.0.1:10810"
    assert r.route("tcp", _ip("10.2.2.3"), 2001)[1] == p.proxy
    assert r.route("udp", _ip("fd00::5"), 53)[1] == "dokodemo://127.0.0.1:10853"


def test_map_shorthand():
    rule = parse_map("udp:53=dokodemo://127.0.0.1:10853")
    assert rule.networks == {"udp"} and rule.ports == (53, 53)
    r = Router(default=None, default_url="d", rules=[rule])
    assert r.route("udp", _ip("1.1.1.1"), 53)[1] == "dokodemo://127.0.0.1:10853"
    assert r.route("udp", _ip("1.1.1.1"), 54)[1] == "d"


@pytest.mark.parametrize("spec", ["udp53=dokodemo://127.0.0.1:1", "icmp:53=dokodemo://127.0.0.1:1",
                                  "udp:99999=dokodemo://127.0.0.1:1", "udp:53=", "udp:53=ftp://x:1",
                                  "udp:53"])
def test_bad_map(spec):
    with pytest.raises(ValueError) as ei:
        parse_map(spec)
    assert str(ei.value).startswith(f'--map "{spec}"')
