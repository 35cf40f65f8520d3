"""Shared pytest fixtures (additive: each fixture is independent of the others)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from PIL import Image


@pytest.fixture(scope="session")
def photos() -> dict[str, Image.Image]:
    """Real RGB photos that ship with scikit-image (no network): chelsea (a tabby cat), astronaut, coffee."""
    from skimage import data

    return {name: Image.fromarray(getattr(data, name)()) for name in ("chelsea", "astronaut", "coffee")}


@pytest.fixture(scope="session")
def lite0():
    """EfficientNet-Lite0 with its offline ImageNet weights, as a ``LoadedModel`` (eval mode, CPU)."""
    from textcam.models import load_model

    return load_model("efficientnet-lite0")


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """One temporary Prefect server (SQLite in a temp dir) for the whole session; returns its API URL.

    Flows called in this process use it; pass the URL as PREFECT_API_URL to subprocesses.
    """
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def tiny_world_cache(tmp_path_factory: pytest.TempPathFactory):
    """A world cache holding the ``tiny`` preset's CLIP and its biased and control classifiers.

    Built once per session (the tiny CLIP is the suite's longest training, a few minutes on 2 cores);
    the synthetic-world tests and the fast ground-truth bench share it. Returns ``(cache, biased, control)``.
    """
    from textcam.synthetic import WorldConfig, build_world
    from textcam.synthetic.config import DEMO_BIAS

    cache = tmp_path_factory.mktemp("world-cache")
    biased = build_world(WorldConfig.tiny(), cache_dir=cache, progress=False)
    control = build_world(
        WorldConfig.tiny(bias=[], eval_biases=(DEMO_BIAS,)), cache_dir=cache, progress=False
    )
    return cache, biased, control
