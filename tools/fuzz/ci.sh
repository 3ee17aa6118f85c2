#!/usr/bin/env bash
# Short fuzzing run for CI: every target FUZZ_SECONDS (default 10) seconds in
# turn, about 90 s in all; fails on any crash or broken invariant.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec python3 -m tools.fuzz ci --seconds "${FUZZ_SECONDS:-10}" "$@"
