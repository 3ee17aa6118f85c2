"""TCP names shared by the connection's parts: header flags, RFC 9293 state
names, timer constants, option layouts and the two small types the host
sees (TcpError, GsoSegment)."""

from __future__ import annotations

from ..seq import HALF, MASK  # noqa: F401  (re-exported for the parts)
from ..wire import tcp as _wt
from ..wire.templates import GsoSegment  # noqa: F401  (re-exported: the host sees it as netstack.tcp.GsoSegment)

FIN, SYN, RST, PSH, ACK, URG = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
PROTO_TCP = 6

# option layouts (netstack.wire.tcp holds the formats)
TSOPT = _wt.TS_BLOCK          # NOP NOP TS(8) len 10, tsval, tsecr
SACKHDR = _wt.SACK_HEAD       # NOP NOP SACK(5) len
SACK_BLOCK = _wt.SACK_EDGES
MSS_OPT = _wt.MSS_BLOCK
WS_OPT = _wt.WS_BLOCK
SYN_TS_OPT = _wt.SYN_TS_BLOCK
SYN_SACK_WS_OPT = _wt.SYN_SACK_WS_BLOCK

# RFC 9293 §3.3.2 state names (LISTEN here: a request the host has not answered)
LISTEN = "LISTEN"
SYN_RECEIVED = "SYN_RECEIVED"
ESTABLISHED = "ESTABLISHED"
FIN_WAIT_1 = "FIN_WAIT_1"
FIN_WAIT_2 = "FIN_WAIT_2"
CLOSE_WAIT = "CLOSE_WAIT"
CLOSING = "CLOSING"
LAST_ACK = "LAST_ACK"
TIME_WAIT = "TIME_WAIT"
CLOSED = "CLOSED"

# states in which we may send data / the peer may still send data / the host may write
SEND_STATES = frozenset((ESTABLISHED, CLOSE_WAIT, FIN_WAIT_1, CLOSING, LAST_ACK))
RECV_STATES = frozenset((ESTABLISHED, FIN_WAIT_1, FIN_WAIT_2))
WRITE_STATES = frozenset((LISTEN, SYN_RECEIVED, ESTABLISHED, CLOSE_WAIT))
KEEPALIVE_STATES = frozenset((ESTABLISHED, CLOSE_WAIT, FIN_WAIT_2))

# what the connection owes the peer in the way of a pure ACK (`_ack_owed`)
ACK_NONE = 0            # nothing
ACK_DELAYED = 1         # one in-order segment: the delayed-ACK timer sends it
ACK_NOW = 2             # at the next flush (two segments, a hole, a probe, a window update)

REJECT_KINDS = {"rst": None, "drop": None, "icmp-port": "port", "icmp-host": "host",
                "icmp-net": "net", "icmp-admin": "admin"}

INITIAL_RTO = 1.0          # RFC 6298 §2.1
DELACK = 0.04              # delayed-ACK timer for a lone segment
CHALLENGE_ACKS_PER_SEC = 10  # RFC 5961 §7, per connection (no global side channel)
MAX_SACK_BLOCKS = 16       # scoreboard entries kept
MIN_MSS = 88               # floor for the peer's MSS and PMTU updates (as Linux)
DEFAULT_MSS = {4: 536, 6: 1220}   # RFC 9293 §3.7.1 / RFC 8200 §5 when the SYN has no MSS option


class TcpError(Exception):
    """Host misuse of a connection handle (write after shutdown, accept twice, ...)."""
