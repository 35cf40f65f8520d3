"""The ground-truth world: a CLEVR-like scene generator with known attributes and planted biases,
its own tiny CLIP (an open_clip model) and a small CNN to audit.

Entry point::

    from textcam.synthetic import WorldConfig, build_world
    world = build_world(WorldConfig.demo())      # cached under ~/.cache/textcam/world

Names are resolved lazily so ``import textcam.synthetic`` loads neither torch nor open_clip.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "WorldConfig": "textcam.synthetic.config",
    "ClassifierTrainConfig": "textcam.synthetic.config",
    "ClipTrainConfig": "textcam.synthetic.tiny_clip",
    "SceneConfig": "textcam.synthetic.scenes",
    "BiasSpec": "textcam.synthetic.bias",
    "BiasSpecError": "textcam.synthetic.bias",
    "World": "textcam.synthetic.world",
    "build_world": "textcam.synthetic.world",
    "load_tiny_clip": "textcam.synthetic.tiny_clip",
    "build_classifier": "textcam.synthetic.classifier",
    "generate": "textcam.synthetic.scenes",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'textcam.synthetic' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
