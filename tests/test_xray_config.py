"""tun2xray.xray: reading Xray configs (comments), finding the tunnel-side
inbounds, and the derived runtime config (the user's file is never edited)."""

import ipaddress
import json
import os

import pytest

from tun2xray import xray
from tun2xray.xray.config import _dns_server
from tun2xray.upstream.url import DokodemoUpstream, SocksUpstream

SOCKS = {"tag": "socks", "listen": "127.0.0.1", "port": 10808, "protocol": "socks",
         "settings": {"auth": "noauth", "udp": True}}
DNS = {"tag": "dns", "listen": "127.0.0.1", "port": 10853, "protocol": "dokodemo-door",
       "settings": {"address": "1.1.1.1", "port": 53, "network": "tcp,udp"}}
OUT = [{"tag": "proxy", "protocol": "vmess",
        "settings": {"vnext": [{"address": "203.0.113.7", "port": 443, "users": []}]}},
       {"tag": "direct", "protocol": "freedom"},
       {"tag": "block", "protocol": "blackhole"}]


def write(tmp_path, cfg, name="config.json"):
    p = tmp_path / name
    p.write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    return str(p)


# --- reading ---------------------------------------------------------------

def test_comments_are_stripped_outside_strings():
    text = """{
      // line comment
      "a": "http://x//y#z", # hash comment
      /* block
         comment */ "b": [1, 2],
      "c": "/* not a comment */"
    }"""
    assert xray.parse_config_text(text) == {"a": "http://x//y#z", "b": [1, 2],
                                            "c": "/* not a comment */"}


def test_comments_are_removed_as_the_core_removes_them():
    # dropped, not blanked: tokens around a comment join (as in the core's reader)
    assert xray.parse_config_text('{"a": tr/**/ue, "b": 1/* x */2}') == {"a": True, "b": 12}
    # newlines inside comments are kept, so lines match the file
    assert xray.strip_comments("{ # one\n /* two\n three */ }") == "{ \n \n }"
    # what follows the first JSON value is ignored, as Go's decoder does
    assert xray.parse_config_text('{"a": 1} trailing words') == {"a": 1}
    assert xray.parse_config_text("null") == {}


@pytest.mark.parametrize("text, where, what", [
    ('{"a": [1, 2,]}', "line 1 column 12", "trailing comma before ']'"),
    ('{\n "x": 1, /* c */\n "b": [1,\n  2,\n ]\n}', "line 4 column 4", "trailing comma before ']'"),
    ('{\n  "a": 1, # c\n}', "line 2 column 9", "trailing comma before '}'"),
    ('{"a": NaN}', "line 1 column 7", "NaN is not JSON"),
    ('/* x */ {"a": 1 "b": 2}', "line 1 column 17", "Expecting ',' delimiter"),
    ('\ufeff{}', "line 1 column 1", "byte order mark"),
])
def test_what_the_core_rejects_is_rejected_with_line_and_column(text, where, what):
    with pytest.raises(xray.XrayConfigError) as e:
        xray.parse_config_text(text, "cfg.json")
    msg = str(e.value)
    assert msg.startswith(f"cfg.json: {where}") and what in msg and "\n" not in msg, msg


def test_core_positions_map_back_to_the_file():
    # the core counts in the comment-free text ("at line 1 char 23", "line 3
    # char 16" are v2ray 4.34's words for these two); the user reads the file
    text = '/* a */ {"log": {"loglevel": 5},\n  # x\n  "inbounds": /* é */ 7}'
    assert xray.core_position(text, 1, 23) == (1, 30)
    assert xray.core_position(text, 3, 16) == (3, 23)


def test_escaped_quote_in_string_does_not_end_it():
    assert xray.parse_config_text(r'{"a": "q\"//x"} // c') == {"a": 'q"//x'}


def test_bad_json_names_line_and_column():
    with pytest.raises(xray.XrayConfigError) as e:
        xray.parse_config_text('{\n  // c\n  "a": 1 "b": 2}', "cfg.json")
    msg = str(e.value)
    assert "cfg.json" in msg and "line 3" in msg and "\n" not in msg


def test_not_an_object():
    with pytest.raises(xray.XrayConfigError, match="JSON object"):
        xray.parse_config_text("[1]")


def test_dangling_link(tmp_path):
    link = tmp_path / "config.json"
    os.symlink("nodes/gone.json", link)
    with pytest.raises(xray.XrayConfigError, match="dangling link to nodes/gone.json"):
        xray.load_config(str(link))


def test_missing_file(tmp_path):
    with pytest.raises(xray.XrayConfigError, match="No such file"):
        xray.load_config(str(tmp_path / "nope.json"))


# --- finding the inbounds ----------------------------------------------------

def test_socks_and_dokodemo_found_no_runtime_config(tmp_path):
    path = write(tmp_path, {"inbounds": [SOCKS, DNS], "outbounds": OUT})
    d = xray.derive(path)
    assert d.runtime_path is None and d.config["inbounds"] == [SOCKS, DNS]
    assert d.proxy == SocksUpstream("127.0.0.1", 10808)
    assert d.proxy_url == "socks5://127.0.0.1:10808"
    [rule] = d.rules
    assert rule.to == DokodemoUpstream("127.0.0.1", 10853)
    assert rule.networks == {"tcp", "udp"} and rule.ports == (53, 53) and rule.cidrs == ()
    assert sorted(d.ready_checks()) == [("127.0.0.1", 10808, "socks"), ("127.0.0.1", 10808, "udp"),
                                        ("127.0.0.1", 10853, "tcp"), ("127.0.0.1", 10853, "udp")]
    assert os.listdir(tmp_path) == ["config.json"]


def test_tunnel_alias_with_new_field_names(tmp_path):
    tun = {"listen": "127.0.0.1", "port": "5353", "protocol": "tunnel",
           "settings": {"rewriteAddress": "9.9.9.9", "rewritePort": 53, "allowedNetwork": "udp"}}
    ntp = {"listen": "::1", "port": 1123, "protocol": "tunnel",
           "settings": {"rewriteAddress": "192.0.2.123", "rewritePort": 123,
                        "allowedNetwork": ["udp"]}}
    d = xray.derive(write(tmp_path, {"inbounds": [SOCKS, tun, ntp]}))
    dns, time_rule = d.rules
    assert dns.to == DokodemoUpstream("127.0.0.1", 5353) and dns.networks == {"udp"}
    assert dns.ports == (53, 53) and dns.cidrs == ()
    # a target on another port takes only flows to its own address:port
    assert time_rule.to == DokodemoUpstream("::1", 1123)
    assert time_rule.cidrs == (ipaddress.ip_network("192.0.2.123/32"),)
    assert time_rule.ports == (123, 123)
    assert time_rule.matches("udp", ipaddress.ip_address("192.0.2.123"), 123)
    assert not time_rule.matches("udp", ipaddress.ip_address("192.0.2.124"), 123)
    assert not time_rule.matches("tcp", ipaddress.ip_address("192.0.2.123"), 123)


OLD_FIELDS = {"address": "192.0.2.9", "port": 9000, "network": "tcp,udp"}
NEW_FIELDS = {"rewriteAddress": "192.0.2.9", "rewritePort": 9000, "allowedNetwork": "tcp,udp"}


@pytest.mark.parametrize("protocol", ["dokodemo-door", "tunnel"])
@pytest.mark.parametrize("fields", [OLD_FIELDS, NEW_FIELDS,
                                    # the newer names win when a config carries both
                                    dict(NEW_FIELDS, address="198.51.100.1", port=1, network="udp")],
                         ids=["old-names", "new-names", "both"])
def test_either_protocol_name_with_either_field_spelling(tmp_path, protocol, fields):
    ib = {"tag": "t", "listen": "127.0.0.1", "port": 7000, "protocol": protocol, "settings": fields}
    d = xray.derive(write(tmp_path, {"inbounds": [SOCKS, ib]}))
    [rule] = d.rules
    assert rule.to == DokodemoUpstream("127.0.0.1", 7000)
    assert rule.networks == {"tcp", "udp"} and rule.ports == (9000, 9000)
    assert rule.cidrs == (ipaddress.ip_network("192.0.2.9/32"),)
    assert d.inbounds[1].target == ("192.0.2.9", 9000) and d.notes == []


@pytest.mark.parametrize("settings", [{"rewriteAddress": "9.9.9.9", "allowedNetwork": "udp"},
                                      {"rewriteAddress": "9.9.9.9", "rewritePort": 0, "allowedNetwork": "udp"},
                                      {"address": "9.9.9.9", "network": "udp"}])
def test_a_target_port_left_out_is_the_listening_port(tmp_path, settings):
    ib = {"listen": "127.0.0.1", "port": 53, "protocol": "tunnel", "settings": settings}
    d = xray.derive(write(tmp_path, {"inbounds": [SOCKS, ib]}))
    [rule] = d.rules
    # listening on 53 with no target port: a DNS tunnel to 9.9.9.9:53, which takes every DNS flow
    assert d.inbounds[1].target == ("9.9.9.9", 53)
    assert rule.ports == (53, 53) and rule.cidrs == () and rule.networks == {"udp"}


def test_password_socks_and_any_address_listen(tmp_path):
    s = {"port": 1080, "protocol": "socks", "listen": "0.0.0.0",
         "settings": {"auth": "password", "udp": True, "accounts": [{"user": "u", "pass": "p w"}]}}
    d = xray.derive(write(tmp_path, {"inbounds": [s]}))
    assert d.proxy == SocksUpstream("127.0.0.1", 1080, "u", "p w")
    assert d.runtime_path is None


@pytest.mark.parametrize("socks, why", [
    (dict(SOCKS, settings={"auth": "noauth"}), "UDP is off"),
    (dict(SOCKS, listen="192.0.2.1"), "not listening on loopback"),
    (dict(SOCKS, port="x"), "no usable port"),
])
def test_unusable_socks_gets_an_added_inbound(tmp_path, socks, why):
    cfg = {"inbounds": [socks, DNS], "outbounds": OUT}
    path = write(tmp_path, cfg)
    before = open(path).read()
    d = xray.derive(path)
    assert any(why in n for n in d.notes), d.notes
    assert d.added == ["tun2xray-socks"]
    assert d.runtime_path == str(tmp_path / ".config.tun2xray.json")
    assert oct(os.stat(d.runtime_path).st_mode & 0o777) == "0o600"
    assert open(path).read() == before                # the user's file is untouched
    runtime = json.load(open(d.runtime_path))
    added = runtime["inbounds"][-1]
    assert added["protocol"] == "socks" and added["listen"] == "127.0.0.1"
    assert added["settings"]["udp"] is True and added["sniffing"]["enabled"] is True
    assert d.proxy == SocksUpstream("127.0.0.1", added["port"])
    assert runtime["inbounds"][:2] == cfg["inbounds"]     # the user's inbounds are kept
    assert len(d.rules) == 1                               # the dokodemo still counts


def test_no_inbounds_at_all(tmp_path):
    d = xray.derive(write(tmp_path, "// a client with no inbounds\n{\"outbounds\": []}"))
    assert d.added and d.proxy.host == "127.0.0.1"
    assert json.load(open(d.runtime_path))["inbounds"][0]["protocol"] == "socks"


def test_inbounds_not_a_list_is_a_one_line_error(tmp_path):
    with pytest.raises(xray.XrayConfigError, match="no usable socks inbound and no way to add one"):
        xray.derive(write(tmp_path, {"inbounds": {"socks": 1}}))


def test_transparent_and_nameless_dokodemo_are_skipped(tmp_path):
    tproxy = {"port": 12345, "protocol": "dokodemo-door", "listen": "127.0.0.1",
              "settings": {"network": "tcp", "followRedirect": True}}
    named = {"port": 4443, "protocol": "dokodemo-door", "listen": "127.0.0.1",
             "settings": {"address": "example.com", "port": 443}}
    lan = dict(DNS, listen="192.0.2.1")
    d = xray.derive(write(tmp_path, {"inbounds": [SOCKS, tproxy, named, lan]}))
    assert d.rules == []
    assert len(d.notes) == 3


def test_mark_goes_on_every_dialing_outbound(tmp_path):
    cfg = {"inbounds": [SOCKS],
           "outbounds": OUT + [{"protocol": "vless", "streamSettings": {"network": "ws",
                                                                        "sockopt": {"tcpFastOpen": True}}}]}
    path = write(tmp_path, cfg)
    d = xray.derive(path, mark=0x7478)
    runtime = json.load(open(d.runtime_path))
    marks = [ob.get("streamSettings", {}).get("sockopt", {}).get("mark") for ob in runtime["outbounds"]]
    assert marks == [0x7478, 0x7478, None, 0x7478]
    assert runtime["outbounds"][3]["streamSettings"] == {
        "network": "ws", "sockopt": {"tcpFastOpen": True, "mark": 0x7478}}
    assert json.load(open(path)) == cfg


def test_mark_makes_the_implicit_freedom_outbound_explicit(tmp_path):
    d = xray.derive(write(tmp_path, {"inbounds": [SOCKS]}), mark=1)
    assert d.config["outbounds"] == [{"protocol": "freedom", "tag": "direct",
                                      "streamSettings": {"sockopt": {"mark": 1}}}]


def test_outbound_servers():
    cfg = {"outbounds": OUT + [
        {"protocol": "shadowsocks", "settings": {"servers": [{"address": "ss.example", "port": "8388"}]}},
        {"protocol": "wireguard", "settings": {"peers": [{"endpoint": "[2001:db8::1]:51820"}]}}]}
    assert xray.outbound_servers(cfg) == [("203.0.113.7", 443), ("ss.example", 8388),
                                          ("2001:db8::1", 51820)]
    addrs = xray.resolve_servers([("203.0.113.7", 443), ("localhost", 1), ("no-such-host.invalid", 1)])
    assert ipaddress.ip_address("203.0.113.7") in addrs
    assert ipaddress.ip_address("127.0.0.1") in addrs


def test_core_reason_is_one_line():
    lines = ["V2Ray 4.34.0 (user)", "A unified platform for anti-censorship.",
             "main: failed to read config files: [x.json] > unknown config id: nosuch"]
    assert xray.core_reason(lines) == lines[2]
    panic = ["V2Ray 4.34.0", "2026/01/01 00:00:00 [Info] Reading config: x",
             "panic: serial: failed to read config file > invalid port range: \"abc\"",
             "", "goroutine 1 [running]:", "\tv2ray.com/core/common/common.go:26"]
    assert xray.core_reason(panic) == 'serial: failed to read config file > invalid port range: "abc"'
    assert xray.core_reason([]) == "exited without a message"


def test_interface_binding_is_set_beside_the_mark(tmp_path):
    d = xray.derive(write(tmp_path, {"inbounds": [SOCKS], "outbounds": OUT}), interface="eth9")
    so = [ob.get("streamSettings", {}).get("sockopt") for ob in d.config["outbounds"]]
    assert so == [{"interface": "eth9"}, {"interface": "eth9"}, None]


def test_password_in_proxy_url_is_quoted_and_parses_back(tmp_path):
    from tun2xray.upstream.url import parse_upstream
    s = {"port": 1080, "protocol": "socks", "listen": "127.0.0.1",
         "settings": {"auth": "password", "udp": True, "accounts": [{"user": "u@x", "pass": "p:w/@"}]}}
    d = xray.derive(write(tmp_path, {"inbounds": [s]}))
    assert parse_upstream(d.proxy_url) == SocksUpstream("127.0.0.1", 1080, "u@x", "p:w/@")


# --- `run` flags: errors before anything is opened ---------------------------------

def run_cli(*args):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "tun2xray", "run", "--device", "tun://xrunit0", *args],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("make, flags, needle", [
    (None, ["--auto-route"], "--auto-route needs --xray-config"),
    ("dangling", [], "dangling link to nodes/gone.json"),
    ("badjson", [], "not valid JSON"),
    ("ok", ["--xray-bin", "/nonexistent/v2ray"], "--xray-bin /nonexistent/v2ray: not found"),
])
def test_run_xray_errors_are_one_line(tmp_path, make, flags, needle):
    args = list(flags)
    if make == "dangling":
        os.symlink("nodes/gone.json", tmp_path / "config.json")
        args += ["--xray-config", str(tmp_path / "config.json")]
    elif make == "badjson":
        args += ["--xray-config", write(tmp_path, '{"inbounds": [}')]
    elif make == "ok":
        args += ["--xray-config", write(tmp_path, {"inbounds": [SOCKS]})]
    r = run_cli(*args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("tun2xray: error:") and needle in lines[0], lines[0]
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tun2xray.json")]


# --- hostile input ------------------------------------------------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402

_PIECES = st.sampled_from(['{', '}', '[', ']', '"', '\\', '//', '/*', '*/', '#', ',', ':', '\n',
                           '"inbounds"', '"socks"', '1', 'true', ' ', 'é', '\x00'])


@settings(max_examples=300, deadline=None)
@given(st.lists(_PIECES, max_size=60).map("".join))
def test_any_text_parses_or_gives_one_line_error(text):
    try:
        data = xray.parse_config_text(text)
    except xray.XrayConfigError as e:
        assert "\n" not in str(e)
        return
    assert isinstance(data, dict)


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(
                        ["inbounds", "outbounds", "protocol", "listen", "port", "settings", "udp",
                         "address", "network", "vnext", "servers", "tag", "auth", "accounts"]),
                        c, max_size=4), max_leaves=20))
def test_any_json_shape_derives_or_gives_one_line_error(tmp_path_factory, shape):
    cfg = {"inbounds": shape} if not isinstance(shape, dict) else shape
    path = tmp_path_factory.mktemp("h") / "c.json"
    path.write_text(json.dumps(cfg))
    try:
        d = xray.derive(str(path), mark=1)
    except xray.XrayConfigError as e:
        assert "\n" not in str(e)
        return
    assert d.proxy.host in ("127.0.0.1", "::1") and 0 < d.proxy.port < 65536
    assert all(isinstance(ib.tag, str) for ib in d.inbounds)


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.integers() | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(
                        ["outbounds", "settings", "vnext", "servers", "peers", "address", "port",
                         "endpoint"]), c, max_size=4), max_leaves=25))
def test_outbound_servers_of_any_shape(shape):
    cfg = shape if isinstance(shape, dict) else {"outbounds": shape}
    for host, port in xray.outbound_servers(cfg):
        assert isinstance(host, str) and 0 <= port < 65536


def test_deep_nesting_and_huge_files(tmp_path):
    with pytest.raises(xray.XrayConfigError, match="nested too deeply"):
        xray.parse_config_text("[" * 100_000 + "]" * 100_000)
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (xray.MAX_CONFIG + 1))
    with pytest.raises(xray.XrayConfigError, match="larger than 16 MB"):
        xray.load_config(str(big))


# --- an added DNS inbound ------------------------------------------------------------

@pytest.mark.parametrize("servers, want", [
    (["https://1.1.1.1/dns-query", "localhost", "fakedns", "9.9.9.9"], ("9.9.9.9", 53)),
    ([{"address": "2001:db8::53", "port": 5353}], ("2001:db8::53", 5353)),
    (["udp://[2001:db8::1]:53"], ("2001:db8::1", 53)),
    (["8.8.4.4:5300"], ("8.8.4.4", 5300)),
    (["dns.google", {"address": "x", "port": 53}], None),
])
def test_dns_server_of_the_config(servers, want):
    assert _dns_server({"dns": {"servers": servers}}) == want


def test_a_client_config_without_inbounds_gets_socks_and_dns(tmp_path):
    cfg = {"dns": {"servers": ["10.99.0.53"]}, "outbounds": OUT}
    path = write(tmp_path, cfg)
    d = xray.derive(path)
    assert d.added == ["tun2xray-socks", "tun2xray-dns"]
    socks, dns = json.load(open(d.runtime_path))["inbounds"]
    assert dns["protocol"] == "dokodemo-door" and dns["listen"] == "127.0.0.1"
    assert dns["settings"] == {"address": "10.99.0.53", "port": 53, "network": "tcp,udp"}
    assert dns["port"] != socks["port"]
    [rule] = d.rules
    assert rule.to == DokodemoUpstream("127.0.0.1", dns["port"]) and rule.ports == (53, 53)
    assert rule.matches("udp", ipaddress.ip_address("198.18.0.2"), 53)
    assert ("127.0.0.1", dns["port"], "udp") in d.ready_checks()
    # a config with its own DNS dokodemo-door gets no second one
    d2 = xray.derive(write(tmp_path, dict(cfg, inbounds=[SOCKS, DNS]), "own.json"))
    assert d2.added == [] and d2.runtime_path is None
