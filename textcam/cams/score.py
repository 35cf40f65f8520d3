"""Score-CAM (Wang et al. 2020), as defined in pytorch-grad-cam.

Each channel ``A_j``, upsampled to the input size (bilinear, ``align_corners=True``) and min-max
scaled to [0, 1], masks the input; the weight is a softmax over channels of the target's score on
the masked input:

    M_j = (up(A_j) - min) / (max - min + 1e-8),   s^k_j = y_k(x ⊙ M_j),   w^k = softmax_j(s^k)

``score="logit"`` (default) uses the logit ``y_k`` as pytorch-grad-cam's ``ClassifierOutputTarget``
does; ``score="prob"`` uses the softmax probability (the paper; ``ClassifierOutputSoftmaxTarget``).
The ``B·C`` masked inputs run in chunks of ``batch_size`` under ``no_grad``; all ``K`` targets
are scored from the same forward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from textcam.cams.base import CamInputs, CamMethod, register_method
from textcam.targets import unwrap_logits

__all__ = ["ScoreCAM"]


@register_method("scorecam")
class ScoreCAM(CamMethod):
    """Score-CAM: one forward pass per channel (costly: ``C`` forwards per image).

    Other keywords (``token_grid``) go to :class:`CamMethod`.
    """

    uses_gradients = False

    def __init__(
        self, model: nn.Module, layer: str, *, batch_size: int = 64, score: str = "logit", **options: Any
    ) -> None:
        super().__init__(model, layer, **options)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if score not in ("logit", "prob"):
            raise ValueError(f"score must be 'logit' or 'prob', got {score!r}")
        self.batch_size = batch_size
        self.score = score

    def weights(self, inputs: CamInputs) -> Tensor:
        images, acts, targets = inputs.images, inputs.activations, inputs.targets
        batch, channels = acts.shape[:2]
        size = images.shape[-2:]
        scores = acts.new_empty(batch * channels, targets.shape[1])
        flat_acts = acts.flatten(0, 1).unsqueeze(1)  # (B·C, 1, h, w)
        for start in range(0, batch * channels, self.batch_size):
            rows = torch.arange(start, min(start + self.batch_size, batch * channels), device=acts.device)
            image_idx = rows // channels
            # Upsample only this chunk: the full (B, C, H, W) stack would not fit for large C.
            masks = F.interpolate(flat_acts[rows], size=size, mode="bilinear", align_corners=True)
            lo = masks.amin(dim=(-2, -1), keepdim=True)
            hi = masks.amax(dim=(-2, -1), keepdim=True)
            masks = (masks - lo) / (hi - lo + 1e-8)
            logits = unwrap_logits(self.model(images[image_idx] * masks))
            if self.score == "prob":
                logits = logits.softmax(dim=1)
            scores[rows] = inputs.target.score(logits, targets[image_idx])
        return scores.view(batch, channels, -1).softmax(dim=1).transpose(1, 2)
