"""What an idle engine does not load: ssl when the host asks (tun2xray.lean),
and the IDNA codec (unicodedata, stringprep) for ASCII upstream hosts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_ENGINE = """
import json, sys, time
{before}
from tun2xray import bridge
h = bridge.start('{{"proxy": "socks5://127.0.0.1:9", "rules": [{{"network": "udp", "port": 53, '
                 '"to": "dokodemo://127.0.0.1:10853"}}]}}', loop="asyncio")
state = bridge.status(h)["state"]
bridge.stop(h)
from tun2xray.lean import without_ssl
print(json.dumps({{"state": state, "again": without_ssl(),
                  "loaded": sorted(m for m in ("ssl", "_ssl", "encodings.idna", "unicodedata", "stringprep")
                                   if sys.modules.get(m) is not None)}}))
"""


def run_engine(before: str) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-S", "-c", _ENGINE.format(before=before)], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_without_ssl_the_engine_runs_and_ssl_is_never_loaded():
    out = run_engine("from tun2xray.lean import without_ssl\nassert without_ssl()")
    assert out["state"] in ("connecting", "connected", "degraded", "disconnected"), out
    assert out["loaded"] == [] and out["again"] is False


def test_by_default_asyncio_loads_ssl_but_an_ascii_profile_no_idna_codec():
    out = run_engine("")
    assert out["loaded"] == ["_ssl", "ssl"]        # asyncio's own import: what without_ssl() saves
    assert out["again"] is False                   # too late once asyncio is loaded


def test_fixed_mmap_threshold_takes_effect_on_glibc():
    # in a child: the setting is the whole process's
    code = ("import platform; from tun2xray.lean import fixed_mmap_threshold; "
            "print(fixed_mmap_threshold(), platform.libc_ver()[0] == 'glibc')")
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    done, glibc = r.stdout.split()
    assert done == glibc
