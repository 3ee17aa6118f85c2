"""unix:///PATH: one IP packet per datagram with a host process (AF_UNIX, SOCK_DGRAM).

Who binds, who sends where:

- tun2xray binds PATH (``unix://@NAME`` binds the abstract name NAME). A stale
  socket file at PATH is replaced; any other file there is an error. PATH is
  unlinked on close.
- The host binds an address of its own (a path or an abstract name) and sends
  each IP packet as one datagram to PATH. It may ``connect()`` to PATH first.
- tun2xray sends its packets to the address the last datagram came from, or,
  with ``?peer=/OTHER`` (``?peer=@NAME``), always to OTHER. A host that sends
  from an unbound socket cannot be answered: its packets are still read, but
  replies are dropped (``tx_dropped``) until a bound peer is heard from.

The kernel queues at most ``net.unix.max_dgram_qlen`` datagrams (often 10) on
a receiving socket; beyond that the sender sees EAGAIN. Each side must read
promptly for throughput; ``write_batch`` stops there and counts the rest as
dropped so the engine can retry when the socket is writable.
"""

from __future__ import annotations

import errno
import os
import socket
import stat

from ._base import READ_SIZE, Device, DeviceError

# Peer is gone or unusable: the packet cannot be delivered.
_NO_PEER = frozenset({errno.ECONNREFUSED, errno.ENOENT, errno.ENOTCONN, errno.EDESTADDRREQ, errno.EPERM, errno.EACCES})
_BUF = 4 * 1024 * 1024


def _sock_addr(text: str):
    """'@name' -> abstract address; anything else is a filesystem path."""
    if text.startswith("@"):
        return "\0" + text[1:]
    return text


class UnixDevice(Device):
    """IP packets as datagrams on an AF_UNIX socket that tun2xray binds."""

    empty_read_is_eof = False
    framing = "datagram"
    # the host went away: nothing in this batch can arrive
    drop_rest_errnos = _NO_PEER

    def __init__(self, sock: socket.socket, *, name: str, mtu: int, url: str, path: str | None, peer):
        super().__init__(sock.fileno(), name=name, mtu=mtu, url=url, trusted_checksums=False)
        self._sock = sock
        self._path = path  # filesystem path to unlink on close, if any
        self._fixed_peer = peer is not None
        self.peer = peer  # where write_batch sends; None until heard from
        self._send = self._send_to_peer
        if not self._fixed_peer:
            self._recv = self._recv_and_learn_peer

    def _release(self) -> None:
        self._sock.close()
        if self._path:
            try:
                if stat.S_ISSOCK(os.lstat(self._path).st_mode):
                    os.unlink(self._path)
            except OSError:
                pass

    def _recv_and_learn_peer(self):
        """The read hook without a fixed peer: the sender of the last
        datagram is where write_batch sends."""
        p, addr = self._sock.recvfrom(READ_SIZE)
        if addr:
            self.peer = addr
        return p

    def write_batch(self, packets) -> int:
        if self.peer is None:
            # nobody to send to yet: the whole batch is dropped, not an error
            self._check_usable()
            self.stats["tx_dropped"] += len(packets)
            return len(packets)
        return Device.write_batch(self, packets)

    def _send_to_peer(self, p) -> None:
        """The framing hook: one datagram per packet, to the peer."""
        self._sock.sendto(p, self.peer)


def open_unix(url: str, where: str, opts: dict, *, mtu: int | None) -> UnixDevice:
    if where.startswith("@"):
        if len(where) < 2:
            raise DeviceError(f"{url}: empty abstract socket name")
        path = None
        bind_addr = _sock_addr(where)
    else:
        if not where.startswith("/"):
            raise DeviceError(f"{url}: expected unix:///absolute/path or unix://@abstract-name")
        path = where
        bind_addr = where
        if len(os.fsencode(path)) > 107:
            raise DeviceError(f"{url}: socket path is longer than 107 bytes")
    peer = None
    if "peer" in opts:
        peer_text = opts["peer"]
        if not (peer_text.startswith("/") or (peer_text.startswith("@") and len(peer_text) > 1)):
            raise DeviceError(f"{url}: peer={peer_text!r} is not an absolute path or @abstract-name")
        peer = _sock_addr(peer_text)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        if path is not None:
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise DeviceError(f"{url}: cannot use {path}: {os.strerror(exc.errno)}") from None
            else:
                if not stat.S_ISSOCK(st.st_mode):
                    raise DeviceError(f"{url}: {path} exists and is not a socket")
                os.unlink(path)  # stale socket from an earlier run
        try:
            sock.bind(bind_addr)
        except OSError as exc:
            raise DeviceError(f"{url}: cannot bind: {os.strerror(exc.errno)}") from None
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, _BUF)
            except OSError:
                pass
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    name = os.path.basename(path) if path else where
    return UnixDevice(sock, name=name, mtu=1500 if mtu is None else mtu, url=url, path=path, peer=peer)
