"""What every CAM method shares: the hooked forward pass, gradients, and the weighted sum.

For a target layer with activations ``A ∈ R^{C×h×w}`` and a target score ``y^k``, a CAM method
chooses channel weights ``w^k_j`` (or element-wise weights ``w^k_{j,u,v}``) and the map is

    L^k = ReLU( Σ_j w^k_j A_j )

Subclasses override :meth:`CamMethod.weights` only. The base

* registers a forward hook on the target layer for the duration of one call (removed in
  ``finally``, also when the model raises);
* for gradient methods, switches ``requires_grad`` off on every parameter inside the call (flags
  restored in ``finally``) and makes the layer output a fresh autograd leaf, so the only graph
  recorded spans *target layer → score*; the gradients ``∂y^k/∂A`` come from
  ``torch.autograd.grad`` (no ``.backward()``, no module backward hooks, nothing accumulates in
  ``.grad``). The forward therefore costs about as much as a plain ``model(x)``;
* runs gradient-free methods (CAM, Score-CAM) under ``torch.no_grad()``;
* reshapes ViT tokens ``(B, N, C)`` to ``(B, C, h, w)`` with a :class:`~textcam.layers.TokenGrid`.

The caller puts the model in eval mode (``model.eval()``); the base never changes the model's
mode, and assumes samples in a batch do not interact (true in eval mode), so per-sample gradients
come from one ``autograd.grad`` of the batch sum.

Example::

    >>> cam = build_cam("gradcam", model.eval(), "layer4")
    >>> out = cam(images, TopK(2))           # CamOutput
    >>> out.maps.shape                       # (B, 2, 7, 7)
    >>> heat = normalize_maps(upsample_maps(out.maps, images.shape[-2:]))
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from textcam.layers import TokenGrid, forward_hook, get_layer, resolve_layer_name
from textcam.targets import Target, as_target, unwrap_logits

__all__ = [
    "METHODS",
    "CamInputs",
    "CamMethod",
    "CamOutput",
    "frozen_parameters",
    "normalize_maps",
    "register_method",
    "upsample_maps",
]

#: Registered CAM methods by name (``textcam.cams`` imports every family so they register).
METHODS: dict[str, type[CamMethod]] = {}


def register_method(name: str) -> Callable[[type[CamMethod]], type[CamMethod]]:
    """Class decorator: register a :class:`CamMethod` subclass under ``name`` in :data:`METHODS`."""

    def decorator(cls: type[CamMethod]) -> type[CamMethod]:
        if name in METHODS:
            raise ValueError(f"CAM method {name!r} is already registered ({METHODS[name].__name__})")
        cls.name = name
        METHODS[name] = cls
        return cls

    return decorator


@dataclass
class CamOutput:
    """The result of one CAM call for a batch of ``B`` images and ``K`` targets per image."""

    logits: Tensor  #: (B, num_classes), detached
    activations: Tensor  #: (B, C, h, w) target-layer map (tokens already reshaped), detached
    targets: Tensor  #: (B, K) long: class indices explained for each sample
    weights: Tensor  #: (B, K, C) channel weights, or (B, K, C, h, w) for element-wise methods
    maps: Tensor  #: (B, K, h, w) relu(Σ_j w_j A_j), not normalised, at layer resolution
    valid: Tensor | None = None  #: (B, K) bool: False for padded multi-label targets


@dataclass
class CamInputs:
    """Everything a weight function may use (all detached)."""

    images: Tensor  #: (B, 3, H, W) the model input
    activations: Tensor  #: (B, C, h, w)
    gradients: Tensor | None  #: (B, K, C, h, w) ∂y^k/∂A, None for gradient-free methods
    targets: Tensor  #: (B, K) long class indices
    target: Target  #: the target object (Score-CAM re-scores masked inputs with it)
    logits: Tensor  #: (B, num_classes)


@contextmanager
def frozen_parameters(module: nn.Module) -> Iterator[None]:
    """Switch ``requires_grad`` off on every parameter of ``module``; restore the flags on exit."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for param, _ in flags:
            param.requires_grad_(False)
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


def upsample_maps(maps: Tensor, size: Sequence[int], mode: str = "bilinear") -> Tensor:
    """Resize ``(B, K, h, w)`` maps to ``size`` (``align_corners=False``, like ``cv2.resize``)."""
    if mode in ("nearest", "area"):
        return F.interpolate(maps, size=tuple(size), mode=mode)
    return F.interpolate(maps, size=tuple(size), mode=mode, align_corners=False)


def normalize_maps(maps: Tensor, eps: float = 1e-7) -> Tensor:
    """Min-max scale each map to [0, 1]: ``(L - min L) / (max(L - min L) + eps)``."""
    flat = maps.flatten(-2)
    shifted = flat - flat.amin(dim=-1, keepdim=True)
    return (shifted / (shifted.amax(dim=-1, keepdim=True) + eps)).view_as(maps)


class CamMethod:
    """Base of all CAM methods; a subclass overrides :meth:`weights` only.

    Args:
        model: the classifier, already in eval mode. Its output is a ``(B, num_classes)`` tensor or
            an object/mapping carrying ``logits``.
        layer: dotted target-layer name (``layer4``, ``blocks.-1.norm1``).
        token_grid: token layout for a layer with ``(B, N, C)`` outputs; detected from timm and
            torchvision ViTs when omitted.
    """

    name: ClassVar[str] = ""
    #: Gradient methods get ``CamInputs.gradients``; the others run their forward under no_grad.
    uses_gradients: ClassVar[bool] = True

    def __init__(self, model: nn.Module, layer: str, *, token_grid: TokenGrid | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.layer_name = resolve_layer_name(model, layer)
        self.layer = get_layer(model, layer)
        self.token_grid = token_grid

    def weights(self, inputs: CamInputs) -> Tensor:
        """Channel weights ``(B, K, C)`` or element-wise weights ``(B, K, C, h, w)``."""
        raise NotImplementedError

    def __call__(
        self, images: Tensor, targets: Target | int | Sequence[int] | Tensor | None = None
    ) -> CamOutput:
        """Explain ``images`` ``(B, 3, H, W)`` for ``targets`` (default: the predicted class)."""
        if not isinstance(images, Tensor) or images.ndim != 4:
            raise ValueError(f"images must be a (B, 3, H, W) tensor, got {getattr(images, 'shape', images)}")
        target = as_target(targets)
        images = images.detach()
        if self.uses_gradients:
            # Works under a caller's no_grad or inference_mode too: the graph is ours to record.
            with frozen_parameters(self.model), torch.inference_mode(False), torch.enable_grad():
                leaf, logits = self._forward(images, record=True)
                scores, indices = target(logits)
                grads = self._gradients(scores, leaf)
        else:
            with torch.no_grad():
                leaf, logits = self._forward(images, record=False)
                indices = target.select(logits)
            grads = None
        logits = logits.detach()
        hw = tuple(images.shape[-2:])
        if grads is not None:  # (B, K, ...) → (B·K, ...) → maps → (B, K, C, h, w)
            grads = self._to_map(grads.flatten(0, 1), hw).unflatten(0, grads.shape[:2])
        inputs = CamInputs(
            images=images,
            activations=self._to_map(leaf.detach(), hw),
            gradients=grads,
            targets=indices,
            target=target,
            logits=logits,
        )
        with torch.no_grad():
            weights = self.weights(inputs)
            maps = self.combine(weights, inputs.activations)
        return CamOutput(
            logits=logits,
            activations=inputs.activations,
            targets=indices,
            weights=weights,
            maps=maps,
            valid=target.valid(logits, indices),
        )

    @staticmethod
    def combine(weights: Tensor, activations: Tensor) -> Tensor:
        """``ReLU(Σ_j w_j A_j)`` for channel ``(B, K, C)`` or element-wise ``(B, K, C, h, w)`` weights."""
        if weights.ndim == 3:
            summed = torch.einsum("bkc,bchw->bkhw", weights, activations)
        elif weights.ndim == 5:
            summed = (weights * activations.unsqueeze(1)).sum(dim=2)
        else:
            raise ValueError(f"weights must be (B, K, C) or (B, K, C, h, w), got {tuple(weights.shape)}")
        return summed.clamp_min(0)

    def _forward(self, images: Tensor, *, record: bool) -> tuple[Tensor, Tensor]:
        """One forward pass; returns the target-layer output (a grad leaf when ``record``) and logits."""
        captured: list[Tensor] = []

        def hook(module: nn.Module, args: object, output: object) -> Tensor | None:
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"layer {self.layer_name!r} returns {type(output).__name__}, not a Tensor; "
                    "pick a layer whose output is a feature map or token sequence"
                )
            if captured:
                raise ValueError(
                    f"layer {self.layer_name!r} runs more than once per forward pass (a shared module); "
                    "pick a layer that is called once"
                )
            if not record:
                captured.append(output.detach())
                return None
            # A fresh leaf: autograd records only from here to the score. The clone keeps the leaf
            # intact when the network modifies the layer output in place (e.g. `out += identity`).
            leaf = output.detach().requires_grad_(True)
            captured.append(leaf)
            return leaf.clone()

        with forward_hook(self.layer, hook):
            logits = unwrap_logits(self.model(images))
        if not captured:
            raise ValueError(f"layer {self.layer_name!r} was not called during the forward pass")
        return captured[0], logits

    def _gradients(self, scores: Tensor, leaf: Tensor) -> Tensor:
        """``(B, K, *leaf.shape[1:])`` gradients of each target score w.r.t. the layer output."""
        if not scores.requires_grad:
            raise ValueError(f"the target scores do not depend on layer {self.layer_name!r}")
        num_targets = scores.shape[1]
        grads = []
        for k in range(num_targets):  # K is small (1 to a few); one short backward each
            (grad,) = torch.autograd.grad(
                scores[:, k].sum(), leaf, retain_graph=k < num_targets - 1, allow_unused=True
            )
            if grad is None:
                raise ValueError(f"the target scores do not depend on layer {self.layer_name!r}")
            grads.append(grad)
        return torch.stack(grads, dim=1)

    def _to_map(self, x: Tensor, input_hw: tuple[int, int]) -> Tensor:
        if x.ndim == 4:
            return x
        if x.ndim == 3:
            grid = self.token_grid or TokenGrid.detect(self.model)
            if grid is None:
                raise ValueError(
                    f"layer {self.layer_name!r} outputs tokens {tuple(x.shape)}; pass token_grid="
                    "TokenGrid(num_prefix_tokens, patch_size) to reshape them"
                )
            return grid.to_map(x, input_hw)
        raise ValueError(
            f"layer {self.layer_name!r} outputs shape {tuple(x.shape)}: not a (B, C, h, w) map or "
            "(B, N, C) tokens; pick a convolutional or transformer-block layer"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self.layer_name!r})"
