"""Target layers: lookup by name, listing candidates, and ViT tokens → spatial maps.

A *target layer* is named with a dotted path as in ``module.named_modules()`` (``layer4``,
``features.7``); integer parts index containers and may be negative (``blocks.-1.norm1`` is the
first norm of the last timm ViT block). Token outputs ``(B, N, C)`` of vision transformers become
``(B, C, h, w)`` maps through :class:`TokenGrid`, whose grid comes from the input size and the
patch size (never a hard-coded 14×14).

Example::

    >>> layer = get_layer(model, "blocks.-1.norm1")
    >>> grid = TokenGrid.detect(model)               # TokenGrid(num_prefix_tokens=1, patch_size=(16, 16))
    >>> fmap = grid.to_map(tokens, input_hw=(224, 224))   # (B, C, 14, 14)
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "LayerInfo",
    "TokenGrid",
    "UnknownLayerError",
    "get_layer",
    "list_layers",
    "resolve_layer_name",
]


class UnknownLayerError(ValueError):
    """A target-layer name that does not exist in the model (the message lists close matches)."""


def _is_index(part: str) -> bool:
    return part.lstrip("-").isdigit() and part.count("-") <= 1


def _walk(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    """Follow a dotted ``name`` from ``module``; return the layer and its canonical name."""
    if not isinstance(name, str):
        raise TypeError(f"layer name must be a str, got {type(name).__name__}")
    if name == "":
        return module, ""
    current = module
    canonical: list[str] = []
    for part in name.split("."):
        children = dict(current.named_children())
        if part in children:
            current = children[part]
            canonical.append(part)
            continue
        if _is_index(part) and children:
            keys = list(children)
            index = int(part)
            # Containers name children "0", "1", …; index by position so that negative indices work
            # for ModuleList, Sequential and ModuleDict alike.
            if -len(keys) <= index < len(keys):
                key = keys[index]
                current = children[key]
                canonical.append(key)
                continue
        raise _unknown(module, name)
    return current, ".".join(canonical)


def _unknown(module: nn.Module, name: str) -> UnknownLayerError:
    names = [n for n, _ in module.named_modules() if n]
    close = difflib.get_close_matches(name, names, n=6, cutoff=0.5)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    return UnknownLayerError(
        f"unknown layer {name!r} in {type(module).__name__}.{hint} "
        "Run `textcam layers MODEL` to list candidate target layers."
    )


@contextmanager
def forward_hook(layer: nn.Module, hook: Callable[..., Any]) -> Iterator[None]:
    """``hook`` on ``layer``'s forward pass for the duration of the block, removed whatever happens."""
    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def get_layer(module: nn.Module, name: str) -> nn.Module:
    """Return the sub-module called ``name`` (dotted, negative container indices allowed).

    Raises :class:`UnknownLayerError` (a ``ValueError``) naming the closest existing layers.
    """
    return _walk(module, name)[0]


def resolve_layer_name(module: nn.Module, name: str) -> str:
    """Canonical dotted name of ``name`` (negative indices resolved: ``blocks.-1`` → ``blocks.11``)."""
    return _walk(module, name)[1]


@dataclass(frozen=True)
class TokenGrid:
    """How a transformer's token sequence maps back onto the image grid.

    Tokens ``x`` of shape ``(B, N, C)`` hold ``num_prefix_tokens`` leading tokens (class,
    distillation, register tokens) followed by ``h·w`` patch tokens in row-major order, with
    ``h = H // patch_h`` and ``w = W // patch_w`` for an input of size ``(H, W)``.
    """

    num_prefix_tokens: int
    patch_size: tuple[int, int]

    def __post_init__(self) -> None:
        patch = self.patch_size
        if isinstance(patch, int):
            patch = (patch, patch)
        patch = tuple(int(p) for p in patch)
        if len(patch) != 2 or min(patch) < 1:
            raise ValueError(f"patch_size must be a positive int or (h, w) pair, got {self.patch_size!r}")
        if self.num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be >= 0, got {self.num_prefix_tokens}")
        object.__setattr__(self, "patch_size", patch)

    def grid_size(self, input_hw: tuple[int, int]) -> tuple[int, int]:
        """``(h, w)`` patch grid for an input of size ``input_hw``."""
        return input_hw[0] // self.patch_size[0], input_hw[1] // self.patch_size[1]

    def to_map(self, x: Tensor, input_hw: tuple[int, int]) -> Tensor:
        """``(B, N, C)`` tokens → ``(B, C, h, w)``, dropping the prefix tokens."""
        if x.ndim != 3:
            raise ValueError(f"expected tokens of shape (B, N, C), got {tuple(x.shape)}")
        h, w = self.grid_size(input_hw)
        batch, n_tokens, channels = x.shape
        if n_tokens != self.num_prefix_tokens + h * w:
            raise ValueError(
                f"{n_tokens} tokens do not fit {self.num_prefix_tokens} prefix tokens + a {h}×{w} grid "
                f"(input {tuple(input_hw)}, patch {self.patch_size}); pass the right TokenGrid"
            )
        return x[:, self.num_prefix_tokens :].reshape(batch, h, w, channels).permute(0, 3, 1, 2)

    @classmethod
    def detect(cls, module: nn.Module) -> TokenGrid | None:
        """Token layout of a timm or torchvision ViT, or ``None`` when ``module`` is not one.

        timm: ``num_prefix_tokens`` and ``patch_embed.patch_size``; torchvision
        ``VisionTransformer``: ``patch_size`` and one class token.
        """
        patch_embed = getattr(module, "patch_embed", None)
        if hasattr(module, "num_prefix_tokens") and hasattr(patch_embed, "patch_size"):
            return cls(int(module.num_prefix_tokens), patch_embed.patch_size)
        if isinstance(getattr(module, "patch_size", None), int) and hasattr(module, "class_token"):
            return cls(1, module.patch_size)
        return None


@dataclass(frozen=True)
class LayerInfo:
    """A candidate target layer: its name, module type and output map shape ``(C, h, w)``."""

    name: str
    type: str
    out_shape: tuple[int, ...]
    is_default: bool = False


def list_layers(
    module: nn.Module,
    input_size: tuple[int, int],
    token_grid: TokenGrid | None = None,
    default: str | None = None,
) -> list[LayerInfo]:
    """Candidate target layers: every sub-module whose output is a spatial or token map.

    One forward pass of a zero image of ``input_size`` (under ``no_grad``) with a forward hook on
    every sub-module; the hooks are removed in ``finally``. A module called several times reports
    its first output. Token outputs are reported as their ``(C, h, w)`` map when ``token_grid``
    (or the one detected on ``module``) fits them. The caller puts ``module`` in eval mode.
    """
    grid = token_grid if token_grid is not None else TokenGrid.detect(module)
    default_name = resolve_layer_name(module, default) if default else None
    shapes: dict[str, tuple[int, ...]] = {}
    types: dict[str, str] = {}

    def make_hook(name: str):
        def hook(mod: nn.Module, args: object, output: object) -> None:
            if name in shapes or not isinstance(output, Tensor):
                return
            shape = _map_shape(output, grid, input_size)
            if shape is not None:
                shapes[name] = shape
                types[name] = type(mod).__name__

        return hook

    try:
        param = next(module.parameters())
        device, dtype = param.device, param.dtype
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32
    handles = [m.register_forward_hook(make_hook(n)) for n, m in module.named_modules() if n]
    try:
        with torch.no_grad():
            module(torch.zeros(1, 3, *input_size, device=device, dtype=dtype))
    finally:
        for handle in handles:
            handle.remove()
    order = [n for n, _ in module.named_modules() if n in shapes]
    return [LayerInfo(n, types[n], shapes[n], n == default_name) for n in order]


def _map_shape(output: Tensor, grid: TokenGrid | None, input_size: tuple[int, int]) -> tuple[int, ...] | None:
    if output.ndim == 4 and output.shape[-1] * output.shape[-2] > 1:
        return tuple(output.shape[1:])
    if output.ndim == 3 and grid is not None:
        h, w = grid.grid_size(input_size)
        if output.shape[1] == grid.num_prefix_tokens + h * w:
            return (int(output.shape[2]), h, w)
    return None
