"""netstack: a sans-I/O TCP/IP stack for raw IP packets (see stack.py)."""

from . import events
from .config import StackConfig
from .stack import Stack

__all__ = ["Stack", "StackConfig", "events"]
