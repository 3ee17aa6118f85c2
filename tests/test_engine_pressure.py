"""The engine under pressure, on the in-memory device and a virtual clock
(tests/vclock.py): a request that admission sheds takes its upstream dial
with it -- the connect in progress or the SOCKS handshake on its socket is
stopped and the socket closed at once, not at the connect timeout; a dial
that fails because the process is out of file descriptors refuses the flow
and is counted as that, not as the upstream's failure.

The upstreams are real loopback sockets: a listener that never accepts
(its backlog full, so the kernel drops further SYNs and a connect hangs)
and a SOCKS server that accepts and never answers.
"""

from __future__ import annotations

import asyncio
import os
import socket

from helpers import addr, build_packet, tcp_options
from vclock import EngineHarness, run_virtual

from netstack import StackConfig

SRC = addr("10.0.0.2")
FLOOD_DST, OTHER_DST = addr("192.0.2.1"), addr("198.51.100.7")
SMALL = StackConfig(max_pending=4, max_pending_per_dst=4, max_pending_per_src=1024)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Unanswered:
    """A loopback listener whose connects hang (``accepting=False``: the
    accept queue is filled once, so the kernel drops every later SYN) or
    are accepted and never answered (``accepting=True``)."""

    def __init__(self, accepting: bool):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16 if accepting else 0)
        self.port = self.sock.getsockname()[1]
        self.fillers = []
        self.accepted = []
        if accepting:
            self.sock.setblocking(False)
        else:
            # backlog 0 holds one connection; one more in SYN-RECV for luck
            for _ in range(2):
                c = socket.socket()
                c.setblocking(False)
                c.connect_ex(("127.0.0.1", self.port))
                self.fillers.append(c)

    def accept_all(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except BlockingIOError:
                return
            self.accepted.append(c)

    def close(self) -> None:
        for s in self.fillers + self.accepted + [self.sock]:
            s.close()


def closed_by_peer(c: socket.socket) -> bool:
    """Has the dialer closed c? (reads and discards what it sent: its greeting)"""
    try:
        while c.recv(4096, socket.MSG_DONTWAIT):
            pass
        return True
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def syn(dst, sport):
    return build_packet(4, SRC, dst, sport, 80, 1000, 0, "S", 65535, tcp_options(mss=1400))


async def _until(loop, pred, what, timeout=5.0):
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s (virtual)")
        await asyncio.sleep(0.01)


def _shed_cancels_the_dial(accepting: bool):
    up = Unanswered(accepting)

    async def main(loop):
        before = open_fds()
        host = await EngineHarness(f"socks5://127.0.0.1:{up.port}", connect_timeout=30.0,
                                   stack_config=SMALL).start()
        eng = host.engine
        try:
            base_fds = open_fds()
            host.send(*[syn(FLOOD_DST, 41000 + i) for i in range(4)])
            if accepting:
                # the four sockets connect and wait in the SOCKS handshake
                await _until(loop, lambda: (up.accept_all(), len(up.accepted))[1] == 4, "four accepted")
                await _until(loop, lambda: not eng._tasks, "the connects done")
            await _until(loop, lambda: len(eng._dials) == 4, "four dials")
            assert open_fds() == base_fds + 4 * (2 if accepting else 1)
            assert eng.status()["engine"]["dials_pending"] == 4
            # a SYN to another destination: the table is full, the oldest
            # request of the flood gives way (RST to its client) ...
            host.send(syn(OTHER_DST, 42000))
            rst = await host.expect(lambda s: s.dport == 41000)
            assert rst.flags & 0x04, rst
            # ... and its dial is stopped now, not at its timeout 30 s away
            # (the new request's dial replaces it: still four)
            await _until(loop, lambda: len(eng._dials) == 4 and len(eng._tasks) == (0 if accepting else 4),
                         "the shed dial gone", timeout=0.5)
            st = eng.status()
            assert st["stack"]["pending_shed"] == 1, st["stack"]
            assert st["engine"]["tcp_dials_cancelled"] == 1, st["engine"]
            # not the upstream's fault: no failed dial counted (nor reported to the watch)
            assert st["engine"].get("upstream_connect_failed", 0) == 0, st["engine"]
            assert st["engine"]["dials_pending"] == 4
            [shed] = [c for c in st["closed_flows"] if c["src"].endswith(":41000")]
            assert shed["reason"] == "shed", shed
            if accepting:
                # the server sees the shed dial's socket close; the others stay
                await _until(loop, lambda: (up.accept_all(), len(up.accepted))[1] == 5, "the new dial")
                await _until(loop, lambda: sum(map(closed_by_peer, up.accepted)) == 1, "one socket closed",
                             timeout=0.5)
                assert open_fds() == base_fds + 4 + 5
            else:
                assert open_fds() == base_fds + 4
        finally:
            await host.stop()
        # the engine stopped: nothing of its dials is left
        assert not eng._dials
        await _until(loop, lambda: not eng._tasks, "the cancelled dials to finish")
        assert open_fds() == before + len(up.accepted)
        up.close()

    run_virtual(main)


def test_a_shed_request_cancels_its_connect_in_progress():
    _shed_cancels_the_dial(accepting=False)


def test_a_shed_request_closes_the_socket_of_its_socks_handshake():
    _shed_cancels_the_dial(accepting=True)


def _lowest_free_fd() -> int:
    fd = os.open("/dev/null", os.O_RDONLY)
    os.close(fd)
    return fd


def test_out_of_fds_refuses_new_flows_without_blaming_the_upstream_and_recovers():
    import resource

    from test_engine_memory import SocksDest, echo

    async def main(loop):
        dest = await SocksDest(echo).start()
        host = await EngineHarness(f"socks5://127.0.0.1:{dest.port}").start()
        eng = host.engine
        pokes = []
        eng.on_upstream_failed = lambda: pokes.append(1)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        try:
            # no fd number is free below the limit: the dial's socket() fails
            resource.setrlimit(resource.RLIMIT_NOFILE, (_lowest_free_fd(), hard))
            try:
                host.send(syn(OTHER_DST, 43000))
                rst = await host.expect(lambda s: s.dport == 43000)
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            assert rst.flags & 0x04 and rst.ack == 1001, rst           # refused: RST
            st = eng.status()
            assert st["engine"]["refused_local_exhaustion"] == 1, st["engine"]
            assert st["engine"]["refused_out_of_file_descriptors"] == 1, st["engine"]
            assert st["engine"].get("upstream_connect_failed", 0) == 0, st["engine"]
            assert not pokes                                           # the watch is not told
            [c] = st["closed_flows"]
            assert c["reason"] == "no local resources", c
            assert c["detail"].startswith("out of file descriptors: "), c
            # the fds are back: the next flow is carried
            host.send(syn(OTHER_DST, 43001))
            sa = await host.expect(lambda s: s.dport == 43001)
            assert sa.flags & 0x12 == 0x12, sa
            host.send(build_packet(4, SRC, OTHER_DST, 43001, 80, 1001, sa.seq + 1, "A", 65535),
                      build_packet(4, SRC, OTHER_DST, 43001, 80, 1001, sa.seq + 1, "PA", 65535,
                                   payload=b"ping"))
            data = await host.expect(lambda s: s.dport == 43001 and s.payload)
            assert bytes(data.payload) == b"ping"
            assert eng.status()["engine"]["dials_pending"] == 0
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            await host.stop()
            await dest.stop()

    run_virtual(main)
