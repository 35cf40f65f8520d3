"""The data half of a flag: how a phrase goes with each class in the classifier's training images."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.training_data import label_correlation, training_correlation


def test_label_correlation_by_hand() -> None:
    # 6 images, 2 phrases; labels 0, 0, 1, 1, 1 and one unknown (-1), which counts nowhere
    presence = np.array([[1, 0], [1, 1], [0, 1], [0, 1], [1, 1], [1, 0]], dtype=bool)
    labels = np.array([0, 0, 1, 1, 1, -1])
    got = label_correlation(presence, labels, n_classes=3)
    # class 0: phrase 0 in 2/2 against 1/3 of the others; phrase 1 in 1/2 against 3/3
    np.testing.assert_allclose(got[0], [1 - 1 / 3, 0.5 - 1.0])
    np.testing.assert_allclose(got[1], [1 / 3 - 1, 1 - 0.5])
    assert np.isnan(got[2]).all()  # class 2 has no labelled image: unknown, not zero


def test_label_correlation_of_a_single_class_is_unknown() -> None:
    got = label_correlation(np.ones((4, 2), dtype=bool), np.zeros(4, dtype=np.int64), n_classes=2)
    assert np.isnan(got).all()  # every image is class 0: no others to compare with


def test_label_correlation_refuses_misaligned_labels() -> None:
    with pytest.raises(ValueError, match="3 labels for 4 images"):
        label_correlation(np.ones((4, 2), dtype=bool), np.zeros(3, dtype=np.int64), n_classes=2)


@pytest.fixture(scope="module")
def tiny_clip():
    from textcam.clip import load_clip

    torch.manual_seed(0)
    return load_clip("textcam-tiny-clevr", None, device="cpu")


def test_training_correlation_reads_the_images_and_leaves_the_unreadable_out(
    tiny_clip, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The same figures as CLIP's presence calls on the images computed by hand; a broken file is left
    out with a warning, its label with it."""
    from textcam.visibility import PhraseVisibility

    rng = np.random.default_rng(0)
    paths, labels = [], []
    for i in range(24):
        colour = (200, 30, 30) if i % 2 else (30, 30, 200)
        pixels = np.clip(np.array(colour) + rng.integers(-20, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(pixels).save(paths[-1])
        labels.append(i % 2)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    text = tiny_clip.encode_texts(["red", "blue", "a cube"], cache_dir=False)
    with caplog.at_level(logging.WARNING, logger="tasks.training_data"):
        got = training_correlation(
            [*paths, str(tmp_path / "broken.png")], np.array([*labels, 1]), 2, tiny_clip, text
        )
    assert "1 of 25 training images could not be read" in caplog.text
    with torch.inference_mode():
        pixels = torch.stack([tiny_clip.preprocess(Image.open(p).convert("RGB")) for p in paths])
        emb = tiny_clip.encode_images(pixels).cpu()
    presence = PhraseVisibility.fit(emb, text).presence(emb)
    np.testing.assert_allclose(got, label_correlation(presence, np.array(labels), 2), atol=1e-12)
    assert got.shape == (2, 3) and np.abs(got).max() > 0.1  # the colours differ by label
    # with a probe's presence model (here fitted on the blue images only), that call is used instead
    probe_call = PhraseVisibility.fit(emb[::2], text)
    called = training_correlation(paths, np.array(labels), 2, tiny_clip, text, visibility=probe_call)
    np.testing.assert_allclose(called, label_correlation(probe_call.presence(emb), np.array(labels), 2))
    assert not np.allclose(called, got, equal_nan=True)  # ...which calls presence differently here


def test_training_correlation_needs_one_readable_image(tiny_clip, tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"not an image")
    text = tiny_clip.encode_texts(["red"], cache_dir=False)
    with pytest.raises(ValueError, match="no training image could be read"):
        training_correlation([str(tmp_path / "broken.png")], np.array([0]), 2, tiny_clip, text)
