"""The engine: one Stack, one device, the upstream dialers, on one event loop.

tun2xray.engine.core holds the Engine; its TCP side, UDP side and reports are
mixins in tcp.py, udp.py and history.py, the per-flow relays in relay.py.
"""

from .core import Engine
from .relay import (CLOSED_HISTORY, DEVICE_BATCH, RATE_PERIOD, REFUSAL_WINDOW, UDP_QUEUE, SocksAssoc, TcpRelay,
                    UdpRelay)

__all__ = ["CLOSED_HISTORY", "DEVICE_BATCH", "RATE_PERIOD", "REFUSAL_WINDOW", "UDP_QUEUE", "Engine", "SocksAssoc",
           "TcpRelay", "UdpRelay"]
