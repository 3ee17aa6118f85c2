"""Is a core's inbound up?  Probes that leave nothing for the core to log
or dial: SOCKS5 spoken to a socks inbound, the listening sockets read from
/proc for the others.  The core's supervisor waits on them; doctor asks them.
"""

from __future__ import annotations

import errno
import os
import socket


def inbound_listening(host: str, port: int, proto: str, pid: int | None = None) -> bool:
    """Is the inbound up?  "socks": it answers SOCKS5 (socks_probe); "tcp" /
    "udp": a socket listens on ``port`` (owned by process ``pid`` when
    given), read from /proc without connecting, so a dokodemo-door inbound
    does not dial its target for a probe."""
    if proto == "socks":
        return socks_probe(host, port) is None
    found = proc_listening(port, proto, pid)
    if found is not None:
        return found
    # no /proc to read: a UDP bind test; TCP connect (as a last resort)
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    if proto == "tcp":
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.settimeout(0.5)
        try:
            s.connect((host, port))
            return True
        except OSError:
            return False
        finally:
            s.close()
    s = socket.socket(fam, socket.SOCK_DGRAM)
    try:
        s.bind((host, port))
        return False
    except OSError as e:
        return e.errno == errno.EADDRINUSE
    finally:
        s.close()


def _socket_inodes(pid: int) -> set | None:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    out = set()
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(target[8:-1])
    return out


def proc_listening(port: int, proto: str, pid: int | None = None) -> bool | None:
    """A TCP socket in LISTEN / a bound unconnected UDP socket on ``port``
    (of process ``pid``: its network namespace, a socket among its fds);
    None when /proc cannot tell."""
    base = f"/proc/{pid}/net" if pid else "/proc/self/net"
    inodes = None
    if pid:
        inodes = _socket_inodes(pid)
        if inodes is None:
            return None
    state = "0A" if proto == "tcp" else "07"       # TCP_LISTEN; UDP unconnected (TCP_CLOSE)
    want = f":{port:04X}"
    readable = False
    for fam in ("", "6"):
        try:
            with open(f"{base}/{proto}{fam}") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for row in rows:
            parts = row.split()
            if (len(parts) > 9 and parts[1].endswith(want) and parts[3] == state
                    and (inodes is None or parts[9] in inodes)):
                return True
    return False if readable else None


_ASSOCIATE_ANY = b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00"      # UDP ASSOCIATE 0.0.0.0:0


def socks_probe(host: str, port: int, timeout: float = 0.5) -> str | None:
    """Speak SOCKS5 to an inbound without auth: the greeting (05 01 00,
    expecting 05 00), then a UDP ASSOCIATE that the client closes.  The
    core logs nothing for that, where a bare connect is logged as "rejected
    ... insufficient header" and a session ending after the greeting as
    "rejected ... failed to read request".  None when it answered as SOCKS5,
    else what went wrong."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((host, port))
        s.sendall(b"\x05\x01\x00")
        reply = _recv_exact(s, 2)
        if reply != b"\x05\x00":
            return f"not a SOCKS5 answer to the greeting: {reply.hex(' ') or 'closed'}"
        s.sendall(_ASSOCIATE_ANY)
        reply = _recv_exact(s, 4)
        if len(reply) < 2 or reply[0] != 5:
            return f"not a SOCKS5 answer to UDP ASSOCIATE: {reply.hex(' ') or 'closed'}"
        if reply[1] != 0:
            return f"UDP ASSOCIATE refused (reply {reply[1]}): is UDP on?"
        # read the bound address too: closing with unread bytes would be a reset
        rest = {1: 6, 4: 18}.get(reply[3]) if len(reply) == 4 else None
        if rest is None and len(reply) == 4 and reply[3] == 3:
            rest = (_recv_exact(s, 1) or b"\x00")[0] + 2
        _recv_exact(s, rest or 0)
        return None
    except OSError as e:
        return f"no SOCKS5 answer ({e.strerror or e})"
    finally:
        s.close()


def _recv_exact(s, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf
