"""The standalone binary (``dist/tun2xray``, built by tools/build-binary.sh).

A PyInstaller onefile build has no ``python -m``: ``sys.executable`` is the
binary itself. So the binary's entry point (`tun2xray.entry.main`)
understands one hidden first argument, ``_worker``, which runs
`tun2xray.workers.worker_main`; the supervisor starts its workers that way
when frozen (`worker_command`). This module imports neither the CLI nor the
workers: they import it.

The onefile bootloader unpacks the bundle once into a temporary directory
and runs the program in a child process with ``LD_LIBRARY_PATH`` pointing at
the bundled libraries. Since PyInstaller 6.9 a process started from it
through ``sys.executable`` with the inherited ``_PYI_*`` variables reuses
that directory (no second unpacking, nothing left behind), so workers keep
the environment as it is. Programs that are not ours (the Xray core, ``ip``)
must see the user's library path, not the bundle's, and none of the
bootloader's private ``_PYI_*`` variables (another PyInstaller program would
take itself for our child): the entry point restores them in ``os.environ`` at
start-up (the running process keeps the search path its loader read at exec)
and keeps the bundle's for the workers.

The bootloader forwards signals to the program and removes the unpacked
files when it ends. Killed with SIGKILL it can do neither, so the program
asks for SIGTERM when the bootloader dies (a clean stop: workers, TUN) and
then removes the unpacked files itself.
"""

from __future__ import annotations

import os
import sys

WORKER_ARG = "_worker"

_bundle_env: dict = {}      # the variables the bootloader set, for our own children


def frozen() -> bool:
    return bool(getattr(sys, "frozen", False))


def _restore_user_environment() -> None:
    """os.environ as the user gave it; the bootloader's variables kept for our workers."""
    for name in [k for k in os.environ if k.startswith("_PYI_")]:
        _bundle_env[name] = os.environ.pop(name)
    path = os.environ.get("LD_LIBRARY_PATH")
    if path is None:
        return
    _bundle_env["LD_LIBRARY_PATH"] = path
    orig = os.environ.pop("LD_LIBRARY_PATH_ORIG", None)
    if orig is None:
        del os.environ["LD_LIBRARY_PATH"]
    else:
        _bundle_env["LD_LIBRARY_PATH_ORIG"] = orig
        os.environ["LD_LIBRARY_PATH"] = orig


def _follow_bootloader() -> None:
    """In a onefile program (its parent is the same binary, its files in a
    ``_MEI*`` directory): SIGTERM to us when the bootloader dies, and remove
    the unpacked files at exit if it is gone by then."""
    ppid = os.getppid()
    home = getattr(sys, "_MEIPASS", "")
    try:
        same = os.readlink(f"/proc/{ppid}/exe") == os.readlink("/proc/self/exe")
    except OSError:
        same = False
    if not same or not os.path.basename(home).startswith("_MEI"):
        return
    import atexit
    import signal

    from .host import set_pdeathsig

    if not set_pdeathsig(signal.SIGTERM):
        return
    # commands without their own handler exit through atexit on SIGTERM too
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    atexit.register(_remove_orphaned_files, ppid, home)
    if os.getppid() != ppid:                # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _remove_orphaned_files(ppid: int, home: str) -> None:
    if os.getppid() != ppid:
        import shutil
        shutil.rmtree(home, ignore_errors=True)


def worker_command(args: list) -> tuple:
    """(argv, env) that start one worker with these worker arguments: the
    binary with ``_worker`` when frozen, else ``python -m tun2xray.workers``
    importing this same source tree."""
    env = dict(os.environ)
    if frozen():
        env.update(_bundle_env)
        return [sys.executable, WORKER_ARG, *args], env
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return [sys.executable, "-m", "tun2xray.workers", *args], env
