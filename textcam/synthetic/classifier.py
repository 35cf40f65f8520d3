"""The classifier to audit: a small CNN trained on the world's labelled task.

Architecture (64-px input, ``w = width``)::

    layer1  conv3×3 s2  3 → w      + BN + ReLU     32×32
    layer2  conv3×3 s2  w → 2w     + BN + ReLU     16×16
    layer3  conv3×3 s2  2w → 4w    + BN + ReLU      8×8
    layer4  conv3×3 s1  4w → 4w    + BN + ReLU      8×8   ← target layer for CAMs
    pool    global average
    fc      4w → num_classes

Checkpoints are safetensors whose header describes the model twice over:

* ``textcam.format`` / ``textcam.arch = "clevr-cnn"`` / ``textcam.config`` (JSON: num_classes,
  class_names, target_layer, ``preprocess`` {resize, crop, interpolation, mean, std},
  ``model_kwargs`` {width}): the layout ``textcam.models.save_checkpoint`` writes, so
  ``textcam.models.load_model(path)`` rebuilds it through :func:`build_classifier`;
* ``textcam_arch`` / ``textcam_config`` (flat: num_classes, class_names, width, target_layer,
  input_size, mean, std): the self-contained form :func:`load_classifier` reads.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from textcam.io import atomic_path
from textcam.synthetic.bias import BiasSpec
from textcam.synthetic.training import train_epochs

log = logging.getLogger(__name__)

ARCH = "clevr-cnn"
TARGET_LAYER = "layer4"
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class ClevrCNN(nn.Module):
    """Four conv blocks → global average pool → linear head; ``layer4`` is the CAM target layer."""

    def __init__(self, num_classes: int, width: int = 32) -> None:
        super().__init__()
        self.layer1 = _block(3, width, 2)
        self.layer2 = _block(width, 2 * width, 2)
        self.layer3 = _block(2 * width, 4 * width, 2)
        self.layer4 = _block(4 * width, 4 * width, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, num_classes) for normalised images (B, 3, H, W)."""
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def build_classifier(num_classes: int, width: int = 32, **config: Any) -> nn.Module:
    """Factory used by the model registry (``"textcam.synthetic.classifier:build_classifier"``).

    Extra ``config`` keys (class_names, target_layer, input_size, mean, std) describe the checkpoint
    and are accepted and ignored here.
    """
    if num_classes < 2:
        raise ValueError("num_classes must be >= 2")
    return ClevrCNN(num_classes=num_classes, width=width)


def to_classifier_tensor(images: np.ndarray) -> Tensor:
    """uint8 N×H×W×3 → float N×3×H×W normalised with the world's mean/std."""
    if not images.flags.writeable:  # e.g. a memory-mapped split; torch refuses to share read-only memory
        images = images.copy()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def checkpoint_config(num_classes: int, class_names: Sequence[str], width: int, input_size: int) -> dict:
    """The ``textcam_config`` stored in a checkpoint's safetensors metadata."""
    return {
        "num_classes": num_classes,
        "class_names": list(class_names),
        "width": width,
        "target_layer": TARGET_LAYER,
        "input_size": input_size,
        "mean": list(MEAN),
        "std": list(STD),
    }


def save_classifier(model: nn.Module, path: str | Path, config: dict) -> None:
    """Write the state dict as safetensors with both metadata layouts (see the module docstring)."""
    p = Path(path)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    size = int(config["input_size"])
    registry_config = {
        "num_classes": config["num_classes"],
        "class_names": config["class_names"],
        "target_layer": config["target_layer"],
        "model_kwargs": {"width": config["width"]},
        "preprocess": {
            "resize": size,
            "crop": size,
            "interpolation": "bilinear",
            "mean": config["mean"],
            "std": config["std"],
        },
    }
    metadata = {
        "textcam.format": "textcam-checkpoint/1",
        "textcam.arch": ARCH,
        "textcam.config": json.dumps(registry_config, sort_keys=True),
        "textcam_arch": ARCH,
        "textcam_config": json.dumps(config, sort_keys=True),
    }
    with atomic_path(p) as tmp:
        save_file(state, str(tmp), metadata=metadata)


def load_classifier(path: str | Path) -> tuple[nn.Module, dict]:
    """Load a checkpoint written by :func:`save_classifier`; returns (model in eval mode, config)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("textcam_arch") != ARCH:
        raise ValueError(f"{path} is not a {ARCH} checkpoint (textcam_arch={meta.get('textcam_arch')!r})")
    config = json.loads(meta["textcam_config"])
    model = build_classifier(**config)
    model.load_state_dict(load_file(str(path)))
    return model.eval(), config


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Predicted class index per image."""
    model.eval()
    return torch.cat(
        [
            model(to_classifier_tensor(images[i : i + batch_size])).argmax(1)
            for i in range(0, len(images), batch_size)
        ]
    ).numpy()


def bias_metrics(
    pred: np.ndarray,
    records: pd.DataFrame,
    class_names: Sequence[str],
    biases: Sequence[BiasSpec],
    label_attribute: str = "shape",
) -> dict[str, dict[str, float]]:
    """Per bias: accuracy on the biased class with the cue (aligned) and without (conflicting).

    ``gap = acc_aligned - acc_conflicting``; ``cue_false_positive`` is how often images of *other*
    classes that show the cue are predicted as the biased class (vs. ``base_false_positive`` without
    the cue), the same shortcut seen from the other side.
    """
    out: dict[str, dict[str, float]] = {}
    labels = records["label"].to_numpy()
    for b in biases:
        c = list(class_names).index(b.label)
        cue = (records[b.attribute] == b.value).to_numpy()
        mine = labels == c
        ok = pred == labels

        def rate(mask: np.ndarray, values: np.ndarray) -> float:
            return float(values[mask].mean()) if mask.any() else float("nan")

        aligned, conflicting = rate(mine & cue, ok), rate(mine & ~cue, ok)
        out[str(b)] = {
            "acc_aligned": aligned,
            "acc_conflicting": conflicting,
            "gap": aligned - conflicting,
            "cue_false_positive": rate(~mine & cue, pred == c),
            "base_false_positive": rate(~mine & ~cue, pred == c),
            "n_aligned": int((mine & cue).sum()),
            "n_conflicting": int((mine & ~cue).sum()),
        }
    return out


def train_classifier(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    num_classes: int,
    out_dir: str | Path,
    *,
    width: int = 32,
    epochs: int = 6,
    batch_size: int = 128,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    progress: bool = True,
) -> tuple[nn.Module, float]:
    """Train (or resume) the CNN; checkpoints ``train_state.pt`` in ``out_dir`` after each epoch.

    Returns the trained model (eval mode) and the seconds spent training (summed over resumes).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = build_classifier(num_classes, width)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = -(-len(train_images) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.15
    )
    x_all = to_classifier_tensor(train_images)
    y_all = torch.as_tensor(np.array(train_labels, dtype=np.int64))

    @functools.lru_cache(maxsize=1)
    def order(epoch: int) -> torch.Tensor:  # the epoch's shuffle, from its own seed
        return torch.randperm(len(x_all), generator=torch.Generator().manual_seed(seed * 1000 + epoch))

    def loss_at(epoch: int, i: int) -> torch.Tensor:
        idx = order(epoch)[i * batch_size : (i + 1) * batch_size]
        return F.cross_entropy(model(x_all[idx]), y_all[idx])

    elapsed = train_epochs(
        model,
        opt,
        loss_at,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        state_path=out / "train_state.pt",
        name="classifier",
        scheduler=sched,
        progress=progress,
    )
    return model.eval(), elapsed
