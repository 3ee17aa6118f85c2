"""libtun2xray: the bridge as a C library for Swift, Kotlin (JNI), Go and C
hosts (docs/embedding-c.md).

``python3 -m tun2xray.abi build --out DIR`` writes ``DIR/libtun2xray.so``
(``.dylib`` on macOS) and ``DIR/tun2xray.h``.  The library is built with
cffi's embedding mode: its exported functions are small C wrappers (pointer
checks, the per-thread last error) around Python bodies
(``tun2xray.abi.exports``) that call ``tun2xray.bridge``.
"""

from .header import CODES

__all__ = ["CODES", "ENV_PYTHONPATH"]

# directories put first on the embedded interpreter's sys.path instead of
# the ones baked in at build time
ENV_PYTHONPATH = "TUN2XRAY_PYTHONPATH"
