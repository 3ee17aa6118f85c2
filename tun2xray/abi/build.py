"""Building libtun2xray with cffi's embedding mode (a C compiler and the
Python headers are needed: tools/install.sh --abi provides them)."""

from __future__ import annotations

import os
import shutil
import site
import sys
import sysconfig
import tempfile

from .. import __version__
from ..bridge import MAX_PACKET
from . import ENV_PYTHONPATH, queues
from .header import C_HELPERS, PY_API, TYPEDEFS, header_text

LIB_STEM = "libtun2xray"
MODULE = "_tun2xray_abi"     # the embedded cffi module's name

# The exported functions: pointer checks and the thread's last error stay in
# C; a call crosses into Python only once the interpreter is up.
C_SOURCE = """
#include <dlfcn.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
{header}
#define T2X_EXPORT __attribute__((visibility("default")))
{py_api}
static __thread char t2x_error[1024];
static int t2x_py_ok;

static void _t2x_set_error(const char *message)
{{
    snprintf(t2x_error, sizeof t2x_error, "%s", message ? message : "");
}}

/* A host that dlopen()s this library with RTLD_LOCAL (Java's System.load,
 * Android's loadLibrary, dlopen in Swift) leaves libpython's symbols out of
 * the global scope, where the extension modules Python loads (cffi's
 * backend, uvloop) look for them: make them global before Python starts. */
static void t2x_python_symbols_global(void)
{{
#ifdef RTLD_NOLOAD
    Dl_info info;
    if (dladdr((void *)&Py_IsInitialized, &info) && info.dli_fname)
        dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_GLOBAL);
#endif
}}

/* A burst of outbound packets, back to back in one buffer (the engine joins
 * them: one copy instead of a pointer object per packet in Python), handed
 * to the host's callback in one call.  Each packet's length and family come
 * from its IP header.  -1, and nothing handed over, when the lengths do not
 * add up to count packets filling size bytes exactly. */
#define T2X_DELIVER_STACK 256
static int _t2x_deliver(t2x_outbound_cb cb, void *ctx, const char *blob, size_t size, size_t count,
                        int32_t af6)
{{
    const uint8_t *p = (const uint8_t *)blob, *end = p + size;
    const uint8_t *ptrs_s[T2X_DELIVER_STACK];
    size_t lens_s[T2X_DELIVER_STACK];
    int32_t protos_s[T2X_DELIVER_STACK];
    const uint8_t **ptrs = ptrs_s;
    size_t *lens = lens_s;
    int32_t *protos = protos_s;
    void *heap = NULL;
    size_t i;
    if (count > T2X_DELIVER_STACK) {{
        heap = malloc(count * (sizeof *ptrs + sizeof *lens + sizeof *protos));
        if (!heap)
            return -1;
        ptrs = heap;
        lens = (size_t *)(ptrs + count);
        protos = (int32_t *)(lens + count);
    }}
    for (i = 0; i < count; i++) {{
        size_t left = (size_t)(end - p), n;
        if (left < 20)
            break;
        if (p[0] >> 4 == 4) {{
            n = (size_t)p[2] << 8 | p[3];
            protos[i] = 2;
            if (n < 20)
                break;
        }} else if (p[0] >> 4 == 6 && left >= 40) {{
            n = 40 + ((size_t)p[4] << 8 | p[5]);
            protos[i] = af6;
        }} else
            break;
        if (n > left)
            break;
        ptrs[i] = p;
        lens[i] = n;
        p += n;
    }}
    int ok = i == count && p == end;
    if (ok)
        cb(ctx, ptrs, lens, protos, count);
    free(heap);
    return ok ? 0 : -1;
}}

static int t2x_ready(void)
{{
    t2x_error[0] = 0;
    if (__atomic_load_n(&t2x_py_ok, __ATOMIC_ACQUIRE))
        return 1;
    t2x_python_symbols_global();
    if (_t2x_py_ready() == 1) {{
        __atomic_store_n(&t2x_py_ok, 1, __ATOMIC_RELEASE);
        return 1;
    }}
    _t2x_set_error("libtun2xray: its Python side did not load (the reason is on stderr; "
                   "is {env} or the path baked in at build time right?)");
    return 0;
}}

static int t2x_null(const void *p, const char *what)
{{
    if (p)
        return 0;
    snprintf(t2x_error, sizeof t2x_error, "%s is NULL", what);
    return 1;
}}

/* no IP packet is longer (an IPv6 header and a full payload): a longer
 * length is a host bug, refused before anything is read */
static int t2x_too_long(size_t length, const char *what)
{{
    if (length <= {max_packet})
        return 0;
    snprintf(t2x_error, sizeof t2x_error, "%s %zu is longer than any IP packet ({max_packet})", what, length);
    return 1;
}}

{queues}
T2X_EXPORT const char *t2x_last_error(void) {{ return t2x_error; }}
T2X_EXPORT const char *t2x_version(void) {{ return "tun2xray {version}"; }}

T2X_EXPORT int32_t t2x_start(const char *profile_json, t2x_outbound_cb on_outbound, void *ctx)
{{
    t2x_error[0] = 0;
    if (t2x_null(profile_json, "profile_json") || !t2x_ready())
        return 0;
    return _t2x_py_start(profile_json, on_outbound, ctx);
}}

T2X_EXPORT int32_t t2x_submit_inbound(int32_t handle, const uint8_t *packet, size_t length, int32_t protocol)
{{
    t2x_error[0] = 0;
    if (t2x_null(packet, "packet") || t2x_too_long(length, "length"))
        return T2X_E_ARG;
    if (!t2x_ready())
        return T2X_E_INTERNAL;
    return t2x_submit(handle, &packet, &length, &protocol, 1, 1);
}}

T2X_EXPORT int32_t t2x_submit_inbound_batch(int32_t handle, const uint8_t *const *packets,
                                            const size_t *lengths, const int32_t *protocols, size_t count)
{{
    t2x_error[0] = 0;
    if (count == 0)
        return 0;
    if (t2x_null(packets, "packets") || t2x_null(lengths, "lengths") || t2x_null(protocols, "protocols"))
        return T2X_E_ARG;
    if (count > 0x7fffffff) {{
        _t2x_set_error("count larger than INT32_MAX");
        return T2X_E_ARG;
    }}
    for (size_t i = 0; i < count; i++) {{
        if (!packets[i]) {{
            snprintf(t2x_error, sizeof t2x_error, "packets[%zu] is NULL", i);
            return T2X_E_ARG;
        }}
        if (t2x_too_long(lengths[i], "lengths[i]"))
            return T2X_E_ARG;
    }}
    if (!t2x_ready())
        return T2X_E_INTERNAL;
    return t2x_submit(handle, packets, lengths, protocols, count, 0);
}}

T2X_EXPORT int32_t t2x_poll_outbound(int32_t handle, uint8_t *buf, size_t capacity, int32_t *protocol,
                                     int32_t timeout_ms)
{{
    t2x_error[0] = 0;
    if (t2x_null(buf, "buf"))
        return T2X_E_ARG;
    if (timeout_ms < 0) {{
        _t2x_set_error("timeout_ms is negative");
        return T2X_E_ARG;
    }}
    if (!t2x_ready())
        return T2X_E_INTERNAL;
    return t2x_poll(handle, buf, capacity, protocol, timeout_ms);
}}

T2X_EXPORT int32_t t2x_message(int32_t handle, const char *request_json, char *reply, size_t capacity)
{{
    t2x_error[0] = 0;
    if (t2x_null(request_json, "request_json"))
        return T2X_E_ARG;
    if (capacity && t2x_null(reply, "reply"))
        return T2X_E_ARG;
    if (!t2x_ready())
        return T2X_E_INTERNAL;
    return _t2x_py_message(handle, request_json, reply, capacity);
}}

T2X_EXPORT int32_t t2x_set_protect(int32_t handle, t2x_protect_cb protect, void *ctx)
{{
    if (!t2x_ready())
        return T2X_E_INTERNAL;
    return _t2x_py_set_protect(handle, protect, ctx);
}}

T2X_EXPORT int32_t t2x_stop(int32_t handle)
{{
    if (!t2x_ready())
        return T2X_E_INTERNAL;
    return _t2x_py_stop(handle);
}}
"""

# Runs once, in the embedded interpreter, on the host's first call.
INIT_CODE = """
import os, sys
_given = os.environ.get({env!r})
if _given:
    for _p in reversed([p for p in _given.split(os.pathsep) if p]):
        sys.path.insert(0, _p)
else:
    import site
    for _p in {sites!r}:
        if _p not in sys.path:
            site.addsitedir(_p)
    sys.path.insert(0, {root!r})
from {module} import ffi, lib
from tun2xray.abi import exports
exports.install(ffi, lib)
"""


def baked_paths() -> tuple[str, list]:
    """(the directory holding the tun2xray package, this interpreter's
    site-packages): what the library puts on sys.path unless
    TUN2XRAY_PYTHONPATH says otherwise."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sites = [p for p in site.getsitepackages() + [site.getusersitepackages()] if os.path.isdir(p)]
    return root, sites


def library_name() -> str:
    return LIB_STEM + (".dylib" if sys.platform == "darwin" else ".so")


def build(out_dir: str, *, verbose: bool = False) -> tuple[str, str]:
    """Compile the library into out_dir; returns (library path, header path).
    Raises BuildError with one line when cffi or the compiler is missing."""
    try:
        import cffi
    except ImportError:
        raise BuildError("cffi is not installed: pip install 'tun2xray[abi]' (or cffi)") from None
    if not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
        raise BuildError(f"Python.h is missing under {sysconfig.get_paths()['include']}: "
                         "install the Python headers (tools/install.sh --abi: python3-dev, gcc)")
    root, sites = baked_paths()
    header = header_text(__version__)
    ffib = cffi.FFI()
    ffib.cdef(TYPEDEFS + C_HELPERS + queues.C_DECLS)
    ffib.embedding_api(PY_API)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    link = [f"-Wl,-rpath,{libdir}"] if libdir and sys.platform != "win32" else []
    ffib.set_source(MODULE, C_SOURCE.format(header=header, py_api=PY_API, env=ENV_PYTHONPATH,
                                            version=__version__, max_packet=MAX_PACKET,
                                            queues=queues.C_SOURCE),
                    extra_link_args=link)
    ffib.embedding_init_code(INIT_CODE.format(env=ENV_PYTHONPATH, sites=sites, root=root, module=MODULE))
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tun2xray-abi-") as tmp:
        try:
            built = ffib.compile(tmpdir=tmp, target=LIB_STEM + ".*", verbose=verbose)
        except Exception as e:   # setuptools' CompileError / LinkError and friends
            raise BuildError(f"compiling libtun2xray failed ({type(e).__name__}: {e}); a C compiler "
                             "and the Python headers are needed (tools/install.sh --abi)") from None
        lib_path = os.path.join(out_dir, library_name())
        shutil.copyfile(built, lib_path + ".tmp")
        os.replace(lib_path + ".tmp", lib_path)
    header_path = os.path.join(out_dir, "tun2xray.h")
    with open(header_path, "w") as f:
        f.write(header)
    return lib_path, header_path


class BuildError(RuntimeError):
    pass
