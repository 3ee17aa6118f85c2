"""Building libtun2xray and C programs against it, and a ctypes view of the
library, for the ABI's tests (tests/test_abi.py, tests/e2e/test_abi_host.py)."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
c_u8p = ctypes.POINTER(ctypes.c_uint8)

OUT_CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(c_u8p), ctypes.POINTER(ctypes.c_size_t),
                          ctypes.POINTER(ctypes.c_int32), ctypes.c_size_t)
PROTECT_CB = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, ctypes.c_int32)


def build_library(out_dir: str) -> tuple[str, str]:
    """python3 -m tun2xray.abi build --out out_dir, as a user runs it."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "tun2xray.abi", "build", "--out", out_dir],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    lib, header = r.stdout.split()
    return lib, header


def compile_c(sources, exe: str, lib_dir: str) -> str:
    """Compile C sources with the system compiler against the generated
    header and library (warnings are errors)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "no C compiler (tools/install.sh --abi installs gcc)"
    r = subprocess.run([cc, "-O2", "-Wall", "-Wextra", "-Werror", "-o", exe, *sources, "-I", lib_dir,
                        "-L", lib_dir, "-ltun2xray", f"-Wl,-rpath,{lib_dir}", "-lpthread"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return exe


class Abi:
    """The library through ctypes, with the header's signatures."""

    def __init__(self, path: str):
        L = self.lib = ctypes.CDLL(path)
        i32, sz, vp, cp = ctypes.c_int32, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_char_p
        sigs = {
            "t2x_start": (i32, [cp, OUT_CB, vp]),
            "t2x_submit_inbound": (i32, [i32, ctypes.c_char_p, sz, i32]),
            "t2x_submit_inbound_batch": (i32, [i32, ctypes.POINTER(ctypes.c_char_p),
                                               ctypes.POINTER(sz), ctypes.POINTER(i32), sz]),
            "t2x_poll_outbound": (i32, [i32, vp, sz, ctypes.POINTER(i32), i32]),
            "t2x_message": (i32, [i32, cp, vp, sz]),
            "t2x_set_protect": (i32, [i32, PROTECT_CB, vp]),
            "t2x_stop": (i32, [i32]),
            "t2x_last_error": (cp, []),
            "t2x_version": (cp, []),
        }
        for name, (res, args) in sigs.items():
            fn = getattr(L, name)
            fn.restype, fn.argtypes = res, args
            setattr(self, name[4:], fn)

    def error(self) -> str:
        return self.last_error().decode()

    def submit_batch(self, handle, packets, protocols) -> int:
        n = len(packets)
        return self.submit_inbound_batch(handle, (ctypes.c_char_p * n)(*packets),
                                         (ctypes.c_size_t * n)(*map(len, packets)),
                                         (ctypes.c_int32 * n)(*protocols), n)

    def poll(self, handle, capacity=65536, timeout_ms=0):
        """(length or code, packet bytes or None, protocol)."""
        buf = ctypes.create_string_buffer(max(capacity, 1))
        proto = ctypes.c_int32(-1)
        n = self.poll_outbound(handle, buf, capacity, ctypes.byref(proto), timeout_ms)
        return n, (buf.raw[:n] if n > 0 else None), proto.value

    def ask(self, handle, request: bytes, capacity=1 << 20):
        buf = ctypes.create_string_buffer(capacity) if capacity else None
        n = self.lib.t2x_message(handle, request, buf, capacity)
        return n, (buf.value if buf is not None else None)


def collect(packets_p, lengths_p, protocols_p, count) -> list:
    """An outbound callback's arguments as [(packet, protocol)] (copied)."""
    return [(ctypes.string_at(packets_p[i], lengths_p[i]), protocols_p[i]) for i in range(count)]
