"""tun2xray: TUN packet flows to Xray inbounds, over the netstack TCP/IP stack."""

from __future__ import annotations

import functools

# The release number: pyproject.toml reads it from here when building, so an
# installed distribution's metadata carries the same one.
__version__ = "0.1.0"


@functools.lru_cache(maxsize=1)
def version() -> str:
    """The installed distribution's version, else ``__version__`` (a
    checkout on PYTHONPATH, or a frozen build without package metadata)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("tun2xray")
    except PackageNotFoundError:
        return __version__
