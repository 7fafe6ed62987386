"""Session fixtures: the synthetic corpus, configs pointed at temp dirs, a Prefect harness."""
from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "600")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def synth_corpus(tmp_path_factory) -> Path:
    """A small synthetic corpus with ground truth (songs, vocals, every bad-file kind)."""
    from tasks.synth import generate_corpus

    out = tmp_path_factory.mktemp("synth")
    generate_corpus(out, n=8, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory) -> Path:
    """One directory of tiny twins for the whole session (built on first use). Under pytest-xdist
    the workers share one (each twin is built atomically; the first build wins), so no twin is
    built twice."""
    if os.environ.get("ACEPIPE_TEST_TINY_DIR"):
        return Path(os.environ["ACEPIPE_TEST_TINY_DIR"])
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = tmp_path_factory.getbasetemp().parent / "tiny-models"
        shared.mkdir(exist_ok=True)
        return shared
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture
def make_cfg(tmp_path, tiny_models_dir):
    """A tiny-profile Config with its work root in a temp dir; extra `key=value` overrides."""
    from schemas.config import load_config

    def make(*overrides: str, work: Path | None = None, sources: list[str] | None = None):
        cfg = load_config("tiny", [f"work_root={work or tmp_path / 'work'}",
                                   f"models.tiny_dir={tiny_models_dir}", *overrides], environ={})
        if sources is not None:
            cfg = cfg.model_copy(update={"sources": sources})
        return cfg

    return make


@pytest.fixture(scope="session")
def prefect_harness():
    """Prefect's test harness (a temporary SQLite server), once per session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def pytest_collection_modifyitems(config, items):
    """Files of slow end-to-end tests first, wholly slow files (the README's commands) before files
    with a few (order inside a file kept): under pytest-xdist the longest files then start at once
    instead of ending the run alone on one worker."""
    slow, fast = set(), set()
    for item in items:
        (slow if item.get_closest_marker("slow") else fast).add(item.path)
    items.sort(key=lambda item: (item.path in fast) + (item.path not in slow))
