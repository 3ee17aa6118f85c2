"""A replayed flow as a ladder diagram (`tun2xray replay --ladder FLOW --svg F`).

Two columns, the capture's client on the left and the stack on the right;
one arrow per packet in time order, left to right for what the client sent
(as fed to the stack: ACKs already moved into the stack's sequence space),
right to left for what the stack answered.  Each arrow is labelled with its
flags, relative sequence and acknowledgement numbers (the client's from its
ISN, the stack's from its own), the window field and the payload length.

The SVG is plain text written here: no plotting library.  Every arrow is a
``<line class="pkt ...">`` so a script can count them.
"""

from __future__ import annotations

from xml.sax.saxutils import escape

FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80
_FLAG_NAMES = ((SYN, "SYN"), (FIN, "FIN"), (RST, "RST"), (PSH, "PSH"), (ACK, "ACK"), (URG, "URG"),
               (ECE, "ECE"), (CWR, "CWR"))
M32 = 0xFFFFFFFF
MAX_ARROWS = 5000       # a longer flow is cut (and the picture says so)

ROW = 34
LEFT, RIGHT = 210, 790          # the two columns' x
TOP = 92
WIDTH = 1000


class LadderError(Exception):
    """FLOW names no flow of the capture: one line for the user."""


def flag_text(flags: int) -> str:
    """"SYN,ACK", "FIN,PSH,ACK", "RST" ... ("none" for no flag)."""
    names = [n for bit, n in _FLAG_NAMES if flags & bit]
    return ",".join(names) or "none"


def find_flow(flows, spec: str):
    """The flow FLOW names: its number in the report (1-based) or
    ``addr:port-addr:port`` (IPv6 as ``[addr]:port``; either order).
    Raises LadderError."""
    spec = spec.strip()
    if spec.isdigit():
        i = int(spec)
        if 1 <= i <= len(flows):
            return i, flows[i - 1]
        raise LadderError(f"--ladder {spec}: no such flow (the capture has {_flow_range(flows)})")
    from .replay.capture import _ip_text
    want = spec.replace(" ", "")
    for i, f in enumerate(flows, 1):
        c = _ip_text(f.family, f.key[0], f.key[1])
        s = _ip_text(f.family, f.key[2], f.key[3])
        if want in (f"{c}-{s}", f"{s}-{c}"):
            return i, f
    raise LadderError(f"--ladder {spec}: no flow between those endpoints "
                      f"(give a number from the report, or addr:port-addr:port; {_flow_range(flows)})")


def _flow_range(flows) -> str:
    if not flows:
        return "no flows"
    return "flow 1" if len(flows) == 1 else f"flows 1-{len(flows)}"


def _tcp_label(f, p, from_client: bool) -> str:
    if from_client:
        seq_base, ack_base = f.client_isn, f.stack_isn
    else:
        seq_base, ack_base = f.stack_isn, f.client_isn
    seq = (p.seq - seq_base) & M32 if seq_base is not None else p.seq
    parts = [flag_text(p.flags), f"seq={seq}"]
    if p.flags & ACK:
        parts.append(f"ack={(p.ack - ack_base) & M32}" if ack_base is not None else f"ack={p.ack}")
    parts.append(f"win={p.wnd}")
    parts.append(f"len={len(p.payload)}")
    return " ".join(parts)


def label(f, p, from_client: bool) -> str:
    """The text on one arrow."""
    if p.icmp is not None:
        return f"ICMP{'v6' if p.family == 6 else ''} type {p.icmp[0]} code {p.icmp[1]}"
    if p.proto == 6:
        return _tcp_label(f, p, from_client)
    if p.proto == 17:
        return f"UDP len={len(p.payload)}"
    return "malformed"


def ladder_svg(f, title: str) -> str:
    """The SVG document for one flow (f: a replay.Flow after run())."""
    rows = f.ladder[:MAX_ARROWS]
    cut = len(f.ladder) - len(rows)
    height = TOP + ROW * len(rows) + (70 if cut else 40)
    t0 = rows[0][0] if rows else 0.0
    out = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" font-family="monospace" font-size="12">',
        '<defs>',
        '<marker id="head-c" markerWidth="10" markerHeight="8" refX="9" refY="4" orient="auto">'
        '<path d="M0,0 L10,4 L0,8 z" fill="#1f5fbf"/></marker>',
        '<marker id="head-s" markerWidth="10" markerHeight="8" refX="9" refY="4" orient="auto">'
        '<path d="M0,0 L10,4 L0,8 z" fill="#2e8b3a"/></marker>',
        '<marker id="head-x" markerWidth="10" markerHeight="8" refX="9" refY="4" orient="auto">'
        '<path d="M0,0 L10,4 L0,8 z" fill="#c0392b"/></marker>',
        '</defs>',
        f'<rect x="0" y="0" width="{WIDTH}" height="{height}" fill="white"/>',
        f'<text x="{WIDTH // 2}" y="22" text-anchor="middle" font-size="14" font-weight="bold">'
        f'{escape(title)}</text>',
        f'<text x="{LEFT}" y="58" text-anchor="middle" font-weight="bold">client (capture)</text>',
        f'<text x="{RIGHT}" y="58" text-anchor="middle" font-weight="bold">stack (replay)</text>',
        '<text x="10" y="58" fill="#555">time</text>',
        f'<line x1="{LEFT}" y1="66" x2="{LEFT}" y2="{height - 20}" stroke="#444" stroke-width="2"/>',
        f'<line x1="{RIGHT}" y1="66" x2="{RIGHT}" y2="{height - 20}" stroke="#444" stroke-width="2"/>',
    ]
    for i, (ts, from_client, p, note) in enumerate(rows):
        ty = TOP + i * ROW          # label baseline; the arrow runs just below it
        y0, y1 = ty + 5, ty + 5 + ROW * 0.5
        x0, x1 = (LEFT, RIGHT) if from_client else (RIGHT, LEFT)
        if "dropped" in note or "discarded" in note:
            kind, color, dash = "x", "#c0392b", ' stroke-dasharray="6,4"'
        elif from_client:
            kind, color, dash = "c", "#1f5fbf", ' stroke-dasharray="3,3"' if note else ""
        else:
            kind, color, dash = "s", "#2e8b3a", ""
        cls = "pkt c2s" if from_client else "pkt s2c"
        text = label(f, p, from_client) + (f" ({note})" if note else "")
        out.append(f'<line class="{cls}" x1="{x0}" y1="{y0:.1f}" x2="{x1}" y2="{y1:.1f}" stroke="{color}" '
                   f'stroke-width="1.5"{dash} marker-end="url(#head-{kind})"/>')
        out.append(f'<text class="label" x="{(LEFT + RIGHT) // 2}" y="{ty}" text-anchor="middle" '
                   f'fill="{color}" stroke="white" stroke-width="3" paint-order="stroke">{escape(text)}</text>')
        out.append(f'<text class="time" x="10" y="{y0 + 4:.1f}" fill="#555">+{(ts - t0) * 1000:.3f} ms</text>')
    if cut:
        out.append(f'<text x="{WIDTH // 2}" y="{height - 30}" text-anchor="middle" fill="#c0392b">'
                   f'first {len(rows)} of {len(f.ladder)} packets shown</text>')
    out.append('</svg>')
    return "\n".join(out) + "\n"


def write_ladder(target: tuple, path: str, source: str) -> tuple:
    """Write the ladder of target = find_flow(...) to path; returns (number,
    flow, arrows drawn).  Raises OSError (cannot write)."""
    i, f = target
    title = f"{source}: flow {i}, {f.text()}: {f.outcome}"
    svg = ladder_svg(f, title)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(svg)
    return i, f, min(len(f.ladder), MAX_ARROWS)
