"""The original CAM (Zhou et al. 2016): the classifier's own weights.

For a head ``y_k = Σ_j W_{kj} · mean_{u,v} A_{j,u,v} + b_k`` (global average pooling, then one
linear layer), ``w^k_j = W_{kj}`` and ``Σ_{u,v} L^k_{u,v} = h·w·(y_k - b_k)`` before the ReLU.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from textcam.cams.base import CamInputs, CamMethod, register_method

__all__ = ["CAM", "find_head_weight"]


def find_head_weight(model: nn.Module, in_features: int) -> Tensor:
    """Weight ``(num_classes, C)`` of the last ``nn.Linear`` of ``model`` that takes ``C`` inputs."""
    heads = [m for m in model.modules() if isinstance(m, nn.Linear) and m.in_features == in_features]
    if not heads:
        raise ValueError(
            f"no nn.Linear with {in_features} inputs found for CAM; pass head_weight=(num_classes, "
            f"{in_features}) explicitly or use a gradient method"
        )
    return heads[-1].weight


@register_method("cam")
class CAM(CamMethod):
    """CAM: ``w^k_j = W_{k j}`` of the linear head after global average pooling.

    Exact only for a GAP + linear head on the target layer; ``head_weight`` overrides the search
    for the last ``nn.Linear`` with ``C`` inputs; other keywords (``token_grid``) go to :class:`CamMethod`.
    """

    uses_gradients = False

    def __init__(
        self, model: nn.Module, layer: str, *, head_weight: Tensor | None = None, **options: Any
    ) -> None:
        super().__init__(model, layer, **options)
        if head_weight is not None and (not isinstance(head_weight, Tensor) or head_weight.ndim != 2):
            raise ValueError("head_weight must be a (num_classes, C) tensor")
        self.head_weight = head_weight

    def weights(self, inputs: CamInputs) -> Tensor:
        channels = inputs.activations.shape[1]
        weight = self.head_weight if self.head_weight is not None else find_head_weight(self.model, channels)
        if weight.shape[1] != channels:
            raise ValueError(f"head_weight has {weight.shape[1]} inputs, the layer has {channels} channels")
        weight = weight.detach().to(inputs.activations)
        return weight[inputs.targets]
