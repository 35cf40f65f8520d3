"""Analytics at ImageNet scale (issue 14): each stage on simulated run directories, in its own process.

    .venv/bin/python bench/scale.py [--sizes 100000x10x37,1000000x1000x5505] [--stages duckdb,flags,report]

A size is images × classes × phrases. The simulated run directory holds what the explain stage writes:
explanation shards with the declared schema (``textcam.schema.EXPLANATIONS``; the first shard is passed
through the shard validation), one explanation per image, many classes predicted, phrases drawn from
class-dependent distributions over the vocabulary (the general vocabulary's first ``phrases`` entries),
and planted cues: the first ``--cues`` classes see their cue phrase in 90 % of their explanations (5 %
elsewhere), and on the simulated probe the model predicts the class whenever CLIP sees the cue.

Each stage (``build_duckdb``, ``flag_spurious`` with the probe behaviour, ``render_report``) runs in a
fresh process: seconds and peak RSS are that process's own. The flag stage also reports whether every
planted cue is its class's first flag: scaling must not change results. Cold numbers only: every stage
is a one-off in an audit. Where the explanations' null runs on a stratified sample (runs above
``FlagRule.null_images``), the ``nullcheck`` stage compares its per-class thresholds with the null on
every image, beside the full null's own difference between two permutation seeds. Last line: one JSON
object.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.config import FlagRule  # noqa: E402
from textcam.schema import EXPLANATIONS, IMAGES  # noqa: E402

SHARD_ROWS = 50_000
PROBE_IMAGES = 2_000


def cue_phrase(k: int, n_phrases: int) -> int:
    """The planted cue of class k: a phrase index away from the class's own phrases."""
    return (n_phrases // 2 + 3 * k) % n_phrases


def class_names(n: int) -> list[str]:
    return [f"class {i:04d}" for i in range(n)]


def vocabulary(n: int) -> list[str]:
    from textcam.vocab import load_vocabulary

    words = load_vocabulary(["general"])
    if n > len(words):
        raise ValueError(f"at most {len(words)} phrases")
    return words[:n]


def simulate(
    run_dir: Path, n_images: int, n_classes: int, n_phrases: int, n_cues: int, seed: int = 0
) -> None:
    """Write ``run_dir``: explanation shards, images table, summary (see module docstring)."""
    rng = np.random.default_rng(seed)
    (run_dir / "explanations").mkdir(parents=True, exist_ok=True)
    (run_dir / "errors").mkdir(exist_ok=True)
    names, words = class_names(n_classes), vocabulary(n_phrases)
    text = pa.array(words, pa.string())
    pred = rng.integers(0, n_classes, n_images)
    label = np.where(rng.random(n_images) < 0.9, pred, rng.integers(0, n_classes, n_images))
    # Per image: the class's own phrase, four phrases from a class-dependent distribution (a window of
    # the vocabulary starting at the class's offset, exponentially weighted), and one "against" phrase.
    own = (pred * 7919) % n_phrases
    pool = (own[:, None] + 1 + rng.exponential(n_phrases / 20, (n_images, 4)).astype(np.int64)) % n_phrases
    against = rng.integers(0, n_phrases, n_images)
    cue_of = np.array([cue_phrase(k, n_phrases) for k in range(n_classes)])
    has_cue = np.where(pred < n_cues, rng.random(n_images) < 0.9, rng.random(n_images) < 0.05)
    for_idx = np.concatenate([own[:, None], pool, cue_of[pred][:, None]], 1)  # (N, 6), last = cue
    for_score = np.concatenate(
        [
            1 + rng.random((n_images, 1)),
            0.2 + 0.5 * rng.random((n_images, 4)),
            0.8 + 0.4 * rng.random((n_images, 1)),
        ],
        1,
    )
    keep = np.ones_like(for_idx, dtype=bool)
    keep[:, -1] = has_cue
    sal = rng.random((n_images, 49)).astype(np.float16)
    label_names = np.asarray(names, dtype=object)
    for s, start in enumerate(range(0, n_images, SHARD_ROWS)):
        sl = slice(start, min(n_images, start + SHARD_ROWS))
        b = sl.stop - sl.start
        k_for = keep[sl]
        idx = np.concatenate([for_idx[sl], against[sl, None]], 1)
        score = np.concatenate([for_score[sl], -(0.2 + 0.4 * rng.random((b, 1)))], 1)
        mask = np.concatenate([k_for, np.ones((b, 1), dtype=bool)], 1)
        counts = mask.sum(1)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        flat_idx, flat_score = idx[mask], score[mask].astype(np.float32)
        direction = np.where(
            np.concatenate([np.zeros_like(k_for), np.ones((b, 1), dtype=bool)], 1)[mask], 1, 0
        )
        phrases = pa.ListArray.from_arrays(
            pa.array(offsets),
            pa.StructArray.from_arrays(
                [
                    text.take(pa.array(flat_idx)),
                    pa.array(flat_score, pa.float32()),
                    pa.array(np.array(["for", "against"], dtype=object)[direction], pa.string()),
                    pa.array(direction == 0, pa.bool_()),  # shown
                    pa.array(direction == 0, pa.bool_()),  # seen
                ],
                fields=list(EXPLANATIONS.field("phrases").type.value_type),
            ),
        )
        # the nearest phrases: the "for" phrases again (as often in real runs), seen where selected
        near_offsets = np.concatenate([[0], np.cumsum(k_for.sum(1))]).astype(np.int32)
        nearest = pa.ListArray.from_arrays(
            pa.array(near_offsets),
            pa.StructArray.from_arrays(
                [
                    text.take(pa.array(for_idx[sl][k_for])),
                    pa.array(for_score[sl][k_for].astype(np.float32), pa.float32()),
                    pa.array(np.ones(int(k_for.sum()), dtype=bool), pa.bool_()),
                ],
                fields=list(EXPLANATIONS.field("nearest").type.value_type),
            ),
        )
        p = pred[sl]
        pn = pa.array(label_names[p], pa.string())
        topk = pa.ListArray.from_arrays(
            pa.array(np.arange(b + 1, dtype=np.int32)),
            pa.StructArray.from_arrays(
                [pa.array(p.astype(np.int32)), pn, pa.array(np.full(b, 0.9, np.float32))],
                fields=list(EXPLANATIONS.field("topk").type.value_type),
            ),
        )
        ids = pa.array([f"img{i:08d}" for i in range(sl.start, sl.stop)], pa.string())
        paths = pa.array(
            [f"{names[k]}/img{i:08d}.jpg" for i, k in zip(range(sl.start, sl.stop), p, strict=True)]
        )
        columns = {
            "run_id": pa.array(["run-scale"] * b, pa.string()),
            "image_id": ids,
            "path": paths,
            "label": pa.array(label_names[label[sl]], pa.string()),
            "pred": pa.array(p.astype(np.int32)),
            "pred_name": pn,
            "prob": pa.array(np.full(b, 0.9, np.float32)),
            "topk": topk,
            "target_class": pa.array(p.astype(np.int32)),
            "target_name": pn,
            "rank_of_target": pa.array(np.zeros(b, np.int32)),
            "phrases": phrases,
            "nearest": nearest,
            "groups": pa.array([[]] * b, EXPLANATIONS.field("groups").type),
            "saliency": pa.ListArray.from_arrays(
                pa.array(np.arange(0, 49 * b + 1, 49, dtype=np.int32)),
                pa.array(sal[sl].ravel(), pa.float16()),
            ),
            "map_h": pa.array(np.full(b, 7, np.int32)),
            "map_w": pa.array(np.full(b, 7, np.int32)),
            "model_id": pa.array(["sim"] * b, pa.string()),
            "layer": pa.array(["layer4"] * b, pa.string()),
            "bank_id": pa.array(["bank"] * b, pa.string()),
            "clip_id": pa.array(["clip"] * b, pa.string()),
            "method": pa.array(["cam"] * b, pa.string()),
        }
        table = pa.Table.from_pydict(columns, schema=EXPLANATIONS)
        pq.write_table(table, run_dir / "explanations" / f"shard-{s:05d}.parquet")
    images = pa.table(
        {
            "image_id": pa.array([f"img{i:08d}" for i in range(n_images)]),
            "path": pa.array([f"{names[k]}/img{i:08d}.jpg" for i, k in enumerate(pred)]),
            "label": pa.array(label_names[label], pa.string()),
            "split": pa.array(["train"] * n_images),
        },
        schema=IMAGES,
    )
    pq.write_table(images, run_dir / "images.parquet")
    (run_dir / "summary.json").write_text(
        json.dumps({"run_id": "run-scale", "dataset_root": str(run_dir), "n_images": n_images, "n_errors": 0})
    )


def probe(n_classes: int, n_phrases: int, n_cues: int, seed: int = 1):
    """A probe where CLIP sees each phrase in a tenth of the images and the model is right 90 % of the
    time, except that it predicts a cue class whenever CLIP sees that class's cue."""
    from tasks.behaviour import ProbeBehaviour

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, PROBE_IMAGES)
    presence = rng.random((PROBE_IMAGES, n_phrases)) < 0.1
    pred = np.where(rng.random(PROBE_IMAGES) < 0.9, labels, rng.integers(0, n_classes, PROBE_IMAGES))
    for k in range(n_cues):
        pred[presence[:, cue_phrase(k, n_phrases)]] = k
    return ProbeBehaviour(presence, vocabulary(n_phrases), pred, labels, np.zeros(n_phrases))


def class_text(n_classes: int, n_phrases: int, dim: int = 64):
    from tasks.flags import ClassText

    rng = np.random.default_rng(2)
    texts = class_names(n_classes) + vocabulary(n_phrases)
    return ClassText(dict(zip(texts, rng.standard_normal((len(texts), dim)), strict=True)))


def browser_load(html: Path, n_classes: int) -> dict:
    """Seconds until headless Chromium has loaded the report and drawn its class index, and whether the
    last class is reachable by search (None: no Chromium here)."""
    chromium = Path("/usr/bin/chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return {"skipped": "playwright not installed"}
    if not chromium.is_file():
        return {"skipped": "no /usr/bin/chromium"}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            t0 = time.perf_counter()
            page.goto(html.as_uri(), wait_until="load")
            page.wait_for_selector("#class-index-body tr")
            seconds = time.perf_counter() - t0
            last = class_names(n_classes)[-1]
            page.fill("#class-search", last)
            found = page.locator("#class-index-body tr").count() == 1
            page.click("#class-index-body button")
            shown = last in page.inner_text("#class-detail h3")
        finally:
            browser.close()
    return {"load_seconds": seconds, "last_class_reachable": bool(found and shown)}


def null_check(run_dir: Path) -> dict:
    """The explanations' null on its stratified sample against the null on every image: the per-class
    thresholds' mean absolute difference, beside the difference between two permutation seeds of the
    full null (the Monte Carlo noise the sample is measured against)."""
    from tasks.config import FlagRule
    from tasks.flags import explanation_null
    from tasks.store import connect

    rule = FlagRule()
    con = connect(run_dir)
    try:
        sample, full, seed_1 = (
            pd.Series(explanation_null(con, r)[0].thresholds(rule.quantile))
            for r in (rule, rule.model_copy(update={"null_images": None}), FlagRule(null_images=None, seed=1))
        )
    finally:
        con.close()
    return {
        "null_images": rule.null_images,
        "threshold_mean_sample": round(float(sample.mean()), 3),
        "threshold_mean_full": round(float(full.mean()), 3),
        "mean_abs_diff_sample_vs_full": round(float((sample - full).abs().mean()), 3),
        "mean_abs_diff_full_seed_0_vs_1": round(float((seed_1 - full).abs().mean()), 3),
    }


def peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM). Not ``getrusage``: Linux carries the parent's peak across
    fork and exec into ``ru_maxrss``, so every stage would report at least the simulator's size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_stage(stage: str, run_dir: Path, n_classes: int, n_phrases: int, n_cues: int) -> dict:
    """One stage in this process; returns its figures."""
    t0 = time.perf_counter()
    out: dict = {}
    if stage == "validate":
        from tasks.quality import validate_shard

        first = sorted((run_dir / "explanations").glob("*.parquet"))[0]
        result = validate_shard(first)
        out["valid"], out["failures"] = result.ok, result.failures[:3]
    elif stage == "duckdb":
        from tasks.store import build_duckdb

        build_duckdb(run_dir)
    elif stage == "flags":
        from tasks.flags import flag_spurious

        text, behaviour = class_text(n_classes, n_phrases), probe(n_classes, n_phrases, n_cues)
        t0 = time.perf_counter()  # the simulated inputs are not the stage's cost
        flags = flag_spurious(run_dir, text, behaviour=behaviour)
        first = flags[flags["rank"] == 1].set_index("class_name")["phrase"].to_dict()
        words, names = vocabulary(n_phrases), class_names(n_classes)
        out["cues_first"] = sum(first.get(names[k]) == words[cue_phrase(k, n_phrases)] for k in range(n_cues))
        out["n_flags"] = len(flags)
    elif stage == "nullcheck":
        out.update(null_check(run_dir))
    elif stage == "report":
        from reports import render_report

        html = Path(render_report(run_dir))
        out["report_mb"] = html.stat().st_size / 1e6
        out["seconds"] = time.perf_counter() - t0
        out["browser"] = browser_load(html, n_classes)
        out["peak_rss_mb"] = peak_rss_mb()
        return out
    else:
        raise ValueError(f"unknown stage {stage!r}")
    out.update(seconds=time.perf_counter() - t0, peak_rss_mb=peak_rss_mb())
    return out


def figures(results: list[dict], cues: int) -> dict:
    """The issue's named figures, for the sizes that ran (``scale_<images>_<classes>_...``)."""
    out: dict = {}
    stages = ("duckdb", "flags", "report")
    peaks: dict[tuple[int, int], float] = {}
    for r in results:
        images = f"{r['images'] // 1_000_000}m" if r["images"] % 1_000_000 == 0 else f"{r['images'] // 1000}k"
        name = f"scale_{images}_{r['classes']}"
        ran = [r[s] for s in stages if s in r and "seconds" in r[s]]
        if ran:
            out[f"{name}_peak_rss_mb"] = round(max(x["peak_rss_mb"] for x in ran))
            peaks[r["images"], r["classes"]] = max(x["peak_rss_mb"] for x in ran)
            out[f"{name}_analytics_s"] = round(sum(x["seconds"] for x in ran), 1)
        if r["classes"] >= 1000 and "report" in r and "report_mb" in r["report"]:
            out["report_1000_classes_mb"] = round(r["report"]["report_mb"], 2)
            out["report_load_s"] = r["report"].get("browser", {}).get("load_seconds")
    # Memory must not grow with the number of images: the 1M run's peak over the 100k run's, per shape.
    ratios = {
        k: peaks[1_000_000, k] / peaks[100_000, k]
        for (n, k) in peaks
        if n == 1_000_000 and (100_000, k) in peaks
    }
    for k, ratio in ratios.items():
        out[f"scale_rss_ratio_1m_vs_100k_{k}"] = round(ratio, 3)
    if ratios:
        out["scale_rss_ratio_1m_vs_100k"] = round(max(ratios.values()), 3)
    checks = [r["nullcheck"] for r in results if "mean_abs_diff_sample_vs_full" in r.get("nullcheck", {})]
    if checks:  # the sampled null against the full one, beside the full null's own seed-to-seed noise
        out["null_sample_vs_full_threshold_diff"] = max(c["mean_abs_diff_sample_vs_full"] for c in checks)
        out["null_seed_vs_seed_threshold_diff"] = max(c["mean_abs_diff_full_seed_0_vs_1"] for c in checks)
    out["scale_planted_found"] = all(
        r.get("flags", {}).get("cues_first") == cues for r in results if "flags" in r
    )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--sizes", default="100000x10x37,10000x1000x5505", help="images x classes x phrases, comma-separated"
    )
    ap.add_argument("--stages", default="validate,duckdb,flags,report,nullcheck")
    ap.add_argument("--cues", type=int, default=3, help="classes with a planted cue")
    ap.add_argument("--work", type=Path, help="where the simulated runs go (default: a temporary directory)")
    ap.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage in this process
    ap.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.stage:
        k, p = (int(v) for v in args.shape.split("x"))
        print(json.dumps(run_stage(args.stage, args.run, k, p, args.cues)))
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="textcam-scale-"))
    results = []
    for size in args.sizes.split(","):
        n, k, p = (int(v) for v in size.split("x"))
        run_dir = work / size
        t0 = time.perf_counter()
        simulate(run_dir, n, k, p, args.cues)
        row = {
            "images": n,
            "classes": k,
            "phrases": p,
            "simulate_seconds": round(time.perf_counter() - t0, 1),
        }
        for stage in args.stages.split(","):
            if stage == "nullcheck" and n <= (FlagRule().null_images or n):
                row[stage] = {"skipped": "the null already uses every image"}
                continue
            cmd = [sys.executable, __file__, "--stage", stage, "--run", str(run_dir), "--shape", f"{k}x{p}"]
            cmd += ["--cues", str(args.cues)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                row[stage] = {"failed": proc.returncode, "stderr": proc.stderr.strip().splitlines()[-1:]}
            else:
                row[stage] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{size} {stage}: {row[stage]}", flush=True)
        results.append(row)
    ok = all(r.get("flags", {}).get("cues_first") == args.cues for r in results if "flags" in r)
    print(
        json.dumps(
            {"sizes": results, "cues": args.cues, "cues_first_everywhere": ok, **figures(results, args.cues)}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
