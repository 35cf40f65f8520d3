"""Explaining one shard: batched model passes over a DataLoader, rows streamed to an atomic Parquet file.

The heavy objects (classifier, channel bank, phrase embeddings, the :class:`~textcam.explain.Explainer`)
are built once per worker process and kept in :data:`_RUNTIMES`, a cache keyed by the frozen
:class:`RuntimeSpec`. That dictionary is the only module-level mutable state: it holds nothing
but pure functions of its keys, so a task never sees anything its arguments did not determine.
A lock per runtime serialises model passes when several shard tasks share a process (threads).

Files written per shard (under the run directory)::

    staging/shard-00000.parquet        explanations, until validated (then moved to explanations/)
    errors/shard-00000.parquet         images of the shard that could not be explained (stage "explain")

Each Parquet file carries the shard's fingerprint in its key-value metadata; a file whose
fingerprint matches the planned shard is finished work and is reused instead of recomputed.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from tasks.rundir import RunDir
from tasks.shards import Shard
from textcam.data import iter_batch_groups, iter_batches
from textcam.device import resolve_device
from textcam.io import atomic_path, fsync_file, temp_path
from textcam.schema import ERRORS, EXPLANATIONS, error_row

if TYPE_CHECKING:
    from textcam.clip import ClipEncoder
    from textcam.explain import Explainer
    from textcam.models import LoadedModel
    from textcam.visibility import PhraseVisibility

log = logging.getLogger(__name__)

FINGERPRINT_KEY = b"textcam.shard_fingerprint"
COUNTS_KEY = b"textcam.shard_counts"


@dataclass(frozen=True)
class RuntimeSpec:
    """Everything needed to rebuild the explainer in any process; hashable (the cache key)."""

    model: str
    weights: str
    bank_path: str
    phrases_path: str
    method: str = "gradcam"
    top_k: int = 1
    n_phrases: int = 5
    n_groups: int = 3
    device: str = "auto"
    torch_threads: int | None = None
    # Check each image's phrases with CLIP (textcam.visibility): the fitted mixtures and the CLIP to load.
    visibility_path: str | None = None
    clip: str | None = None
    clip_pretrained: str | None = None


@dataclass
class Runtime:
    model: LoadedModel
    explainer: Explainer
    bank_id: str
    clip_id: str
    layer: str
    device: torch.device
    lock: threading.Lock
    clip: ClipEncoder | None = None
    visibility: PhraseVisibility | None = None


@dataclass(frozen=True)
class ShardResult:
    """What a shard task returns: counts and file paths only, never the rows."""

    shard_id: str
    path: str  # the explanations file (staging or final)
    errors_path: str
    n_images: int
    n_explained: int  # images with at least one explanation row
    n_rows: int
    n_errors: int
    seconds: float
    reused: bool


#: Per-process cache of loaded runtimes (see the module docstring).
_RUNTIMES: dict[RuntimeSpec, Runtime] = {}
_RUNTIMES_LOCK = threading.Lock()


def load_phrases(path: str | os.PathLike[str]) -> tuple[list[str], torch.Tensor]:
    """Read a phrase-embedding file written by :func:`save_phrases`."""
    from safetensors.torch import load_file

    from textcam.io import read_phrase_list

    return read_phrase_list(path), load_file(str(path))["embeddings"]


def save_phrases(
    path: str | os.PathLike[str],
    phrases: list[str],
    embeddings: torch.Tensor,
    clip_id: str,
    class_names: list[str] | None = None,
    class_embeddings: torch.Tensor | None = None,
) -> Path:
    """Write phrases + (P, D) embeddings (and the class names' embeddings) to one safetensors file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"embeddings": embeddings.detach().cpu().float().contiguous()}
    meta = {"phrases": json.dumps(phrases), "clip_id": clip_id, "class_names": json.dumps(class_names or [])}
    if class_embeddings is not None:
        tensors["class_embeddings"] = class_embeddings.detach().cpu().float().contiguous()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def load_text_embeddings(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Text → embedding for every phrase and class name in a file written by :func:`save_phrases`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    tensors = load_file(str(path))
    out = dict(zip(json.loads(meta["phrases"]), tensors["embeddings"], strict=True))
    if "class_embeddings" in tensors:
        out.update(zip(json.loads(meta["class_names"]), tensors["class_embeddings"], strict=True))
    return out


def get_runtime(spec: RuntimeSpec) -> Runtime:
    """The runtime for ``spec`` in this process, built on first use."""
    with _RUNTIMES_LOCK:
        runtime = _RUNTIMES.get(spec)
        if runtime is None:
            runtime = _build_runtime(spec)
            _RUNTIMES[spec] = runtime
        return runtime


def clear_runtimes() -> None:
    """Drop every cached runtime in this process (tests, benchmarks)."""
    with _RUNTIMES_LOCK:
        _RUNTIMES.clear()


def _build_runtime(spec: RuntimeSpec) -> Runtime:
    from textcam.bank import ChannelBank
    from textcam.explain import Explainer
    from textcam.models import load_model

    t0 = time.perf_counter()
    if spec.torch_threads:
        torch.set_num_threads(spec.torch_threads)
    device = resolve_device(spec.device)
    model = load_model(spec.model, weights=spec.weights, device=str(device))
    phrases, embeddings = load_phrases(spec.phrases_path)
    bank = ChannelBank.load(spec.bank_path, model_id=model.model_id)
    settings = {k: getattr(spec, k) for k in ("method", "top_k", "n_phrases", "n_groups")}
    explainer = Explainer(model, bank, phrases, embeddings, **settings, device=device)
    clip = visibility = None
    if spec.visibility_path is not None and spec.clip is not None:
        from textcam.clip import load_clip
        from textcam.visibility import PhraseVisibility

        clip = load_clip(spec.clip, spec.clip_pretrained, device=device)
        visibility = PhraseVisibility.load(spec.visibility_path)
    log.info(
        "loaded %s + bank %s in %.1f s (pid %d)",
        model.model_id,
        bank.bank_id,
        time.perf_counter() - t0,
        os.getpid(),
    )
    return Runtime(
        model, explainer, bank.bank_id, bank.clip_id, bank.layer, device, threading.Lock(), clip, visibility
    )


# -- Parquet files --------------------------------------------------------------------------------


def _file_metadata(path: str | os.PathLike[str]) -> dict[bytes, bytes]:
    return pq.ParquetFile(path).metadata.metadata or {}


def read_fingerprint(path: str | os.PathLike[str]) -> str | None:
    """The shard fingerprint in a Parquet file's footer, or None when absent or unreadable."""
    try:
        value = _file_metadata(path).get(FINGERPRINT_KEY)
    except (OSError, pa.ArrowInvalid):
        return None
    return value.decode() if value else None


def read_counts(path: str | os.PathLike[str]) -> dict[str, int]:
    """The counts written at commit time (n_images, n_explained, n_rows, n_errors)."""
    return json.loads(_file_metadata(path).get(COUNTS_KEY, b"{}"))


def is_finished(path: str | os.PathLike[str], shard: Shard) -> bool:
    """A Parquet file that exists, is readable to its footer, and belongs to this planned shard."""
    return Path(path).is_file() and read_fingerprint(path) == shard.fingerprint


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicParquetWriter:
    """Write batches to a temporary name (:func:`textcam.io.temp_path`); on :meth:`commit` fsync and
    rename onto ``path``.

    A crash at any point leaves either no file at ``path`` or the complete previous one.
    """

    def __init__(self, path: str | os.PathLike[str], schema: pa.Schema, metadata: dict[bytes, bytes]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temp_path(self.path)
        self.schema = schema.with_metadata({**(schema.metadata or {}), **metadata})
        self._writer = pq.ParquetWriter(self.tmp, self.schema, compression="zstd")
        self.rows = 0

    def write(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            self._writer.write_table(pa.Table.from_pylist(rows, schema=self.schema))
            self.rows += len(rows)

    def commit(self, extra_metadata: dict[bytes, bytes] | None = None) -> Path:
        if extra_metadata:
            for key, value in extra_metadata.items():
                self._writer.add_key_value_metadata({key: value})
        self._writer.close()
        fsync_file(self.tmp)
        os.replace(self.tmp, self.path)
        _fsync_dir(self.path.parent)
        return self.path

    def abort(self) -> None:
        self._writer.close()
        self.tmp.unlink(missing_ok=True)


# -- the shard ------------------------------------------------------------------------------------


def transforms_for(runtime: Runtime) -> list[Any]:
    """The classifier's preprocessing, and CLIP's when the runtime checks phrases against the image."""
    return [runtime.model.preprocess] + ([runtime.clip.preprocess] if runtime.clip is not None else [])


def _batches(shard: Shard, runtime: Runtime, batch_size: int, loader_workers: int) -> Iterator[Any]:
    yield from iter_batches(
        [ref.path for ref in shard.images],
        transforms_for(runtime),
        batch_size=batch_size,
        num_workers=min(loader_workers, max(1, len(shard) // batch_size)) if loader_workers else 0,
        pin_memory=runtime.device.type == "cuda",
    )


class ShardFeed:
    """The batches of several shards, explained one after another in this process, from one loader.

    A loader per shard forks its workers and refills its pipeline at every shard; here the workers
    start once (``docs/decisions.md``, flow overhead). Shards must be taken in
    the order given; any other request (a retried shard, a shard taken out of turn, one after a shard
    that stopped half-way) gets ``None`` and reads with a loader of its own, as without a feed.
    """

    def __init__(
        self, spec: RuntimeSpec, shards: Sequence[Shard], batch_size: int, loader_workers: int
    ) -> None:
        self._spec = spec
        self._shards = list(shards)
        self._batch_size = batch_size
        self._loader_workers = loader_workers
        self._next = 0  # index of the shard to be taken next
        self._left = 0  # batches of the current shard not yet taken from the stream
        self._stream: Iterator[tuple[int, Any]] | None = None

    def take(self, shard: Shard) -> Iterator[Any] | None:
        """The batches of ``shard`` if it is next in the feed, else ``None``."""
        # not next: out of turn, a retry, or the previous shard stopped half-way (batches left)
        ids = [s.shard_id for s in self._shards[self._next : self._next + 1]]
        if self._left or ids != [shard.shard_id]:
            self.close()
            return None
        if self._stream is None:
            runtime = get_runtime(self._spec)
            self._stream = iter_batch_groups(
                [[ref.path for ref in s.images] for s in self._shards],
                transforms_for(runtime),
                batch_size=self._batch_size,
                num_workers=self._loader_workers,
                pin_memory=runtime.device.type == "cuda",
            )
        self._next += 1
        self._left = -(-len(shard) // self._batch_size)
        return self._group(self._next - 1)

    def _group(self, k: int) -> Iterator[Any]:
        assert self._stream is not None  # set by take()
        while self._left:
            group, batch = next(self._stream)
            if group != k:  # cannot happen: the stream's batches follow the shards
                raise RuntimeError(f"shard feed out of step: batch of shard {group} for shard {k}")
            self._left -= 1
            yield batch

    def close(self) -> None:
        """Stop the loader workers; later ``take`` calls return ``None``."""
        self._next = len(self._shards)
        self._left = 0
        if self._stream is not None:
            self._stream.close()  # ends the DataLoader iteration: its workers shut down
            self._stream = None


def _explain(runtime: Runtime, pixels: torch.Tensor, clip_pixels: Sequence[torch.Tensor]) -> list[Any]:
    """Explanations of a batch; with a CLIP in the runtime, each "for" and nearest phrase marked seen or not
    (and each "for" phrase shown or not)."""
    eb = runtime.explainer.explain_tensors(pixels)
    shown = seen = near_seen = None
    if runtime.clip is not None and runtime.visibility is not None and clip_pixels:
        with torch.no_grad():
            emb = runtime.clip.encode_images(clip_pixels[0]).cpu().repeat_interleave(eb.targets.shape[1], 0)
        sel, k = eb.phrases_for, eb.phrases_for.indices.shape[1]
        # one presence pass for the selected and the nearest phrases
        both = runtime.visibility.seen(emb, torch.cat([sel.indices, eb.phrases_near.indices], 1))
        seen, near_seen = both[:, :k], both[:, k:]
        shown = seen & runtime.visibility.strong(sel.scores)
    return runtime.explainer.to_explanations(eb, shown, seen, near_seen)


def finished_file(shard: Shard, run_dir: str | os.PathLike[str]) -> Path | None:
    """The shard's finished explanations file (validated in ``explanations/``, or written to
    ``staging/``) with its errors file, or ``None`` when the shard must be computed."""
    run = RunDir(run_dir)
    if not is_finished(run.shard("errors", shard.shard_id), shard):
        return None
    for folder in ("explanations", "staging"):
        candidate = run.shard(folder, shard.shard_id)
        if is_finished(candidate, shard):
            return candidate
    return None


def explain_shard(
    spec: RuntimeSpec,
    shard: Shard,
    run_dir: str | os.PathLike[str],
    run_id: str,
    *,
    batch_size: int = 32,
    loader_workers: int = 2,
    feed: ShardFeed | None = None,
) -> ShardResult:
    """Explain every image of ``shard`` and write its explanations and errors files (``feed``: read the
    images from a :class:`ShardFeed` when it holds them next).

    Skips the work when a finished file for this shard (same fingerprint) exists in ``explanations/``
    (validated) or ``staging/`` (not yet validated). Unreadable images become rows of the errors file
    (stage ``explain``); any other exception propagates, so the task fails (and is retried) without
    leaving a partial file behind."""
    run = RunDir(run_dir)
    staged, errors_path = run.shard("staging", shard.shard_id), run.shard("errors", shard.shard_id)
    t0 = time.perf_counter()
    done = finished_file(shard, run_dir)
    if done is not None:
        counts = read_counts(done)
        n = (counts.get(k, 0) for k in ("n_explained", "n_rows", "n_errors"))
        return ShardResult(
            shard.shard_id, str(done), str(errors_path), len(shard), *n, time.perf_counter() - t0, reused=True
        )
    runtime = get_runtime(spec)
    meta = {
        FINGERPRINT_KEY: shard.fingerprint.encode(),
        b"textcam.shard_id": shard.shard_id.encode(),
        b"textcam.run_id": run_id.encode(),
    }
    writer = AtomicParquetWriter(staged, EXPLANATIONS, meta)
    try:
        batches = (feed.take(shard) if feed is not None else None) or _batches(
            shard, runtime, batch_size, loader_workers
        )
        explained, error_rows = _write_explanations(runtime, shard, run_id, batches, writer)
        counts = {"n_images": len(shard), "n_explained": explained, "n_rows": writer.rows}
        blob = {COUNTS_KEY: json.dumps({**counts, "n_errors": len(error_rows)}).encode()}
        # Errors first: the explanations file is the commit point that marks the shard as done.
        err_writer = AtomicParquetWriter(errors_path, ERRORS, meta)
        err_writer.write(error_rows)
        err_writer.commit(blob)
        writer.commit(blob)
    except BaseException:
        writer.abort()
        raise
    return ShardResult(
        shard.shard_id,
        str(staged),
        str(errors_path),
        len(shard),
        explained,
        writer.rows,
        len(error_rows),
        time.perf_counter() - t0,
        reused=False,
    )


def _write_explanations(
    runtime: Runtime, shard: Shard, run_id: str, batches: Iterator[Any], writer: AtomicParquetWriter
) -> tuple[int, list[dict[str, Any]]]:
    """Explain each batch and write its rows; returns the images explained and the error rows of the
    images that could not be read."""
    constant = {
        "run_id": run_id,
        "model_id": runtime.model.model_id,
        "layer": runtime.layer,
        "bank_id": runtime.bank_id,
        "clip_id": runtime.clip_id,
    }
    error_rows: list[dict[str, Any]] = []
    explained = 0
    for batch in batches:
        for index, reason in batch.failed:
            ref = shard.images[index]
            record = {"image_id": ref.image_id, "path": ref.path, "label": ref.label}
            error_rows.append(error_row(run_id, ref.image_id, ref.path, "explain", reason, record))
        if not batch.indices.numel():
            continue
        pixels = batch.tensors[0].to(runtime.device, non_blocking=True)
        with runtime.lock:
            explanations = _explain(runtime, pixels, batch.tensors[1:])
        per_image = len(explanations) // batch.indices.numel()
        rows = []
        for k, expl in enumerate(explanations):
            ref = shard.images[int(batch.indices[k // per_image])]
            rows.append(
                {
                    **constant,
                    "image_id": ref.image_id,
                    "path": ref.path,
                    "label": ref.label,
                    **expl.to_record(),
                }
            )
        writer.write(rows)
        explained += batch.indices.numel()
    return explained, error_rows
