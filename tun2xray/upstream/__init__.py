"""Dialers for Xray inbounds: SOCKS5 (CONNECT, UDP ASSOCIATE) and dokodemo-door."""

from .dokodemo import DokodemoUdp, dokodemo_connect
from .socks5 import SocksError, SocksUdpAssociation, socks5_connect
from .url import DokodemoUpstream, SocksUpstream, parse_upstream

__all__ = [
    "DokodemoUdp",
    "DokodemoUpstream",
    "SocksError",
    "SocksUdpAssociation",
    "SocksUpstream",
    "dokodemo_connect",
    "parse_upstream",
    "socks5_connect",
]
