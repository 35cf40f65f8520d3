"""``build_world``: generate the splits, train (or reuse) the tiny CLIP and the classifier, measure.

Cache layout (root = ``--cache-dir`` / ``$TEXTCAM_CACHE/world`` / ``~/.cache/textcam/world``)::

    <root>/clip-<clip_key>/        open_clip local dir (open_clip_config.json, open_clip_model.safetensors),
                                   metrics.json; train_state.pt while unfinished
    <root>/<world_key>/
        world.json                 config + paths + metrics (written last: its presence = complete)
        data/<split>/images/*.png  split ∈ train, probe, test
        data/<split>/manifest.parquet
        data/<split>/masks.npz     per-object visible masks, bit-packed (see :func:`load_masks`)
        classifier/model.safetensors (+ train_state.pt while unfinished)

The tiny CLIP does not depend on biases or split sizes, so every world with the same scene and CLIP
settings shares one. Masks are stored (not only re-derivable) so consumers need no generator code;
:func:`textcam.synthetic.scenes.generate` with the world's seed reproduces them bit for bit.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from textcam.io import atomic_path
from textcam.synthetic.bias import BiasSpec
from textcam.synthetic.cache import resolve_cache_dir, write_json
from textcam.synthetic.classifier import (
    bias_metrics,
    checkpoint_config,
    load_classifier,
    predict,
    save_classifier,
    train_classifier,
)
from textcam.synthetic.config import WorldConfig
from textcam.synthetic.scenes import PHRASES, SceneBatch, generate
from textcam.synthetic.tiny_clip import CHECKPOINT_NAME, TINY_CLIP_NAME, train_tiny_clip

log = logging.getLogger(__name__)

SPLITS = ("train", "probe", "test")


@dataclass(frozen=True)
class SplitPaths:
    """Where one split lives on disk."""

    images: Path
    manifest: Path
    masks: Path


@dataclass(frozen=True)
class World:
    """A built world: paths to everything, plus the measured metrics.

    ``clip_model_name`` is the open_clip config name; ``clip_open_clip_id`` (``"local-dir:<dir>"``)
    loads config and weights through ``open_clip.create_model_and_transforms`` with nothing else.
    """

    config: WorldConfig
    root: Path
    splits: dict[str, SplitPaths]
    clip_dir: Path
    clip_checkpoint: Path
    clip_model_name: str
    classifier_checkpoint: Path
    class_names: tuple[str, ...]
    biases: tuple[BiasSpec, ...]
    phrases: dict[str, dict[str, str]]
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def clip_open_clip_id(self) -> str:
        """Model id for open_clip's ``local-dir:`` schema."""
        return f"local-dir:{self.clip_dir}"

    @property
    def target_layer(self) -> str:
        """The classifier's CAM target layer."""
        return "layer4"

    def manifest(self, split: str) -> pd.DataFrame:
        """The split's manifest (absolute ``path`` column, one row per image)."""
        return pd.read_parquet(self._split(split).manifest)

    def masks(self, split: str) -> np.ndarray:
        """(N, K, S, S) bool visible masks of the split; slot 0 is the main (labelled) object."""
        return load_masks(self._split(split).masks)

    def _split(self, split: str) -> SplitPaths:
        if split not in self.splits:
            raise KeyError(f"unknown split {split!r}; splits are {sorted(self.splits)}")
        return self.splits[split]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (what ``world.json`` holds)."""
        return {
            "config": self.config.to_dict(),
            "root": str(self.root),
            "splits": {
                k: {f: str(getattr(v, f)) for f in ("images", "manifest", "masks")}
                for k, v in self.splits.items()
            },
            "clip_dir": str(self.clip_dir),
            "clip_checkpoint": str(self.clip_checkpoint),
            "clip_model_name": self.clip_model_name,
            "clip_open_clip_id": self.clip_open_clip_id,
            "classifier_checkpoint": str(self.classifier_checkpoint),
            "target_layer": self.target_layer,
            "class_names": list(self.class_names),
            "biases": [str(b) for b in self.biases],
            "phrases": self.phrases,
            "metrics": self.metrics,
        }


def load_masks(path: str | Path) -> np.ndarray:
    """Unpack a ``masks.npz`` written by :func:`write_split`."""
    with np.load(path) as z:
        shape = tuple(int(s) for s in z["shape"])
        return np.unpackbits(z["packed"], axis=-1, count=shape[-1]).astype(bool).reshape(shape)


def world_phrases(config: WorldConfig) -> dict[str, dict[str, str]]:
    """Attribute → value → phrase, restricted to the values this world draws."""
    return {a: {v: PHRASES[a][v] for v in vals} for a, vals in config.scene.values().items()}


# ----------------------------------------------------------------------------------------------
# data splits


def split_biases(config: WorldConfig, split: str) -> tuple[BiasSpec, ...]:
    """Biases are planted in the train split only."""
    return config.biases if split == "train" else ()


def split_batch(config: WorldConfig, split: str) -> SceneBatch:
    """Regenerate a split in memory (bit-identical to what is on disk)."""
    n = {"train": config.n_train, "probe": config.n_probe, "test": config.n_test}[split]
    return generate(config.scene, n, config.seed, split, split_biases(config, split))


def write_split(batch: SceneBatch, split: str, out: Path) -> SplitPaths:
    """Write PNGs, packed masks and the manifest (last, atomically: its presence marks completion)."""
    paths = SplitPaths(images=out / "images", manifest=out / "manifest.parquet", masks=out / "masks.npz")
    paths.images.mkdir(parents=True, exist_ok=True)
    df = batch.records.copy()
    names = [f"{i:06d}.png" for i in df["index"]]
    for name, img in zip(names, batch.images, strict=True):
        Image.fromarray(img).save(paths.images / name, compress_level=1)
    packed = np.packbits(batch.masks, axis=-1)
    with atomic_path(paths.masks) as tmp, open(tmp, "wb") as handle:  # a handle: savez adds no suffix
        np.savez(handle, packed=packed, shape=np.array(batch.masks.shape))
    df.insert(0, "image_id", [f"{split}-{i:06d}" for i in df["index"]])
    df.insert(1, "path", [str((paths.images / n).resolve()) for n in names])
    df.insert(2, "split", split)
    df = df.rename(columns={"index": "mask_index"})
    with atomic_path(paths.manifest) as tmp:
        df.to_parquet(tmp, index=False)
    return paths


def _ensure_split(config: WorldConfig, split: str, root: Path) -> SplitPaths:
    out = root / "data" / split
    paths = SplitPaths(images=out / "images", manifest=out / "manifest.parquet", masks=out / "masks.npz")
    if paths.manifest.is_file() and paths.masks.is_file():
        return paths
    log.info("generating %s split", split)
    return write_split(split_batch(config, split), split, out)


# ----------------------------------------------------------------------------------------------
# the entry point


def clip_dir_for(config: WorldConfig, cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory of the tiny CLIP a world uses (shared across bias configurations)."""
    return resolve_cache_dir(cache_dir) / f"clip-{config.clip_key()}"


def world_dir_for(config: WorldConfig, cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory of a world's data and classifier."""
    return resolve_cache_dir(cache_dir) / config.world_key()


def ensure_tiny_clip(
    config: WorldConfig, cache_dir: str | os.PathLike | None = None, progress: bool = True
) -> tuple[Path, dict[str, Any]]:
    """Train the world's tiny CLIP unless cached (resumes an unfinished run); returns (dir, metrics)."""
    d = clip_dir_for(config, cache_dir)
    if (d / "metrics.json").is_file() and (d / CHECKPOINT_NAME).is_file():
        return d, json.loads((d / "metrics.json").read_text())
    return d, train_tiny_clip(config.scene, config.clip, d, progress=progress)


def ensure_classifier(
    config: WorldConfig, cache_dir: str | os.PathLike | None = None, progress: bool = True
) -> tuple[Path, dict[str, Any]]:
    """Generate the splits and train + evaluate the classifier unless cached; returns (ckpt, metrics)."""
    root = world_dir_for(config, cache_dir)
    for split in SPLITS:
        _ensure_split(config, split, root)
    ckpt_dir = root / "classifier"
    ckpt = ckpt_dir / "model.safetensors"
    metrics_path = ckpt_dir / "metrics.json"
    if ckpt.is_file() and metrics_path.is_file():
        return ckpt, json.loads(metrics_path.read_text())
    scene, cc = config.scene, config.classifier
    train = split_batch(config, "train")
    model, seconds = train_classifier(
        train.images,
        train.records["label"].to_numpy(),
        len(scene.class_names),
        ckpt_dir,
        **cc.to_dict(),  # the classifier's training settings, one travelling object
        progress=progress,
    )
    save_classifier(
        model, ckpt, checkpoint_config(len(scene.class_names), scene.class_names, cc.width, scene.image_size)
    )
    metrics = evaluate_classifier(config, ckpt)
    metrics["train_seconds"] = round(seconds, 1)
    write_json(metrics_path, metrics)
    (ckpt_dir / "train_state.pt").unlink(missing_ok=True)
    return ckpt, metrics


def evaluate_classifier(config: WorldConfig, checkpoint: str | Path) -> dict[str, Any]:
    """Clean test accuracy, train accuracy and per-bias aligned/conflicting gaps (unbiased test split)."""
    model, _ = load_classifier(checkpoint)
    test, train = split_batch(config, "test"), split_batch(config, "train")
    pred = predict(model, test.images)
    labels = test.records["label"].to_numpy()
    return {
        "test_accuracy": float((pred == labels).mean()),
        "train_accuracy": float((predict(model, train.images) == train.records["label"].to_numpy()).mean()),
        "bias": bias_metrics(
            pred,
            test.records,
            config.scene.class_names,
            list(dict.fromkeys(config.biases + config.eval_biases)),
            config.scene.label_attribute,
        ),
    }


def build_world(
    config: WorldConfig, cache_dir: str | os.PathLike | None = None, progress: bool = True
) -> World:
    """Build (or load from cache) a whole world: splits, tiny CLIP, classifier, metrics.

    Every stage is cached under its own key and resumes per epoch, so a re-run after an
    interruption continues and a finished world returns at once.

    Example::

        world = build_world(WorldConfig.demo())
        world.metrics["clip"]["zero_shot"]["background"]      # ≥ 0.95
        world.metrics["classifier"]["bias"]["circle=background:water@0.99"]["gap"]
    """
    root = world_dir_for(config, cache_dir)
    t0 = time.perf_counter()
    clip_dir, clip_metrics = ensure_tiny_clip(config, cache_dir, progress)
    ckpt, clf_metrics = ensure_classifier(config, cache_dir, progress)
    splits = {
        s: SplitPaths(
            images=root / "data" / s / "images",
            manifest=root / "data" / s / "manifest.parquet",
            masks=root / "data" / s / "masks.npz",
        )
        for s in SPLITS
    }
    world = World(
        config=config,
        root=root,
        splits=splits,
        clip_dir=clip_dir,
        clip_checkpoint=clip_dir / CHECKPOINT_NAME,
        clip_model_name=TINY_CLIP_NAME,
        classifier_checkpoint=ckpt,
        class_names=tuple(config.scene.class_names),
        biases=config.biases,
        phrases=world_phrases(config),
        metrics={
            "clip": {k: clip_metrics[k] for k in ("zero_shot", "train_seconds")},
            "classifier": clf_metrics,
            "build_seconds": round(time.perf_counter() - t0, 1),
        },
    )
    write_json(root / "world.json", world.to_dict())
    return world
