"""Lean embedding: what a host that owns its interpreter can leave out.

asyncio imports `ssl` when it is importable; the engine never speaks TLS (it
dials Xray's inbounds on loopback), but the module and the OpenSSL libraries
it loads cost about 6.5 MB of resident memory, an eighth of what an iOS
packet tunnel may use.  A host that embeds Python only for tun2xray (the C
ABI's library, a Network Extension) calls `without_ssl()` first, before
anything imports asyncio; asyncio then runs without TLS support, as it does
on a build without OpenSSL.  A Python host that also needs TLS must not.

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
