"""Cache directory resolution, config hashing and atomic writes for the synthetic world."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from textcam.io import atomic_path, write_text

CACHE_ENV = "TEXTCAM_CACHE"


def default_cache_dir() -> Path:
    """``$TEXTCAM_CACHE/world`` when the variable is set, else ``~/.cache/textcam/world``."""
    root = os.environ.get(CACHE_ENV)
    return (Path(root) if root else Path.home() / ".cache" / "textcam") / "world"


def resolve_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    """An explicit directory wins over the environment and the default."""
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def config_hash(obj: Any, length: int = 12) -> str:
    """Stable short hash of a JSON-able object (sorted keys, so dict order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def write_json(path: Path, obj: Any) -> None:
    """Write JSON through a temporary file and rename, so readers never see half a file."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Atomic ``torch.save`` of a training state (tensors, dicts, numbers only)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: Path) -> dict[str, Any] | None:
    """Load a training state saved by :func:`save_state`, or ``None`` when there is none."""
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)
