"""Replays of the captured real-client fixtures in pcaps/, checked against
the captures themselves (read independently here with dpkt), plus the
`tun2xray replay` CLI's exit statuses."""

from __future__ import annotations

import glob
import ipaddress
import io
import os
import re
import struct
import subprocess
import sys

import dpkt
import pytest

from tun2xray import replay as rp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PCAPS = sorted(glob.glob(os.path.join(ROOT, "pcaps", "*.pcap")))
M32 = 0xFFFFFFFF


# ------------------------------------------------------- independent reading

class Rec:
    """A flow as the capture shows it, assembled with dpkt."""

    def __init__(self, proto):
        self.proto = proto
        self.client_isn = self.server_isn = None
        self.client = {}          # relative offset -> bytes
        self.server = {}
        self.client_fin = None    # relative sequence number (ISN = 0) of the FIN
        self.server_fin = None
        self.refused = False
        self.rst = None           # "client" / "server": who reset the connection
        self.up = []              # UDP datagrams
        self.down = []
        self.icmp = None          # (type, code, quote) of the server's ICMP error
        self.first_raw = None     # the client's first packet


def _stream(parts: dict) -> bytes:
    out = bytearray()
    for off in sorted(parts):
        data = parts[off]
        if off > len(out):
            break                 # a hole: the stream ends here
        out[off:off + len(data)] = data
    return bytes(out)


def recorded_flows(path):
    """{(proto, client ip, client port, server ip, server port): Rec}, and
    the client's packets in order, read with dpkt (not with the replay's reader)."""
    flows = {}
    with open(path, "rb") as f:
        reader = dpkt.pcap.Reader(f)
        ethernet = reader.datalink() == dpkt.pcap.DLT_EN10MB    # tcpdump on a veth (offload-v4)
        for _ts, buf in reader:
            if ethernet:
                buf = bytes(dpkt.ethernet.Ethernet(buf).data)
            ip = dpkt.ip.IP(buf) if buf[0] >> 4 == 4 else dpkt.ip6.IP6(buf)
            l4 = ip.data
            if isinstance(l4, (dpkt.icmp.ICMP, dpkt.icmp6.ICMP6)):
                quote = bytes(l4)[8:]
                v = quote[0] >> 4
                hl = (quote[0] & 15) * 4 if v == 4 else 40
                src, dst = (quote[12:16], quote[16:20]) if v == 4 else (quote[8:24], quote[24:40])
                proto = quote[9] if v == 4 else quote[6]
                sport, dport = struct.unpack_from("!HH", quote, hl)
                flows[(proto, src, sport, dst, dport)].icmp = (l4.type, l4.code, quote)
                continue
            if isinstance(l4, dpkt.tcp.TCP):
                proto = 6
            elif isinstance(l4, dpkt.udp.UDP):
                proto = 17
            else:
                continue
            fwd = (proto, ip.src, l4.sport, ip.dst, l4.dport)
            rev = (proto, ip.dst, l4.dport, ip.src, l4.sport)
            if fwd in flows:
                rec, from_client = flows[fwd], True
            elif rev in flows:
                rec, from_client = flows[rev], False
            else:
                rec, from_client = flows.setdefault(fwd, Rec(proto)), True
            if rec.first_raw is None:
                rec.first_raw = bytes(buf)
            if proto == 17:
                (rec.up if from_client else rec.down).append(bytes(l4.data))
                continue
            syn, ack, fin, rst = (l4.flags & dpkt.tcp.TH_SYN, l4.flags & dpkt.tcp.TH_ACK,
                                  l4.flags & dpkt.tcp.TH_FIN, l4.flags & dpkt.tcp.TH_RST)
            if from_client:
                if syn:
                    rec.client_isn = l4.seq
                    continue
                if rst:
                    rec.rst = rec.rst or "client"
                    continue
                off = (l4.seq - rec.client_isn - 1) & M32
                if l4.data:
                    rec.client[off] = bytes(l4.data)
                if fin:
                    rec.client_fin = (l4.seq + len(l4.data) - rec.client_isn) & M32
            else:
                if syn and ack:
                    rec.server_isn = l4.seq
                    continue
                if rst:
                    if rec.server_isn is None:
                        rec.refused = True
                    else:
                        rec.rst = rec.rst or "server"
                    continue
                off = (l4.seq - rec.server_isn - 1) & M32
                if l4.data:
                    rec.server[off] = bytes(l4.data)
                if fin:
                    rec.server_fin = (l4.seq + len(l4.data) - rec.server_isn) & M32
    return flows


# ------------------------------------------------------------- the fixtures

def test_fixtures_exist():
    names = {os.path.basename(p) for p in PCAPS}
    for want in ("http-get-v4.pcap", "http-get-v6.pcap", "http-post-v4.pcap", "iperf3-v4.pcap",
                 "iperf3-reverse-v4.pcap", "dns-v4.pcap", "dns-v6.pcap", "tcp-refused.pcap", "udp-closed.pcap",
                 "http-post-loss-v4.pcap", "tcp-client-reset-v4.pcap", "offload-v4.pcap"):
        assert want in names
    for p in PCAPS:
        assert os.path.getsize(p) < 2 << 20


@pytest.fixture(scope="module")
def replays():
    cache = {}

    def get(path):
        if path not in cache:
            cache[path] = rp.replay_file(path)
        return cache[path]
    return get


@pytest.mark.parametrize("path", PCAPS, ids=os.path.basename)
def test_fixture_replays_like_the_recording(path, replays):
    r = replays(path)
    recs = recorded_flows(path)
    assert len(r.flows) == len(recs)
    assert r.bad_output == 0, "the stack emitted packets with bad checksums or lengths"
    assert r.unmatched_output == 0, "the stack emitted packets for no flow of the capture"
    # every packet fed (translated ones included) passed the stack's checksum checks
    assert not [k for k in list(r.stack.drops) + list(r.stack.tcp_drops) if "checksum" in k and
                (r.stack.drops.get(k) or r.stack.tcp_drops.get(k))]
    for f in r.flows:
        rec = recs[(f.proto, bytes(f.key[0]), f.key[1], bytes(f.key[2]), f.key[3])]
        assert f.ok, f"{f.text()}: {f.outcome} ({f.detail})"
        if f.proto == 17 and rec.icmp is not None:
            # refused in the recording by an ICMP port unreachable: the stack
            # delivered the datagram, then answered with the same ICMP error,
            # quoting the client's datagram
            assert f.outcome == "refused" and f.close_reason == "rejected"
            assert f.host_datagrams == rec.up[:1]
            errs = [rp.parse_ip(0, raw) for _, raw in r.output]
            errs = [q for q in errs if q.icmp is not None and q.dst == bytes(f.key[0])]
            assert [q.icmp for q in errs] == [rec.icmp[:2]]
            quote = bytes(errs[0].payload)
            assert quote[:28] == rec.first_raw[:28]
            continue
        if f.proto == 17:
            assert f.host_datagrams == rec.up          # every client datagram, exactly, in order
            assert f.stack_datagrams == rec.down       # every reply, exactly, to the right 5-tuple
            continue
        if rec.refused:
            assert f.outcome == "refused"
            assert f.syn_ack is None, "a refused connection must not see a SYN-ACK"
            assert f.close_reason == "rejected"
            assert [(a, fl & (rp.RST | rp.ACK)) for _, a, fl in f.stack_rst] == [((rec.client_isn + 1) & M32, rp.RST | rp.ACK)]
            continue
        # handshake: the SYN-ACK acknowledges the client's ISN + 1
        assert f.syn_ack is not None and f.syn_ack[1] == (rec.client_isn + 1) & M32
        client, server = _stream(rec.client), _stream(rec.server)
        got, sent = bytes(f.received), f.stack_stream.contiguous()
        assert f.stack_stream.conflicts == 0
        assert f.window_violations == 0, "the stack sent beyond the client's window"
        # the stack never acknowledges beyond what the client had sent
        for ack, client_sent in f.stack_acks:
            assert ack <= client_sent, (ack, client_sent)
        if rec.rst:
            # a client's RST closes the connection ("reset"); the recorded
            # server's RST is mirrored by the host's abort() ("aborted")
            assert f.close_reason == ("reset" if rec.rst == "client" else "aborted")
            assert client.startswith(got) and server.startswith(sent)
            if rec.rst == "server":
                assert got == client     # the server had read it all before its RST
            else:
                assert f.stack_rst == [], "no RST answers a RST"
            continue
        assert got == client, "every client byte reaches the host, in order"
        assert sent == server, "the stack sends exactly the recorded server's bytes"
        assert rec.client_fin is not None and rec.server_fin is not None
        assert f.close_reason == "closed"
        assert f.stack_fin == len(server)
        # the last ACK acknowledges the client's FIN
        assert f.stack_acks[-1][0] == rec.client_fin + 1


def test_every_fixture_through_the_cli(capsys):
    from tun2xray.cli import main
    assert main(["replay", *PCAPS]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if re.match(r"\s+\d+ (tcp|udp) ", ln)]
    assert len(lines) == sum(len(recorded_flows(p)) for p in PCAPS)
    for ln in lines:
        assert re.search(r"  (completed|refused as recorded|reset as recorded)  \(", ln), ln
    # a refusal is not summarised as a completion
    assert re.search(r"^  2 flows: 0 completed, 2 refused as recorded, 0 not completed$", out, re.M), out
    assert re.search(r"^  2 flows: 1 completed, 1 reset as recorded, 0 not completed$", out, re.M), out
    # the stack's drops as a sorted summary, not a Python dict
    assert "{" not in out
    drops = re.findall(r"^  drops: (.*)$", out, re.M)
    assert len(drops) == len(PCAPS)
    for d in drops:
        assert d == "none" or re.fullmatch(r"[a-z0-9_.]+ \d+(, [a-z0-9_.]+ \d+)*", d), d
    # the client's RSTs for segments in flight after its abort find no flow any more
    assert re.search(r"^  drops: tcp_rst_no_flow \d+$", out, re.M), out


def test_reset_flow_is_reported_as_recorded(replays):
    r = replays(os.path.join(ROOT, "pcaps", "iperf3-v4.pcap"))
    data = max(r.flows, key=lambda f: len(f.client_stream))
    # iperf3's server closes the data connection with a RST after reading it all
    assert data.expected == "reset" and data.rec_rst == "server"
    assert bytes(data.received) == data.client_stream and len(data.received) >= 512 * 1024
    assert data.close_reason == "aborted"


# ------------------------------------------------------------- SACK / reorder

def _swap_client_segments(packets, skip=3):
    """Swap two adjacent client data segments of the first TCP flow (keeping
    timestamps in order): the stack then sees a hole and must SACK."""
    parsed = [rp.parse_ip(ts, raw) for ts, raw in packets]
    client = next(p for p in parsed if p.proto == 6 and p.flags & rp.SYN and not p.flags & rp.ACK)
    idx = [i for i, p in enumerate(parsed)
           if p.proto == 6 and (p.src, p.sport) == (client.src, client.sport) and len(p.payload) > 0]
    i, j = idx[skip], idx[skip + 1]
    out = list(packets)
    out[i], out[j] = (packets[i][0], packets[j][1]), (packets[j][0], packets[i][1])
    return out, parsed[i], parsed[j]


def test_reordered_upload_is_sacked_and_reassembled():
    path = os.path.join(ROOT, "pcaps", "http-post-v4.pcap")
    packets, first, second = _swap_client_segments(rp.read_pcap(path))
    r = rp.Replay(packets).run()
    (f,) = r.flows
    assert f.ok, f.outcome
    assert bytes(f.received) == f.client_stream
    hole = (first.seq - f.client_isn) & M32
    block = ((second.seq - f.client_isn) & M32, (second.seq - f.client_isn + len(second.payload)) & M32)
    # the segment that came early was acknowledged selectively, the hole cumulatively
    assert any(ack == hole and block in blocks for ack, blocks, _ in f.stack_sacks), f.stack_sacks[:5]
    assert hole in {a for a, _ in f.stack_acks}


# ------------------------------------------------- translation across 2**32

def test_ack_translation_wraps_and_is_lowered_to_what_the_stack_sent():
    # client packet acking 1000 bytes of a recorded server whose ISN is just
    # below 2**32, while the stack (ISN just below 2**32 too, elsewhere) has
    # sent only 500: the ACK becomes stack ISN + 500 (wrapped), with a valid checksum
    from netstack.wire.tcp import build_options
    from netstack.wire.templates import TcpTemplate
    from netstack import StackConfig
    cli, srv = bytes([10, 77, 1, 2]), bytes([10, 77, 0, 10])
    server_isn, stack_isn, client_isn = M32 - 100, M32 - 10, M32 - 3
    tpl = TcpTemplate(4, cli, srv, 40000, 80, StackConfig())
    opts = build_options(ts=(111, 222), sack=[((server_isn + 600) & M32, (server_isn + 900) & M32)])
    raw = tpl.build((client_isn + 1) & M32, (server_isn + 1000) & M32, rp.ACK, 500, opts, b"")
    p = rp.parse_ip(1.0, raw)
    f = rp.Flow(6, 4, (cli, 40000, srv, 80), p)
    f.client_isn, f.server_isn, f.stack_isn, f.snd_max, f.stack_tsval = client_isn, server_isn, stack_isn, 500, 777
    out = rp.Replay([])._translate(f, p)
    q = rp.parse_ip(1.0, out)
    assert q.ack == (stack_isn + 500) & M32 == 489
    assert f.lowered == 1 and f.ack_target == 1000 and f.acked_to_stack == 500
    o = rp.tcp_options(q.opts)
    assert o[8][1] == (111, 777)
    assert o[5][1] == [((stack_isn + 500) & M32, (stack_isn + 500) & M32)]   # lowered too
    assert rp._checksum_ok(q)


# ----------------------------------------------------------- reading pcaps

def _pcap(linktype, frames, nano=False, order="<"):
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    out = [struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, 65535, linktype)]
    for i, fr in enumerate(frames):
        out.append(struct.pack(order + "IIII", 1000 + i, 500, len(fr), len(fr)) + fr)
    return b"".join(out)


def test_read_pcap_link_types_and_byte_orders(tmp_path):
    ref = rp.read_pcap(os.path.join(ROOT, "pcaps", "dns-v4.pcap"))
    ips = [raw for _, raw in ref]
    eth = [b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip for ip in ips]
    vlan = [b"\x02" * 6 + b"\x04" * 6 + b"\x81\x00\x00\x07\x08\x00" + ip for ip in ips]
    sll = [b"\x00" * 14 + b"\x08\x00" + ip for ip in ips]
    sll2 = [b"\x08\x00" + b"\x00" * 18 + ip for ip in ips]
    arp = b"\xff" * 6 + b"\x04" * 6 + b"\x08\x06" + b"\x00" * 28   # no IP inside: skipped
    null = [b"\x02\x00\x00\x00" + ip for ip in ips]
    for i, (lt, frames, nano, order) in enumerate([(101, ips, False, ">"), (1, eth, True, "<"), (1, vlan, False, "<"),
                                                   (113, sll, False, "<"), (0, null, False, ">"),
                                                   (276, sll2, False, "<"), (1, [arp] + eth, False, "<")]):
        p = tmp_path / f"x{i}.pcap"
        p.write_bytes(_pcap(lt, frames, nano, order))
        got = rp.read_pcap(str(p))
        assert [raw for _, raw in got] == ips
        assert got[0][0] == pytest.approx(1000 + (500e-9 if nano else 500e-6) + (frames[0] is arp))


def test_read_pcapng(tmp_path):
    ref = rp.read_pcap(os.path.join(ROOT, "pcaps", "dns-v6.pcap"))
    p = tmp_path / "x.pcapng"
    with open(p, "wb") as fh:
        w = dpkt.pcapng.Writer(fh, linktype=101)
        for ts, raw in ref:
            w.writepkt(raw, ts=ts)
    got = rp.read_pcap(str(p))
    assert [raw for _, raw in got] == [raw for _, raw in ref]
    assert got[-1][0] == pytest.approx(ref[-1][0], abs=1e-6)
    r = rp.Replay(got).run()
    assert len(r.flows) == 2 and all(f.ok for f in r.flows)


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tun2xray", "replay", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("content", [
    pytest.param(b"this is not a capture at all\n" * 10, id="garbage"),
    pytest.param(b"", id="empty"),
    pytest.param(b"\xd4\xc3\xb2\xa1\x02\x00", id="short-header"),
    pytest.param("truncated", id="truncated"),
    pytest.param("cut-header", id="cut-record-header"),
    pytest.param("linktype", id="unknown-linktype"),
])
def test_cli_malformed_file_exits_2_with_one_line(tmp_path, content):
    good = open(os.path.join(ROOT, "pcaps", "http-get-v4.pcap"), "rb").read()
    if content == "truncated":
        content = good[:len(good) // 2]
    elif content == "cut-header":
        content = _pcap(101, [b"\x45" + b"\x00" * 39]) + b"\x00" * 7
    elif content == "linktype":
        content = _pcap(147, [b"\x45" + b"\x00" * 39])
    p = tmp_path / "bad.pcap"
    p.write_bytes(content)
    r = _run_cli(str(p))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.pcap" in lines[0] and "Traceback" not in r.stderr
    assert r.stdout == ""


def test_cli_missing_file_exits_2(tmp_path):
    r = _run_cli(str(tmp_path / "nope.pcap"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope.pcap" in lines[0]


def test_cli_exit_1_when_a_flow_does_not_complete(tmp_path, capsys):
    # the client's FIN and everything after it never arrive: the flow is open
    # at the end, so the replay cannot call it completed
    packets = rp.read_pcap(os.path.join(ROOT, "pcaps", "http-get-v6.pcap"))
    keep = packets[:len(packets) // 2]
    p = tmp_path / "half.pcap"
    with open(p, "wb") as fh:
        w = dpkt.pcap.Writer(fh, linktype=101)
        for ts, raw in keep:
            w.writepkt(raw, ts=ts)
    from tun2xray.cli import main
    assert main(["replay", str(p)]) == 1
    assert "incomplete" in capsys.readouterr().out


def test_garbage_packets_inside_a_good_file_are_counted_not_fatal(tmp_path, capsys):
    packets = rp.read_pcap(os.path.join(ROOT, "pcaps", "dns-v6.pcap"))
    junk = [(packets[0][0], b"\x45\x00\x00\x10garbage"), (packets[0][0], b"\x99" * 30), (packets[0][0], b"")]
    r = rp.Replay(junk + packets).run()
    assert r.stray == 3 and all(f.ok for f in r.flows)
    assert sum(r.stack.drops.values()) >= 3


def test_slower_sender_gets_the_clients_acks_when_it_catches_up():
    # with a small send buffer the stack sends the 512 KB download more slowly
    # than the recorded kernel did: ACKs from the recording's future are
    # lowered to what the stack had sent, the rest is acknowledged by pure
    # ACKs synthesized once the stack sends it, and the flow still completes
    from netstack import StackConfig
    path = os.path.join(ROOT, "pcaps", "iperf3-reverse-v4.pcap")
    r = rp.Replay(rp.read_pcap(path), StackConfig(verify_checksums=True, snd_buf=8192)).run()
    assert all(f.ok for f in r.flows), [(f.outcome, f.detail) for f in r.flows]
    data = max(r.flows, key=lambda f: len(f.server_stream))
    assert data.lowered > 0 and data.synthesized > 0
    assert data.stack_stream.contiguous() == data.server_stream and len(data.server_stream) == 512 * 1024
    for ack, client_sent in data.stack_acks:
        assert ack <= client_sent
    assert r.bad_output == 0


def _recorded_sacks(path):
    """Left edges of the SACK blocks the recorded server sent, and the
    cumulative ACKs that carried them, relative to the client's ISN."""
    isn, edges, acks = None, set(), set()
    with open(path, "rb") as fh:
        for _ts, buf in dpkt.pcap.Reader(fh):
            tcp = dpkt.ip.IP(buf).data
            if tcp.flags & dpkt.tcp.TH_SYN and not tcp.flags & dpkt.tcp.TH_ACK:
                isn = tcp.seq
            for kind, val in dpkt.tcp.parse_opts(tcp.opts):
                if kind == dpkt.tcp.TCP_OPT_SACK:
                    acks.add((tcp.ack - isn) & M32)
                    edges.update((struct.unpack_from("!I", val, i)[0] - isn) & M32 for i in range(0, len(val), 8))
    return edges, acks


def test_lost_client_segments_are_sacked_like_the_recorded_server_did():
    # the client's 10th, 11th and 30th data segments were lost in the capture
    # (tools/capture_pcaps.py): the recorded Linux server SACKed what came after
    # each hole; the stack must do the same, keep its cumulative ACK at the
    # hole, and take the client's retransmissions to complete the upload
    path = os.path.join(ROOT, "pcaps", "http-post-loss-v4.pcap")
    r = rp.replay_file(path)
    (f,) = r.flows
    assert f.ok, f.outcome
    assert bytes(f.received) == f.client_stream and len(f.client_stream) > 100_000
    assert f.stack_sacks, "no SACK blocks"
    recorded, recorded_holes = _recorded_sacks(path)
    assert len(recorded) == 2 and len(recorded_holes) == 3
    assert {blocks[0][0] for _, blocks, _ in f.stack_sacks} == recorded
    for ack, blocks, client_sent in f.stack_sacks:
        for left, right in blocks:
            # a block lies above the cumulative ACK and within what the client sent
            assert ack < left < right <= client_sent, (ack, blocks, client_sent)
    # the cumulative ACKs that carried SACK blocks: the start of each hole,
    # as it shrank with the client's retransmissions (as the recording shows)
    assert {ack for ack, _, _ in f.stack_sacks} == recorded_holes


def _mangle(packets, rnd):
    """Damage about one packet in ten: a byte flipped (checksum left wrong, or
    recomputed so that the damage reaches the TCP state machine), a truncation,
    or a loss."""
    out = []
    for ts, raw in packets:
        raw = bytearray(raw)
        x = rnd.random()
        if x < 0.04:
            p = rp.parse_ip(ts, bytes(raw))
            if p.proto == 6:
                i = rnd.randrange(p.l4 + 4, p.l4 + p.doff)
                if not p.l4 + 16 <= i < p.l4 + 18:
                    raw[i] = rnd.randrange(256)
                q = rp.parse_ip(ts, bytes(raw))
                if q.proto == 6:
                    rp._fix_tcp_checksum(raw, q.family, q.l4)
        elif x < 0.07:
            raw[rnd.randrange(len(raw))] = rnd.randrange(256)
        elif x < 0.09:
            raw = raw[:rnd.randrange(len(raw))]
        elif x < 0.10:
            continue
        out.append((ts, bytes(raw)))
    return out


@pytest.mark.parametrize("seed", range(4))
def test_damaged_captures_never_break_the_stack_or_the_replay(seed):
    import random
    rnd = random.Random(seed)
    for path in PCAPS:
        r = rp.Replay(_mangle(rp.read_pcap(path), rnd)).run()
        rp.report(path, r, out=io.StringIO())
        assert r.bad_output == 0
        for f in r.flows:
            assert f.outcome
            if f.proto == 6:
                for ack, client_sent in f.stack_acks:
                    assert ack <= client_sent


def test_a_reused_four_tuple_is_a_second_connection():
    # the refused SYN again, later, from the same port with a new ISN, this
    # time answered: two flows, the first refused, the second completed
    packets = rp.read_pcap(os.path.join(ROOT, "pcaps", "tcp-refused.pcap"))[:2]
    syn = rp.parse_ip(0, packets[0][1])
    get = rp.read_pcap(os.path.join(ROOT, "pcaps", "http-get-v4.pcap"))
    g = rp.parse_ip(0, get[0][1])
    t0 = packets[-1][0] + 1 - get[0][0]
    # move the GET's packets onto the refused connection's 4-tuple
    moved = []
    for ts, raw in get:
        buf = bytearray(raw)
        p = rp.parse_ip(ts, raw)
        if (p.src, p.sport) == (g.src, g.sport):
            struct.pack_into("!HH", buf, p.l4, syn.sport, syn.dport)
        else:
            struct.pack_into("!HH", buf, p.l4, syn.dport, syn.sport)
        rp._fix_tcp_checksum(buf, 4, p.l4)
        moved.append((ts + t0, bytes(buf)))
    r = rp.Replay(packets + moved).run()
    assert [f.outcome for f in r.flows] == ["refused", "completed"]
    assert bytes(r.flows[1].received) == r.flows[1].client_stream


def test_cli_json_output(capsys):
    import json
    from tun2xray.cli import main
    assert main(["replay", "--json", *PCAPS]) == 0
    docs = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert [d["file"] for d in docs] == PCAPS
    for d in docs:
        assert d["ok"] and d["bad_output"] == 0 and d["flows"]
        for fl in d["flows"]:
            assert fl["ok"] and fl["outcome"] in ("completed", "refused", "reset")
            if fl["proto"] == "tcp" and fl["outcome"] == "completed" and fl["expected"] == "closed":
                assert fl["up"] == fl["up_recorded"] and fl["down"] == fl["down_recorded"]


def test_stack_respects_a_small_client_window():
    # the download's client advertises 4 KiB (window field 4 << 10) instead of
    # ~64 KiB+: the stack may keep at most that much unacknowledged, so it
    # needs many more round trips (ACKs lowered, then synthesized) but sends
    # every byte, in order, and never beyond the window
    path = os.path.join(ROOT, "pcaps", "iperf3-reverse-v4.pcap")
    packets = rp.read_pcap(path)
    parsed = [rp.parse_ip(ts, raw) for ts, raw in packets]
    data_syn = [p for p in parsed if p.proto == 6 and p.flags & rp.SYN and not p.flags & rp.ACK][1]
    out = []
    for (ts, raw), p in zip(packets, parsed):
        if (p.src, p.sport) == (data_syn.src, data_syn.sport) and not p.flags & rp.SYN:
            buf = bytearray(raw)
            struct.pack_into("!H", buf, p.l4 + 14, 4)
            rp._fix_tcp_checksum(buf, 4, p.l4)
            raw = bytes(buf)
        out.append((ts, raw))
    r = rp.Replay(out).run()
    f = next(f for f in r.flows if f.key[1] == data_syn.sport)
    assert f.ok, (f.outcome, f.detail)
    assert f.wscale == 10 and f.window_violations == 0
    assert f.stack_stream.contiguous() == f.server_stream and len(f.server_stream) == 512 * 1024
    assert f.synthesized > 20


class _NearWrapRng:
    """ISNs and timestamp offsets just below 2**32 (anything else: seeded)."""

    def __init__(self):
        import random
        self._r = random.Random(7)

    def getrandbits(self, k):
        return (1 << 32) - 30_000 if k == 32 else self._r.getrandbits(k)

    def __getattr__(self, name):
        return getattr(self._r, name)


def _shift_client_isn(packets, new_isn):
    """Move the client's sequence space (and the server's ACKs/SACKs of it)
    so that its ISN is *new_isn*; checksums recomputed."""
    parsed = [rp.parse_ip(ts, raw) for ts, raw in packets]
    syn = next(p for p in parsed if p.proto == 6 and p.flags & rp.SYN and not p.flags & rp.ACK)
    delta = (new_isn - syn.seq) & M32
    out = []
    for (ts, raw), p in zip(packets, parsed):
        buf = bytearray(raw)
        if p.proto == 6:
            if (p.src, p.sport) == (syn.src, syn.sport):
                struct.pack_into("!I", buf, p.l4 + 4, (p.seq + delta) & M32)
            elif p.flags & rp.ACK:
                struct.pack_into("!I", buf, p.l4 + 8, (p.ack + delta) & M32)
                sack = rp.tcp_options(p.opts).get(5)
                if sack:
                    i, blocks = sack
                    for j, (a, b) in enumerate(blocks):
                        struct.pack_into("!II", buf, p.l4 + 20 + i + 2 + 8 * j, (a + delta) & M32, (b + delta) & M32)
            rp._fix_tcp_checksum(buf, p.family, p.l4)
        out.append((ts, bytes(buf)))
    return out


@pytest.mark.parametrize("name", ["http-get-v4.pcap", "http-post-loss-v4.pcap", "http-get-v6.pcap"])
def test_sequence_numbers_wrapping_past_2_32(name):
    # both the client's ISN and the stack's ISN sit 30,000 below 2**32: the
    # upload and the download (and the SACK blocks of the lossy upload) cross
    # the wrap, and the replay must still come out byte for byte
    packets = _shift_client_isn(rp.read_pcap(os.path.join(ROOT, "pcaps", name)), (1 << 32) - 30_000)
    r = rp.Replay(packets, rng=_NearWrapRng()).run()
    (f,) = r.flows
    assert f.client_isn == (1 << 32) - 30_000 and f.stack_isn == (1 << 32) - 30_000
    assert f.ok, (f.outcome, f.detail)
    assert bytes(f.received) == f.client_stream and f.stack_stream.contiguous() == f.server_stream
    assert f.stack_acks[-1][0] == f.rec_client_fin + 2       # FIN + 1, relative to the ISN
    for ack, client_sent in f.stack_acks:
        assert ack <= client_sent
    if "loss" in name:
        assert f.stack_sacks and all(ack < left < right <= sent for ack, blocks, sent in f.stack_sacks
                                     for left, right in blocks)


# ------------------------------------------- captures with offloaded checksums

OFFLOAD = os.path.join(ROOT, "pcaps", "offload-v4.pcap")


def _offloaded_client_packets(path):
    """(TCP, UDP) counts of the client's packets whose transport checksum is
    wrong, and how many of those hold exactly the pseudo-header sum, read
    with dpkt (which recomputes a checksum when the field is zeroed)."""
    bad = {6: 0, 17: 0}
    partial = 0
    client = None
    with open(path, "rb") as fh:
        for _ts, frame in dpkt.pcap.Reader(fh):
            ip = dpkt.ethernet.Ethernet(frame).data
            l4 = ip.data
            if client is None:
                client = ip.src       # the capture starts with the client's SYN
            if ip.src != client or not isinstance(l4, (dpkt.tcp.TCP, dpkt.udp.UDP)):
                continue
            field = l4.sum
            l4.sum = 0
            ip.sum = 0
            ip.data = l4
            good = dpkt.ip.IP(bytes(ip)).data.sum
            if field != good:
                bad[ip.p] += 1
                seg_len = len(bytes(l4))
                ps = sum(struct.unpack("!HHHH", ip.src + ip.dst)) + ip.p + seg_len
                while ps > 0xFFFF:
                    ps = (ps & 0xFFFF) + (ps >> 16)
                partial += field == ps
    return bad[6], bad[17], partial


def test_offloaded_fixture_is_what_tcpdump_wrote_with_offloads_on():
    with open(OFFLOAD, "rb") as fh:
        rd = dpkt.pcap.Reader(fh)
        assert rd.datalink() == dpkt.pcap.DLT_EN10MB       # tcpdump on the veth, not our writer
        sizes = [len(dpkt.ethernet.Ethernet(buf).data) for _, buf in rd]
    tcp, udp, partial = _offloaded_client_packets(OFFLOAD)
    # every client packet left the stack with only the pseudo-header sum (tx
    # checksum offload), and the server's segments came as GRO/TSO super-segments
    assert tcp >= 5 and udp == 1 and partial == tcp + udp
    assert max(sizes) > 1500


def test_offloaded_capture_replays_in_auto_mode(capsys):
    r = rp.replay_file(OFFLOAD)
    tcp, udp, _ = _offloaded_client_packets(OFFLOAD)
    assert [f.proto for f in r.flows] == [6, 17]
    assert all(f.ok and f.outcome == "completed" for f in r.flows), [(f.outcome, f.detail) for f in r.flows]
    assert r.checksums.completed == tcp + udp and r.checksums.partial == tcp + udp
    assert r.checksums.offloaded == [bytes(r.flows[0].key[0])]
    assert not any(v for k, v in r.stack.drops.items() if "checksum" in k)
    http, dns = r.flows
    assert http.client_stream.startswith(b"GET /blob?size=60000 ") and len(http.server_stream) > 60000
    from tun2xray.cli import main
    assert main(["replay", OFFLOAD]) == 0
    out = capsys.readouterr().out
    assert "2 flows: 2 completed, 0 not completed" in out
    # the report says what it did to the capture
    assert (f"checksums (auto): {tcp} TCP and {udp} UDP client packets had offloaded (pseudo-header sum "
            f"only) checksums; {tcp + udp} completed before the replay") in out
    assert "  drops: none" in out and "hint" not in out


def test_offloaded_capture_fails_with_a_hint_under_verify():
    tcp, udp, _ = _offloaded_client_packets(OFFLOAD)
    r = _run_cli("--checksums", "verify", OFFLOAD)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "no SYN-ACK from the stack" in r.stdout
    assert f"  drops: bad_tcp_checksum {tcp}, bad_udp_checksum {udp}\n" in r.stdout
    assert (f"  hint: {tcp} packets had bad TCP checksums, {udp} had bad UDP checksums: capture taken with "
            "checksum offload? try --checksums ignore\n") in r.stdout
    assert _run_cli("--checksums", "ignore", OFFLOAD).returncode == 0
    js = _run_cli("--json", "--checksums", "verify", OFFLOAD)
    import json
    d = json.loads(js.stdout)
    assert d["checksums"]["mode"] == "verify" and d["checksums"]["bad_tcp"] == tcp and not d["ok"]
    assert d["drops"] == {"bad_tcp_checksum": tcp, "bad_udp_checksum": udp} and "--checksums ignore" in d["hint"]


def test_auto_mode_leaves_stray_damage_alone():
    # one client data segment with a flipped payload byte (checksum now
    # wrong, IP header right) in an otherwise clean capture is damage, not
    # offload: auto feeds it as captured, the stack drops it and the upload
    # cannot complete; ignore completes it, and the byte reaches the host
    packets = rp.read_pcap(os.path.join(ROOT, "pcaps", "http-post-v4.pcap"))
    parsed = [rp.parse_ip(ts, raw) for ts, raw in packets]
    client = parsed[0].src
    i = [k for k, p in enumerate(parsed) if p.proto == 6 and p.src == client and len(p.payload) > 100][5]
    buf = bytearray(packets[i][1])
    buf[-1] ^= 0x55
    packets[i] = (packets[i][0], bytes(buf))
    auto = rp.Replay(packets).run()
    assert auto.checksums.bad_tcp == 1 and auto.checksums.completed == 0 and auto.checksums.offloaded == []
    assert auto.stack.drops["bad_tcp_checksum"] == 1
    (f,) = auto.flows
    assert not f.ok and "client bytes" in f.outcome
    ignore = rp.Replay(packets, checksums="ignore").run()
    assert ignore.checksums.completed == 1 and ignore.stack.drops["bad_tcp_checksum"] == 0
    (f,) = ignore.flows
    assert f.ok and bytes(f.received) == f.client_stream
    end = (parsed[i].seq - f.client_isn - 1 + len(parsed[i].payload)) & M32
    assert f.received[end - 1] == parsed[i].payload[-1] ^ 0x55


def test_checksum_mode_is_checked():
    with pytest.raises(ValueError):
        rp.Replay([], checksums="maybe")
    r = _run_cli("--checksums", "maybe", OFFLOAD)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_drops_text():
    assert rp.drops_text({}) == "drops: none"
    assert rp.drops_text({"truncated": 2, "bad_tcp_checksum": 12, "bad_length": 2}) == \
        "drops: bad_tcp_checksum 12, bad_length 2, truncated 2"


# ------------------------------------------------------------- ladder diagram

def _ladder(tmp_path, flow, path=OFFLOAD, *extra):
    svg = tmp_path / "out.svg"
    r = _run_cli("--ladder", flow, "--svg", str(svg), *extra, path)
    return r, svg


def _arrows(svg):
    import xml.etree.ElementTree as ET
    root = ET.parse(svg).getroot()
    ns = "{http://www.w3.org/2000/svg}"
    lines = [e for e in root.iter(ns + "line") if e.get("class", "").startswith("pkt")]
    labels = [e.text for e in root.iter(ns + "text") if e.get("class") == "label"]
    return lines, labels


def test_ladder_draws_every_packet_of_a_flow(tmp_path):
    r, svg = _ladder(tmp_path, "1")
    assert r.returncode == 0, r.stderr
    lines, labels = _arrows(svg)
    rep = rp.replay_file(OFFLOAD)
    f = rep.flows[0]
    c, cport, s, sport = (bytes(x) if isinstance(x, (bytes, memoryview)) else x for x in f.key)
    # what the capture's client sent (read with dpkt), what the stack sent back
    with open(OFFLOAD, "rb") as fh:
        sent = sum(1 for _, fr in dpkt.pcap.Reader(fh)
                   if (lambda ip: ip.src == c and isinstance(ip.data, dpkt.tcp.TCP) and ip.data.sport == cport)(
                       dpkt.ethernet.Ethernet(fr).data))
    answered = [q for q in (rp.parse_ip(0, raw) for _, raw in rep.output)
                if q.proto == 6 and (q.src, q.sport, q.dst, q.dport) == (s, sport, c, cport)]
    assert len(lines) == len(labels) == sent + f.synthesized + len(answered)
    assert sum(e.get("class") == "pkt c2s" for e in lines) == sent + f.synthesized
    assert sum(e.get("class") == "pkt s2c" for e in lines) == len(answered)
    # the handshake and the close, with relative sequence numbers
    assert labels[0].startswith("SYN seq=0 win=") and labels[1].startswith("SYN,ACK seq=0 ack=1 ")
    assert any(lb.startswith("FIN,") for lb in labels)
    assert f"{len(lines)} packets) written to {svg}" in r.stdout


def test_ladder_by_endpoints_and_udp(tmp_path):
    rep = rp.replay_file(OFFLOAD)
    dns = rep.flows[1]
    c = f"{ipaddress.ip_address(bytes(dns.key[0]))}:{dns.key[1]}"
    s = f"{ipaddress.ip_address(bytes(dns.key[2]))}:{dns.key[3]}"
    r, svg = _ladder(tmp_path, f"{s}-{c}")
    assert r.returncode == 0, r.stderr
    lines, labels = _arrows(svg)
    assert [e.get("class") for e in lines] == ["pkt c2s", "pkt s2c"]
    assert labels[0].startswith("UDP len=")


def test_ladder_of_a_refused_flow_shows_the_rst(tmp_path):
    r, svg = _ladder(tmp_path, "2", os.path.join(ROOT, "pcaps", "tcp-refused.pcap"))
    assert r.returncode == 0, r.stderr
    _, labels = _arrows(svg)
    assert labels[0].startswith("SYN ") and labels[1].startswith("RST,ACK ")


@pytest.mark.parametrize("flow", ["3", "0", "10.0.0.1:1-10.0.0.2:2", "nonsense"])
def test_ladder_unknown_flow_is_one_line(tmp_path, flow):
    r, svg = _ladder(tmp_path, flow)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"--ladder {flow}" in lines[0] and "flows 1-2" in lines[0]
    assert not svg.exists()


def test_ladder_needs_svg_and_one_capture(tmp_path):
    r = _run_cli("--ladder", "1", OFFLOAD)
    assert r.returncode == 2 and "--svg" in r.stderr
    r = _run_cli("--ladder", "1", "--svg", str(tmp_path / "x.svg"), OFFLOAD, OFFLOAD)
    assert r.returncode == 2 and "one" in r.stderr
