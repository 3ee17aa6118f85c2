"""The Xray side: a core's config read and derived, the core supervised,
and the session `run --xray-config` adds around the engine.

One idea per module, each importing only those above it in this list:

- ``errors``: the exceptions every room raises (one line each).
- ``reader``: a config read exactly as the core reads it (comments, strict
  JSON, positions in the user's file).
- ``config``: what `run` takes from a config (inbounds, rules, the runtime
  config with the inbounds it lacks and marked outbounds).
- ``probe``: is an inbound up (SOCKS5 or /proc, nothing for the core to log).
- ``core``: the supervised core process (start, restart, reload, health).
- ``autoroute``: --auto-route's policy routing over netlink.
- ``session``: XraySession, the above around the engine; node switching.
- ``nodes`` and ``doctor``: the `node` and `doctor` subcommands, users of
  the names re-exported here (so this file never imports them).

The re-exports load on first use (PEP 562): ``tun2xray node`` and ``tun2xray
doctor`` build their parsers without the core's modules, and a program that
never runs a core never imports them.
"""

from __future__ import annotations

# module -> the names it exports through the package
_EXPORTS = {
    "errors": ("CoreError", "NotAnObjectError", "XrayConfigError", "XrayError"),
    "reader": ("MAX_CONFIG", "core_position", "load_config", "parse_config_text", "strip_comments"),
    "config": ("DEFAULT_MARK", "RUNTIME_SUFFIX", "SNIFFING", "Derived", "Inbound", "derive",
               "outbound_servers", "resolve_servers", "runtime_path_for", "write_runtime"),
    "probe": ("inbound_listening", "proc_listening", "socks_probe"),
    "core": ("Core", "check_config", "core_command", "core_reason", "exit_reason", "file_reason",
             "find_binary"),
    "session": ("XraySession", "session_from_args", "user_rejection"),
}
_HOME = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    mod = _HOME.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from . import config, core, errors, probe, reader, session
    rooms = {"errors": errors, "reader": reader, "config": config, "probe": probe, "core": core,
             "session": session}
    value = getattr(rooms[mod], name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(_HOME))
