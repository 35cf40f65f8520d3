"""Faithfulness of saliency maps and channel groups: deletion/insertion curves and channel ablation.

Deletion and insertion (Petsiuk et al., RISE, 2018). A map ranks the pixels of an image, most
salient first. For step k of n the top ``round(k/n · HW)`` pixels are

* **deletion**: replaced by a baseline image (the score should fall fast: lower AUC is better);
* **insertion**: copied from the image into the baseline (the score should rise fast: higher AUC is better),

and the target's score is measured after each step. The AUC is the trapezoid area under the
curve over the removed/inserted fraction in [0, 1], so a curve that stays at 1 has AUC 1.

Ties in a map (the zero region of a ReLU'd CAM) are broken in a random order, not by pixel
position: a position order would sweep across the image top to bottom and make the curve depend
on where the object is rather than on the map.

Channel ablation zeroes a set of channels of a layer's output in a forward pass and reports the
target's score; comparing a channel group against as many random channels tests whether the
group's channels carry the class evidence the explanation says they do.

Everything is batched: one forward pass scores many perturbed copies of many images, and the
endpoints (the intact image and the full baseline) are scored once and shared by every map.

Example::

    >>> score = softmax_score(model)                                          # doctest: +SKIP
    >>> curves = perturbation_curves(score, x, torch.zeros_like(x), maps, targets, steps=16,
    ...                              mode="deletion")                         # doctest: +SKIP
    >>> auc(curves)                                                           # (M, B)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal, TypedDict, Unpack

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from textcam.layers import forward_hook, get_layer

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = [
    "CurveOptions",
    "ScoreFn",
    "ablated_scores",
    "auc",
    "blur_baseline",
    "curves_from_ranks",
    "logit_score",
    "perturbation_curves",
    "pixel_ranks",
    "random_channel_masks",
    "random_maps",
    "softmax_score",
]

#: (images (N, 3, H, W), targets (N,)) -> (N,) score of each image's target class.
ScoreFn = Callable[[Tensor, Tensor], Tensor]
Mode = Literal["deletion", "insertion"]


class CurveOptions(TypedDict, total=False):
    """Keyword settings of a perturbation curve (see :func:`curves_from_ranks`)."""

    steps: int
    mode: Mode
    batch_size: int


def softmax_score(model: nn.Module) -> ScoreFn:
    """Score = softmax probability of the target class (the RISE convention for deletion/insertion)."""

    @torch.no_grad()
    def score(images: Tensor, targets: Tensor) -> Tensor:
        return model(images).softmax(dim=1).gather(1, targets.view(-1, 1))[:, 0]

    return score


def logit_score(model: nn.Module) -> ScoreFn:
    """Score = the target class's logit."""

    @torch.no_grad()
    def score(images: Tensor, targets: Tensor) -> Tensor:
        return model(images).gather(1, targets.view(-1, 1))[:, 0]

    return score


def pixel_ranks(saliency: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """(B, H, W) maps -> (B, H·W) long rank of every pixel, 0 = most salient; ties in random order."""
    flat = saliency.detach().flatten(1).float()
    b, n = flat.shape
    # Shuffle first, then a *stable* sort by saliency: equal values keep the random order.
    shuffle = torch.rand(b, n, generator=generator, device=flat.device if generator is None else "cpu")
    shuffle = shuffle.to(flat.device).argsort(dim=1)
    by_value = flat.gather(1, shuffle).argsort(dim=1, descending=True, stable=True)
    order = shuffle.gather(1, by_value)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n, device=flat.device).expand(b, n))
    return ranks


def random_maps(
    n: int,
    size: tuple[int, int],
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
) -> Tensor:
    """(n, h, w) maps of i.i.d. uniform values: the chance baseline for a saliency map.

    Draw them at the resolution of the maps they are compared with (the CAM grid) so the two are
    upsampled alike and differ only in where they point, not in how smooth they are.
    """
    return torch.rand(n, *size, generator=generator).to(device)


def blur_baseline(images: Tensor, sigma: float, radius: int | None = None) -> Tensor:
    """Gaussian-blurred copies of ``images`` (B, C, H, W) (separable kernel, reflect padding).

    The usual insertion baseline: it removes the detail a classifier needs while keeping the
    colour statistics, so inserted pixels are not the only in-distribution ones.
    """
    if sigma <= 0:
        return images.clone()
    r = radius if radius is not None else max(1, int(3 * sigma))
    r = min(r, images.shape[-1] - 1, images.shape[-2] - 1)
    x = torch.arange(-r, r + 1, dtype=images.dtype, device=images.device)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = k / k.sum()
    c = images.shape[1]
    out = F.pad(images, (r, r, r, r), mode="reflect")
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _to_input_size(maps: Tensor, hw: tuple[int, int]) -> Tensor:
    """(M, B, h, w) -> (M, B, H, W) bilinear (align_corners=False, like cv2.resize)."""
    if tuple(maps.shape[-2:]) == hw:
        return maps
    m, b = maps.shape[:2]
    up = F.interpolate(maps.flatten(0, 1)[:, None].float(), size=hw, mode="bilinear", align_corners=False)
    return up[:, 0].view(m, b, *hw)


@torch.no_grad()
def perturbation_curves(
    score: ScoreFn,
    images: Tensor,
    baseline: Tensor,
    maps: Tensor,
    targets: Tensor,
    *,
    generator: torch.Generator | None = None,
    **options: Unpack[CurveOptions],
) -> Tensor:
    """Deletion or insertion curves of M maps for B images: (M, B, steps + 1) scores.

    Args:
        score: the scoring function (:func:`softmax_score`, :func:`logit_score`, ...).
        images, baseline: (B, C, H, W) model inputs and what deleted pixels become.
        maps: (M, B, h, w) or (B, h, w) saliency maps at any resolution (upsampled bilinearly to H×W).
        targets: (B,) class index each image's score is read for.
        generator: random tie-breaking of equal map values (seed it for reproducible curves).
        options: ``steps``, ``mode`` and ``batch_size`` of :func:`curves_from_ranks`.
    """
    if maps.ndim == 3:
        maps = maps[None]
    m, b = maps.shape[:2]
    hw = (images.shape[-2], images.shape[-1])
    ranks = pixel_ranks(_to_input_size(maps, hw).flatten(0, 1), generator).view(m, b, -1)
    return curves_from_ranks(score, images, baseline, ranks, targets, **options)


@torch.no_grad()
def curves_from_ranks(
    score: ScoreFn,
    images: Tensor,
    baseline: Tensor,
    ranks: Tensor,
    targets: Tensor,
    *,
    steps: int = 16,
    mode: Mode = "deletion",
    batch_size: int = 256,
) -> Tensor:
    """:func:`perturbation_curves` for precomputed pixel ranks (M, B, H·W) (from :func:`pixel_ranks`).

    ``steps`` is the number of perturbation steps n (point k has ``round(k/n · H·W)`` pixels perturbed),
    ``mode`` ``"deletion"`` (image -> baseline) or ``"insertion"`` (baseline -> image), ``batch_size``
    the perturbed images per forward pass.

    Two maps with equal ranks perturb the same pixels at every step, so their curves are equal:
    callers comparing near-identical maps can evaluate only the images whose ranks differ.
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if images.shape != baseline.shape or images.ndim != 4:
        raise ValueError(
            f"images and baseline must both be (B, C, H, W); got {images.shape}, {baseline.shape}"
        )
    m, b, n_pix = ranks.shape
    hw = (images.shape[-2], images.shape[-1])
    if b != images.shape[0] or targets.shape != (b,) or n_pix != hw[0] * hw[1]:
        raise ValueError(
            f"ranks {tuple(ranks.shape)} and targets {tuple(targets.shape)} for images {tuple(images.shape)}"
        )
    counts = torch.round(torch.arange(steps + 1, dtype=torch.float64) * n_pix / steps).long()
    counts = counts.to(ranks.device)

    out = torch.empty(m, b, steps + 1)
    # The endpoints do not depend on the map: score them once for all M maps.
    full, empty = score(images, targets).float().cpu(), score(baseline, targets).float().cpu()
    first, last = (full, empty) if mode == "deletion" else (empty, full)
    out[:, :, 0], out[:, :, steps] = first, last
    if steps == 1:
        return out
    # Intermediate points: (map, image, step) triples, flattened and scored batch_size at a time.
    mi, bi, ki = torch.meshgrid(torch.arange(m), torch.arange(b), torch.arange(1, steps), indexing="ij")
    mi, bi, ki = mi.flatten(), bi.flatten(), ki.flatten()
    flat_out = out.view(m * b, steps + 1)
    src, dst = (baseline, images) if mode == "deletion" else (images, baseline)
    for start in range(0, mi.numel(), batch_size):
        sl = slice(start, start + batch_size)
        sm, sb, sk = mi[sl], bi[sl], ki[sl]
        perturbed = (ranks[sm, sb] < counts[sk][:, None]).view(-1, 1, *hw)  # pixels changed at this step
        x = torch.where(perturbed, src[sb], dst[sb])
        flat_out[sm * b + sb, sk] = score(x, targets[sb]).float().cpu()
    return out


def auc(curves: Tensor) -> Tensor:
    """Trapezoid area under curves sampled at evenly spaced fractions of [0, 1] (last dim)."""
    n = curves.shape[-1] - 1
    if n < 1:
        raise ValueError("a curve needs at least two points")
    return (curves[..., :-1] + curves[..., 1:]).sum(-1) / (2 * n)


@contextmanager
def _zeroed_channels(layer: nn.Module, keep: Tensor) -> Iterator[None]:
    """Multiply ``layer``'s (N, C, h, w) output by ``keep`` (N, C) during the context."""

    def hook(_mod: nn.Module, _inp: object, output: Tensor) -> Tensor:
        if not isinstance(output, Tensor) or output.ndim != 4:
            raise ValueError(
                f"channel ablation needs a (N, C, h, w) layer output, got {type(output).__name__}"
            )
        return output * keep.to(output.dtype)[:, :, None, None]

    with forward_hook(layer, hook):
        yield


@torch.no_grad()
def ablated_scores(
    model: nn.Module,
    layer: str,
    images: Tensor,
    targets: Tensor,
    zero: Tensor,
    *,
    score: Literal["logit", "softmax"] = "logit",
    batch_size: int = 256,
) -> Tensor:
    """Target scores with channels of ``layer`` zeroed: (B, R) for R channel sets per image.

    Args:
        zero: (B, R, C) bool, True = set the channel's activation map to 0 (or (B, C) for R = 1).
        score: ``"logit"`` (the class score) or ``"softmax"`` (its probability).
    """
    if zero.ndim == 2:
        zero = zero[:, None]
    b, r = zero.shape[:2]
    if b != images.shape[0] or targets.shape != (b,):
        raise ValueError(
            f"zero masks for {b} images, {images.shape[0]} images, targets {tuple(targets.shape)}"
        )
    mod = get_layer(model, layer)
    keep = (~zero).flatten(0, 1)
    idx = torch.arange(b, device=images.device).repeat_interleave(r)
    out = []
    for start in range(0, b * r, batch_size):
        sl = slice(start, start + batch_size)
        with _zeroed_channels(mod, keep[sl].to(images.device)):
            logits = model(images[idx[sl]])
        if score == "softmax":
            logits = logits.softmax(dim=1)
        out.append(logits.gather(1, targets[idx[sl]].view(-1, 1))[:, 0].float().cpu())
    return torch.cat(out).view(b, r)


def random_channel_masks(
    n_zero: Tensor, n_channels: int, draws: int, generator: torch.Generator | None = None
) -> Tensor:
    """(B, draws, C) bool masks, each with ``n_zero[b]`` channels drawn uniformly without replacement."""
    b = n_zero.shape[0]
    if (n_zero < 0).any() or (n_zero > n_channels).any():
        raise ValueError(f"n_zero must lie in [0, {n_channels}]")
    ranks = torch.rand(b, draws, n_channels, generator=generator).argsort(dim=-1).argsort(dim=-1)
    return ranks < n_zero.cpu().view(b, 1, 1)
