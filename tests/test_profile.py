import json

import pytest

from tun2xray.profile import ProfileError, load_profile

FULL = {
    "proxy": "socks5://127.0.0.1:10808",
    "mtu": 1500,
    "ipv4": {"address": "198.18.0.1/15", "routes": ["0.0.0.0/0"], "excluded_routes": []},
    "ipv6": {"address": "fd00:7478::1/64", "routes": ["::/0"], "excluded_routes": []},
    "dns": {"servers": ["198.18.0.2"]},
    "rules": [
        {"network": "udp", "port": 53, "to": "dokodemo://127.0.0.1:10853"},
        {"network": "tcp,udp", "cidr": ["10.0.0.0/8"], "port": "1000-2000", "to": "socks5://127.0.0.1:10809"},
    ],
    "udp_timeout": 60,
    "tcp_connect_timeout": 10,
    "max_flows": 65536,
    "icmp_echo": "reply",
}


def test_design_example_loads_and_round_trips():
    p = load_profile(json.dumps(FULL))
    assert p.proxy == FULL["proxy"]
    assert [sorted(r.networks) for r in p.rules] == [["udp"], ["tcp", "udp"]]
    assert p.rules[0].ports == (53, 53) and p.rules[1].ports == (1000, 2000)
    assert load_profile(p.to_json()).to_json() == p.to_json()


def test_defaults_only_proxy_required():
    p = load_profile('{"proxy": "socks5://127.0.0.1:1080"}')
    assert p.mtu == 1500 and p.ipv4.address == "198.18.0.1/15" and p.ipv6.address == "fd00:7478::1/64"
    assert p.rules == [] and p.icmp_echo == "reply" and p.max_flows == 65536


@pytest.mark.parametrize("patch,message", [
    ({"rules": [{"to": "socks5://127.0.0.1:1"}, {"port": "70000", "to": "socks5://127.0.0.1:1"}]},
     'rules[1].port: "70000" is not a port'),
    ({"rules": [{"network": "icmp", "to": "socks5://127.0.0.1:1"}]}, "rules[0].network:"),
    ({"rules": [{"port": 53}]}, "rules[0].to: is required"),
    ({"rules": [{"cidr": ["10.0.0.0/33"], "to": "socks5://127.0.0.1:1"}]}, "rules[0].cidr[0]:"),
    ({"mtu": 100}, "mtu: 100 is not an integer"),
    ({"mtu": "1500"}, "mtu:"),
    ({"ipv4": {"address": "fd00::1/64"}}, "ipv4.address:"),
    ({"ipv6": {"routes": ["::/0", "10.0.0.0/8"]}}, "ipv6.routes[1]:"),
    ({"dns": {"servers": ["dns.google"]}}, "dns.servers[0]:"),
    ({"icmp_echo": "maybe"}, "icmp_echo:"),
    ({"colour": "blue"}, "colour: unknown key"),
    ({"ipv4": {"adress": "1.2.3.4/32"}}, "ipv4.adress: unknown key"),
    ({"proxy": "http://127.0.0.1:8080"}, "proxy:"),
    ({"udp_timeout": -1}, "udp_timeout:"),
])
def test_bad_values_name_the_key_path(patch, message):
    data = {"proxy": "socks5://127.0.0.1:10808", **patch}
    with pytest.raises(ProfileError) as ei:
        load_profile(json.dumps(data))
    assert str(ei.value).startswith(message), str(ei.value)
    assert "\n" not in str(ei.value)


def test_missing_proxy_and_bad_json():
    with pytest.raises(ProfileError, match="^proxy: is required"):
        load_profile("{}", bridge=True)
    with pytest.raises(ProfileError, match="^not valid JSON"):
        load_profile("{nope")
    with pytest.raises(ProfileError, match="JSON object"):
        load_profile("[1]")
