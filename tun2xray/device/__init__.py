"""Packet I/O: where raw IP packets enter and leave tun2xray.

One small batched interface over every kind of packet-flow host::

    dev = open_device("tun://tx0", mtu=1500, addresses=["198.18.0.1/15"])
    loop.add_reader(dev.fileno(), on_readable)      # non-blocking fd
    packets = dev.read_batch(256)                   # drain until EAGAIN or 256
    n = dev.write_batch(replies)                    # never blocks
    dev.close()                                     # idempotent

URLs (``open_device``):

``addresses`` (IPv4/IPv6 CIDR strings; None or "" entries are skipped) and
``mtu`` are applied to a ``tun://`` device. For ``fd://`` and ``unix://`` the
host has configured the interface: addresses are ignored and ``mtu`` (default
1500) is only recorded as ``Device.mtu``.

``tun://NAME``
    A Linux TUN (``IFF_TUN | IFF_NO_PI``) opened with TUNSETIFF. If NAME
    does not exist it is created, and removed again by ``close()``; an existing
    TUN (e.g. made persistent by ``ip tuntap add``) is attached to and left in
    place. MTU and addresses (IPv4 and IPv6 CIDR strings) are applied and the
    link brought up with interface ioctls. ``tun://`` with no name lets the
    kernel pick one (``tun0``, ...). Offloads are on by default: IFF_VNET_HDR
    and TCP segmentation/checksum offload, 64 KB TCP super-segments both ways
    (see offload.py; ``Device.offload``/``Device.gso_max`` tell the engine).
    When the kernel refuses them the TUN is opened plainly instead
    (``Device.offload`` is then False and ``Device.offload_refused`` says
    why). ``?offload=0`` forces the plain TUN; ``?offload=1`` requires
    offloads (an error when the kernel refuses).
    ``tun://NAME?multiqueue=1`` sets IFF_MULTI_QUEUE: ``dev.open_queue()`` (or
    the same URL opened in another process) attaches another queue; the
    kernel spreads flows over the queues, one worker per queue.

``fd://N`` and ``fd://N?header=af[&af6=10]``
    An inherited TUN file descriptor (Android ``VpnService``: raw IP packets).
    With ``header=af`` every packet carries a 4-byte big-endian address family
    first, as Darwin's utun does: stripped on read (and checked against the IP
    version; disagreements are dropped and counted in ``rx_bad_header``),
    added on write with AF_INET=2 and AF_INET6=30 (Darwin numbering), or 10
    (Linux numbering) with ``af6=10``. On read both 10 and 30 are accepted.
    The device takes ownership of N: ``close()`` closes it. N is switched to
    non-blocking mode.

``unix:///PATH`` and ``unix:///PATH?peer=/OTHER`` (``unix://@NAME``: abstract)
    One IP packet per datagram over an AF_UNIX SOCK_DGRAM socket. tun2xray
    *binds* PATH (replacing a stale socket file there; unlinked on close). The
    host process binds its own address and sends packets to PATH; tun2xray
    sends its packets to the address it last received a datagram from, or
    always to OTHER when ``peer=`` is given. Until a peer is known, outgoing
    packets are dropped (``tx_dropped``).

Counters (``Device.stats``, plain ints): ``rx_packets rx_bytes tx_packets
tx_bytes tx_dropped tx_errors rx_bad_header rx_dropped``; offload TUNs add
``rx_gso tx_gso`` (super-segments read / written).

``write_batch`` semantics: packets are written in order. A packet the device
rejects on its own (malformed for the kernel, no peer, not IPv4/IPv6 with an
AF header) is counted in ``tx_errors`` and ``tx_dropped`` and skipped. When
the device is full (EAGAIN/ENOBUFS) writing stops; the packets left are
counted in ``tx_dropped``. The return value is how many packets from the
front were dealt with (written or rejected): the engine may retry
``packets[n:]`` once ``fileno()`` is writable. With no rejections, this is the
number written.

``read_batch(max_packets)`` does at most ``max_packets`` reads. Malformed
packets are dropped and counted, and count toward that bound, so a call may
return fewer packets (even none) while more are queued: the fd then stays
readable and the next wake-up continues.

``read_batch`` and ``write_batch`` raise ``DeviceError`` only when the device
is unusable (closed, the peer hung up, the interface went away); packets read
before such an error are returned first and the error is raised by the next
call.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from ._base import Device, DeviceError

__all__ = ["Device", "DeviceError", "open_device"]


def _query(url: str, query: str, allowed: set[str]) -> dict[str, str]:
    try:
        q = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise DeviceError(f"{url}: malformed query string {query!r}") from None
    out = {}
    for key, values in q.items():
        if key not in allowed:
            raise DeviceError(f"{url}: unknown option {key!r} (known: {', '.join(sorted(allowed))})")
        if len(values) != 1:
            raise DeviceError(f"{url}: option {key!r} given more than once")
        out[key] = values[0]
    return out


def open_device(url: str, *, mtu: int | None = None, addresses=()) -> Device:
    """Open the packet device named by ``url`` (see the module docstring)."""
    if not isinstance(url, str) or "://" not in url:
        raise DeviceError(f"{url!r}: not a device URL (tun://NAME, fd://N, unix:///PATH)")
    if mtu is not None:
        if isinstance(mtu, bool) or not isinstance(mtu, int) or not 68 <= mtu <= 65535:
            raise DeviceError(f"{url}: MTU {mtu!r} is not in 68..65535")
    if isinstance(addresses, str):
        addresses = [addresses]
    addresses = [a for a in (addresses or ()) if a]  # None/"" = not configured
    scheme, rest = url.split("://", 1)
    scheme = scheme.lower()
    if scheme == "tun":
        name, _, query = rest.partition("?")
        opts = _query(url, query, {"offload", "multiqueue"})
        for key, value in opts.items():
            if value not in ("0", "1"):
                raise DeviceError(f"{url}: {key}={value!r} is not 0 or 1")
        from .linux_tun import open_tun

        return open_tun(url, name, mtu=mtu, addresses=list(addresses),
                        offload={"1": True, "0": False}.get(opts.get("offload"), "auto"),
                        multiqueue=opts.get("multiqueue") == "1")
    # fd:// and unix://: the host owns the interface and its addressing, so
    # addresses are ignored (the CLI passes its defaults whatever the device).
    if scheme == "fd":
        parts = urlsplit(url)
        if parts.path not in ("", "/"):
            raise DeviceError(f"{url}: expected fd://N")
        opts = _query(url, parts.query, {"header", "af6"})
        from .fd import open_fd

        return open_fd(url, parts.netloc, opts, mtu=mtu)
    if scheme == "unix":
        path, _, query = rest.partition("?")
        opts = _query(url, query, {"peer"})
        from .unix import open_unix

        return open_unix(url, path, opts, mtu=mtu)
    raise DeviceError(f"{url}: unknown device scheme {scheme!r} (tun://NAME, fd://N, unix:///PATH)")
