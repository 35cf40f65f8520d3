"""``bench/scale.py``'s simulated run directories stay valid against the declared schemas, and its
planted cues are found, at a size a test can afford (the bench itself runs at 100k–1M images)."""

from __future__ import annotations

from pathlib import Path

from benches import load_bench


def test_a_small_simulated_run_validates_and_its_cues_are_first(tmp_path: Path) -> None:
    scale = load_bench("scale")
    run_dir = tmp_path / "sim"
    scale.simulate(run_dir, n_images=3000, n_classes=6, n_phrases=40, n_cues=2)
    valid = scale.run_stage("validate", run_dir, 6, 40, 2)
    assert valid["valid"], valid["failures"]
    scale.run_stage("duckdb", run_dir, 6, 40, 2)
    flags = scale.run_stage("flags", run_dir, 6, 40, 2)
    assert flags["cues_first"] == 2 and flags["n_flags"] >= 2
