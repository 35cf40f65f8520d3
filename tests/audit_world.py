"""A tiny, fully deterministic audit world for the flow tests (no network, seconds on a CPU).

* images: PNGs in a class-per-folder layout (``root/<class>/<i>.png``), each class with its own
  colour pattern, drawn from a seeded generator;
* classifier: a torchvision ResNet-18 with 3 classes and seeded random weights, saved as a
  self-describing ``.safetensors`` checkpoint at 64 px (so every process loads identical weights);
* CLIP: the ``textcam-tiny-clevr`` open_clip architecture with seeded random weights saved to a file
  (a file gives a content-hashed ``clip_id``, so banks and text embeddings are cacheable);
* a 24-phrase vocabulary file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

CLASSES = ("apple", "boat", "cloud")
PHRASES = (
    "red",
    "green",
    "blue",
    "yellow",
    "stripes",
    "dots",
    "grass",
    "sky",
    "water",
    "snow",
    "sand",
    "road",
    "text",
    "a watermark",
    "a frame",
    "wood",
    "metal",
    "fur",
    "leaves",
    "a person",
    "a car",
    "a dog",
    "indoors",
    "night",
)


def make_images(root: Path, n_per_class: int = 14, seed: int = 0, size: int = 48) -> Path:
    rng = np.random.default_rng(seed)
    base = {"apple": (200, 40, 40), "boat": (40, 60, 200), "cloud": (220, 220, 230)}
    for cname in CLASSES:
        (root / cname).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            arr = rng.normal(base[cname], 40, size=(size, size, 3))
            stripe = rng.integers(0, size - 8)
            arr[stripe : stripe + 6] = rng.integers(0, 255, size=3)
            Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(root / cname / f"{cname}-{i:03d}.png")
    return root


def make_classifier(path: Path, seed: int = 0) -> Path:
    import torchvision

    from textcam.models import save_checkpoint

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = torchvision.models.resnet18(num_classes=len(CLASSES))
    return save_checkpoint(
        net,
        path,
        arch="resnet18",
        class_names=list(CLASSES),
        target_layer="layer4",
        preprocess={"resize": 64, "crop": 64},
    )


def make_clip(path: Path, seed: int = 0) -> Path:
    import open_clip
    from safetensors.torch import save_file

    from textcam.clip import _ensure_config

    _ensure_config("textcam-tiny-clevr")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model("textcam-tiny-clevr", pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def make_world(root: Path, n_per_class: int = 14) -> dict[str, Any]:
    """Images, checkpoints and vocabulary under ``root``; returns an AuditConfig mapping."""
    root.mkdir(parents=True, exist_ok=True)
    data = make_images(root / "data", n_per_class)
    vocab = root / "phrases.txt"
    vocab.write_text("\n".join(PHRASES) + "\n")
    return {
        "data": str(data),
        "model": str(make_classifier(root / "classifier.safetensors")),
        "clip": "textcam-tiny-clevr",
        "clip_pretrained": str(make_clip(root / "clip.safetensors")),
        "vocab": [str(vocab)],
        "calibration": {"bank_m": 5},
        "shard_size": 10,
        "batch_size": 8,
        "loader_workers": 0,
        "workers": 1,
        "device": "cpu",
        "cache_dir": str(root / "cache"),
        "flags": {"n_permutations": 20, "min_images": 2},
    }
