"""Class Activation Map methods behind one registry.

``METHODS`` maps a name to a :class:`CamMethod` subclass; :func:`build_cam` builds one. Each
family lives in its own module (``cam``, ``gradient``, ``score``) and registers on import.

Example::

    >>> from textcam.cams import build_cam, METHODS
    >>> sorted(METHODS)
    ['cam', 'gradcam', 'gradcampp', 'layercam', 'scorecam', 'xgradcam']
    >>> out = build_cam("gradcam", model.eval(), "layer4")(images)
"""

from __future__ import annotations

from typing import Any

from torch import nn

from textcam.cams.base import (
    METHODS,
    CamInputs,
    CamMethod,
    CamOutput,
    frozen_parameters,
    normalize_maps,
    register_method,
    upsample_maps,
)
from textcam.cams.cam import CAM
from textcam.cams.gradient import GradCAM, GradCAMPlusPlus, LayerCAM, XGradCAM
from textcam.cams.score import ScoreCAM

__all__ = [
    "CAM",
    "METHODS",
    "CamInputs",
    "CamMethod",
    "CamOutput",
    "GradCAM",
    "GradCAMPlusPlus",
    "LayerCAM",
    "ScoreCAM",
    "XGradCAM",
    "build_cam",
    "frozen_parameters",
    "normalize_maps",
    "register_method",
    "upsample_maps",
]

# Importing the family modules above registers their methods in METHODS.


def build_cam(name: str, model: nn.Module, layer: str, **kwargs: Any) -> CamMethod:
    """Build the registered CAM method ``name`` on ``model``'s ``layer`` (extra kwargs to its init)."""
    try:
        cls = METHODS[name]
    except KeyError:
        raise ValueError(f"unknown CAM method {name!r}; choose one of {', '.join(sorted(METHODS))}") from None
    return cls(model, layer, **kwargs)
