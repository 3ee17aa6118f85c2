"""Dialers for Xray inbounds: SOCKS5 (CONNECT, UDP ASSOCIATE) and dokodemo-door."""

from .dokodemo import DokodemoUdp, dokodemo_connect
from .socks5 import SocksError, SocksUdpAssociation, socks5_connect
from .url import DokodemoUpstream, SocksUpstream, parse_upstream

__all__ = [
    "open_stream",
    "DokodemoUdp",
    "DokodemoUpstream",
    "SocksError",
    "SocksUdpAssociation",
    "SocksUpstream",
    "dokodemo_connect",
    "parse_upstream",
    "socks5_connect",
]


async def open_stream(up: SocksUpstream | DokodemoUpstream, host, port: int, *, timeout: float):
    """A data-phase TCP socket to ``host:port`` through ``up``.

    For dokodemo-door the target is fixed by the inbound, so host and port
    are ignored.  Raises what socks5_connect / dokodemo_connect raise.
    """
    if isinstance(up, SocksUpstream):
        return await socks5_connect(up, host, port, timeout=timeout)
    if isinstance(up, DokodemoUpstream):
        return await dokodemo_connect(up, timeout=timeout)
    raise TypeError(f"not an upstream: {up!r}")
