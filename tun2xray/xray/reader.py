"""Reading a core config exactly as the core reads it.

``load_config`` reads a config the way Xray and v2ray do: their comment
filter (``//``, ``/* */`` and ``#`` outside strings), then strict JSON (no
trailing commas); errors name the file, line and column.  ``core_position``
maps a position the core reports (in its filtered text) back to the file.
"""

from __future__ import annotations

import bisect
import json
import os
import re

from .errors import NotAnObjectError, XrayConfigError

MAX_CONFIG = 16 << 20          # bytes; core configs are kilobytes


# --------------------------------------------------------------------------
# reading
#
# What the core reads is what Go's encoding/json decodes after the core's
# comment filter (Xray's and v2ray's infra/conf/json reader): comments are
# removed outside double- and single-quoted strings, newlines inside them are
# kept (so line numbers match the file), and nothing else is relaxed -- no
# trailing commas, no NaN, no byte order mark.  Go's decoder reads the first
# JSON value and ignores whatever follows it.  The filter below is a port of
# that state machine, so a config we accept is one the core accepts, and a
# position in the filtered text maps back to the user's file.

_SPECIAL = {"content": re.compile(r"""["'\\#/]"""), "dq": re.compile(r'["\\]'),
            "sq": re.compile(r"['\\]"), "comment": re.compile(r"\n"),
            "mlc": re.compile(r"[*\n]")}


def _filter_comments(text: str) -> tuple:
    """(filtered text, [(filtered_pos, original_pos)] at each jump) the way
    the core's reader filters: comments dropped, their newlines kept."""
    out = []
    jumps = [(0, 0)]
    o = 0                       # length of out so far
    i, n = 0, len(text)
    state = "content"

    def emit(s: str, at: int) -> None:
        nonlocal o
        fp, op = jumps[-1]
        if at - op != o - fp:
            jumps.append((o, at))
        out.append(s)
        o += len(s)

    while i < n:
        pat = _SPECIAL.get(state)
        if pat is not None:
            m = pat.search(text, i)
            j = n if m is None else m.start()
            if j > i:
                if state not in ("comment", "mlc"):
                    emit(text[i:j], i)
                i = j
                if m is None:
                    break
        c = text[i]
        if state == "content":
            if c in "\"'":
                state = "dq" if c == '"' else "sq"
                emit(c, i)
            elif c == "\\":
                state = "escape"
            elif c == "#":
                state = "comment"
            elif c == "/":
                state = "slash"
            else:
                emit(c, i)
        elif state in ("escape", "dqesc", "sqesc"):
            emit("\\" + c, i - 1)
            state = {"escape": "content", "dqesc": "dq", "sqesc": "sq"}[state]
        elif state in ("dq", "sq"):
            if c == "\\":
                state += "esc"
            else:
                if c == ('"' if state == "dq" else "'"):
                    state = "content"
                emit(c, i)
        elif state == "comment":            # c is the newline
            state = "content"
            emit(c, i)
        elif state == "slash":
            if c == "/":
                state = "comment"
            elif c == "*":
                state = "mlc"
            else:
                # the core emits "/x" and stays in this state (its quirk,
                # kept: such text is invalid JSON either way)
                emit("/" + c, i - 1)
        elif state == "mlc":
            if c == "*":
                state = "mlcstar"
            else:
                emit(c, i)                  # a newline
        elif state == "mlcstar":
            if c == "/":
                state = "content"
            elif c == "\n":
                emit(c, i)                  # (the core stays in this state)
            elif c != "*":
                state = "mlc"
        i += 1
    return "".join(out), jumps


def strip_comments(text: str) -> str:
    """The text the core's JSON decoder sees (comments removed)."""
    return _filter_comments(text)[0]


def _original_pos(jumps, pos: int) -> int:
    k = bisect.bisect_right(jumps, (pos, float("inf"))) - 1
    fp, op = jumps[max(k, 0)]
    return op + (pos - fp)


def _line_col(text: str, pos: int) -> tuple:
    pos = max(0, min(pos, len(text)))
    line = text.count("\n", 0, pos) + 1
    return line, pos - (text.rfind("\n", 0, pos) + 1) + 1


def _reject_constant(name: str):
    raise ValueError(name)


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_WS = re.compile(r"[ \t\n\r]*")


def parse_config_text(text: str, name: str = "config") -> dict:
    """Decode an Xray JSON config exactly as the core does (comments allowed,
    no trailing commas); XrayConfigError naming line and column otherwise."""
    if text.startswith("\ufeff"):
        raise XrayConfigError(f"{name}: line 1 column 1: a byte order mark (BOM) "
                              f"before the JSON (the core rejects it: save the file without it)")
    filtered, jumps = _filter_comments(text)
    start = _WS.match(filtered).end()
    if start == len(filtered):
        raise XrayConfigError(f"{name}: empty: no JSON value")
    try:
        data, _end = _DECODER.raw_decode(filtered, start)   # text after the value: ignored, as the core does
    except RecursionError:
        raise XrayConfigError(f"{name}: nested too deeply") from None
    except json.JSONDecodeError as e:
        raise XrayConfigError(_syntax_message(name, text, filtered, jumps, e.pos, e.msg)) from None
    except ValueError as e:            # NaN, Infinity
        pos = _find_outside_strings(filtered, str(e), start)
        raise XrayConfigError(_syntax_message(name, text, filtered, jumps, pos,
                                              f"{e} is not JSON")) from None
    if data is None:
        data = {}                      # the core decodes null into an empty config
    if not isinstance(data, dict):
        raise NotAnObjectError(f"{name}: the config must be a JSON object")
    return data


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def _find_outside_strings(text: str, token: str, start: int) -> int:
    i = start
    while True:
        j = text.find(token, i)
        m = _STRING.search(text, i)
        if j < 0 or m is None or j < m.start():
            return j
        i = m.end()


def _syntax_message(name, text, filtered, jumps, pos, msg) -> str:
    back = len(filtered[:pos].rstrip(" \t\n\r"))
    if pos < len(filtered) and filtered[pos] in "]}" and back and filtered[back - 1] == ",":
        line, col = _line_col(text, _original_pos(jumps, back - 1))
        return (f"{name}: line {line} column {col}: trailing comma before "
                f"'{filtered[pos]}' (Xray and v2ray reject it)")
    line, col = _line_col(text, _original_pos(jumps, pos))
    return f"{name}: line {line} column {col}: not valid JSON: {msg}"


def core_position(text: str, line: int, char: int) -> tuple:
    """The core reports "at line L char C" in the filtered text (C counts
    bytes before the offending offset on that line); the (line, column) in
    the user's file."""
    filtered, jumps = _filter_comments(text)
    starts = [0] + [m.end() for m in re.finditer("\n", filtered)]
    if not 1 <= line <= len(starts):
        return line, char
    ls = starts[line - 1]
    le = starts[line] - 1 if line < len(starts) else len(filtered)
    raw = filtered[ls:le].encode()
    ncols = len(raw[:max(char - 1, 0)].decode(errors="ignore"))
    return _line_col(text, _original_pos(jumps, ls + ncols))


def load_config(path: str) -> dict:
    """Read and decode ``path`` (following a config.json link)."""
    if os.path.islink(path) and not os.path.exists(path):
        raise XrayConfigError(f"{path}: dangling link to {os.readlink(path)}")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG + 1)
    except OSError as e:
        raise XrayConfigError(f"{path}: {e.strerror}") from None
    if len(raw) > MAX_CONFIG:
        raise XrayConfigError(f"{path}: larger than {MAX_CONFIG >> 20} MB: not a core config")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise XrayConfigError(f"{path}: not UTF-8 text") from None
    # name the file the user edits: a node, not the config.json link to it
    return parse_config_text(text, os.path.realpath(path) if os.path.islink(path) else path)
