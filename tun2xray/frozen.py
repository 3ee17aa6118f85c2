"""The standalone binary (``dist/tun2xray``, built by tools/build-binary.sh).

A PyInstaller onefile build has no ``python -m``: ``sys.executable`` is the
binary itself. So the binary's entry point (`main`) understands one hidden
first argument, ``_worker``, which runs `tun2xray.workers.worker_main`; the
supervisor starts its workers that way when frozen (`worker_command`).

The onefile bootloader unpacks the bundle once into a temporary directory
and runs the program in a child process with ``LD_LIBRARY_PATH`` pointing at
the bundled libraries. Since PyInstaller 6.9 a process started from it
through ``sys.executable`` with the inherited ``_PYI_*`` variables reuses
that directory (no second unpacking, nothing left behind), so workers keep
the environment as it is. Programs that are not ours (the Xray core, ``ip``)
must see the user's library path, not the bundle's: `main` restores it in
``os.environ`` at start-up (the running process keeps the search path its
loader read at exec) and keeps the bundle's for the workers.
"""

from __future__ import annotations

import os
import sys

WORKER_ARG = "_worker"

_bundle_env: dict = {}      # the variables the bootloader set, for our own children


def frozen() -> bool:
    return bool(getattr(sys, "frozen", False))


def _restore_library_path() -> None:
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


def main(argv=None) -> int:
    """The binary's entry point: a worker, or the ordinary command line."""
    argv = sys.argv[1:] if argv is None else argv
    if frozen():
        _restore_library_path()
    if argv[:1] == [WORKER_ARG]:
        from .workers import worker_main
        return worker_main(argv[1:])
    from .cli import main as cli_main
    return cli_main(argv)
