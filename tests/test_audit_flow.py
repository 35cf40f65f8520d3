"""The audit flow end to end on 44 real PNGs (2 unreadable) in 4 shards: tables, resume, kill, Dask."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from audit_world import make_world

from tasks.config import from_mapping
from tasks.explain_shard import load_phrases
from textcam.schema import EXPLANATIONS

N_SHARDS = 4


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("audit-world")
    cfg = make_world(root, n_per_class=14)
    data = Path(cfg["data"])
    (data / "apple" / "broken.png").write_bytes(b"")  # zero bytes
    (data / "boat" / "fake.png").write_text("this is not a PNG")
    cfg["shard_size"] = 11  # 44 images → 4 shards
    return cfg


def _run(cfg: dict[str, Any], run_dir: Path, **changes: Any) -> dict[str, Any]:
    from flows.audit import audit

    return audit(from_mapping({**cfg, "run_dir": str(run_dir), **changes}))


@pytest.fixture(scope="module")
def reference(world: dict[str, Any], prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One uninterrupted run with the default runner."""
    return _run(world, tmp_path_factory.mktemp("runs") / "reference")


def explanations(run_dir: str | Path) -> pa.Table:
    table = pq.read_table(Path(run_dir) / "explanations")
    return table.sort_by([("image_id", "ascending"), ("target_class", "ascending")])


def _keys(table: pa.Table) -> list[tuple[str, int]]:
    columns = table.select(["image_id", "target_class"]).to_pydict()
    return list(zip(columns["image_id"], columns["target_class"], strict=True))


def _file_ids(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.glob("shard-*.parquet"))}


def _finished_shards(run_dir: Path) -> dict[str, tuple[int, int]]:
    return {**_file_ids(run_dir / "staging"), **_file_ids(run_dir / "explanations")}


def _flags(run_dir: str | Path) -> list[dict]:
    return pq.read_table(Path(run_dir) / "flags.parquet").to_pylist()


def test_end_to_end_tables_and_summary(reference: dict[str, Any], world: dict[str, Any]) -> None:
    run_dir = Path(reference["run_dir"])
    counts = reference["counts"]
    assert reference["reconciled"]
    assert counts["rows_in"] == 44 and counts["explained_images"] == 42 and counts["errors"] == 2
    assert counts["errors_by_stage"] == {"manifest": 0, "explain": 2, "validate": 0}
    assert len(reference["shards"]["computed"]) == N_SHARDS and not reference["shards"]["reused"]
    outputs = ("config.yaml", "images.parquet", "run.duckdb", "flags.parquet", "report.html", "summary.json")
    for name in outputs:
        assert (run_dir / name).is_file(), name
    assert sorted(p.name for p in (run_dir / "explanations").iterdir()) == [
        f"shard-{i:05d}.parquet" for i in range(N_SHARDS)
    ]
    assert not list((run_dir / "staging").glob("*.parquet"))
    table = explanations(run_dir)
    assert table.schema.remove_metadata().equals(EXPLANATIONS.remove_metadata())
    keys = _keys(table)
    assert len(keys) == len(set(keys)) == 42
    assert set(table.column("run_id").to_pylist()) == {reference["run_id"]}
    errors = pq.read_table(run_dir / "errors")
    assert sorted(Path(p).name for p in errors.column("path").to_pylist()) == ["broken.png", "fake.png"]
    assert set(errors.column("stage").to_pylist()) == {"explain"}
    # The DuckDB views read the same rows.
    from tasks.store import query

    assert query(run_dir, "SELECT count(*) AS n FROM explanations")["n"][0] == 42
    assert json.loads((run_dir / "summary.json").read_text())["run_id"] == reference["run_id"]


def test_probe_set_is_kept_for_the_data_check(reference: dict[str, Any]) -> None:
    from tasks.calibrate import BankFiles
    from tasks.cooccurrence import cooccurrence
    from tasks.flag_inputs import cooccurrence as run_cooccurrence
    from tasks.store import query
    from textcam.bank import ChannelBank, ProbeSet

    run_dir = Path(reference["run_dir"])
    probe = ProbeSet.load(run_dir / "bank" / "probe.safetensors")
    # The probe is every readable image in image_id order (probe_size 500 > 42): calibration's
    # predictions must be the explanations' predictions of the same images.
    preds = query(run_dir, "SELECT pred FROM explanations WHERE rank_of_target = 0 ORDER BY image_id")
    assert probe.predictions.tolist() == preds["pred"].tolist()
    assert probe.embeddings.shape[0] == 42 and torch.isfinite(probe.embeddings).all()
    # ... and the flag task finds it through the run's bank files: a row per predicted class × phrase,
    # with figures where the class has >= 10 probe images and other images to compare with (this
    # random classifier predicts few classes, maybe one).
    bank_dir = run_dir / "bank"
    bank = ChannelBank.load(bank_dir / "bank.safetensors")
    paths = (bank_dir / "bank.safetensors", bank_dir / "phrases.safetensors")
    files = BankFiles.describe(bank, *paths, n_phrases=24, source="run_dir", t0=0.0)
    table = run_cooccurrence(files)
    phrases, embeddings = load_phrases(files.phrases_path)
    assert table.equals(cooccurrence(probe, phrases, embeddings))
    assert len(table) == len(set(probe.predictions.tolist())) * 24
    usable = table["n_probe_class"].between(10, 41)
    assert table.loc[usable, "data_z"].notna().all() and table.loc[~usable, "data_z"].isna().all()
    assert "data_z" in query(run_dir, "SELECT * FROM flags").columns


def test_artifacts_published(reference: dict[str, Any]) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        keys = {
            a.key
            for a in client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    key=ArtifactFilterKey(any_=["audit-flags", "audit-report", "audit-summary"])
                )
            )
        }
    assert keys == {"audit-flags", "audit-report", "audit-summary"}


def test_rerun_reuses_every_shard(reference: dict[str, Any], world: dict[str, Any]) -> None:
    run_dir = Path(reference["run_dir"])
    before = _file_ids(run_dir / "explanations")
    again = _run(world, run_dir)
    assert again["run_id"] == reference["run_id"]
    assert len(again["shards"]["reused"]) == N_SHARDS and not again["shards"]["computed"]
    assert _file_ids(run_dir / "explanations") == before
    assert again["counts"] == reference["counts"]


def test_an_edited_vocabulary_file_is_not_served_stale(
    prefect_api: str, world: dict[str, Any], tmp_path: Path
) -> None:
    # Same config (the vocabulary is named by its path), new phrases: a new run id, every shard
    # computed again, and the phrases embedded again (the old explanations moved out of the tables).
    run_dir = tmp_path / "run"
    vocab = tmp_path / "phrases.txt"
    phrases = Path(world["vocab"][0]).read_text().splitlines()
    vocab.write_text("\n".join(phrases) + "\n")
    cfg = {**world, "vocab": [str(vocab)]}
    first = _run(cfg, run_dir)
    same = _run(cfg, run_dir)
    assert same["run_id"] == first["run_id"]
    assert len(same["shards"]["reused"]) == N_SHARDS  # same phrases: nothing to redo
    vocab.write_text("\n".join([*phrases, "a freshly added phrase"]) + "\n")
    edited = _run(cfg, run_dir)
    assert edited["run_id"] != same["run_id"]
    assert len(edited["shards"]["computed"]) == N_SHARDS and not edited["shards"]["reused"]
    assert set(explanations(run_dir).column("run_id").to_pylist()) == {edited["run_id"]}
    saved, _ = load_phrases(run_dir / "bank" / "phrases.safetensors")
    assert saved[-1] == "a freshly added phrase"


def test_a_run_dir_without_a_probe_set_gets_one(prefect_api: str, world: dict, tmp_path: Path) -> None:
    # A run dir from before probe sets were kept: the re-run adds one (same CLIP, same probe images),
    # keeps its bank (the reused explanations were made with it) and recomputes no shard.
    from textcam.bank import ProbeSet

    run_dir = tmp_path / "run"
    first = _run(world, run_dir)
    probe_file = run_dir / "bank" / "probe.safetensors"
    before, bank_bytes = ProbeSet.load(probe_file), (run_dir / "bank" / "bank.safetensors").read_bytes()
    probe_file.unlink()
    again = _run(world, run_dir)
    assert again["run_id"] == first["run_id"] and len(again["shards"]["reused"]) == N_SHARDS
    assert (run_dir / "bank" / "bank.safetensors").read_bytes() == bank_bytes
    after = ProbeSet.load(probe_file)
    assert torch.equal(after.predictions, before.predictions)
    assert torch.allclose(after.embeddings, before.embeddings, atol=1e-5)
    assert again["bank"]["probe_path"] == str(probe_file)


_KILLABLE = """
import json, sys, time
import flows.audit as audit_module
from tasks.config import from_mapping

real = audit_module.explain_shard

def slow(*args, **kwargs):  # give the test time to kill us between shards
    result = real(*args, **kwargs)
    time.sleep(4)
    return result

audit_module.explain_shard = slow
audit_module.audit(from_mapping(json.loads(sys.argv[1])))
"""


def test_kill_and_resume(
    reference: dict[str, Any], world: dict[str, Any], prefect_api: str, tmp_path: Path
) -> None:
    run_dir = tmp_path / "killed"
    cfg = {**world, "run_dir": str(run_dir)}
    script = tmp_path / "killable.py"
    script.write_text(textwrap.dedent(_KILLABLE))
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.Popen(
        [sys.executable, str(script), json.dumps(cfg)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not _finished_shards(run_dir):
            assert proc.poll() is None, "the flow ended before the test could kill it"
            assert time.monotonic() < deadline, "no shard was written in time"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the flow and any loader workers
        proc.wait(timeout=30)
    finished = _finished_shards(run_dir)  # committed, or written and awaiting validation
    assert 1 <= len(finished) < N_SHARDS

    resumed = _run(world, run_dir)
    assert set(resumed["shards"]["reused"]) == {n.removesuffix(".parquet") for n in finished}
    assert len(resumed["shards"]["computed"]) == N_SHARDS - len(finished)
    after = _file_ids(run_dir / "explanations")
    assert {k: after[k] for k in finished} == finished  # finished shards were not rewritten (same inode)
    assert resumed["counts"] == reference["counts"] and resumed["reconciled"]
    table = explanations(run_dir)
    keys = _keys(table)
    assert len(keys) == len(set(keys))
    assert table.equals(explanations(reference["run_dir"]))
    assert _flags(run_dir) == _flags(reference["run_dir"])
    assert not list(run_dir.glob("**/.*.tmp*"))  # the killed writer's temp file was not left in a table dir


@pytest.mark.parametrize("runner", ["dask", "default"])
def test_other_runners_give_identical_tables(
    reference: dict[str, Any], world: dict[str, Any], tmp_path: Path, runner: str
) -> None:
    """The reference explains shards inline (one worker); Dask processes and two worker threads
    must produce the same tables and flags."""
    if runner == "dask":
        pytest.importorskip("prefect_dask")
    # DataLoader workers inside Dask worker processes (they must not be daemonic).
    summary = _run(world, tmp_path / runner, runner=runner, workers=2, loader_workers=2)
    assert summary["run_id"] == reference["run_id"]
    assert summary["counts"] == reference["counts"]
    dask_table, ref_table = explanations(summary["run_dir"]), explanations(reference["run_dir"])
    exact = [c for c in EXPLANATIONS.names if c not in ("prob", "topk", "phrases", "groups", "saliency")]
    assert dask_table.select(exact).equals(ref_table.select(exact))
    for column in ("prob", "saliency"):
        a = pa.array(dask_table.column(column).to_pylist()).to_pylist()
        b = pa.array(ref_table.column(column).to_pylist()).to_pylist()
        assert _close(a, b), column
    assert [[p["text"] for p in r] for r in dask_table.column("phrases").to_pylist()] == [
        [p["text"] for p in r] for r in ref_table.column("phrases").to_pylist()
    ]
    assert _flags(summary["run_dir"]) == _flags(reference["run_dir"])


def _close(a: Any, b: Any, tol: float = 1e-3) -> bool:
    if isinstance(a, list):
        same_length = isinstance(b, list) and len(a) == len(b)
        return same_length and all(_close(x, y, tol) for x, y in zip(a, b, strict=True))
    return abs(a - b) <= tol * max(1.0, abs(b))


def test_loader_workers_survive_prefect_services(reference: dict[str, Any], world: dict[str, Any]) -> None:
    """Forked DataLoader workers in a process running Prefect must exit cleanly (exit code 0).

    Prefect registers thread-shutdown hooks that fail in a forked child; without the worker init
    in ``textcam.data`` every worker exits with code 1 and the DataLoader aborts the audit.
    """
    from textcam.data import iter_batches, list_images

    paths = list_images(world["data"])
    seen = []
    for batch in iter_batches(paths, [_tiny_tensor], batch_size=4, num_workers=2):
        seen += batch.indices.tolist() + [i for i, _ in batch.failed]
    assert sorted(seen) == list(range(len(paths)))


def _tiny_tensor(img: Any) -> Any:
    import numpy as np
    import torch

    return torch.from_numpy(np.asarray(img.resize((4, 4)), dtype=np.float32))


def test_shard_feed_gives_each_shard_its_own_batches(reference: dict[str, Any], world: dict) -> None:
    from tasks.calibrate import BankFiles, runtime_spec
    from tasks.explain_shard import ShardFeed, _batches, get_runtime
    from tasks.shards import plan_shards
    from textcam.bank import ChannelBank

    run_dir = Path(reference["run_dir"])
    bank_dir = run_dir / "bank"
    paths = (bank_dir / "bank.safetensors", bank_dir / "phrases.safetensors")
    files = BankFiles.describe(ChannelBank.load(paths[0]), *paths, n_phrases=24, source="run_dir", t0=0.0)
    spec = runtime_spec(from_mapping(world), files)
    shards = plan_shards(pq.read_table(run_dir / "images.parquet"), 11, run_id=reference["run_id"])
    runtime = get_runtime(spec)

    feed = ShardFeed(spec, shards, batch_size=4, loader_workers=2)
    for shard in shards:  # in order: the same batches as a loader of the shard's own
        fed, alone = list(feed.take(shard)), list(_batches(shard, runtime, 4, 0))
        assert [b.indices.tolist() for b in fed] == [b.indices.tolist() for b in alone]
        assert [b.failed for b in fed] == [b.failed for b in alone]
        assert all(torch.equal(a.tensors[0], b.tensors[0]) for a, b in zip(fed, alone, strict=True))
    assert any(b.failed for s in shards for b in _batches(s, runtime, 4, 0))  # the 2 unreadable files

    out_of_turn = ShardFeed(spec, shards, batch_size=4, loader_workers=0)
    assert out_of_turn.take(shards[1]) is None and out_of_turn.take(shards[0]) is None  # closed
    half = ShardFeed(spec, shards, batch_size=4, loader_workers=0)
    next(half.take(shards[0]))  # a shard that stops after one batch (its task failed)
    assert half.take(shards[1]) is None
    retried = ShardFeed(spec, shards, batch_size=4, loader_workers=0)
    list(retried.take(shards[0]))
    assert retried.take(shards[0]) is None  # a retry reads on its own


def test_the_cli_is_quiet_and_shows_progress(world: dict[str, Any], prefect_api: str, tmp_path: Path) -> None:
    """`textcam audit` on a small folder: a progress bar, the reconciled summary, no library chatter."""
    import yaml

    config = tmp_path / "audit.yaml"
    config.write_text(yaml.safe_dump({k: v for k, v in world.items() if k != "flags"}))
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "textcam.cli",
            "audit",
            "--config",
            str(config),
            "--run-dir",
            str(tmp_path / "r"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    lines = [line for line in out.replace("\r", "\n").splitlines() if line.strip()]
    bars = [line for line in lines if "img/s" in line or "img]" in line]
    print(f"{len(lines)} lines:\n" + "\n".join(lines[-40:]))
    assert proc.returncode == 0, out[-2000:]
    assert bars and any("reconciled" in line for line in lines)
    assert not [line for line in lines if "HTTP Request" in line or "Skipping registering" in line]
    shown = len([line for line in out.splitlines() if line.strip()])  # a bar redrawn in place is one line
    assert shown <= 30
    kept = (tmp_path / "r" / "logs" / "audit.log").read_text()  # the chatter is kept, off the terminal
    print(kept[-3000:])
    assert "HTTP Request" in kept or "Skipping registering" in kept
