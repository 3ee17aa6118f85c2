"""Fuzz target "socks": the SOCKS5 client's reply parsing.

Both handshake drivers run the one SOCKS5 machine
(tun2xray.upstream.socks5_proto.SocksClient).  Byte 0 picks the part:
  0  the awaitable driver (socks5._handshake: method selection, RFC 1929
     auth, the CONNECT / UDP ASSOCIATE reply) against a proxy whose answer
     stream is the input, read in chunks whose sizes come from the input.
     Only SocksError may escape; a success names a port and an address and
     the driver never reads past the reply.
  1  the engine's relay (TcpRelay._hs_data feeding the machine, with and
     without a login): the same answer
     stream, cut into chunks from the input, must (a) give the same verdict
     as the awaitable driver of part 0 (both accept or both refuse),
     (b) hand exactly the bytes after the reply to the connection, (c) not
     depend on how the stream was cut, (d) settle once (established or
     failed, never both, never twice).
  2  a datagram from the UDP relay (RFC 1928 section 7 header): counted
     once as delivered, fragment or malformed; the payload handed on is
     what follows the header.
  3  address encoding: encode_address of any text raises only ValueError /
     TypeError and decodes back to the same host.

The relay is driven through a stand-in engine, transport and connection
(the few attributes _hs_data touches).
"""

from __future__ import annotations

import ipaddress

from tun2xray.engine import TcpRelay
from tun2xray.upstream import socks5
from tun2xray.upstream.socks5_proto import CMD_CONNECT, CMD_UDP_ASSOCIATE
from tun2xray.upstream.url import SocksUpstream

from .common import InvariantError, Provider, check, one_line

PARTS = 4
GREETING = b"\x05\x01\x00"
GREETING_AUTH = b"\x05\x02\x00\x02"
REQUEST = b"\x05\x01\x00\x01\x0a\x00\x00\x01\x00\x50"     # CONNECT 10.0.0.1:80


# ----------------------------------------------------------- part 0: client

class _Proxy:
    """The loop the handshake coroutines are given: sock_recv reads the
    answer stream in input-sized chunks, sock_sendall records requests."""

    def __init__(self, stream: bytes, cuts: Provider):
        self.stream = stream
        self.pos = 0
        self.cuts = cuts
        self.sent = []

    async def sock_recv(self, sock, n: int) -> bytes:
        k = 1 + self.cuts.u8() % max(1, n) if self.cuts.remaining() else n
        out = self.stream[self.pos:self.pos + min(n, k)]
        self.pos += len(out)
        return out

    async def sock_sendall(self, sock, data: bytes) -> None:
        self.sent.append(bytes(data))


def _run(coro):
    """Run a coroutine that never really suspends (our loop answers at once)."""
    try:
        coro.send(None)
    except StopIteration as e:
        return e.value
    coro.close()
    raise InvariantError("handshake coroutine suspended on a loop that never blocks")


def client_handshake(stream: bytes, cuts: Provider, creds: bool, cmd: int):
    """(ok, consumed, result_or_error) of the step-by-step client."""
    loop = _Proxy(stream, cuts)
    try:
        ev = _run(socks5._handshake(loop, None, _machine(creds, cmd)))
    except socks5.SocksError as e:
        one_line(e)
        return False, loop.pos, e
    check(isinstance(ev.bound_host, (bytes, str)) and 0 <= ev.bound_port <= 0xFFFF, "reply address")
    check(ev.rest == b"", "the awaitable driver read past the reply")
    return True, loop.pos, ev


def _machine(creds: bool, cmd: int):
    up = SocksUpstream("127.0.0.1", 1080, "user" if creds else None, "pw" if creds else None)
    return socks5.socks_client(up, cmd, "10.0.0.1", 80)


def client(data: bytes) -> None:
    fdp = Provider(data)
    mode = fdp.u8()
    stream = fdp.blob(600)
    client_handshake(stream, fdp, bool(mode & 1), CMD_UDP_ASSOCIATE if mode & 2 else CMD_CONNECT)


# ------------------------------------------------------ part 1: pipelined

class _Timer:
    def cancel(self):
        pass


class _Loop:
    def call_later(self, delay, fn, *args):
        return _Timer()


class _Engine:
    connect_timeout = 10.0
    _debug = True               # the relay then also formats its debug lines

    def _log_socks_reply(self, conn, rep, bound):
        check(rep == 0 or bound is None, "a refusal with a bound address")

    def __init__(self):
        self.loop = _Loop()
        self.outcome = []
        self.counters = {}

    def _tcp_established(self, conn, relay):
        self.outcome.append("established")

    def _tcp_dial_failed(self, conn, url, why):
        check(isinstance(why, (str, socks5.SocksError)) and str(why), "failure without a reason")
        one_line(why if isinstance(why, Exception) else ValueError(why))
        self.outcome.append("failed")

    def kick(self):
        pass


class _Conn:
    closed = False

    def __init__(self):
        self.got = bytearray()

    def write(self, data) -> int:
        self.got += data
        return len(data)


class _Transport:
    def __init__(self):
        self.sent = []
        self.aborted = False
        self.paused = False

    def get_extra_info(self, name):
        return None

    def write(self, data):
        self.sent.append(bytes(data))

    def abort(self):
        self.aborted = True

    def pause_reading(self):
        self.paused = True

    def resume_reading(self):
        self.paused = False


def pipelined(stream: bytes, cuts: list, creds: bool = False):
    """Feed the answer stream to a relay in chunks; (outcome, bytes to the connection)."""
    eng, conn, t = _Engine(), _Conn(), _Transport()
    relay = TcpRelay(eng, conn, "socks5://127.0.0.1:1080", hs=_machine(creds, CMD_CONNECT))
    relay.connection_made(t)
    check(t.sent == [GREETING_AUTH if creds else GREETING + REQUEST], lambda: f"first write {t.sent}")
    pos = 0
    for k in cuts + [len(stream)]:
        if pos >= len(stream):
            break
        chunk = stream[pos:pos + max(1, k)]
        pos += len(chunk)
        if relay.hs is None and eng.outcome == ["failed"]:
            break                      # the transport was aborted: nothing more arrives
        relay.data_received(chunk)
    check(len(eng.outcome) <= 1, lambda: f"handshake settled {eng.outcome}")
    if eng.outcome == ["failed"]:
        check(t.aborted, "failed handshake did not abort its transport")
    return (eng.outcome[0] if eng.outcome else "pending"), bytes(conn.got)


def pipelined_part(data: bytes) -> None:
    fdp = Provider(data)
    stream = fdp.blob(600)
    cuts = [1 + fdp.u8() % 16 for _ in range(fdp.u8() % 32)]
    creds = bool(fdp.u8() & 1)            # last: inputs written before it keep their meaning
    outcome, got = pipelined(stream, cuts, creds)
    whole_outcome, whole_got = pipelined(stream, [], creds)
    check((outcome, got) == (whole_outcome, whole_got),
          lambda: f"cut stream gave {outcome}/{len(got)}, whole stream {whole_outcome}/{len(whole_got)}")
    ok, consumed, res = client_handshake(stream, Provider(b""), creds, CMD_CONNECT)
    if ok:
        check(outcome == "established", lambda: f"client accepts the reply, the relay says {outcome}")
        check(got == stream[consumed:], "relay did not pass on exactly the bytes after the reply")
    elif "closed the connection" in str(res):
        # the client ran out of bytes: the relay waits for more
        check(outcome == "pending", lambda: f"stream ends inside the reply, the relay says {outcome}")
    else:
        check(outcome == "failed", lambda: f"client refuses the reply ({res}), the relay says {outcome}")


# -------------------------------------------------------- part 2: UDP relay

def udp_datagram(data: bytes) -> None:
    got = []
    a = socks5.SocksUdpAssociation(None, "proxy", lambda h, p, d: got.append((h, p, d)), None)
    before = dict(a.stats)
    a._datagram(data)
    delta = {k: a.stats[k] - before[k] for k in a.stats if a.stats[k] != before[k]}
    counted = delta.get("datagrams_in", 0) + delta.get("malformed", 0) + delta.get("frag_dropped", 0)
    check(counted == 1, lambda: f"datagram counted {delta}")
    if got:
        host, port, payload = got[0]
        check(0 <= port <= 0xFFFF and data.endswith(payload), "UDP payload is not the datagram's tail")
        check(delta.get("bytes_in") == len(payload) or (not payload and "bytes_in" not in delta), "bytes_in")


# ------------------------------------------------------ part 3: addresses

def addresses(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    try:
        enc = socks5.encode_address(text)
    except (ValueError, TypeError):
        return
    host, port, end = socks5.decode_address(enc + b"\0\x35", 0)
    check(end == len(enc) + 2 and port == 53, "address length")
    h = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        same = ipaddress.ip_address(host) == ipaddress.ip_address(h)
    except ValueError:
        same = host == h or (not h.isascii() and host == h.encode("idna").decode("ascii"))
    check(same, lambda: f"{text!r} encodes to {enc!r}, decodes to {host!r}")


PART_FUNCS = (client, pipelined_part, udp_datagram, addresses)


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    PART_FUNCS[data[0] % PARTS](data[1:])


def seeds() -> list:
    from .common import put_blob
    ok4 = b"\x05\x00" + b"\x05\x00\x00\x01\x7f\x00\x00\x01\x04\x38"
    ok6 = b"\x05\x00" + b"\x05\x00\x00\x04" + bytes(15) + b"\x01\x04\x38"
    okd = b"\x05\x00" + b"\x05\x00\x00\x03\x09localhost\x04\x38"
    auth = b"\x05\x02\x01\x00" + ok4[2:]
    refused = b"\x05\x00\x05\x05\x00\x01" + bytes(6)
    out = []
    for s in (ok4, ok6, okd, auth, refused, ok4 + b"HTTP/1.1 200 OK\r\n", b"\x05\xff", b"\x04\x5a"):
        out.append(b"\0\1" + put_blob(s))
        out.append(b"\1" + put_blob(s) + b"\x03\x01\x02\x05" + (b"\1" if s is auth else b"\0"))
    out += [b"\2" + b"\0\0\0\x01\x0a\0\0\x01\x00\x35payload", b"\2\0\0\0\x03\x07example\x00\x35x",
            b"\2\0\0\0\x04" + bytes(18) + b"y", b"\2\0\0\x01\x01" + bytes(6)]
    out += [b"\3example.com", b"\3[::1]", b"\x03127.0.0.1", "\3bücher.de".encode()]
    return out
