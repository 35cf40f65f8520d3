"""What to explain: targets as small callables over the model output.

A :class:`Target` picks, for each sample, the ``K`` class indices to explain and returns their
scores. The score is the *logit* ``y_k`` (pre-softmax for softmax heads, pre-sigmoid for sigmoid
heads): gradients of the logit are not damped by the other classes' probabilities, and for a
multi-label sigmoid head the logit is the natural per-class score since
``σ(y_k)`` is monotone in ``y_k`` alone.

Example::

    >>> scores, indices = TopK(3)(logits)          # (B, 3), (B, 3)
    >>> scores, indices = ClassTargets([281, 5])(logits)   # one class per sample
    >>> scores, indices = ClassTargets(281)(logits)        # the same class for every sample
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["ClassTargets", "MultiLabel", "Predicted", "Target", "TopK", "as_target", "unwrap_logits"]


def unwrap_logits(output: Any) -> Tensor:
    """The ``(B, num_classes)`` logits of a model output.

    Accepts a tensor, an object with a ``.logits`` attribute (Hugging Face style) or a mapping
    with a ``"logits"`` key; this is the one place model outputs are unwrapped.
    """
    if isinstance(output, Tensor):
        logits = output
    elif isinstance(output, Mapping) and "logits" in output:
        logits = output["logits"]
    elif isinstance(getattr(output, "logits", None), Tensor):
        logits = output.logits
    else:
        raise TypeError(
            f"cannot read logits from a model output of type {type(output).__name__}: "
            "expected a Tensor, an object with .logits, or a mapping with a 'logits' key"
        )
    if logits.ndim != 2:
        raise ValueError(f"expected logits of shape (B, num_classes), got {tuple(logits.shape)}")
    return logits


class Target:
    """Base class: :meth:`select` picks class indices, :meth:`score` reads their scores.

    ``target(logits) -> (scores (B, K), indices (B, K) long)``. Subclasses override
    :meth:`select`; :meth:`score` gathers the logits, ``s_{bk} = y_{b, i_{bk}}``.
    """

    def select(self, logits: Tensor) -> Tensor:
        """``(B, K)`` long tensor of class indices to explain for each sample."""
        raise NotImplementedError

    def score(self, logits: Tensor, indices: Tensor) -> Tensor:
        """``(B, K)`` scores of ``indices`` in ``logits`` (differentiable)."""
        return logits.gather(1, indices)

    def valid(self, logits: Tensor, indices: Tensor) -> Tensor:
        """``(B, K)`` bool: which selected targets are real (all, except for padded multi-label)."""
        return torch.ones_like(indices, dtype=torch.bool)

    def __call__(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        # A fresh tensor: gather saves the indices for backward, and views of a tensor made under
        # inference_mode (e.g. ClassTargets built there) cannot be saved.
        indices = self.select(logits.detach()).clone()
        return self.score(logits, indices), indices


class ClassTargets(Target):
    """Explicit classes: an ``int`` for every sample, ``(B,)`` one per sample, or ``(B, K)``."""

    def __init__(self, indices: int | Sequence[int] | Sequence[Sequence[int]] | Tensor) -> None:
        tensor = torch.as_tensor(indices)
        if tensor.dtype.is_floating_point or tensor.dtype == torch.bool or tensor.ndim > 2:
            raise TypeError(f"class indices must be an int, (B,) or (B, K) integers, got {indices!r}")
        self.indices = tensor.long()

    def select(self, logits: Tensor) -> Tensor:
        batch, num_classes = logits.shape
        idx = self.indices.to(logits.device)
        if idx.ndim == 0:
            idx = idx.expand(batch)
        if idx.ndim == 1:
            idx = idx[:, None]
        if idx.shape[0] != batch:
            raise ValueError(f"{idx.shape[0]} target rows for a batch of {batch} images")
        if idx.numel() and (idx.min() < 0 or idx.max() >= num_classes):
            raise ValueError(f"class indices must lie in [0, {num_classes}), got {idx.tolist()}")
        return idx

    def __repr__(self) -> str:
        return f"ClassTargets({self.indices.tolist()})"


class TopK(Target):
    """The ``k`` highest-scoring classes of each sample, best first."""

    def __init__(self, k: int = 1) -> None:
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        self.k = k

    def select(self, logits: Tensor) -> Tensor:
        if self.k > logits.shape[1]:
            raise ValueError(f"top-{self.k} requested from {logits.shape[1]} classes")
        return logits.topk(self.k, dim=1).indices

    def __repr__(self) -> str:
        return f"TopK({self.k})"


class Predicted(TopK):
    """The predicted class (``TopK(1)``)."""

    def __init__(self) -> None:
        super().__init__(1)

    def __repr__(self) -> str:
        return "Predicted()"


class MultiLabel(Target):
    """Every class with ``σ(y_k) > threshold`` (sigmoid heads), best first.

    The batch shares one ``K`` = the largest number of positive classes in the batch (at least 1,
    at most ``max_k``); a sample with fewer positives is padded with its next-highest classes and
    :meth:`valid` marks those padded entries ``False``.
    """

    def __init__(self, threshold: float = 0.5, max_k: int | None = None) -> None:
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
        if max_k is not None and max_k < 1:
            raise ValueError(f"max_k must be positive, got {max_k}")
        self.threshold = threshold
        self.max_k = max_k

    def select(self, logits: Tensor) -> Tensor:
        positives = int((logits.sigmoid() > self.threshold).sum(dim=1).max())
        k = max(1, min(positives, self.max_k or logits.shape[1]))
        return logits.topk(k, dim=1).indices

    def valid(self, logits: Tensor, indices: Tensor) -> Tensor:
        return logits.detach().gather(1, indices).sigmoid() > self.threshold

    def __repr__(self) -> str:
        return f"MultiLabel(threshold={self.threshold}, max_k={self.max_k})"


def as_target(targets: Target | int | Sequence[int] | Tensor | None) -> Target:
    """Coerce ``None`` (→ :class:`Predicted`), indices (→ :class:`ClassTargets`) or a Target."""
    if targets is None:
        return Predicted()
    if isinstance(targets, Target):
        return targets
    if callable(targets):
        raise TypeError("targets must be a textcam.targets.Target (subclass Target and override select)")
    return ClassTargets(targets)
