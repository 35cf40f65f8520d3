"""The ``audit`` flow: explain every image of a dataset in words and flag spurious correlations.

    manifest → run dir → channel bank → shards → explain + validate each shard → DuckDB → flags → report

The flow only wires tasks; what each step does lives in ``tasks/`` (the run directory's layout in
:mod:`tasks.rundir`, its life cycle in :mod:`tasks.lifecycle`).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from tasks.calibrate import BankFiles, prepare_bank, probe_paths, runtime_spec
from tasks.config import AuditConfig, from_mapping
from tasks.explain_shard import RuntimeSpec, ShardFeed, ShardResult, explain_shard, finished_file
from tasks.flag_inputs import flag_run, training_images
from tasks.lifecycle import (
    RunInfo,
    ShardOutcome,
    Timer,
    class_list,
    commit_shard,
    run_log,
    start_run,
    summarise,
    sweep_stale,
    write_summary,
)
from tasks.manifest import Manifest, read_manifest
from tasks.quality import ValidationResult, validate_shard
from tasks.rundir import RunDir
from tasks.shards import Shard, plan_shards

#: Great Expectations' shared context is not thread-safe (building it concurrently fails with
#: "datasource already exists"), so validations in one process take turns; they cost milliseconds.
_GX_LOCK = threading.Lock()


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
    classes = class_list(cfg)
    manifest = read_manifest(cfg.data, classes=classes)
    get_run_logger().info(
        "manifest %s: %d rows → %d images, %d rejected",
        cfg.data,
        manifest.n_rows,
        manifest.n_images,
        manifest.errors.num_rows,
    )
    if cfg.flags.training_data is not None:  # read now: a bad path fails before the dataset is explained
        training = training_images(cfg)
        get_run_logger().info("training data %s: %d images read", cfg.flags.training_data, training.num_rows)
    return manifest


@task(name="start-run", cache_policy=NO_CACHE)
def start_run_task(cfg: AuditConfig, manifest: Manifest) -> RunInfo:
    run = start_run(cfg, manifest)
    get_run_logger().info("run %s → %s", run.run_id, run.run_dir)
    return run


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
    for moved in sweep_stale(run.run_dir, shards):
        get_run_logger().warning("moved stale %s to stale/", moved)
    return shards


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
    outcome = commit_shard(result, shard, run, _validate)
    get_run_logger().info(
        "%s %-11s %4d images → %5d rows, %3d errors, %6.2f s",
        shard.shard_id,
        outcome.status,
        result.n_images,
        result.n_rows if outcome.status != "quarantined" else 0,
        result.n_errors,
        result.seconds,
    )
    return outcome


# A module-level function: pickled by reference for Dask, unlike a task's own body (which would carry
# the lock by value). Great Expectations is imported at the first validation, not beside the first
# shard: on a busy CPU that import stalls the model passes for more than it costs alone.
def _validate(path: str) -> ValidationResult:
    with _GX_LOCK:
        return validate_shard(path)


def explain_and_validate(
    spec: RuntimeSpec,
    run: RunInfo,
    shard_size: int,
    batch_size: int,
    loader_workers: int,
    inline: bool = False,
) -> list[ShardOutcome]:
    """Explain and validate every shard, committing each as soon as it is explained.

    ``inline``: one shard after another in the calling flow's own thread, from one shared loader: with
    one shard at a time a worker thread gains nothing and slows the model passes, and validation
    (GIL-bound) beside them stalls them (``docs/decisions.md``, flow overhead). Otherwise the shards are
    submitted to the running flow's task runner (threads or Dask).

    The shards are planned again here from ``RUN_DIR/images.parquet`` (deterministic: the same plan as
    the parent's) instead of being passed in: the Prefect API stores flow-run parameters and refuses
    more than 512 kB, which a shard list passes at a few thousand images.
    """
    logger = get_run_logger()
    images = pq.read_table(RunDir(run.run_dir).images, columns=["image_id", "path", "label"])
    shards = plan_shards(images, shard_size, run_id=run.run_id)
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
    return outcomes


@flow(name="explain-shards", validate_parameters=False)
def explain_shards(
    spec: RuntimeSpec, run: RunInfo, shard_size: int, batch_size: int, loader_workers: int
) -> list[ShardOutcome]:
    """:func:`explain_and_validate` on this flow's task runner (shard workers: threads or Dask)."""
    return explain_and_validate(spec, run, shard_size, batch_size, loader_workers)


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
    frame = flag_run(cfg, run.run_dir, manifest, bank)
    get_run_logger().info("%d spurious-correlation candidates flagged", len(frame))
    return frame.to_dict(orient="records")


@task(name="intervene", cache_policy=NO_CACHE)
def intervene_task(run: RunInfo, refit: bool) -> int:
    from tasks.intervene import intervene_run

    frame = intervene_run(run.run_dir, refit=refit)
    get_run_logger().info("%d interventions: %s", len(frame), RunDir(run.run_dir).table("interventions"))
    return len(frame)


@task(name="render-report", cache_policy=NO_CACHE)
def render_report_task(run: RunInfo) -> str:
    from reports import render_report

    return str(render_report(run.run_dir))


# -- the flow ---------------------------------------------------------------------------------------


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
    args = (runtime_spec(cfg, bank), run, cfg.shard_size, cfg.batch_size, cfg.loader_workers)
    with timer.stage("explain"), _runner_environment(cfg):
        if cfg.runner == "default" and cfg.workers == 1:
            # One shard at a time needs no task runner: a nested flow run would only add its own
            # set-up and API calls (docs/decisions.md, flow overhead).
            outcomes = explain_and_validate(*args, inline=True)
        else:
            outcomes = explain_shards.with_options(task_runner=task_runner_for(cfg))(*args)
    return bank, outcomes


@flow(name="audit", validate_parameters=False)
def audit(config: dict[str, Any] | AuditConfig) -> dict[str, Any]:
    """Audit a dataset; returns the summary (also written to ``RUN_DIR/summary.json``).

    ``config`` is an :class:`AuditConfig` or its dict form (deployments pass the dict).
    """
    cfg = _execution_defaults(config if isinstance(config, AuditConfig) else from_mapping(config))
    timer = Timer()
    with timer.stage("manifest"):
        manifest = read_manifest_task(cfg)
        run = start_run_task(cfg, manifest)
    with run_log(run):
        bank, outcomes = explain_all(cfg, manifest, run, timer)
        with timer.stage("duckdb"):
            build_duckdb_task(run)
        with timer.stage("flags"):
            flags = flag_task(cfg, run, manifest, bank)
        if cfg.intervene and any(f["direction"] == "for" for f in flags):
            with timer.stage("intervene"):
                intervene_task(run, cfg.intervene_refit)
        summary = summarise(run, manifest, bank, outcomes, timer, len(flags))  # the report reads it
        with timer.stage("report"):
            report = render_report_task(run)
        write_summary(run, summary)  # now with the report's time
        publish(summary, flags, report)
        get_run_logger().info(summary["line"])
    if cfg.fail_on_quarantine and summary["shards"]["quarantined"]:
        raise RuntimeError(f"{len(summary['shards']['quarantined'])} shard(s) quarantined: see {run.run_dir}")
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
