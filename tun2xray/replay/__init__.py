"""`tun2xray replay`: feed a capture's client-side packets to a Stack offline.

    tun2xray replay [--json] [--checksums auto|verify|ignore] capture.pcap [more.pcap ...]
    tun2xray replay --ladder FLOW --svg out.svg capture.pcap

The capture (pcap or pcapng; raw IP, Ethernet, Linux cooked v1/v2 or BSD
loopback framing) is split into flows; the client of a flow is the side that
sent the SYN (TCP) or the first datagram (UDP); a new SYN on a used 4-tuple
starts a new flow.  Every client packet goes to a
`Stack(StackConfig(verify_checksums=True), rng=random.Random(0))` at its
recorded time (a fake clock: `poll(now)` runs the stack's timers between
packets; after the last packet the clock runs on through the stack's
deadlines), and this module plays the host, mirroring the recorded server:

- TCP: accept each connect request, or reject it as the recorded server
  refused the SYN (RST, or the ICMP unreachable it sent); read everything the
  client sends; write the bytes the recorded server had sent by then; shut
  down once the recorded server's FIN has come and all its bytes are
  written; abort where it sent a RST.
- UDP: hand the stack the recorded server's datagrams as replies, or reject
  the flow where the recording shows an ICMP port unreachable.

The client's packets acknowledge the recorded server's sequence space, so
their ACK numbers, SACK edges and timestamp echoes are translated into the
stack's (learnt from its SYN-ACK and its segments).  The stack's sender is not
the recorded kernel's: an ACK for bytes the stack has not sent yet is lowered
to what it has sent, and the rest is acknowledged by an extra pure ACK from
the client as soon as the stack sends those bytes ("synthesized" in the
report); without that, a slower sender would see its data acked from the
future and its segments dropped (RFC 9293 3.10.7.4).

Besides the streams, the replay checks what the stack put on the wire:
checksums and lengths of every packet, a SYN-ACK acking ISN+1, no ACK
beyond what the client had sent, no segment beyond the window the client
advertised, the same bytes on every retransmission, a FIN after the last byte.

Captures taken on the sending host with checksum offload hold the client's
packets with partial TCP/UDP checksums; `--checksums` says what to do with
them (see ChecksumReport; the default, auto, completes them when they look
offloaded and says so).  `--ladder FLOW --svg F` draws one flow's packets
(tun2xray.ladder).

Exit status: 0 when every flow completed (a refused or reset flow counts
when the recording shows the same: "refused as recorded", "reset as
recorded"), 1 when some did not, 2 when a file is missing or malformed, or
FLOW names no flow (one line on stderr).
"""

from .capture import (ACK, FIN, M32, PSH, RST, SYN, Flow, Pkt, ReplayError, Stream, _ip_text,
                      _quoted, _rel, _unreachable, parse_ip, read_pcap, split_flows, tcp_options)
from .checksums import (CHECKSUM_MODES, ChecksumReport, _checksum_ok, _fix_tcp_checksum,
                        _l4_checksum, prepare_checksums)
from .host import Replay
from .judge import _incomplete, judge
from .report import (OUTCOME_TEXT, checksum_hint, drops_text, flow_dict, main, replay_file, report,
                     stack_drops, summary)

__all__ = ["ACK", "FIN", "M32", "PSH", "RST", "SYN", "Flow", "Pkt", "ReplayError", "Stream",
           "parse_ip", "read_pcap", "split_flows", "tcp_options", "CHECKSUM_MODES", "ChecksumReport",
           "prepare_checksums", "Replay", "judge", "OUTCOME_TEXT", "checksum_hint", "drops_text",
           "flow_dict", "main", "replay_file", "report", "stack_drops", "summary",
           "_ip_text", "_quoted", "_rel", "_unreachable", "_checksum_ok", "_fix_tcp_checksum",
           "_l4_checksum", "_incomplete"]
