"""`tun2xray doctor`: a self-check, one line per check (filled in below)."""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("--control", help="the running tun2xray's control socket (unix:///path)")


def main(args) -> int:
    print("doctor: no checks yet")
    return 1
