"""Stack configuration: plain values, no behaviour."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class StackConfig:
    mtu: int = 1500
    # Inbound: verify IP/TCP/UDP/ICMP checksums.  A local TUN vouches for
    # its packets (the kernel built them), a pcap or an unknown host does not.
    verify_checksums: bool = True
    # Outbound: leave the transport checksum to the device (the field holds
    # the pseudo-header sum, as for virtio NEEDS_CSUM).  IPv4 header
    # checksums are always computed.
    checksum_offload: bool = False
    ttl: int = 64
    # TCP
    rcv_buf: int = 1 << 20          # per-connection receive buffer (advertised window)
    snd_buf: int = 1 << 20          # per-connection send buffer
    max_pending: int = 1024         # connect requests the host has not answered yet (netstack.admission)
    max_pending_per_dst: int = 512  # ... of them towards one (address, port)
    max_pending_per_src: int = 1024 # ... of them from one client address (a router's LAN clients)
    max_half_open: int = 4096       # accepted, SYN-ACK sent, no ACK yet (SYN_RECEIVED)
    synack_retries: int = 5         # SYN-ACK retransmissions before a half-open connection is dropped
    connect_timeout: float = 10.0   # a request unanswered this long is reset
    time_wait: float = 4.0          # shorter than 2*MSL: flows are local; bounds memory
    keepalive: float | None = None  # idle seconds before keepalive probes, None = off
    keepalive_interval: float = 15.0
    keepalive_count: int = 4
    max_retries: int = 10           # retransmissions of one segment before giving up
    min_rto: float = 0.2            # RFC 6298 says 1 s; like Linux we allow lower on local paths
    max_rto: float = 60.0
    # UDP
    udp_timeout: float = 60.0
    # idle timeouts by destination port, overriding udp_timeout (the profile's
    # udp_port_timeouts; its default shortens DNS and NTP flows)
    udp_port_timeouts: dict = field(default_factory=dict)
    # UDP flows at once; a new one beyond evicts the least recently used
    # (0: no bound of their own, max_flows only)
    max_udp_flows: int = 16384
    # every byte buffered by the stack and its host (netstack.budget), 0 = no budget
    memory_budget: int = 0
    # both
    max_flows: int = 65536
    # ICMP echo requests to any address: "reply" or "drop"
    icmp_echo: str = "reply"
    # IP fragment reassembly (RFC 791 / RFC 8200 §4.5)
    frag_timeout: float = 30.0
    frag_max_bytes: int = 1 << 22   # all datagrams under reassembly together
    frag_max_datagrams: int = 256
    # TCP: largest segment handed to the device at once (TSO/GSO super-segment);
    # 0 = never larger than the MTU allows
    gso_max: int = 0
