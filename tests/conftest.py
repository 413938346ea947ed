import os
from pathlib import Path

import pytest

from tests.image_server import ImageServer


def pytest_configure(config):
    # Nothing a test writes (demo checkpoints, language-model views) lands in
    # the user's cache.
    os.environ.setdefault(
        "MINISTRAL_SERVE_CACHE", str(Path(config.rootpath) / ".pytest_cache" / "ministral-serve")
    )


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/integration" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.slow)


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
