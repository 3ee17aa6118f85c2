"""Entry script of the standalone binary (tools/build-binary.sh freezes it)."""

import sys

from tun2xray.entry import main

sys.exit(main())
