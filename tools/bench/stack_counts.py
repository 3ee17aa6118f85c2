#!/usr/bin/env python3
"""Bytecodes and Python calls per connection in netstack, by function.

Runs stack_bench's connection run (handshake, one request, one response
with our FIN, the client's FIN, TIME_WAIT) under sys.settrace and counts,
per connection, the bytecodes executed and the Python functions entered in
netstack's files. Counts, unlike rates, do not move with the load of a
shared machine; with --repo they compare two checkouts with the same bench.

  python3 tools/bench/stack_counts.py [--repo DIR] [--conns 2000] [--rate 2000] [--top 30]

--rate R puts the connections on a clock of R per second with the real
timer lengths (stack_bench --rate); 0 uses stack_bench's compressed clock.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def count(repo: str, conns: int, rate: float):
    sys.path.insert(0, repo)
    import netstack                             # repo's, before stack_bench imports it
    import netstack.events
    import netstack.wire.checksum               # noqa: F401
    sys.path.insert(0, HERE)
    import stack_bench as sb
    ops = collections.Counter()
    calls = collections.Counter()
    root = os.path.dirname(netstack.__file__) + os.sep

    def site(code):
        return "netstack/" + os.path.relpath(code.co_filename, root) + ":" + code.co_name

    def trace(frame, event, arg):
        if event == "call":
            if not frame.f_code.co_filename.startswith(root):
                return None
            calls[site(frame.f_code)] += 1
            frame.f_trace_opcodes = True
            frame.f_trace_lines = False
            return trace
        if event == "opcode":
            ops[site(frame.f_code)] += 1
        return trace

    sb.bench_conns(50, False, rate)             # warm: first-use costs are not per connection
    sys.settrace(trace)
    try:
        sb.bench_conns(conns, False, rate)
    finally:
        sys.settrace(None)
    return ops, calls


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="stack_counts", description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", default=os.path.join(HERE, "..", ".."), help="checkout whose netstack is counted")
    p.add_argument("--conns", type=int, default=2000)
    p.add_argument("--rate", type=float, default=2000.0, help="connections per second of the clock (0: compressed)")
    p.add_argument("--top", type=int, default=30, help="functions listed")
    a = p.parse_args(argv)
    ops, calls = count(os.path.abspath(a.repo), a.conns, a.rate)
    n = a.conns
    print(f"per connection in netstack: {sum(ops.values()) / n:.1f} bytecodes, "
          f"{sum(calls.values()) / n:.1f} Python calls")
    print(f"{'bytecodes':>10} {'calls':>7}  function")
    for k, v in ops.most_common(a.top):
        print(f"{v / n:10.1f} {calls[k] / n:7.2f}  {k}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
