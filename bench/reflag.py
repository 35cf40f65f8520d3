"""Re-run only the flag stage of a sweep's training-split audits, on the explanations it stored (issue 11).

    .venv/bin/python bench/reflag.py --seed S --from runs/sweep-X --out runs/sweep-Y
    .venv/bin/python bench/sweep.py --seed S --out runs/sweep-Y --cached-only   # the summary

A change to the flag rule for training-split audits (``flags.probe_seen_in_training``) leaves the worlds,
the banks and the explanations as they were: this recomputes the self audit's probe behaviour (the bank
calibrated on the training split, as ``bench/sweep.py`` does), runs the flag stage of the current code on
a copy of each world's self-audit run directory, and writes the world's result to ``--out`` with the self
audit's figures replaced (the test audit's, and the shown-phrase figures that come from it, are copied
as they were). Prints every world whose flags changed; with the code that made the sweep, none should.
Last line: one JSON object (worlds, worlds whose flags changed, used cues first before and after).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.sweep import (  # noqa: E402
    WorldDraw,
    audit_result,
    cached_result,
    draw_worlds,
    flag_run,
    load_models,
    probe_evidence,
    result_file,
    used_cues,
)
from textcam.synthetic.world import build_world  # noqa: E402


def reflag_world(
    draw: WorldDraw, result: dict[str, Any], src: Path, dst: Path, cache_dir: str | None
) -> dict:
    """``result`` with its self audit flagged again by the current code (the run directory copied)."""
    name = f"{draw.name}-self"
    run_dir = dst / "runs" / name
    shutil.copytree(src / "runs" / name, run_dir, dirs_exist_ok=True)
    cfg = draw.config()
    m = load_models(build_world(cfg, cache_dir, progress=False))
    _, behaviour, correlation = probe_evidence(m, "train")
    flags = flag_run(m, run_dir, behaviour, "train", correlation)
    a = {"flags": flags, "candidates": pd.read_parquet(run_dir / "flag_candidates.parquet")}
    gaps = {k: {"gap": v} for k, v in result["gaps"].items()}
    specs = list(cfg.biases) + list(cfg.eval_biases)
    return result | {"self": audit_result(m, a, specs, gaps)}


def used_first(results: list[dict[str, Any]]) -> tuple[int, int]:
    used = [c for r in results if r["kind"] == "biased" for c in used_cues(r, "self")]
    return sum(c["first"] for c in used), len(used)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, required=True, help="the sweep seed")
    parser.add_argument("--from", dest="src", type=Path, required=True, help="the sweep's --out")
    parser.add_argument("--out", type=Path, required=True, help="where the re-flagged results go")
    parser.add_argument("--biased", type=int, default=21, help="the sweep's --biased (default 21)")
    parser.add_argument("--controls", type=int, default=6, help="the sweep's --controls (default 6)")
    parser.add_argument("--only-clip-seed", type=int, help="only the worlds of this CLIP (one process each)")
    parser.add_argument(
        "--cache-dir", help="world cache (default $TEXTCAM_CACHE/world or ~/.cache/textcam/world)"
    )
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    src, dst = args.src / f"seed-{args.seed}", args.out / f"seed-{args.seed}"
    if not (src / "worlds").is_dir():
        parser.error(f"no sweep results under {src}: run bench/sweep.py --seed {args.seed} --out {args.src}")
    before, after, changed = [], [], []
    for draw in draw_worlds(args.seed, args.biased, args.controls):
        result = cached_result(draw, src)
        if result is None or (args.only_clip_seed is not None and draw.clip_seed != args.only_clip_seed):
            continue
        new = reflag_world(draw, json.loads(json.dumps(result)), src, dst, args.cache_dir)
        path = result_file(draw, dst)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(new, indent=1, default=str))
        before.append(result)
        after.append(new)
        gone = sorted(set(result["self"]["flags"]) - set(new["self"]["flags"]))
        added = sorted(set(new["self"]["flags"]) - set(result["self"]["flags"]))
        if gone or added:
            changed.append(draw.name)
            print(f"{draw.name} (clip {draw.clip_seed}): - {gone} + {added}", flush=True)
    (k0, n), (k1, _) = used_first(before), used_first(after)
    summary = {
        "seed": args.seed,
        "worlds": len(after),
        "worlds_changed": changed,
        "selfprobe_first_before": f"{k0}/{n}",
        "selfprobe_first_after": f"{k1}/{n}",
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
