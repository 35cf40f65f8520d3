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
  logs/                  library log lines kept off the terminal
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: Folders holding one Parquet file per shard, in the order a run writes them.
SHARD_FOLDERS = ("explanations", "staging", "errors")
#: Files next to ``bank.safetensors`` (in RUN_DIR/bank/ and in the bank cache).
PROBE_NAME = "probe.safetensors"
VISIBILITY_NAME = "visibility.safetensors"


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    def __fspath__(self) -> str:
        return str(self.root)

    # files
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def images(self) -> Path:
        return self.root / "images.parquet"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def database(self) -> Path:
        return self.root / "run.duckdb"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    def table(self, name: str) -> Path:
        """A table the analytics write as Parquet next to the database (``flags``, ``concept_stats``...)."""
        return self.root / f"{name}.parquet"

    # folders
    def folder(self, name: str) -> Path:
        """One of the run's folders (see the module docstring)."""
        return self.root / name

    @property
    def bank(self) -> Path:
        return self.root / "bank"

    @property
    def explanations(self) -> Path:
        return self.root / "explanations"

    @property
    def errors(self) -> Path:
        return self.root / "errors"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    @property
    def interventions(self) -> Path:
        return self.root / "interventions"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    # per shard
    def shard(self, folder: str, shard_id: str, suffix: str = "") -> Path:
        """``RUN_DIR/<folder>/<shard_id><suffix>.parquet``."""
        return self.root / folder / f"{shard_id}{suffix}.parquet"

    def shard_files(self, folder: str) -> list[Path]:
        return sorted((self.root / folder).glob("*.parquet"))

    def stale(self, folder: str, name: str) -> Path:
        return self.root / "stale" / folder / name

    # bank files
    @property
    def bank_file(self) -> Path:
        return self.bank / "bank.safetensors"

    @property
    def phrases_file(self) -> Path:
        return self.bank / "phrases.safetensors"

    @property
    def probe_file(self) -> Path:
        return self.bank / PROBE_NAME

    @property
    def visibility_file(self) -> Path:
        return self.bank / VISIBILITY_NAME
