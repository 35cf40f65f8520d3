"""The audit flow on the tiny ground-truth world, where the flags are known: resume and runners must
agree on flags that exist (on the random-weights world of test_audit_flow.py the flag list is empty)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest

from flows.demo import audit_config, audit_manifest
from tasks.config import AuditConfig

N_IMAGES = 240


@pytest.fixture(scope="module")
def world_config(tiny_world_cache, tmp_path_factory: pytest.TempPathFactory) -> AuditConfig:
    _, biased, _ = tiny_world_cache
    subset = tmp_path_factory.mktemp("tiny-audit") / "test-subset.parquet"
    pd.read_parquet(audit_manifest(biased, "test")).iloc[:N_IMAGES].to_parquet(subset, index=False)
    cfg = audit_config(biased, tmp_path_factory.mktemp("runs") / "x", tmp_path_factory.mktemp("cache"), 1)
    return cfg.replace(data=str(subset), shard_size=60)


def _run(cfg: AuditConfig, run_dir: Path, **changes: Any) -> dict[str, Any]:
    from flows.audit import audit

    return audit(cfg.replace(run_dir=str(run_dir), **changes))


def _flags(run_dir: str | Path) -> list[dict]:
    return pq.read_table(Path(run_dir) / "flags.parquet").to_pylist()


@pytest.mark.slow
def test_runners_and_resume_agree_on_real_flags(
    world_config: AuditConfig, prefect_api: str, tmp_path: Path
) -> None:
    reference = _run(world_config, tmp_path / "inline")
    flags = _flags(reference["run_dir"])
    first = {f["class_name"]: f["phrase"] for f in flags if f["rank"] == 1}
    assert first.get("circle") == "water background"  # the planted cue, found by the flow itself

    threads = _run(world_config, tmp_path / "threads", workers=2)
    assert _flags(threads["run_dir"]) == flags

    # Resume: remove two finished shards and the analytics, run again: same flags from reused + new shards.
    run_dir = Path(threads["run_dir"])
    for name in ("shard-00001.parquet", "shard-00003.parquet"):
        (run_dir / "explanations" / name).unlink()
    for name in ("flags.parquet", "flag_candidates.parquet", "run.duckdb"):
        (run_dir / name).unlink()
    resumed = _run(world_config, run_dir)
    assert len(resumed["shards"]["computed"]) == 2
    assert _flags(resumed["run_dir"]) == flags

    # Explanations carry CLIP's check of every "for" phrase.
    phrases = pq.read_table(run_dir / "explanations").column("phrases").to_pylist()
    checked = [p["shown"] for row in phrases for p in row if p["direction"] == "for"]
    assert checked and all(v is not None for v in checked) and any(checked) and not all(checked)
    # ... and shown is CLIP's call (seen) narrowed to the strong phrases
    marks = [(p["seen"], p["shown"]) for row in phrases for p in row if p["direction"] == "for"]
    assert all(seen or not shown for seen, shown in marks)
    assert any(seen and not shown for seen, shown in marks)

    # textcam intervene on the run: the planted cue's channels, the edited model, bad flags refused.
    from textcam.cli import main

    assert main(["intervene", str(run_dir), "--flag", "circle:water background", "--mode", "zero"]) == 0
    (row,) = pq.read_table(run_dir / "interventions.parquet").to_pylist()
    assert row["n_channels"] > 0 and row["n_images"] > 0
    # the model never learned the circle: no suppression helps circles without water, but with the cue's
    # channels zeroed the model stops calling what shows water a circle, unlike as many random channels
    assert row["reliance_before"] > 0.5
    assert row["reliance_after"] < row["random_reliance_after"] - 0.3
    from textcam.models import load_model

    edited = load_model(row["checkpoint"])
    assert edited.metadata["suppress"]["channels"] == row["channels"]
    # --refit: a last layer on features with the phrase (as CLIP sees it) erased and balanced gives the
    # circles without water back (figures cross-fitted on the probe); no channel is suppressed, and the
    # checkpoint holds the head and reproduces it exactly
    assert main(["intervene", str(run_dir), "--flag", "circle:water background", "--refit"]) == 0
    (refit,) = pq.read_table(run_dir / "interventions.parquet").to_pylist()
    assert refit["refit"] and refit["mode"] == "erase" and refit["channels"] == []
    assert 0 < refit["n_conflicting"] < refit["n_images"]
    assert refit["conflicting_after"] >= refit["conflicting_before"] + 0.3
    assert refit["random_conflicting_after"] == refit["random_conflicting_after"]  # measured, not NaN
    _assert_head_reproduced(refit["checkpoint"], world_config.model)
    assert main(["intervene", str(run_dir), "--flag", "circle:no such phrase"]) == 2
    assert main(["intervene", str(run_dir), "--flag", "no-colon"]) == 2
    from reports import render_report
    from tasks.store import build_duckdb, query

    assert query(run_dir, "SELECT count(*) AS n FROM interventions")["n"][0] == 1
    build_duckdb(run_dir)  # a rebuild keeps the table (reloaded from interventions.parquet)
    assert query(run_dir, "SELECT phrase FROM interventions")["phrase"].tolist() == ["water background"]
    html = render_report(run_dir).read_text()
    assert 'id="interventions"' in html and "“water background”" in html


@pytest.mark.slow
def test_the_flow_checks_flags_against_the_training_data(
    world_config: AuditConfig, tiny_world_cache, prefect_api: str, tmp_path: Path
) -> None:
    """With ``flags.training_data`` every flag's phrase goes with its class in those images: the planted
    cue (water in nearly all training circles, few others) stays first, with its correlation recorded."""
    _, biased, _ = tiny_world_cache
    train = str(audit_manifest(biased, "train"))
    done = _run(world_config, tmp_path / "checked", flags={"training_data": train, "training_size": 600})
    flags = _flags(done["run_dir"])
    first = {f["class_name"]: f for f in flags if f["rank"] == 1}
    assert first["circle"]["phrase"] == "water background" and first["circle"]["data_correlation"] > 0.5
    assert all(f["data_correlation"] >= 0.1 for f in flags)
    why = pq.read_table(Path(done["run_dir"]) / "flag_candidates.parquet").to_pandas()
    assert why["data_correlation"].notna().any()


def test_training_data_without_labels_is_refused(
    world_config: AuditConfig, tiny_world_cache, tmp_path: Path
) -> None:
    from tasks.config import ConfigError
    from tasks.flag_inputs import training_correlation

    _, biased, _ = tiny_world_cache
    unlabelled = tmp_path / "unlabelled.parquet"
    pd.read_parquet(audit_manifest(biased, "train"))[["path"]].iloc[:20].to_parquet(unlabelled, index=False)
    cfg = world_config.replace(flags={"training_data": str(unlabelled)})
    with pytest.raises(ConfigError, match="needs labelled training images"):
        training_correlation(cfg, bank=object())  # refused before the bank is read
    from tasks.flag_inputs import training_images
    from tasks.manifest import ManifestError

    with pytest.raises(ManifestError, match="dataset not found"):
        training_images(world_config.replace(flags={"training_data": str(tmp_path / "nowhere")}))


def _assert_head_reproduced(refit_checkpoint: str, original_checkpoint: str) -> None:
    """The refitted model's logits are its stored head on the original model's pooled target layer."""
    import torch
    from safetensors.torch import load_file

    from textcam.intervene import layer_features
    from textcam.models import load_model

    edited, original = load_model(refit_checkpoint), load_model(original_checkpoint)
    assert edited.metadata["refit_head"]["layer"] == edited.target_layer
    head = load_file(refit_checkpoint)
    x = torch.rand(6, 3, *edited.input_size, generator=torch.Generator().manual_seed(0))
    _, pooled = layer_features(original.module, original.target_layer, x)
    expected = pooled @ head["textcam_head.weight"].T + head["textcam_head.bias"]
    with torch.no_grad():
        torch.testing.assert_close(edited.module(x), expected, rtol=1e-5, atol=1e-5)
