"""The README's first command, as written, in a fresh copy of this checkout,
on the machine's own Debian Python (the one PEP 668 protects); then the C
library built there (install.sh --abi, python3 -m tun2xray.abi build) and a
C program linked against it.

The copy gets its own .venv from /usr/bin/python3; PATH holds only system
directories, so ``python3`` is Debian's and ``tun2xray`` must come from the
link install.sh makes in /usr/local/bin. That directory is a private tmpfs in
a mount namespace of the test's own: the link the real checkout may have
there is neither seen nor touched. Needs root and the network (pip fetches
the dependencies into the new venv)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEM_PYTHON = "/usr/bin/python3"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LINK = "/usr/local/bin/tun2xray"

pytestmark = [
    pytest.mark.install,
    pytest.mark.skipif(os.geteuid() != 0, reason="install.sh links /usr/local/bin and apt-installs: needs root"),
    pytest.mark.skipif(not os.path.exists(SYSTEM_PYTHON), reason="no Debian /usr/bin/python3 here"),
]


def readme_command(marker: str) -> str:
    """The first line between <!-- marker --> and <!-- /marker --> that is
    neither a marker nor a fence (what .ci/run does for test-command)."""
    inside = False
    with open(os.path.join(ROOT, "README.md")) as f:
        for line in f:
            line = line.rstrip("\n")
            if line.strip() == f"<!-- {marker} -->":
                inside = True
            elif line.strip() == f"<!-- /{marker} -->":
                break
            elif inside and line and not line.startswith(("<", "`")):
                return line
    raise AssertionError(f"README.md has no {marker} block")


def copy_checkout(dst: str) -> None:
    """What a fresh clone of this checkout would hold, with the work tree's
    current contents: tracked files plus new ones git does not ignore."""
    if os.path.exists(os.path.join(ROOT, ".git")):
        out = subprocess.run(["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, check=True).stdout
        for rel in sorted(set(out.decode().split("\0")) - {""}):
            src = os.path.join(ROOT, rel)
            if not os.path.lexists(src):
                continue               # deleted in the work tree
            os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dst, rel), follow_symlinks=False)
    else:                              # an unpacked sdist: no git
        junk = shutil.ignore_patterns(".venv", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis")
        shutil.copytree(ROOT, dst, ignore=junk, symlinks=True, dirs_exist_ok=True)


def system_env() -> dict:
    """A login-like environment: system PATH, no venv, no pyenv, no PYTHONPATH."""
    env = {"PATH": SYSTEM_PATH, "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8"}
    for k in ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "TMPDIR", "CI"):
        if k in os.environ:
            env[k] = os.environ[k]
    return env


def system_python_imports_tun2xray() -> subprocess.CompletedProcess:
    return subprocess.run([SYSTEM_PYTHON, "-c", "import tun2xray; print(tun2xray.__file__)"], cwd="/",
                          env=system_env(), capture_output=True, text=True, timeout=60)


def test_readme_install_command_on_the_system_python():
    # the ground: Debian's python3, marked externally managed, without tun2xray
    stdlib = subprocess.run([SYSTEM_PYTHON, "-c", "import sysconfig; print(sysconfig.get_path('stdlib'))"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert os.path.isfile(os.path.join(stdlib, "EXTERNALLY-MANAGED")), f"no PEP 668 marker in {stdlib}"
    before = system_python_imports_tun2xray()
    assert before.returncode != 0 and "No module named 'tun2xray'" in before.stderr, before.stdout
    which = subprocess.run(["bash", "-c", "type -P python3"], env=system_env(), capture_output=True, text=True)
    assert os.path.realpath(which.stdout.strip()) == os.path.realpath(SYSTEM_PYTHON)

    command = readme_command("install-command")
    with tempfile.TemporaryDirectory(prefix="tun2xray-install-") as tmp:
        clone = os.path.join(tmp, "tun2xray")
        copy_checkout(clone)
        link_file = os.path.join(tmp, "link")
        script = "\n".join([
            "set -u",
            "mount -t tmpfs tun2xray-install-test /usr/local/bin || exit 97",
            f"cd {shlex.quote(clone)}",
            f"bash -c {shlex.quote(command)}",
            "rc=$?",
            f"readlink {LINK} > {shlex.quote(link_file)}",
            # then the C library, as docs/embedding-c.md builds it
            "[ $rc = 0 ] || exit $rc",
            "bash tools/install.sh --abi || exit 96",
            ".venv/bin/python -m tun2xray.abi build --out abi-out || exit 95",
            "printf '#include <stdio.h>\\n#include \"tun2xray.h\"\\n"
            "int main(void) { puts(t2x_version()); return t2x_stop(1) == T2X_E_HANDLE ? 0 : 1; }\\n' > abi-out/v.c",
            "cc -o abi-out/v abi-out/v.c -I abi-out -L abi-out -ltun2xray -Wl,-rpath,$PWD/abi-out || exit 94",
            "abi-out/v || exit 93",
        ])
        r = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", script],
                           env=system_env(), capture_output=True, text=True, timeout=900)
        out = r.stdout + r.stderr
        what = {96: "install.sh --abi", 95: "python3 -m tun2xray.abi build", 94: "cc against the header",
                93: "the C program"}.get(r.returncode, f"`{command}`")
        assert r.returncode == 0, f"{what} exited {r.returncode}:\n{out[-4000:]}"

        # the library was built with the venv's Python and answered a C program
        assert re.search(r"^tun2xray \d+\.\d+\.\d+$", r.stdout, re.M), out[-4000:]
        assert os.path.isfile(os.path.join(clone, "abi-out", "libtun2xray.so"))
        assert os.path.isfile(os.path.join(clone, "abi-out", "tun2xray.h"))

        # install.sh said what it did; the replay printed its flows, completed
        assert re.search(r"^install\.sh: tun2xray \d+\.\d+\.\d+ in .*/\.venv", r.stdout, re.M), out[-4000:]
        pcaps = sorted(p for p in os.listdir(os.path.join(clone, "pcaps")) if p.endswith(".pcap"))
        for name in pcaps:
            assert f"pcaps/{name}:" in r.stdout, f"no flows printed for {name}:\n{r.stdout[-4000:]}"
        completed = re.findall(r"^\s+(?:\d+ )?(?:tcp|udp) \S+ -> \S+\s+completed\b", r.stdout, re.M)
        assert len(completed) >= len(pcaps) - 2, r.stdout[-4000:]     # two captures are refusals

        # the command was the link into this copy's venv, made from Debian's python3
        with open(link_file) as f:
            assert f.read().strip() == os.path.join(clone, ".venv", "bin", "tun2xray")
        base = subprocess.run([os.path.join(clone, ".venv", "bin", "python"), "-c",
                               "import sys; print(sys._base_executable)"],
                              capture_output=True, text=True, check=True).stdout.strip()
        assert os.path.realpath(base) == os.path.realpath(SYSTEM_PYTHON)

    # and the system Python got nothing
    after = system_python_imports_tun2xray()
    assert after.returncode != 0 and "No module named 'tun2xray'" in after.stderr, after.stdout


OLD_PYTHON = """#!/bin/sh
# stands in for an old Debian python3: it can make venvs, but it is 3.9
case "$1" in
    -V|--version) echo "Python 3.9.2"; exit 0 ;;
    -c) case "$2" in *ensurepip*) exit 0 ;; esac ;;
esac
exit 1
"""


def test_too_old_python_is_one_clear_line(tmp_path):
    """install.sh checks the version before it makes anything: with a 3.9
    python3 in /usr/bin (bind-mounted over Debian's in a private mount
    namespace) it stops with one line naming the Python and the need."""
    (tmp_path / "tools").mkdir()
    shutil.copy2(os.path.join(ROOT, "tools", "install.sh"), tmp_path / "tools" / "install.sh")
    shutil.copy2(os.path.join(ROOT, "pyproject.toml"), tmp_path / "pyproject.toml")
    fake = tmp_path / "python3.9"
    fake.write_text(OLD_PYTHON)
    fake.chmod(0o755)
    script = (f"mount --bind {shlex.quote(str(fake))} {SYSTEM_PYTHON} || exit 97\n"
              f"exec bash {shlex.quote(str(tmp_path / 'tools' / 'install.sh'))}")
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", script],
                       env=system_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.splitlines() == [
        f"install.sh: error: tun2xray needs Python 3.11 or newer; {SYSTEM_PYTHON} is Python 3.9.2"], r.stderr
    assert not (tmp_path / ".venv").exists()


def test_unknown_option_is_one_clear_line():
    r = subprocess.run(["bash", os.path.join(ROOT, "tools", "install.sh"), "--tset"], env=system_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == "install.sh: error: unknown option '--tset' (usage: bash tools/install.sh [--test] [--abi])\n"
