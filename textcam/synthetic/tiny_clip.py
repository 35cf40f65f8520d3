"""A tiny CLIP for the synthetic world: a real open_clip model, trained here on generated pairs.

The architecture is the open_clip model config ``textcam/configs/textcam-tiny-clevr.json``
(ModifiedResNet image tower at 64 px, a one-layer text transformer, open_clip's bundled BPE
tokenizer). A trained model is saved as an open_clip *local directory*::

    <dir>/open_clip_config.json          {"model_cfg": ..., "preprocess_cfg": ...}
    <dir>/open_clip_model.safetensors    the state dict

so open_clip loads it through its normal path, with no registry changes::

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{dir}")

or, after :func:`register_tiny_clip_config`, like any named model::

    open_clip.create_model_and_transforms("textcam-tiny-clevr", pretrained=f"{dir}/{CHECKPOINT_NAME}")

Training is contrastive on freshly generated image–caption pairs (no dataset on disk, every step
sees new scenes). Captions drop attributes at random, so prompts naming one attribute
(``"a photo of a red object"``) are in distribution; the loss treats every caption that is
*compatible* with an image (all the attributes it names match) as a positive, because with dropped
attributes a batch holds many true pairs beyond the diagonal.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from textcam.io import atomic_path
from textcam.synthetic.cache import write_json
from textcam.synthetic.scenes import (
    SceneConfig,
    caption,
    generate,
    records_frame,
    render,
    sample_codes,
    split_code,
)
from textcam.synthetic.training import train_epochs

log = logging.getLogger(__name__)

TINY_CLIP_NAME = "textcam-tiny-clevr"
CHECKPOINT_NAME = "open_clip_model.safetensors"
CONFIG_NAME = "open_clip_config.json"
# open_clip's default (OpenAI) normalisation; the default preprocess of a 64-px model is then exact.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ZERO_SHOT_ATTRIBUTES = ("shape", "color", "size", "texture", "background", "watermark", "border")
_TEMPLATES = ("a photo of {}", "{}", "an image of {}")


@dataclass(frozen=True)
class ClipTrainConfig:
    """Tiny-CLIP training settings (they and the scene settings make the CLIP cache key)."""

    epochs: int = 15
    steps_per_epoch: int = 100
    batch_size: int = 128
    # 3e-3 learned colour, size, background and the artefacts but left shape at chance after 1,200
    # steps; 1e-3 (with the weights below) reaches shape 0.92 by step 1,000.
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 30
    eval_images: int = 1024
    single_attribute_prob: float = 0.7  # captions that name one attribute only
    keep_prob: float = 0.6  # otherwise each attribute is named with this probability
    # Which attribute a single-attribute caption names and a minimal pair differs in, relative weights in
    # ZERO_SHOT_ATTRIBUTES order. Large-area attributes (colour, size, background) are learned first and,
    # sampled uniformly, leave too little contrastive signal for shape and texture (shape stayed at chance).
    attribute_weights: tuple[float, ...] = (4.0, 1.0, 1.0, 3.0, 1.0, 1.0, 1.0)
    seed: int = 0
    model_overrides: tuple[tuple[str, Any], ...] = ()  # e.g. (("embed_dim", 64),)

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ClipTrainConfig:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        d["model_overrides"] = tuple(tuple(kv) for kv in d.get("model_overrides", ()))
        if "attribute_weights" in d:
            d["attribute_weights"] = tuple(float(w) for w in d["attribute_weights"])
        return cls(**d)

    def __post_init__(self) -> None:
        w = self.attribute_weights
        if len(w) != len(ZERO_SHOT_ATTRIBUTES) or min(w) < 0 or sum(w) <= 0:
            raise ValueError(
                f"attribute_weights needs {len(ZERO_SHOT_ATTRIBUTES)} non-negative weights "
                f"({', '.join(ZERO_SHOT_ATTRIBUTES)}), got {w}"
            )

    def attribute_probs(self) -> np.ndarray:
        """``attribute_weights`` normalised to probabilities."""
        w = np.asarray(self.attribute_weights, dtype=np.float64)
        return w / w.sum()


def tiny_clip_config_path() -> Path:
    """Path of the bundled open_clip model config JSON."""
    return Path(str(resources.files("textcam") / "configs" / f"{TINY_CLIP_NAME}.json"))


def tiny_clip_model_config(overrides: tuple[tuple[str, Any], ...] = ()) -> dict:
    """The open_clip ``model_cfg`` dict, with top-level or ``vision_cfg.x``/``text_cfg.x`` overrides."""
    cfg = json.loads(tiny_clip_config_path().read_text())
    for key, value in overrides:
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def register_tiny_clip_config() -> str:
    """Add the bundled config to open_clip's registry (a global, so only on request) and return its name."""
    import open_clip

    open_clip.add_model_config(tiny_clip_config_path())
    return TINY_CLIP_NAME


def _create(model_cfg: dict):
    import open_clip

    return open_clip.model.CLIP(**model_cfg)


def load_tiny_clip(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Callable, Callable]:
    """Load a trained tiny CLIP (its directory or the ``.safetensors`` inside) through open_clip.

    Returns ``(model, preprocess, tokenizer)`` with the model in eval mode.
    """
    import open_clip

    p = Path(path)
    d = p.parent if p.is_file() else p
    if not (d / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"no tiny CLIP at {path}: expected {d / CONFIG_NAME} and {d / CHECKPOINT_NAME}"
        )
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{d}", device=device)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{d}")
    model.eval()
    return model, preprocess, tokenizer


# ----------------------------------------------------------------------------------------------
# data


def to_clip_tensor(images: np.ndarray) -> Tensor:
    """uint8 N×H×W×3 → normalised float N×3×H×W, identical to open_clip's preprocess at 64 px."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _attr_codes(records: pd.DataFrame, scene: SceneConfig) -> np.ndarray:
    vals = scene.values()
    return np.stack(
        [pd.Categorical(records[a], categories=vals[a]).codes for a in ZERO_SHOT_ATTRIBUTES], axis=1
    ).astype(np.int64)


def _sample_keep(n: int, train: ClipTrainConfig, rng: np.random.Generator) -> np.ndarray:
    """(n, A) bool: which attributes each caption names (never none)."""
    a = len(ZERO_SHOT_ATTRIBUTES)
    keep = rng.random((n, a)) < train.keep_prob
    single = rng.random(n) < train.single_attribute_prob
    one = np.zeros((n, a), dtype=bool)
    one[np.arange(n), rng.choice(a, size=n, p=train.attribute_probs())] = True
    keep = np.where(single[:, None], one, keep)
    empty = ~keep.any(axis=1)
    keep[empty] = one[empty]
    return keep


def minimal_pair_codes(
    scene: SceneConfig, n: int, rng: np.random.Generator, attribute_probs: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Codes for ``n`` scenes in ``n // 2`` minimal pairs: each pair differs in one attribute only.

    Without such pairs a batch is told apart by its easy, large-area attributes (colour, size,
    background) and the contrastive gradient for shape, texture or the watermark starves; a pair
    whose captions differ in one word forces every attribute to be encoded. ``attribute_probs`` (in
    :data:`ZERO_SHOT_ATTRIBUTES` order; uniform if None) sets how often each attribute is the one changed.
    """
    half = n // 2
    base = sample_codes(scene, half, rng)
    twin = {k: v.copy() for k, v in base.items()}
    vals = scene.values()
    which = rng.choice(len(ZERO_SHOT_ATTRIBUTES), size=half, p=attribute_probs)
    for a_idx, attr in enumerate(ZERO_SHOT_ATTRIBUTES):
        sel = which == a_idx
        k = len(vals[attr])
        twin[attr][sel] = (base[attr][sel] + rng.integers(1, k, int(sel.sum()))) % k
    # a size flip needs a radius (and a centre margin) from the other size range
    flip = twin["size"] != base["size"]
    lo = np.where(twin["size"] == 1, scene.large_radius[0], scene.small_radius[0])
    hi = np.where(twin["size"] == 1, scene.large_radius[1], scene.small_radius[1])
    twin["radius"] = np.where(flip, lo + (hi - lo) * rng.random(half), base["radius"])
    margin = twin["radius"] * 1.3 + 3.0
    for c in ("cx", "cy"):
        twin[c] = np.clip(twin[c], margin, scene.image_size - margin)
    codes = {k: np.concatenate([base[k], twin[k]]) for k in base}
    codes["changed"] = np.concatenate([which, which])
    return codes


def training_pairs(
    scene: SceneConfig, train: ClipTrainConfig, step: int, seed: int
) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    """Images, captions, attribute codes and keep masks for one training step (deterministic)."""
    n = train.batch_size
    rng = np.random.default_rng(np.random.SeedSequence([seed, split_code("clip"), step]))
    codes = minimal_pair_codes(scene, n, rng, train.attribute_probs())
    images, _ = render(codes, scene, rng)
    records = records_frame(codes, scene)
    keep = _sample_keep(len(records), train, rng)
    keep[np.arange(len(records)), codes["changed"]] = True  # a pair's captions name what tells it apart
    templates = rng.integers(0, len(_TEMPLATES), len(records))
    rows = records.to_dict("records")
    caps = [
        caption(
            r,
            dict(zip(ZERO_SHOT_ATTRIBUTES, k.tolist(), strict=True)) | {"distractors": False},
            template=_TEMPLATES[t],
        )
        for r, k, t in zip(rows, keep, templates, strict=True)
    ]
    return images, caps, _attr_codes(records, scene), keep


def compatibility(codes: np.ndarray, keep: np.ndarray) -> Tensor:
    """(N, N) bool: caption j (naming ``keep[j]`` attributes) is true of image i."""
    same = codes[:, None, :] == codes[None, :, :]  # [i, j, a]
    return torch.from_numpy((same | ~keep[None, :, :]).all(axis=2))


def soft_clip_loss(img: Tensor, txt: Tensor, scale: Tensor, compat: Tensor) -> Tensor:
    """Symmetric InfoNCE with every compatible pair as a positive (uniform target over them)."""
    logits = scale * img @ txt.T
    t_img = compat.float() / compat.sum(1, keepdim=True)
    t_txt = compat.T.float() / compat.T.sum(1, keepdim=True)
    loss_i = -(t_img * F.log_softmax(logits, dim=1)).sum(1).mean()
    loss_t = -(t_txt * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    return (loss_i + loss_t) / 2


# ----------------------------------------------------------------------------------------------
# zero-shot evaluation


def zero_shot_prompts(scene: SceneConfig) -> dict[str, dict[str, str]]:
    """Attribute → value → the single-attribute prompt used for zero-shot classification."""
    base = {
        "shape": "object",
        "color": "",
        "size": "",
        "texture": "",
        "background": "",
        "watermark": "no",
        "border": "no",
    }
    out: dict[str, dict[str, str]] = {}
    for attr in ZERO_SHOT_ATTRIBUTES:
        keep = {a: a == attr for a in ZERO_SHOT_ATTRIBUTES}
        out[attr] = {v: caption(base | {attr: v}, keep) for v in scene.values()[attr]}
    return out


@torch.no_grad()
def zero_shot_accuracy(
    model: nn.Module,
    tokenizer: Callable,
    scene: SceneConfig,
    images: np.ndarray,
    records: pd.DataFrame,
    batch_size: int = 256,
) -> dict[str, float]:
    """Accuracy of argmax-over-prompts, per attribute, on the given images."""
    model.eval()
    feats = torch.cat(
        [
            F.normalize(model.encode_image(to_clip_tensor(images[i : i + batch_size])), dim=-1)
            for i in range(0, len(images), batch_size)
        ]
    )
    out = {}
    for attr, prompts in zero_shot_prompts(scene).items():
        values = list(prompts)
        txt = F.normalize(model.encode_text(tokenizer(list(prompts.values()))), dim=-1)
        pred = (feats @ txt.T).argmax(1).numpy()
        truth = pd.Categorical(records[attr], categories=values).codes
        out[attr] = float((pred == truth).mean())
    return out


# ----------------------------------------------------------------------------------------------
# training


def _lr_at(step: int, total: int, train: ClipTrainConfig) -> float:
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    progress = (step - train.warmup_steps) / max(1, total - train.warmup_steps)
    return float(train.lr * 0.5 * (1 + np.cos(np.pi * progress)))


def _optimizer(model: nn.Module, train: ClipTrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms and embeddings."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embedding" in n]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=train.lr,
    )


def train_tiny_clip(
    scene: SceneConfig, train: ClipTrainConfig, out_dir: str | Path, progress: bool = True
) -> dict[str, Any]:
    """Train (or resume, or just return) the tiny CLIP in ``out_dir``; returns its metrics.

    A finished directory holds the open_clip files and ``metrics.json`` and is returned as is;
    an unfinished one resumes from ``train_state.pt`` (saved after every epoch).
    """
    import open_clip

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "metrics.json").is_file() and (out / CHECKPOINT_NAME).is_file():
        return json.loads((out / "metrics.json").read_text())

    model_cfg = tiny_clip_model_config(train.model_overrides)
    model_cfg["vision_cfg"]["image_size"] = scene.image_size
    torch.manual_seed(train.seed)
    model = _create(model_cfg)
    opt = _optimizer(model, train)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model_cfg["text_cfg"]["context_length"])

    total = train.epochs * train.steps_per_epoch

    def loss_at(epoch: int, i: int) -> torch.Tensor:
        step = epoch * train.steps_per_epoch + i
        images, caps, codes, keep = training_pairs(scene, train, step, train.seed)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, total, train)
        img = F.normalize(model.encode_image(to_clip_tensor(images)), dim=-1)
        txt = F.normalize(model.encode_text(tokenizer(caps)), dim=-1)
        return soft_clip_loss(img, txt, model.logit_scale.exp().clamp(max=100), compatibility(codes, keep))

    state_path = out / "train_state.pt"
    elapsed = train_epochs(
        model,
        opt,
        loss_at,
        epochs=train.epochs,
        steps_per_epoch=train.steps_per_epoch,
        state_path=state_path,
        name="tiny CLIP",
        progress=progress,
    )

    eval_batch = generate(scene, train.eval_images, train.seed, "clip-eval")
    zs = zero_shot_accuracy(model, tokenizer, scene, eval_batch.images, eval_batch.records)
    _save_open_clip_dir(model, model_cfg, scene, out)
    metrics = {
        "zero_shot": zs,
        "train_seconds": round(elapsed, 1),
        "model_name": TINY_CLIP_NAME,
        "model_cfg": model_cfg,
        "eval_images": train.eval_images,
    }
    write_json(out / "metrics.json", metrics)
    state_path.unlink(missing_ok=True)
    return metrics


def _save_open_clip_dir(model: nn.Module, model_cfg: dict, scene: SceneConfig, out: Path) -> None:
    """Write the open_clip local-dir pair (config + safetensors)."""
    preprocess_cfg = {
        "size": scene.image_size,
        "mean": list(CLIP_MEAN),
        "std": list(CLIP_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out / CHECKPOINT_NAME) as tmp:
        save_file(
            state,
            str(tmp),
            metadata={"textcam_arch": TINY_CLIP_NAME, "open_clip_model_cfg": json.dumps(model_cfg)},
        )
    write_json(out / CONFIG_NAME, {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg})
