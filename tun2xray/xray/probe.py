"""Is a core's inbound up?  Probes that leave nothing for the core to log
or dial: SOCKS5 spoken to a socks inbound, the listening sockets read from
/proc for the others.  The core's supervisor waits on them; doctor asks them.
"""

from __future__ import annotations

import errno
import os
import socket

from ..upstream.socks5_proto import (
    CMD_UDP_ASSOCIATE, NEED_DATA, Failed, SocksClient, SocksProtocolError, reply_text,
)


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


def socks_probe(host: str, port: int, timeout: float = 0.5) -> str | None:
    """Speak SOCKS5 to an inbound without auth: the greeting (05 01 00,
    expecting 05 00), then a UDP ASSOCIATE that the client closes.  The
    core logs nothing for that, where a bare connect is logged as "rejected
    ... insufficient header" and a session ending after the greeting as
    "rejected ... failed to read request".  None when it answered as SOCKS5,
    else what went wrong.  The bytes are the SOCKS machine's
    (upstream.socks5_proto), one message per round trip; the whole reply is
    read, since closing with unread bytes would be a reset."""
    label = "inbound"
    client = SocksClient(CMD_UDP_ASSOCIATE, bytes(4), 0, label=label, pipeline=False)
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((host, port))
        s.sendall(client.initial_bytes())
        ev = NEED_DATA
        while ev is NEED_DATA:
            chunk = s.recv(client.need)
            if not chunk:
                return f"not a SOCKS5 answer: {_unlabelled(client.connection_closed(), label)}"
            ev = client.receive_data(chunk)
            out = client.data_to_send()
            if out:
                s.sendall(out)
    except SocksProtocolError as e:
        return f"not a SOCKS5 answer: {_unlabelled(e, label)}"
    except OSError as e:
        return f"no SOCKS5 answer ({e.strerror or e})"
    finally:
        s.close()
    if ev.__class__ is Failed:
        if ev.reply_code is not None:
            return f"UDP ASSOCIATE refused ({reply_text(ev.reply_code)}): is UDP on?"
        return _unlabelled(ev.reason, label)
    return None


def _unlabelled(what, label: str) -> str:
    return str(what).removeprefix(label + ": ")
