"""Saliency overlays as images (numpy + PIL only; no plotting library needed)."""

from __future__ import annotations

import numpy as np
from PIL import Image

# Anchor points of a perceptually ordered colormap (dark blue → cyan → yellow → red).
_ANCHORS = np.array(
    [[0.0, 0, 0, 96], [0.25, 0, 96, 255], [0.5, 0, 220, 220], [0.75, 255, 220, 0], [1.0, 220, 0, 0]],
    dtype=np.float64,
)


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (any shape) to uint8 RGB (shape + (3,))."""
    v = np.clip(np.nan_to_num(values.astype(np.float64)), 0.0, 1.0)
    rgb = [np.interp(v, _ANCHORS[:, 0], _ANCHORS[:, c]) for c in (1, 2, 3)]
    return np.stack(rgb, axis=-1).round().astype(np.uint8)


def overlay(image: Image.Image, saliency: np.ndarray, *, alpha: float = 0.5) -> Image.Image:
    """Blend a low-resolution map (h, w) in [0, 1] over ``image``, upsampled bilinearly."""
    if saliency.ndim != 2:
        raise ValueError(f"saliency must be 2-D, got shape {saliency.shape}")
    image = image.convert("RGB")
    # Upsample the values, then colour them: interpolating colours would invent hues.
    values = Image.fromarray(np.asarray(saliency, dtype=np.float32), mode="F")
    values = np.asarray(values.resize(image.size, Image.Resampling.BILINEAR))
    heat = Image.fromarray(colormap(values), mode="RGB")
    return Image.blend(image, heat, alpha)
