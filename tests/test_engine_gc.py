"""While an engine runs, the collector's youngest generation waits for
GC_GEN0 allocations instead of 700 (per-connection objects were collected
and promoted every ~60 connections); the process's own thresholds come back
when the last running engine stops."""

from __future__ import annotations

import gc

from vclock import EngineHarness, run_virtual

from tun2xray.engine import core

URL = "socks5://127.0.0.1:9"


def test_running_engines_raise_the_youngest_threshold_and_the_last_one_restores_it():
    before = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    seen = []

    async def main(loop):
        a = await EngineHarness(URL).start()
        seen.append(gc.get_threshold())
        b = await EngineHarness(URL).start()
        await a.stop()
        seen.append(gc.get_threshold())          # b still runs
        await b.stop()
        seen.append(gc.get_threshold())

    try:
        run_virtual(main)
    finally:
        gc.set_threshold(*before)
    assert seen == [(core.GC_GEN0, 10, 10), (core.GC_GEN0, 10, 10), (700, 10, 10)]


def test_a_threshold_the_host_chose_is_left_alone():
    before = gc.get_threshold()
    seen = []

    async def main(loop):
        h = await EngineHarness(URL).start()
        seen.append(gc.get_threshold())
        gc.set_threshold(50000, 20, 20)           # the host decides meanwhile
        await h.stop()
        seen.append(gc.get_threshold())

    gc.set_threshold(100000, 10, 10)              # above ours: not lowered
    try:
        run_virtual(main)
        h_seen = list(seen)
        seen.clear()
        gc.set_threshold(700, 10, 10)
        run_virtual(main)
    finally:
        gc.set_threshold(*before)
    assert h_seen == [(100000, 10, 10), (50000, 20, 20)]
    assert seen == [(core.GC_GEN0, 10, 10), (50000, 20, 20)]
