"""The standalone binary (``dist/tun2xray``) on a machine with no Python
packages: the end-to-end smoke checks run with a copy of it outside the
checkout, in an environment that holds only ``PATH=/usr/sbin:/usr/bin:/sbin:/bin``
(no venv, no PYTHONPATH, no pyenv) and a private ``TMPDIR`` (where the
onefile bootloader unpacks itself, so the test can count its directories).

Lab prefix bn (namespaces bn-cli / bn-srv), TUN bntun0.

The binary is ``$TUN2XRAY_BINARY`` when set, else ``dist/tun2xray``, built
here with ``tools/build-binary.sh`` when it is missing or older than the
sources (CI builds it before the tests).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess

import pytest

import netlab
from netlab import DNS4, DNS6, ECHO_PORT, TARGET4, TARGET6

pytestmark = pytest.mark.e2e

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIST = os.path.join(REPO, "dist", "tun2xray")
TUN = "bntun0"
CTL = "/tmp/bn-ctl.sock"
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
SOURCES = ("tun2xray", "netstack", "tools/binary_entry.py", "tools/build-binary.sh", "tools/pyinstaller-hooks",
           "pyproject.toml")
# where Python packages live on a machine: nothing the binary maps may come from these
FOREIGN = ("/usr/lib/python3", "/usr/local/lib/python", "site-packages", "dist-packages",
           "/.pyenv/", "/.venv/", "/binary-venv/", REPO + "/")


def _newest_source() -> float:
    newest = 0.0
    for s in SOURCES:
        path = os.path.join(REPO, s)
        paths = glob.glob(os.path.join(path, "**", "*.py"), recursive=True) if os.path.isdir(path) else [path]
        newest = max([newest] + [os.stat(p).st_mtime for p in paths])
    return newest


@pytest.fixture(scope="session")
def built_binary() -> str:
    """The binary under test: $TUN2XRAY_BINARY, else dist/tun2xray (built
    when missing or stale). A failed build fails the tests: never a skip."""
    given = os.environ.get("TUN2XRAY_BINARY")
    if given:
        assert os.access(given, os.X_OK), f"TUN2XRAY_BINARY={given} is not an executable file"
        return os.path.abspath(given)
    if not os.path.exists(DIST) or os.stat(DIST).st_mtime < _newest_source():
        r = subprocess.run(["bash", os.path.join(REPO, "tools", "build-binary.sh")], cwd=REPO,
                           capture_output=True, text=True, timeout=1200)
        assert r.returncode == 0, f"tools/build-binary.sh failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert os.access(DIST, os.X_OK), "tools/build-binary.sh made no dist/tun2xray"
    return DIST


@pytest.fixture(scope="session")
def home(tmp_path_factory) -> str:
    """A folder outside the checkout: the binary's copy, its TMPDIR, its cwd."""
    d = str(tmp_path_factory.mktemp("bn-binary"))
    assert not d.startswith(REPO + "/")
    os.mkdir(os.path.join(d, "tmp"))
    return d


@pytest.fixture(scope="session")
def binary(built_binary, home) -> str:
    path = os.path.join(home, "tun2xray")
    shutil.copy2(built_binary, path)
    return path


def clean_env(home: str) -> dict:
    return {"PATH": PATH, "TMPDIR": os.path.join(home, "tmp")}


def unpacked(home: str) -> list:
    """The onefile bootloader's unpack directories in our TMPDIR."""
    return sorted(glob.glob(os.path.join(home, "tmp", "_MEI*")))


def run_bin(binary, home, *args, timeout=60, lab=None) -> subprocess.CompletedProcess:
    """Run the binary (in the lab's client namespace when given) with the clean environment."""
    argv = [binary, *args]
    if lab is not None:
        argv = ["ip", "netns", "exec", lab.cli_ns, *argv]
    return subprocess.run(argv, env=clean_env(home), cwd=home, capture_output=True, text=True,
                          timeout=timeout)


def no_traceback(r: subprocess.CompletedProcess) -> None:
    for stream in (r.stdout, r.stderr):
        assert "Traceback" not in stream and "ModuleNotFoundError" not in stream \
            and "ImportError" not in stream, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"


# --- without a lab -------------------------------------------------------------

def test_help_and_version(binary, home):
    r = run_bin(binary, home, "--help")
    assert r.returncode == 0, r.stderr
    for command in ("run", "status", "replay", "node", "doctor"):
        assert command in r.stdout
    if "--version" in r.stdout:          # the packaging work adds it
        import tun2xray
        version = tun2xray.__version__          # pyproject.toml reads it from there
        v = run_bin(binary, home, "--version")
        assert v.returncode == 0 and version in v.stdout + v.stderr, v
        no_traceback(v)
    no_traceback(r)
    assert unpacked(home) == [], "a finished run left its unpacked files behind"


def test_replay_every_capture(binary, home):
    pcaps = sorted(glob.glob(os.path.join(REPO, "pcaps", "*.pcap")))
    assert pcaps
    r = run_bin(binary, home, "replay", *pcaps, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    no_traceback(r)
    for p in pcaps:
        assert p in r.stdout
    j = run_bin(binary, home, "replay", "--json", pcaps[0])
    assert j.returncode == 0 and json.loads(j.stdout.splitlines()[0])


def test_bad_flag_is_one_line(binary, home):
    r = run_bin(binary, home, "run", "--device", "tun://bnbad0", "--map", "udp:53")
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "error" in r.stderr, r.stderr


def test_runs_in_an_empty_root_with_only_glibc(binary, home, root):
    """A root file system holding the binary, the C library (what ldd names,
    plus libm and librt) and nothing else: no Python anywhere."""
    top = os.path.join(home, "root")
    os.makedirs(os.path.join(top, "tmp"))
    r = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True)
    libs = [w for w in r.stdout.split() if w.startswith("/")]
    libc = next(x for x in libs if os.path.basename(x) == "libc.so.6")
    libs += [os.path.join(os.path.dirname(libc), x) for x in ("libm.so.6", "librt.so.1")]
    for lib in libs:
        os.makedirs(os.path.dirname(top + lib), exist_ok=True)
        shutil.copy(lib, top + lib)                     # follows links: the file itself
    shutil.copy(binary, os.path.join(top, "tun2xray"))
    shutil.copytree(os.path.join(REPO, "pcaps"), os.path.join(top, "pcaps"))
    pcaps = sorted(os.path.basename(p) for p in glob.glob(os.path.join(top, "pcaps", "*.pcap")))
    everything = sorted(os.path.relpath(os.path.join(d, f), top)
                        for d, _, files in os.walk(top) for f in files)
    assert not [f for f in everything if "python" in f], everything

    def chrooted(*args):
        return subprocess.run([shutil.which("chroot", path=PATH), top, "/tun2xray", *args], env={"PATH": "/"},
                              capture_output=True, text=True, timeout=120)

    h = chrooted("--help")
    assert h.returncode == 0 and "replay" in h.stdout, h.stderr
    r = chrooted("replay", *[f"/pcaps/{p}" for p in pcaps])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    no_traceback(r)
    assert all(f"/pcaps/{p}:" in r.stdout for p in pcaps)
    assert os.listdir(os.path.join(top, "tmp")) == []


# --- run --workers 2 in a lab ---------------------------------------------------

def run_argv(binary):
    return [binary, "run", "--device", f"tun://{TUN}",
            "--proxy", "socks5://127.0.0.1:10808", "--map", "udp:53=dokodemo://127.0.0.1:10853",
            "--address", "198.18.0.1/15", "--address6", "fd00:7478::1/64",
            "--control", f"unix://{CTL}", "--workers", "2"]


def tree(pid: int) -> list:
    """pid and its descendants, parents first."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError):
                pass
    out, todo = [], [pid]
    while todo:                 # breadth first: pid, its children, theirs
        p = todo.pop(0)
        out.append(p)
        todo += sorted(c for c, pp in parent.items() if pp == p)
    return out


def parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def mapped_files(pid: int) -> set:
    with open(f"/proc/{pid}/maps") as f:
        return {line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6}


@pytest.fixture(scope="module")
def blab():
    if os.geteuid() != 0:
        pytest.skip("e2e tests need root (network namespaces, veth, TUN); CI runs them as root")
    lab = netlab.Lab(prefix="bn", files={"small.bin": (100_000, 1), "8M.bin": (8 << 20, 5)})
    with lab:
        yield lab
    assert not netlab.netns_exists(lab.cli_ns), "bn-cli left behind"
    assert not netlab.netns_exists(lab.srv_ns), "bn-srv left behind"


@pytest.fixture(scope="module")
def frozen_run(blab, binary, home):
    """`run --workers 2` of the copied binary in bn-cli, clean environment."""
    lab = blab
    p = lab.run_tun2xray(run_argv(binary), TUN, env=clean_env(home), cwd=home,
                         describe=lambda: lab.log("tun2xray")[-3000:])
    yield lab, p
    lab.stop("tun2xray")
    lab.unroute()


def logs(lab) -> str:
    return "\n--- tun2xray log (tail) ---\n" + lab.log("tun2xray")[-3000:]


def status(lab, binary, home) -> dict:
    r = run_bin(binary, home, "status", "--control", f"unix://{CTL}", lab=lab, timeout=20)
    assert r.returncode == 0, r.stderr + logs(lab)
    return json.loads(r.stdout)


@pytest.mark.deadline(120)
def test_curl_downloads_through_the_frozen_workers(frozen_run):
    lab, _ = frozen_run
    for name in ("small.bin", "8M.bin"):
        r = lab.cli_run(["curl", "-sS", "--fail", "--max-time", "60", lab.url(name)], timeout=70)
        assert r.returncode == 0, r.stderr.decode() + logs(lab)
        assert hashlib.sha256(r.stdout).hexdigest() == lab.files[name][2]
    r = lab.cli_run(["curl", "-sS", "--fail", "--max-time", "20", lab.url("small.bin", v6=True)], timeout=30)
    assert r.returncode == 0 and hashlib.sha256(r.stdout).hexdigest() == lab.files["small.bin"][2], logs(lab)


def test_dig_through_the_dokodemo_mapping(frozen_run):
    lab, _ = frozen_run
    # nothing listens on 10.99.0.77: an answer from it went to the dokodemo inbound
    for server, qtype, want in ((DNS4, "A", TARGET4), ("10.99.0.77", "A", TARGET4),
                                (DNS6, "AAAA", TARGET6)):
        r = lab.cli_run(["dig", "+time=2", "+tries=2", "+short", f"@{server}", "web.e2.test", qtype],
                        timeout=15)
        assert (r.returncode, r.stdout.decode().split()) == (0, [want]), logs(lab)


def test_udp_echo_through_socks_udp_associate(frozen_run, binary, home):
    lab, _ = frozen_run
    held = []
    try:
        for target in (TARGET4, TARGET6):
            fam = socket.AF_INET6 if ":" in target else socket.AF_INET
            for k in range(3):
                with lab.in_cli():
                    u = socket.socket(fam, socket.SOCK_DGRAM)
                u.settimeout(5)
                held.append(u)
                for size in (1, 700, 1400):
                    payload = bytes([k + size % 251]) * size
                    u.sendto(payload, (target, ECHO_PORT))
                    try:
                        data, src = u.recvfrom(65535)
                    except (TimeoutError, socket.timeout):
                        pytest.fail(f"{target} socket {k}: no echo of {size} B" + logs(lab))
                    assert data == payload and src[:2] == (target, ECHO_PORT)
        st = status(lab, binary, home)
    finally:
        for u in held:
            u.close()
    udp = [f for f in st["flows"] if f["proto"] == "udp" and f["dst"].endswith(f":{ECHO_PORT}")]
    assert len(udp) == 6, st["flows"]
    assert {f["inbound"] for f in udp} == {"socks5://127.0.0.1:10808"}


def test_status_json_and_workers_are_the_frozen_binary(frozen_run, binary, home):
    lab, p = frozen_run
    st = status(lab, binary, home)
    assert st["state"] == "connected", st
    assert st["device"]["name"] == TUN
    workers = st["workers"]
    assert len(workers) == 2 and all(w["alive"] for w in workers), workers
    procs = tree(p.pid)
    # the onefile bootloader, the supervisor (its child), the zygote the
    # workers are forked from and one process per worker (the supervisor's children)
    assert len(procs) == 5, [open(f"/proc/{q}/cmdline").read() for q in procs]
    for i, q in enumerate(procs):
        assert os.readlink(f"/proc/{q}/exe") == binary
        maps = mapped_files(q)
        foreign = sorted(m for m in maps if any(f in m for f in FOREIGN))
        assert not foreign, f"pid {q} maps files of a Python install: {foreign}"
        if i:                   # the supervisor and the workers run on the bundled uvloop
            assert any(m.startswith(unpacked(home)[0]) and "/uvloop/loop." in m for m in maps), q
    for w in workers:
        assert w["pid"] in procs
        assert parent(w["pid"]) == procs[1]     # forked, and the supervisor's own child
    # the workers run from the supervisor's unpacked files: one directory in all
    assert len(unpacked(home)) == 1, unpacked(home)
    total = sum(rss_mb(q) for q in procs)
    print("\nfrozen run --workers 2: RSS " + ", ".join(f"{q}: {rss_mb(q):.1f} MB" for q in procs)
          + f"; total {total:.1f} MB")


def test_node_list_and_use(frozen_run, binary, home):
    lab, _ = frozen_run
    d = os.path.join(home, "etc")
    nodes = os.path.join(d, "nodes")
    os.makedirs(nodes, exist_ok=True)
    with open(lab.local_core_config_path) as f:
        cfg = f.read()
    for name in ("tokyo", "paris"):
        with open(os.path.join(nodes, f"{name}.json"), "w") as f:
            f.write(cfg)
    link = os.path.join(d, "config.json")
    if os.path.lexists(link):
        os.unlink(link)
    os.symlink("nodes/tokyo.json", link)
    r = run_bin(binary, home, "node", "list", "--xray-config", link, "--nodes", nodes)
    no_traceback(r)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any("tokyo" in ln and "*" in ln for ln in lines) and any("paris" in ln for ln in lines), r.stdout
    # `use` checks the node with the core's own -test: an external program,
    # which the binary must start with the user's library path, not the
    # bundle's (the stand-in core records its environment, then runs the core)
    env_file = os.path.join(home, "core-env.txt")
    core = os.path.join(home, "core.sh")
    with open(core, "w") as f:
        f.write(f'#!/bin/sh\nenv > "{env_file}"\nexec "{lab.core}" "$@"\n')
    os.chmod(core, 0o755)
    r = run_bin(binary, home, "node", "use", "paris", "--xray-config", link, "--nodes", nodes,
                "--xray-bin", core)
    no_traceback(r)
    assert r.returncode == 0, r.stdout + r.stderr
    assert os.readlink(link).endswith("paris.json")
    with open(env_file) as f:
        core_env = dict(line.split("=", 1) for line in f.read().splitlines() if "=" in line)
    assert "_MEI" not in core_env.get("LD_LIBRARY_PATH", ""), core_env
    assert core_env["PATH"] == PATH


def test_doctor_runs_against_the_frozen_instance(frozen_run, binary, home):
    lab, _ = frozen_run
    r = run_bin(binary, home, "doctor", "--control", f"unix://{CTL}", "--device", f"tun://{TUN}",
                "--tcp", f"{TARGET4}:{ECHO_PORT}", "--udp", f"{TARGET4}:{ECHO_PORT}",
                "--dns", f"web.e2.test@{DNS4}", lab=lab, timeout=60)
    no_traceback(r)
    assert r.returncode in (0, 1), r.stdout + r.stderr
    checks = [ln for ln in r.stdout.splitlines() if ln.startswith(("[PASS]", "[FAIL]"))]
    assert checks, r.stdout
    # the checks that need pyroute2 and the control socket pass
    assert any(ln.startswith("[PASS] tun") for ln in checks), r.stdout
    assert any(ln.startswith("[PASS] control") for ln in checks), r.stdout


@pytest.mark.deadline(60)
def test_killed_worker_is_restarted_from_the_same_files(frozen_run, binary, home):
    lab, _ = frozen_run
    victim = status(lab, binary, home)["workers"][0]
    sup = parent(victim["pid"])
    os.kill(victim["pid"], signal.SIGKILL)

    def replaced():
        w = status(lab, binary, home)["workers"][0]
        return w["alive"] and w["responding"] and w["pid"] != victim["pid"] and w

    w = netlab.wait_until(replaced, 20, "worker 0 restarted", interval=0.2)
    assert w["restarts"] == victim["restarts"] + 1
    assert os.readlink(f"/proc/{w['pid']}/exe") == binary
    assert parent(w["pid"]) == sup          # forked again, the supervisor's child
    assert len(unpacked(home)) == 1, unpacked(home)
    for i in range(10):                     # flows on both queues still work
        r = lab.cli_run(["curl", "-sS", "--fail", "--max-time", "10", lab.url("small.bin")], timeout=20)
        assert r.returncode == 0 and hashlib.sha256(r.stdout).hexdigest() == lab.files["small.bin"][2], \
            r.stderr.decode() + logs(lab)


@pytest.mark.deadline(60)
def test_sigterm_stops_every_process_and_removes_the_unpacked_files(frozen_run, home):
    lab, p = frozen_run
    procs = tree(p.pid)
    assert len(procs) == 5
    os.kill(p.pid, signal.SIGTERM)          # the bootloader passes it on to the supervisor
    p.wait(20)
    netlab.wait_until(lambda: not any(os.path.exists(f"/proc/{q}") for q in procs), 10,
                      "every process of the run gone")
    assert not netlab.link_exists(lab.cli_ns, TUN)
    assert unpacked(home) == [], "the unpacked files outlived the run"
    assert "Traceback" not in lab.log("tun2xray"), logs(lab)


@pytest.mark.deadline(90)
@pytest.mark.parametrize("victim", ["supervisor", "bootloader"])
def test_sigkill_leaves_no_process_tun_or_unpacked_files(blab, binary, home, victim):
    """SIGKILL to the program (the bootloader's child) or to the bootloader
    itself: the workers stop, the TUN goes, the unpacked files go."""
    lab = blab
    p = lab.run_tun2xray(run_argv(binary), TUN, env=clean_env(home), cwd=home,
                         describe=lambda: logs(lab))
    try:
        # bootloader, supervisor, zygote, two workers; a short-lived helper of
        # start-up may still be there at the first echo (seen once under load 4)
        netlab.wait_until(lambda: len(tree(p.pid)) == 5, 20, "the run's five processes")
        procs = tree(p.pid)
        assert len(procs) == 5 and len(unpacked(home)) == 1
        os.kill(procs[1] if victim == "supervisor" else procs[0], signal.SIGKILL)
        netlab.wait_until(lambda: not any(os.path.exists(f"/proc/{q}") for q in procs[1:]), 20,
                          "every process of the run gone")
        netlab.wait_until(lambda: not netlab.link_exists(lab.cli_ns, TUN), 10, f"{TUN} removed")
        netlab.wait_until(lambda: unpacked(home) == [], 10, "the unpacked files removed")
    finally:
        lab.stop("tun2xray")
        lab.unroute()
