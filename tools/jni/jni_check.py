#!/usr/bin/env python3
"""Runs the JNI glue of docs/embedding-c.md (tools/jni/t2x_jni.c) on a
desktop JVM, with a Java twin of the Kotlin class (com/example/T2x.java)
and a stand-in VpnService whose protect() refuses (JniCheck.java).

It builds libtun2xray, compiles the JNI file against it and jni.h, and
starts the JVM with one end of a datagram socketpair as the "TUN fd"; this
script holds the other end and plays the apps behind the TUN:

  - an IPv4 and an IPv6 UDP datagram to port 53 come back echoed (the
    profile's dokodemo rule to a UDP echo on loopback; Android family
    numbers 2 / 10 on the way in);
  - a TCP SYN to port 80 (a rule to a SOCKS proxy at a TEST-NET address)
    makes the engine call Service.protect(fd) over JNI on its own thread;
    the refusal fails the dial and a RST comes back (no packet leaves);
  - the status message shows the protect call; a bad message is refused;
    stop() returns 0 and the reader thread ends.

    python3 tools/jni/jni_check.py          # needs javac/java (a JDK) and cc

Final line: ``jni_check: ok`` or the first thing that went wrong.  Not part
of the test suite (CI has no JDK); run by hand.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "tests"))

from helpers import build_packet, parse_packet  # noqa: E402
from test_bridge import CLIENT4, CLIENT6, SERVER4, SERVER6, udp_packet, udp_payload  # noqa: E402


class Failed(Exception):
    pass


def run(argv, **kw):
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300, **kw)
    if r.returncode != 0:
        raise Failed(f"{' '.join(argv[:3])} ...: {r.stderr.strip()[-800:]}")
    return r


def udp_echo_server():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                d, a = s.recvfrom(65536)
            except OSError:
                return
            s.sendto(b"echo:" + d, a)
    threading.Thread(target=serve, daemon=True).start()
    return s


def build(tmp: str) -> tuple[str, str]:
    """(JNI library path, class directory)."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run([sys.executable, "-m", "tun2xray.abi", "build", "--out", tmp], cwd=REPO, env=env)
    javac = shutil.which("javac")
    if not javac:
        raise Failed("no javac (install a JDK, e.g. default-jdk-headless)")
    jhome = os.path.dirname(os.path.dirname(os.path.realpath(javac)))
    jni = os.path.join(tmp, "libt2x_jni.so")
    run(["cc", "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-o", jni,
         os.path.join(HERE, "t2x_jni.c"), "-I", os.path.join(jhome, "include"),
         "-I", os.path.join(jhome, "include", "linux"), "-I", tmp, "-L", tmp, "-ltun2xray",
         f"-Wl,-rpath,{tmp}"])
    classes = os.path.join(tmp, "classes")
    run([javac, "-d", classes, os.path.join(HERE, "com", "example", "T2x.java"),
         os.path.join(HERE, "com", "example", "JniCheck.java")])
    return jni, classes


def check(tmp: str) -> None:
    jni, classes = build(tmp)
    echo = udp_echo_server()
    profile = {"proxy": "socks5://127.0.0.1:9", "tcp_connect_timeout": 3,
               "rules": [{"network": "udp", "port": 53, "to": f"dokodemo://127.0.0.1:{echo.getsockname()[1]}"},
                         {"network": "tcp", "port": 80, "to": "socks5://192.0.2.1:1080"}]}
    cfg = os.path.join(tmp, "profile.json")
    with open(cfg, "w") as f:
        json.dump(profile, f)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.settimeout(10)
    java = subprocess.Popen(["java", "-cp", classes, "com.example.JniCheck", jni, cfg, str(theirs.fileno())],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            pass_fds=(theirs.fileno(),), env=dict(os.environ, PYTHONPATH=REPO))
    theirs.close()
    try:
        line = java.stdout.readline().strip()
        if not line.startswith("started "):
            raise Failed(f"java: {line} {java.stderr.read()[-800:]}")
        for fam, src, dst in ((4, CLIENT4, SERVER4), (6, CLIENT6, SERVER6)):
            ours.send(udp_packet(fam, src, dst, 40000 + fam, 53, b"jni"))
            if udp_payload(ours.recv(65536)) != b"echo:jni":
                raise Failed(f"IPv{fam} UDP: no echo")
        ours.send(build_packet(4, CLIENT4, SERVER4, 41000, 80, 1000, 0, "S", 65535))
        while True:
            seg = parse_packet(ours.recv(65536))
            if seg.dport == 41000:
                break
        if not seg.flags & 0x04:
            raise Failed(f"the refused dial gave {seg}, not a RST")
        java.stdin.write("status\nbad\nstop\n")
        java.stdin.flush()
        out = {}
        for line in java.stdout:
            word, _, rest = line.strip().partition(" ")
            out.setdefault(word, rest)
            if word == "stopped":
                break
        if "protect" not in out:
            raise Failed("Service.protect was never called")
        dev = json.loads(out["status"])["status"]["device"]
        if (dev["protect_calls"], dev["protect_failed"]) != (1, 1):
            raise Failed(f"status: protect_calls {dev['protect_calls']}, protect_failed {dev['protect_failed']}")
        if not out.get("bad", "").startswith("null request: unknown op"):
            raise Failed(f"bad message: {out.get('bad')!r}")
        if out["stopped"] != "0 reader_alive=false protect_calls=1":
            raise Failed(f"stop: {out['stopped']}")
        if java.wait(20) != 0:
            raise Failed(f"java exited {java.returncode}: {java.stderr.read()[-800:]}")
    finally:
        if java.poll() is None:
            java.kill()
            java.wait()
        ours.close()
        echo.close()


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="jni-check-") as tmp:
        try:
            check(tmp)
        except (Failed, OSError, ValueError, KeyError, subprocess.TimeoutExpired) as e:
            print(f"jni_check: FAILED: {e}")
            return 1
    print("jni_check: ok (UDP v4/v6 echo, protect over JNI refused a dial with a RST, status, "
          "a bad message, stop)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
