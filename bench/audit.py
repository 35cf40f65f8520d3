"""Benchmark: the whole audit flow vs the same explanations in one plain Python loop.

    python bench/audit.py [--limit N] [--memory] [--device cpu|cuda|auto]

Images: the first N of ``../shared/imagenet-samples`` (read in place, never copied), labelled from
the TSV. Models: ResNet-50 and a ViT-B-32 open_clip CLIP, both with random weights. The channel
bank and phrase embeddings are made once before timing (both contestants use the same files).

Timed in this one process, after a warm-up batch:
* ``plain_loop_s``: DataLoader → Explainer.explain_batch → records, nothing written;
* ``flow_s``: the ``audit`` flow (Prefect tasks, Parquet, Great Expectations, DuckDB, flags, report)
  against a Prefect server started before timing.

``--memory`` runs the flow in fresh subprocesses on N and 10·N images (the shared images repeated
through symlinks in a temp folder) and reports each one's peak RSS (the flow process only: its
channel bank is prepared beforehand, so the CLIP model never enters it).
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
SAMPLES, TSV = SHARED / "imagenet-samples", SHARED / "imagenet-samples.tsv"


def write_manifest(folder: Path, n: int) -> Path:
    """A CSV manifest of ``n`` images; beyond 1000 the shared images repeat through symlinks."""
    with TSV.open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    out = folder / f"manifest-{n}.csv"
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for i in range(n):
            row = rows[i % len(rows)]
            src = SAMPLES / row["file"]
            if i < len(rows):
                path = src
            else:
                path = folder / "repeat" / f"r{i // len(rows)}" / row["file"]
                path.parent.mkdir(parents=True, exist_ok=True)
                if not path.exists():
                    path.symlink_to(src)
            w.writerow([str(path), row["class_name"]])
    return out


def make_models(folder: Path) -> str:
    """ResNet-50 with seeded random weights as a self-describing checkpoint (same weights everywhere)."""
    import torchvision

    from textcam.models import imagenet_class_names, save_checkpoint

    path = folder / "resnet50-random.safetensors"
    if not path.exists():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = torchvision.models.resnet50()
        save_checkpoint(
            net,
            path,
            arch="resnet50",
            class_names=list(imagenet_class_names()),
            target_layer="layer4",
            preprocess={"resize": 232, "crop": 224},
        )
    return str(path)


def config(work: Path, manifest: Path, model: str, args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    return {
        "data": str(manifest),
        "model": model,
        "clip": "ViT-B-32",
        "clip_pretrained": None,
        "vocab": [str(work / "vocab.txt")],
        "shard_size": args.shard_size,
        "batch_size": args.batch_size,
        "loader_workers": args.loader_workers,
        "workers": 1,
        "device": args.device,
        "probe_size": args.probe_size,
        "bank_m": min(50, min(args.probe_size, args.limit) // 2),
        "cache_dir": str(work / "cache"),
        "run_dir": str(run_dir),
    }


def prepare(cfg_map: dict[str, Any], run_dir: Path) -> None:
    """Make RUN_DIR/bank/ (bank + phrase embeddings) before timing."""
    from flows.audit import probe_paths
    from tasks.calibrate import prepare_bank
    from tasks.config import from_mapping
    from tasks.manifest import read_manifest

    cfg = from_mapping(cfg_map)
    prepare_bank(cfg, probe_paths(cfg, read_manifest(cfg.data)), run_dir)


def plain_loop(cfg_map: dict[str, Any], run_dir: Path, warmup: bool = False) -> tuple[float, int]:
    """The same explanations without Prefect, Parquet, validation or reports."""
    from tasks.explain_shard import load_phrases
    from tasks.manifest import read_manifest
    from textcam.bank import ChannelBank
    from textcam.data import iter_batches
    from textcam.device import resolve_device
    from textcam.explain import Explainer
    from textcam.models import load_model

    t0 = time.perf_counter()
    device = resolve_device(cfg_map["device"])
    model = load_model(cfg_map["model"], device=device)
    bank = ChannelBank.load(run_dir / "bank" / "bank.safetensors", model_id=model.model_id)
    phrases, emb = load_phrases(run_dir / "bank" / "phrases.safetensors")
    explainer = Explainer(model, bank, phrases, emb, device=device)
    paths = read_manifest(cfg_map["data"]).images.sort_by("image_id").column("path").to_pylist()
    if warmup:
        paths = paths[: cfg_map["batch_size"]]
    rows = 0
    for batch in iter_batches(
        paths,
        [model.preprocess],
        batch_size=cfg_map["batch_size"],
        num_workers=cfg_map["loader_workers"],
        pin_memory=device.type == "cuda",
    ):
        if batch.indices.numel():
            rows += len([e.to_record() for e in explainer.explain_batch(batch.tensors[0].to(device))])
    return time.perf_counter() - t0, rows


def run_flow(cfg_map: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    from flows.audit import audit
    from tasks.config import from_mapping
    from tasks.explain_shard import clear_runtimes

    clear_runtimes()  # the flow loads its model like a fresh run would
    t0 = time.perf_counter()
    summary = audit(from_mapping(cfg_map))
    return time.perf_counter() - t0, summary


def _rss_child(cfg_json: str) -> None:
    """Subprocess entry for --memory: run the flow, print peak RSS (MB) of this process."""
    from prefect.testing.utilities import prefect_test_harness

    cfg_map = json.loads(cfg_json)
    with prefect_test_harness(server_startup_timeout=120):
        run_flow(cfg_map)  # the bank was made by the parent: CLIP never enters this process
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so it would report the parent's peak.
    hwm_kb = next(
        int(ln.split()[1])
        for ln in Path("/proc/self/status").read_text().splitlines()
        if ln.startswith("VmHWM:")
    )
    print(json.dumps({"peak_rss_mb": hwm_kb / 1024}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=1000, help="images to audit (default 1000)")
    p.add_argument("--memory", action="store_true", help="also peak RSS on N vs 10*N images (subprocesses)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--loader-workers", type=int, default=2)
    p.add_argument("--probe-size", type=int, default=200)
    p.add_argument(
        "--vocab-size",
        type=int,
        default=300,
        help="phrases: the first N of the built-in `general` list (default 300; random-weight "
        "ViT-B-32 text encoding on a CPU costs ~0.1 s per phrase, done before timing)",
    )
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--_rss-child", dest="rss_child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rss_child:
        _rss_child(args.rss_child)
        return 0

    from prefect.testing.utilities import prefect_test_harness

    work = Path(tempfile.mkdtemp(prefix="textcam-bench-"))
    try:
        model = make_models(work)
        from textcam.vocab import load_vocabulary

        (work / "vocab.txt").write_text("\n".join(load_vocabulary(["general"])[: args.vocab_size]) + "\n")
        manifest = write_manifest(work, args.limit)
        run_dir = work / "run"
        cfg_map = config(work, manifest, model, args, run_dir)
        t0 = time.perf_counter()
        prepare(cfg_map, run_dir)
        prepare_s = time.perf_counter() - t0
        sizes = {args.limit: "peak_rss_1k_mb", 10 * args.limit: "peak_rss_10k_mb"} if args.memory else {}
        child_cfgs = {}
        for n in sizes:  # banks first: forking DataLoader workers after Prefect's threads ran is fragile
            child_cfgs[n] = config(work, write_manifest(work, n), model, args, work / f"rss-{n}")
            prepare(child_cfgs[n], Path(child_cfgs[n]["run_dir"]))
        plain_loop(cfg_map, run_dir, warmup=True)
        loop_s, loop_rows = plain_loop(cfg_map, run_dir)
        with prefect_test_harness(server_startup_timeout=120):
            flow_s, summary = run_flow(cfg_map)
        figures: dict[str, Any] = {
            "images": args.limit,
            "device": str(
                torch.device(args.device)
                if args.device != "auto"
                else ("cuda" if torch.cuda.is_available() else "cpu")
            ),
            "torch_threads": torch.get_num_threads(),
            "batch_size": args.batch_size,
            "shard_size": args.shard_size,
            "loader_workers": args.loader_workers,
            "bank_and_phrases_s": round(prepare_s, 2),
            "plain_loop_s": round(loop_s, 2),
            "plain_loop_rows": loop_rows,
            "flow_s": round(flow_s, 2),
            "flow_rows": summary["counts"]["explanation_rows"],
            "flow_stages_s": summary["timings_s"],
            "flow_vs_plain_loop": round(flow_s / loop_s, 3),
            "plain_loop_images_per_s": round(args.limit / loop_s, 2),
            "flow_images_per_s": round(args.limit / flow_s, 2),
        }
        if args.memory:
            for n, key in sizes.items():
                out = subprocess.run(
                    [sys.executable, __file__, "--_rss-child", json.dumps(child_cfgs[n])],
                    capture_output=True,
                    text=True,
                    check=True,
                    env={**os.environ},
                )
                figures[key] = round(json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"], 1)
            figures["memory_sizes"] = [args.limit, 10 * args.limit]
            figures["rss_ratio_10x"] = round(figures["peak_rss_10k_mb"] / figures["peak_rss_1k_mb"], 3)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\n{'measure':<28}{'value':>14}")
    for key, value in figures.items():
        if not isinstance(value, dict | list):
            print(f"{key:<28}{value!s:>14}")
    for stage, seconds in figures["flow_stages_s"].items():
        print(f"  flow stage {stage:<16}{seconds:>14}")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
