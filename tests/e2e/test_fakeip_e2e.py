"""Names end to end: the DNS layer and dialing by name together, with real
clients that resolve through the system resolver.

The client namespace's resolv.conf names the TUN's DNS address, so curl
and a Python UDP client look ``web.e2.test`` up as any app would, get a
fake address (or, in remember mode, the real one), and connect to it.  The
far v2ray core's access log then shows the CONNECT (and the UDP datagrams)
by name, never by the address the app used.  Also: a fake address handed
out before a restart still works after it (cache file), and a fake
address nobody handed out is refused at once.

Its own lab (prefix fk: namespaces fk-cli / fk-srv, TUN fktun0), with its
own core configs: the far core resolves names through the lab's dnsmasq.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import shutil
import sys
import uuid

import pytest

import netlab
from netlab import ECHO_PORT, HTTP_PORT, TARGET4

pytestmark = pytest.mark.e2e

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
ENV.pop("TUN2XRAY_WORKERS", None)
NAME = "web.e2.test"                    # dnsmasq in fk-srv answers it with TARGET4 / TARGET6
POOL4, POOL6 = ipaddress.ip_network("198.19.0.0/16"), ipaddress.ip_network("fd00:7478:f::/64")
DNS_ADDR = "198.18.0.2"                 # the TUN's DNS address (inside 198.18.0.1/15)
TUN = "fktun0"
FILE = "small.bin"


def _far_config(lab, uid) -> dict:
    return {
        "log": {"loglevel": "warning", "access": os.path.join(lab.workdir, "far-fk.access"),
                "error": os.path.join(lab.workdir, "far-fk.err")},
        "policy": netlab._policy(),
        "dns": {"servers": [netlab.DNS4]},
        "inbounds": [{"tag": "vless", "listen": netlab.VETH_SRV4, "port": netlab.VLESS_PORT,
                      "protocol": "vless",
                      "settings": {"clients": [{"id": uid, "email": "c@fk"}], "decryption": "none"}}],
        "outbounds": [{"tag": "direct", "protocol": "freedom", "settings": {"domainStrategy": "UseIPv4"}}],
    }


def _local_config(lab, uid) -> dict:
    return {
        "log": {"loglevel": "warning", "access": os.path.join(lab.workdir, "local-fk.access")},
        "policy": netlab._policy(),
        "inbounds": [
            {"tag": "socks", "listen": "127.0.0.1", "port": netlab.SOCKS_PORT, "protocol": "socks",
             "settings": {"auth": "noauth", "udp": True, "ip": "127.0.0.1"}},
            {"tag": "dns", "listen": "127.0.0.1", "port": netlab.DOKODEMO_PORT, "protocol": "dokodemo-door",
             "settings": {"address": netlab.DNS4, "port": netlab.DNS_PORT, "network": "tcp,udp"}}],
        "outbounds": [{"tag": "hop", "protocol": "vless",
                       "settings": {"vnext": [{"address": netlab.VETH_SRV4, "port": netlab.VLESS_PORT,
                                               "users": [{"id": uid, "encryption": "none"}]}]}}],
    }


@pytest.fixture(scope="module")
def flab():
    if os.geteuid() != 0:
        pytest.skip("e2e tests need root (network namespaces, veth, TUN); CI runs them as root")
    lab = netlab.Lab(prefix="fk", start=False, files={FILE: netlab.DEFAULT_FILES[FILE]})
    # `ip netns exec fk-cli` mounts this over /etc/resolv.conf: the client's
    # system resolver asks the TUN's DNS address, as an app on a phone would
    etc = f"/etc/netns/{lab.cli_ns}"
    try:
        with lab:
            os.makedirs(etc, exist_ok=True)
            with open(os.path.join(etc, "resolv.conf"), "w") as f:
                f.write(f"nameserver {DNS_ADDR}\noptions timeout:3 attempts:2\n")
            lab.start_servers()
            uid = str(uuid.uuid4())
            far = lab._write_config("far-fk.json", _far_config(lab, uid))
            p = lab.spawn("far-core", lab.srv_ns, netlab.core_cmd(lab.core, far))
            netlab.wait_port(lab.srv_ns, netlab.VLESS_PORT, "tcp", proc=p)
            local = lab._write_config("local-fk.json", _local_config(lab, uid))
            p = lab.spawn("local-core", lab.cli_ns, netlab.core_cmd(lab.core, local))
            netlab.wait_port(lab.cli_ns, netlab.SOCKS_PORT, "tcp", proc=p)
            netlab.wait_port(lab.cli_ns, netlab.DOKODEMO_PORT, "udp", proc=p)
            yield lab
    finally:
        shutil.rmtree(etc, ignore_errors=True)
    assert not netlab.netns_exists(lab.cli_ns)


def far_log(lab) -> str:
    with contextlib.suppress(FileNotFoundError), open(os.path.join(lab.workdir, "far-fk.access")) as f:
        return f.read()
    return ""


def ctl(lab) -> str:
    return f"unix://{lab.workdir}/{TUN}.sock"


def status(lab) -> dict:
    from tun2xray.control import query
    return query(ctl(lab), timeout=5)


def start(lab, mode, cache=None):
    dns = {"mode": mode}
    if cache is not None:
        dns["cache_file"] = cache
    path = os.path.join(lab.workdir, "fk-profile.json")
    with open(path, "w") as f:
        json.dump({"dns": dns}, f)
    argv = [sys.executable, "-m", "tun2xray", "run", "--device", f"tun://{TUN}", "--control", ctl(lab),
            "--config", path, "--address", "198.18.0.1/15", "--address6", "fd00:7478::1/64",
            "--proxy", f"socks5://127.0.0.1:{netlab.SOCKS_PORT}",
            "--map", f"udp:53=dokodemo://127.0.0.1:{netlab.DOKODEMO_PORT}"]
    return lab.run_tun2xray(argv, TUN, name="t2x", env=ENV,
                            describe=lambda: lab.log("t2x")[-3000:])


@contextlib.contextmanager
def running(lab, mode, cache=None):
    start(lab, mode, cache)
    try:
        yield lab
    finally:
        lab.stop("t2x", timeout=10)
        lab.unroute()


def curl(lab, url, *extra):
    """(exit code, body sha256, stderr) of ``curl url`` in fk-cli, resolving
    through the namespace's resolv.conf."""
    out = os.path.join(lab.workdir, "curl.out")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(out)
    r = lab.cli_run(["curl", "-sS", "--max-time", "20", *extra, "-o", out, url], timeout=30)
    digest = None
    if r.returncode == 0:
        with open(out, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    return r.returncode, digest, r.stderr.decode(errors="replace")


def resolve(lab, family) -> str:
    """The address the namespace's system resolver gives NAME (getaddrinfo)."""
    fam = "socket.AF_INET" if family == 4 else "socket.AF_INET6"
    code = f"import socket; print(socket.getaddrinfo({NAME!r}, 80, {fam}, socket.SOCK_STREAM)[0][4][0])"
    r = lab.cli_run([sys.executable, "-c", code], timeout=30)
    assert r.returncode == 0, r.stderr.decode() + lab.log("t2x")[-2000:]
    return r.stdout.decode().strip()


UDP_BY_NAME = """
import socket, sys
ai = socket.getaddrinfo(sys.argv[1], {port}, socket.AF_INET, socket.SOCK_DGRAM)[0][4]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
for _ in range(5):       # a UDP client sends again when the first answer does not come
    s.sendto(b"by-name", ai)
    try:
        data, src = s.recvfrom(2048)
    except TimeoutError:
        continue
    print(ai[0], src[0], data.decode())
    break
else:
    sys.exit("no echo")
"""


@pytest.mark.deadline(180)
def test_fake_ip_apps_resolve_and_connect_by_name(flab):
    lab = flab
    _, _, want = lab.files[FILE]
    with running(lab, "fake-ip"):
        a4, a6 = resolve(lab, 4), resolve(lab, 6)
        assert ipaddress.ip_address(a4) in POOL4 and ipaddress.ip_address(a6) in POOL6, (a4, a6)
        for flag in ("-4", "-6"):
            rc, digest, err = curl(lab, f"http://{NAME}:{HTTP_PORT}/{FILE}", flag)
            assert rc == 0 and digest == want, (flag, rc, err, lab.log("t2x")[-2000:])
        # UDP to the fake address: datagrams go by name, the echo comes back from the fake address
        r = lab.cli_run([sys.executable, "-c", UDP_BY_NAME.format(port=ECHO_PORT), NAME], timeout=30)
        assert r.returncode == 0, r.stderr.decode()
        used, src, data = r.stdout.decode().split()
        assert used == a4 and src == a4 and data == "by-name"
        # the far core was asked by name: two CONNECTs and the UDP flow; never by the fake address
        netlab.wait_until(lambda: far_log(lab).count(f"tcp:{NAME}:{HTTP_PORT}") >= 2
                          and f"udp:{NAME}:{ECHO_PORT}" in far_log(lab), 10, "the far core's access log")
        log = far_log(lab)
        assert a4 not in log and a6 not in log and "198.19." not in log, log
        st = status(lab)
        dns = st["dns"]
        assert dns.get("fake_answers", 0) >= 2, dns
        # a fake address nobody handed out: refused at once (curl "couldn't connect", not a timeout)
        rc, _, err = curl(lab, f"http://198.19.255.200:{HTTP_PORT}/{FILE}")
        assert rc == 7, (rc, err)
        eng = status(lab)["engine"]
        assert eng.get("tcp_unmapped_fake", 0) >= 1, eng


@pytest.mark.deadline(180)
def test_remember_mode_dials_the_real_answer_by_name(flab):
    lab = flab
    _, _, want = lab.files[FILE]
    with running(lab, "remember"):
        addr = resolve(lab, 4)
        assert addr == TARGET4, addr            # the real answer, unchanged
        before = far_log(lab).count(f"tcp:{NAME}:{HTTP_PORT}")
        rc, digest, err = curl(lab, f"http://{addr}:{HTTP_PORT}/{FILE}")
        assert rc == 0 and digest == want, (rc, err)
        netlab.wait_until(lambda: far_log(lab).count(f"tcp:{NAME}:{HTTP_PORT}") > before, 10,
                          "the CONNECT by name in the far core's access log")


@pytest.mark.deadline(240)
def test_a_fake_address_from_before_a_restart_still_works(flab):
    lab = flab
    _, _, want = lab.files[FILE]
    cache = os.path.join(lab.workdir, "fk-names.json")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(cache)
    with running(lab, "fake-ip", cache):
        fake = resolve(lab, 4)
        assert ipaddress.ip_address(fake) in POOL4
    assert os.path.exists(cache)
    with running(lab, "fake-ip", cache):
        # no DNS query this time: the app kept the address it had
        before = far_log(lab).count(f"tcp:{NAME}:{HTTP_PORT}")
        rc, digest, err = curl(lab, f"http://{fake}:{HTTP_PORT}/{FILE}")
        assert rc == 0 and digest == want, (rc, err, lab.log("t2x")[-2000:])
        netlab.wait_until(lambda: far_log(lab).count(f"tcp:{NAME}:{HTTP_PORT}") > before, 10,
                          "the CONNECT by name after the restart")
        assert status(lab)["dns"].get("fake_answers", 0) == 0
