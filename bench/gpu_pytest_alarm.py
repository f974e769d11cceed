"""A per-test time limit for bench/gpu_run.sh where pytest-timeout is not installed (the GPU
machine has no network): ``pytest -p gpu_pytest_alarm --alarm-timeout SECONDS`` (with bench/ on
PYTHONPATH). A test still running after SECONDS fails with a TimeoutError raised by SIGALRM in
the test's thread (the main thread; with pytest-xdist each worker's main thread), and the run
goes on with the next test. A test blocked inside C code is interrupted when it returns to
Python; the step's `timeout` in gpu_run.sh bounds the whole group in any case."""
import signal

import pytest


def pytest_addoption(parser):
    parser.addoption("--alarm-timeout", type=float, default=0.0,
                     help="fail a test that runs longer than this many seconds (SIGALRM; 0: off)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    limit = item.config.getoption("--alarm-timeout")
    if not limit or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expired(signum, frame):
        raise TimeoutError(f"{item.nodeid}: still running after {limit:g} s (--alarm-timeout)")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
