"""``flows.demo`` helpers that run without a trained world."""

from __future__ import annotations

from pathlib import Path

from flows.demo import set_aside_stale_run
from tasks.config import AuditConfig


def _config(run_dir: Path, clip: str) -> AuditConfig:
    # absolute paths, as the demo writes them (relative ones are resolved against the saved file)
    return AuditConfig(data=str(run_dir.parent / "m.parquet"), clip=clip, run_dir=str(run_dir))


def test_a_run_with_another_config_is_moved_aside_not_deleted(tmp_path: Path) -> None:
    run_dir = tmp_path / "biased"
    run_dir.mkdir()
    old = _config(run_dir, "local-dir:/old-clip")
    old.save(run_dir / "config.yaml")
    (run_dir / "flags.parquet").write_bytes(b"old results")

    assert set_aside_stale_run(old) is None  # same configuration: resumed in place
    assert (run_dir / "flags.parquet").is_file()

    moved = set_aside_stale_run(_config(run_dir, "local-dir:/new-clip"))
    assert moved == tmp_path / "biased.old-1"
    assert not run_dir.exists()
    assert (moved / "flags.parquet").read_bytes() == b"old results"

    run_dir.mkdir()
    old.save(run_dir / "config.yaml")
    assert set_aside_stale_run(_config(run_dir, "local-dir:/newer")) == tmp_path / "biased.old-2"


def test_no_previous_run_is_left_alone(tmp_path: Path) -> None:
    assert set_aside_stale_run(_config(tmp_path / "fresh", "x")) is None
    assert not (tmp_path / "fresh").exists()
