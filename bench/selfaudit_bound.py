"""How much of a classifier's use of a planted cue its own training split can show (issue 11).

    .venv/bin/python bench/selfaudit_bound.py --seed S --out runs/sweep-X [--permutations 1000]

Reads the worlds a ``bench/sweep.py`` run evaluated (same ``--seed``, ``--out`` and cache) and, for every
used cue of its biased worlds (test-split accuracy gap ≥ 0.3: the sweep's own definition), asks the
training split, as the training-split audit sees it, whether the model's predictions there move with the
cue at all. The flag rule's own test on one pair, the cue *for* its class: the CMH z of "shows the cue"
against "predicted as the class" within true labels, over the ``1 − alpha`` quantile of the same pair's
permutation null (one pair, so no family-wise maximum: more lenient than the audit), and the effect in
the flag's direction. Two presence calls:

* ``truth``: the generator's records, a CLIP that never errs;
* ``clip``: the audit's own call (``tasks.behaviour.probe_behaviour`` on the split's CLIP embeddings).

A cue that fails with ``truth`` cannot be flagged from what the model does on that split by any rule that
needs a test of use (the training-split audit's named pairs need the null and an effect in the
direction: ``lenient`` below; unnamed ones an effect of at least ``min_effect_in_training``: ``strong``).
The misses of the sweep's training-split audits are split by where they are lost: in the data (``truth``
fails: ``misses_lost_in_data``), in CLIP's z (the records' z is over the audit's own family-wise threshold
for the pair, CLIP's is not: ``misses_lost_in_clip_z``), or after both (``misses_lost_after``: the effect
bound, the naming, the order of the steps, or the data check, which reads CLIP's presence too).

Per cue: the split's images of the class without the cue and of other classes with it (the only images
that can show use), the model's accuracy on them (near 1: it learned them), CLIP's agreement with the
records (phi) and the audit's own figures for the pair. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.sweep import (  # noqa: E402
    WorldDraw,
    cached_result,
    draw_worlds,
    load_models,
    probe_evidence,
    used_cues,
    wilson_lower,
)
from tasks.behaviour import (  # noqa: E402
    ProbeBehaviour,
    evidence_grid,
    over_threshold,
    phi,
)
from tasks.config import MIN_EFFECT_IN_TRAINING  # noqa: E402
from textcam.synthetic.bias import BiasSpec  # noqa: E402
from textcam.synthetic.world import build_world  # noqa: E402

ALPHA = 0.01  # the flag rule's level


def pair_test(
    present: np.ndarray,
    predictions: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    cls: int,
    n_permutations: int,
) -> dict[str, float | bool]:
    """The flag rule's first step on the one pair (cue *for* ``cls``): z, the null's quantile, effect."""
    behaviour = ProbeBehaviour(present[:, None], ["cue"], predictions, labels, np.zeros(1))
    eligible = np.zeros((n_classes, 1, 2), dtype=bool)
    eligible[cls, 0, 0] = True
    figures = evidence_grid(
        behaviour, n_classes, eligible, alpha=ALPHA, n_permutations=n_permutations, max_steps=1
    ).figures
    z, thr, effect = (float(figures[name][cls, 0, 0]) for name in ("z_first", "threshold", "effect_first"))
    over = bool(np.isfinite(z) and over_threshold(z, thr))
    return {
        "z": round(z, 3),
        "threshold": round(thr, 3),
        "effect": round(effect, 3),
        "lenient": over and effect > 0,
        "strong": over and effect >= MIN_EFFECT_IN_TRAINING,
    }


def audit_row(run_dir: Path, cls: str, phrase: str) -> dict[str, Any]:
    """What the training-split audit itself saw of the cue's pair: its first-step z and effect, the
    family-wise threshold of the step that decided it, and the reason."""
    cand = pd.read_parquet(run_dir / "flag_candidates.parquet")
    row = cand[(cand["class_name"] == cls) & (cand["phrase"] == phrase) & (cand["direction"] == "for")]
    if not len(row):
        return {"reason": "not among the class's candidates"}
    r = row.iloc[0]
    return {k: round(float(r[k]), 3) for k in ("z_first", "effect_first", "model_threshold")} | {
        "reason": r["reason"]
    }


def world_bounds(
    draw: WorldDraw, result: dict[str, Any], cache_dir: str | None, n_perm: int, out_dir: Path
) -> list[dict]:
    """Every used cue of one biased world: its training split's evidence, with truth and CLIP presence."""
    used = used_cues(result, "self")
    if not used:
        return []
    world = build_world(draw.config(), cache_dir, progress=False)
    m = load_models(world)
    train = world.manifest("train")
    _, clip, _ = probe_evidence(m, "train")  # the training-split audit's own probe pass and presence call
    if len(clip.predictions) != len(train):
        raise RuntimeError(f"{draw.name}: the probe pass did not keep every training image")
    labels, predictions = train["label"].to_numpy(), clip.predictions
    classes = list(world.class_names)
    out = []
    for cue in used:
        spec = BiasSpec.parse(cue["spec"])
        k = classes.index(spec.label)
        truth = (train[spec.attribute] == spec.value).to_numpy()
        j = m.phrases.index(cue["phrase"])
        own, other = labels == k, labels != k
        informative = (own & ~truth) | (other & truth)
        out.append(
            {
                "world": draw.name,
                "clip_seed": draw.clip_seed,
                "spec": cue["spec"],
                "gap": round(cue["gap"], 3),
                "self_first": cue["first"],
                "self_first_flag": cue["first_flag"],
                "class_without_cue": int((own & ~truth).sum()),
                "others_with_cue": int((other & truth).sum()),
                "accuracy_on_those": (
                    round(float((predictions[informative] == labels[informative]).mean()), 3)
                    if informative.any()
                    else None
                ),
                # where CLIP's call of the cue on this split agrees with the records (phi, all images)
                "clip_agreement": round(float(phi(truth[:, None], clip.presence[:, [j]])[0, 0]), 3),
                "audit": audit_row(out_dir / "runs" / f"{draw.name}-self", spec.label, cue["phrase"]),
                "truth": pair_test(truth, predictions, labels, len(classes), k, n_perm),
                "clip": pair_test(
                    clip.presence[:, m.phrases.index(cue["phrase"])],
                    predictions,
                    labels,
                    len(classes),
                    k,
                    n_perm,
                ),
            }
        )
    return out


def clip_z_lost(cue: dict[str, Any]) -> bool:
    """The records' z is over the audit's own (family-wise) threshold for the pair and CLIP's is not."""
    thr = cue["audit"].get("model_threshold", float("nan"))
    return bool(over_threshold(cue["truth"]["z"], thr) and not over_threshold(cue["clip"]["z"], thr))


def summarise(cues: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(cues)

    def rate(pred: Any) -> dict[str, Any]:
        k = sum(bool(pred(c)) for c in cues)
        return {"k": k, "rate": round(k / n, 3) if n else None, "lb": round(wilson_lower(k, n), 3)}

    misses = [c for c in cues if not c["self_first"]]
    return {
        "used_cues": n,
        "selfprobe_first": rate(lambda c: c["self_first"]),
        "truth_lenient": rate(lambda c: c["truth"]["lenient"]),
        "truth_strong": rate(lambda c: c["truth"]["strong"]),
        "clip_lenient": rate(lambda c: c["clip"]["lenient"]),
        "clip_strong": rate(lambda c: c["clip"]["strong"]),
        "misses": len(misses),
        "misses_lost_in_data": sum(not c["truth"]["lenient"] for c in misses),
        "misses_lost_in_clip_z": sum(c["truth"]["lenient"] and clip_z_lost(c) for c in misses),
        "misses_lost_after": sum(c["truth"]["lenient"] and not clip_z_lost(c) for c in misses),
        "first_without_truth_evidence": sum(c["self_first"] and not c["truth"]["lenient"] for c in cues),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, required=True, help="the sweep seed whose worlds to read")
    parser.add_argument("--out", type=Path, required=True, help="the sweep's --out (its per-world results)")
    parser.add_argument("--biased", type=int, default=21, help="the sweep's --biased (default 21)")
    parser.add_argument("--controls", type=int, default=6, help="the sweep's --controls (default 6)")
    parser.add_argument(
        "--cache-dir", help="world cache (default $TEXTCAM_CACHE/world or ~/.cache/textcam/world)"
    )
    parser.add_argument("--permutations", type=int, default=1000, help="permutations of the one-pair null")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    out = args.out / f"seed-{args.seed}"
    if not (out / "worlds").is_dir():
        parser.error(f"no sweep results under {out}: run bench/sweep.py --seed {args.seed} --out {args.out}")
    cues: list[dict[str, Any]] = []
    for draw in draw_worlds(args.seed, args.biased, args.controls):
        result = cached_result(draw, out) if draw.kind == "biased" else None
        if result is None:
            continue
        for c in world_bounds(draw, result, args.cache_dir, args.permutations, out):
            cues.append(c)
            t, p = c["truth"], c["clip"]
            print(
                f"{c['world']} {c['spec']} gap {c['gap']:.2f} self-first {c['self_first']} "
                f"({c['self_first_flag']}) | without {c['class_without_cue']} / others with "
                f"{c['others_with_cue']}, accuracy {c['accuracy_on_those']} | CLIP agrees "
                f"{c['clip_agreement']} | audit {c['audit']} | truth z {t['z']} thr "
                f"{t['threshold']} effect {t['effect']} | clip z {p['z']} thr {p['threshold']} "
                f"effect {p['effect']}",
                flush=True,
            )
    summary = summarise(cues) | {"seed": args.seed, "seconds": round(time.perf_counter() - t0, 1)}
    (out / "selfaudit_bound.json").write_text(json.dumps({"summary": summary, "cues": cues}, indent=1))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
