"""The ``audit`` flow: explain every image of a dataset in words and flag spurious correlations.

    manifest → run dir → channel bank → shards → explain + validate each shard → DuckDB → flags → report

Outputs (the run-directory contract)::

    RUN_DIR/config.yaml              the AuditConfig of the run
    RUN_DIR/images.parquet           IMAGES schema + metadata columns
    RUN_DIR/explanations/*.parquet   EXPLANATIONS, validated shards only
    RUN_DIR/errors/*.parquet         ERRORS: manifest rows, unreadable images, quarantined shards
    RUN_DIR/quarantine/              shards that failed validation, with the validation report
    RUN_DIR/run.duckdb, flags.parquet, report.html, summary.json

Resuming: shard files are the cache. Shard ids and fingerprints are deterministic, a finished
shard file is never rewritten, so a re-run after a crash computes only the missing shards and never
duplicates a row. ``run_id`` is a hash of the result-relevant config and the images, so the default
and the Dask runner (and a resumed run) write identical tables.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from tasks.calibrate import BankFiles, prepare_bank, probe_images, probe_paths
from tasks.config import AuditConfig, ConfigError, from_mapping
from tasks.explain_shard import (
    AtomicParquetWriter,
    RuntimeSpec,
    ShardFeed,
    ShardResult,
    explain_shard,
    finished_file,
    is_finished,
)
from tasks.manifest import Manifest, read_manifest
from tasks.quality import ValidationResult, prepare_validation, validate_shard, write_quality_report
from tasks.shards import Shard, plan_shards
from textcam.io import TEMP_MARK, write_text
from textcam.schema import ERRORS

#: Great Expectations' shared context is not thread-safe (building it concurrently fails with
#: "datasource already exists"), so validations in one process take turns; they cost milliseconds.
_GX_LOCK = threading.Lock()


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    run_dir: str


@dataclass(frozen=True)
class ShardOutcome:
    """A shard after validation: committed to explanations/ or quarantined."""

    result: ShardResult
    status: str  # "computed" | "reused" | "quarantined"
    path: str
    reason: str = ""


@dataclass
class Timer:
    """Wall-clock seconds per stage, in order."""

    stages: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = round(time.perf_counter() - t0, 3)


def _transient(exc: BaseException) -> bool:
    """Failures worth a retry: I/O hiccups, timeouts, GPU memory pressure; not bugs or bad config."""
    import torch

    return isinstance(exc, OSError | TimeoutError | ConnectionError | torch.cuda.OutOfMemoryError) and not (
        isinstance(exc, FileNotFoundError | PermissionError | NotADirectoryError | IsADirectoryError)
    )


def _retry_transient(task_: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except Exception as exc:  # the state's exception is what we classify, then let Prefect decide
        return _transient(exc)
    return False


# -- tasks ------------------------------------------------------------------------------------------


@task(name="read-manifest", cache_policy=NO_CACHE)
def read_manifest_task(cfg: AuditConfig) -> Manifest:
    classes = _class_list(cfg)
    manifest = read_manifest(cfg.data, classes=classes)
    get_run_logger().info(
        "manifest %s: %d rows → %d images, %d rejected",
        cfg.data,
        manifest.n_rows,
        manifest.n_images,
        manifest.errors.num_rows,
    )
    return manifest


def _class_list(cfg: AuditConfig) -> list[str] | None:
    if cfg.classes is None:
        return None
    if cfg.classes == "model":
        from textcam.models import load_model

        return load_model(cfg.model, weights=cfg.weights, device="cpu").class_names
    if isinstance(cfg.classes, str):
        path = Path(cfg.classes)
        if not path.is_file():
            raise ConfigError(f"classes: expected 'model', a list of names or a file, got {cfg.classes!r}")
        return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return list(cfg.classes)


def run_identity(cfg: AuditConfig, images: pa.Table) -> str:
    """``run-<hash>`` of the result-relevant config, the vocabulary's phrases and the images (ids,
    paths, labels). The phrases, not only their source names: an edited vocabulary file or built-in
    list must not reuse explanations made with the old one."""
    import hashlib

    from textcam.vocab import load_vocabulary

    h = hashlib.sha256(cfg.fingerprint().encode())
    h.update(json.dumps(load_vocabulary(list(cfg.vocab))).encode())
    table = images.select(["image_id", "path", "label"]).sort_by("image_id")
    for row in table.to_pylist():
        h.update(json.dumps([row["image_id"], row["path"], row["label"]]).encode())
    return "run-" + h.hexdigest()[:12]


@task(name="start-run", cache_policy=NO_CACHE)
def start_run(cfg: AuditConfig, manifest: Manifest) -> RunInfo:
    """Fix the run id and directory; write config.yaml, images.parquet and the manifest errors."""
    run_id = run_identity(cfg, manifest.images)
    run_dir = Path(cfg.run_dir.format(run_id=run_id, date=datetime.now(UTC).strftime("%Y%m%d"))).resolve()
    saved = run_dir / "config.yaml"
    if saved.is_file():
        from tasks.config import load_config

        previous = load_config(saved)
        if previous.fingerprint() != cfg.fingerprint():
            changed = sorted(k for k, v in cfg.content().items() if previous.content().get(k) != v)
            raise ConfigError(
                f"{run_dir} holds a run with a different configuration (changed: {changed}); "
                "choose another --run-dir or delete it"
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(saved)
    images = manifest.images.replace_schema_metadata(
        {**(manifest.images.schema.metadata or {}), b"textcam.run_id": run_id.encode()}
    )
    _write_atomic(images, run_dir / "images.parquet")
    errors = manifest.errors.set_column(
        0, "run_id", pa.array([run_id] * manifest.errors.num_rows, pa.string())
    )
    _write_atomic(errors.cast(ERRORS), run_dir / "errors" / "manifest.parquet")
    get_run_logger().info("run %s → %s", run_id, run_dir)
    return RunInfo(run_id, str(run_dir))


def _write_atomic(table: pa.Table, path: Path) -> None:
    writer = AtomicParquetWriter(path, table.schema, {})
    writer._writer.write_table(table)
    writer.rows = table.num_rows
    writer.commit()


@task(
    name="channel-bank",
    cache_policy=NO_CACHE,
    retries=1,
    retry_delay_seconds=2,
    retry_condition_fn=_retry_transient,
)
def channel_bank(cfg: AuditConfig, probe: Sequence[str], run: RunInfo) -> BankFiles:
    bank = prepare_bank(cfg, probe, run.run_dir)
    get_run_logger().info(
        "channel bank %s (%s, layer %s, %s): %s in %.1f s",
        bank.bank_id,
        bank.model_id,
        bank.layer,
        bank.clip_id,
        bank.source,
        bank.seconds,
    )
    return bank


@task(name="plan-shards", cache_policy=NO_CACHE)
def plan_shards_task(images: pa.Table, shard_size: int, run: RunInfo) -> list[Shard]:
    shards = plan_shards(images, shard_size, run_id=run.run_id)
    _sweep_stale(Path(run.run_dir), shards)
    return shards


def _sweep_stale(run_dir: Path, shards: Sequence[Shard]) -> None:
    """Before explaining: delete temp files of writers that were killed, and move shard files that
    belong to no planned shard out of the tables (to RUN_DIR/stale/). A ``-validate`` errors file is
    always moved: its shard was quarantined and is computed again now."""
    planned = {s.shard_id: s for s in shards}
    for folder in ("explanations", "staging", "errors"):
        for leftover in (run_dir / folder).glob(f".shard-*.parquet{TEMP_MARK}*"):
            leftover.unlink()
        for path in sorted((run_dir / folder).glob("shard-*.parquet")):
            shard_id = path.stem.removesuffix("-validate")
            shard = planned.get(shard_id)
            if shard is None or not is_finished(path, shard):
                target = run_dir / "stale" / folder / path.name
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)
                get_run_logger().warning("moved stale %s/%s to stale/", folder, path.name)


@task(
    name="explain-shard",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=_retry_transient,
    task_run_name="explain-{shard.shard_id}",
)
def explain_shard_task(
    spec: RuntimeSpec,
    shard: Shard,
    run: RunInfo,
    batch_size: int,
    loader_workers: int,
    feed: ShardFeed | None = None,
) -> ShardResult:
    # NO_CACHE: the shard files are the cache (checked inside), a Prefect result cache could outlive them.
    return explain_shard(
        spec, shard, run.run_dir, run.run_id, batch_size=batch_size, loader_workers=loader_workers, feed=feed
    )


@task(name="validate-shard", cache_policy=NO_CACHE, task_run_name="validate-{shard.shard_id}")
def validate_shard_task(result: ShardResult, shard: Shard, run: RunInfo) -> ShardOutcome:
    """Validate a staged shard; commit it to explanations/ or move it to quarantine/ with its report."""
    logger = get_run_logger()
    run_dir = Path(run.run_dir)
    final = run_dir / "explanations" / f"{shard.shard_id}.parquet"
    if result.path == str(final):
        outcome = ShardOutcome(result, "reused", str(final))
    else:
        validation = _validate(result.path)
        write_quality_report(run_dir, final, validation)
        if validation.ok:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(result.path, final)
            (run_dir / "errors" / f"{shard.shard_id}-validate.parquet").unlink(missing_ok=True)
            outcome = ShardOutcome(result, "reused" if result.reused else "computed", str(final))
        else:
            outcome = _quarantine(result, shard, run, validation)
    logger.info(
        "%s %-11s %4d images → %5d rows, %3d errors, %6.2f s",
        shard.shard_id,
        outcome.status,
        result.n_images,
        result.n_rows if outcome.status != "quarantined" else 0,
        result.n_errors,
        result.seconds,
    )
    return outcome


@task(name="prepare-validation", cache_policy=NO_CACHE)
def prepare_validation_task() -> None:
    """Build the Great Expectations context and suite (~3 s, mostly the import) while the first
    shard's model loads, instead of serially before the first shard's validation."""
    _prepare_validation()


# The two helpers below are module-level functions: pickled by reference for Dask, unlike a task's
# own body (which would carry the lock by value).
def _prepare_validation() -> None:
    with _GX_LOCK:
        prepare_validation("explanations")


def _validate(path: str) -> ValidationResult:
    with _GX_LOCK:
        return validate_shard(path)


def _quarantine(
    result: ShardResult, shard: Shard, run: RunInfo, validation: ValidationResult
) -> ShardOutcome:
    """Move a shard that failed validation to quarantine/ (with its report); its images become errors."""
    run_dir = Path(run.run_dir)
    folder = run_dir / "quarantine"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{shard.shard_id}.parquet"
    os.replace(result.path, target)
    (folder / f"{shard.shard_id}.validation.json").write_text(validation.to_json())
    reason = "; ".join(validation.failures)[:500] or "validation failed"
    failed_ids = set(pc.unique(pq.read_table(result.errors_path, columns=["image_id"]).column(0)).to_pylist())
    rows = [
        {
            "run_id": run.run_id,
            "image_id": ref.image_id,
            "path": ref.path,
            "stage": "validate",
            "reason": f"{shard.shard_id} failed validation: {reason}",
            "row": json.dumps({"image_id": ref.image_id, "path": ref.path, "label": ref.label}),
        }
        for ref in shard.images
        if ref.image_id not in failed_ids
    ]  # those are explain errors already
    _write_atomic(
        pa.Table.from_pylist(rows, schema=ERRORS), run_dir / "errors" / f"{shard.shard_id}-validate.parquet"
    )
    get_run_logger().error("%s quarantined: %s (report in %s)", shard.shard_id, reason, folder)
    return ShardOutcome(result, "quarantined", str(target), reason)


@flow(name="explain-shards", validate_parameters=False)
def explain_shards(
    spec: RuntimeSpec,
    run: RunInfo,
    shard_size: int,
    batch_size: int,
    loader_workers: int,
    inline: bool = False,
) -> list[ShardOutcome]:
    """Explain and validate every shard on this flow's task runner (threads or Dask).

    The shards are planned again here from ``RUN_DIR/images.parquet`` (deterministic: the same plan
    as the parent's) instead of being passed in: the Prefect API stores flow-run parameters and
    refuses more than 512 kB, which a shard list passes at a few thousand images.

    ``inline``: explain and validate the shards one after another in this flow's own thread. With
    one shard at a time there is nothing to gain from a worker thread, and the model passes run
    measurably faster in the thread that loaded the model (bench/audit.py: flow/loop 1.29 inline vs
    1.61-1.77 in a worker thread, 512 images). Validation is serial too: it is GIL-bound Python
    (pandas, Great Expectations), so beside the model passes it stalls them for more than its own
    0.3 s per shard (/tmp experiment, 1,000 images: flow/loop 1.152 with validation on a second
    thread, 1.085 with none).
    """
    logger = get_run_logger()
    images = pq.read_table(Path(run.run_dir) / "images.parquet", columns=["image_id", "path", "label"])
    shards = plan_shards(images, shard_size, run_id=run.run_id)
    warm_up = prepare_validation_task.submit()
    outcomes: list[ShardOutcome] = []
    pairs = []
    # Inline, the shards still to compute share one image loader (workers started once).
    feed = (
        ShardFeed(
            spec, [s for s in shards if finished_file(s, run.run_dir) is None], batch_size, loader_workers
        )
        if inline
        else None
    )
    progress = images_progress(sum(len(s) for s in shards))
    try:
        for i, shard in enumerate(shards, 1):  # a shard is committed as soon as it is explained
            if inline:  # a failure raises the shard's own error here; earlier shards are committed
                explained = explain_shard_task(spec, shard, run, batch_size, loader_workers, feed)
                outcomes.append(validate_shard_task(explained, shard, run))
                progress.update(len(shard))
                logger.debug("[%d/%d shards]", i, len(shards))
            else:
                explained = explain_shard_task.submit(spec, shard, run, batch_size, loader_workers)
                pairs.append((explained, validate_shard_task.submit(explained, shard, run)))
        for i, (explained, checked) in enumerate(pairs, 1):
            # The explain result first: a failed shard raises its own error (e.g. ENOSPC), where the
            # validation's result would only say that its upstream did not complete.
            explained.result()
            outcomes.append(checked.result())
            progress.update(len(shards[i - 1]))
            logger.debug("[%d/%d shards]", i, len(shards))
    finally:
        progress.close()
        if feed is not None:
            feed.close()
    warm_up.wait()
    return outcomes


def images_progress(total: int) -> Any:
    """One progress bar over the audited images (images/s, ETA) on stderr, updated per finished shard."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc="explain", mininterval=1.0, dynamic_ncols=True, leave=True)


@task(name="build-duckdb", cache_policy=NO_CACHE)
def build_duckdb_task(run: RunInfo) -> str:
    from tasks.store import build_duckdb

    return str(build_duckdb(run.run_dir))


@task(name="flag-spurious", cache_policy=NO_CACHE)
def flag_task(
    cfg: AuditConfig, run: RunInfo, manifest: Manifest, bank: BankFiles | None
) -> list[dict[str, Any]]:
    from tasks.flags import flag_spurious

    frame = flag_spurious(
        run.run_dir,
        _class_text(cfg, run, bank),
        _cooccurrence(bank),
        behaviour=_behaviour(cfg, manifest, bank),
        **cfg.extra.get("flags", {}),
    )
    get_run_logger().info("%d spurious-correlation candidates flagged", len(frame))
    return frame.to_dict(orient="records")


def _cooccurrence(bank: BankFiles | None) -> Any:
    """How visible each phrase is in the probe images of each predicted class (None: no probe set kept)."""
    from tasks.cooccurrence import cooccurrence
    from tasks.explain_shard import load_phrases
    from textcam.bank import ProbeSet

    if bank is None or bank.probe_path is None:
        return None
    probe = ProbeSet.load(bank.probe_path)
    if probe.clip_id != bank.clip_id:  # not the CLIP the phrases were embedded with
        get_run_logger().warning("probe set %s is from another CLIP: no data check", bank.probe_path)
        return None
    phrases, embeddings = load_phrases(bank.phrases_path)
    return cooccurrence(probe, phrases, embeddings)


def _behaviour(cfg: AuditConfig, manifest: Manifest, bank: BankFiles | None) -> Any:
    """What CLIP sees in each probe image, with the classifier's prediction and the true label where the
    manifest has one (:mod:`tasks.behaviour`); None without a probe set or with random CLIP weights."""
    from tasks.behaviour import probe_behaviour
    from tasks.explain_shard import load_phrases
    from textcam.bank import ProbeSet
    from textcam.clip import load_clip
    from textcam.models import load_model

    if bank is None or bank.probe_path is None:
        return None
    if not _trained_clip(cfg):
        return None  # random CLIP weights see nothing: no behaviour evidence
    probe = ProbeSet.load(bank.probe_path)
    if probe.clip_id != bank.clip_id:
        get_run_logger().warning("probe set %s is from another CLIP: no behaviour evidence", bank.probe_path)
        return None
    phrases, embeddings = load_phrases(bank.phrases_path)
    names = load_model(cfg.model, weights=cfg.weights, device="cpu").class_names
    index = {n: i for i, n in enumerate(names)}
    column = probe_images(cfg, manifest).column("label").to_pylist()
    labels = [index.get(str(v), -1) if v is not None else -1 for v in column]
    known = np.asarray(labels, dtype=np.int64)[probe.indices.numpy()]
    clip = load_clip(cfg.clip, cfg.clip_pretrained, device=cfg.device)
    class_embeddings = clip.encode_texts(
        list(names), cache_dir=cfg.resolved_cache_dir() if clip.cacheable else False
    )
    return probe_behaviour(
        probe.embeddings,
        probe.predictions,
        phrases,
        embeddings,
        known if (known >= 0).any() else None,
        class_embeddings=class_embeddings.cpu().to(probe.embeddings.dtype),
    )


def _class_text(cfg: AuditConfig, run: RunInfo, bank: BankFiles | None) -> Any:
    """CLIP text embeddings of the phrases (saved with the bank) and the predicted class names.

    The class names are encoded here, only those predicted in the run. With random CLIP weights a
    new process cannot reproduce the CLIP the phrases were embedded with, so the similarity test
    is switched off (``None``) rather than computed against an unrelated embedding space.
    """
    from tasks.explain_shard import load_text_embeddings
    from tasks.flags import ClassText
    from tasks.store import query
    from textcam.clip import load_clip

    if bank is None:  # nothing was explained: no phrases to judge
        return None
    if cfg.clip_pretrained is None and not cfg.clip.startswith("local-dir:"):
        get_run_logger().warning("random CLIP weights: phrases that describe their class are not excluded")
        return None
    names = query(run.run_dir, "SELECT DISTINCT pred_name FROM explanations ORDER BY 1")["pred_name"].tolist()
    embeddings = {text: emb.numpy() for text, emb in load_text_embeddings(bank.phrases_path).items()}
    if names:
        clip = load_clip(cfg.clip, cfg.clip_pretrained, device=cfg.device)
        encoded = clip.encode_texts(names, cache_dir=cfg.resolved_cache_dir() if clip.cacheable else False)
        embeddings.update(zip(names, encoded.cpu().numpy(), strict=True))
    return ClassText(embeddings=embeddings)


@task(name="intervene", cache_policy=NO_CACHE)
def intervene_task(run: RunInfo) -> int:
    from tasks.intervene import intervene_run

    frame = intervene_run(run.run_dir)
    get_run_logger().info("%d interventions: %s", len(frame), Path(run.run_dir) / "interventions.parquet")
    return len(frame)


@task(name="render-report", cache_policy=NO_CACHE)
def render_report_task(run: RunInfo) -> str:
    from reports import render_report

    return str(render_report(run.run_dir))


# -- the flow ---------------------------------------------------------------------------------------


def _trained_clip(cfg: AuditConfig) -> bool:
    """CLIP weights from a file, a pretrained tag or a local dir; random weights see nothing."""
    return cfg.clip_pretrained is not None or cfg.clip.startswith("local-dir:")


def runtime_spec(cfg: AuditConfig, bank: BankFiles) -> RuntimeSpec:
    check = cfg.check_phrases and _trained_clip(cfg)
    return RuntimeSpec(
        model=cfg.model,
        weights=cfg.weights,
        bank_path=bank.bank_path,
        phrases_path=bank.phrases_path,
        method=cfg.method,
        top_k=cfg.top_k,
        n_phrases=cfg.n_phrases,
        n_groups=cfg.n_groups,
        device=cfg.device,
        torch_threads=cfg.torch_threads,
        visibility_path=bank.visibility_path if check else None,
        clip=cfg.clip if check else None,
        clip_pretrained=cfg.clip_pretrained if check else None,
    )


def task_runner_for(cfg: AuditConfig) -> Any:
    """Threads in this process (default) or Dask: a local cluster of ``workers`` processes, or
    an existing scheduler at ``cfg.scheduler``."""
    if cfg.runner == "default":
        # One more thread than shard workers: validating shard i overlaps explaining shard i + 1.
        return ThreadPoolTaskRunner(max_workers=cfg.workers + 1)
    from prefect_dask import DaskTaskRunner

    if cfg.scheduler:
        return DaskTaskRunner(address=cfg.scheduler)
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": cfg.workers,
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": None,
        }
    )


@contextlib.contextmanager
def _runner_environment(cfg: AuditConfig) -> Iterator[None]:
    """Dask worker processes must be allowed children: the shard DataLoader forks decoding workers."""
    if cfg.runner != "dask":
        yield
        return
    import dask

    with dask.config.set({"distributed.worker.daemon": False}):
        yield


def _execution_defaults(cfg: AuditConfig) -> AuditConfig:
    if cfg.runner == "dask" and cfg.torch_threads is None and not cfg.scheduler:
        return cfg.replace(torch_threads=max(1, (os.cpu_count() or 1) // cfg.workers))
    return cfg


def explain_all(
    cfg: AuditConfig, manifest: Manifest, run: RunInfo, timer: Timer
) -> tuple[BankFiles | None, list[ShardOutcome]]:
    """Bank, shards, explanations; nothing when every manifest row was rejected (no probe images
    either), so such a run still records its errors and renders its report."""
    if manifest.n_images == 0:
        get_run_logger().warning("no usable image in %s: nothing to explain", cfg.data)
        return None, []
    with timer.stage("bank"):
        bank = channel_bank(cfg, probe_paths(cfg, manifest), run)
    with timer.stage("plan"):
        plan_shards_task(manifest.images, cfg.shard_size, run)  # sweeps what a killed run left
    with timer.stage("explain"), _runner_environment(cfg):
        outcomes = explain_shards.with_options(task_runner=task_runner_for(cfg))(
            runtime_spec(cfg, bank),
            run,
            cfg.shard_size,
            cfg.batch_size,
            cfg.loader_workers,
            inline=cfg.runner == "default" and cfg.workers == 1,
        )
    return bank, outcomes


@flow(name="audit", validate_parameters=False)
def audit(config: dict[str, Any] | AuditConfig) -> dict[str, Any]:
    """Audit a dataset; returns the summary (also written to ``RUN_DIR/summary.json``).

    ``config`` is an :class:`AuditConfig` or its dict form (deployments pass the dict).
    """
    logger = get_run_logger()
    cfg = _execution_defaults(config if isinstance(config, AuditConfig) else from_mapping(config))
    timer = Timer()
    with timer.stage("manifest"):
        manifest = read_manifest_task(cfg)
        run = start_run(cfg, manifest)
    bank, outcomes = explain_all(cfg, manifest, run, timer)
    with timer.stage("duckdb"):
        build_duckdb_task(run)
    with timer.stage("flags"):
        flags = flag_task(cfg, run, manifest, bank)
    if cfg.intervene and any(f["direction"] == "for" for f in flags):
        with timer.stage("intervene"):
            intervene_task(run)
    report = str(Path(run.run_dir) / "report.html")
    summarise(cfg, run, manifest, bank, outcomes, timer, report, len(flags))  # the report reads it
    with timer.stage("report"):
        report = render_report_task(run)
    summary = summarise(cfg, run, manifest, bank, outcomes, timer, report, len(flags))
    publish(summary, flags, report)
    logger.info(summary["line"])
    if cfg.fail_on_quarantine and summary["shards"]["quarantined"]:
        raise RuntimeError(f"{len(summary['shards']['quarantined'])} shard(s) quarantined: see {run.run_dir}")
    return summary


def summarise(
    cfg: AuditConfig,
    run: RunInfo,
    manifest: Manifest,
    bank: BankFiles | None,
    outcomes: Sequence[ShardOutcome],
    timer: Timer,
    report: str,
    n_flags: int,
) -> dict[str, Any]:
    """Counts that reconcile (rows in = explained + errors), timings, computed vs reused shards."""
    ok = [o for o in outcomes if o.status != "quarantined"]
    quarantined = [o for o in outcomes if o.status == "quarantined"]
    explained = sum(o.result.n_explained for o in ok)
    explain_errors = sum(o.result.n_errors for o in outcomes)
    quarantined_images = sum(o.result.n_explained for o in quarantined)
    errors = manifest.errors.num_rows + explain_errors + quarantined_images
    counts = {
        "rows_in": manifest.n_rows,
        "images": manifest.n_images,
        "explained_images": explained,
        "explanation_rows": sum(o.result.n_rows for o in ok),
        "errors": errors,
        "errors_by_stage": {
            "manifest": manifest.errors.num_rows,
            "explain": explain_errors,
            "validate": quarantined_images,
        },
        "flags": n_flags,
    }
    reconciled = counts["rows_in"] == explained + errors
    line = (
        f"{run.run_id}: {counts['rows_in']} rows in = {explained} explained + {errors} errors "
        f"({'reconciled' if reconciled else 'NOT RECONCILED'}); "
        f"{sum(o.status == 'computed' for o in outcomes)} shards computed, "
        f"{sum(o.status == 'reused' for o in outcomes)} reused, {len(quarantined)} quarantined; "
        f"{n_flags} flags; report {report}"
    )
    summary = {
        "run_id": run.run_id,
        "run_dir": run.run_dir,
        "dataset_root": str(manifest.root),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "counts": counts,
        "reconciled": reconciled,
        "timings_s": timer.stages,
        "shards": {
            "computed": [o.result.shard_id for o in outcomes if o.status == "computed"],
            "reused": [o.result.shard_id for o in outcomes if o.status == "reused"],
            "quarantined": [o.result.shard_id for o in quarantined],
            "seconds": {o.result.shard_id: round(o.result.seconds, 3) for o in outcomes},
        },
        "bank": asdict(bank) if bank is not None else None,
        "report": report,
        "line": line,
    }
    path = Path(run.run_dir) / "summary.json"
    write_text(path, json.dumps(summary, indent=2))
    return summary


def publish(summary: dict[str, Any], flags: list[dict[str, Any]], report: str) -> None:
    """Prefect artifacts: the flags table, a link to the report, the summary as markdown."""
    columns = ("class_name", "phrase", "direction", "z_lift", "p_value", "n_images", "frequency")
    table = [{k: _plain(f.get(k)) for k in columns} for f in flags[:200]]
    create_table_artifact(
        table=table or [dict.fromkeys(columns, "")],
        key="audit-flags",
        description=f"Spurious-correlation candidates of {summary['run_id']}",
    )
    create_link_artifact(
        link=Path(report).resolve().as_uri(),
        link_text="report.html",
        key="audit-report",
        description=f"HTML report of {summary['run_id']}",
    )
    c = summary["counts"]
    create_markdown_artifact(
        key="audit-summary",
        markdown=(
            f"### Audit {summary['run_id']}\n\n{summary['line']}\n\n"
            f"| rows in | explained | errors | explanation rows | flags |\n|---|---|---|---|---|\n"
            f"| {c['rows_in']} | {c['explained_images']} | {c['errors']} | {c['explanation_rows']} "
            f"| {c['flags']} |\n\nRun directory: `{summary['run_dir']}`\n"
        ),
    )


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float):
        return round(value, 4)
    return value


def run_audit(cfg: AuditConfig) -> dict[str, Any]:
    """Run the flow in this process (the CLI's entry point)."""
    return audit(cfg)
