"""One tun2xray per TUN, and finding the running one, in a lab of its own
(prefix is: namespaces is-cli / is-srv, TUNs istun0..istun4).

- a second `run` on a TUN that a tun2xray serves is refused at once with
  one line naming the first (pid, control socket), and the first keeps
  carrying every flow (curl through it during and after the attempt);
- a TUN some other process holds open is refused naming that process;
- a SIGKILLed run leaves its lock and control socket behind: the next run
  takes them over;
- `status`, `doctor` and `node list`/`node use` without flags find the
  running instance (and doctor probes the runtime config tun2xray derived);
  with several running they say which there are and how to choose.

Runs use the real default place, /run/tun2xray/netns/is-cli/ (the lab's
client namespace has an `ip netns` name).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading

import netlab
import pytest
from netlab import (
    DNS4,
    DOKODEMO_PORT,
    ECHO_PORT,
    SOCKS_PORT,
    TARGET4,
    VETH_SRV4,
    VMESS_PORT,
)

pytestmark = pytest.mark.e2e

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
ENV.pop("TUN2XRAY_WORKERS", None)
ENV.pop("TUN2XRAY_RUN_DIR", None)
T2X = [sys.executable, "-m", "tun2xray"]
RUN_DIR = "/run/tun2xray/netns/is-cli"
FILE = "5M.bin"


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def ctl_of(tun: str) -> str:
    return f"unix://{RUN_DIR}/{tun}.sock"


def run_argv(tun: str, *extra) -> list:
    """`run` with the default control socket and the default workers."""
    return T2X + ["run", "--device", f"tun://{tun}", "--proxy", f"socks5://127.0.0.1:{SOCKS_PORT}",
                  "--map", f"udp:53=dokodemo://127.0.0.1:{DOKODEMO_PORT}", *extra]


@pytest.fixture(scope="module")
def ilab():
    if os.geteuid() != 0:
        pytest.skip("e2e tests need root (network namespaces, veth, TUN); CI runs them as root")
    lab = netlab.Lab(prefix="is", files={"small.bin": (100_000, 1), FILE: (5 << 20, 3)})
    with lab:
        yield lab
    assert not netlab.netns_exists(lab.cli_ns) and not netlab.netns_exists(lab.srv_ns)


@pytest.fixture
def lab(ilab):
    yield ilab
    for name in [n for n in ilab.procs if n.startswith("t2x") or n == "holder"]:
        ilab.stop(name, timeout=10)
    ilab.unroute()


def start(lab, tun: str, *extra, name: str = "t2x", argv=None):
    return lab.run_tun2xray(argv or run_argv(tun, *extra), tun, name=name, env=ENV,
                            describe=lambda: lab.log(name)[-3000:])


def t2x(lab, *args, timeout=30):
    return lab.cli_run(T2X + list(args), timeout=timeout)


def one_line(r) -> str:
    lines = r.stderr.decode().strip().splitlines()
    assert len(lines) == 1, r.stderr.decode()
    assert lines[0].startswith("tun2xray: error:"), lines[0]
    return lines[0]


def status(lab, *args) -> dict:
    r = t2x(lab, "status", *args)
    assert r.returncode == 0, r.stderr.decode()
    return json.loads(r.stdout)


def tun_fd_pids(name: str) -> set:
    """Every process with an open TUN fd on interface ``name`` (fdinfo's iff)."""
    out = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") != "/dev/net/tun":
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    if f"iff:\t{name}" in f.read().splitlines():
                        out.add(int(pid))
            except OSError:
                continue
    return out


def curl(lab, results: list) -> None:
    r = lab.cli_run(["curl", "-sS", "--max-time", "40", "-o", "/dev/null",
                     "-w", "%{http_code} %{size_download}", lab.url(FILE)], timeout=50)
    results.append(r.stdout.decode() if r.returncode == 0 else f"rc {r.returncode}: {r.stderr.decode()}")


def recv_n(s, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def echo_conn(lab):
    """A TCP connection through the TUN to the echo server, checked once."""
    with lab.in_cli():
        s = socket.socket()
    s.settimeout(10)
    s.connect((TARGET4, ECHO_PORT))
    s.sendall(b"before")
    assert recv_n(s, 6) == b"before"
    return s


def curls(lab, n: int) -> list:
    results: list = []
    threads = [threading.Thread(target=curl, args=(lab, results)) for _ in range(n)]
    for t in threads:
        t.start()
    return threads, results


# --- one instance per TUN -----------------------------------------------------------

@pytest.mark.deadline(150)
def test_second_run_on_the_same_tun_is_refused_and_the_first_keeps_its_flows(lab):
    tun = "istun0"
    first = start(lab, tun, "--workers", "2")              # a supervisor and its workers hold the TUN
    st = status(lab)                                       # no flags: the one running here
    inst = st["instance"]
    assert inst["pid"] == first.pid and inst["control"] == ctl_of(tun) and inst["name"] == tun
    workers = [w["pid"] for w in st["workers"]]
    assert len(workers) == 2, st["workers"]
    holders = tun_fd_pids(tun)
    assert holders == {first.pid, *workers}
    opened = st["engine"]["tcp_opened"]

    size = lab.files[FILE][1]
    for extra in ((), ("--workers", "1")):
        # 8 open connections through the first, and 8 downloads started
        # as the second run starts: a queue taken by the second would move
        # some of their packets to a stack that does not know them
        conns = [echo_conn(lab) for _ in range(8)]
        threads, during = curls(lab, 8)
        r = t2x(lab, *run_argv(tun, *extra)[len(T2X):])
        for i, c in enumerate(conns):
            with c:
                c.sendall(b"after %d" % i)
                assert recv_n(c, len(b"after %d" % i)) == b"after %d" % i
        line = one_line(r)
        assert r.returncode == 1
        assert f"pid {first.pid}" in line and f"control {ctl_of(tun)}" in line, line
        assert "already served by another tun2xray" in line
        for t in threads:
            t.join(60)
        assert during == [f"200 {size}"] * 8, during
        assert tun_fd_pids(tun) == holders                 # no queue was added or taken
        assert first.poll() is None
    _, after = curls(lab, 8)
    for t in _:
        t.join(60)
    assert after == [f"200 {size}"] * 8, after
    st = status(lab)
    assert [w["pid"] for w in st["workers"]] == workers and st["worker_restarts"] == 0
    assert st["engine"]["tcp_opened"] >= opened + 24       # every curl went through the first
    assert st["state"] == "connected"


@pytest.mark.deadline(60)
def test_a_tun_held_by_another_process_is_named(lab):
    tun = "istun1"
    # a plain TUNSETIFF by a process that is not tun2xray (no tun2xray import)
    code = ("import fcntl, os, struct, sys, time\n"
            "fd = os.open('/dev/net/tun', os.O_RDWR)\n"
            "fcntl.ioctl(fd, 0x400454CA, struct.pack('16sH22x', sys.argv[1].encode(),"
            " 0x0001 | 0x1000 | 0x0100 | 0x4000))\n"
            "print('holding', flush=True)\n"
            "time.sleep(120)\n")
    holder = lab.cli_popen("holder", [sys.executable, "-c", code, tun])
    netlab.wait_until(lambda: holder.pid in tun_fd_pids(tun), 10, "the holder's TUN")
    sock = f"{RUN_DIR}/{tun}.sock"
    sock_before = os.stat(sock).st_ino if os.path.exists(sock) else None   # (a killed run's)
    for extra in ((), ("--workers", "1"), ("--workers", "2")):
        r = t2x(lab, *run_argv(tun, *extra)[len(T2X):])
        line = one_line(r)
        assert r.returncode == 1
        assert f"the TUN {tun} is already open in pid {holder.pid} (python" in line, line
        assert tun_fd_pids(tun) == {holder.pid}
    assert holder.poll() is None
    # the refused runs left nothing behind
    assert not os.path.exists(f"{RUN_DIR}/{tun}.lock")
    assert (os.stat(sock).st_ino if os.path.exists(sock) else None) == sock_before


@pytest.mark.deadline(120)
def test_lock_and_socket_of_a_killed_run_are_replaced(lab):
    tun = "istun2"
    p = start(lab, tun, "--workers", "2")
    workers = [w["pid"] for w in status(lab)["workers"]]
    os.kill(p.pid, signal.SIGKILL)                         # no cleanup: lock and socket stay
    p.wait(10)
    netlab.wait_until(lambda: not netlab.link_exists(lab.cli_ns, tun), 15,
                      "the TUN to go with the workers")
    netlab.wait_until(lambda: not any(netlab._alive(w) for w in workers), 15, "the workers to exit")
    lab.stop("t2x")
    lab.unroute()
    lock, sock = f"{RUN_DIR}/{tun}.lock", f"{RUN_DIR}/{tun}.sock"
    assert os.path.exists(lock) and os.path.exists(sock)
    assert read_json(lock)["pid"] == p.pid
    r = t2x(lab, "status")
    assert r.returncode == 1 and "no running tun2xray found" in one_line(r)
    # doctor without an instance checks what its flags name (no error line)
    r = t2x(lab, "doctor", "--device", f"tun://{tun}")
    out = r.stdout.decode().splitlines()
    assert r.returncode == 1 and r.stderr == b"", r.stderr
    assert out[0].startswith(f"[FAIL] tun: no interface {tun}") and out[-1].startswith("0 passed"), out
    assert not any(ln.startswith("[PASS] control") for ln in out), out
    r = t2x(lab, "doctor")
    assert r.returncode == 1 and r.stderr == b"", r.stderr
    assert r.stdout.decode().startswith(f"[FAIL] tun: which TUN? (no tun2xray runs here: none in {RUN_DIR})")
    q = start(lab, tun)
    st = status(lab)
    assert st["instance"]["pid"] == q.pid and st["instance"]["control"] == ctl_of(tun)
    assert read_json(lock)["pid"] == q.pid
    netlab.wait_until(lambda: status(lab)["state"] == "connected", 10, "connected")
    _, res = curls(lab, 1)
    _[0].join(60)
    assert res == [f"200 {lab.files[FILE][1]}"], res
    assert lab.stop("t2x", timeout=15) == 0
    assert not os.path.exists(lock) and not os.path.exists(sock)      # a clean exit removes both


@pytest.mark.deadline(150)
def test_several_instances_are_listed_and_chosen(lab):
    a = start(lab, "istun0")
    lab.unroute()
    b = start(lab, "istun3", "--workers", "1", name="t2x-b")
    r = t2x(lab, "status")
    line = one_line(r)
    assert r.returncode == 1
    assert f"istun0 (pid {a.pid}, control {ctl_of('istun0')})" in line, line
    assert f"istun3 (pid {b.pid}, control {ctl_of('istun3')})" in line, line
    assert "--control URL or --device NAME" in line
    assert status(lab, "--device", "istun3")["instance"]["pid"] == b.pid
    assert status(lab, "--device", "tun://istun0")["instance"]["pid"] == a.pid
    assert status(lab, "--control", ctl_of("istun3"))["device"]["name"] == "istun3"
    for args in (("doctor",), ("node", "list"), ("node", "use", "x")):
        r = t2x(lab, *args)
        assert r.returncode == 2 and "2 tun2xray instances run here" in one_line(r), (args, r.stderr)
    r = t2x(lab, "doctor", "--device", "tun://istun3")
    out = r.stdout.decode()
    assert f"[PASS] control: {ctl_of('istun3')}" in out and "[PASS] tun: istun3 up" in out, out


# --- status, doctor and node without flags, with a core tun2xray runs ------------------

def node_config(lab, name: str, dns_port: int) -> dict:
    """No socks inbound: tun2xray derives a runtime config that adds one."""
    return {"log": {"loglevel": "warning"},
            "inbounds": [{"tag": "dns", "listen": "127.0.0.1", "port": dns_port,
                          "protocol": "dokodemo-door",
                          "settings": {"address": DNS4, "port": 53, "network": "udp"}}],
            "outbounds": [{"tag": f"far-{name}", "protocol": "vmess",
                           "settings": {"vnext": [{"address": VETH_SRV4, "port": VMESS_PORT,
                                                   "users": [{"id": lab.user_id, "alterId": 0,
                                                              "security": "aes-128-gcm"}]}]}}]}


@pytest.mark.deadline(150)
def test_status_doctor_node_find_the_running_instance(lab):
    tun = "istun4"
    d = os.path.join(lab.workdir, "xray")
    os.makedirs(os.path.join(d, "nodes"), exist_ok=True)
    for name, port in (("a", 10863), ("b", 10864)):
        with open(os.path.join(d, "nodes", f"{name}.json"), "w") as f:
            json.dump(node_config(lab, name, port), f)
    link = os.path.join(d, "config.json")
    if os.path.lexists(link):
        os.unlink(link)
    os.symlink("nodes/a.json", link)
    p = start(lab, tun, argv=T2X + ["run", "--device", f"tun://{tun}", "--xray-config", link])

    st = status(lab)
    x = st["xray"]
    assert st["instance"]["pid"] == p.pid and st["instance"]["control"] == ctl_of(tun)
    assert st["device"]["name"] == tun
    assert x["config"] == link and x["node"] == os.path.join(d, "nodes", "a.json")
    assert x["runtime_config"] and os.path.exists(x["runtime_config"])
    assert os.path.basename(x["binary"]) in ("xray", "v2ray") and x["core"]["alive"]

    # doctor, with no flags but a target, and with the link: the runtime config's inbounds
    for extra in ((), ("--xray-config", link)):
        r = t2x(lab, "doctor", "--tcp", f"{TARGET4}:{ECHO_PORT}", "--timeout", "3", *extra, timeout=60)
        out = r.stdout.decode()
        assert "no usable socks inbound" not in out, out
        for want in (f"[PASS] control: {ctl_of(tun)}", f"[PASS] tun: {tun} up", "[PASS] core: ",
                     "[PASS] inbound tun2xray-socks: socks 127.0.0.1:", "[PASS] inbound dns: ",
                     f"[PASS] tcp/ipv4 through {TARGET4}:{ECHO_PORT}: via {tun}"):
            assert want in out, (want, out)
        assert r.returncode == 0, out + r.stderr.decode()

    r = t2x(lab, "node", "list")
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode().splitlines() == ["* a", "  b"]
    r = t2x(lab, "node", "use", "b", timeout=60)
    assert r.returncode == 0, r.stderr.decode() + lab.log("t2x")[-3000:]
    assert r.stdout.decode().splitlines()[-1] == "switched"          # it waited on the instance
    assert os.readlink(link) == "nodes/b.json"
    x = status(lab)["xray"]
    assert x["node"] == os.path.join(d, "nodes", "b.json") and x["switches"] == 1
    netlab.wait_until(lambda: status(lab)["state"] == "connected", 10, "connected")
    _, res = curls(lab, 1)
    _[0].join(60)
    assert res == [f"200 {lab.files[FILE][1]}"], res
