"""tun2xray.upstream.url: parse_upstream and the upstream dataclasses."""

import dataclasses

import pytest

from tun2xray.upstream.url import DokodemoUpstream, SocksUpstream, parse_upstream


@pytest.mark.parametrize(
    "url, expected",
    [
        ("socks5://127.0.0.1:10808", SocksUpstream("127.0.0.1", 10808)),
        ("socks5h://127.0.0.1:1080/", SocksUpstream("127.0.0.1", 1080)),
        ("SOCKS5://Proxy.Example:1080", SocksUpstream("proxy.example", 1080)),
        ("socks5://[::1]:1080", SocksUpstream("::1", 1080)),
        ("socks5://[fe80::1%25eth0]:1080", SocksUpstream("fe80::1%eth0", 1080)),
        ("socks5://alice:s3cret@127.0.0.1:1", SocksUpstream("127.0.0.1", 1, "alice", "s3cret")),
        ("socks5://a%40b:p%3Aw%2F@[::1]:65535", SocksUpstream("::1", 65535, "a@b", "p:w/")),
        ("  socks5://localhost:9  ", SocksUpstream("localhost", 9)),
        ("dokodemo://127.0.0.1:10853", DokodemoUpstream("127.0.0.1", 10853)),
        ("dokodemo-door://[::1]:53", DokodemoUpstream("::1", 53)),
        ("tunnel://dns.local:53", DokodemoUpstream("dns.local", 53)),
    ],
)
def test_parse_ok(url, expected):
    assert parse_upstream(url) == expected


@pytest.mark.parametrize(
    "url, reason",
    [
        ("socks5://x", "missing port"),
        ("socks5://x:", "missing port"),
        ("socks5://:1080", "missing host"),
        ("socks5://", "missing host"),
        ("127.0.0.1:1080", "missing scheme"),
        ("http://127.0.0.1:8080", 'unsupported scheme "http"'),
        ("socks4://127.0.0.1:1080", 'unsupported scheme "socks4"'),
        ("socks5://h:65536", "port out of range"),
        ("socks5://h:-1", "port"),
        ("socks5://h:0", "port 0"),
        ("socks5://h:http", "port is not a number"),
        ("socks5://::1:1080", "brackets"),
        ("socks5://[::1:1080", "brackets"),
        ("socks5://[1.2.3.4]:1080", "not an IPv6 address"),
        ("socks5://[zz]:1080", "not an IPv6 address"),
        ("socks5://bad_host!:1080", "not a valid host"),
        ("socks5://h:1/path", 'unexpected path "/path"'),
        ("socks5://h:1?x=1", "unexpected query"),
        ("socks5://user@h:1", "without password"),
        ("socks5://:pw@h:1", "empty user name"),
        ("socks5://u:@h:1", "empty password"),
        ("socks5://" + "u" * 256 + ":p@h:1", "user name longer than 255"),
        ("socks5://u:" + "p" * 256 + "@h:1", "password longer than 255"),
        ("dokodemo://u:p@h:1", "takes no user:password"),
        ("socks5://h :1", "whitespace"),
    ],
)
def test_parse_errors(url, reason):
    with pytest.raises(ValueError) as info:
        parse_upstream(url)
    msg = str(info.value)
    assert reason in msg
    assert msg.startswith('proxy "')
    assert "\n" not in msg


def test_error_messages_redact_password():
    with pytest.raises(ValueError) as info:
        parse_upstream("socks5://alice:topsecret@h:99999")
    assert "topsecret" not in str(info.value)
    assert "alice:***@h:99999" in str(info.value)


def test_str_and_repr_hide_password():
    up = parse_upstream("socks5://alice:topsecret@[::1]:1080")
    assert str(up) == "socks5://alice@[::1]:1080"
    assert "topsecret" not in repr(up)
    assert str(parse_upstream("dokodemo://127.0.0.1:53")) == "dokodemo://127.0.0.1:53"


def test_frozen_and_roundtrip():
    up = parse_upstream("socks5://127.0.0.1:1080")
    with pytest.raises(dataclasses.FrozenInstanceError):
        up.port = 1
    assert parse_upstream(str(up)) == up
    # hashable: usable as a dict key by the engine
    assert {up: 1}[SocksUpstream("127.0.0.1", 1080)] == 1


def test_not_a_string():
    with pytest.raises(ValueError):
        parse_upstream(None)
