"""Fixtures for the end-to-end tests: the namespace lab of tools/netlab.py.

Every test here is marked ``e2e`` and needs root (network namespaces, veth,
TUN). Without root they are skipped with that reason; CI runs as root, so
nothing is hidden there. Each test runs under a deadline (``deadline(secs)``
marker, 60 s by default) so a hang fails the test instead of stalling CI.
"""

from __future__ import annotations

import os
import signal
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tools"))

import netlab  # noqa: E402  (tools/ is not a package)

DEFAULT_DEADLINE = 60


def pytest_configure(config):
    config.addinivalue_line("markers", "deadline(seconds): fail an e2e test that runs longer")


def need_root():
    if os.geteuid() != 0:
        pytest.skip("e2e tests need root (network namespaces, veth, TUN); CI runs them as root")


@pytest.fixture(scope="session")
def root():
    """Skip (with the reason) unless root; for tests and lab fixtures that
    build their own lab."""
    need_root()


@pytest.fixture(autouse=True)
def _deadline(request):
    """Fail (not hang) a test that overruns its deadline: SIGALRM raises in
    the main thread, which interrupts blocking socket and subprocess waits."""
    m = request.node.get_closest_marker("deadline")
    secs = m.args[0] if m else DEFAULT_DEADLINE

    def on_alarm(signum, frame):
        raise TimeoutError(f"test exceeded its {secs}s deadline")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, secs)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="session")
def lab():
    """One lab (prefix e2) for the whole session; torn down at the end, and
    the teardown checks that both namespaces are really gone.  The hop is
    VLESS: test_run counts every one of 200 concurrent flows, and a VMess
    hop's replay filter rejects about one new connection in a thousand."""
    need_root()
    lab = netlab.Lab(prefix="e2", hop="vless")
    with lab:
        yield lab
    assert not netlab.netns_exists(lab.cli_ns), "e2-cli left behind"
    assert not netlab.netns_exists(lab.srv_ns), "e2-srv left behind"


@pytest.fixture
def core_up(lab):
    """The local core is running at test start (a failed restart test must
    not break the tests after it)."""
    p = lab.procs.get("local-core")
    if p is None or p.poll() is not None:
        lab.stop("local-core")
        lab.start_local_core()
    return lab
