"""The run directory's layout: every path an audit reads or writes is made here and nowhere else.

RUN_DIR/
  config.yaml            the validated AuditConfig the run used
  images.parquet         one row per image (IMAGES schema)
  summary.json           counts, timings, bank identity
  run.duckdb             views over the Parquet tables + concept_stats, flags, ...
  <table>.parquet        flags, flag_candidates, interventions, concept_stats
  report.html            the self-contained report
  bank/                  bank.safetensors, phrases.safetensors, probe.safetensors
  explanations/          <shard>.parquet, written only after validation
  errors/                <shard>.parquet, <shard>-validate.parquet, manifest.parquet
  staging/               <shard>.parquet waiting for validation
  quarantine/            shards that failed validation, with their report
  quality/               validation reports
  stale/                 files of earlier runs that no longer match the manifest
  interventions/         edited checkpoints
  logs/audit.log         every log line of the run, libraries' included (the terminal shows ours)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: Folders holding one Parquet file per shard, in the order a run writes them.
SHARD_FOLDERS = ("explanations", "staging", "errors")
#: Files next to ``bank.safetensors`` (in RUN_DIR/bank/ and in the bank cache).
PROBE_NAME = "probe.safetensors"
VISIBILITY_NAME = "visibility.safetensors"


def _at(*parts: str) -> property:
    """A fixed path inside the run directory."""
    return property(lambda self: self.root.joinpath(*parts), doc="RUN_DIR/" + "/".join(parts))


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    def __fspath__(self) -> str:
        return str(self.root)

    config = _at("config.yaml")
    images = _at("images.parquet")
    summary = _at("summary.json")
    database = _at("run.duckdb")
    report = _at("report.html")
    bank = _at("bank")
    explanations = _at("explanations")
    errors = _at("errors")
    quarantine = _at("quarantine")
    interventions = _at("interventions")
    logs = _at("logs")
    log_file = _at("logs", "audit.log")
    bank_file = _at("bank", "bank.safetensors")
    phrases_file = _at("bank", "phrases.safetensors")
    probe_file = _at("bank", PROBE_NAME)
    visibility_file = _at("bank", VISIBILITY_NAME)

    def table(self, name: str) -> Path:
        """A table the analytics write as Parquet next to the database (``flags``, ``concept_stats``...)."""
        return self.root / f"{name}.parquet"

    def folder(self, name: str) -> Path:
        """One of the run's folders (see the module docstring)."""
        return self.root / name

    def shard(self, folder: str, shard_id: str, suffix: str = "") -> Path:
        """``RUN_DIR/<folder>/<shard_id><suffix>.parquet``."""
        return self.root / folder / f"{shard_id}{suffix}.parquet"

    def shard_files(self, folder: str) -> list[Path]:
        return sorted((self.root / folder).glob("*.parquet"))

    def stale(self, folder: str, name: str) -> Path:
        return self.root / "stale" / folder / name
