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
"""

from .config import (DEFAULT_MARK, RUNTIME_SUFFIX, SNIFFING, Derived, Inbound, derive,
                     outbound_servers, resolve_servers, runtime_path_for, write_runtime)
from .core import Core, check_config, core_command, core_reason, exit_reason, file_reason, find_binary
from .errors import CoreError, NotAnObjectError, XrayConfigError, XrayError
from .probe import inbound_listening, proc_listening, socks_probe
from .reader import MAX_CONFIG, core_position, load_config, parse_config_text, strip_comments
from .session import XraySession, session_from_args, user_rejection

__all__ = [
    "CoreError", "Core", "DEFAULT_MARK", "Derived", "Inbound", "MAX_CONFIG", "NotAnObjectError",
    "RUNTIME_SUFFIX", "SNIFFING", "XrayConfigError", "XrayError", "XraySession", "check_config",
    "core_command", "core_position", "core_reason", "derive", "exit_reason", "file_reason",
    "find_binary", "inbound_listening", "load_config", "outbound_servers", "parse_config_text",
    "proc_listening", "resolve_servers", "runtime_path_for", "session_from_args", "socks_probe",
    "strip_comments", "user_rejection", "write_runtime",
]
