"""The verdict on one replayed flow: judge() compares what the stack did
with what the recording shows and sets the flow's outcome ("completed",
"refused", "reset" as recorded, or "incomplete: why")."""

from __future__ import annotations

from .capture import M32, RST


# ------------------------------------------------------------------ verdicts

def judge(f) -> None:
    """Set f.outcome / f.ok / f.detail from what the replay saw."""
    if f.proto == 17:
        up = sum(map(len, f.client_datagrams))
        down = sum(map(len, f.server_datagrams))
        f.detail = f"{len(f.client_datagrams)} datagrams {up} B up, {len(f.server_datagrams)} datagrams {down} B down"
        if f.expected == "refused":
            want = f.rec_icmp
            if f.close_reason == "rejected" and f.stack_icmp[:1] == [want] and f.host_datagrams == f.client_datagrams[:1]:
                f.outcome, f.ok = "refused", True
            else:
                _incomplete(f, f"recorded as refused (ICMP {want}), stack sent {f.stack_icmp or 'no ICMP'}")
        elif f.host_datagrams != f.client_datagrams:
            _incomplete(f, f"host got {len(f.host_datagrams)} of {len(f.client_datagrams)} datagrams intact")
        elif f.stack_datagrams != f.server_datagrams:
            _incomplete(f, f"stack sent {len(f.stack_datagrams)} of {len(f.server_datagrams)} replies intact")
        else:
            f.outcome, f.ok = "completed", True
        return
    cs, ss = f.client_stream, f.server_stream
    got, sent = bytes(f.received), f.stack_stream.contiguous()
    f.detail = f"up {len(got)}/{len(cs)} B, down {len(sent)}/{len(ss)} B"
    if f.synthesized or f.lowered:
        f.detail += f", {f.lowered} ACKs lowered, {f.synthesized} synthesized"
    if f.expected == "refused" and f.rec_icmp is not None:
        if f.close_reason == "rejected" and f.stack_icmp[:1] == [f.rec_icmp]:
            f.outcome, f.ok = "refused", True
        else:
            _incomplete(f, f"recorded as refused (ICMP {f.rec_icmp}), stack sent {f.stack_icmp or 'no ICMP'}")
        return
    if f.expected == "refused":
        if f.close_reason == "rejected" and any(a == (f.client_isn + 1) & M32 and fl & RST for _, a, fl in f.stack_rst):
            f.outcome, f.ok = "refused", True
        else:
            _incomplete(f, f"recorded as refused, stack {'closed: ' + f.close_reason if f.close_reason else 'sent no RST'}")
        return
    if f.handle is None or f.syn_ack is None:
        _incomplete(f, "no SYN-ACK from the stack")
        return
    if f.syn_ack[1] != (f.client_isn + 1) & M32:
        _incomplete(f, "SYN-ACK does not ack the client's ISN+1")
        return
    if f.stack_stream.conflicts:
        _incomplete(f, "stack retransmitted different bytes")
        return
    if f.window_violations:
        _incomplete(f, f"stack sent {f.window_violations} segments beyond the client's window")
        return
    if f.expected == "reset":
        # the recording ends in a RST: everything the client sent before it
        # must have reached the host, in order
        if not cs.startswith(got):
            _incomplete(f, "host bytes differ from the client's")
        elif f.close_reason not in ("reset", "aborted"):
            _incomplete(f, f"recorded as reset, stack {'closed: ' + f.close_reason if f.close_reason else 'still open'}")
        elif not ss.startswith(sent):
            _incomplete(f, "stack bytes differ from the server's")
        else:
            f.outcome, f.ok = "reset", True
            f.detail += f", reset by the {f.rec_rst}"
        return
    if got != cs:
        where = next((i for i, (a, b) in enumerate(zip(got, cs)) if a != b), min(len(got), len(cs)))
        _incomplete(f, f"host got {len(got)} of {len(cs)} client bytes (first difference at {where})")
    elif sent != ss:
        _incomplete(f, f"stack sent {len(sent)} of {len(ss)} server bytes")
    elif f.expected == "open":
        f.outcome, f.ok = "incomplete: capture ends before the connection closed", False
    elif f.close_reason != "closed":
        state = getattr(f.handle, "state", "?")
        _incomplete(f, f"closed as {f.close_reason!r}" if f.close_reason else f"still {state}")
    elif f.stack_fin != len(ss):
        _incomplete(f, "stack sent no FIN after the server's bytes")
    else:
        f.outcome, f.ok = "completed", True


def _incomplete(f, why):
    f.outcome, f.ok = f"incomplete: {why}", False
