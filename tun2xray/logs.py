"""One log format for every tun2xray process: `run`, its workers, and the
core's forwarded lines.

Text (the default), one line per record, one timestamp (UTC)::

    2026-12-04T22:51:03.123Z info engine: tcp flow 7 accepted ...
    2026-12-04T22:51:03.124Z debug engine[w1]: ...          (worker 1)
    2026-12-04T22:51:04.002Z warning core: [Warning] ...   (the Xray core)

JSON (``--log-format json``), one object per line::

    {"ts": "2026-12-04T22:51:03.123Z", "level": "info", "logger": "engine",
     "msg": "...", "worker": 1, "flow": 7, "src": "...", "dst": "...", ...}

Structured fields are what the caller passed with ``extra=``; a message
without them carries only ts/level/logger/msg (and worker in a worker).

`setup()` configures the root logger and belongs to processes tun2xray owns
(the CLI and its workers). Embedders (the bridge) leave the root logger to
their host and only set the ``tun2xray`` logger's level (`set_level`).

`DropSummary` turns the stack's drop counters into at most one debug line
per interval (counts by reason since the last line); `exit_summary` is the
one info line `run` writes when it ends.
"""

from __future__ import annotations

import json
import logging
import sys
import time

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")
_PREFIX = "tun2xray."

# attributes every LogRecord has: anything else on a record came from extra=
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message", "asctime", "taskName"}


def level_number(level) -> int:
    """'debug' / 'INFO' / logging.DEBUG -> the logging level number."""
    if isinstance(level, int):
        return level
    n = logging.getLevelName(str(level).upper())
    if not isinstance(n, int):
        raise ValueError(f"log level {level!r}: expected one of {', '.join(LEVELS)}")
    return n


def _stamp(created: float) -> str:
    t = time.gmtime(created)
    return "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ" % (
        t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec, int(created % 1 * 1000))


def short_name(name: str) -> str:
    """tun2xray.engine -> engine (the package prefix says nothing here)."""
    return name.removeprefix(_PREFIX)


def fields(record: logging.LogRecord) -> dict:
    """The structured fields a record carries (what the caller gave as extra=)."""
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}


class TextFormatter(logging.Formatter):
    """``TS level logger[wN]: message`` (a traceback, if any, follows)."""

    def __init__(self, worker=None):
        super().__init__()
        self.tag = f"[w{worker}]" if worker is not None else ""

    def format(self, record: logging.LogRecord) -> str:
        line = (f"{_stamp(record.created)} {record.levelname.lower()} "
                f"{short_name(record.name)}{self.tag}: {record.getMessage()}")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg, [worker], fields."""

    def __init__(self, worker=None):
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": _stamp(record.created), "level": record.levelname.lower(),
               "logger": short_name(record.name), "msg": record.getMessage()}
        if self.worker is not None:
            out["worker"] = self.worker
        for k, v in fields(record).items():
            out.setdefault(k, v)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class _Handler(logging.StreamHandler):
    """Ours (setup() replaces it, and only it, when called again)."""


_state = {"format": "text"}


def setup(level="info", fmt: str = "text", *, worker=None, stream=None) -> None:
    """Configure this process's logging: tun2xray's loggers at ``level``
    (other libraries' at info or above), one handler on the root logger to
    ``stream`` (stderr) in ``fmt`` ("text" or "json"); worker: this
    process's worker id (tag in text, field in JSON)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: expected text or json")
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, _Handler):
            root.removeHandler(h)
    h = _Handler(stream if stream is not None else sys.stderr)
    h.setFormatter(JsonFormatter(worker) if fmt == "json" else TextFormatter(worker))
    root.addHandler(h)
    n = level_number(level)
    # debug is for tun2xray's own records: other libraries (asyncio,
    # pyroute2) stay at info and above
    root.setLevel(max(n, logging.INFO))
    logging.getLogger("tun2xray").setLevel(n)
    _state["format"] = fmt


def current_format() -> str:
    """The format setup() chose ("text" before any setup)."""
    return _state["format"]


def error_line(text: str) -> None:
    """A fatal one-line error on stderr: ``tun2xray: error: ...`` in text
    mode, an error record in JSON mode (every stderr line stays JSON)."""
    if current_format() == "json":
        logging.getLogger("tun2xray").error("%s", text)
    else:
        print(f"tun2xray: error: {text}", file=sys.stderr)


def set_level(level) -> None:
    """For embedders: the level of tun2xray's own loggers; no handler added,
    the root logger untouched (the host routes records where it wants)."""
    logging.getLogger("tun2xray").setLevel(level_number(level))


# --------------------------------------------------------------------- drops

class DropSummary:
    """Rate-limited drop lines: `check(counts)` logs, at most once per
    ``interval`` of ``clock`` time, the counts by reason that grew since the
    last line (``drops: bad_tcp_checksum=3 flow_limit=120``). It returns
    the clock time at which a check should run again because counts are
    still unreported (None: nothing pending)."""

    __slots__ = ("clock", "interval", "last", "lines", "log", "next_at")

    def __init__(self, log: logging.Logger, interval: float = 1.0, clock=time.monotonic):
        self.log = log
        self.interval = interval
        self.clock = clock
        self.last: dict = {}
        self.next_at = float("-inf")
        self.lines = 0

    def check(self, counts) -> float | None:
        now = self.clock()
        if now < self.next_at:
            return self.next_at if self._delta(counts) else None
        return self.flush(counts, now)

    def flush(self, counts, now: float | None = None) -> float | None:
        """Log what grew since the last line now, whatever the interval."""
        delta = self._delta(counts)
        if not delta:
            return None
        if now is None:
            now = self.clock()
        self.last = dict(counts)
        self.next_at = now + self.interval
        self.lines += 1
        text = " ".join(f"{k}={v}" for k, v in sorted(delta.items()))
        self.log.debug("drops: %s", text, extra={"drops": delta})
        return None

    def _delta(self, counts) -> dict:
        last = self.last
        return {k: v - last.get(k, 0) for k, v in counts.items() if v != last.get(k, 0)}


# ------------------------------------------------------------------ summary

def _num(d, *path, default=0):
    for k in path:
        if not isinstance(d, dict):
            return default
        d = d.get(k)
    return d if isinstance(d, (int, float)) and not isinstance(d, bool) else default


def summary_fields(status: dict, reason: str) -> dict:
    """The exit summary's numbers from a status (an engine's, or the
    workers' aggregate, with the core's ``xray`` part when supervised)."""
    eng = status.get("engine", {})
    out = {
        "uptime": round(_num(status, "uptime"), 1),
        "tcp_flows": _num(eng, "tcp_opened"),
        "udp_flows": _num(eng, "udp_opened"),
        "bytes_up": _num(eng, "bytes_up"),
        "bytes_down": _num(eng, "bytes_down"),
        "refused": (_num(eng, "upstream_connect_failed") + _num(eng, "upstream_closed_empty")
                    + _num(eng, "refused_local_exhaustion")),
        "drops": sum(v for v in status.get("stack", {}).get("drops", {}).values()
                     if isinstance(v, int)),
        "reason": reason,
    }
    core = (status.get("xray") or {}).get("core") or {}
    if core:
        out["core_restarts"] = _num(core, "restarts")
        if "reloads" in core:
            out["core_reloads"] = _num(core, "reloads")
    if "workers" in status:
        out["workers"] = len(status["workers"])
        out["worker_restarts"] = _num(status, "worker_restarts")
    return out


def exit_summary(log: logging.Logger, status: dict, reason: str) -> dict:
    """Log the one summary line of a run that ends; returns its fields."""
    f = summary_fields(status, reason)
    parts = [f"uptime {f['uptime']:.1f}s", f"flows tcp={f['tcp_flows']} udp={f['udp_flows']}",
             f"bytes up={f['bytes_up']} down={f['bytes_down']}", f"refused={f['refused']}",
             f"drops={f['drops']}"]
    if "core_restarts" in f:
        parts.append(f"core restarts={f['core_restarts']}"
                     + (f" reloads={f['core_reloads']}" if "core_reloads" in f else ""))
    if "workers" in f:
        parts.append(f"workers={f['workers']} restarts={f['worker_restarts']}")
    log.info("summary: %s; exit: %s", ", ".join(parts), reason, extra={"summary": f})
    return f
