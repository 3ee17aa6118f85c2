"""Every profile key takes effect in `run` (or the bridge) or is rejected with
its key path; flags and keys line up; the JSON Schema is the validator's."""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import subprocess
import sys

import pytest

from tun2xray import bridge
from tun2xray.cli import RunSettings, UsageError, apply_profile, build_parser
from tun2xray.host import stack_config
from tun2xray.profile import (
    KEYS,
    ProfileError,
    json_schema,
    load_profile,
    schema_path,
    schema_text,
)
from tun2xray.tunroutes import Network, subtract

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROXY = "socks5://127.0.0.1:10808"


def settings_for(tmp_path, profile: dict, *flags):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile))
    args = build_parser().parse_args(["run", "--config", str(path), *flags])
    apply_profile(args)
    return args, RunSettings(args)


# key path -> (a non-default value, what `run` shows for it); each check gets
# (args, settings) after `run --config` with only that key (plus proxy/device)
EFFECTS = {
    "proxy": ("socks5://127.0.0.1:10999",
              lambda a, s: s.router.default_url == "socks5://127.0.0.1:10999" and s.proxy.port == 10999),
    "mtu": (1280, lambda a, s: s.mtu == 1280),
    "ipv4.address": ("10.77.0.1/24", lambda a, s: s.address == "10.77.0.1/24"),
    "ipv4.routes": (["10.99.0.0/24"],
                    lambda a, s: [str(n) for n, _ in s.net.planned()] == ["10.99.0.0/24"]),
    "ipv4.excluded_routes": (["198.51.100.0/25"], None),    # with routes, below
    "ipv6.address": ("fd42::1/64", lambda a, s: s.address6 == "fd42::1/64"),
    "ipv6.routes": (["fd99::/64"], lambda a, s: [str(n) for n, _ in s.net.planned()] == ["fd99::/64"]),
    "ipv6.excluded_routes": (["fd99::/65"], None),
    "dns.servers": (["10.99.0.53"],
                    lambda a, s: [(str(n), k) for n, k in s.net.planned()] == [("10.99.0.53/32", "dns.servers")]),
    "dns.mode": ("fake-ip", lambda a, s: s.dns is not None and s.dns.mode == "fake-ip"
                 and s.net.fake == ["198.19.0.0/16", "fd00:7478:f::/64"]),
    "dns.upstream": ("dokodemo://127.0.0.1:10999", lambda a, s: s.dns_settings.upstream == "dokodemo://127.0.0.1:10999"),
    "dns.fake_ipv4": ("10.111.0.0/16", lambda a, s: s.dns_settings.fake_ipv4 == "10.111.0.0/16"),
    "dns.fake_ipv6": ("fd11::/64", lambda a, s: s.dns_settings.fake_ipv6 == "fd11::/64"),
    "dns.hijack": (False, lambda a, s: s.dns_settings.hijack is False),
    "dns.ttl": (5, lambda a, s: s.dns_settings.ttl == 5),
    "dns.cache_file": ("/tmp/pr-key-dns.json", lambda a, s: s.dns_settings.cache_file == "/tmp/pr-key-dns.json"),
    "rules": ([{"network": "udp", "port": 53, "to": "dokodemo://127.0.0.1:10853"}],
              lambda a, s: s.router.route("udp", bytes([10, 0, 0, 1]), 53)[1] == "dokodemo://127.0.0.1:10853"
              and s.router.route("tcp", bytes([10, 0, 0, 1]), 53)[1] == PROXY),
    "udp_timeout": (5, lambda a, s: s.udp_timeout == 5.0),
    "tcp_connect_timeout": (2.5, lambda a, s: s.connect_timeout == 2.5),
    "tcp_refusal_window": (2.5, lambda a, s: s.refusal_window == 2.5),
    "max_flows": (100, lambda a, s: s.max_flows == 100),
    "icmp_echo": ("drop", lambda a, s: s.icmp_echo == "drop"),
    "max_udp_flows": (100, lambda a, s: stack_config(s, 1500).max_udp_flows == 100),
    "udp_port_timeouts": ({"5353": 3}, lambda a, s: stack_config(s, 1500).udp_port_timeouts == {5353: 3.0}),
    "tcp_buffer_kb": (64, lambda a, s: (stack_config(s, 1500).rcv_buf, stack_config(s, 1500).snd_buf)
                      == (65536, 65536)),
    "memory_budget_mb": (16, lambda a, s: stack_config(s, 1500).memory_budget == 16 << 20),
    "tcp_synack_retries": (2, lambda a, s: stack_config(s, 1500).synack_retries == 2),
    "trust_checksums": (True, lambda a, s: stack_config(s, 1500).verify_checksums is False),
    "device": ("tun://prkey7", lambda a, s: a.device == "tun://prkey7" and s.net.owner == "tun2xray"),
    "control": ("unix:///tmp/pr-key.sock", lambda a, s: s.control == "unix:///tmp/pr-key.sock"),
    "record": ("/tmp/pr-key.pcap", lambda a, s: a.record == "/tmp/pr-key.pcap"),
    "record_wire": (True, lambda a, s: a.record_wire is True),
    "record_max_mb": (16, lambda a, s: a.record_max_mb == 16),
    "log_level": ("debug", lambda a, s: a.log_level == "debug"),
    "log_format": ("json", lambda a, s: a.log_format == "json"),
    "workers": (3, lambda a, s: a.workers == 3),
    "xray.config": ("/etc/pr/config.json", lambda a, s: a.xray_config == "/etc/pr/config.json"),
    "xray.bin": ("/opt/pr/v2ray", lambda a, s: a.xray_bin == "/opt/pr/v2ray"),
    "xray.auto_route": (True, lambda a, s: a.auto_route is True and s.net.auto_route),
}


def nest(path: str, value) -> dict:
    out = node = {}
    parts = path.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def test_every_key_has_an_effect_test():
    assert set(EFFECTS) == {k.path for k in KEYS}


@pytest.mark.parametrize("path", [p for p, (_, check) in EFFECTS.items() if check is not None])
def test_key_takes_effect_in_run(tmp_path, path):
    value, check = EFFECTS[path]
    base = {"proxy": PROXY, "device": "tun://prkey0"}
    if path.startswith("record_"):
        base["record"] = "/tmp/pr-key.pcap"     # they need a capture
    args, s = settings_for(tmp_path, merge(base, nest(path, value)))
    assert check(args, s)
    # and without the key, the check fails: the key made the difference
    args, s = settings_for(tmp_path, base)
    assert not check(args, s)


def test_excluded_routes_are_cut_out_of_the_routes(tmp_path):
    _, s = settings_for(tmp_path, {"proxy": PROXY, "device": "tun://prkey0",
                                   "ipv4": {"routes": ["198.51.100.0/24"],
                                            "excluded_routes": ["198.51.100.0/25"]},
                                   "ipv6": {"routes": ["fd99::/64"], "excluded_routes": ["fd99::/65"]}})
    assert [str(n) for n, _ in s.net.planned()] == ["198.51.100.128/25", "fd99::8000:0:0:0/65"]


def test_subtract_leaves_the_hole_and_nothing_else():
    routes = [ipaddress.ip_network("10.0.0.0/8")]
    hole = ipaddress.ip_network("10.1.0.0/16")
    parts = subtract(routes, [hole])
    assert len(parts) == 8
    assert not any(p.overlaps(hole) for p in parts)
    assert sum(p.num_addresses for p in parts) == routes[0].num_addresses - hole.num_addresses
    assert subtract(routes, [ipaddress.ip_network("0.0.0.0/0")]) == []
    assert subtract(routes, [ipaddress.ip_network("fd00::/8")]) == routes


def test_routes_default_depends_on_who_owns_the_device(tmp_path):
    base = {"proxy": PROXY}
    _, s = settings_for(tmp_path, {**base, "device": "tun://prkey0"})
    assert s.net.planned() == [] and s.net.status()["routes_applied_by"] == "tun2xray"
    _, s = settings_for(tmp_path, {**base, "device": "tun://prkey0", "xray": {"auto_route": True}})
    assert s.net.autoroute_prefixes() == {4: [ipaddress.ip_network("0.0.0.0/0")],
                                          6: [ipaddress.ip_network("::/0")]}
    _, s = settings_for(tmp_path, {**base, "device": "fd://3"})
    st = s.net.status()
    assert st["owner"] == "host" and st["routes_applied_by"] == "host"
    assert st["ipv4"]["routes"] == ["0.0.0.0/0"] and st["ipv6"]["routes"] == ["::/0"]
    s.net.up("lo")                                  # a host-owned device: nothing is applied
    assert s.net.added == []


def test_auto_route_gets_the_profiles_routes_and_dns_hosts(tmp_path):
    _, s = settings_for(tmp_path, {"proxy": PROXY, "device": "tun://prkey0",
                                   "xray": {"auto_route": True},
                                   "ipv4": {"routes": ["10.99.0.0/24"]}, "ipv6": {"routes": []},
                                   "dns": {"servers": ["9.9.9.9", "198.18.0.2"]}})
    assert s.net.autoroute_prefixes() == {4: [ipaddress.ip_network("9.9.9.9/32"),
                                              ipaddress.ip_network("10.99.0.0/24")], 6: []}


def test_dns_servers_on_the_tun_subnet_need_no_route():
    net = Network(load_profile({"proxy": PROXY, "dns": {"servers": ["198.18.0.2", "fd00:7478::53", "1.1.1.1"]}}),
                  "tun://x", ["198.18.0.1/15", "fd00:7478::1/64"])
    assert net.dns_hosts() == [ipaddress.ip_network("1.1.1.1/32")]


@pytest.mark.parametrize("path", [k.path for k in KEYS if k.flag])
def test_flag_wins_over_key(tmp_path, path):
    key = next(k for k in KEYS if k.path == path)
    value, _ = EFFECTS[path]
    flag = "--" + key.flag.replace("_", "-")
    other = {"proxy": ["--proxy", "socks5://127.0.0.1:10777"], "mtu": ["--mtu", "9000"],
             "ipv4.address": ["--address", "10.5.0.1/16"], "ipv6.address": ["--address6", "fd55::1/64"],
             "device": ["--device", "tun://prflag0"], "control": ["--control", "unix:///tmp/pr-flag.sock"],
             "record": ["--record", "/tmp/pr-flag.pcap"], "log_level": ["--log-level", "error"],
             "log_format": ["--log-format", "text"],
             "record_wire": ["--record-wire"], "record_max_mb": ["--record-max-mb", "2.5"],
             "workers": ["--workers", "1"], "xray.config": ["--xray-config", "/tmp/pr-flag.json"],
             "xray.bin": ["--xray-bin", "/tmp/pr-flag-bin"], "xray.auto_route": ["--auto-route"],
             "dns.mode": ["--dns", "remember"], "dns.upstream": ["--dns-upstream", "dokodemo://127.0.0.1:10777"]}[path]
    assert other[0] == flag
    base = {"proxy": PROXY, "device": "tun://prkey0"}
    if key.kind == "bool":
        value = False
    if path.startswith("record_"):
        base["record"] = "/tmp/pr-key.pcap"
    args, _ = settings_for(tmp_path, merge(base, nest(path, value)), *other)
    expect = True if len(other) == 1 else other[1]
    got = getattr(args, key.flag)
    assert (str(got) if not isinstance(got, bool) else got) == expect


def test_mirrored_flags_default_to_none_so_a_key_can_fill_them():
    run = build_parser()._subparsers._group_actions[0].choices["run"]
    dests = {a.dest: a for a in run._actions}
    for key in KEYS:
        if key.flag:
            assert key.flag in dests, f"{key.path}: no flag {key.flag}"
            assert dests[key.flag].default is None, f"--{key.flag}: default must be None (the key has it)"


def test_flag_defaults_apply_without_profile():
    args = build_parser().parse_args(["run", "--device", "tun://prkey0", "--proxy", PROXY])
    apply_profile(args)
    assert args.log_level == "info" and args.mtu == 1500 and args.auto_route is False
    assert args.workers is None and args.address == "198.18.0.1/15"


def test_profile_alone_drives_run_and_device_is_required(tmp_path):
    p = tmp_path / "p.json"
    p.write_text(json.dumps({"proxy": PROXY}))
    args = build_parser().parse_args(["run", "--config", str(p)])
    with pytest.raises(UsageError, match='^--device is required \\(or "device" in the --config profile\\)'):
        apply_profile(args)


def test_run_reports_a_bad_run_key_with_its_path(tmp_path):
    p = tmp_path / "p.json"
    p.write_text(json.dumps({"proxy": PROXY, "device": "tun://prkey0", "workers": 0}))
    r = subprocess.run([sys.executable, "-m", "tun2xray", "run", "--config", str(p)], capture_output=True,
                       text=True, timeout=20, env=dict(os.environ, PYTHONPATH=REPO), check=False)
    assert r.returncode == 2
    assert r.stderr.strip() == f"tun2xray: error: --config {p}: workers: 0 is not an integer in 1..64"


@pytest.mark.parametrize("path", [k.path for k in KEYS if k.run_only])
def test_bridge_rejects_run_only_keys(path):
    value, _ = EFFECTS[path]
    text = json.dumps(merge({"proxy": PROXY}, nest(path, value)))
    load_profile(text)                               # fine for run
    with pytest.raises(ProfileError, match=f"^{path}: only `tun2xray run` reads this key"):
        bridge.start(text)


def test_bridge_requires_proxy_run_takes_it_from_flag_key_or_core(tmp_path):
    with pytest.raises(ProfileError, match="^proxy: is required$"):
        load_profile({"mtu": 1400}, bridge=True)
    assert load_profile({"xray": {"config": "c.json"}}).proxy is None
    args, s = settings_for(tmp_path, {"device": "tun://prkey0"}, "--proxy", PROXY)
    assert s.router.default_url == PROXY
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"device": "tun://prkey0"}))
    args = build_parser().parse_args(["run", "--config", str(path)])
    apply_profile(args)
    with pytest.raises(UsageError, match="^--proxy is required"):
        RunSettings(args)


def test_bridge_network_status_reports_the_profile_for_the_host():
    import socket as so
    with so.socket() as probe:           # a closed port: the bridge serves, "connecting"
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    h = bridge.start(json.dumps({"proxy": f"socks5://127.0.0.1:{port}", "mtu": 1400,
                                 "ipv4": {"routes": ["10.0.0.0/8"], "excluded_routes": ["10.1.0.0/16"]},
                                 "dns": {"servers": ["10.0.0.53"]}}))
    try:
        net = bridge.status(h)["network"]
    finally:
        bridge.stop(h)
    assert net["owner"] == "host" and net["mtu"] == 1400 and net["routes_applied_by"] == "host"
    assert net["ipv4"] == {"address": "198.18.0.1/15", "routes": ["10.0.0.0/8"], "excluded_routes": ["10.1.0.0/16"]}
    assert net["ipv6"]["routes"] == ["::/0"] and net["dns"] == {"servers": ["10.0.0.53"]}


def test_every_key_is_in_the_reference():
    with open(os.path.join(REPO, "docs", "profile.md")) as f:
        doc = f.read()
    for key in KEYS:
        assert f"| `{key.path}` |" in doc, f"docs/profile.md has no row for {key.path}"
        if key.flag:
            flag = "--" + key.flag.replace("_", "-")
            assert f"| `{flag}` | `{key.path}` |" in doc, f"docs/profile.md: no flag row {flag}"


# ------------------------------------------------------------------- schema

def test_checked_in_schema_is_the_generated_one():
    with open(schema_path()) as f:
        assert f.read() == schema_text(), "run: python3 -m tun2xray.profile --write-schema"


def test_schema_command_prints_it():
    r = subprocess.run([sys.executable, "-m", "tun2xray.profile", "--schema"], capture_output=True, text=True,
                       timeout=20, env=dict(os.environ, PYTHONPATH=REPO), check=False)
    assert r.returncode == 0 and json.loads(r.stdout) == json_schema()


GOOD = [
    {},
    {"proxy": PROXY},
    {"xray": {"config": "/etc/tun2xray/config.json"}},
    {"mtu": 1500, "xray": {"bin": "v2ray"}},
    {"proxy": "socks5h://u:p@[::1]:1080", "mtu": 576, "icmp_echo": "drop", "udp_timeout": 0.5 + 1,
     "tcp_connect_timeout": 0.1, "max_flows": 1},
    {"proxy": PROXY, "ipv4": {"address": "10.0.0.1", "routes": ["0.0.0.0/0", "10.0.0.0/8"],
                              "excluded_routes": ["192.168.0.0/16"]},
     "ipv6": {"address": "fd00::1/64", "routes": ["::/0"], "excluded_routes": ["fd00::/8"]},
     "dns": {"servers": ["1.1.1.1", "2606:4700::1111"]}},
    {"proxy": PROXY, "rules": [{"to": "dokodemo://127.0.0.1:53"},
                               {"network": "tcp,udp", "cidr": ["10.0.0.0/8", "fd00::/8"], "port": "1000-2000",
                                "to": "tunnel://127.0.0.1:1"},
                               {"network": "udp", "port": 0, "to": "socks5://127.0.0.1:1"}]},
    {"proxy": PROXY, "device": "tun://tun0?offload=0", "control": "unix:///run/t.sock", "record": "c.pcap",
     "record_wire": True, "record_max_mb": 0.5, "log_format": "json",
     "log_level": "warning", "workers": 64, "xray": {"config": "c.json", "bin": "v2ray", "auto_route": True}},
    {"proxy": PROXY, "device": "fd://3?header=af", "control": "none"},
    {"proxy": PROXY, "rules": [{"network": "udp", "port": 443, "to": "block"},
                               {"domain": ["full:a.example", "suffix:b.example", "domain:c.example", "keyword:d",
                                           "plain", "regexp:^e[0-9]+:x$"], "network": "tcp", "to": PROXY}]},
]

BAD = [
    {"proxy": 1},
    {"proxy": "http://127.0.0.1:80"},
    {"proxy": "socks5://127.0.0.1"},
    {"proxy": "socks5://127.0.0.1:70000"},
    {"proxy": "dokodemo://127.0.0.1:53"},
    {"proxy": PROXY, "mtu": 575},
    {"proxy": PROXY, "mtu": 65536},
    {"proxy": PROXY, "mtu": "1500"},
    {"proxy": PROXY, "mtu": True},
    {"proxy": PROXY, "colour": "blue"},
    {"proxy": PROXY, "ipv4": []},
    {"proxy": PROXY, "ipv4": {"adress": "10.0.0.1/8"}},
    {"proxy": PROXY, "ipv4": {"address": "fd00::1/64"}},
    {"proxy": PROXY, "ipv4": {"address": "300.0.0.1/8"}},
    {"proxy": PROXY, "ipv4": {"routes": "0.0.0.0/0"}},
    {"proxy": PROXY, "ipv4": {"routes": ["10.0.0.0/33"]}},
    {"proxy": PROXY, "ipv6": {"routes": ["10.0.0.0/8"]}},
    {"proxy": PROXY, "ipv6": {"address": "fd00::1/129"}},
    {"proxy": PROXY, "dns": {"servers": ["dns.google"]}},
    {"proxy": PROXY, "dns": {"servers": "1.1.1.1"}},
    {"proxy": PROXY, "dns": {"resolvers": []}},
    {"proxy": PROXY, "rules": {}},
    {"proxy": PROXY, "rules": [{"port": 53}]},
    {"proxy": PROXY, "rules": [{"port": "70000", "to": PROXY}]},
    {"proxy": PROXY, "rules": [{"port": 65536, "to": PROXY}]},
    {"proxy": PROXY, "rules": [{"network": "icmp", "to": PROXY}]},
    {"proxy": PROXY, "rules": [{"cidr": "10.0.0.0/8", "to": PROXY}]},
    {"proxy": PROXY, "rules": [{"to": PROXY, "via": "x"}]},
    {"proxy": PROXY, "rules": [{"to": "http://127.0.0.1:1"}]},
    {"proxy": PROXY, "rules": [{"to": "blocked"}]},
    {"proxy": PROXY, "rules": [{"domain": [], "to": "block"}]},
    {"proxy": PROXY, "rules": [{"domain": "a.example", "to": "block"}]},
    {"proxy": PROXY, "rules": [{"domain": ["geosite:cn"], "to": "block"}]},
    {"proxy": PROXY, "rules": [{"domain": ["full:"], "to": "block"}]},
    {"proxy": PROXY, "rules": [{"domain": [""], "to": "block"}]},
    {"proxy": PROXY, "rules": [{"domain": [7], "to": "block"}]},
    {"proxy": PROXY, "udp_timeout": 0},
    {"proxy": PROXY, "tcp_connect_timeout": 601},
    {"proxy": PROXY, "max_flows": 0},
    {"proxy": PROXY, "icmp_echo": "maybe"},
    {"proxy": PROXY, "device": "eth0"},
    {"proxy": PROXY, "device": 3},
    {"proxy": PROXY, "control": "/tmp/x.sock"},
    {"proxy": PROXY, "record": ""},
    {"proxy": PROXY, "log_level": "trace"},
    {"proxy": PROXY, "log_format": "xml"},
    {"proxy": PROXY, "workers": 0},
    {"proxy": PROXY, "workers": 65},
    {"proxy": PROXY, "record_max_mb": -1},
    {"proxy": PROXY, "record_wire": 1},
    {"proxy": PROXY, "xray": {"config": 5}},
    {"proxy": PROXY, "xray": {"auto_route": "yes"}},
    {"proxy": PROXY, "xray": {"confg": "c.json"}},
]


def _validator_ok(doc) -> bool:
    try:
        load_profile(doc)
    except ProfileError:
        return False
    return True


@pytest.mark.parametrize("doc", GOOD + BAD, ids=[f"good{i}" for i in range(len(GOOD))] +
                         [f"bad{i}" for i in range(len(BAD))])
def test_validator_and_schema_agree(doc):
    jsonschema = pytest.importorskip("jsonschema")     # the test extra installs it
    v = jsonschema.Draft202012Validator(json_schema())
    schema_ok = not list(v.iter_errors(doc))
    assert _validator_ok(doc) == (doc in GOOD)
    assert schema_ok == (doc in GOOD), [e.message for e in v.iter_errors(doc)]


def test_schema_is_a_valid_draft_2020_12_schema():
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(json_schema())
