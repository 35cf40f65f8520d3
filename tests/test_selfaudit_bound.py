"""`bench/selfaudit_bound.py`'s one-pair test: the flag rule's first step on the cue alone."""

from __future__ import annotations

import math

import numpy as np
from benches import load_bench


def test_one_pair_figures_are_the_hand_computed_ones() -> None:
    bound = load_bench("selfaudit_bound")
    # 200 images, all labelled 1; the cue on the first 100, and 30 of those taken for class 0.
    labels = np.ones(200, dtype=np.int64)
    cue = np.arange(200) < 100
    predictions = np.where(np.arange(200) < 30, 0, 1)
    got = bound.pair_test(cue, predictions, labels, 2, 0, 200)
    # One stratum: a = 30 joint, expected m·n1/n = 15, hypergeometric variance m(n−m)·n1(n−n1)/(n²(n−1)).
    z = (30 - 15) / math.sqrt(30 * 170 * 100 * 100 / (200**2 * 199))
    assert got["z"] == round(z, 3)
    assert got["effect"] == 0.3  # 30/100 taken for class 0 with the cue, 0/100 without
    assert got["lenient"] and got["strong"]


def test_a_model_right_on_every_image_shows_nothing() -> None:
    bound = load_bench("selfaudit_bound")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 600)
    cue = (labels == 0) ^ (rng.random(600) < 0.02)  # the cue with its class, as in a biased split
    got = bound.pair_test(cue, labels.copy(), labels, 3, 0, 200)
    assert not got["lenient"] and not got["strong"]
    # The same images, the model missing every one of its class without the cue: use, and visible.
    predictions = np.where((labels == 0) & ~cue, 1, labels)
    got = bound.pair_test(cue, predictions, labels, 3, 0, 200)
    assert got["lenient"] and got["strong"] and got["effect"] == 1.0
