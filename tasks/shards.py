"""Splitting the images table into shards: deterministic, so a re-run finds its own files again.

Images are ordered by ``image_id`` (a hash of the path, so the order does not depend on how the
manifest was listed) and cut into consecutive chunks of ``shard_size``. Each shard carries a
fingerprint of the run and its image ids: a shard file on disk is reused only when its fingerprint
matches, so a changed dataset or config can never be mistaken for a finished shard.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc


@dataclass(frozen=True)
class ImageRef:
    image_id: str
    path: str
    label: str | None


@dataclass(frozen=True)
class Shard:
    index: int
    shard_id: str  # "shard-00000": the file name stem under explanations/
    fingerprint: str
    images: tuple[ImageRef, ...]

    @property
    def image_ids(self) -> list[str]:
        return [ref.image_id for ref in self.images]

    def __len__(self) -> int:
        return len(self.images)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def plan_shards(images: pa.Table, shard_size: int, *, run_id: str) -> list[Shard]:
    """Cut ``images`` (IMAGES schema) into shards of at most ``shard_size`` images.

    Same images + same ``shard_size`` + same ``run_id`` → same shards, same ids, same fingerprints,
    whatever the row order of ``images``.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if images.num_rows == 0:
        return []
    ids = images.column("image_id")
    if pc.count_distinct(ids).as_py() != images.num_rows:
        raise ValueError("images table has duplicate image_id values; read it with read_manifest")
    order = pc.sort_indices(ids)
    table = images.select(["image_id", "path", "label"]).take(order)
    refs = [ImageRef(r["image_id"], r["path"], r["label"]) for r in table.to_pylist()]
    shards = []
    for index, start in enumerate(range(0, len(refs), shard_size)):
        chunk = tuple(refs[start : start + shard_size])
        h = hashlib.sha256(run_id.encode("utf-8"))
        for ref in chunk:
            h.update(b"\0" + ref.image_id.encode("ascii") + b"\0" + (ref.label or "").encode("utf-8"))
            h.update(b"\0" + ref.path.encode("utf-8"))
        shards.append(Shard(index, shard_name(index), h.hexdigest()[:16], chunk))
    return shards
