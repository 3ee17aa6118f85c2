"""Upstream URLs: ``socks5://[user:pass@]host:port`` and ``dokodemo://host:port``.

``socks5h://`` is accepted as a synonym (we never resolve names locally: a
domain always travels to the proxy as a SOCKS5 domain address).
``dokodemo-door://`` and ``tunnel://`` (Xray's newer alias) mean ``dokodemo://``.
IPv6 hosts go in brackets.  Every parse error is a ValueError whose message is
one line naming the URL (password redacted) and the reason.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

__all__ = ["SocksUpstream", "DokodemoUpstream", "parse_upstream", "format_hostport"]

_SOCKS_SCHEMES = ("socks5", "socks5h")
_DOKODEMO_SCHEMES = ("dokodemo", "dokodemo-door", "tunnel")


def format_hostport(host: str, port: int) -> str:
    """``host:port`` with IPv6 literals in brackets (for URLs and messages)."""
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class SocksUpstream:
    """A SOCKS5 inbound (RFC 1928), optionally with RFC 1929 credentials."""

    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __str__(self) -> str:  # never shows the password
        user = f"{self.username}@" if self.username is not None else ""
        return f"socks5://{user}{format_hostport(self.host, self.port)}"


@dataclass(frozen=True, slots=True)
class DokodemoUpstream:
    """A dokodemo-door inbound: raw stream / raw datagrams to a fixed target."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"dokodemo://{format_hostport(self.host, self.port)}"


def _redact(url: str) -> str:
    """The URL with any password replaced by ``***`` (for error messages)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    at = rest.rfind("@", 0, _end_of_authority(rest))
    if at < 0:
        return url
    userinfo = rest[:at]
    if ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    return f"{scheme}://{userinfo}{rest[at:]}"


def _end_of_authority(rest: str) -> int:
    ends = [i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0]
    return min(ends) if ends else len(rest)


def parse_upstream(url: str) -> SocksUpstream | DokodemoUpstream:
    """Parse an upstream URL; raise ValueError with a one-line reason."""
    if not isinstance(url, str):
        raise ValueError(f"proxy {url!r}: not a string")
    text = url.strip()

    def bad(reason: str) -> ValueError:
        return ValueError(_printable(f'proxy "{_redact(text)}": {reason}'))

    if any(c in text for c in "\r\n\t "):
        raise bad("contains whitespace")
    if "://" not in text:
        raise bad("missing scheme (use socks5://HOST:PORT or dokodemo://HOST:PORT)")
    try:
        parts = urlsplit(text)
    except ValueError as exc:  # e.g. "Invalid IPv6 URL" for an unclosed bracket
        raise bad(_reason_from(exc)) from None
    scheme = parts.scheme.lower()
    if scheme in _SOCKS_SCHEMES:
        kind = "socks5"
    elif scheme in _DOKODEMO_SCHEMES:
        kind = "dokodemo"
    else:
        raise bad(f'unsupported scheme "{parts.scheme}" (use socks5:// or dokodemo://)')
    if parts.path not in ("", "/"):
        raise bad(f'unexpected path "{parts.path}"')
    if parts.query or parts.fragment:
        raise bad("unexpected query or fragment")

    netloc = parts.netloc
    hostport = netloc.rpartition("@")[2]
    if not hostport:
        raise bad("missing host")
    if hostport.count(":") > 1 and not hostport.startswith("["):
        raise bad("IPv6 addresses must be written in brackets, e.g. [::1]:1080")
    try:
        port = parts.port
    except ValueError as exc:
        raise bad(_reason_from(exc)) from None
    host = parts.hostname
    if not host:
        raise bad("missing host")
    if port is None:
        raise bad("missing port")
    if port == 0:
        raise bad("port 0 is not a usable port")
    if hostport.startswith("["):
        host = unquote(host)  # zone ids arrive as %25
        try:
            socket.inet_pton(socket.AF_INET6, host.split("%", 1)[0])
        except OSError:
            raise bad(f'"{host}" in brackets is not an IPv6 address') from None
    elif not _plausible_host(host):
        raise bad(f'"{host}" is not a valid host name or address')

    if kind == "dokodemo":
        if "@" in netloc:
            raise bad("dokodemo-door takes no user:password")
        return DokodemoUpstream(host, port)

    username = password = None
    if "@" in netloc:
        if parts.password is None:
            raise bad("user given without password (use user:password@)")
        username = unquote(parts.username or "")
        password = unquote(parts.password)
        if not username:
            raise bad("empty user name")
        if not password:
            raise bad("empty password")
        # RFC 1929: UNAME and PASSWD are 1..255 bytes each.
        if len(username.encode()) > 255:
            raise bad("user name longer than 255 bytes")
        if len(password.encode()) > 255:
            raise bad("password longer than 255 bytes")
    return SocksUpstream(host, port, username, password)


def _printable(msg: str) -> str:
    """The message on one line: control characters and line breaks in the
    user's text shown as escapes (\\n, \\x0b, ...)."""
    if msg.isprintable():
        return msg
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in msg)


def _reason_from(exc: ValueError) -> str:
    msg = str(exc)
    if "out of range" in msg:
        return "port out of range 1-65535"
    if "cast to integer" in msg:
        return "port is not a number"
    if "Invalid IPv6 URL" in msg:
        return "unbalanced brackets around an IPv6 address"
    if "bracket" in msg or "IPv4 or IPv6" in msg:
        return "what is in brackets is not an IPv6 address"
    return msg.splitlines()[0] if msg else "malformed URL"


def _plausible_host(host: str) -> bool:
    """A domain name or an IPv4 literal: labels of letters, digits, '-', '_'."""
    if len(host) > 253:
        return False
    if not host.isascii():
        # only a non-ASCII name needs the IDNA codec (which loads unicodedata
        # and stringprep, 0.35 MB of an idle engine's RSS); the label checks
        # below cover ASCII
        try:
            host.encode("idna")
        except UnicodeError:
            return False
    for label in host.rstrip(".").split("."):
        if not label or len(label) > 63:
            return False
        if not all(c.isalnum() or c in "-_" for c in label):
            return False
    return True
