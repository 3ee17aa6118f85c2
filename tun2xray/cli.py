"""tun2xray command line."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tun2xray", description="TUN packet flows to Xray inbounds")
    sub = p.add_subparsers(dest="command", required=True)
    rp = sub.add_parser("replay", help="feed a capture to the stack offline and print its flows")
    rp.add_argument("pcap", nargs="+")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "replay":
        from .replay import main as replay_main
        return replay_main(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
