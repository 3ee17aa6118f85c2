"""One worker process: reads its spec from the channel, opens its TUN queue,
runs its own Stack + Engine on its event loop and answers the supervisor
(`python -m tun2xray.workers` and the binary's `_worker` run worker_main)."""

from __future__ import annotations

import os
import pickle
import signal
import socket
import sys

from .channel import _LEN, MAX_MESSAGE, WorkerChannel, frame

# --------------------------------------------------------------------------
# worker

class _QueueFd:
    """What TunDevice wants from a pytun object: the inherited queue fd."""

    __slots__ = ("fd",)

    def __init__(self, fd: int):
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _pdeathsig(parent: int) -> None:
    """SIGTERM to us when the supervisor dies; gone already: exit now."""
    from ..host import set_pdeathsig

    set_pdeathsig(signal.SIGTERM)
    if os.getppid() != parent:
        os._exit(1)


def _read_spec(chan: socket.socket, timeout: float = 10.0):
    """The first message (the spec), and the bytes that came after it (a
    request the supervisor sent before we were up)."""
    chan.settimeout(timeout)
    buf = bytearray()
    while True:
        if len(buf) >= 4:
            (n,) = _LEN.unpack_from(buf)
            if n > MAX_MESSAGE:
                raise ValueError(f"channel message of {n} bytes")
            if len(buf) >= 4 + n:
                spec = pickle.loads(bytes(memoryview(buf)[4:4 + n]))
                del buf[:4 + n]
                return spec, buf
        data = chan.recv(1 << 16)
        if not data:
            raise EOFError("the supervisor closed the channel")
        buf += data


def worker_device(spec: dict):
    from ..device import tun_class

    cls = tun_class(spec["offload"])
    os.set_blocking(spec["fd"], False)
    return cls(_QueueFd(spec["fd"]), name=spec["name"], mtu=spec["mtu"], url=spec["url"],
               created=False, flags=spec["flags"])


def _poker(fd):
    """engine.on_upstream_failed for a worker: one byte to the supervisor's
    proxy watch (a full pipe has said it already)."""
    if fd is None:
        return None

    def poke():
        try:
            os.write(fd, b"!")
        except OSError:
            pass
    return poke


async def _worker_serve(spec: dict, chan: socket.socket, pending: bytes = b"") -> int:
    import asyncio

    from ..host import make_engine

    loop = asyncio.get_running_loop()
    try:
        device = worker_device(spec)
    except Exception as e:
        chan.sendall(frame({"error": f"cannot use queue fd {spec.get('fd')}: {e}"}))
        return 1
    try:
        recorder = _worker_recorder(spec, device)
    except OSError as e:
        device.close()
        chan.sendall(frame({"error": f"--record {spec['record']['part']}: {e.strerror or e}"}))
        return 1
    try:
        engine = make_engine(device, spec["engine"], recorder)
        loop.add_signal_handler(signal.SIGTERM, engine.stop)
        engine.on_upstream_failed = _poker(spec.get("poke_fd"))
        ch = WorkerChannel(chan, engine, loop, pending)
        task = loop.create_task(engine.run())
        await asyncio.sleep(0)
        ch.send({"ready": os.getpid()})
        await task
        if engine.error:
            ch.send({"fatal": engine.error})    # the supervisor ends the run with these words
        ch.close()
    finally:
        device.close()
        if recorder is not None:
            recorder.close()
    if engine.error:
        import logging
        logging.getLogger("tun2xray.workers").error("worker %d stopped: %s", spec["id"], engine.error)
        return 1
    return 0


def _worker_recorder(spec: dict, device):
    """This worker's part of the --record capture (appended to after a
    restart), or None."""
    r = spec.get("record")
    if not r:
        return None
    from ..record import RecordOptions, recorder

    return recorder(RecordOptions(r["path"], r["wire"], 0), device.mtu, path=r["part"],
                    max_bytes=r["cap"], append=True)


def worker_main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m tun2xray.workers",
                                description="one tun2xray worker (started by `tun2xray run --workers N`)")
    p.add_argument("--channel", type=int, required=True)
    p.add_argument("--parent", type=int, required=True)
    a = p.parse_args(argv)
    del argparse, p
    _pdeathsig(a.parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return _serve_channel(socket.socket(fileno=a.channel))


def worker_forked(ch_fd: int, parent: int, dev_fd: int, poke_fd: int) -> int:
    """A worker forked by the zygote (tun2xray.workers.zygote): the spec's
    fd numbers are the supervisor's, ours are these. The supervisor sends
    the spec once we are its child, so PR_SET_PDEATHSIG is asked for then."""
    chan = socket.socket(fileno=ch_fd)
    return _serve_channel(chan, parent, {"fd": dev_fd, "poke_fd": poke_fd})


def _serve_channel(chan: socket.socket, parent: int | None = None, fds: dict | None = None) -> int:
    try:
        spec, pending = _read_spec(chan)
    except (OSError, EOFError, ValueError, pickle.UnpicklingError) as e:
        print(f"tun2xray worker: no spec from the supervisor: {e}", file=sys.stderr)
        return 1
    if parent is not None:
        _pdeathsig(parent)
    if fds:
        spec.update(fds)
    from .. import logs

    logs.setup(spec.get("log_level", "info"), spec.get("log_format", "text"), worker=spec["id"])
    from ..host import run
    return run(_worker_serve(spec, chan, pending))
