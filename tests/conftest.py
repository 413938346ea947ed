import os
import time
from pathlib import Path

import pytest

from tests.image_server import ImageServer

# The whole run's time budget: CI stops a run at 90 minutes and keeps nothing
# of it, so the suite stops itself well before, saying why.
DEFAULT_BUDGET_MIN = 60.0


def pytest_configure(config):
    # Nothing a test writes (demo checkpoints, language-model views) lands in
    # the user's cache.
    os.environ.setdefault(
        "MINISTRAL_SERVE_CACHE", str(Path(config.rootpath) / ".pytest_cache" / "ministral-serve")
    )
    config.stash[_BUDGET] = _Budget(float(os.environ.get("MINISTRAL_TEST_BUDGET_MIN", DEFAULT_BUDGET_MIN)))


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/integration" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.slow)
    # The fast tier first; then the tests that start Ray clusters of their
    # own, before the shared one starts: on two cores, two clusters side by
    # side slow both.
    items.sort(
        key=lambda item: (
            item.get_closest_marker("slow") is not None,
            item.get_closest_marker("own_cluster") is None,
        )
    )


class _Budget:
    def __init__(self, minutes: float):
        self.minutes = minutes
        self.started = time.monotonic()

    def remaining_s(self) -> float:
        return self.minutes * 60 - (time.monotonic() - self.started)


_BUDGET = pytest.StashKey[_Budget]()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    """No test runs past the budget (pytest-timeout, at most what is left), and none starts after it."""
    budget = item.config.stash[_BUDGET]
    per_test = item.config.getini("timeout")
    remaining = budget.remaining_s()
    if remaining < float(per_test or "inf"):
        item.add_marker(pytest.mark.timeout(max(1.0, remaining)))
    yield
    if budget.remaining_s() <= 0:
        item.session.shouldstop = (
            f"the test suite ran past its time budget of {budget.minutes:g} minutes "
            f"(MINISTRAL_TEST_BUDGET_MIN); the slowest tests are listed above. CI stops at 90 minutes "
            "and lands nothing: make the slow tests share running applications, or start fewer engines"
        )


@pytest.fixture(scope="session")
def image_server():
    """Test images over HTTP on 127.0.0.1."""
    with ImageServer() as server:
        yield server


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory) -> Path:
    """The instruct demo checkpoint (seed 0), written once per test session."""
    from serve.demo_checkpoint import write_demo_checkpoint

    return write_demo_checkpoint(tmp_path_factory.mktemp("checkpoints") / "demo", seed=0)
