"""Workers that share memory: the zygote, a template process forked from
the supervisor after the imports and before any event loop or thread.

A worker started with ``python -m tun2xray.workers`` imports everything
again and holds its own copy of every module, code object and interned
string (~29 MB each). Forked processes share those pages with the process
they came from until one of them writes to a page. So `tun2xray run`
(when it runs workers) imports what a worker needs, moves every object it
has to the collector's permanent generation (``gc.freeze()``: the
collector never writes to them again, which would unshare their pages),
and forks the zygote at once: before the core's threads start, before
the TUN opens, before any loop exists. The zygote then only waits for
requests on its socket::

    supervisor ──spawn(queue fd, channel fd, poke fd)──► zygote
                                                          │ fork
                                                     intermediate ── fork ──► worker
                                                          │ exits at once
    supervisor ◄──────────── worker pid ─────────────── zygote

The intermediate exits at once, so the worker is reparented to the
supervisor, which is a *child subreaper* (``PR_SET_CHILD_SUBREAPER``): the
workers are the supervisor's own children (waitpid, exit status,
``PR_SET_PDEATHSIG`` on the supervisor) exactly as when they were exec'd.
A restarted worker comes from the same clean template, never from the
supervisor's running loop.

The zygote keeps nothing the supervisor had open: every inherited file
descriptor but stdin/stdout/stderr and its socket is pointed at
/dev/null (the instance lock is released; a Python object that still
holds such a number can never close a file a worker opens later). It
ends when its socket reaches EOF or the supervisor dies, and never
returns into the supervisor's frames (``os._exit``), in the zygote as in
the workers. The frozen binary forks the same way (no second start of the
bootloader's program).
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import struct
import subprocess
import sys

PR_SET_CHILD_SUBREAPER = 36

_PID = struct.Struct("!i")
_SPAWN = b"spawn"


def preload() -> None:
    """Import what a worker runs, in the supervisor, so that the zygote and
    every worker share it."""
    import asyncio  # noqa: F401

    from .. import host, logs, state  # noqa: F401
    from ..device import tun_class
    from ..engine import Engine  # noqa: F401
    from . import worker  # noqa: F401
    tun_class(True), tun_class(False)
    host.import_loop()
    import netstack  # noqa: F401


def _prctl(option: int, arg: int) -> bool:
    try:
        import ctypes
        return ctypes.CDLL(None, use_errno=True).prctl(option, arg, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class Zygote:
    """The supervisor's end: ``spawn(dev_fd, ch_fd, poke_fd)`` -> a worker handle."""

    def __init__(self, pid: int, sock: socket.socket):
        self.pid = pid
        self.sock = sock

    @classmethod
    def start(cls) -> Zygote | None:
        """Fork the zygote (None where workers cannot be forked: no
        subreaper, no fork; the supervisor then execs its workers)."""
        if not hasattr(os, "fork") or not _prctl(PR_SET_CHILD_SUBREAPER, 1):
            return None
        gc.disable()            # no collection now: its holes would be filled after the fork
        preload()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        parent = os.getpid()
        gc.freeze()
        gc.enable()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:                # the zygote: never returns
            code = 1
            try:
                ours.close()
                code = _zygote_main(theirs, parent)
            finally:
                os._exit(code)
        theirs.close()
        return cls(pid, ours)

    def spawn(self, dev_fd: int, ch_fd: int, poke_fd: int) -> ForkedWorker:
        """A new worker on these fds (OSError when the zygote is gone)."""
        socket.send_fds(self.sock, [_SPAWN], [dev_fd, ch_fd, poke_fd])
        self.sock.settimeout(10)
        data = self.sock.recv(64)
        if len(data) != _PID.size:
            raise OSError("the worker zygote is gone")
        (pid,) = _PID.unpack(data)
        if pid <= 0:
            raise OSError(f"the worker zygote could not fork: {os.strerror(-pid)}")
        return ForkedWorker(pid)

    def close(self, grace: float = 5.0) -> None:
        """End the zygote (EOF on its socket) and reap it (SIGKILL if it
        has not gone within ``grace`` seconds)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        z = ForkedWorker(self.pid)
        try:
            z.wait(grace)
        except subprocess.TimeoutExpired:
            z.kill()
            z.wait()


class ForkedWorker:
    """What the supervisor keeps of a forked worker: Popen's poll / wait /
    send_signal / kill on a child it did not exec."""

    __slots__ = ("pid", "returncode")

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode = None

    def poll(self):
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = -1            # reaped elsewhere: gone, status unknown
            else:
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None):
        if self.poll() is not None:
            return self.returncode
        if timeout is None:
            try:
                self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
            except ChildProcessError:
                self.returncode = -1
            return self.returncode
        import select
        fd = os.pidfd_open(self.pid)
        try:
            select.select([fd], [], [], timeout)
        finally:
            os.close(fd)
        if self.poll() is None:
            raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


# --------------------------------------------------------------------------
# the zygote process

def _release_inherited(keep: int) -> None:
    """Point every inherited descriptor but 0-2 and ``keep`` at /dev/null."""
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in (keep, null):
            try:
                os.dup2(null, fd, inheritable=False)
            except OSError:
                pass            # the listing's own descriptor, closed by now
    os.close(null)


def _zygote_main(sock: socket.socket, parent: int) -> int:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C: the supervisor decides
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    _release_inherited(sock.fileno())
    _prctl(1, signal.SIGTERM)                        # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        return 1
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 64, 3)
        except OSError:
            return 1
        if not msg:
            return 0                                  # the supervisor closed us
        if msg != _SPAWN or len(fds) != 3:
            for fd in fds:
                os.close(fd)
            continue
        pid = _fork_worker(sock, parent, *fds)
        for fd in fds:
            os.close(fd)
        sock.send(_PID.pack(pid))


def _fork_worker(sock: socket.socket, parent: int, dev_fd: int, ch_fd: int, poke_fd: int) -> int:
    """Fork the intermediate, which forks the worker and exits; the
    worker's pid (or -errno)."""
    r, w = os.pipe()
    try:
        mid = os.fork()
    except OSError as e:
        os.close(r)
        os.close(w)
        return -e.errno
    if mid == 0:
        code = 1
        try:
            os.close(r)
            pid = os.fork()
            if pid == 0:
                os.close(w)
                sock.close()
                code = 1
                try:
                    from .worker import worker_forked
                    code = worker_forked(ch_fd, parent, dev_fd, poke_fd)
                finally:
                    _exit_flushed(code)
            os.write(w, _PID.pack(pid))
            code = 0
        except OSError as e:
            os.write(w, _PID.pack(-e.errno))
        finally:
            os._exit(code)
    os.close(w)
    data = os.read(r, _PID.size)
    os.close(r)
    os.waitpid(mid, 0)          # gone: the worker is the supervisor's child now
    return _PID.unpack(data)[0] if len(data) == _PID.size else -5


def _exit_flushed(code) -> None:
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):
            pass
    os._exit(code if isinstance(code, int) else 1)
