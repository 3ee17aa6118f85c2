"""The sans-I/O SOCKS5 client machine: byte vectors in both directions.

No sockets: bytes the machine must send are compared with RFC 1928/1929
messages written out by hand, and proxy answers are fed in whole, byte by
byte and cut short, then garbled.
"""

import errno

import pytest
from hypothesis import given, settings, strategies as st

from tun2xray.upstream.socks5_proto import (
    CMD_CONNECT,
    CMD_UDP_ASSOCIATE,
    NEED_DATA,
    REPLY_MESSAGES,
    UDP_FRAGMENT,
    UDP_MALFORMED,
    UDP_OK,
    Connected,
    Failed,
    LocalProtocolError,
    SocksClient,
    SocksError,
    SocksProtocolError,
    build_udp_header,
    parse_udp_header,
)

LABEL = "socks5 proxy 127.0.0.1:1080"
V4 = b"\x0a\x00\x00\x07"                               # 10.0.0.7
V6 = bytes.fromhex("20010db8000000000000000000000005")  # 2001:db8::5
GREETING = b"\x05\x01\x00"
GREETING_AUTH = b"\x05\x02\x00\x02"
CONNECT_V4 = b"\x05\x01\x00\x01" + V4 + b"\x1f\x90"      # CONNECT 10.0.0.7:8080

# success replies by BND address type, and what the machine reports for them
BOUND = [
    (b"\x01\xc0\x00\x02\x07\x10\xe1", b"\xc0\x00\x02\x07", 4321),
    (b"\x04" + V6 + b"\x01\xbb", V6, 443),
    (b"\x03\x0bproxy.local\x00\x50", "proxy.local", 80),
    (b"\x03\x00\x00\x00", "", 0),
]


def client(user=None, password=None, command=CMD_CONNECT, host=V4, port=8080):
    return SocksClient(command, host, port, username=user, password=password, label=LABEL)


def started(**kw):
    c = client(**kw)
    c.initial_bytes()
    return c


def feed_bytewise(c, data):
    """Feed one byte at a time; every byte before the last must be NeedData."""
    for i in range(len(data) - 1):
        assert c.receive_data(data[i:i + 1]) is NEED_DATA, i
    return c.receive_data(data[-1:])


# ---------------------------------------------------------------- bytes out


@pytest.mark.parametrize("host, port, request_bytes", [
    (V4, 8080, CONNECT_V4),
    ("10.0.0.7", 8080, CONNECT_V4),
    (V6, 443, b"\x05\x01\x00\x04" + V6 + b"\x01\xbb"),
    ("www.example.org", 80, b"\x05\x01\x00\x03\x0fwww.example.org\x00\x50"),
])
def test_without_login_greeting_and_request_go_in_one_write(host, port, request_bytes):
    c = client(host=host, port=port)
    assert c.pipelined
    assert c.initial_bytes() == GREETING + request_bytes
    assert c.data_to_send() == b""
    assert c.receive_data(b"\x05\x00") is NEED_DATA
    assert c.data_to_send() == b""          # the request went with the greeting


def test_udp_associate_request():
    c = client(command=CMD_UDP_ASSOCIATE, host="127.0.0.1", port=5353)
    assert c.initial_bytes() == GREETING + b"\x05\x03\x00\x01\x7f\x00\x00\x01\x14\xe9"


def test_without_pipelining_the_request_waits_for_the_method_choice():
    # what the probes use: one message per round trip, as a client that
    # talks to the proxy step by step would send them
    c = SocksClient(CMD_UDP_ASSOCIATE, bytes(4), 0, label=LABEL, pipeline=False)
    assert not c.pipelined
    assert c.initial_bytes() == GREETING
    assert c.data_to_send() == b""
    assert c.receive_data(b"\x05\x00") is NEED_DATA
    assert c.data_to_send() == b"\x05\x03\x00\x01" + bytes(6)
    assert c.receive_data(b"\x05\x00\x00\x01" + bytes(6)) == Connected(bytes(4), 0, b"")


def test_with_login_greeting_then_login_then_request():
    c = client("alice", "pässword")
    assert not c.pipelined
    assert c.initial_bytes() == GREETING_AUTH
    assert c.receive_data(b"\x05\x02") is NEED_DATA
    pw = "pässword".encode()
    assert c.data_to_send() == b"\x01\x05alice" + bytes((len(pw),)) + pw
    assert c.receive_data(b"\x01\x00") is NEED_DATA
    assert c.data_to_send() == CONNECT_V4
    assert c.receive_data(b"\x05\x00\x00" + BOUND[0][0]) == Connected(b"\xc0\x00\x02\x07", 4321, b"")


def test_login_exchange_byte_by_byte():
    c = started(user="u", password="p")
    assert feed_bytewise(c, b"\x05\x02") is NEED_DATA
    assert c.data_to_send() == b"\x01\x01u\x01p"
    assert feed_bytewise(c, b"\x01\x00") is NEED_DATA
    assert c.data_to_send() == CONNECT_V4
    assert feed_bytewise(c, b"\x05\x00\x00" + BOUND[2][0]) == Connected("proxy.local", 80, b"")


def test_with_login_the_proxy_may_choose_no_auth():
    c = client("alice", "pw")
    c.initial_bytes()
    assert c.receive_data(b"\x05\x00") is NEED_DATA
    assert c.data_to_send() == CONNECT_V4    # no login sent


# ---------------------------------------------------------------- bytes in: success


@pytest.mark.parametrize("bnd, host, port", BOUND)
@pytest.mark.parametrize("command", [CMD_CONNECT, CMD_UDP_ASSOCIATE])
def test_every_address_type_whole_and_byte_by_byte(bnd, host, port, command):
    answer = b"\x05\x00" + b"\x05\x00\x00" + bnd
    assert started(command=command).receive_data(answer) == Connected(host, port, b"")
    assert feed_bytewise(started(command=command), answer) == Connected(host, port, b"")


@pytest.mark.parametrize("bnd, host, port", BOUND)
def test_bytes_after_the_reply_are_kept_as_rest(bnd, host, port):
    c = started()
    assert c.receive_data(b"\x05\x00\x05\x00\x00" + bnd + b"server speaks first") == Connected(
        host, port, b"server speaks first")


@given(bound=st.binary(min_size=6, max_size=6), rest=st.binary(max_size=20),
       command=st.sampled_from([CMD_CONNECT, CMD_UDP_ASSOCIATE]))
@settings(max_examples=200, deadline=None)
def test_the_usual_answer_in_one_read_is_the_same_event_as_in_pieces(bound, rest, command):
    """No-auth chosen and an IPv4 success, whole in one read (the machine's
    shortcut) or cut after its first byte (the steps): the same Connected,
    and the machine is done either way."""
    answer = b"\x05\x00\x05\x00\x00\x01" + bound + rest
    whole = started(command=command)
    one = whole.receive_data(answer)
    pieces = started(command=command)
    assert pieces.receive_data(answer[:1]) is NEED_DATA
    assert one == pieces.receive_data(answer[1:]) == Connected(bound[:4], int.from_bytes(bound[4:], "big"), rest)
    for c in (whole, pieces):
        assert c.data_to_send() == b"" and c.need == 0
        with pytest.raises(LocalProtocolError):
            c.receive_data(b"\x00")


@pytest.mark.parametrize("bnd, host, port", BOUND)
def test_need_never_reads_past_the_reply(bnd, host, port):
    """A driver reading ``need`` bytes at a time stops exactly at the reply's end."""
    stream = b"\x05\x00\x05\x00\x00" + bnd + b"DATA"
    c = started()
    pos = 0
    while True:
        n = c.need
        assert n >= 1
        e = c.receive_data(stream[pos:pos + n])
        pos += n
        if e is not NEED_DATA:
            break
    assert e == Connected(host, port, b"") and stream[pos:] == b"DATA"
    assert c.need == 0


@pytest.mark.parametrize("bnd, host, port", BOUND)
def test_truncated_at_every_byte_is_need_data_then_a_clear_close(bnd, host, port):
    answer = b"\x05\x00\x05\x00\x00" + bnd
    for cut in range(len(answer)):
        c = started()
        if cut:
            assert c.receive_data(answer[:cut]) is NEED_DATA, cut
        exc = c.connection_closed()
        assert isinstance(exc, SocksProtocolError) and exc.reply is None
        msg = str(exc)
        assert msg.startswith(LABEL + ": proxy closed the connection ") and "\n" not in msg
        if cut < 2:
            assert "during method selection" in msg
        elif cut < 4:
            assert "before the CONNECT reply" in msg
        else:
            assert "inside the CONNECT reply" in msg


def test_close_with_a_socket_error_names_it():
    c = started()
    exc = c.connection_closed(ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"))
    assert str(exc) == LABEL + ": proxy closed the connection during method selection (Connection reset by peer)"


# ---------------------------------------------------------------- bytes in: refusals


@pytest.mark.parametrize("short", [False, True], ids=["full", "short"])
@pytest.mark.parametrize("code", list(range(1, 10)) + [0xFF])
def test_every_reply_code_is_failed(code, short):
    reply = bytes((5, code)) + (b"" if short else b"\x00\x01\x00\x00\x00\x00\x00\x00")
    e = started().receive_data(b"\x05\x00" + reply)
    assert isinstance(e, Failed) and e.reply_code == code
    text = REPLY_MESSAGES.get(code, "unassigned reply code")
    assert e.reason == f"{LABEL}: CONNECT 10.0.0.7:8080 failed: reply {code} ({text})"
    err = e.error()
    assert isinstance(err, SocksError) and err.reply == code and str(err) == e.reason
    assert err.errno == {2: errno.EACCES, 3: errno.ENETUNREACH, 4: errno.EHOSTUNREACH,
                         5: errno.ECONNREFUSED, 6: errno.ETIMEDOUT}.get(code)


def test_udp_associate_failure_names_the_command():
    c = SocksClient(CMD_UDP_ASSOCIATE, "127.0.0.1", 1, label=LABEL, target="relay")
    c.initial_bytes()
    e = c.receive_data(b"\x05\x00\x05\x07")
    assert e.reason == f"{LABEL}: UDP ASSOCIATE relay failed: reply 7 (command not supported)"


def test_login_refused():
    c = started(user="alice", password="wrong")
    c.receive_data(b"\x05\x02")
    c.data_to_send()
    e = c.receive_data(b"\x01\x01")
    assert isinstance(e, Failed) and e.reply_code is None
    assert e.reason == f"{LABEL}: authentication failed for user 'alice' (status 1)"
    assert "wrong" not in e.reason
    assert e.error().errno == errno.EACCES
    assert c.data_to_send() == b""          # no request after a refused login


@pytest.mark.parametrize("creds, fragment", [
    ((None, None), "requires authentication"),
    (("u", "p"), "accepts none of the offered methods"),
])
def test_no_acceptable_method(creds, fragment):
    e = started(user=creds[0], password=creds[1]).receive_data(b"\x05\xff")
    assert isinstance(e, Failed) and e.reply_code is None and fragment in e.reason


# ---------------------------------------------------------------- garbage: remote misbehaviour


@pytest.mark.parametrize("answer, fragment", [
    (b"HTTP/1.1 400 Bad Request\r\n", "not a SOCKS5 proxy (answered version 72)"),
    (b"\x04\x5a", "not a SOCKS5 proxy (answered version 4)"),
    (b"\x05\x01", "proxy chose method 0x01, which was not offered"),
    (b"\x05\x02", "proxy chose method 0x02, which was not offered"),      # no credentials given
    (b"\x05\x00\x04\x00\x00\x01", "malformed CONNECT reply (version 4)"),
    (b"\x05\x00\x05\x00\x00\x02\x00\x00", "malformed CONNECT reply (address type 2)"),
    (b"\x05\x00\x05\x00\x00\xff", "malformed CONNECT reply (address type 255)"),
])
def test_garbled_answers_are_protocol_errors(answer, fragment):
    c = started()
    with pytest.raises(SocksProtocolError) as info:
        c.receive_data(answer)
    assert str(info.value) == f"{LABEL}: {fragment}" and info.value.reply is None
    with pytest.raises(LocalProtocolError):
        c.receive_data(b"\x05\x00")           # the machine is done after an error


# ---------------------------------------------------------------- local misuse


@pytest.mark.parametrize("kw", [
    {"host": "a" * 256}, {"host": b"\x01\x02\x03"}, {"host": ""}, {"port": 70000}, {"port": -1},
    {"command": 2},                                             # BIND: not ours
    {"user": "u" * 256, "password": "p"}, {"user": "u", "password": ""},
])
def test_bad_arguments_are_local_errors_before_any_bytes(kw):
    with pytest.raises(LocalProtocolError):
        client(**kw)
    assert issubclass(LocalProtocolError, ValueError)


def test_misuse_of_the_call_order():
    c = client()
    with pytest.raises(LocalProtocolError):
        c.receive_data(b"\x05\x00")           # nothing sent yet
    c.initial_bytes()
    with pytest.raises(LocalProtocolError):
        c.initial_bytes()
    assert isinstance(c.receive_data(b"\x05\x00\x05\x00\x00" + BOUND[0][0]), Connected)
    with pytest.raises(LocalProtocolError):
        c.receive_data(b"more")               # stream data is the caller's, not the machine's


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=40), st.booleans())
def test_any_answer_gives_an_event_or_a_protocol_error(answer, auth):
    c = started(user="u" if auth else None, password="p" if auth else None)
    try:
        e = c.receive_data(answer)
    except SocksProtocolError as exc:
        assert "\n" not in str(exc)
        return
    assert e is NEED_DATA or isinstance(e, (Connected, Failed))
    if e is NEED_DATA:
        assert c.need >= 1


# ---------------------------------------------------------------- UDP datagram header (RFC 1928 section 7)


@pytest.mark.parametrize("host, port, header", [
    (V4, 53, b"\x00\x00\x00\x01" + V4 + b"\x00\x35"),
    (V6, 443, b"\x00\x00\x00\x04" + V6 + b"\x01\xbb"),
    ("a.local", 7, b"\x00\x00\x00\x03\x07a.local\x00\x07"),
])
def test_udp_header_both_ways(host, port, header):
    assert build_udp_header(host, port) == header
    assert parse_udp_header(header + b"payload") == (UDP_OK, host, port, len(header))


@pytest.mark.parametrize("data, verdict", [
    (b"\x00\x00\x01\x01" + V4 + b"\x00\x35x", UDP_FRAGMENT),
    (b"\x00\x00\x81\x01" + V4 + b"\x00\x35x", UDP_FRAGMENT),
    (b"\x00\x00", UDP_MALFORMED),
    (b"\x01\x00\x00\x01" + V4 + b"\x00\x35x", UDP_MALFORMED),      # RSV not zero
    (b"\x00\x00\x00\x05\x00", UDP_MALFORMED),                     # unknown ATYP
    (b"\x00\x00\x00\x01\x0a\x00", UDP_MALFORMED),                 # address cut short
    (b"\x00\x00\x00\x03\x10short", UDP_MALFORMED),                # name longer than the datagram
])
def test_udp_header_drops(data, verdict):
    assert parse_udp_header(data)[0] == verdict
