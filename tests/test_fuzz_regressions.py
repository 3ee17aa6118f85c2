"""Inputs the coverage-guided fuzzer (tools/fuzz, atheris) found, replayed
through their harness's TestOneInput without atheris: each one crashed or
broke an invariant before its fix (tests/fuzz_corpus/TARGET/NAME says what).
The seeds of every target replay too, so a harness that rots is noticed
here and not only when someone fuzzes."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import threading

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tools.fuzz import TARGETS  # noqa: E402

CORPUS = os.path.join(ROOT, "tests", "fuzz_corpus")


def _regressions():
    out = []
    for target in sorted(os.listdir(CORPUS)):
        for name in sorted(os.listdir(os.path.join(CORPUS, target))):
            out.append(pytest.param(target, os.path.join(CORPUS, target, name), id=f"{target}/{name}"))
    return out


@pytest.fixture(scope="module", autouse=True)
def _stop_bridge():
    """The bridge target keeps one handle per process: stop it at the end,
    checking that its thread goes away."""
    yield
    if "tools.fuzz.bridge" in sys.modules:
        sys.modules["tools.fuzz.bridge"].teardown()


def test_corpus_folders_name_targets():
    assert sorted(os.listdir(CORPUS)), "no regression inputs"
    for target in os.listdir(CORPUS):
        assert target in TARGETS, f"tests/fuzz_corpus/{target}: not a fuzz target"
        assert os.listdir(os.path.join(CORPUS, target)), f"tests/fuzz_corpus/{target} is empty"


@pytest.mark.parametrize("target,path", _regressions())
def test_regression_input(target, path):
    mod = importlib.import_module(f"tools.fuzz.{target}")
    with open(path, "rb") as f:
        mod.TestOneInput(f.read())


@pytest.mark.parametrize("target", TARGETS)
def test_seeds_replay(target):
    mod = importlib.import_module(f"tools.fuzz.{target}")
    seeds = mod.seeds()
    assert seeds
    for data in seeds:
        mod.TestOneInput(data)


def test_bridge_harness_stops_its_threads():
    mod = importlib.import_module("tools.fuzz.bridge")
    mod.setup()
    assert mod._handle is not None and threading.active_count() > mod._threads_before
    mod.teardown()
    assert mod._handle is None
    assert threading.active_count() <= mod._threads_before


def test_harnesses_import_without_atheris():
    code = ("import sys; sys.modules['atheris'] = None\n"
            "import importlib\n"
            f"for t in {TARGETS!r}: importlib.import_module('tools.fuzz.' + t)\n"
            "import tools.fuzz.run\n"
            "print('imported')")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "imported" in r.stdout, r.stderr


def test_replay_command_runs_the_corpus():
    r = subprocess.run([sys.executable, "-m", "tools.fuzz", "socks", "--replay", os.path.join(CORPUS, "socks")],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "no failure" in r.stdout, r.stdout + r.stderr
