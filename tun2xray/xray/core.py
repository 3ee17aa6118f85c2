"""Supervising the core process.

``Core`` starts ``xray`` (else ``v2ray``) on one long-lived thread, waits
until the inbounds are up (tun2xray.xray.probe: nothing for the core to log
or dial), forwards the core's log lines to the ``tun2xray.core`` logger,
restarts it with exponential backoff when it dies (saying why: the signal,
or the core's own last error), and stops it on exit.  A config the core
rejects gives a ``CoreError`` whose message is one line holding the core's
own reason and the user's file and line (``check_config``, ``file_reason``).
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time

from ..upstream.url import format_hostport
from .errors import CoreError
from .probe import inbound_listening
from .reader import MAX_CONFIG, core_position

log = logging.getLogger("tun2xray.xray")
core_log = logging.getLogger("tun2xray.core")

HOLD_LINES = 500               # core output held while it starts (bounded)


# --------------------------------------------------------------------------
# the core process

def find_binary(explicit: str | None = None) -> str:
    if explicit:
        path = explicit if os.sep in explicit else shutil.which(explicit)
        if not path or not os.path.isfile(path):
            raise CoreError(f"--xray-bin {explicit}: not found")
        if not os.access(path, os.X_OK):
            raise CoreError(f"--xray-bin {explicit}: not executable")
        return path
    for name in ("xray", "v2ray"):
        path = shutil.which(name)
        if path:
            return path
    raise CoreError("no xray or v2ray on PATH (install one or give --xray-bin)")

_VERSION_CACHE: dict = {}


def core_command(binary: str, config: str) -> list:
    """argv for running ``binary`` with ``config``: xray and v2ray 5 take
    ``run -c``, v2ray 4 takes ``-config``."""
    if os.path.basename(binary).startswith("xray"):
        return [binary, "run", "-c", config]
    style = _VERSION_CACHE.get(binary)
    if style is None:
        try:
            r = subprocess.run([binary, "-version"], capture_output=True, text=True, timeout=5)
            out = r.stdout + r.stderr
        except (OSError, subprocess.SubprocessError):
            out = ""
        style = "v4" if re.search(r"V2Ray 4\.", out) else "run"
        _VERSION_CACHE[binary] = style
    if style == "v4":
        return [binary, "-config", config]
    return [binary, "run", "-c", config]


_NOISE = ("A unified platform", "A unified platform for anti-censorship.")


def core_reason(lines) -> str:
    """The core's own reason for failing, as one line."""
    # access-log lines ("... rejected ...") are traffic, not the core's reason
    lines = [ln.strip() for ln in lines if ln.strip() and not _ACCESS.match(_drop_stamp(ln.strip()))]
    for ln in lines:
        if ln.startswith("panic: "):
            return ln[len("panic: "):]
    for ln in lines:
        low = ln.lower()
        if "failed to" in low or "failed " in low or "error" in low:
            return _drop_stamp(ln)
    body = [ln for ln in lines if not ln.startswith(("V2Ray ", "Xray ")) and ln not in _NOISE
            and not ln.startswith("goroutine ") and not ln.startswith("\t")]
    return _drop_stamp(body[-1]) if body else "exited without a message"


def exit_reason(code: int | None, lines) -> str:
    """Why the core ended: the signal that killed it, else its exit status
    with its own last words."""
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}: {core_reason(lines)}"


_ACCESS = re.compile(r"^(?:tcp:|udp:)?\[?[0-9A-Fa-f.:]+\]?:\d+ (?:accepted|rejected) ")


def _drop_stamp(line: str) -> str:
    return re.sub(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d(\.\d+)? ", "", line)


_LEVELS = (("[Error]", logging.ERROR), ("[Warning]", logging.WARNING),
           ("[Info]", logging.INFO), ("[Debug]", logging.DEBUG))


def _level(line: str) -> int:
    for token, lvl in _LEVELS:
        if token in line:
            return lvl
    return logging.INFO


def _pdeathsig():
    # the core dies with the thread that started it (our supervisor thread,
    # which lives as long as tun2xray): no orphaned core after a crash or kill
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Core:
    """One supervised core process.

    ``start()`` blocks until the inbounds listen (or raises CoreError with
    the core's reason); afterwards a death is answered by a restart after a
    backoff (0.5 s doubling to ``max_backoff``; reset after ``stable`` s up).
    ``reload(path, checks)`` restarts it on another config; ``stop()`` ends it.
    All process handling happens on one thread (see _pdeathsig).
    """

    def __init__(self, binary: str, config_path: str, checks, *, ready_timeout: float = 15.0,
                 min_backoff: float = 0.5, max_backoff: float = 30.0, stable: float = 30.0,
                 on_restart=None):
        self.binary = binary
        self.config_path = config_path
        self.checks = list(checks)
        self.ready_timeout = ready_timeout
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.stable = stable
        self.on_restart = on_restart          # called (on the supervisor thread) after a restart
        self.proc = None
        self.restarts = 0                     # after the core died on its own
        self.reloads = 0                      # on another config (node switch, new egress)
        self.retry_at = None                  # monotonic time of the next start after a death
        self.reloading = False
        self.started_at = None
        self.last_exit = None
        self.last_reason = ""
        self.restart_at = None                # monotonic time of the next restart after a death
        self._cv = threading.Condition()
        self._cmd = None                      # ("reload", path, checks, result) | ("stop",)
        self._thread = None
        self._result = None
        self._lines = collections.deque(maxlen=40)

    # ---- public API (any thread)

    def start(self) -> None:
        result = {"done": threading.Event(), "error": None}
        self._thread = threading.Thread(target=self._main, args=(result,), name="xray-core",
                                        daemon=True)
        self._thread.start()
        result["done"].wait()
        if result["error"] is not None:
            self._thread.join(5)
            raise result["error"]

    def reload(self, config_path: str, checks=None, timeout: float | None = None) -> None:
        """Restart on ``config_path``; raises CoreError when the new config
        does not come up (the core then keeps retrying it with backoff)."""
        result = {"done": threading.Event(), "error": None}
        with self._cv:
            if self._thread is None or not self._thread.is_alive():
                raise CoreError("the core is not running")
            self._cmd = ("reload", config_path, checks, result)
            self._cv.notify_all()
        result["done"].wait(timeout)
        if result["error"] is not None:
            raise result["error"]

    def stop(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._cmd = ("stop",)
            self._cv.notify_all()
        t = self._thread
        if t is not None:
            t.join(timeout + 3)

    @property
    def alive(self) -> bool:
        p = self.proc
        return p is not None and p.poll() is None

    def status(self) -> dict:
        p = self.proc
        return {"binary": self.binary, "config": self.config_path,
                "pid": p.pid if p is not None and p.poll() is None else None,
                "alive": self.alive, "restarts": self.restarts, "reloads": self.reloads,
                "uptime": round(time.monotonic() - self.started_at, 3)
                if self.started_at is not None and self.alive else 0.0,
                "last_exit": self.last_exit, "last_reason": self.last_reason}

    def health(self) -> tuple:
        """(ok, reason): ok while the core runs; else why not, e.g. "core
        exited: killed by SIGKILL, restarting in 2s"."""
        if self.alive and self.retry_at is None and not self.reloading:
            return True, None
        if self._thread is None or not self._thread.is_alive():
            return False, "core stopped"
        at = self.retry_at
        if at is None and self.reloading:
            return False, f"core restarting on {self.config_path}"
        p = self.proc
        if at is None and p is not None and p.poll() is not None:
            # just died: the supervisor thread is about to say so
            return False, f"core exited: {exit_reason(p.returncode, list(self._lines))}, restarting"
        why = f"core exited: {self.last_reason or 'no reason given'}"
        if at is not None and at > time.monotonic():
            return False, f"{why}, restarting in {max(1, round(at - time.monotonic()))}s"
        return False, f"{why}, restarting"

    # ---- supervisor thread

    def _spawn(self):
        self._lines.clear()
        argv = core_command(self.binary, self.config_path)
        try:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, preexec_fn=_pdeathsig)
        except OSError as e:
            raise CoreError(f"cannot start {self.binary}: {e.strerror}") from None
        lines = self._lines
        # lines are held until the core is ready: a rejected config is one
        # error line, not the core's banner and stack trace
        p._t2x_hold = collections.deque(maxlen=HOLD_LINES)
        p._t2x_lock = threading.Lock()
        t = threading.Thread(target=self._forward, args=(p, lines), name="xray-log", daemon=True)
        t.start()
        p._t2x_reader = t
        self.proc = p
        return p

    @staticmethod
    def _forward(p, lines):
        for raw in p.stdout:
            line = raw.decode(errors="replace").rstrip()
            if not line:
                continue
            lines.append(line)
            with p._t2x_lock:
                if p._t2x_hold is not None:
                    p._t2x_hold.append(line)
                    continue
            core_log.log(_level(line), "%s", _drop_stamp(line))
        p.stdout.close()

    @staticmethod
    def _release(p) -> None:
        """The core is up: log what it said while starting, then live."""
        with p._t2x_lock:
            held, p._t2x_hold = p._t2x_hold, None
            for line in held or ():
                core_log.log(_level(line), "%s", _drop_stamp(line))

    def _wait_ready(self, p) -> CoreError | None:
        deadline = time.monotonic() + self.ready_timeout
        pending = list(self.checks)
        while True:
            if p.poll() is not None:
                p._t2x_reader.join(2)
                reason = file_reason(core_reason(self._lines), self.config_path)
                return CoreError(f"{os.path.basename(self.binary)} rejected "
                                 f"{self.config_path}: {reason}", self.config_path, reason)
            pending = [c for c in pending if not inbound_listening(*c, pid=p.pid)]
            if not pending:
                return None
            if time.monotonic() > deadline:
                host, port, proto = pending[0]
                return CoreError(f"{os.path.basename(self.binary)} did not open "
                                 f"{proto} {format_hostport(host, port)} within "
                                 f"{self.ready_timeout:g}s")
            with self._cv:
                if self._cmd is not None and self._cmd[0] == "stop":
                    return CoreError("stopped while starting")
            time.sleep(0.05)

    def _terminate(self, p, grace: float = 3.0) -> None:
        if p is None:
            return
        if p.poll() is None:
            try:
                p.terminate()
                p.wait(grace)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
            except ProcessLookupError:
                pass
        reader = getattr(p, "_t2x_reader", None)
        if reader is not None:
            reader.join(2)

    def _main(self, first) -> None:
        try:
            p = self._spawn()
        except CoreError as e:
            first["error"] = e
            first["done"].set()
            return
        err = self._wait_ready(p)
        if err is not None:
            self._terminate(p)
            self.proc = None
            first["error"] = err
            first["done"].set()
            return
        self.started_at = time.monotonic()
        self._release(p)
        first["done"].set()
        backoff = self.min_backoff
        pending_result = None
        while True:
            # wait for a command or the process's end
            cmd = None
            with self._cv:
                while self._cmd is None and p is not None and p.poll() is None:
                    self._cv.wait(0.2)
                cmd, self._cmd = self._cmd, None
            if cmd is not None and cmd[0] == "stop":
                self._terminate(p)
                if pending_result is not None:
                    pending_result["error"] = CoreError("stopped")
                    pending_result["done"].set()
                return
            if cmd is not None and cmd[0] == "reload":
                if pending_result is not None:
                    pending_result["done"].set()
                _, path, checks, pending_result = cmd
                self.reloading = True
                self._terminate(p)
                self.config_path = path
                if checks is not None:
                    self.checks = list(checks)
                backoff = self.min_backoff
                delay = 0.0
            else:
                # the core died on its own
                self.last_exit = p.returncode if p is not None else None
                if p is not None:
                    p._t2x_reader.join(2)
                    self.last_reason = exit_reason(p.returncode, self._lines)
                    # how long this process ran since it came up (0 when it
                    # never did): only a core that stayed up resets the backoff
                    up = time.monotonic() - self.started_at if self.started_at is not None else 0.0
                    self.started_at = None
                    if up >= self.stable:
                        backoff = self.min_backoff
                    log.warning("core exited: %s; restarting in %.1fs", self.last_reason, backoff)
                delay = backoff
                self.retry_at = time.monotonic() + delay
                self.reloading = False
                backoff = min(backoff * 2, self.max_backoff)
            self.proc = None
            p = None
            if delay:
                with self._cv:
                    if self._cmd is None:
                        self._cv.wait(delay)
                    if self._cmd is not None:
                        continue       # stop or another reload wins over the restart
            try:
                p = self._spawn()
            except CoreError as e:
                log.error("%s", e)
                if pending_result is not None:
                    pending_result["error"] = e
                    pending_result["done"].set()
                    pending_result = None
                continue
            err = self._wait_ready(p)
            if err is not None:
                log.error("%s", err)
                if pending_result is not None:
                    pending_result["error"] = err
                    pending_result["done"].set()
                    pending_result = None
                if p.poll() is None and "did not open" not in str(err):
                    self._terminate(p)
                self._release(p)
                continue
            self.started_at = time.monotonic()
            self._release(p)
            if self.reloading:
                self.reloads += 1
            else:
                self.restarts += 1
            self.reloading = False
            self.retry_at = None
            log.info("core running (pid %d, %s)", p.pid, self.config_path)
            if pending_result is not None:
                pending_result["done"].set()
                pending_result = None
            if self.on_restart is not None:
                try:
                    self.on_restart(self)
                except Exception:               # a callback must not kill supervision
                    log.exception("on_restart callback failed")


def check_config(binary: str, path: str, timeout: float = 15.0) -> None:
    """Ask the core whether it accepts ``path`` (``-test``); CoreError with the
    core's own reason (positions given as the file's line and column) when
    it does not."""
    argv = core_command(binary, path)
    argv.insert(-2, "-test")      # [bin, -test, -config, X] / [bin, run, -test, -c, X]
    try:
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=timeout)
    except OSError as e:
        raise CoreError(f"cannot start {binary}: {e.strerror}") from None
    except subprocess.TimeoutExpired:
        raise CoreError(f"{os.path.basename(binary)} -test {path}: no answer within {timeout:g}s") from None
    if r.returncode != 0:
        reason = file_reason(core_reason((r.stdout + "\n" + r.stderr).splitlines()), path)
        raise CoreError(f"{os.path.basename(binary)} rejected {path}: {reason}", path, reason)


_CORE_POS = re.compile(r"at line (\d+) char (\d+)")


def file_reason(reason: str, path: str) -> str:
    """The core's reason with its "at line L char C" (counted in the text
    after its comment filter) turned into the line and column of ``path``."""
    m = _CORE_POS.search(reason)
    if m is None:
        return reason
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_CONFIG).decode("utf-8", errors="replace")
    except OSError:
        return reason
    line, col = core_position(text, int(m.group(1)), int(m.group(2)))
    return f"{reason[:m.start()]}at line {line} column {col}{reason[m.end():]}"
