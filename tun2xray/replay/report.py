"""The replay's output and command: the text report and the JSON of each
capture (summary, stack drops, checksum hint, flow_dict), replay_file and
main, which `tun2xray replay` runs."""

from __future__ import annotations

import sys
import traceback

from netstack import StackConfig

from .capture import ReplayError, _ip_text, read_pcap
from .host import Replay


# ------------------------------------------------------------------ CLI

def replay_file(path, config: StackConfig | None = None, checksums: str = "auto") -> Replay:
    return Replay(read_pcap(path), config, checksums=checksums).run()


# how a flow that did what the recording shows is named in the text report
OUTCOME_TEXT = {"completed": "completed", "refused": "refused as recorded", "reset": "reset as recorded"}


def summary(r: Replay) -> dict:
    """Counts of the flows' outcomes: completed / refused / reset (each as
    recorded) and not_completed."""
    out = {"completed": 0, "refused": 0, "reset": 0, "not_completed": 0}
    for f in r.flows:
        out[f.outcome if f.ok else "not_completed"] += 1
    return out


def stack_drops(r: Replay) -> dict:
    """The stack's non-zero drop counters (TCP ones prefixed "tcp.")."""
    drops = {k: v for k, v in r.stack.drops.items() if v}
    drops.update({"tcp." + k: v for k, v in r.stack.tcp_drops.items() if v})
    return drops


def drops_text(drops: dict) -> str:
    """"drops: bad_tcp_checksum 12, truncated 2" (largest first), or "drops: none"."""
    if not drops:
        return "drops: none"
    items = sorted(drops.items(), key=lambda kv: (-kv[1], kv[0]))
    return "drops: " + ", ".join(f"{k} {v}" for k, v in items)


def checksum_hint(r: Replay) -> str | None:
    """Why flows failed, when bad client checksums are the likely cause."""
    drops = r.stack.drops
    tcp, udp = drops.get("bad_tcp_checksum", 0), drops.get("bad_udp_checksum", 0)
    if not (tcp or udp) or all(f.ok for f in r.flows):
        return None
    what = ", ".join(x for x in (f"{tcp} packets had bad TCP checksums" if tcp else "",
                                 f"{udp} {'had' if tcp else 'packets had'} bad UDP checksums" if udp else "") if x)
    if r.checksums.mode == "ignore":
        return f"hint: {what} even with --checksums ignore: a damaged capture?"
    return f"hint: {what}: capture taken with checksum offload? try --checksums ignore"


def report(path, r: Replay, out=None) -> bool:
    out = out or sys.stdout
    print(f"{path}:", file=out)
    width = len(str(len(r.flows)))
    for i, f in enumerate(r.flows, 1):
        label = OUTCOME_TEXT.get(f.outcome, f.outcome) if f.ok else f.outcome
        print(f"  {i:>{width}} {f.text():52s} {label}  ({f.detail})", file=out)
    c = summary(r)
    parts = [f"{c['completed']} completed"]
    if c["refused"]:
        parts.append(f"{c['refused']} refused as recorded")
    if c["reset"]:
        parts.append(f"{c['reset']} reset as recorded")
    parts.append(f"{c['not_completed']} not completed")
    extra = f", {r.stray} packets outside flows" if r.stray else ""
    if r.bad_output:
        extra += f", {r.bad_output} malformed packets from the stack"
    print(f"  {len(r.flows)} flows: {', '.join(parts)}{extra}", file=out)
    line = r.checksums.text()
    if line:
        print(f"  {line}", file=out)
    print(f"  {drops_text(stack_drops(r))}", file=out)
    hint = checksum_hint(r)
    if hint:
        print(f"  {hint}", file=out)
    return c["not_completed"] == 0 and not r.bad_output


def flow_dict(f, number: int = 0) -> dict:
    """One flow's result as plain data (for --json); number: as in the text
    report and --ladder."""
    d = {"flow": number, "proto": "tcp" if f.proto == 6 else "udp",
         "client": _ip_text(f.family, f.key[0], f.key[1]), "server": _ip_text(f.family, f.key[2], f.key[3]),
         "outcome": f.outcome, "ok": f.ok, "close_reason": f.close_reason}
    if f.proto == 6:
        d.update(expected=f.expected, up=len(f.received), up_recorded=len(f.client_stream),
                 down=len(f.stack_stream.contiguous()), down_recorded=len(f.server_stream),
                 acks_lowered=f.lowered, acks_synthesized=f.synthesized)
    else:
        d.update(datagrams_up=len(f.host_datagrams), datagrams_up_recorded=len(f.client_datagrams),
                 datagrams_down=len(f.stack_datagrams), datagrams_down_recorded=len(f.server_datagrams))
    return d


def main(args) -> int:
    as_json = getattr(args, "json", False)
    mode = getattr(args, "checksums", None) or "auto"
    ladder, svg = getattr(args, "ladder", None), getattr(args, "svg", None)
    if (ladder is None) != (svg is None):
        print("tun2xray replay: --ladder FLOW and --svg FILE go together", file=sys.stderr)
        return 2
    if ladder is not None and len(args.pcap) != 1:
        print("tun2xray replay: --ladder draws a flow of one capture (give one file)", file=sys.stderr)
        return 2
    status = 0
    for path in args.pcap:
        try:
            packets = read_pcap(path)
        except ReplayError as e:
            print(f"tun2xray replay: {e}", file=sys.stderr)
            status = 2
            continue
        try:
            r = Replay(packets, checksums=mode).run()
        except Exception as e:  # a stack bug: say where, keep the other files going
            print(f"tun2xray replay: {path}: stack raised {type(e).__name__}: {e}", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)
            status = 1
            continue
        target = None
        if ladder is not None:
            from ..ladder import LadderError, find_flow
            try:
                target = find_flow(r.flows, ladder)
            except LadderError as e:
                print(f"tun2xray replay: {path}: {e}", file=sys.stderr)
                return 2
        if as_json:
            import json
            ok = all(f.ok for f in r.flows) and not r.bad_output
            print(json.dumps({"file": path, "ok": ok, "flows": [flow_dict(f, i) for i, f in enumerate(r.flows, 1)],
                              "summary": summary(r), "checksums": r.checksums.as_dict(),
                              "drops": stack_drops(r), "hint": checksum_hint(r),
                              "stray_packets": r.stray, "bad_output": r.bad_output,
                              "stack": r.stack.status()}, default=str))
        else:
            ok = report(path, r)
        if not ok and status == 0:
            status = 1
        if target is not None:
            from ..ladder import write_ladder
            try:
                i, f, n = write_ladder(target, svg, path)
            except OSError as e:
                print(f"tun2xray replay: --svg {svg}: {e.strerror or e}", file=sys.stderr)
                return 2
            print(f"ladder of flow {i} ({f.text()}, {n} packets) written to {svg}",
                  file=sys.stderr if as_json else sys.stdout)
    return status
