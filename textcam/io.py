"""Atomic file writes: the one way TextCAM writes a file that a reader might open meanwhile.

``with atomic_path(target) as tmp: write(tmp)`` hands out a unique temporary name beside the target
(process id and a random suffix, so concurrent writers never collide), then fsyncs it and renames it
onto the target; on any error the temporary file is removed and the target is untouched.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TEMP_MARK = ".tmp-"  # every temporary name contains it (sweepers glob for it)


def temp_path(path: str | os.PathLike[str]) -> Path:
    """A unique hidden temporary name beside ``path``."""
    path = Path(path)
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def fsync_file(path: str | os.PathLike[str]) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write; on success fsync it and rename it onto ``path``."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def cache_root() -> Path:
    """Where TextCAM caches what it computes (banks, text embeddings, generated worlds):
    ``$TEXTCAM_CACHE``, else ``~/.cache/textcam``."""
    return Path(os.environ.get("TEXTCAM_CACHE", Path.home() / ".cache" / "textcam"))


def file_digest(path: str | os.PathLike[str], length: int = 16) -> str:
    """SHA-256 of a file's bytes, shortened; identifies local checkpoints by content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


def write_parquet(path: str | os.PathLike[str], table: Any) -> Path:
    """Atomically write an Arrow table to ``path`` (zstd), creating its folder."""
    import pyarrow.parquet as pq

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return Path(path)


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Atomically write ``text`` (UTF-8) to ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def read_phrase_list(path: str | os.PathLike[str]) -> list[str]:
    """The phrases a phrase-embedding file (``tasks.explain_shard.save_phrases``) lists in its header,
    without reading a tensor (and without torch)."""
    import json

    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return json.loads((f.metadata() or {})["phrases"])
