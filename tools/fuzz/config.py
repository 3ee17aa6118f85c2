"""Fuzz target "config": the profile loader and the Xray config reader.

Byte 0 picks the part:
  0  load_profile on the raw bytes (JSON text from the input)
  1  load_profile on a JSON document built from the profile's own keys and
     typical values (the input chooses the tree), so that the checks past
     JSON syntax get exercised
  2  the Xray reader (comments, strict JSON, positions) on the raw bytes as
     UTF-8 text, then derive() on what it decodes
  3  the same on a config document built from Xray's keys, with comments
     woven in
  4  core_position (the core's "line L char C" mapped back to the file)
Invariants: load_profile raises only ProfileError, with a one-line message;
a profile it accepts survives to_json() and loads again to the same JSON;
engine_settings raises only ProfileError.  parse_config_text and derive
raise only XrayConfigError (one line); derive's result names a proxy, and
its ready checks and the outbound servers are computed without error.
"""

from __future__ import annotations

import json

# the xray package loads its modules on first use: import them now, so that
# they are imported (and instrumented) with this harness
from tun2xray.xray import config as xconfig
from tun2xray.xray import errors as xerrors
from tun2xray.xray import reader as xreader
from tun2xray.bridge import engine_settings
from tun2xray.profile import ProfileError, load_profile

from .common import Provider, check, one_line

PROFILE_WORDS = (
    "proxy", "mtu", "ipv4", "ipv6", "address", "routes", "excluded_routes", "dns", "servers", "rules",
    "network", "cidr", "port", "to", "udp_timeout", "tcp_connect_timeout", "max_flows", "icmp_echo",
    "max_udp_flows", "udp_port_timeouts", "tcp_buffer_kb", "memory_budget_mb", "53", "123",
    "reply", "drop", "socks5://127.0.0.1:1080", "dokodemo://127.0.0.1:53", "socks5://u:p@[::1]:1",
    "socks5h://name:1080", "tunnel://127.0.0.1:5353", "10.0.0.0/8", "0.0.0.0/0", "::/0", "fd00::1/64",
    "198.18.0.1/15", "1000-2000", "tcp", "udp", "tcp,udp", "198.18.0.2", "::1", "70000", "",
)
XRAY_WORDS = (
    "inbounds", "outbounds", "protocol", "socks", "dokodemo-door", "tunnel", "listen", "port", "settings",
    "udp", "auth", "noauth", "password", "accounts", "user", "pass", "address", "network", "allowedNetwork",
    "rewriteAddress", "rewritePort", "followRedirect", "tag", "dns", "servers", "streamSettings", "sockopt",
    "mark", "vnext", "peers", "endpoint", "freedom", "blackhole", "127.0.0.1", "::1", "0.0.0.0", "[::]",
    "1.1.1.1", "udp://8.8.8.8:53", "[2001:db8::1]:53", "tcp,udp", "10853", "1080-1090", "53", "localhost",
    "example.com:443", "",
)
NUMBERS = (0, 1, 53, 576, 1080, 1500, 65535, 65536, -1, 10**20, 0.5, 1e308, 86400, 10_000_000)


def build(fdp: Provider, words, depth: int = 0, top: bool = False):
    """A JSON value whose shape the input chooses, from *words* and NUMBERS."""
    kind = 6 if top else fdp.u8() % (8 if depth < 5 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return fdp.flag()
    if kind == 2:
        return fdp.pick(NUMBERS) if fdp.flag() else fdp.u16()
    if kind == 3:
        return fdp.take(fdp.u8() % 12).decode("utf-8", "replace")
    if kind == 4:
        return fdp.pick(words)
    if kind == 5:
        return [build(fdp, words, depth + 1) for _ in range(fdp.u8() % 4)]
    return {fdp.pick(words): build(fdp, words, depth + 1) for _ in range(fdp.u8() % 6)}


def profile(source) -> None:
    """As `run` reads a profile, and as the bridge does (proxy required,
    run-only keys refused); only the bridge's kind reaches engine_settings."""
    for bridge in (False, True):
        try:
            p = load_profile(source, bridge=bridge)
        except ProfileError as e:
            one_line(e)
            continue
        doc = p.to_json()
        again = load_profile(json.dumps(doc), bridge=bridge).to_json()
        check(again == doc, lambda: f"profile does not survive to_json: {doc} -> {again}")
        if bridge:
            try:
                engine_settings(p)
            except ProfileError as e:
                one_line(e)


def profile_raw(data: bytes) -> None:
    profile(data)


def profile_built(data: bytes) -> None:
    fdp = Provider(data)
    doc = build(fdp, PROFILE_WORDS, top=True)
    if fdp.flag():
        doc.setdefault("proxy", "socks5://127.0.0.1:1080")
    profile(json.dumps(doc))


def xray_text(text: str) -> None:
    try:
        cfg = xreader.parse_config_text(text, "config.json")
    except xerrors.XrayConfigError as e:
        one_line(e)
        return
    check(isinstance(cfg, dict), "config is not an object")
    xconfig.outbound_servers(cfg)
    try:
        d = xconfig.derive("/nonexistent/config.json", config=cfg, write=False, mark=0x7478)
    except xerrors.XrayConfigError as e:
        one_line(e)
        return
    check(d.proxy is not None and d.proxy_url.startswith("socks5://"), "derive gave no proxy")
    for host, port, proto in d.ready_checks():
        check(isinstance(host, str) and 0 < port < 65536 and proto in ("socks", "tcp", "udp"),
              lambda: f"ready check {(host, port, proto)}")


def xray_raw(data: bytes) -> None:
    xray_text(data.decode("utf-8", "replace"))


def xray_built(data: bytes) -> None:
    fdp = Provider(data)
    doc = build(fdp, XRAY_WORDS, top=True)
    text = json.dumps(doc, indent=fdp.u8() % 3 or None)
    # weave comments in between tokens, as users write them
    out, i = [], 0
    while i < len(text) and fdp.remaining():
        step = 1 + fdp.u8() % 40
        out.append(text[i:i + step])
        i += step
        c = fdp.u8() % 8
        if c == 1:
            out.append("// a comment \"with quotes\"\n")
        elif c == 2:
            out.append("/* block\n comment */")
        elif c == 3:
            out.append("# hash comment\n")
    out.append(text[i:])
    xray_text("".join(out))


def positions(data: bytes) -> None:
    fdp = Provider(data)
    line, char = fdp.u8(), fdp.u16()
    text = fdp.rest().decode("utf-8", "replace")
    ln, col = xreader.core_position(text, line, char)
    check(isinstance(ln, int) and isinstance(col, int), "core_position")


PART_FUNCS = (profile_raw, profile_built, xray_raw, xray_built, positions)


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    PART_FUNCS[data[0] % len(PART_FUNCS)](data[1:])


def seeds() -> list:
    prof = {"proxy": "socks5://127.0.0.1:10808", "mtu": 1500,
            "ipv4": {"address": "198.18.0.1/15", "routes": ["0.0.0.0/0"], "excluded_routes": []},
            "ipv6": {"address": "fd00:7478::1/64", "routes": ["::/0"], "excluded_routes": []},
            "dns": {"servers": ["198.18.0.2"]},
            "rules": [{"network": "udp", "port": 53, "to": "dokodemo://127.0.0.1:10853"},
                      {"network": "tcp,udp", "cidr": ["10.0.0.0/8"], "port": "1000-2000",
                       "to": "socks5://127.0.0.1:10809"}],
            "udp_timeout": 60, "tcp_connect_timeout": 10, "max_flows": 65536, "icmp_echo": "reply",
            "max_udp_flows": 16384, "udp_port_timeouts": {"53": 10, "123": 10}, "tcp_buffer_kb": 1024,
            "memory_budget_mb": 16}
    core = """{
  // the tunnel side
  "inbounds": [
    {"tag": "socks-in", "listen": "127.0.0.1", "port": 10808, "protocol": "socks",
     "settings": {"auth": "noauth", "udp": true, "ip": "127.0.0.1"}},
    {"listen": "127.0.0.1", "port": "10853", "protocol": "dokodemo-door",  # DNS
     "settings": {"address": "1.1.1.1", "port": 53, "network": "tcp,udp"}},
    {"port": 5353, "protocol": "tunnel", "settings": {"rewriteAddress": "9.9.9.9", "rewritePort": 5353,
     "allowedNetwork": ["udp"]}}
  ],
  /* where it goes */
  "outbounds": [{"protocol": "vless", "settings": {"vnext": [{"address": "example.com", "port": 443}]}},
                {"protocol": "freedom", "tag": "direct"}],
  "dns": {"servers": ["8.8.8.8", {"address": "[2001:db8::1]:53"}]}
}"""
    return [b"\0" + json.dumps(prof).encode(), b"\0{\"proxy\": \"socks5://u:p@[::1]:1080\"}",
            b"\1" + bytes(range(0, 64)), b"\2" + core.encode(), b"\2{\"inbounds\": null}",
            b"\3" + bytes(range(6, 70)), b"\4\3\0\x07" + core.encode()]
