"""Control socket: JSON status over a Unix stream socket (mode 0600).

The protocol is one request line and one JSON reply line:  "status\n" ->
{...}\n.  `tun2xray status` is its client.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import socket
import stat

DEFAULT_CONTROL = "unix:///run/tun2xray.sock"


def control_path(url: str) -> str:
    if not url.startswith("unix://") or len(url) <= len("unix://"):
        raise ValueError(f'control "{url}": expected unix:///path')
    path = url[len("unix://"):]
    if not path.startswith("/"):
        raise ValueError(f'control "{url}": the path must be absolute (unix:///path)')
    return path


async def serve_control(url: str, status_fn):
    """Start the control server; returns the asyncio server (close() it).
    status_fn() returns the status dict, or an awaitable of it: the loop
    keeps serving (other clients too) while it waits."""
    path = control_path(url)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ValueError(f'control "{url}": {path} exists and is not a socket')
        # a stale socket from an earlier run; refuse if someone still answers on it
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)
        else:
            raise ValueError(f'control "{url}": another tun2xray is serving {path}')
        finally:
            probe.close()

    async def handle(reader, writer):
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            cmd = line.decode("ascii", "replace").strip() or "status"
            if cmd == "status":
                reply = status_fn()
                if inspect.isawaitable(reply):
                    reply = await reply     # e.g. the supervisor asking its workers
            else:
                reply = {"error": f"unknown command {cmd!r}"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (OSError, asyncio.TimeoutError):
            pass
        finally:
            writer.close()

    old = os.umask(0o177)
    try:
        server = await asyncio.start_unix_server(handle, path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return server


def query(url: str, command: str = "status", timeout: float = 5.0) -> dict:
    path = control_path(url)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall(command.encode() + b"\n")
        chunks = []
        while True:
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
    finally:
        s.close()
    return json.loads(b"".join(chunks))
