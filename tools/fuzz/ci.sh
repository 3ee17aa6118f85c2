#!/usr/bin/env bash
# Short fuzzing run for CI: every target (dns among them) FUZZ_SECONDS (default
# 10) seconds, FUZZ_JOBS (default: one per core) targets at a time, about 90 s
# of fuzzing in all (45 s of wall time on 2 cores); fails on any crash or
# broken invariant.  Runs on the venv tools/install.sh --test made (atheris
# is in the test extra), else on python3.  Arguments go to `python3 -m tools.fuzz ci` (e.g. -- -seed=1).
set -euo pipefail
cd "$(dirname "$0")/../.."
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
exec "$py" -m tools.fuzz ci --seconds "${FUZZ_SECONDS:-10}" --jobs "${FUZZ_JOBS:-$(nproc)}" "$@"
