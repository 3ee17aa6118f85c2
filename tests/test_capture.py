"""The capture script: real clients through two TUNs in rp-* namespaces.
Runs the short scenarios only (a few seconds); needs root, like CI."""

from __future__ import annotations

import os
import subprocess
import sys

import dpkt
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "capture_pcaps.py")

pytestmark = pytest.mark.e2e


def _netns():
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="creates TUN devices and network namespaces (root)")
def test_capture_short_scenarios(tmp_path):
    r = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path), "--only", "dns-v6", "tcp-refused", "udp-closed"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    # namespaces removed on exit
    ns = _netns()
    assert "rp-cli" not in ns and "rp-srv" not in ns
    assert sorted(os.listdir(tmp_path)) == ["dns-v6.pcap", "tcp-refused.pcap", "udp-closed.pcap"]

    def packets(name):
        with open(tmp_path / name, "rb") as f:
            rd = dpkt.pcap.Reader(f)
            assert rd.datalink() in (101, 12)
            return [bytes(b) for _, b in rd]

    # two DNS queries and two answers, all IPv6 UDP, answers from the address asked
    dns = [dpkt.ip6.IP6(b) for b in packets("dns-v6.pcap")]
    assert len(dns) == 4 and all(isinstance(p.data, dpkt.udp.UDP) for p in dns)
    for q, a in zip(dns[::2], dns[1::2]):
        assert (q.src, q.dst, q.data.sport, q.data.dport) == (a.dst, a.src, a.data.dport, a.data.sport)
        assert dpkt.dns.DNS(q.data.data).id == dpkt.dns.DNS(a.data.data).id and dpkt.dns.DNS(a.data.data).an

    # SYN then RST|ACK acking ISN+1, once over IPv4 and once over IPv6
    refused = packets("tcp-refused.pcap")
    assert [b[0] >> 4 for b in refused] == [4, 4, 6, 6]
    for syn_raw, rst_raw in zip(refused[::2], refused[1::2]):
        ip_cls = dpkt.ip.IP if syn_raw[0] >> 4 == 4 else dpkt.ip6.IP6
        syn, rst = ip_cls(syn_raw).data, ip_cls(rst_raw).data
        assert syn.flags == dpkt.tcp.TH_SYN
        assert rst.flags == dpkt.tcp.TH_RST | dpkt.tcp.TH_ACK and rst.ack == syn.seq + 1

    # a datagram to a closed port answered by ICMP / ICMPv6 port unreachable
    closed = packets("udp-closed.pcap")
    assert len(closed) == 4
    assert (closed[1][0] >> 4, closed[1][9], closed[1][20], closed[1][21]) == (4, 1, 3, 3)
    assert (closed[3][0] >> 4, closed[3][6], closed[3][40], closed[3][41]) == (6, 58, 1, 4)
