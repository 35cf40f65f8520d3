"""Cache directory resolution, config hashing and atomic writes for the synthetic world."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from textcam.io import cache_root, write_text


def default_cache_dir() -> Path:
    """``<cache root>/world`` (:func:`textcam.io.cache_root`)."""
    return cache_root() / "world"


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
