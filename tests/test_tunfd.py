"""tunfd.TunFd against the kernel's TUN driver, in a network namespace of
the test's own: what TUNSETIFF made is what TUNGETIFF and the kernel's
interface list say, and the kernel's refusals come back as OSError."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
                                reason="TUN devices and network namespaces need root")

CHILD = """
import errno, json, os, socket
from tun2xray.device.tunfd import IFF_MULTI_QUEUE, IFF_NO_PI, IFF_TUN, IFF_VNET_HDR, TunFd

def kernel_flags(name):
    with open(f"/sys/class/net/{name}/tun_flags") as f:
        return int(f.read(), 16)

r = {}
q = TunFd.open("", IFF_TUN | IFF_NO_PI)                     # the kernel names it
r["auto_name"] = q.name
r["auto_flags"] = q.flags & (IFF_TUN | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE)
r["auto_sysfs"] = kernel_flags(q.name) == q.flags
r["cloexec"] = not os.get_inheritable(q.fileno())
try:
    TunFd.open(q.name, IFF_TUN | IFF_NO_PI)                  # a single-queue TUN in use
    r["busy"] = None
except OSError as e:
    r["busy"] = errno.errorcode.get(e.errno)
q.close(); q.close()                                         # idempotent
r["gone"] = q.name not in [n for _, n in socket.if_nameindex()]

mq = IFF_TUN | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE
a = TunFd.open("tfq0", mq)
b = TunFd.open("tfq0", mq)                                   # a second queue
r["mq_flags"] = [a.flags & mq, b.flags & mq]
r["mq_queues"] = len(os.listdir("/sys/class/net/tfq0/queues")) // 2
try:
    TunFd.open("tfq0", IFF_TUN | IFF_NO_PI)                  # multiqueue setting differs
    r["mismatch"] = None
except OSError as e:
    r["mismatch"] = errno.errorcode.get(e.errno)
a.close(); b.close()
try:
    TunFd.open("x" * 16, IFF_TUN | IFF_NO_PI)                # longer than IFNAMSIZ - 1
    r["long"] = None
except (OSError, ValueError) as e:
    r["long"] = type(e).__name__
print(json.dumps(r))
"""


def test_tunfd_opens_names_flags_queues_and_refusals():
    ns = f"tf-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", textwrap.dedent(CHILD)],
                           env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True, timeout=30)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["auto_name"].startswith("tun") and res["auto_flags"] == 0x1001
    assert res["auto_sysfs"] and res["cloexec"]
    assert res["busy"] == "EBUSY"
    assert res["gone"]
    assert res["mq_flags"] == [0x5101, 0x5101]
    assert res["mq_queues"] == 2
    assert res["mismatch"] == "EINVAL"
    assert res["long"] == "ValueError"
