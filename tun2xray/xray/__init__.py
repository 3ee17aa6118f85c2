from .core import *  # noqa: F401,F403  (temporary: the split follows)
from .core import _dns_server, _free_loopback_port  # noqa: F401
