"""The refit's alternatives (issue 13), side by side on one truth-sweep seed's worlds.

    OMP_NUM_THREADS=1 .venv/bin/python bench/refit_variants.py [--seed 11] [--draws 16] [--cache-dir DIR]

(One thread gives the recorded figures to the digit; other thread counts move single cues by 0.01.)

Worlds: the first ``--draws`` biased worlds of ``bench/sweep.py``'s draw for ``--seed`` (worlds not yet in
the cache are built; run the sweep first to share its cache). For every planted cue the classifier uses
(accuracy gap aligned − conflicting ≥ 0.3 on the unbiased test split), a new last layer is fitted on the
biased training split (what a self audit's probe is), with the cue as CLIP sees it, and scored on the
test split. Variants, each :func:`textcam.intervene.concept_balanced_head`:

* ``refit``: what ``textcam intervene --refit`` fits (its defaults: the cue erased, groups equal);
* ``l2_0.1``: ten times the L2 penalty (``c`` 0.1), against over-fitting a handful of images;
* ``balance_0.5``: group weights ∝ size^-0.5 instead of equal totals;
* ``attribute``: every value of the cue's attribute erased (CLIP's presence of each value's phrase),
  not the cue alone: the head cannot lean on "not water" either;
* ``probe_split``: the refit fitted on the unbiased probe split with the generator's groups: what the
  same features allow where the data shows the class without the cue (a ceiling, not a method).

Per cue, ``n_without``: training images of the class without the cue, as CLIP sees it. Last line: one
JSON object; per variant the mean bias-conflicting accuracy, the share of cues gaining ≥ 0.3, the mean
worst group and the mean test accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's code, not whichever one the environment installed

from bench.intervene import held_out_set  # noqa: E402
from bench.sweep import USED, draw_worlds  # noqa: E402
from textcam.clip import load_clip  # noqa: E402
from textcam.intervene import concept_balanced_head, group_accuracy, layer_features  # noqa: E402
from textcam.models import load_model  # noqa: E402
from textcam.synthetic.classifier import to_classifier_tensor  # noqa: E402
from textcam.synthetic.world import build_world, split_batch  # noqa: E402
from textcam.vocab import load_vocabulary  # noqa: E402

VARIANTS = ("refit", "l2_0.1", "balance_0.5", "attribute", "probe_split")
GAIN = 0.3


def world_cues(name: str, config, cache_dir: str | None) -> list[dict[str, Any]]:
    """Every used cue of one world, with each variant's group accuracies on the test split."""
    world = build_world(config, cache_dir, progress=False)
    model = load_model(world.classifier_checkpoint)
    clip = load_clip(world.clip_open_clip_id)
    phrases = load_vocabulary(["clevr"])
    text = clip.encode_texts(phrases).cpu()
    test = split_batch(config, "test")
    logits, feats = layer_features(model.module, model.target_layer, to_classifier_tensor(test.images))
    feats_test, labels = feats.numpy().astype(np.float64), test.records["label"].to_numpy()
    train, probe = (held_out_set(model, clip, text, config, s) for s in ("train", "probe"))
    names = list(world.class_names)
    rows = []
    for spec in config.biases:
        cls = names.index(spec.label)
        present = (test.records[spec.attribute] == spec.value).to_numpy()
        before = group_accuracy(logits.argmax(1).numpy(), labels, present, cls)
        gap = before["groups"]["class_with"] - before["groups"]["class_without"]
        if gap < USED:
            continue
        values = world.phrases[spec.attribute]
        seen = train["presence"][:, phrases.index(values[spec.value])]
        family = [phrases.index(p) for p in values.values() if p in phrases]
        side = (feats_test, labels, present, cls, len(names))
        truth_probe = (probe["records"][spec.attribute] == spec.value).to_numpy()
        rows.append(
            {
                "world": name,
                "spec": str(spec),
                "gap": gap,
                "before": before["conflicting"],
                "n_without": int(((train["labels"] == cls) & ~seen).sum()),
                "refit": scored(train, seen, side),
                "l2_0.1": scored(train, seen, side, c=0.1),
                "balance_0.5": scored(train, seen, side, balance=0.5),
                "attribute": scored(train, seen, side, erased=train["presence"][:, family]),
                "probe_split": scored(probe, truth_probe, side),
            }
        )
    return rows


def scored(held: dict[str, Any], groups: np.ndarray, side: tuple, **options: Any) -> dict[str, float]:
    """A refit on ``held`` (grouped by ``groups``), scored on the test split: ``side`` is its features,
    labels, the cue's presence, the cue's class and the number of classes."""
    feats_test, labels, present, cls, n_classes = side
    weight, bias = concept_balanced_head(held["features"], held["labels"], groups, n_classes, **options)
    acc = group_accuracy((feats_test @ weight.T + bias).argmax(1), labels, present, cls)
    return {k: acc[k] for k in ("conflicting", "worst_group", "accuracy")}


def summarise(cues: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"used_cues": len(cues)}
    for v in VARIANTS:
        out[f"{v}_conflicting_acc"] = round(float(np.mean([c[v]["conflicting"] for c in cues])), 3)
        wins = [c[v]["conflicting"] - c["before"] >= GAIN for c in cues]
        out[f"{v}_win_rate"] = round(float(np.mean(wins)), 3)
        out[f"{v}_worst_group"] = round(float(np.mean([c[v]["worst_group"] for c in cues])), 3)
        out[f"{v}_accuracy"] = round(float(np.mean([c[v]["accuracy"] for c in cues])), 3)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=11, help="the truth sweep's seed whose worlds to use")
    ap.add_argument("--draws", type=int, default=16, help="the first N biased worlds of the draw")
    ap.add_argument("--cache-dir", help="world cache (default: the sweep's)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    cues = []
    for d in [d for d in draw_worlds(args.seed, 21, 6) if d.kind == "biased"][: args.draws]:
        rows = world_cues(d.name, d.config(), args.cache_dir)
        for c in rows:
            line = " ".join(f"{v} {c[v]['conflicting']:.2f}" for v in VARIANTS)
            print(f"{d.name} {c['spec']} without {c['n_without']}: before {c['before']:.2f} | {line}")
        cues += rows
    if not cues:
        raise SystemExit("no used cue in these worlds: raise --draws")
    print(json.dumps({"seed": args.seed, "draws": args.draws} | summarise(cues)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
