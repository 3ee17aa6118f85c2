"""The standalone binary's entry point (tools/binary_entry.py calls `main`):
a worker when the first argument is the hidden ``_worker``, else the
ordinary command line. Kept apart from tun2xray.frozen, which the workers'
supervisor imports, so that no import circle closes through the CLI."""

from __future__ import annotations

import sys

from . import frozen


def main(argv=None) -> int:
    """The binary's entry point: a worker, or the ordinary command line."""
    argv = sys.argv[1:] if argv is None else argv
    if frozen.frozen():
        frozen._restore_user_environment()
    if argv[:1] == [frozen.WORKER_ARG]:
        from .workers.worker import worker_main
        return worker_main(argv[1:])
    if frozen.frozen():
        frozen._follow_bootloader()
    from .cli import main as cli_main
    return cli_main(argv)
