"""A run's life on disk: its identity, its start, stale shard files, committing or quarantining a
validated shard, and the summary that reconciles the counts.

Resuming: shard files are the cache. Shard ids and fingerprints are deterministic and a finished shard
file is never rewritten, so a re-run after a crash computes only the missing shards and never duplicates
a row. ``run_id`` hashes the result-relevant config, the vocabulary's phrases and the images, so every
runner (and a resumed run) writes identical tables.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.calibrate import BankFiles
from tasks.config import AuditConfig, ConfigError
from tasks.explain_shard import ShardResult, is_finished
from tasks.manifest import Manifest
from tasks.quality import ValidationResult, write_quality_report
from tasks.rundir import SHARD_FOLDERS, RunDir
from tasks.shards import Shard
from textcam.io import TEMP_MARK, write_parquet, write_text
from textcam.schema import ERRORS, error_row

log = logging.getLogger(__name__)


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


def class_list(cfg: AuditConfig) -> list[str] | None:
    """The class names the manifest's labels must come from (None: any label)."""
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
    from textcam.vocab import load_vocabulary

    h = hashlib.sha256(cfg.fingerprint().encode())
    h.update(json.dumps(load_vocabulary(list(cfg.vocab))).encode())
    table = images.select(["image_id", "path", "label"]).sort_by("image_id")
    for row in table.to_pylist():
        h.update(json.dumps([row["image_id"], row["path"], row["label"]]).encode())
    return "run-" + h.hexdigest()[:12]


def start_run(cfg: AuditConfig, manifest: Manifest) -> RunInfo:
    """Fix the run id and directory; write config.yaml, images.parquet and the manifest's errors.

    A directory holding a run with another configuration is refused, naming the changed keys."""
    run_id = run_identity(cfg, manifest.images)
    run = RunDir(Path(cfg.run_dir.format(run_id=run_id, date=datetime.now(UTC).strftime("%Y%m%d"))).resolve())
    if run.config.is_file():
        from tasks.config import load_config

        previous = load_config(run.config)
        if previous.fingerprint() != cfg.fingerprint():
            changed = sorted(k for k, v in cfg.content().items() if previous.content().get(k) != v)
            raise ConfigError(
                f"{run.root} holds a run with a different configuration (changed: {changed}); "
                "choose another --run-dir or delete it"
            )
    run.root.mkdir(parents=True, exist_ok=True)
    cfg.save(run.config)
    images = manifest.images.replace_schema_metadata(
        {**(manifest.images.schema.metadata or {}), b"textcam.run_id": run_id.encode()}
    )
    write_parquet(run.images, images)
    errors = manifest.errors.set_column(
        0, "run_id", pa.array([run_id] * manifest.errors.num_rows, pa.string())
    )
    write_parquet(run.shard("errors", "manifest"), errors.cast(ERRORS))
    return RunInfo(run_id, str(run.root))


@contextlib.contextmanager
def run_log(run: RunInfo) -> Iterator[Path]:
    """Every record that reaches the root logger during the run, libraries' included, goes to
    ``RUN_DIR/logs/audit.log``; what the terminal shows is up to its own handlers (``textcam.cli``)."""
    path = RunDir(run.run_dir).log_file
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        handler.close()


def sweep_stale(run_dir: str | Path, shards: Sequence[Shard]) -> list[str]:
    """Before explaining: delete temp files of writers that were killed, and move shard files that
    belong to no planned shard out of the tables (to RUN_DIR/stale/). A ``-validate`` errors file is
    always moved: its shard was quarantined and is computed again now. Returns what was moved."""
    run = RunDir(run_dir)
    planned = {s.shard_id: s for s in shards}
    moved = []
    for folder in SHARD_FOLDERS:
        for leftover in run.folder(folder).glob(f".shard-*.parquet{TEMP_MARK}*"):
            leftover.unlink()
        for path in sorted(run.folder(folder).glob("shard-*.parquet")):
            shard = planned.get(path.stem.removesuffix("-validate"))
            if shard is None or not is_finished(path, shard):
                target = run.stale(folder, path.name)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)
                moved.append(f"{folder}/{path.name}")
    return moved


def commit_shard(
    result: ShardResult, shard: Shard, run: RunInfo, validate: Callable[[str], ValidationResult]
) -> ShardOutcome:
    """Validate a staged shard; move it to explanations/ or, failing, to quarantine/ with its report."""
    rundir = RunDir(run.run_dir)
    final = rundir.shard("explanations", shard.shard_id)
    if result.path == str(final):
        return ShardOutcome(result, "reused", str(final))
    validation = validate(result.path)
    write_quality_report(rundir.root, final, validation)
    if not validation.ok:
        return _quarantine(result, shard, run, validation)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(result.path, final)
    rundir.shard("errors", shard.shard_id, "-validate").unlink(missing_ok=True)
    return ShardOutcome(result, "reused" if result.reused else "computed", str(final))


def _quarantine(
    result: ShardResult, shard: Shard, run: RunInfo, validation: ValidationResult
) -> ShardOutcome:
    """Move a shard that failed validation to quarantine/ (with its report); its images become errors."""
    rundir = RunDir(run.run_dir)
    target = rundir.shard("quarantine", shard.shard_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(result.path, target)
    write_text(target.with_suffix(".validation.json"), validation.to_json())
    reason = "; ".join(validation.failures)[:500] or "validation failed"
    failed_ids = set(pc.unique(pq.read_table(result.errors_path, columns=["image_id"]).column(0)).to_pylist())
    why = f"{shard.shard_id} failed validation: {reason}"
    rows = [
        error_row(
            run.run_id,
            r.image_id,
            r.path,
            "validate",
            why,
            {"image_id": r.image_id, "path": r.path, "label": r.label},
        )
        for r in shard.images
        if r.image_id not in failed_ids  # those are explain errors already
    ]
    write_parquet(
        rundir.shard("errors", shard.shard_id, "-validate"), pa.Table.from_pylist(rows, schema=ERRORS)
    )
    log.error("%s quarantined: %s (report in %s)", shard.shard_id, reason, rundir.quarantine)
    return ShardOutcome(result, "quarantined", str(target), reason)


def summarise(
    run: RunInfo,
    manifest: Manifest,
    bank: BankFiles | None,
    outcomes: Sequence[ShardOutcome],
    timer: Timer,
    n_flags: int,
) -> dict[str, Any]:
    """Counts that reconcile (rows in = explained + errors), timings, computed vs reused shards; written
    to ``RUN_DIR/summary.json`` (the report reads it)."""
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
    report = str(RunDir(run.run_dir).report)
    by_status = {s: [o.result.shard_id for o in outcomes if o.status == s] for s in ("computed", "reused")}
    line = (
        f"{run.run_id}: {counts['rows_in']} rows in = {explained} explained + {errors} errors "
        f"({'reconciled' if reconciled else 'NOT RECONCILED'}); "
        f"{len(by_status['computed'])} shards computed, {len(by_status['reused'])} reused, "
        f"{len(quarantined)} quarantined; {n_flags} flags; report {report}"
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
            **by_status,
            "quarantined": [o.result.shard_id for o in quarantined],
            "seconds": {o.result.shard_id: round(o.result.seconds, 3) for o in outcomes},
        },
        "bank": asdict(bank) if bank is not None else None,
        "report": report,
        "line": line,
    }
    write_summary(run, summary)
    return summary


def write_summary(run: RunInfo, summary: dict[str, Any]) -> None:
    write_text(RunDir(run.run_dir).summary, json.dumps(summary, indent=2))
