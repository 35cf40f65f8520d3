"""Benchmark: the whole audit flow vs the same explanations in one plain Python loop.

    python bench/audit.py [--limit N] [--memory [--memory-base 1000] [--no-timing]] [--device cpu|cuda|auto]

Images: the first N of ``../shared/imagenet-samples`` (read in place, never copied), labelled from
the TSV. Models: ``--model efficientnet-lite0`` (default: the real ImageNet classifier, so predictions
spread over many classes and the per-class analytics do real work) or ``resnet50-random``; a ViT-B-32
open_clip CLIP with random weights. The channel bank and phrase embeddings are made once before timing
(both contestants use the same files).

Timed in this one process, after a warm-up batch, alternating loop, flow, loop, ..., flow, loop
(``--repeats`` flows, default 4; the shared machine's speed drifts by tens of percent over minutes):
* ``plain_loop_s``: DataLoader → Explainer.explain_batch → records, nothing written (each run loads
  the model, like the flow);
* ``flow_s``: the ``audit`` flow (Prefect tasks, Parquet, Great Expectations, DuckDB, flags, report)
  into a fresh run directory, against a Prefect server started before timing (a user with a
  configured server pays no start-up); ``prefect_server_start_s`` is that start-up, and
  ``flow_vs_plain_loop_with_server_start`` adds it;
* each repeat's ratio is its flow time ÷ the mean of the two loops around it
  (``flow_vs_plain_loop_runs``); ``flow_cold_vs_plain_loop`` is the first repeat, the flow's first
  run in the process (imports, first calls): what a one-off ``textcam audit`` pays;
  ``flow_vs_plain_loop`` is the median of the warm repeats (every one after the first), what a
  scheduled or served audit pays.
Each contestant's CPU seconds (this process + reaped children, i.e. the DataLoader workers) are
reported too: ``flow_vs_plain_loop_cpu`` is less sensitive than wall time to other load on a shared
machine (the Prefect server's own CPU is not in it; ``prefect_server_cpu_s`` is, per flow run, and
``prefect_server_cpu_during_loop_s`` the same server idling through a plain loop).

``--memory`` runs the flow in fresh subprocesses on 1000 and 10000 images (the shared images
repeated through symlinks in a temp folder, so every path, hence image id, is distinct) and reports
the peak RSS of each: ``peak_rss_*_mb`` is the flow process' VmHWM (its channel bank is prepared
beforehand, so the CLIP model never enters it); ``peak_tree_rss_*_mb`` the highest sum of RSS over
the flow process and its children (DataLoader workers, the Prefect server; shared pages counted
more than once), polled every 0.2 s. ``--memory-model resnet18-64`` (default) audits with a
ResNet-18 at 64 px so that 10,000 images finish in minutes on a small CPU; memory flatness, not
speed, is the point. ``--no-timing`` skips the flow-vs-loop comparison.
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's code, not whichever one the environment installed
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


#: Model name → (torchvision architecture, resize, crop).
MODELS = {"resnet50": ("resnet50", 232, 224), "resnet18-64": ("resnet18", 64, 64)}


def make_models(folder: Path, name: str = "resnet50") -> str:
    """A seeded random-weight classifier as a self-describing checkpoint (same weights everywhere)."""
    import torchvision

    from textcam.models import imagenet_class_names, save_checkpoint

    arch, resize, crop = MODELS[name]
    path = folder / f"{name}-random.safetensors"
    if not path.exists():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = getattr(torchvision.models, arch)()
        save_checkpoint(
            net,
            path,
            arch=arch,
            class_names=list(imagenet_class_names()),
            target_layer="layer4",
            preprocess={"resize": resize, "crop": crop},
        )
    return str(path)


def cpu_seconds() -> float:
    """User + system CPU of this process and of its reaped children (DataLoader workers)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


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
        "calibration": {
            "probe_size": args.probe_size,
            "bank_m": min(50, min(args.probe_size, args.limit) // 2),
        },
        "cache_dir": str(work / "cache"),
        "run_dir": str(run_dir),
    }


def prepare(cfg_map: dict[str, Any], run_dir: Path) -> None:
    """Make RUN_DIR/bank/ (bank + phrase embeddings) before timing."""
    from tasks.calibrate import prepare_bank, probe_paths
    from tasks.config import from_mapping
    from tasks.manifest import read_manifest

    cfg = from_mapping(cfg_map)
    prepare_bank(cfg, probe_paths(cfg, read_manifest(cfg.data)), run_dir)


def plain_loop(cfg_map: dict[str, Any], run_dir: Path, warmup: bool = False) -> tuple[float, float, int]:
    """The same explanations without Prefect, Parquet, validation or reports."""
    from tasks.explain_shard import load_phrases
    from tasks.manifest import read_manifest
    from textcam.bank import ChannelBank
    from textcam.data import iter_batches
    from textcam.device import resolve_device
    from textcam.explain import Explainer
    from textcam.models import load_model

    t0, c0 = time.perf_counter(), cpu_seconds()
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
    return time.perf_counter() - t0, cpu_seconds() - c0, rows


def run_flow(cfg_map: dict[str, Any]) -> tuple[float, float, dict[str, Any]]:
    from flows.audit import audit
    from flows.cli import quiet_task_runs
    from tasks.config import from_mapping
    from tasks.explain_shard import clear_runtimes

    quiet_task_runs()  # as `textcam audit` does, after the import that configures Prefect's loggers
    clear_runtimes()  # the flow loads its model like a fresh run would
    t0, c0 = time.perf_counter(), cpu_seconds()
    summary = audit(from_mapping(cfg_map))
    return time.perf_counter() - t0, cpu_seconds() - c0, summary


def _rss_child(cfg_json: str) -> None:
    """Subprocess entry for --memory: run the flow, print peak RSS (MB) of this process."""
    from prefect.testing.utilities import prefect_test_harness

    cfg_map = json.loads(cfg_json)
    with prefect_test_harness(server_startup_timeout=120):
        _, _, summary = run_flow(cfg_map)  # the bank was made by the parent: CLIP never enters here
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so it would report the parent's peak.
    hwm_kb = next(
        int(ln.split()[1])
        for ln in Path("/proc/self/status").read_text().splitlines()
        if ln.startswith("VmHWM:")
    )
    print(
        json.dumps({"peak_rss_mb": hwm_kb / 1024, "explained_images": summary["counts"]["explained_images"]})
    )


def _peak_tree_rss_mb(proc: subprocess.Popen[str]) -> float:
    """Poll ``proc`` and its descendants until it exits; the highest sum of their RSS, in MB."""
    import psutil

    peak = 0
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            members = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:  # ended between poll() and here
            break
        total = 0
        for member in members:
            try:
                total += member.memory_info().rss
            except psutil.NoSuchProcess:  # a DataLoader worker that just exited holds no memory
                continue
        peak = max(peak, total)
        time.sleep(0.2)
    return peak / 2**20


def memory_figures(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Peak RSS of the flow on N and 10·N images (N = ``--memory-base``), each in a fresh subprocess."""
    model = make_models(work, args.memory_model)
    small, large = args.memory_base, 10 * args.memory_base
    sizes = {small: "1k", large: "10k"}  # the keys the issue names; memory_sizes says what they were
    cfgs = {n: config(work, write_manifest(work, n), model, args, work / f"rss-{n}") for n in sizes}
    # One bank for both runs (the run dir's bank is loaded as is): the same files, prepared once here.
    prepare(cfgs[small], Path(cfgs[small]["run_dir"]))
    shutil.copytree(Path(cfgs[small]["run_dir"]) / "bank", Path(cfgs[large]["run_dir"]) / "bank")
    figures: dict[str, Any] = {"memory_model": args.memory_model, "memory_sizes": list(sizes)}
    for n, tag in sizes.items():
        t0 = time.perf_counter()
        out_path = work / f"rss-{n}.out"
        with out_path.open("w") as out:  # a file, not a pipe: a full pipe would stall the child
            proc = subprocess.Popen(
                [sys.executable, __file__, "--_rss-child", json.dumps(cfgs[n])], stdout=out, text=True
            )
            figures[f"peak_tree_rss_{tag}_mb"] = round(_peak_tree_rss_mb(proc), 1)
        if proc.wait() != 0:
            raise RuntimeError(f"memory run on {n} images failed with exit code {proc.returncode}")
        child = json.loads(out_path.read_text().strip().splitlines()[-1])
        figures[f"peak_rss_{tag}_mb"] = round(child["peak_rss_mb"], 1)
        figures[f"memory_run_{tag}_s"] = round(time.perf_counter() - t0, 1)
        figures[f"memory_run_{tag}_explained"] = child["explained_images"]
    figures["rss_ratio_10x"] = round(figures["peak_rss_10k_mb"] / figures["peak_rss_1k_mb"], 3)
    figures["tree_rss_ratio_10x"] = round(figures["peak_tree_rss_10k_mb"] / figures["peak_tree_rss_1k_mb"], 3)
    return figures


def flow_ratios(flows: list[float], loops: list[float]) -> list[float]:
    """Flow ``i`` ÷ the mean of the loops just before and after it (``loops`` has one more entry)."""
    if len(loops) != len(flows) + 1:
        raise ValueError(f"{len(flows)} flows need {len(flows) + 1} loops around them, got {len(loops)}")
    return [f / ((a + b) / 2) for f, a, b in zip(flows, loops, loops[1:], strict=False)]


def warm_median(ratios: list[float]) -> float:
    """The median of every repeat after the first (the cold one); the only one when there is one."""
    return statistics.median(ratios[1:] or ratios)


def timing_figures(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The flow vs the plain loop on ``args.limit`` images, measured side by side in this process."""
    from prefect.testing.utilities import prefect_test_harness

    model = "efficientnet-lite0" if args.model == "efficientnet-lite0" else make_models(work)
    manifest = write_manifest(work, args.limit)
    run_dir = work / "run"
    cfg_map = config(work, manifest, model, args, run_dir)
    t0 = time.perf_counter()
    prepare(cfg_map, run_dir)
    prepare_s = time.perf_counter() - t0
    plain_loop(cfg_map, run_dir, warmup=True)
    loops: list[tuple[float, float]] = []
    server_cpu: list[float] = []  # the Prefect server's CPU during each flow, and during each loop after it
    server_cpu_loop: list[float] = []
    flows: list[tuple[float, float, dict[str, Any]]] = []
    t0 = time.perf_counter()
    with prefect_test_harness(server_startup_timeout=120):
        server_s = time.perf_counter() - t0
        # loop, flow, loop, flow, ..., loop: the shared machine's speed drifts by tens of percent
        # over minutes, so each flow is compared with the mean of the loops just before and after it,
        # and the figure is the median over the repeats.
        wall, cpu, loop_rows = plain_loop(cfg_map, run_dir)
        loops.append((wall, cpu))
        for r in range(args.repeats):
            server_cpu0 = live_children_cpu()
            flows.append(run_flow({**cfg_map, "run_dir": str(fresh_run_dir(run_dir, r))}))
            server_cpu.append(live_children_cpu() - server_cpu0)
            server_cpu0 = live_children_cpu()
            wall, cpu, _ = plain_loop(cfg_map, run_dir)
            server_cpu_loop.append(live_children_cpu() - server_cpu0)
            loops.append((wall, cpu))
    ratios, cpu_ratios = (flow_ratios([f[m] for f in flows], [x[m] for x in loops]) for m in (0, 1))
    loop_s = statistics.mean(x[0] for x in loops)
    loop_cpu = statistics.mean(x[1] for x in loops)
    flow_s = statistics.mean(x[0] for x in flows)
    summary = flows[-1][2]
    return {
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
        "repeats": args.repeats,
        "bank_and_phrases_s": round(prepare_s, 2),
        "plain_loop_s": round(loop_s, 2),
        "plain_loop_runs_s": [round(x[0], 2) for x in loops],
        "plain_loop_cpu_s": round(loop_cpu, 2),
        "plain_loop_rows": loop_rows,
        "flow_s": round(flow_s, 2),
        "flow_runs_s": [round(x[0], 2) for x in flows],
        "flow_cpu_s": round(statistics.mean(x[1] for x in flows), 2),
        "flow_rows": summary["counts"]["explanation_rows"],
        "flow_stages_s": summary["timings_s"],
        # per flow run: the explain stage and each shard's seconds (the first run in a process pays
        # imports and first-call costs that later runs do not)
        "flow_explain_stage_runs_s": [round(f[2]["timings_s"]["explain"], 2) for f in flows],
        "flow_shard_runs_s": [[round(x, 1) for x in f[2]["shards"]["seconds"].values()] for f in flows],
        "prefect_server_start_s": round(server_s, 2),
        "model": args.model,
        "predicted_classes": predicted_classes(summary["run_dir"]),
        "flow_cold_vs_plain_loop": round(ratios[0], 3),
        "flow_vs_plain_loop": round(warm_median(ratios), 3),
        "flow_vs_plain_loop_runs": [round(x, 3) for x in ratios],
        "flow_vs_plain_loop_with_server_start": round((flow_s + server_s) / loop_s, 3),
        "flow_vs_plain_loop_cpu": round(warm_median(cpu_ratios), 3),
        "prefect_server_cpu_s": round(statistics.mean(server_cpu), 2),
        "prefect_server_cpu_during_loop_s": round(statistics.mean(server_cpu_loop), 2),
        "plain_loop_images_per_s": round(args.limit / loop_s, 2),
        "flow_images_per_s": round(args.limit / flow_s, 2),
    }


def predicted_classes(run_dir: str | Path) -> int:
    """How many classes the audited model predicted: the per-class analytics' real width."""
    from tasks.store import query

    return int(query(run_dir, "SELECT count(DISTINCT class_name) AS n FROM predictions")["n"][0])


def live_children_cpu() -> float:
    """User + system CPU of this process' live descendants: between loop runs, the Prefect server."""
    import psutil

    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            t = child.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


def fresh_run_dir(run_dir: Path, repeat: int) -> Path:
    """An empty run directory holding a copy of the prepared bank (each flow repeat computes anew)."""
    target = run_dir.with_name(f"{run_dir.name}-{repeat}")
    shutil.copytree(run_dir / "bank", target / "bank")
    return target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=1000, help="images to audit (default 1000)")
    p.add_argument(
        "--memory", action="store_true", help="also peak RSS on 1000 vs 10000 images (subprocesses)"
    )
    p.add_argument(
        "--model",
        default="efficientnet-lite0",
        choices=["efficientnet-lite0", "resnet50-random"],
        help="the audited classifier of the timing runs (default: Lite0, real ImageNet weights)",
    )
    p.add_argument("--memory-model", default="resnet18-64", choices=sorted(MODELS))
    p.add_argument("--memory-base", type=int, default=1000, help="N of the N vs 10*N memory runs (1000)")
    p.add_argument("--no-timing", action="store_true", help="skip the flow-vs-plain-loop comparison")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--loader-workers", type=int, default=2)
    p.add_argument("--probe-size", type=int, default=200)
    p.add_argument(
        "--repeats",
        type=int,
        default=4,
        help="flow runs, each between two plain loops; the first is the cold run (default 4)",
    )
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
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.rss_child:
        _rss_child(args.rss_child)
        return 0

    from flows.settings import apply_offline_defaults

    apply_offline_defaults()  # no telemetry from the test server (its heartbeat raced for the database)
    work = Path(tempfile.mkdtemp(prefix="textcam-bench-"))
    figures: dict[str, Any] = {}
    try:
        from textcam.vocab import load_vocabulary

        (work / "vocab.txt").write_text("\n".join(load_vocabulary(["general"])[: args.vocab_size]) + "\n")
        if args.memory:  # first: its children fork DataLoader workers, safest before Prefect threads exist
            figures.update(memory_figures(work, args))
        if not args.no_timing:
            figures = {**timing_figures(work, args), **figures}
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\n{'measure':<40}{'value':>14}")
    for key, value in figures.items():
        if not isinstance(value, dict | list):
            print(f"{key:<40}{value!s:>14}")
    for stage, seconds in figures.get("flow_stages_s", {}).items():
        print(f"  flow stage {stage:<28}{seconds:>14}")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
