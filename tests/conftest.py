"""Suite-wide rule: under CI (CI=true, as root) nothing may be skipped.

Skips here only guard against missing root or tools on a developer's
machine; CI installs the tools and runs as root, so a skip there would hide
a test that should have run.  It is reported as a failure instead."""

import os

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and os.environ.get("CI", "").lower() == "true" and not hasattr(rep, "wasxfail"):
        rep.outcome = "failed"
        rep.longrepr = f"skipped under CI, where it must run: {rep.longrepr}"


@pytest.fixture(autouse=True)
def _restore_tun2xray_log_level():
    """A test that changes tun2xray's log level (bridge.set_log_level, the
    ABI's set_log_level op) must not decide what the next test's caplog
    sees: the level of the "tun2xray" logger is put back after each test."""
    import logging
    logger = logging.getLogger("tun2xray")
    level = logger.level
    yield
    logger.setLevel(level)
