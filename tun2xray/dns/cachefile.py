"""The fake-IP cache file: the name book's fake mappings across restarts.

JSON, written whole to a temporary file beside it, flushed to disk and
renamed over the old one (a crash leaves the old file or the new one, never
half of either). Reading is bounded (MAX_BYTES) and forgiving: a missing,
unreadable, oversized or corrupt file is one warning line and an empty book,
never a failed start.
"""

from __future__ import annotations

import json
import logging
import os

log = logging.getLogger("tun2xray.dns")

VERSION = 1
MAX_BYTES = 32 << 20            # 65536 mappings per family of long names fit well below this


def load(path: str, book) -> int:
    """Restore *book*'s fake mappings from *path*; returns how many came back."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        return 0
    except OSError as e:
        log.warning("dns cache %s not read: %s", path, e.strerror or e)
        return 0
    if len(data) > MAX_BYTES:
        log.warning("dns cache %s not read: larger than %d bytes", path, MAX_BYTES)
        return 0
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        log.warning("dns cache %s not read: not valid JSON", path)
        return 0
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        log.warning("dns cache %s not read: not a version %d tun2xray DNS cache", path, VERSION)
        return 0
    n = book.restore(doc)
    log.info("dns cache %s: %d fake mappings restored", path, n)
    return n


def save(path: str, book) -> None:
    """Write *book*'s fake mappings to *path* atomically; raises OSError."""
    doc = {"version": VERSION, **book.snapshot()}
    data = json.dumps(doc, separators=(",", ":")).encode()
    d = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(d, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
