"""Errors raised by the wire parsers.

`reason` is a short snake_case key the caller uses as its drop counter
(``drops[err.reason] += 1``); `detail` is for humans and logs only.
"""


class WireError(ValueError):
    __slots__ = ("reason", "detail")

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
