"""Interop with the Linux kernel's TCP: a real client in a private network
namespace talks through a TUN to our Stack, run by this test (echo host).
Window scaling, SACK, timestamps, delayed ACKs and loss recovery meet a real
implementation here, with 0% and 3% packet loss added by the test."""

import os
import random
import select
import subprocess
import sys
import time

import pytest

from netstack import Stack, StackConfig, events
from tun2xray.device.tunfd import IFF_NO_PI, IFF_TUN, TunFd

CLIENT_SCRIPT = r"""
import hashlib, socket, sys, threading
n, conns, host = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
errors = []
def one(i):
    try:
        s = socket.create_connection((host, 7000 + i), timeout=20)
        data = bytes((j * 131 + i) & 255 for j in range(4096)) * (n // 4096)
        def send():
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        t = threading.Thread(target=send); t.start()
        got = bytearray()
        while True:
            b = s.recv(1 << 16)
            if not b:
                break
            got += b
        t.join()
        s.close()
        if hashlib.sha256(got).digest() != hashlib.sha256(data).digest():
            errors.append(f"conn {i}: echo mismatch {len(got)} != {len(data)}")
    except Exception as e:
        errors.append(f"conn {i}: {e!r}")
ts = [threading.Thread(target=one, args=(i,)) for i in range(conns)]
[t.start() for t in ts]; [t.join() for t in ts]
print("ERR " + "; ".join(errors) if errors else "OK", flush=True)
"""


def sh(*args, check=True):
    return subprocess.run(args, check=check, capture_output=True, text=True)


@pytest.fixture
def tunns():
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        pytest.skip("needs root and /dev/net/tun")
    tag = f"{os.getpid() % 100000}"
    ns, ifname = f"tt-k{tag}", f"tt{tag}"
    tun = TunFd.open(ifname, IFF_TUN | IFF_NO_PI)
    try:
        sh("ip", "link", "set", ifname, "mtu", "1500")
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "set", ifname, "netns", ns)
        sh("ip", "-n", ns, "addr", "add", "10.123.0.1/24", "dev", ifname)
        sh("ip", "-n", ns, "-6", "addr", "add", "fd00:7474::1/64", "dev", ifname, "nodad")
        sh("ip", "-n", ns, "link", "set", ifname, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield ns, tun
    finally:
        tun.close()
        sh("ip", "netns", "del", ns, check=False)


def run_echo(ns, tun, nbytes, conns, loss, seed=1, limit=60.0, host="10.123.0.2"):
    rnd = random.Random(seed)
    stack = Stack(StackConfig(mtu=1500, rcv_buf=256 << 10, snd_buf=256 << 10), rng=random.Random(seed))
    proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", CLIENT_SCRIPT, str(nbytes), str(conns), host],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    fd = tun.fileno()
    os.set_blocking(fd, False)
    t0 = time.monotonic()
    closed = []
    try:
        done_at = None
        while time.monotonic() - t0 < limit:
            now = time.monotonic() - t0
            if done_at is None and proc.poll() is not None:
                done_at = now
            if done_at is not None and (not stack.tcp or now - done_at > 2.0):
                break                  # the client is gone: let the last ACKs land
            dl = stack.next_deadline()
            timeout = 0.05 if dl is None else max(0.0, min(0.05, dl - now))
            r, _, _ = select.select([fd], [], [], timeout)
            now = time.monotonic() - t0
            if r:
                for _ in range(64):
                    try:
                        pkt = os.read(fd, 65536)
                    except BlockingIOError:
                        break
                    if rnd.random() >= loss:
                        stack.input(pkt, now)
            for e in stack.take_events():
                if isinstance(e, events.TcpConnectRequest):
                    e.conn.accept()
                elif isinstance(e, events.TcpClosed):
                    closed.append(e.reason)
            for c in list(stack.tcp.values()):      # echo: everything read is written back
                if c.user is None:
                    c.user = bytearray()
                if c.readable and len(c.user) < 256 << 10:
                    c.user += c.read()
                if c.user and c.state in ("ESTABLISHED", "CLOSE_WAIT"):
                    k = c.write(c.user)
                    del c.user[:k]
                if c.eof and not c.user and c.state == "CLOSE_WAIT":
                    c.shutdown()
            stack.poll(now)
            for pkt in stack.take_output():
                if rnd.random() >= loss:
                    try:
                        os.write(fd, pkt)
                    except BlockingIOError:
                        pass
        out, err = proc.communicate(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return out.strip(), err, stack, closed


@pytest.mark.parametrize("loss,nbytes,conns,host", [(0.0, 2 << 20, 1, "10.123.0.2"), (0.0, 512 << 10, 8, "10.123.0.2"),
                                                   (0.03, 512 << 10, 2, "10.123.0.2"), (0.0, 1 << 20, 2, "fd00:7474::2"),
                                                   (0.03, 512 << 10, 1, "fd00:7474::2")])
def test_linux_client_echo(tunns, loss, nbytes, conns, host):
    ns, tun = tunns
    out, err, stack, closed = run_echo(ns, tun, nbytes, conns, loss, host=host)
    assert out == "OK", (out, err, stack.status())
    assert closed == ["closed"] * conns, closed
    if loss == 0.0:
        assert not stack.tcp_drops.get("out_of_window"), stack.status()
