"""SOCKS5 client protocol without I/O: bytes in, events out (RFC 1928, RFC 1929).

The one place where tun2xray reads or writes a SOCKS5 message.  A
``SocksClient`` is one handshake, CONNECT or UDP ASSOCIATE::

    c = SocksClient(CMD_CONNECT, b"\\x0a\\x00\\x00\\x01", 80, label=...)
    write(c.initial_bytes())          # greeting (+ request when no login is offered)
    while True:
        ev = c.receive_data(read(c.need))   # NeedData | Connected | Failed
        write(c.data_to_send())             # the login, then the request, when due
        if ev is not NEED_DATA:
            break

Without credentials the greeting and the request go out in one write (one
round trip) unless ``pipeline=False`` asks for one message per round trip.
With credentials the greeting offers no-auth and user/password; the login
and then the request are sent as the proxy's answers arrive.

Errors come in two kinds, as in h11: ``LocalProtocolError`` (a ValueError)
when the caller misuses the machine or gives an address that cannot be
sent, ``SocksProtocolError`` (a SocksError) when the proxy sends something
that is not SOCKS5.  A proxy that answers properly with "no" (a failure
reply code, a refused login, no acceptable method) is the ``Failed`` event.

The RFC 1928 section 7 UDP datagram header is built and parsed here too
(``build_udp_header`` / ``parse_udp_header``), on packed addresses.

Addresses everywhere in this module: ``bytes`` of length 4 or 16 are a
packed IPv4/IPv6 address, ``str`` is an IP literal or a domain name.
"""

from __future__ import annotations

import errno
import socket
import struct

from ._net import literal_family
from .url import format_hostport

__all__ = [
    "ATYP_DOMAIN",
    "ATYP_IPV4",
    "ATYP_IPV6",
    "CMD_CONNECT",
    "CMD_UDP_ASSOCIATE",
    "Connected",
    "Failed",
    "LocalProtocolError",
    "NEED_DATA",
    "NeedData",
    "REPLY_MESSAGES",
    "SocksClient",
    "SocksError",
    "SocksProtocolError",
    "address_text",
    "build_udp_header",
    "encode_address",
    "encode_address_port",
    "parse_address",
    "parse_udp_header",
    "reply_text",
]

VERSION = 5
METHOD_NO_AUTH = 0x00
METHOD_USER_PASS = 0x02
METHOD_NONE_ACCEPTABLE = 0xFF
CMD_CONNECT = 0x01
CMD_UDP_ASSOCIATE = 0x03
ATYP_IPV4 = 0x01
ATYP_DOMAIN = 0x03
ATYP_IPV6 = 0x04

# RFC 1928 section 6.
REPLY_MESSAGES = {
    0x00: "succeeded",
    0x01: "general SOCKS server failure",
    0x02: "connection not allowed by ruleset",
    0x03: "network unreachable",
    0x04: "host unreachable",
    0x05: "connection refused",
    0x06: "TTL expired",
    0x07: "command not supported",
    0x08: "address type not supported",
}
# What a reply code means to the caller, as an errno (e.g. RST vs ICMP).
_REPLY_ERRNO = {
    0x02: errno.EACCES,
    0x03: errno.ENETUNREACH,
    0x04: errno.EHOSTUNREACH,
    0x05: errno.ECONNREFUSED,
    0x06: errno.ETIMEDOUT,
}
_COMMAND_NAMES = {CMD_CONNECT: "CONNECT", CMD_UDP_ASSOCIATE: "UDP ASSOCIATE"}

_PORT = struct.Struct("!H")


def reply_text(code: int) -> str:
    return f"reply {code} ({REPLY_MESSAGES.get(code, 'unassigned reply code')})"


# ---------------------------------------------------------------- errors


class SocksError(ConnectionError):
    """The proxy refused or broke the SOCKS5 exchange.

    ``reply`` is the RFC 1928 reply code when the proxy sent one, else None
    (auth failure, early close, garbage).  ``errno`` is set for the reply
    codes that have a natural errno (refused, unreachable, ...) and for a
    refused login (EACCES).
    """

    def __init__(self, message: str, reply: int | None = None, errno_: int | None = None):
        super().__init__(message)
        self.reply = reply
        if reply is not None:
            self.errno = _REPLY_ERRNO.get(reply)
        if errno_ is not None:
            self.errno = errno_
        self.strerror = message

    def __str__(self) -> str:
        return self.strerror


class SocksProtocolError(SocksError):
    """Remote misbehaviour: the proxy sent bytes that are not SOCKS5, or hung up mid-handshake."""


class LocalProtocolError(ValueError):
    """Local misuse: an address or login that cannot be sent, or a call the state does not allow."""


# ---------------------------------------------------------------- events


class NeedData:
    """More bytes from the proxy are needed (``SocksClient.need`` says how many at most)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()


class Connected:
    """The request succeeded.  ``bound_host`` is packed bytes (4/16) or a
    domain str; ``rest`` is what the proxy sent after its reply (stream data)."""

    __slots__ = ("bound_host", "bound_port", "rest")

    def __init__(self, bound_host, bound_port: int, rest: bytes = b""):
        self.bound_host = bound_host
        self.bound_port = bound_port
        self.rest = rest

    def __eq__(self, other) -> bool:
        return type(other) is Connected and (self.bound_host, self.bound_port, self.rest) == (
            other.bound_host, other.bound_port, other.rest)

    def __repr__(self) -> str:
        return f"Connected({self.bound_host!r}, {self.bound_port}, {self.rest!r})"


class Failed:
    """The proxy answered "no": ``reply_code`` is the RFC 1928 code, or None
    for a refused login or no acceptable method.  ``reason`` is one line."""

    __slots__ = ("reply_code", "reason", "errno")

    def __init__(self, reply_code: int | None, reason: str, errno_: int | None = None):
        self.reply_code = reply_code
        self.reason = reason
        self.errno = errno_

    def error(self) -> SocksError:
        return SocksError(self.reason, reply=self.reply_code, errno_=self.errno)

    def __repr__(self) -> str:
        return f"Failed({self.reply_code!r}, {self.reason!r})"


# ---------------------------------------------------------------- addresses


def encode_address(host) -> bytes:
    """ATYP + address for a host: packed bytes (4 or 16), IP literal, or domain."""
    if isinstance(host, (bytes, bytearray, memoryview)):
        raw = bytes(host)
        if len(raw) == 4:
            return b"\x01" + raw
        if len(raw) == 16:
            return b"\x04" + raw
        raise LocalProtocolError(f"packed address must be 4 or 16 bytes, not {len(raw)}")
    if not isinstance(host, str):
        raise TypeError(f"host must be str or bytes, not {type(host).__name__}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    family = literal_family(host)
    if family == socket.AF_INET:
        return b"\x01" + socket.inet_pton(socket.AF_INET, host)
    if family == socket.AF_INET6:
        return b"\x04" + socket.inet_pton(socket.AF_INET6, host)
    try:
        name = host.encode("ascii") if host.isascii() else host.encode("idna")
    except UnicodeError:
        raise LocalProtocolError(f"host {host!r} is not a valid domain name") from None
    if not 1 <= len(name) <= 255:
        raise LocalProtocolError(f"domain name must be 1..255 bytes, not {len(name)}")
    return b"\x03" + bytes((len(name),)) + name


def encode_address_port(host, port: int) -> bytes:
    if not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise LocalProtocolError(f"port {port!r} out of range 0-65535")
    return encode_address(host) + _PORT.pack(port)


def parse_address(buf, off: int):
    """(host, port, end) for ATYP + ADDR + PORT at ``buf[off:]``: host is
    packed bytes for an IP, a str for a domain.  None when ``buf`` ends
    early; ValueError for an unknown address type."""
    n = len(buf)
    if off >= n:
        return None
    atyp = buf[off]
    if atyp == ATYP_IPV4:
        end = off + 7
        if end > n:
            return None
        host = bytes(buf[off + 1:off + 5])
    elif atyp == ATYP_IPV6:
        end = off + 19
        if end > n:
            return None
        host = bytes(buf[off + 1:off + 17])
    elif atyp == ATYP_DOMAIN:
        if off + 1 >= n:
            return None
        end = off + 2 + buf[off + 1] + 2
        if end > n:
            return None
        host = bytes(buf[off + 2:end - 2]).decode("utf-8", "replace")
    else:
        raise ValueError(f"unknown address type {atyp}")
    return host, (buf[end - 2] << 8) | buf[end - 1], end


def address_text(host) -> str:
    """An address as text (for logs and status): packed bytes to an IP literal."""
    if isinstance(host, (bytes, bytearray, memoryview)):
        raw = bytes(host)
        if len(raw) in (4, 16):
            return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)
        return raw.hex()
    return str(host)


# ---------------------------------------------------------------- UDP datagram header (section 7)


def build_udp_header(host, port: int) -> bytes:
    """RSV RSV FRAG=0 ATYP DST.ADDR DST.PORT for one datagram to ``host:port``."""
    return b"\x00\x00\x00" + encode_address_port(host, port)


UDP_OK, UDP_FRAGMENT, UDP_MALFORMED = 0, 1, 2


def parse_udp_header(data):
    """(verdict, host, port, payload offset) of one relayed datagram.

    verdict is UDP_OK, UDP_FRAGMENT (FRAG != 0: we never reassemble) or
    UDP_MALFORMED; host is packed bytes for an IP, a str for a domain."""
    if len(data) < 4 or data[0] or data[1]:
        return UDP_MALFORMED, None, 0, 0
    if data[2]:
        return UDP_FRAGMENT, None, 0, 0
    try:
        got = parse_address(data, 3)
    except ValueError:
        return UDP_MALFORMED, None, 0, 0
    if got is None:
        return UDP_MALFORMED, None, 0, 0
    return UDP_OK, got[0], got[1], got[2]


# ---------------------------------------------------------------- the handshake machine

# states: what the next bytes from the proxy answer
_METHOD, _AUTH, _REPLY, _DONE, _ERROR = "method selection", "authentication", "reply", "done", "error"
# VER METHOD(no auth), then VER REP(succeeded) RSV ATYP(IPv4): the start of a
# pipelined handshake's whole answer
_PIPELINED_OK_V4 = bytes((VERSION, METHOD_NO_AUTH, VERSION, 0, 0, ATYP_IPV4))


class SocksClient:
    """One SOCKS5 client handshake (CONNECT or UDP ASSOCIATE) as a state machine."""

    __slots__ = ("command", "label", "_target", "_host", "_port", "username", "state", "pipelined",
                 "_buf", "_out", "_greeting", "_request", "_login")

    def __init__(self, command: int, host, port: int, *, username: str | None = None,
                 password: str | None = None, label: str = "socks5 proxy", target: str | None = None,
                 pipeline: bool = True):
        if command not in _COMMAND_NAMES:
            raise LocalProtocolError(f"unknown SOCKS5 command {command!r}")
        self.command = command
        self.label = label
        # the target's text is only read by a failure's message: formatted then
        self._target = target
        self._host, self._port = host, port
        self._request = bytes((VERSION, command, 0)) + encode_address_port(host, port)
        self.username = None
        self._login = None
        if username is not None and password is not None:
            user, pw = username.encode(), password.encode()
            if not (1 <= len(user) <= 255 and 1 <= len(pw) <= 255):
                raise LocalProtocolError("user name and password must be 1..255 bytes each (RFC 1929)")
            self.username = username
            self._login = b"\x01" + bytes((len(user),)) + user + bytes((len(pw),)) + pw
        # pipeline=False: the request waits for the method choice even
        # without a login (a probe that wants one message per round trip)
        self.pipelined = self._login is None and pipeline
        if self._login is None:
            self._greeting = bytes((VERSION, 1, METHOD_NO_AUTH))
        else:
            self._greeting = bytes((VERSION, 2, METHOD_NO_AUTH, METHOD_USER_PASS))
        self.state = _METHOD
        self._buf = b""
        self._out = None      # None until initial_bytes() is taken

    @property
    def target(self) -> str:
        """What the request names, as text (``host:port``), for messages."""
        if self._target is None:
            self._target = format_hostport(address_text(self._host), self._port)
        return self._target

    # -- bytes out

    def initial_bytes(self) -> bytes:
        """The first write: the greeting, and the request with it when no login is offered."""
        if self._out is not None:
            raise LocalProtocolError("initial_bytes() already taken")
        self._out = b""
        return self._greeting + self._request if self.pipelined else self._greeting

    def data_to_send(self) -> bytes:
        """Bytes due to the proxy now (the login, the request); empty when none."""
        out = self._out or b""
        self._out = b""
        return out

    # -- bytes in

    @property
    def need(self) -> int:
        """How many bytes to read at most so that nothing after the reply is
        read (a driver handing over its socket must not swallow stream data)."""
        st, n = self.state, len(self._buf)
        if st is _METHOD or st is _AUTH:
            return 2 - n
        if st is not _REPLY:
            return 0
        if n < 5:
            return 5 - n            # VER REP RSV ATYP and the first address byte
        atyp = self._buf[3]
        size = 4 + (4 if atyp == ATYP_IPV4 else 16 if atyp == ATYP_IPV6 else 1 + self._buf[4]) + 2
        return max(1, size - n)

    def receive_data(self, data) -> NeedData | Connected | Failed:
        """Feed bytes from the proxy; returns the event they complete."""
        if (self.state is _METHOD and self.pipelined and self._out is not None and not self._buf
                and data[:6] == _PIPELINED_OK_V4 and len(data) >= 12):
            # the usual answer, whole in one read: no-auth chosen, then
            # success with an IPv4 bound address (what the steps below would
            # return, without walking them once per connection)
            self.state = _DONE
            return Connected(bytes(data[6:10]), (data[10] << 8) | data[11], bytes(data[12:]))
        if self._out is None:
            raise LocalProtocolError("receive_data() before initial_bytes() was sent")
        if self.state is _DONE or self.state is _ERROR:
            raise LocalProtocolError(f"receive_data() after the handshake ended ({self.state})")
        self._buf += data
        try:
            while True:
                st = self.state
                if st is _METHOD:
                    ev = self._method()
                elif st is _AUTH:
                    ev = self._auth()
                else:
                    return self._reply()
                if ev is not None:
                    return ev
        except SocksProtocolError:
            self.state = _ERROR
            raise

    def connection_closed(self, exc: BaseException | None = None) -> SocksProtocolError:
        """The error for a proxy that hung up (``exc``: the socket error, if any)."""
        where = self._where()
        self.state = _ERROR
        how = f" ({getattr(exc, 'strerror', None) or exc})" if exc is not None else ""
        return SocksProtocolError(f"{self.label}: proxy closed the connection {where}{how}")

    # -- steps, one per message from the proxy

    def _what(self) -> str:
        return _COMMAND_NAMES[self.command]

    def _where(self) -> str:
        st = self.state
        if st is _METHOD or st is _AUTH:
            return f"during {st}"
        return f"{'inside' if len(self._buf) >= 2 else 'before'} the {self._what()} reply"

    def _fail(self, reply_code, reason, errno_=None) -> Failed:
        self.state = _DONE
        return Failed(reply_code, f"{self.label}: {reason}", errno_)

    def _bad(self, reason) -> SocksProtocolError:
        return SocksProtocolError(f"{self.label}: {reason}")

    def _method(self):
        """RFC 1928 section 3: VER METHOD."""
        buf = self._buf
        if len(buf) < 2:
            return NEED_DATA
        ver, method = buf[0], buf[1]
        if ver != VERSION:
            raise self._bad(f"not a SOCKS5 proxy (answered version {ver})")
        self._buf = buf[2:]
        if method == METHOD_NO_AUTH:
            self.state = _REPLY
            if not self.pipelined:
                self._out += self._request
            return None
        if method == METHOD_NONE_ACCEPTABLE:
            if self._login is not None:
                return self._fail(None, "proxy accepts none of the offered methods (no-auth, user/password)")
            return self._fail(None, "proxy requires authentication (no acceptable method without credentials)")
        if method != METHOD_USER_PASS or self._login is None:
            raise self._bad(f"proxy chose method {method:#04x}, which was not offered")
        self.state = _AUTH
        self._out += self._login
        return None

    def _auth(self):
        """RFC 1929 section 2: VER STATUS (any status but 0 is a refusal)."""
        buf = self._buf
        if len(buf) < 2:
            return NEED_DATA
        status = buf[1]
        self._buf = buf[2:]
        if status != 0:
            return self._fail(None, f"authentication failed for user {self.username!r} (status {status})",
                              errno.EACCES)
        self.state = _REPLY
        self._out += self._request
        return None

    def _reply(self):
        """RFC 1928 section 6: VER REP RSV ATYP BND.ADDR BND.PORT.  A failure
        is reported on VER REP alone (some servers send just those)."""
        buf = self._buf
        if len(buf) < 2:
            return NEED_DATA
        what = self._what()
        if buf[0] != VERSION:
            raise self._bad(f"malformed {what} reply (version {buf[0]})")
        rep = buf[1]
        if rep != 0:
            return self._fail(rep, f"{what} {self.target} failed: {reply_text(rep)}", _REPLY_ERRNO.get(rep))
        try:
            got = parse_address(buf, 3)
        except ValueError:
            raise self._bad(f"malformed {what} reply (address type {buf[3]})") from None
        if got is None:
            return NEED_DATA
        host, port, end = got
        self.state = _DONE
        self._buf = b""
        return Connected(host, port, bytes(buf[end:]))
