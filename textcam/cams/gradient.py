"""Gradient-weighted CAMs: one weight function each over ``g = ∂y^k/∂A`` (B, K, C, h, w).

Sums and means run over the spatial positions ``(u, v)`` of the target layer.
"""

from __future__ import annotations

from torch import Tensor

from textcam.cams.base import CamInputs, CamMethod, register_method

__all__ = ["GradCAM", "GradCAMPlusPlus", "LayerCAM", "XGradCAM"]

_SPATIAL = (-2, -1)


@register_method("gradcam")
class GradCAM(CamMethod):
    """Grad-CAM (Selvaraju et al. 2017): ``w_j = mean_{u,v} g_{j,u,v}``."""

    def weights(self, inputs: CamInputs) -> Tensor:
        return inputs.gradients.mean(dim=_SPATIAL)


@register_method("gradcampp")
class GradCAMPlusPlus(CamMethod):
    """Grad-CAM++ (Chattopadhay et al. 2018, eq. 19, as in pytorch-grad-cam).

    ``α_{j,u,v} = g² / (2 g² + Σ_{u,v} A_j · g³ + ε)`` (0 where ``g = 0``),
    ``w_j = Σ_{u,v} α_{j,u,v} ReLU(g_{j,u,v})``.
    """

    eps: float = 1e-6

    def weights(self, inputs: CamInputs) -> Tensor:
        g = inputs.gradients
        g2 = g.pow(2)
        sum_a = inputs.activations.sum(dim=_SPATIAL, keepdim=True).unsqueeze(1)
        alpha = g2 / (2 * g2 + sum_a * g2 * g + self.eps)
        alpha = alpha.where(g != 0, 0.0)
        return (alpha * g.clamp_min(0)).sum(dim=_SPATIAL)


@register_method("xgradcam")
class XGradCAM(CamMethod):
    """XGrad-CAM (Fu et al. 2020): ``w_j = Σ_{u,v} g_{j,u,v} A_{j,u,v} / (Σ_{u,v} A_{j,u,v} + ε)``."""

    eps: float = 1e-7

    def weights(self, inputs: CamInputs) -> Tensor:
        a = inputs.activations.unsqueeze(1)
        return (inputs.gradients * a).sum(dim=_SPATIAL) / (a.sum(dim=_SPATIAL) + self.eps)


@register_method("layercam")
class LayerCAM(CamMethod):
    """LayerCAM (Jiang et al. 2021): element-wise ``w_{j,u,v} = ReLU(g_{j,u,v})``."""

    def weights(self, inputs: CamInputs) -> Tensor:
        return inputs.gradients.clamp_min(0)
