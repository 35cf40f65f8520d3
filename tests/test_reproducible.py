"""Same config and seeds on one machine: bit-identical tiny CLIP and classifier (issue 11). The bank and
flags of two runs over the same explanations are compared by tests/test_audit_world_flags.py."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from textcam.synthetic.classifier import train_classifier
from textcam.synthetic.scenes import SceneConfig, generate
from textcam.synthetic.tiny_clip import CHECKPOINT_NAME, ClipTrainConfig, train_tiny_clip


def _digest(path: Path) -> str:
    """Hash of the tensors (names, dtypes, shapes, bytes) and metadata, not of the file: safetensors
    writes the same tensors with header keys in varying order."""
    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(str(path), framework="pt") as f:
        h.update(repr(sorted((f.metadata() or {}).items())).encode())
        for key in sorted(f.keys()):
            t = f.get_tensor(key)
            h.update(f"{key}{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_tiny_clip_training_is_bit_identical(tmp_path: Path) -> None:
    cfg = ClipTrainConfig(epochs=2, steps_per_epoch=3, batch_size=16, eval_images=32, seed=3)
    for name in ("a", "b"):
        train_tiny_clip(SceneConfig(), cfg, tmp_path / name, progress=False)
    assert _digest(tmp_path / "a" / CHECKPOINT_NAME) == _digest(tmp_path / "b" / CHECKPOINT_NAME)
    # ... and the seed matters (the comparison above can fail)
    other = ClipTrainConfig(epochs=1, steps_per_epoch=3, batch_size=16, eval_images=32, seed=4)
    train_tiny_clip(SceneConfig(), other, tmp_path / "c", progress=False)
    assert _digest(tmp_path / "c" / CHECKPOINT_NAME) != _digest(tmp_path / "a" / CHECKPOINT_NAME)


@pytest.mark.parametrize("seed", [0])
def test_classifier_training_is_bit_identical(tmp_path: Path, seed: int) -> None:
    batch = generate(SceneConfig(), 96, seed, "train")
    labels = batch.records["label"].to_numpy()
    states = []
    for name in ("a", "b"):
        model, _ = train_classifier(
            batch.images,
            labels,
            4,
            tmp_path / name,
            width=8,
            epochs=2,
            batch_size=32,
            seed=seed,
            progress=False,
        )
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not np.all([torch.equal(v, torch.zeros_like(v)) for v in states[0].values()])
