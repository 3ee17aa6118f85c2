"""The offload TUN's vnet headers from the stack's own super-segments: built
from the layout the packet carries (GsoSegment), the same as from parsing it."""

from __future__ import annotations

import pytest

from netstack import StackConfig
from netstack.wire import tcp
from netstack.wire.templates import GsoSegment, TcpTemplate
from tun2xray.device import offload

A4, B4 = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
A6, B6 = bytes.fromhex("fd00" + "00" * 13 + "01"), bytes.fromhex("fd00" + "00" * 13 + "02")


def _fields(hdr):
    return (hdr[0], hdr[1], int.from_bytes(hdr[2:4], "little"), int.from_bytes(hdr[4:6], "little"),
            int.from_bytes(hdr[6:8], "little"), int.from_bytes(hdr[8:10], "little"))


@pytest.mark.parametrize("family", [4, 6])
def test_layout_from_the_packet_matches_the_parse(family):
    a, b = (A4, B4) if family == 4 else (A6, B6)
    hl = 20 if family == 4 else 40
    opts = tcp.build_options(ts=(1, 2))
    for cfg in (StackConfig(), StackConfig(checksum_offload=True)):
        tpl = TcpTemplate(family, a, b, 80, 40000, cfg)
        g = tpl.gso(tpl.build(1, 2, tcp.ACK, 100, opts, bytes(9000)), len(opts), 1000)
        plain = bytes(g)
        assert offload._layout(g) == offload._layout(plain) == (family, hl, hl + 32, len(g))
        hdr_g, buf_g = offload.gso_header(g, 1500)
        hdr_p, buf_p = offload.gso_header(plain, 1500)
        assert hdr_g == hdr_p and buf_g == buf_p
        assert _fields(hdr_g) == (1, 1 if family == 4 else 4, hl + 32, 1500 - hl - 32, hl, 16)
        # partial mode: the stack's own segment size, from the packet
        assert _fields(offload._gso_partial(g, 1500))[3] == 1000
        assert _fields(offload._gso_partial(plain, 1500))[3] == 1500 - hl - 32


def test_the_carried_layout_is_used_not_reparsed():
    tpl = TcpTemplate(4, A4, B4, 80, 40000, StackConfig(checksum_offload=True))
    g = tpl.gso(tpl.build(1, 2, tcp.ACK, 100, b"", bytes(4000)), 0, 1000)
    g.hdr_len = 52                     # what the device is told wins over the bytes
    assert offload._layout(g)[2] == 52
    bare = GsoSegment(bytes(g))        # a GsoSegment without a layout is parsed
    assert offload._layout(bare)[2] == 40
