"""Runner: fuzz one target with atheris, replay inputs, write seed corpora.

    python3 -m tools.fuzz TARGET [--seconds N] [--runs N] [--workdir DIR] [-- LIBFUZZER_FLAGS]
    python3 -m tools.fuzz all --seconds N
    python3 -m tools.fuzz TARGET --replay FILE_OR_DIR ...
    python3 -m tools.fuzz seeds [--out DIR]
    python3 -m tools.fuzz ci [--seconds N] [--targets a,b] [--workdir DIR] [--jobs J]

`ci` fuzzes every target N seconds, J targets at a time (a fresh corpus
unless --workdir is given), prints one line of figures per target and, for a target that
failed, the end of its log and where the input was written; it exits 1 if
any target failed.

A fuzzing run keeps its corpus in WORKDIR/TARGET/corpus (default workdir:
$TMPDIR/tun2xray-fuzz), starts from the target's seeds and its regression
inputs (tests/fuzz_corpus/TARGET), and writes any crashing input to
WORKDIR/TARGET/crash-*.  Exit status: 0 when nothing was found, non-zero
(libFuzzer's) when an input crashed or broke an invariant.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import re
import subprocess
import sys
import tempfile

from . import TARGETS

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
REGRESSIONS = os.path.join(ROOT, "tests", "fuzz_corpus")


def target_module_name_ok(name: str) -> None:
    if name not in TARGETS:
        raise SystemExit(f"tools.fuzz: unknown target {name!r} (one of {', '.join(TARGETS)})")


def target_module(name: str):
    target_module_name_ok(name)
    return importlib.import_module(f"tools.fuzz.{name}")


def write_seeds(name: str, out: str) -> int:
    os.makedirs(out, exist_ok=True)
    n = 0
    for data in target_module(name).seeds():
        path = os.path.join(out, "seed-" + hashlib.sha1(data).hexdigest()[:16])
        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.write(data)
        n += 1
    return n


def inputs(paths) -> list:
    out = []
    for p in paths:
        if os.path.isdir(p):
            out += [os.path.join(p, f) for f in sorted(os.listdir(p)) if not f.startswith(".")]
        else:
            out.append(p)
    return out


def replay(name: str, paths) -> int:
    mod = target_module(name)
    files = inputs(paths)
    for path in files:
        with open(path, "rb") as f:
            mod.TestOneInput(f.read())
    print(f"tools.fuzz: {name}: {len(files)} inputs replayed, no failure")
    return 0


def fuzz(name: str, seconds: int, runs: int, workdir: str, extra: list) -> int:
    """Fuzz in this process (atheris.Fuzz does not return)."""
    import atheris

    base = os.path.join(workdir, name)
    corpus, seeds = os.path.join(base, "corpus"), os.path.join(base, "seeds")
    os.makedirs(corpus, exist_ok=True)
    # instrument before anything imports the code under test (dnspython too:
    # the dns target's parser is the library's)
    with atheris.instrument_imports(include=["netstack", "tun2xray", "tools.fuzz", "dns"]):
        mod = importlib.import_module(f"tools.fuzz.{name}")
    write_seeds(name, seeds)
    dirs = [corpus, seeds]
    reg = os.path.join(REGRESSIONS, name)
    if os.path.isdir(reg):
        dirs.append(reg)
    setup = getattr(mod, "setup", None)
    if setup is not None:
        setup()
    argv = [sys.argv[0], *dirs, f"-artifact_prefix={base}/", "-rss_limit_mb=4096",
            "-max_len=65536", "-timeout=30", "-print_final_stats=1"]
    if seconds:
        argv.append(f"-max_total_time={seconds}")
    if runs:
        argv.append(f"-runs={runs}")
    atheris.Setup(argv + list(extra), mod.TestOneInput)
    atheris.Fuzz()
    return 0


def _stat(log: str, key: str) -> str:
    m = re.findall(rf"{re.escape(key)}\s*(\d+)", log)
    return m[-1] if m else "?"


def _fuzz_logged(name: str, seconds: int, workdir: str, extra: list) -> tuple[int, str, float]:
    """One target's run in a child, its output in WORKDIR/NAME.log: (exit
    status, the log, seconds taken)."""
    import time
    log_path = os.path.join(workdir, f"{name}.log")
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        rc = subprocess.call([sys.executable, "-m", "tools.fuzz", name, "--seconds", str(seconds),
                              "--workdir", workdir, "--", *extra],
                             cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    with open(log_path, errors="replace") as f:
        return rc, f.read(), time.monotonic() - t0


def ci(seconds: int, targets, workdir: str | None, extra: list, jobs: int = 1) -> int:
    """Each target for *seconds*, *jobs* targets at a time (each is one
    single-threaded process, so on N cores N at a time get the same
    executions as one after the other, in 1/N of the wall time); a summary
    line each, in the targets' order; exit 1 on any finding."""
    import shutil
    from concurrent.futures import ThreadPoolExecutor
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("tools.fuzz ci: atheris is not installed (pip install atheris)", file=sys.stderr)
        return 1
    fresh = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="tun2xray-fuzz-ci-")
    os.makedirs(workdir, exist_ok=True)
    failed = []
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        runs = [(name, pool.submit(_fuzz_logged, name, seconds, workdir, extra)) for name in targets]
        for name, run in runs:
            rc, text, took = run.result()
            cov = re.findall(r"cov: (\d+) ft: (\d+) corp: (\d+)", text)
            cov, ft, corp = cov[-1] if cov else ("?", "?", "?")
            print(f"fuzz {name:7s} {'ok' if rc == 0 else 'FAILED':6s} {took:6.1f} s  "
                  f"{_stat(text, 'stat::number_of_executed_units:'):>9s} execs  "
                  f"{_stat(text, 'stat::average_exec_per_sec:'):>6s} exec/s  cov {cov}  ft {ft}  corpus {corp}",
                  flush=True)
            if rc:
                failed.append(name)
                lines = [ln for ln in text.splitlines() if not ln.startswith("INFO: Instrumenting")]
                print("\n".join(lines[-40:]), flush=True)
                print(f"fuzz {name}: the failing input is in {workdir}/{name}/ (crash-*); keep it under "
                      f"tests/fuzz_corpus/{name}/ once fixed", flush=True)
    if fresh and not failed:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"fuzz: {len(targets) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def main(argv) -> int:
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(prog="python3 -m tools.fuzz", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", help=f"one of {', '.join(TARGETS)}, 'all', or 'seeds'")
    ap.add_argument("--seconds", type=int, default=0, help="fuzz this long (0: until stopped)")
    ap.add_argument("--runs", type=int, default=0, help="stop after this many executions")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "tun2xray-fuzz"))
    ap.add_argument("--replay", nargs="+", metavar="PATH", help="run these inputs (files or folders) once")
    ap.add_argument("--out", help="seeds: where to write (default WORKDIR/TARGET/seeds)")
    ap.add_argument("--targets", help="ci: comma-separated targets (default: all)")
    ap.add_argument("--jobs", type=int, default=1, help="ci: targets fuzzed at a time (default 1)")
    a = ap.parse_args(argv)
    if a.target == "ci":
        names = a.targets.split(",") if a.targets else list(TARGETS)
        for n in names:
            target_module_name_ok(n)
        wd = a.workdir if "--workdir" in argv else None
        return ci(a.seconds or 10, names, wd, extra, a.jobs)
    if a.target == "seeds":
        for name in TARGETS:
            out = os.path.join(a.out, name) if a.out else os.path.join(a.workdir, name, "seeds")
            print(f"{name}: {write_seeds(name, out)} seeds in {out}")
        return 0
    if a.replay:
        return replay(a.target, a.replay)
    if a.target == "all":
        status = 0
        for name in TARGETS:
            cmd = [sys.executable, "-m", "tools.fuzz", name, "--seconds", str(a.seconds),
                   "--workdir", a.workdir, *(["--runs", str(a.runs)] if a.runs else []), "--", *extra]
            print(f"tools.fuzz: {name}: {' '.join(cmd[1:])}", flush=True)
            rc = subprocess.call(cmd, cwd=ROOT)
            if rc:
                print(f"tools.fuzz: {name}: FAILED (exit {rc}); the input is in {a.workdir}/{name}/",
                      flush=True)
                status = 1
        return status
    target_module_name_ok(a.target)
    return fuzz(a.target, a.seconds, a.runs, a.workdir, extra)
