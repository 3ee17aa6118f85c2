"""Packaging: the version a user sees, and a source distribution that carries
its own tests (helpers, fixtures, captures) and passes them when unpacked."""

from __future__ import annotations

import email
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

import tun2xray

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# unit tests that need the sdist's tests/helpers.py, upstream_fixtures.py,
# conftest.py and pcaps/: wire formats, TCP, UDP, SOCKS5, the replay command
SDIST_TESTS = ["tests/test_wire_ipv4.py", "tests/test_wire_tcp.py", "tests/test_tcp_basic.py",
               "tests/test_udp.py", "tests/test_upstream_socks5.py", "tests/test_replay.py"]


def test_version_flag_prints_the_version():
    r = subprocess.run([sys.executable, "-m", "tun2xray", "--version"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"tun2xray {tun2xray.version()}\n"
    assert re.fullmatch(r"\d+\.\d+\.\d+", tun2xray.version())


def _source_copy(dst: str) -> str:
    """The checkout without what building or running it leaves behind, so
    that building the sdist writes nothing into the real checkout."""
    junk = shutil.ignore_patterns(".git", ".venv", "*.egg-info", "__pycache__", "build", "dist",
                                  ".pytest_cache", ".hypothesis", "tmp")
    shutil.copytree(ROOT, dst, ignore=junk, symlinks=True)
    return dst


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """sdist and wheel built from a copy of the checkout (the wheel from the sdist)."""
    pytest.importorskip("build", reason="the test extra (pip install -e '.[test]') has `build`")
    pytest.importorskip("setuptools", minversion="77", reason="the test extra has setuptools>=77")
    tmp = tmp_path_factory.mktemp("pkg")
    src = _source_copy(str(tmp / "src"))
    out = tmp / "dist"
    r = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), src],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"build failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    sdists, wheels = sorted(out.glob("*.tar.gz")), sorted(out.glob("*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, os.listdir(out)
    return tmp, sdists[0], wheels[0]


def test_sdist_and_wheel_carry_license_version_and_type_markers(built):
    _, sdist, wheel = built
    version = tun2xray.__version__
    assert sdist.name == f"tun2xray-{version}.tar.gz"
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
        meta = email.message_from_bytes(tf.extractfile(f"tun2xray-{version}/PKG-INFO").read())
    for need in ("LICENSE", "README.md", "netstack/py.typed", "tun2xray/py.typed", "tests/conftest.py",
                 "tests/helpers.py", "tests/upstream_fixtures.py", "tools/netlab.py", "tools/install.sh",
                 "docs/xray.md", "pcaps/http-get-v4.pcap"):
        assert need in names, f"{need} missing from the sdist"
    assert meta["Version"] == version
    assert meta["License-Expression"] == "MIT"
    assert not any("pytun" in r for r in meta.get_all("Requires-Dist"))
    with zipfile.ZipFile(wheel) as zf:
        wnames = set(zf.namelist())
        wmeta = email.message_from_bytes(zf.read(f"tun2xray-{version}.dist-info/METADATA"))
    assert {"netstack/py.typed", "tun2xray/py.typed", "tun2xray/device/tunfd.py"} <= wnames
    assert f"tun2xray-{version}.dist-info/licenses/LICENSE" in wnames
    assert not any(n.startswith(("tests/", "tools/", "pcaps/")) for n in wnames)
    assert wmeta["Version"] == version


def test_unpacked_sdist_passes_its_own_tests(built):
    tmp, sdist, _ = built
    with tarfile.open(sdist) as tf:
        # our own archive; the "data" filter only where this Python has it (3.11.4+)
        tf.extractall(tmp / "unpacked", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    tree = str(tmp / "unpacked" / f"tun2xray-{tun2xray.__version__}")
    env = dict(os.environ, PYTHONPATH=tree, PYTHONDONTWRITEBYTECODE="1")
    where = subprocess.run([sys.executable, "-c", "import netstack, tun2xray; "
                            "print(netstack.__file__); print(tun2xray.__file__)"],
                           cwd=tree, env=env, capture_output=True, text=True, timeout=30)
    assert where.returncode == 0, where.stderr
    assert all(p.startswith(tree + os.sep) for p in where.stdout.split()), where.stdout
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SDIST_TESTS],
                       cwd=tree, env=env, capture_output=True, text=True, timeout=600)
    tail = r.stdout[-3000:] + r.stderr[-2000:]
    assert r.returncode == 0, tail
    summary = r.stdout.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary) and "failed" not in summary and "error" not in summary, tail
