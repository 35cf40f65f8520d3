"""The channel bank: one direction in CLIP space for every channel of a target layer.

Calibration streams a probe set once through the classifier and CLIP, keeping only per-image GAP
vectors (N × C) and CLIP embeddings (N × D), never activation maps. For channel j the M probe images
with the highest GAP score are positives and the M with the lowest are negatives; the channel's
direction is the shrinkage-LDA discriminant between their CLIP embeddings,

    t_j ∝ Σ_j⁻¹ (μ⁺_j − μ⁻_j),   Σ_j = ½ Σ_k [(1 − s)·C_jk + s·(tr C_jk / D)·I],

with C_jk the empirical covariance of class k, exactly as scikit-learn's
``LinearDiscriminantAnalysis(solver="lsqr", shrinkage=s)``. All channels are solved at once: the
Woodbury identity turns each D × D solve into a 2M × 2M one, batched over channels.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from textcam import __version__
from textcam.data import iter_batches
from textcam.device import model_device
from textcam.io import atomic_path
from textcam.layers import TokenGrid, forward_hook, get_layer

if TYPE_CHECKING:
    from collections.abc import Iterator

    from textcam.clip import ClipEncoder
    from textcam.models import LoadedModel


class BankMismatchError(ValueError):
    """A channel bank was loaded for a different classifier, layer or CLIP model."""


class BankCorruptError(ValueError):
    """A channel bank file is unreadable or fails its checksum."""


@dataclass(frozen=True)
class BankMeta:
    model_id: str
    layer: str
    clip_id: str
    m: int
    shrinkage: float
    n_probe: int
    probe_hash: str
    n_channels: int
    embed_dim: int
    versions: dict[str, str] = field(default_factory=dict)


def _versions() -> dict[str, str]:
    return {"textcam": __version__, "torch": torch.__version__, "python": platform.python_version()}


def probe_hash(paths: Sequence[str | os.PathLike[str]]) -> str:
    """Identity of a probe set: hash of its (sorted) paths."""
    h = hashlib.sha256()
    for p in sorted(str(p) for p in paths):
        h.update(p.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()[:16]


@contextmanager
def capture_gap(
    module: torch.nn.Module, layer: str, token_grid: TokenGrid | None, input_hw: tuple[int, int]
) -> Iterator[list[torch.Tensor]]:
    """Collect the global-average-pooled output of ``layer`` for each forward call (B, C)."""
    out: list[torch.Tensor] = []

    def hook(_mod: torch.nn.Module, _inp: object, output: torch.Tensor) -> None:
        act = token_grid.to_map(output, input_hw) if token_grid is not None else output
        if act.dim() != 4:
            raise ValueError(f"layer {layer!r} gives a {tuple(act.shape)} output; expected B×C×h×w")
        out.append(act.float().mean(dim=(2, 3)))

    with forward_hook(get_layer(module, layer), hook):
        yield out


#: Up to this many probe images, the LDA works from the probe set's Gram matrix (≤ 128 MB in float64).
GRAM_MAX_ROWS = 4096


def lda_directions(
    embeddings: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    shrinkage: float,
    *,
    chunk_size: int = 256,
) -> torch.Tensor:
    """Shrinkage-LDA directions for many two-class problems at once.

    Args:
        embeddings: (N, D) features (CLIP embeddings of the probe set).
        positives, negatives: (C, M) row indices into ``embeddings`` for each problem.
        shrinkage: s in (0, 1]; scikit-learn's float ``shrinkage`` (each class covariance shrunk
            towards the scaled identity (tr C / D)·I).

    Returns:
        (C, D) unit-norm directions oriented so positives score higher; rows are zero where the two
        sets have identical means (e.g. a dead channel).

    With X the 2M selected embeddings of a channel, Z = P·X its class-centred rows (P centres
    each class block) and w_δ = (1/M, …, −1/M, …) so that δ = μ⁺ − μ⁻ = Xᵀw_δ, Woodbury gives

        Σ⁻¹δ ∝ δ − Zᵀ(ZZᵀ/λ + I/c)⁻¹ Zδ/λ = Xᵀ(w_δ − P·y),   y = (PKP/λ + I/c)⁻¹ P·K·w_δ/λ,

    with K = XXᵀ. Only 2M × 2M matrices and one Xᵀw per channel remain. For a probe set of at
    most :data:`GRAM_MAX_ROWS` images every K is read from the probe set's Gram matrix and Xᵀw is
    one (C × N) @ (N × D) product, so no (C, 2M, D) stack is ever built; larger probe sets gather
    each chunk's X instead.
    """
    if not 0.0 < shrinkage <= 1.0:
        raise ValueError(f"shrinkage must be in (0, 1], got {shrinkage}")
    if positives.shape != negatives.shape or positives.dim() != 2:
        raise ValueError("positives and negatives must both be (C, M) index tensors")
    emb = embeddings.double()
    n, d = emb.shape
    m = positives.shape[1]
    n2 = 2 * m
    gram = emb @ emb.T if n <= GRAM_MAX_ROWS else None
    w_delta = torch.cat([emb.new_full((m,), 1.0 / m), emb.new_full((m,), -1.0 / m)])
    out = []
    # The (c, 2M, 2M) arrays dominate the cost, so they are updated in place rather than copied.
    for start in range(0, positives.shape[0], chunk_size):
        idx = torch.cat([positives[start : start + chunk_size], negatives[start : start + chunk_size]], 1)
        c = idx.shape[0]
        k, back = _chunk_products(emb, gram, idx)
        w = w_delta.expand(c, 1, n2)
        if shrinkage < 1.0:
            w = torch.cat([w, _shrunk_weights(k, w_delta, m, d, shrinkage)], dim=1)
        both = back(w)  # δ and, with shrinkage < 1, Σ⁻¹δ up to the factor 1/λ
        # Identical class means (e.g. the same images on both sides) give exactly zero δ.
        dead = (both[:, 0] == 0).all(dim=1, keepdim=True)
        direction = both[:, -1].masked_fill(dead, 0.0)
        out.append(torch.nn.functional.normalize(direction, dim=1).float())
    return torch.cat(out)


def _probe_pass(
    model: LoadedModel,
    clip: ClipEncoder,
    layer: str,
    batches: Any,
    total: int,
    device: str | torch.device,
    progress: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass over the probe images: each channel's pooled activation (N, C), the CLIP embedding (N, D),
    the predicted class and the index of every readable image."""
    from tqdm.auto import tqdm

    dev = model_device(model.module, device)
    gaps, embs, preds, kept = [], [], [], []
    failures: list[tuple[int, str]] = []
    bar = tqdm(total=total, desc="calibrate", unit="img", disable=not progress)
    with capture_gap(model.module, layer, model.token_grid, model.input_size) as captured:
        for batch in batches:
            failures.extend(batch.failed)
            if batch.indices.numel():
                x_cls, x_clip = batch.tensors
                preds.append(model.module(x_cls.to(dev)).argmax(dim=1).cpu())
                kept.append(batch.indices.cpu())
                gaps.append(captured.pop().cpu())
                embs.append(clip.encode_images(x_clip).cpu())
            bar.update(batch.indices.numel() + len(batch.failed))
    bar.close()
    if not gaps:
        raise ValueError(f"no probe image could be read ({len(failures)} failures)")
    return torch.cat(gaps), torch.cat(embs), torch.cat(preds), torch.cat(kept)


def _chunk_products(
    emb: torch.Tensor, gram: torch.Tensor | None, idx: torch.Tensor
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """For a chunk's (c, 2M) probe rows: the Gram blocks K = XXᵀ (c, 2M, 2M), and w ↦ Xᵀw for (c, r, 2M)
    weights; from the probe set's Gram matrix when there is one (no (c, 2M, D) stack)."""
    c, (n, d) = idx.shape[0], emb.shape
    if gram is None:
        x = emb[idx]  # (c, 2M, D)
        return torch.bmm(x, x.transpose(1, 2)), lambda w: torch.bmm(w, x)

    def back(w: torch.Tensor) -> torch.Tensor:
        # Xᵀw: spread the weights over the probe rows, then one product.
        dense = emb.new_zeros(c, w.shape[1], n).scatter_add_(2, idx[:, None].expand_as(w), w)
        return (dense.view(-1, n) @ emb).view(c, w.shape[1], d)

    return gram[idx[:, :, None], idx[:, None, :]], back


def _shrunk_weights(k: torch.Tensor, w_delta: torch.Tensor, m: int, d: int, shrinkage: float) -> torch.Tensor:
    """(c, 1, 2M) weights w_δ − P·y with Xᵀ(w_δ − P·y) ∝ Σ⁻¹δ (see :func:`lda_directions`); ``k`` (the
    Gram blocks K) is overwritten with PKP/λ + I/c on the way."""
    c, n2 = k.shape[0], 2 * m
    v = _centre_blocks(k @ w_delta, m)  # P·K·w_δ = Zδ
    blocks = k.view(c, 2, m, 2, m)
    row_mean = blocks.mean(dim=2, keepdim=True)
    col_mean = blocks.mean(dim=4, keepdim=True)
    blocks.sub_(row_mean).sub_(col_mean).add_(row_mean.mean(dim=4, keepdim=True))  # k ← PKP = ZZᵀ
    # λ = s·tr(ZᵀZ)/(2M·D), as each class covariance is shrunk towards (tr C/D)·I (weights ½).
    lam = (shrinkage * k.diagonal(dim1=1, dim2=2).sum(-1) / (n2 * d)).clamp_min(1e-30)
    inner = k.div_(lam[:, None, None])
    inner.diagonal(dim1=1, dim2=2).add_(n2 / (1.0 - shrinkage))
    y = torch.cholesky_solve((v / lam[:, None])[..., None], torch.linalg.cholesky(inner))
    return w_delta.expand(c, 1, n2) - _centre_blocks(y[..., 0], m)[:, None]


def _centre_blocks(v: torch.Tensor, m: int) -> torch.Tensor:
    """P·v for (c, 2M) vectors: subtract each class block's mean."""
    blocks = v.view(v.shape[0], 2, m)
    return (blocks - blocks.mean(dim=2, keepdim=True)).view_as(v)


def top_bottom(gap: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) GAP scores → (C, M) indices of the M highest and the M lowest images per channel."""
    if gap.shape[0] < 2 * m:
        raise ValueError(
            f"the probe set has {gap.shape[0]} images; need at least 2*M = {2 * m}: use a smaller M "
            f"(at most {gap.shape[0] // 2}; `--bank-m`, config key calibration.bank_m) or more probe images "
            "(`--probe`, `--probe-size`)"
        )
    top = gap.topk(m, dim=0).indices.T.contiguous()
    bottom = gap.topk(m, dim=0, largest=False).indices.T.contiguous()
    return top, bottom


@dataclass(frozen=True)
class ProbeSet:
    """What calibration saw of each probe image, beyond the GAP scores it fits directions with: the
    CLIP image embedding and the classifier's prediction. Kept because it is free (both are computed
    anyway) and lets an audit ask whether a phrase is *visible* in the images a class is predicted for
    (:mod:`tasks.cooccurrence`), not only whether the class's explanations use it.
    """

    embeddings: torch.Tensor  # (N, D) CLIP image embeddings, as the encoder returned them
    predictions: torch.Tensor  # (N,) int64 predicted class index
    probe_hash: str
    clip_id: str
    # (N,) int64 position of each image in the probe paths (unreadable ones are skipped); None: 0..N-1
    indices: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.embeddings.ndim != 2 or self.predictions.shape != (self.embeddings.shape[0],):
            raise ValueError(
                f"probe embeddings {tuple(self.embeddings.shape)} and predictions "
                f"{tuple(self.predictions.shape)} do not describe the same images"
            )
        if self.indices is None:
            object.__setattr__(self, "indices", torch.arange(self.predictions.shape[0]))
        elif self.indices.shape != self.predictions.shape:
            raise ValueError("probe indices and predictions do not describe the same images")

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``path`` (safetensors), atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            "embeddings": self.embeddings.detach().cpu().float().contiguous(),
            "predictions": self.predictions.detach().cpu().long().contiguous(),
            "indices": self.indices.detach().cpu().long().contiguous(),  # type: ignore[union-attr]
        }
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata={"probe_hash": self.probe_hash, "clip_id": self.clip_id})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ProbeSet:
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(path, framework="pt") as f:
                header = f.metadata() or {}
            tensors = load_file(path)
            return cls(
                tensors["embeddings"],
                tensors["predictions"],
                header["probe_hash"],
                header["clip_id"],
                tensors.get("indices"),
            )
        except (SafetensorError, KeyError, OSError) as exc:
            raise BankCorruptError(f"probe file {path} is unreadable: {exc}") from None


@dataclass
class ChannelBank:
    """(C, D) channel directions in CLIP space plus the identity of what produced them.

    ``probe`` is set by :meth:`calibrate` (not stored in the bank file; :meth:`ProbeSet.save`).
    """

    directions: torch.Tensor
    meta: BankMeta
    probe: ProbeSet | None = field(default=None, repr=False, compare=False)

    @property
    def bank_id(self) -> str:
        h = hashlib.sha256(json.dumps(asdict(self.meta), sort_keys=True).encode())
        h.update(self.directions.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    @property
    def model_id(self) -> str:
        return self.meta.model_id

    @property
    def layer(self) -> str:
        return self.meta.layer

    @property
    def clip_id(self) -> str:
        return self.meta.clip_id

    @classmethod
    @torch.no_grad()
    def calibrate(
        cls,
        model: LoadedModel,
        clip: ClipEncoder,
        probe_paths: Sequence[str | os.PathLike[str]],
        *,
        layer: str | None = None,
        m: int = 50,
        shrinkage: float = 0.5,
        batch_size: int = 32,
        num_workers: int = 0,
        device: str | torch.device = "auto",
        progress: bool = True,
    ) -> ChannelBank:
        """Stream ``probe_paths`` once through classifier and CLIP and fit every channel's direction.

        The returned bank's ``probe`` holds the probe images' CLIP embeddings and predicted classes.
        """
        if m < 2:
            raise ValueError(f"m must be >= 2, got {m}")
        layer = layer or model.target_layer
        batches = iter_batches(
            probe_paths, [model.preprocess, clip.preprocess], batch_size=batch_size, num_workers=num_workers
        )
        gap, emb, pred, kept = _probe_pass(model, clip, layer, batches, len(probe_paths), device, progress)
        pos, neg = top_bottom(gap, m)
        directions = lda_directions(emb, pos, neg, shrinkage)
        meta = BankMeta(
            model_id=model.model_id,
            layer=layer,
            clip_id=clip.clip_id,
            m=m,
            shrinkage=shrinkage,
            n_probe=int(gap.shape[0]),
            probe_hash=probe_hash(probe_paths),
            n_channels=int(directions.shape[0]),
            embed_dim=int(directions.shape[1]),
            versions=_versions(),
        )
        probe = ProbeSet(emb, pred, meta.probe_hash, clip.clip_id, kept)
        return cls(directions, meta, probe)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``path`` (safetensors; metadata and a checksum in its header), atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"directions": self.directions.detach().cpu().float().contiguous()}
        meta = {"meta": json.dumps(asdict(self.meta)), "sha256": _digest(tensors["directions"])}
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata=meta)
        path.with_suffix(".json").write_text(
            json.dumps(asdict(self.meta) | {"bank_id": self.bank_id}, indent=2)
        )
        return path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        model_id: str | None = None,
        layer: str | None = None,
        clip_id: str | None = None,
    ) -> ChannelBank:
        """Read a bank; raise :class:`BankMismatchError` if it was made for another model/layer/CLIP."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"channel bank not found: {path}")
        try:
            with safe_open(path, framework="pt") as f:
                header = f.metadata() or {}
            tensors = load_file(path)
            meta = BankMeta(**json.loads(header["meta"]))
            directions = tensors["directions"]
        except (SafetensorError, KeyError, TypeError, json.JSONDecodeError, OSError) as exc:
            raise BankCorruptError(f"channel bank {path} is unreadable: {exc}") from None
        if _digest(directions) != header.get("sha256"):
            raise BankCorruptError(f"channel bank {path} fails its checksum (file corrupted?)")
        for what, want, have in (
            ("classifier", model_id, meta.model_id),
            ("layer", layer, meta.layer),
            ("CLIP model", clip_id, meta.clip_id),
        ):
            if want is not None and want != have:
                raise BankMismatchError(
                    f"channel bank {path.name} was calibrated for {what} {have!r}, not {want!r}; "
                    "recalibrate with `textcam calibrate`"
                )
        return cls(directions, meta)


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()
