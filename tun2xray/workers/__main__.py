"""`python -m tun2xray.workers`: one worker process (see tun2xray.workers.worker)."""

import sys

from .worker import worker_main

if __name__ == "__main__":
    sys.exit(worker_main())
