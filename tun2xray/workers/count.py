"""How many workers: --workers, TUN2XRAY_WORKERS or one per two cores when
the device can be a multi-queue TUN, and the multi-queue TUN facts that
decide it (queue flags, detaching a queue).

Why one per two cores: the clients and the Xray core run on the same cores
as tun2xray, and the core spends about as much CPU on each connection as
tun2xray does (e2e_bench: v2ray busy as much as the tunnel in every
connection-rate row). On two cores one worker carries more new connections
per second and at less CPU per connection than two (docs/performance.md),
so a second worker only competes with the core for the same two cores."""

from __future__ import annotations

import os
import socket
import struct
import sys

from .channel import WorkerError

TUNSETQUEUE = 0x400454D9        # _IOW('T', 217, int)
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400

MAX_WORKERS = 64



def detach_queue(fd: int) -> None:
    """Stop the kernel from steering packets to this queue; the fd (and with
    it the interface) stays."""
    import fcntl

    fcntl.ioctl(fd, TUNSETQUEUE, struct.pack("16sH22x", b"", IFF_DETACH_QUEUE))


IFF_MULTI_QUEUE = 0x0100


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _ifindex(name: str) -> int:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return 0


def _tun_flags(name: str):
    """An existing interface's TUN flags (None: no such interface; -1: not a TUN)."""
    if not os.path.exists(f"/sys/class/net/{name}"):
        return None
    try:
        with open(f"/sys/class/net/{name}/tun_flags") as f:
            return int(f.read().strip(), 16)
    except (OSError, ValueError):
        return -1


def _tun_parts(url: str):
    """(NAME, query) of a tun:// URL, None for other devices."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != "tun":
        return None
    name, _, query = rest.partition("?")
    return name, query


def multiqueue_possible(device: str, record=None) -> bool:
    """Can this run be served by workers? Not for fd:// or unix:// devices,
    ``?multiqueue=0``, an existing single-queue TUN (attaching to it as
    multi-queue would fail), or off Linux.  (``record`` is accepted for old
    callers and ignored: workers record too.)"""
    parts = _tun_parts(device)
    if parts is None or not sys.platform.startswith("linux"):
        return False
    name, query = parts
    if "multiqueue=0" in query.split("&"):
        return False
    if name:
        flags = _tun_flags(name)
        if flags is not None and (flags < 0 or not flags & IFF_MULTI_QUEUE):
            return False
    return True


def default_workers(device: str, record=None) -> int:
    """Without --workers: one worker per two cores where workers are
    possible (1 on one or two cores: the single-process path), else 1."""
    if not multiqueue_possible(device, record):
        return 1
    return max(1, min(_cores() // 2, MAX_WORKERS))


def worker_count(args) -> int:
    """--workers from the flags, else the TUN2XRAY_WORKERS environment
    variable, else default_workers(); checked; raises WorkerError."""
    n = getattr(args, "workers", None)
    if n is None:
        env = os.environ.get("TUN2XRAY_WORKERS", "").strip()
        if not env:
            return default_workers(args.device, args.record)
        try:
            n = int(env)
        except ValueError:
            raise WorkerError(f"TUN2XRAY_WORKERS={env!r}: not a number") from None
        if n > 1 and not multiqueue_possible(args.device, args.record):
            return 1        # a default for every run: only where it can apply
    if not 1 <= n <= MAX_WORKERS:
        raise WorkerError(f"--workers {n}: must be between 1 and {MAX_WORKERS}")
    if n > 1:
        parts = _tun_parts(args.device)
        if parts is None:
            raise WorkerError(f"--workers {n}: needs a tun:// device (one queue per worker)")
        if "multiqueue=0" in parts[1].split("&"):
            raise WorkerError(f"--workers {n}: needs a multi-queue TUN (not ?multiqueue=0)")
    return n


def multiqueue_url(url: str) -> str:
    """tun://NAME[?opts] with multiqueue=1 set."""
    from urllib.parse import parse_qsl, urlencode

    base, _, query = url.partition("?")
    opts = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != "multiqueue"]
    opts.append(("multiqueue", "1"))
    return base + "?" + urlencode(opts)
