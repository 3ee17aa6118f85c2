"""python3 -m tun2xray.abi build --out DIR"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m tun2xray.abi",
                                 description="Build libtun2xray (the C ABI) and its header.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write DIR/libtun2xray.so and DIR/tun2xray.h")
    b.add_argument("--out", required=True, metavar="DIR")
    b.add_argument("--verbose", action="store_true", help="show the compiler's command lines")
    args = ap.parse_args(argv)
    from .build import BuildError, build
    try:
        lib, header = build(args.out, verbose=args.verbose)
    except BuildError as e:
        print(f"tun2xray.abi: {e}", file=sys.stderr)
        return 1
    print(lib)
    print(header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
