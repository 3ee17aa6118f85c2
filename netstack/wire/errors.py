"""Errors raised by the wire parsers.  `reason` is the drop-counter key."""


class WireError(ValueError):
    __slots__ = ("reason",)

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
