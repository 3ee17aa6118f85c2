"""DNS in the engine: answer latency, memory per mapping, the import cost of
dnspython. ``python3 tools/bench/dns_bench.py [--queries N]`` (root for the
latency part; ``--offline`` skips it).

- import: a fresh interpreter's RSS and wall time for ``import
  tun2xray.engine`` alone, then for ``tun2xray.dns.server`` (dnspython and
  the record types a query touches) on top, and after the first query.
- memory per mapping: RSS and tracemalloc growth of a NameBook given N
  names (``host-N.example.com``, the name strings included), divided by
  N; fake (one family) and remembered.
- latency (netlab, prefix dn): a client in dn-cli sends N queries one after
  another and times each answer:
    fake       A to 9.9.9.9 through the TUN, tun2xray --dns fake-ip answers
    forwarded  TXT to 9.9.9.9, forwarded to the core's DNS dokodemo -> dnsmasq
    remember   A to 9.9.9.9, tun2xray --dns remember (forwarded, remembered)
    direct     A straight to the dokodemo inbound on loopback (no TUN, no
               tun2xray): the core's and dnsmasq's own share
  median, p90, p99 in microseconds. Printed as lines and JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))

_IMPORT = r"""
import json, sys, time
def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
r0, t0 = rss(), time.perf_counter()
import tun2xray.engine, tun2xray.host
r1, t1 = rss(), time.perf_counter()
import tun2xray.dns.server
r2, t2 = rss(), time.perf_counter()
from tun2xray.dns.server import DnsServer
from tun2xray.dns.book import NameBook
from tun2xray.dns.settings import DnsSettings
import dns.message
s = DnsServer(DnsSettings("fake-ip"), NameBook("198.19.0.0/16", "fd00:7478:f::/64"), None)
for t in ("A", "AAAA", "HTTPS"):
    s.handle(dns.message.make_query("example.com", t).to_wire(), False, lambda b: None)
r3, t3 = rss(), time.perf_counter()
print(json.dumps({"engine_kb": r1 - r0, "engine_ms": (t1 - t0) * 1e3, "dns_kb": r2 - r1,
                  "dns_ms": (t2 - t1) * 1e3, "first_queries_kb": r3 - r2, "first_queries_ms": (t3 - t2) * 1e3,
                  "modules_dns": len([m for m in sys.modules if m == "dns" or m.startswith("dns.")])}))
"""

_MEMORY = r"""
import json, sys, tracemalloc
n = int(sys.argv[1])
kind = sys.argv[2]
def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
from tun2xray.dns.book import NameBook
b = NameBook("10.0.0.0/8", "fd00::/64", capacity=n, remember_capacity=n, clock=lambda: 0.0)
tracemalloc.start()
r0 = rss()
t0 = tracemalloc.get_traced_memory()[0]
# the names are made inside the measurement: the book keeps the strings the server made
names = [f"host-{i}.example.com" for i in range(n)]
if kind == "fake":
    for nm in names:
        b.fake_address(nm, 4)
else:
    for i, nm in enumerate(names):
        b.remember((0x0b000000 + i).to_bytes(4, "big"), nm, 300)
t1 = tracemalloc.get_traced_memory()[0]
r1 = rss()
print(json.dumps({"bytes_per_mapping_traced": (t1 - t0) / n, "bytes_per_mapping_rss": (r1 - r0) * 1024 / n}))
"""


def _py(code, *args):
    env = dict(os.environ, PYTHONPATH=REPO)
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env,
                       timeout=300, check=True)
    return json.loads(r.stdout)


def imports(runs=5) -> dict:
    got = [_py(_IMPORT) for _ in range(runs)]
    return {k: statistics.median(g[k] for g in got) for k in got[0]}


def memory(n) -> dict:
    return {"fake": _py(_MEMORY, n, "fake"), "remembered": _py(_MEMORY, n, "remember")}


_CLIENT = r"""
import json, socket, sys, time
import dns.message
server, qtype, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
port = int(sys.argv[4]) if len(sys.argv) > 4 else 53
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
out = []
for i in range(n + 20):
    q = dns.message.make_query(f"web.e2.test" if qtype != "A+" else f"n{i}.example", qtype.rstrip("+")).to_wire()
    t = time.perf_counter()
    s.sendto(q, (server, port))
    while True:
        data = s.recv(65535)
        if data[:2] == q[:2]:
            break
    if i >= 20:                  # the first ones warm the path up
        out.append((time.perf_counter() - t) * 1e6)
print(json.dumps(out))
"""


def latency(n) -> dict:
    import netlab
    res = {}
    lab = netlab.Lab(prefix="dn", files={})
    env = dict(os.environ, PYTHONPATH=REPO)
    with lab:
        def client(server, qtype, port=53):
            r = lab.cli_run([sys.executable, "-c", _CLIENT, server, qtype, str(n), str(port)], timeout=600)
            if r.returncode:
                raise RuntimeError(r.stderr.decode()[-2000:])
            return json.loads(r.stdout)

        def summary(xs):
            xs = sorted(xs)
            return {"median_us": round(statistics.median(xs)), "p90_us": round(xs[int(len(xs) * 0.9)]),
                    "p99_us": round(xs[int(len(xs) * 0.99)]), "n": len(xs)}

        res["direct"] = summary(client("127.0.0.1", "A", netlab.DOKODEMO_PORT))
        for mode, cases in (("fake-ip", (("fake", "A+"), ("forwarded", "TXT"))), ("remember", (("remember", "A"),))):
            tun = "dnbench0"
            argv = [sys.executable, "-m", "tun2xray", "run", "--device", f"tun://{tun}", "--control", "none",
                    "--proxy", f"socks5://127.0.0.1:{netlab.SOCKS_PORT}", "--log-level", "warning",
                    "--map", f"udp:53=dokodemo://127.0.0.1:{netlab.DOKODEMO_PORT}", "--dns", mode]
            lab.run_tun2xray(argv, tun, name="t2x", env=env)
            lab.ip(lab.cli_ns, "route", "replace", "9.9.9.9/32", "dev", tun)
            try:
                for name, qtype in cases:
                    res[name] = summary(client("9.9.9.9", qtype))
            finally:
                lab.stop("t2x", timeout=10)
                lab.unroute()
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--mappings", type=int, default=65536)
    p.add_argument("--offline", action="store_true", help="skip the namespace latency part")
    a = p.parse_args(argv)
    out = {"imports": imports(), "memory": memory(a.mappings)}
    if not a.offline:
        out["latency"] = latency(a.queries)
    im = out["imports"]
    print(f"import tun2xray.engine: +{im['engine_kb'] / 1024:.1f} MiB RSS, {im['engine_ms']:.0f} ms; "
          f"tun2xray.dns.server (dnspython) on top: +{im['dns_kb'] / 1024:.1f} MiB, {im['dns_ms']:.0f} ms; "
          f"first queries: +{im['first_queries_kb'] / 1024:.1f} MiB, {im['first_queries_ms']:.0f} ms")
    for kind, m in out["memory"].items():
        print(f"{kind} mapping: {m['bytes_per_mapping_traced']:.0f} B traced, {m['bytes_per_mapping_rss']:.0f} B RSS "
              f"(per mapping, {a.mappings} mappings)")
    for case, lat in out.get("latency", {}).items():
        print(f"{case:10s} median {lat['median_us']} us  p90 {lat['p90_us']} us  p99 {lat['p99_us']} us  "
              f"({lat['n']} queries)")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
