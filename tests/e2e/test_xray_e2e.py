"""`tun2xray run --xray-config`, node switching, --auto-route and `doctor`
with real cores, in network namespaces of their own (prefix ``xr``).

World (built once for the module with tools/netlab.py's Lab, start=False)::

    xr-cli                                         xr-srv
    TUN xrtun0 + tun2xray (starts the local core)  lo: targets 10.99.0.10 fd99::10,
    config.json -> nodes/a.json | nodes/b.json          dns 10.99.0.53, far cores
    default via 10.200.0.2 / fdc8:e2::2 ---veth--->     FAR_A 10.201.0.2, FAR_B 10.201.0.3

The far cores sit behind the veth's far end (not on the connected subnet),
so with --auto-route only the core's firewall mark keeps its own traffic out
of the TUN.  Node a has every inbound; node b has no socks inbound, so
tun2xray derives a runtime config that adds one.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time

import pytest

import netlab
from netlab import DNS4, ECHO_PORT, TARGET4, TARGET6

pytestmark = pytest.mark.e2e

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
PREFIX = "xr"
TUN = "xrtun0"
FAR_A, FAR_B = "10.201.0.2", "10.201.0.3"
FAR_PORT = 10086
MARK = 0x7478
PRIO = 9470
T2X = [sys.executable, "-m", "tun2xray"]


def policy():
    return {"levels": {"0": {"handshake": 4, "connIdle": 300, "uplinkOnly": 1,
                             "downlinkOnly": 30, "bufferSize": 512}}}


def node_config(uid: str, far: str, logdir: str, name: str, socks: bool = True,
                dns_inbound: bool = True) -> str:
    inbounds = []
    if socks:
        inbounds.append({"tag": "socks", "listen": "127.0.0.1", "port": 10808, "protocol": "socks",
                         "settings": {"auth": "noauth", "udp": True, "ip": "127.0.0.1"}})
    if dns_inbound:
        inbounds.append({"tag": "dns", "listen": "127.0.0.1", "port": 10853,
                         "protocol": "dokodemo-door",
                         "settings": {"address": DNS4, "port": 53, "network": "udp"}})
    cfg = {"log": {"loglevel": "warning", "access": os.path.join(logdir, f"node-{name}.access")},
           "policy": policy(), "inbounds": inbounds, "dns": {"servers": [DNS4]},
           "outbounds": [{"tag": "far", "protocol": "vmess",
                          "settings": {"vnext": [{"address": far, "port": FAR_PORT,
                                                  "users": [{"id": uid, "alterId": 0,
                                                             "security": "aes-128-gcm"}]}]}}]}
    # Xray configs carry comments: so do ours
    return f"// node {name}: VMess to {far}\n" + json.dumps(cfg, indent=1).replace(
        '"inbounds": [', '"inbounds": [ /* what tun2xray dials */', 1)


def far_config(uid: str, addr: str, logdir: str, name: str) -> dict:
    return {"log": {"loglevel": "warning", "access": os.path.join(logdir, f"far-{name}.access")},
            "policy": policy(),
            "inbounds": [{"listen": addr, "port": FAR_PORT, "protocol": "vmess",
                          "settings": {"clients": [{"id": uid, "alterId": 0}]}}],
            "outbounds": [{"protocol": "freedom"}]}


class World:
    def __init__(self, lab):
        self.lab = lab
        self.dir = os.path.join(lab.workdir, "xray")
        self.nodes = os.path.join(self.dir, "nodes")
        self.link = os.path.join(self.dir, "config.json")
        self.ctl = f"unix://{lab.workdir}/xr-ctl.sock"

    def build(self):
        lab = self.lab
        for a in (FAR_A, FAR_B):
            lab.ip(lab.srv_ns, "addr", "add", f"{a}/32", "dev", "lo")
        lab.ip(lab.cli_ns, "route", "add", "default", "via", netlab.VETH_SRV4)
        lab.ip(lab.cli_ns, "-6", "route", "add", "default", "via", netlab.VETH_SRV6)
        lab.start_servers()
        for name, addr in (("a", FAR_A), ("b", FAR_B)):
            path = lab._write_config(f"far-{name}.json", far_config(lab.user_id, addr, lab.workdir, name))
            p = lab.spawn(f"far-{name}", lab.srv_ns, netlab.core_cmd(lab.core, path))
            netlab.wait_port(lab.srv_ns, FAR_PORT, "tcp", proc=p)
        os.makedirs(self.nodes)
        # a: every inbound; b: no socks inbound; c: no inbounds at all
        for name, far, socks, dns in (("a", FAR_A, True, True), ("b", FAR_B, False, True),
                                      ("c", FAR_A, False, False)):
            with open(os.path.join(self.nodes, f"{name}.json"), "w") as f:
                f.write(node_config(lab.user_id, far, lab.workdir, name, socks, dns))
        self.select("a")

    def select(self, name):
        tmp = self.link + ".t"
        os.symlink(f"nodes/{name}.json", tmp)
        os.replace(tmp, self.link)

    def far_log(self, name) -> str:
        try:
            with open(os.path.join(self.lab.workdir, f"far-{name}.access")) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def run_argv(self, *extra):
        return T2X + ["run", "--device", f"tun://{TUN}", "--xray-config", self.link,
                      "--control", self.ctl, "--log-level", "debug", *extra]

    def start(self, *extra, route=True):
        lab = self.lab
        if os.path.exists(self.ctl[7:]):
            os.unlink(self.ctl[7:])           # left by a killed run
        p = lab.cli_popen("t2x", self.run_argv(*extra), cwd=REPO, env=ENV)
        try:
            netlab.wait_until(lambda: p.poll() is not None or self.serving(),
                              30, "tun2xray to serve its control socket")
            assert p.poll() is None, f"tun2xray exited with {p.returncode}" + self.log()
            if route:
                lab.route_via(TUN)
            netlab.wait_until(lambda: self.echo(b"ready?", timeout=2, quiet=True) == b"ready?",
                              20, "a TCP echo through the TUN", interval=0.2)
        except BaseException:
            self.stop()
            raise
        return p

    def serving(self) -> bool:
        from tun2xray.control import query
        try:
            return "engine" in query(self.ctl, timeout=1)
        except (OSError, ValueError):
            return False

    def stop(self):
        rc = self.lab.stop("t2x", timeout=10)
        self.lab.unroute()
        return rc

    def log(self):
        return "\n--- tun2xray log ---\n" + self.lab.log("t2x")[-5000:]

    def status(self):
        r = self.lab.cli_run(T2X + ["status", "--control", self.ctl], timeout=10)
        assert r.returncode == 0, r.stderr.decode() + self.log()
        return json.loads(r.stdout)

    def connect(self, addr, timeout=5.0):
        fam = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        with self.lab.in_cli():
            s = socket.socket(fam, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(addr)
        except BaseException:
            s.close()
            raise
        return s

    def echo(self, payload, addr=(TARGET4, ECHO_PORT), timeout=5.0, quiet=False):
        try:
            with self.connect(addr, timeout) as s:
                s.sendall(payload)
                buf = b""
                while len(buf) < len(payload):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
                return buf
        except OSError:
            if quiet:
                return None
            raise

    def rules_snapshot(self):
        """Rules and routes of every table but the kernel's own "local" one
        (where the veth's link-local address shows up whenever DAD is done)."""
        def routes(fam):
            out = self.lab.ip(self.lab.cli_ns, fam, "route", "show", "table", "all")
            return "".join(ln + "\n" for ln in out.splitlines() if "table local" not in ln)
        return (self.lab.ip(self.lab.cli_ns, "-4", "rule"), self.lab.ip(self.lab.cli_ns, "-6", "rule"),
                routes("-4"), routes("-6"))


@pytest.fixture(scope="module")
def world():
    netlab_root = os.geteuid() == 0
    if not netlab_root:
        pytest.skip("e2e tests need root (network namespaces, veth, TUN); CI runs them as root")
    lab = netlab.Lab(prefix=PREFIX, start=False, files={"small.bin": (100_000, 1)})
    with lab:
        w = World(lab)
        w.build()
        yield w
    assert not netlab.netns_exists(lab.cli_ns) and not netlab.netns_exists(lab.srv_ns)


@pytest.fixture
def running(world):
    """tun2xray run --xray-config on node a, targets routed through the TUN."""
    world.select("a")
    world.start()
    try:
        yield world
    finally:
        world.stop()


def assert_same_tables(after, before):
    import difflib
    for a, b in zip(after, before):
        assert a == b, "\n".join(difflib.unified_diff(b.splitlines(), a.splitlines(), lineterm=""))


def dig(world, name="web.e2.test", qtype="A"):
    return world.lab.cli_run(["dig", "+short", "+time=3", "+tries=2", f"@{DNS4}", name, qtype],
                             timeout=20)


# --- run --xray-config --------------------------------------------------------------

@pytest.mark.deadline(90)
def test_run_starts_the_core_and_carries_tcp_udp_dns(running):
    w = running
    st = w.status()
    core = st["xray"]["core"]
    assert core["alive"] and core["pid"] and st["xray"]["node"] == os.path.join(w.nodes, "a.json")
    assert st["xray"]["runtime_config"] is None          # node a has every inbound
    _, size, sha = w.lab.files["small.bin"]
    r = w.lab.cli_run(["curl", "-sS", "--fail", "--max-time", "20", w.lab.url("small.bin")], timeout=30)
    assert r.returncode == 0 and len(r.stdout) == size, r.stderr.decode() + w.log()
    r6 = w.lab.cli_run(["curl", "-sS", "--fail", "--max-time", "20", w.lab.url("small.bin", v6=True)],
                       timeout=30)
    assert r6.returncode == 0 and len(r6.stdout) == size, r6.stderr.decode() + w.log()
    # udp:53 goes to the dokodemo-door inbound found in the config (no --map given)
    r = dig(w)
    assert r.stdout.decode().split() == [TARGET4], r.stdout + r.stderr
    st = w.status()
    assert st["engine"]["tcp_opened"] >= 3
    assert any(f["inbound"] == "dokodemo://127.0.0.1:10853" for f in st["flows"] if f["proto"] == "udp")
    assert TARGET4 in w.far_log("a") and TARGET6 in w.far_log("a")
    assert "core" in w.lab.log("t2x")        # the core's own log lines are forwarded


@pytest.mark.deadline(90)
def test_killed_core_is_restarted(running):
    w = running
    pid = w.status()["xray"]["core"]["pid"]
    os.kill(pid, signal.SIGKILL)
    netlab.wait_until(lambda: (w.status()["xray"]["core"]["restarts"] >= 1
                               and w.status()["xray"]["core"]["alive"]), 15, "the core's restart")
    core = w.status()["xray"]["core"]
    assert core["pid"] != pid and core["last_reason"] == "killed by SIGKILL" and core["reloads"] == 0
    netlab.wait_until(lambda: w.echo(b"again", timeout=2, quiet=True) == b"again", 15,
                      "an echo after the restart", interval=0.2)
    assert "core exited: killed by SIGKILL; restarting in" in w.lab.log("t2x")


@pytest.mark.deadline(120)
def test_node_use_switches_mid_run(running):
    w = running
    old = w.connect((TARGET4, ECHO_PORT))
    old.sendall(b"hello a")
    assert old.recv(100) == b"hello a"
    assert w.status()["xray"]["node"].endswith("a.json")
    before_b = w.far_log("b")
    t0 = time.monotonic()
    r = w.lab.cli_run(T2X + ["node", "use", "b", "--xray-config", w.link, "--control", w.ctl],
                      timeout=40)
    assert r.returncode == 0, r.stderr.decode() + w.log()
    print(f"node use b -> switched: {time.monotonic() - t0:.2f} s")
    assert os.readlink(w.link) == "nodes/b.json"
    st = w.status()["xray"]
    assert st["node"] == os.path.join(w.nodes, "b.json") and st["switches"] == 1
    # a switch is a reload of the core, not a restart (restarts count its deaths)
    assert (st["core"]["reloads"], st["core"]["restarts"]) == (1, 0), st["core"]
    # node b has no socks inbound: the runtime config beside the link adds one
    assert st["runtime_config"] == os.path.join(w.dir, ".config.tun2xray.json")
    rt = json.load(open(st["runtime_config"]))
    assert [ib["protocol"] for ib in rt["inbounds"]] == ["dokodemo-door", "socks"]
    # the old node's flow was reset
    old.settimeout(5)
    try:
        got = old.recv(100)
        outcome = "eof" if got == b"" else got
    except ConnectionResetError:
        outcome = "reset"
    old.close()
    assert outcome in ("reset", "eof"), outcome
    # new flows use node b
    netlab.wait_until(lambda: w.echo(b"hello b", timeout=2, quiet=True) == b"hello b", 10,
                      "an echo through node b", interval=0.2)
    netlab.wait_until(lambda: len(w.far_log("b")) > len(before_b), 5, "far core b's access log")
    assert TARGET4 in w.far_log("b")[len(before_b):]
    assert w.status()["engine"]["flows_reset"] >= 1
    # the user's node files are untouched; list marks b
    r = w.lab.cli_run(T2X + ["node", "list", "--xray-config", w.link], timeout=10)
    assert r.stdout.decode().splitlines() == ["  a", "* b", "  c"]


@pytest.mark.deadline(60)
def test_node_use_bad_input_leaves_the_link(world):
    w = world
    w.select("a")
    with open(os.path.join(w.nodes, "broken.json"), "w") as f:
        json.dump({"inbounds": [{"port": 1080, "protocol": "nosuch"}],
                   "outbounds": [{"protocol": "freedom"}]}, f)
    try:
        for name, needle in (("nosuch-node", 'no node "nosuch-node"'), ("broken", "nosuch")):
            r = w.lab.cli_run(T2X + ["node", "use", name, "--xray-config", w.link], timeout=30)
            lines = r.stderr.decode().strip().splitlines()
            assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], r.stderr
            assert os.readlink(w.link) == "nodes/a.json"
    finally:
        os.unlink(os.path.join(w.nodes, "broken.json"))


# --- --auto-route -----------------------------------------------------------------

def route_dev(world, addr, mark=None):
    args = ["route", "get", addr] + (["mark", hex(mark)] if mark is not None else [])
    out = world.lab.ip(world.lab.cli_ns, *args)
    return out.split(" dev ", 1)[1].split()[0]


def far_packets(pcap_path):
    import dpkt
    far = {socket.inet_aton(FAR_A), socket.inet_aton(FAR_B)}
    n = total = 0
    with open(pcap_path, "rb") as f:
        for _, buf in dpkt.pcap.Reader(f):
            total += 1
            if len(buf) >= 20 and buf[0] >> 4 == 4 and (buf[12:16] in far or buf[16:20] in far):
                n += 1
    return n, total


@pytest.mark.deadline(120)
def test_auto_route_is_loop_free_and_cleaned_up(world):
    w = world
    w.select("a")
    before = w.rules_snapshot()
    assert route_dev(w, TARGET4) == w.lab.veth_cli       # the plain default route
    pcap = os.path.join(w.lab.workdir, "auto.pcap")
    p = w.start("--auto-route", "--record", pcap, route=False)
    try:
        # everything goes through the TUN; the core's marked traffic around it
        assert route_dev(w, TARGET4) == TUN
        assert route_dev(w, TARGET6) == TUN
        assert route_dev(w, "192.0.2.77") == TUN
        assert route_dev(w, FAR_B) == TUN                # not node a's server: the TUN
        assert route_dev(w, FAR_B, mark=MARK) == w.lab.veth_cli
        assert route_dev(w, FAR_A) == w.lab.veth_cli     # node a's server is excluded
        rules = w.lab.ip(w.lab.cli_ns, "rule")
        assert f"{PRIO}:\tfrom all fwmark {hex(MARK)} lookup main" in rules, rules
        assert f"{PRIO + 3}:\tfrom all lookup 7478" in rules, rules
        # the running core's config carries the mark on its outbound
        rt = json.load(open(w.status()["xray"]["runtime_config"]))
        assert rt["outbounds"][0]["streamSettings"]["sockopt"]["mark"] == MARK
        _, size, _ = w.lab.files["small.bin"]
        for v6 in (False, True):
            r = w.lab.cli_run(["curl", "-sS", "--fail", "--max-time", "20",
                               w.lab.url("small.bin", v6=v6)], timeout=30)
            assert r.returncode == 0 and len(r.stdout) == size, r.stderr.decode() + w.log()
        r = dig(w)
        assert r.stdout.decode().split() == [TARGET4], r.stdout + r.stderr + w.log().encode()
        # the core's socket to the far server carries the mark
        ss = w.lab.cli_run(["ss", "-tnHe", "dst", FAR_A], timeout=10).stdout.decode()
        assert f"fwmark:{hex(MARK)}" in ss, ss
        # switch to node b: its server is not excluded, so only the mark keeps
        # the core's traffic out of the TUN
        r = w.lab.cli_run(T2X + ["node", "use", "b", "--xray-config", w.link, "--control", w.ctl],
                          timeout=40)
        assert r.returncode == 0, r.stderr.decode() + w.log()
        assert route_dev(w, FAR_A) == TUN and route_dev(w, FAR_B) == w.lab.veth_cli
        before_b = len(w.far_log("b"))
        netlab.wait_until(lambda: w.echo(b"via b", timeout=2, quiet=True) == b"via b", 15,
                          "an echo through node b", interval=0.2)
        assert TARGET4 in w.far_log("b")[before_b:]
        st = w.status()
        assert st["engine"]["tcp_opened"] >= 3
        # a crash of the core: restarted, and the exit below still cleans up
        pid = st["xray"]["core"]["pid"]
        os.kill(pid, signal.SIGKILL)
        netlab.wait_until(lambda: w.status()["xray"]["core"]["pid"] not in (None, pid), 15,
                          "the core's restart")
        netlab.wait_until(lambda: w.echo(b"after crash", timeout=2, quiet=True) == b"after crash",
                          15, "an echo after the core's restart", interval=0.2)
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            rc = p.wait(15)
        finally:
            w.stop()
    assert rc == 0, w.log()
    # nothing of ours is left in the routing tables
    assert_same_tables(w.rules_snapshot(), before)
    # the core's own traffic never entered the TUN
    n, total = far_packets(pcap)
    assert total > 20 and n == 0, (n, total)


@pytest.mark.deadline(90)
@pytest.mark.parametrize("case", ["rejected", "no-binary", "dangling", "no-inbound", "trailing-comma"])
def test_bad_input_is_one_line_and_leaves_no_routes(world, case):
    w = world
    w.select("a")
    before = w.rules_snapshot()
    extra = ["--auto-route"]
    link = w.link
    if case == "rejected":
        path = os.path.join(w.dir, "rejected.json")
        with open(path, "w") as f:
            json.dump({"inbounds": [{"port": 1080, "protocol": "nosuch"}],
                       "outbounds": [{"protocol": "freedom"}]}, f)
        link, needle = path, "nosuch"
    elif case == "no-binary":
        extra += ["--xray-bin", "/nonexistent/xray"]
        needle = "/nonexistent/xray: not found"
    elif case == "dangling":
        link = os.path.join(w.dir, "dangling.json")
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink("nodes/gone.json", link)
        needle = "dangling link to nodes/gone.json"
    elif case == "no-inbound":
        path = os.path.join(w.dir, "noinbound.json")
        with open(path, "w") as f:
            json.dump({"inbounds": {"socks": 1080}}, f)
        link, needle = path, "no usable socks inbound and no way to add one"
    else:
        # the core rejects a trailing comma, so tun2xray does, naming the
        # node's file (not the link), line and column
        path = os.path.join(w.nodes, "trailing.json")
        with open(path, "w") as f:
            f.write('// a node\n{"outbounds": [\n  {"protocol": "freedom"},\n]}\n')
        link = os.path.join(w.dir, "trailing-link.json")
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink("nodes/trailing.json", link)
        needle = f"{path}: line 3 column 26: trailing comma before ']'"
        from tun2xray.xray import CoreError, check_config
        with pytest.raises(CoreError, match="failed to read config file"):
            check_config(w.lab.core, path)                 # the core's own verdict
    argv = T2X + ["run", "--device", f"tun://{TUN}", "--xray-config", link, *extra]
    r = w.lab.cli_run(argv, timeout=40)
    lines = r.stderr.decode().strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("tun2xray: error:") and needle in lines[0], lines
    assert ".tun2xray.json" not in lines[0]          # the user's file, never the runtime copy
    if case == "rejected":
        assert f"rejected {path}:" in lines[0], lines
    assert_same_tables(w.rules_snapshot(), before)
    assert not netlab.link_exists(w.lab.cli_ns, TUN)
    assert not [f for f in os.listdir(w.dir) if f.endswith(".tun2xray.json")]
    # no core left running
    assert not netlab._proc_listening(w.lab.cli_ns, "tcp", 10808)


# --- doctor ---------------------------------------------------------------------------

def doctor(w, *extra):
    argv = T2X + ["doctor", "--control", w.ctl, "--tcp", f"{TARGET4}:{ECHO_PORT}",
                  "--tcp", f"[{TARGET6}]:{ECHO_PORT}", "--udp", f"{TARGET4}:{ECHO_PORT}",
                  "--udp", f"[{TARGET6}]:{ECHO_PORT}", "--dns", f"web.e2.test@{DNS4}",
                  "--timeout", "2", *extra]
    r = w.lab.cli_run(argv, timeout=60)
    return r.returncode, r.stdout.decode().splitlines(), r.stderr.decode()


@pytest.mark.deadline(150)
def test_doctor_passes_then_names_a_loop_and_a_stopped_core(world):
    w = world
    w.select("a")
    w.start("--auto-route", route=False)
    try:
        rc, lines, err = doctor(w)
        assert rc == 0, "\n".join(lines) + err + w.log()
        names = [ln.split(": ", 1)[0] for ln in lines[:-1]]
        assert all(ln.startswith("[PASS] ") for ln in lines[:-1]), lines
        for want in ("[PASS] control", "[PASS] tun", "[PASS] routes/ipv4", "[PASS] routes/ipv6",
                     "[PASS] loop", "[PASS] core", "[PASS] inbound socks", "[PASS] inbound dns",
                     "[PASS] dns web.e2.test", f"[PASS] tcp/ipv4 through {TARGET4}:{ECHO_PORT}",
                     f"[PASS] tcp/ipv6 around [{TARGET6}]:{ECHO_PORT}",
                     f"[PASS] udp/ipv4 through {TARGET4}:{ECHO_PORT}",
                     f"[PASS] udp/ipv6 through [{TARGET6}]:{ECHO_PORT}"):
            assert want in names, (want, lines)
        assert lines[-1].endswith(" 0 failed")
        # "around" is looked up with the core's mark: the veth, not the TUN
        around = [ln for ln in lines if ln.split(" ")[1] in ("tcp/ipv4", "tcp/ipv6", "udp/ipv4", "udp/ipv6")
                  and " around " in ln]
        assert around and all(ln.endswith(f"via {w.lab.veth_cli}") for ln in around), around

        # a deliberate loop: the far core's address routed into the TUN
        w.lab.ip(w.lab.cli_ns, "route", "add", f"{FAR_A}/32", "dev", TUN)
        try:
            rc, lines, err = doctor(w)
        finally:
            w.lab.ip(w.lab.cli_ns, "route", "del", f"{FAR_A}/32", "dev", TUN)
        fails = [ln for ln in lines if ln.startswith("[FAIL]")]
        assert rc == 1 and len(fails) >= 1, lines
        assert fails[0].startswith("[FAIL] loop: outbound server 10.201.0.2:10086 is routed into xrtun0"), fails
        assert "hint:" in fails[0]

        # a stopped core
        pid = w.status()["xray"]["core"]["pid"]
        os.kill(pid, signal.SIGSTOP)
        try:
            rc, lines, err = doctor(w)
        finally:
            os.kill(pid, signal.SIGCONT)
        fails = [ln for ln in lines if ln.startswith("[FAIL]")]
        assert rc == 1, lines
        assert f"[FAIL] core: pid {pid} is stopped (state T)" in [f.split(" -- ")[0] for f in fails], fails
        assert any(f.startswith("[FAIL] inbound socks") for f in fails), fails
        # and healthy again
        rc, lines, err = doctor(w)
        assert rc == 0, lines
    finally:
        w.stop()


@pytest.mark.deadline(30)
def test_doctor_without_a_running_tun2xray(world):
    r = world.lab.cli_run(T2X + ["doctor", "--control", "unix:///tmp/xr-nothing.sock",
                                 "--device", f"tun://{TUN}"], timeout=20)
    lines = r.stdout.decode().splitlines()
    assert r.returncode == 1
    assert lines[0].startswith("[FAIL] control: unix:///tmp/xr-nothing.sock")
    assert lines[1].startswith(f"[FAIL] tun: no interface {TUN}")


@pytest.mark.deadline(120)
def test_auto_route_after_sigkill_next_run_cleans_up(world, tmp_path):
    """A killed tun2xray cannot clean up: its core dies with it and the next
    run removes the rules it left.  Profile excluded_routes go around the TUN."""
    w = world
    w.select("a")
    before = w.rules_snapshot()
    profile = os.path.join(w.lab.workdir, "xr-profile.json")
    with open(profile, "w") as f:
        json.dump({"ipv4": {"excluded_routes": ["192.0.2.0/24"]},
                   "ipv6": {"excluded_routes": ["2001:db8::/32"]}}, f)
    p = w.start("--auto-route", "--config", profile, route=False)
    try:
        assert route_dev(w, "192.0.2.9") == w.lab.veth_cli
        assert route_dev(w, "2001:db8::9") == w.lab.veth_cli
        assert route_dev(w, "198.51.100.9") == TUN
        core_pid = w.status()["xray"]["core"]["pid"]
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(5)
        w.stop()
        netlab.wait_until(lambda: not netlab._alive(core_pid), 5, "the orphaned core to exit")
        assert f"{PRIO}:" in w.lab.ip(w.lab.cli_ns, "rule")          # left behind
        p = w.start("--auto-route", route=False)
        assert "left by an earlier run" in w.lab.log("t2x")
        assert route_dev(w, "192.0.2.9") == TUN                      # not excluded this time
        opened = w.status()["engine"]["tcp_opened"]
        assert w.echo(b"clean") == b"clean"
        assert w.status()["engine"]["tcp_opened"] == opened + 1      # through the TUN
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            p.wait(15)
        w.stop()
    assert_same_tables(w.rules_snapshot(), before)


@pytest.mark.deadline(120)
def test_auto_route_follows_a_new_egress(world):
    """The default route moves to another interface: the core is reloaded
    (its sockets rebound) and traffic keeps flowing over the new path."""
    w = world
    lab = w.lab
    w.select("a")
    lab.ip(None, "link", "add", "xrv2", "netns", lab.cli_ns, "type", "veth", "peer", "name", "xrv3",
           "netns", lab.srv_ns)
    try:
        lab.ip(lab.cli_ns, "addr", "add", "10.202.0.1/30", "dev", "xrv2")
        lab.ip(lab.srv_ns, "addr", "add", "10.202.0.2/30", "dev", "xrv3")
        lab.ip(lab.cli_ns, "link", "set", "xrv2", "up")
        lab.ip(lab.srv_ns, "link", "set", "xrv3", "up")
        p = w.start("--auto-route", route=False)
        try:
            pid = w.status()["xray"]["core"]["pid"]
            lab.ip(lab.cli_ns, "route", "replace", "default", "via", "10.202.0.2", "dev", "xrv2")
            netlab.wait_until(lambda: w.status()["xray"]["switches"] >= 1, 15, "the egress reload")
            st = w.status()["xray"]
            assert st["core"]["alive"] and st["core"]["pid"] != pid
            assert "default route moved" in lab.log("t2x")
            assert route_dev(w, FAR_A) == "xrv2" and route_dev(w, TARGET4) == TUN
            netlab.wait_until(lambda: w.echo(b"new path", timeout=2, quiet=True) == b"new path", 15,
                              "an echo over the new egress", interval=0.2)
            ss = lab.cli_run(["ss", "-tnH", "src", "10.202.0.1", "dst", FAR_A], timeout=10).stdout
            assert ss.strip(), "the core's connection does not use the new egress"
        finally:
            p.send_signal(signal.SIGTERM)
            p.wait(15)
            w.stop()
    finally:
        lab.ip(lab.cli_ns, "route", "replace", "default", "via", netlab.VETH_SRV4)
        lab.ip(lab.cli_ns, "link", "del", "xrv2")


@pytest.mark.deadline(90)
def test_client_config_without_inbounds(world):
    """Node c has outbounds and a DNS server only: tun2xray adds a socks
    inbound and a DNS dokodemo-door to that server in its runtime config."""
    w = world
    w.select("c")
    w.start()
    try:
        st = w.status()["xray"]
        rt = json.load(open(st["runtime_config"]))
        assert [(ib["tag"], ib["protocol"]) for ib in rt["inbounds"]] == [
            ("tun2xray-socks", "socks"), ("tun2xray-dns", "dokodemo-door")]
        r = dig(w, qtype="AAAA")
        assert r.stdout.decode().split() == [TARGET6], r.stdout + r.stderr + w.log().encode()
        flows = w.status()["flows"]
        dns_port = rt["inbounds"][1]["port"]
        assert any(f["inbound"] == f"dokodemo://127.0.0.1:{dns_port}" for f in flows), flows
        assert w.echo(b"node c") == b"node c"
    finally:
        w.stop()
        w.select("a")
    assert not os.path.exists(st["runtime_config"])           # removed on exit
