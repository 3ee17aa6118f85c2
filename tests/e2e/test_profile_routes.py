"""`tun2xray run --config profile.json` alone: the profile's routes and DNS
servers go on the TUN, carry traffic through the core, and go on exit.

Lab prefix "pr" (pr-cli, pr-srv). Nothing here calls Lab.route_via: pr-cli
has no route to the targets (10.99.0.0/24, fd99::/64) except the ones
tun2xray adds from the profile.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import netlab
import pytest
from netlab import DNS_NAMES, DOKODEMO_PORT, ECHO_PORT, SOCKS_PORT, TARGET4, TARGET6

from tun2xray.control import query

pytestmark = pytest.mark.e2e

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
# DNS "servers" where nothing listens: a query to them is answered only when
# it goes into the TUN and the udp/53 rule hands it to the dokodemo inbound
# (whose fixed target is the lab's dnsmasq)
NOWHERE4, NOWHERE6 = "10.99.0.99", "fd99::99"


@pytest.fixture(scope="module")
def plab():
    if os.geteuid() != 0:
        pytest.skip("e2e tests need root (network namespaces, veth, TUN); CI runs them as root")
    lab = netlab.Lab(prefix="pr")
    with lab:
        yield lab
    assert not netlab.netns_exists(lab.cli_ns)


def routes(lab, dev: str) -> set:
    out = set()
    for fam in ("-4", "-6"):
        try:
            text = lab.ip(lab.cli_ns, fam, "route", "show", "dev", dev)
        except RuntimeError:            # no such device
            return set()
        out |= {line.split()[0] for line in text.splitlines() if line.strip()}
    return out


def write_profile(lab, name: str, profile: dict) -> str:
    path = os.path.join(lab.workdir, name)
    with open(path, "w") as f:
        json.dump(profile, f)
    return path


def base_profile(tun: str, ctl: str) -> dict:
    return {
        "device": f"tun://{tun}",
        "proxy": f"socks5://127.0.0.1:{SOCKS_PORT}",
        "control": f"unix://{ctl}",
        "ipv4": {"routes": [f"{TARGET4}/32"]},
        "ipv6": {"routes": [f"{TARGET6}/128"]},
        "dns": {"servers": [NOWHERE4, NOWHERE6]},
        "rules": [{"network": "udp", "port": 53, "to": f"dokodemo://127.0.0.1:{DOKODEMO_PORT}"}],
    }


def echo_ok(lab) -> bool:
    import socket
    try:
        with lab.in_cli():
            s = socket.socket()
        with s:
            s.settimeout(2)
            s.connect((TARGET4, ECHO_PORT))
            s.sendall(b"ping")
            return s.recv(4) == b"ping"
    except OSError:
        return False


@pytest.mark.deadline(120)
@pytest.mark.parametrize("kind", ["created", "persistent"])
def test_profile_routes_carry_traffic_and_go_on_exit(plab, kind):
    lab = plab
    tun = "prtun0" if kind == "created" else "prtun1"
    ctl = f"/tmp/pr-ctl-{kind}.sock"
    profile = base_profile(tun, ctl)
    if kind == "persistent":
        lab.ip(lab.cli_ns, "tuntap", "add", tun, "mode", "tun")
        profile["workers"] = 1          # a plain `ip tuntap` TUN has one queue
    # (created: the default, one worker per core on a multi-queue TUN)
    expected = {TARGET4, NOWHERE4, TARGET6, NOWHERE6}
    path = write_profile(lab, f"profile-{kind}.json", profile)
    assert not any(r in expected for r in routes(lab, "lo")), "lab baseline"
    p = lab.cli_popen("tun2xray", [sys.executable, "-m", "tun2xray.cli", "run", "--config", path],
                      cwd=REPO, env=ENV)
    try:
        def up():
            if p.poll() is not None:
                raise AssertionError(f"run exited {p.returncode}: {lab.log('tun2xray')[-1500:]}")
            return routes(lab, tun) >= expected
        netlab.wait_until(up, 20, f"the profile's routes on {tun}")
        # the TUN's own subnets are the kernel's; everything else is the profile's
        assert {r for r in routes(lab, tun) if not r.startswith(("198.18.", "fd00:7478:", "fe80:"))} \
            == expected, routes(lab, tun)
        netlab.wait_until(lambda: up() and echo_ok(lab), 20, "a TCP echo through the profile's route",
                          interval=0.2)

        with lab.in_cli():
            st = query(f"unix://{ctl}")
        net = st["network"]
        assert net["owner"] == "tun2xray" and net["routes_applied_by"] == "tun2xray"
        assert sorted(net["routes_added"]) == sorted(
            [f"{TARGET4}/32", f"{NOWHERE4}/32", f"{TARGET6}/128", f"{NOWHERE6}/128"])

        # curl to the routed prefixes reaches the server through the core
        _, size, sha = lab.files["small.bin"]
        for v6 in (False, True):
            r = lab.cli_run(["curl", "-sS", "--max-time", "20", "-o", "-", lab.url("small.bin", v6)],
                            timeout=30)
            assert r.returncode == 0, r.stderr.decode()
            assert len(r.stdout) == size and hashlib.sha256(r.stdout).hexdigest() == sha

        # dig @server for the profile's DNS servers: through the TUN and the
        # udp/53 rule (nothing listens on those addresses)
        want4, want6 = DNS_NAMES["web.e2.test"]
        for server, qtype, want in ((NOWHERE4, "A", want4), (NOWHERE6, "AAAA", want6)):
            r = lab.cli_run(["dig", f"@{server}", "web.e2.test", qtype, "+short", "+time=3", "+tries=2"],
                            timeout=30)
            assert r.stdout.decode().split() == [want], (server, r.stdout, r.stderr)
    finally:
        rc = lab.stop("tun2xray")
    assert rc == 0, lab.log("tun2xray")[-1500:]
    try:
        if kind == "persistent":
            assert netlab.link_exists(lab.cli_ns, tun)
            assert not (routes(lab, tun) & expected), routes(lab, tun)
        else:
            assert not netlab.link_exists(lab.cli_ns, tun)
        # and nothing of ours stayed anywhere else in the main table
        text = lab.ip(lab.cli_ns, "route", "show") + lab.ip(lab.cli_ns, "-6", "route", "show")
        assert TARGET4 not in text and NOWHERE4 not in text and "fd99::" not in text, text
    finally:
        if kind == "persistent":
            lab.ip(lab.cli_ns, "tuntap", "del", tun, "mode", "tun")


@pytest.mark.deadline(60)
def test_a_conflicting_route_is_one_line_and_leaves_nothing(plab):
    lab = plab
    tun = "prtun2"
    lab.ip(lab.cli_ns, "tuntap", "add", tun, "mode", "tun")
    try:
        profile = base_profile(tun, "/tmp/pr-ctl-conflict.sock")
        # the veth's connected subnet already has a route through prv0
        profile["ipv4"]["routes"] = [f"{TARGET4}/32", "10.200.0.0/30"]       # the veth's subnet
        profile["workers"] = 1
        path = write_profile(lab, "profile-conflict.json", profile)
        r = lab.cli_run([sys.executable, "-m", "tun2xray.cli", "run", "--config", path], timeout=30)
        lines = r.stderr.decode().strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, r.stderr.decode()
        assert lines[0].startswith("tun2xray: error: ipv4.routes: 10.200.0.0/30: a route to it already "
                                   "exists"), lines[0]
        assert routes(lab, tun) & {TARGET4, NOWHERE4, TARGET6, NOWHERE6} == set(), routes(lab, tun)
        assert "10.200.0.0/30 dev prv0" in lab.ip(lab.cli_ns, "route", "show")
    finally:
        lab.ip(lab.cli_ns, "tuntap", "del", tun, "mode", "tun")


@pytest.mark.deadline(60)
def test_host_owned_device_reports_routes_and_applies_none(plab):
    """unix:// device: the host owns it; status says what to route, the
    main table is untouched."""
    lab = plab
    ctl = "/tmp/pr-ctl-unix.sock"
    profile = base_profile("unused", ctl)
    profile["device"] = f"unix://{lab.workdir}/pr-dev.sock"
    path = write_profile(lab, "profile-unix.json", profile)
    before = lab.ip(lab.cli_ns, "route", "show") + lab.ip(lab.cli_ns, "-6", "route", "show")
    p = lab.cli_popen("tun2xray-unix", [sys.executable, "-m", "tun2xray.cli", "run", "--config", path],
                      cwd=REPO, env=ENV)
    try:
        def status():
            if p.poll() is not None:
                raise AssertionError(f"run exited {p.returncode}: {lab.log('tun2xray-unix')[-1500:]}")
            try:
                with lab.in_cli():
                    return query(f"unix://{ctl}")
            except (OSError, ValueError):
                return None
        st = netlab.wait_until(status, 20, "status of the unix:// run")
        net = st["network"]
        assert net["owner"] == "host" and net["routes_applied_by"] == "host" and net["routes_added"] == []
        assert net["ipv4"]["routes"] == [f"{TARGET4}/32"] and net["dns"]["servers"] == [NOWHERE4, NOWHERE6]
        after = lab.ip(lab.cli_ns, "route", "show") + lab.ip(lab.cli_ns, "-6", "route", "show")
        assert after == before
    finally:
        lab.stop("tun2xray-unix")


def route_get(lab, addr: str) -> str:
    r = lab.cli_run(["ip", "route", "get", addr], timeout=10)
    return r.stdout.decode() if r.returncode == 0 else ""


@pytest.mark.deadline(120)
def test_auto_route_uses_the_profiles_routes(plab):
    """A profile alone with "xray": {"config", "auto_route"}: the core is
    started, and auto-route sends only the profile's routes (and DNS hosts)
    into the TUN; everything it added is gone on exit."""
    lab = plab
    tun = "prtun3"
    cfg = netlab.local_core_config(lab.user_id, lab.workdir)
    for inb, port in zip(cfg["inbounds"], (11808, 11853)):     # beside the lab's own core
        inb["port"] = port
    core_path = write_profile(lab, "pr-xray.json", cfg)
    ctl = "/tmp/pr-ctl-auto.sock"
    profile = base_profile(tun, ctl)
    del profile["proxy"]                                    # the config's socks inbound
    profile["rules"][0]["to"] = "dokodemo://127.0.0.1:11853"
    profile.update(workers=1, xray={"config": core_path, "auto_route": True, "bin": lab.core})
    path = write_profile(lab, "profile-auto.json", profile)
    p = lab.cli_popen("tun2xray-auto", [sys.executable, "-m", "tun2xray.cli", "run", "--config", path],
                      cwd=REPO, env=ENV)
    try:
        def up():
            if p.poll() is not None:
                raise AssertionError(f"run exited {p.returncode}: {lab.log('tun2xray-auto')[-1500:]}")
            return f"dev {tun}" in route_get(lab, TARGET4)
        netlab.wait_until(up, 30, f"auto-route through {tun}")
        for addr in (TARGET4, NOWHERE4, TARGET6, NOWHERE6):
            assert f"dev {tun}" in route_get(lab, addr), (addr, route_get(lab, addr))
        for addr in ("10.99.0.53", "fd99::53"):             # in the lab's prefixes, not in the profile
            assert f"dev {tun}" not in route_get(lab, addr), (addr, route_get(lab, addr))
        netlab.wait_until(lambda: up() and echo_ok(lab), 20, "a TCP echo through auto-route", interval=0.2)
        _, _, sha = lab.files["small.bin"]
        r = lab.cli_run(["curl", "-sS", "--max-time", "20", "-o", "-", lab.url("small.bin")], timeout=30)
        assert r.returncode == 0 and hashlib.sha256(r.stdout).hexdigest() == sha, r.stderr.decode()
        r = lab.cli_run(["dig", f"@{NOWHERE4}", "web.e2.test", "A", "+short", "+time=3", "+tries=2"],
                        timeout=30)
        assert r.stdout.decode().split() == [DNS_NAMES["web.e2.test"][0]], (r.stdout, r.stderr)
        with lab.in_cli():
            net = query(f"unix://{ctl}")["network"]
        assert net["routes_applied_by"] == "auto-route" and net["routes_added"] == []
    finally:
        rc = lab.stop("tun2xray-auto", timeout=10)
    assert rc == 0, lab.log("tun2xray-auto")[-1500:]
    assert "947" not in lab.ip(lab.cli_ns, "rule", "show")
    assert lab.ip(lab.cli_ns, "route", "show", "table", "7478").strip() == ""
