"""Lean embedding: what a host that owns its interpreter can leave out.

asyncio imports `ssl` when it is importable; the engine never speaks TLS (it
dials Xray's inbounds on loopback), but the module and the OpenSSL libraries
it loads cost about 4 MB of an idle engine's resident memory (6.4 MB on
their own), a twelfth of what an iOS packet tunnel may use.  A host that
embeds Python only for tun2xray calls `without_ssl()` first, before
anything imports asyncio; asyncio then runs without TLS support, as it does
on a build without OpenSSL.  A Python host that also needs TLS must not.
The C ABI's library does not call it (its host may run Python code of its
own); `tools/bench/memory_bench.py --host abi --no-ssl` measures what it
saves there.

docs/performance.md ("Memory") lists what the idle engine's memory is made of.
"""

from __future__ import annotations

import sys


def without_ssl() -> bool:
    """Keep `ssl` from being imported in this interpreter.  False (nothing
    changed) when it is too late: ssl or asyncio is already loaded."""
    if "ssl" in sys.modules or "asyncio" in sys.modules:
        return False
    sys.modules["ssl"] = None       # `import ssl` now raises ImportError, which asyncio expects
    return True


M_MMAP_THRESHOLD = -3      # glibc's mallopt parameter number


def fixed_mmap_threshold(nbytes: int = 128 << 10) -> bool:
    """glibc only: serve every allocation of *nbytes* or more with its own
    mmap, returned to the system when freed.  By default glibc raises that
    threshold each time a large block is freed (up to 32 MB), after which
    the engine's large transient buffers (a 256 KiB socket read, a grown
    send buffer) come from the heap and leave it fragmented: in the memory
    bench's burst that kept 14-20 MB of RSS.  Costs a system call pair per
    large allocation.  False where there is no glibc mallopt (macOS, iOS,
    Android's bionic, musl)."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return mallopt(M_MMAP_THRESHOLD, int(nbytes)) == 1
