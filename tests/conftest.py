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
