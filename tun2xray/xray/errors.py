"""The errors of the Xray side, each told to the user as one line.

Every room of the xray package (reader, config, core, session, auto-route)
raises these, so they live below all of them.
"""

from __future__ import annotations


class XrayError(Exception):
    """Base of the errors `run --xray-config` reports as one line."""


class XrayConfigError(XrayError, ValueError):
    """The config cannot be used; the message is one line."""


class NotAnObjectError(XrayConfigError):
    """Valid JSON, but not an object: no config at all (a list, a number)."""


class CoreError(XrayError, RuntimeError):
    """The core could not be started (missing binary, rejected config, ...).

    ``path`` and ``reason``: the config the core was given and its own reason,
    when it rejected one."""

    def __init__(self, msg: str, path: str | None = None, reason: str | None = None):
        super().__init__(msg)
        self.path = path
        self.reason = reason
