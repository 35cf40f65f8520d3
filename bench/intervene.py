"""Debiasing by concept suppression (issue 13), measured against the ground truth and the DFR anchor.

    .venv/bin/python bench/intervene.py [--seed 3] [--max-worlds 12] [--cache-dir DIR] [--flags-from OUT]

Worlds: the demo's biased world and control (CLIP seed 0), then the truth sweep's worlds of ``--seed``
(``bench/sweep.py``'s generator; worlds not yet in the cache are built, so run the sweep first to share
its cache). For every planted cue the classifier uses (accuracy gap aligned − conflicting ≥ 0.3 on the
unbiased test split), with the bank calibrated on the probe split:

* the cue phrase's channels by the rule of :mod:`textcam.intervene` (``alpha`` 0.01), suppressed by zero
  and by their probe mean; accuracy overall, per group (class × cue present/absent) and worst group on
  the test split, before and after;
* the same number of random channels (5 draws, probe mean): ``random_gain``;
* fixed sizes (the top 8, 16, 32, 64 channels by the rule's ranking, probe mean): the trade-off curve;
* DFR (Kirichenko et al. 2023): logistic regression on the target layer's pooled features of a
  group-balanced subset of the probe split (it needs group labels; suppression does not);
* the refit (``textcam intervene --refit``): a new last layer on a labelled held-out set, the cue (*as
  CLIP sees it*, no group labels) erased from the features within classes and every group (class × cue)
  weighing the same (:func:`textcam.intervene.concept_balanced_head`); no channel is suppressed. Two
  held-out sets: the biased training split (what a self-audit's probe is) and the unbiased probe split.
  Beside it, on the same set: the balance without the erasure (``no_erase``), the cue's channels zeroed
  as well (``zeroed``), the generator's groups instead of CLIP's (``truth``), no erasure and no balance
  (``erm``: what the data alone does) and a random non-class phrase erased and balanced by
  (``random_phrase``, 5 draws);
* ``clip_presence_agreement``: AUC of the tiny CLIP's image-phrase similarity for cue presence.

With ``--flags-from`` (a truth sweep's ``--out`` folder for the same seed) each cue is acted on through its
class's first "for" flag in the sweep's audits, as a user would: the test audit's for suppression and the
probe-split refit, the self audit's for the refit on the training split. A cue whose audit flagged
nothing for its class is not acted on and counts as no gain (``acted_on_*``, ``refit_*_unflagged``).

Control worlds: suppressing the non-class phrase with the most channels; ``control_suppression_drop``
is the test accuracy lost. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.sweep import USED, draw_worlds  # noqa: E402
from flows.demo import demo_world  # noqa: E402
from textcam.bank import ChannelBank  # noqa: E402
from textcam.clip import load_clip  # noqa: E402
from textcam.intervene import (  # noqa: E402
    ConceptChannels,
    Suppression,
    class_concept_groups,
    concept_balanced_head,
    concept_channels,
    dfr_predictions,
    group_accuracy,
    layer_features,
    logistic_head,
    probe_means,
)
from textcam.models import load_model  # noqa: E402
from textcam.synthetic.classifier import to_classifier_tensor  # noqa: E402
from textcam.synthetic.config import DEMO_BIAS  # noqa: E402
from textcam.synthetic.tiny_clip import to_clip_tensor  # noqa: E402
from textcam.synthetic.world import build_world, split_batch  # noqa: E402
from textcam.visibility import PhraseVisibility  # noqa: E402
from textcam.vocab import load_vocabulary  # noqa: E402

SIZES = (8, 16, 32, 64)
RANDOM_DRAWS = 5


def auc(scores: np.ndarray, truth: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(truth, scores)) if 0 < truth.sum() < truth.size else float("nan")


def clip_embeddings(clip, images: np.ndarray, batch: int = 500) -> torch.Tensor:
    with torch.no_grad():
        parts = [
            clip.encode_images(to_clip_tensor(images[i : i + batch])) for i in range(0, len(images), batch)
        ]
        return torch.cat(parts).float().cpu()


def held_out_set(model, clip, text: torch.Tensor, config, split: str) -> dict[str, Any]:
    """A labelled held-out split for the refit: pooled target-layer features, labels, CLIP presence of
    every phrase (the split's own visibility model, as a run's probe has) and the generator's records."""
    batch = split_batch(config, split)
    _, feats = layer_features(model.module, model.target_layer, to_classifier_tensor(batch.images))
    emb = clip_embeddings(clip, batch.images)
    return {
        "features": feats.numpy().astype(np.float64),
        "labels": batch.records["label"].to_numpy(),
        "presence": PhraseVisibility.fit(emb, text).presence(emb),
        "records": batch.records,
    }


def refit_figures(
    held: dict[str, Any],
    truth: np.ndarray,
    phrase_index: int,
    channels: tuple[int, ...],
    test: tuple[np.ndarray, np.ndarray, np.ndarray, int],
    null_phrases: list[int],
    rng: np.random.Generator,
) -> dict[str, Any]:
    """Group accuracies on the test split of last layers refitted on ``held`` (zeroed channels: their
    pooled features are 0, exactly what a zero suppression at the target layer gives)."""
    feats_test, labels_test, present_test, cls = test
    n_classes = int(labels_test.max()) + 1

    def head(channels_: tuple[int, ...], groups: np.ndarray | None, erase: bool = True) -> dict[str, Any]:
        f, ft = held["features"].copy(), feats_test.copy()
        f[:, list(channels_)], ft[:, list(channels_)] = 0.0, 0.0
        if groups is None:  # no balancing: one group per class, every image the same weight
            weight, bias = logistic_head(f, held["labels"], np.ones(len(f)), n_classes)
        else:
            weight, bias = concept_balanced_head(f, held["labels"], groups, n_classes, erase=erase)
        return group_accuracy((ft @ weight.T + bias).argmax(1), labels_test, present_test, cls)

    clip_groups = held["presence"][:, phrase_index]
    out = {
        "refit": head((), clip_groups),
        "no_erase": head((), clip_groups, erase=False),
        "zeroed": head(channels, clip_groups),
        "truth": head((), truth),
        "erm": head((), None),
        "clip_groups_agree": float((clip_groups == truth).mean()),
    }
    phrase_draws = rng.choice(null_phrases, RANDOM_DRAWS, replace=False)
    out["random_phrase"] = [head((), held["presence"][:, q]) for q in phrase_draws]
    return out


def cue_refits(
    held: dict[str, dict[str, Any]],
    spec,
    acted: dict[str, str | None],
    phrases: list[str],
    channels_of: Callable[[str], ConceptChannels],
    test_side: tuple[np.ndarray, np.ndarray, np.ndarray, int],
    null_phrases: list[int],
    rng: np.random.Generator,
) -> dict[str, Any]:
    """The refit on each held-out split, acting on the flag of that split's audit (the biased training
    split is what a self-audit's probe is); None where that audit flagged nothing for the class."""
    acts_on = {"train": acted["self"], "probe": acted["test"]}
    out: dict[str, Any] = {}
    for split, h in held.items():
        phrase = acts_on[split]
        if phrase is None:
            out[split] = None
            continue
        q = phrases.index(phrase)
        out[split] = refit_figures(
            h,
            (h["records"][spec.attribute] == spec.value).to_numpy(),
            q,
            channels_of(phrase).channels,
            test_side,
            [i for i in null_phrases if i != q],
            rng,
        )
    return out


#: (audit, class name) → the phrase a user would act on: the class's first "for" flag (None: no flag)
ActsOn = Callable[[str, str], "str | None"]


def flags_reader(runs: Path, world_name: str) -> ActsOn:
    """The first "for" flag of a class in the truth sweep's audit of this world (``runs`` is a sweep's
    ``seed-S/runs`` folder; ``test``: the unbiased test split, ``self``: the training split on itself)."""

    def acts_on(audit: str, class_name: str) -> str | None:
        path = runs / f"{world_name}-{audit}" / "flags.parquet"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: run the truth sweep for this seed with --out first")
        flags = pd.read_parquet(path, columns=["class_name", "phrase", "direction", "rank"])
        mine = flags[(flags["class_name"] == class_name) & (flags["direction"] == "for")]
        return str(mine.sort_values("rank")["phrase"].iloc[0]) if len(mine) else None

    return acts_on


def evaluate_world(
    config, cache_dir: str | None, kind: str, name: str, acts_on: ActsOn | None = None
) -> dict[str, Any]:
    """``acts_on``: which phrase to act on per cue (the audits' flags); None: the planted cue's phrase."""
    t0 = time.perf_counter()
    world = build_world(config, cache_dir, progress=False)
    model = load_model(world.classifier_checkpoint)
    clip = load_clip(world.clip_open_clip_id)
    phrases = load_vocabulary(["clevr"])
    text = clip.encode_texts(phrases).cpu()
    probe_manifest = world.manifest("probe")
    bank = ChannelBank.calibrate(
        model, clip, probe_manifest["path"].tolist(), m=50, batch_size=200, progress=False
    )
    test, probe = split_batch(config, "test"), split_batch(config, "probe")
    x_test, x_probe = to_classifier_tensor(test.images), to_classifier_tensor(probe.images)
    labels, probe_labels = test.records["label"].to_numpy(), probe.records["label"].to_numpy()
    module, layer = model.module, model.target_layer
    logits0, feats_test = layer_features(module, layer, x_test)
    _, feats_probe = layer_features(module, layer, x_probe)
    pred0 = logits0.argmax(1).numpy()
    channel_means = feats_probe.mean(0)  # each channel's probe mean (the "mean" mode's values)
    with torch.no_grad():
        img = torch.nn.functional.normalize(
            clip.encode_images(to_clip_tensor(test.images)).float().cpu(), dim=1
        )
    unit_text = torch.nn.functional.normalize(text.float(), dim=1)
    names = list(world.class_names)
    rng = np.random.default_rng(0)
    n_channels = bank.directions.shape[0]
    splits = ("train", "probe") if kind != "control" else ()
    held = {s: held_out_set(model, clip, text, config, s) for s in splits}
    null_phrases = [i for i, p in enumerate(phrases) if p not in names]
    # One channel search per phrase: suppression and the refits may act on the same one.
    channels_of = functools.cache(lambda phrase: concept_channels(bank.directions, text, phrases, phrase))
    refit_rng = np.random.default_rng(1)  # its own draws: the suppression figures keep theirs
    out: dict[str, Any] = {
        "name": name,
        "kind": kind,
        "clean_accuracy": float((pred0 == labels).mean()),
        "cues": [],
    }

    def accuracy_with(s: Suppression | None, present: np.ndarray, cls: int) -> dict[str, Any]:
        logits, _ = layer_features(module, layer, x_test, suppression=s)
        return group_accuracy(logits.argmax(1).numpy(), labels, present, cls)

    if kind == "control":
        # The non-class phrase with the most channels: the strongest concept that is not a class.
        candidates = [p for p in phrases if p not in names]
        best = max(
            (concept_channels(bank.directions, text, phrases, p) for p in candidates),
            key=lambda c: len(c.channels),
        )
        s = Suppression(layer, best.channels, "zero", note=best.phrase)
        logits, _ = layer_features(module, layer, x_test, suppression=s)
        after = float((logits.argmax(1).numpy() == labels).mean())
        out["control"] = {"phrase": best.phrase, "channels": len(best.channels), "accuracy_after": after}
        out["control_suppression_drop"] = out["clean_accuracy"] - after
        out["seconds"] = round(time.perf_counter() - t0, 1)
        return out

    for spec in config.biases:
        cls = names.index(spec.label)
        present = (test.records[spec.attribute] == spec.value).to_numpy()
        planted = world.phrases[spec.attribute][spec.value]
        acted = {a: planted if acts_on is None else acts_on(a, spec.label) for a in ("test", "self")}
        before = group_accuracy(pred0, labels, present, cls)
        gap = before["groups"]["class_with"] - before["groups"]["class_without"]
        row: dict[str, Any] = {
            "spec": str(spec),
            "phrase": planted,
            "acted_on": acted,  # per audit: the phrase acted on (None: the class has no flag)
            "gap": gap,
            "used": gap >= USED,
            "before": before,
        }
        groups = class_concept_groups(probe_labels, (probe.records[spec.attribute] == spec.value).to_numpy())
        dfr = dfr_predictions(feats_probe.numpy(), probe_labels, groups, feats_test.numpy())
        row["dfr"] = group_accuracy(dfr, labels, present, cls)
        sim = (img @ unit_text[phrases.index(planted)]).numpy()
        row["clip_presence_auc"] = auc(sim, present)
        test_side = (feats_test.numpy().astype(np.float64), labels, present, cls)
        row["refit"] = cue_refits(held, spec, acted, phrases, channels_of, test_side, null_phrases, refit_rng)
        phrase = acted["test"]
        if phrase is None:  # nothing flagged: a user has nothing to suppress
            row["channels"], row["sizes"] = [], {}
            out["cues"].append(row)
            continue
        cc = channels_of(phrase)
        row["channels"] = list(cc.channels)
        row["null_threshold"], row["expected_by_chance"] = cc.threshold, cc.expected_by_chance
        if cc.channels:
            row["zero"] = accuracy_with(Suppression(layer, cc.channels, "zero"), present, cls)
            means = probe_means(module, layer, x_probe, cc.channels)
            row["mean"] = accuracy_with(Suppression(layer, cc.channels, "mean", means), present, cls)
            draws, zeros = [], []
            for _ in range(RANDOM_DRAWS):
                pick = tuple(int(c) for c in rng.choice(n_channels, len(cc.channels), replace=False))
                values = tuple(float(v) for v in channel_means[list(pick)])
                draws.append(accuracy_with(Suppression(layer, pick, "mean", values), present, cls))
                zeros.append(accuracy_with(Suppression(layer, pick, "zero"), present, cls))
            row["random_conflicting"] = float(np.mean([d["conflicting"] for d in draws]))
            row["random_accuracy"] = float(np.mean([d["accuracy"] for d in draws]))
            row["random_reliance"] = float(np.mean([d["reliance"] for d in draws]))
            row["random_reliance_zero"] = float(np.mean([d["reliance"] for d in zeros]))
            row["random_others_with_zero"] = float(np.mean([d["groups"]["others_with"] for d in zeros]))
        row["sizes"] = {
            str(k): accuracy_with(
                Suppression(
                    layer,
                    cc.ranking[:k],
                    "mean",
                    tuple(float(v) for v in channel_means[list(cc.ranking[:k])]),
                ),
                present,
                cls,
            )
            for k in SIZES
            if k <= n_channels
        }
        out["cues"].append(row)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    cues = [c for r in results if r["kind"] != "control" for c in r["cues"] if c["used"]]
    with_channels = [c for c in cues if "zero" in c]

    def mean(values: list[float]) -> float | None:
        v = [x for x in values if x == x]
        return round(float(np.mean(v)), 4) if v else None

    best = [max(c["zero"]["conflicting"], c["mean"]["conflicting"]) for c in with_channels]
    gains = [b - c["before"]["conflicting"] for b, c in zip(best, with_channels, strict=True)]
    acted = [c.get("acted_on", {}).get("test", c["phrase"]) for c in cues]
    out = {
        "worlds": len(results),
        "used_cues": len(cues),
        "used_cues_with_channels": len(with_channels),
        # the phrase acted on is the planted cue's / the class has no flag (test audits' first flags)
        "acted_on_cue_rate": round(np.mean([a == c["phrase"] for a, c in zip(acted, cues, strict=True)]), 4)
        if cues
        else None,
        "acted_on_none_rate": round(np.mean([a is None for a in acted]), 4) if cues else None,
        "conflicting_acc_before": mean([c["before"]["conflicting"] for c in cues]),
        "conflicting_acc_after_zero": mean([c["zero"]["conflicting"] for c in with_channels]),
        "conflicting_acc_after_mean": mean([c["mean"]["conflicting"] for c in with_channels]),
        "conflicting_acc_after": mean(best),
        "intervene_win_rate": round(sum(g >= 0.3 for g in gains) / len(cues), 4) if cues else None,
        "worst_group_before": mean([c["before"]["worst_group"] for c in cues]),
        "worst_group_after": mean([c["zero"]["worst_group"] for c in with_channels]),
        "clean_acc_drop": mean([c["before"]["accuracy"] - c["zero"]["accuracy"] for c in with_channels]),
        "clean_acc_drop_mean_mode": mean(
            [c["before"]["accuracy"] - c["mean"]["accuracy"] for c in with_channels]
        ),
        "random_gain": mean([c["random_conflicting"] - c["before"]["conflicting"] for c in with_channels]),
        "dfr_conflicting_acc": mean([c["dfr"]["conflicting"] for c in cues]),
        "dfr_win_rate": round(
            sum(c["dfr"]["conflicting"] - c["before"]["conflicting"] >= 0.3 for c in cues) / len(cues), 4
        )
        if cues
        else None,
        "dfr_worst_group": mean([c["dfr"]["worst_group"] for c in cues]),
        "dfr_accuracy": mean([c["dfr"]["accuracy"] for c in cues]),
        "clip_presence_agreement": mean([c["clip_presence_auc"] for c in cues]),
        # the shortcut itself: P(called the class | cue) - P(called the class | no cue), test split
        "reliance_before": mean([c["before"]["reliance"] for c in cues]),
        "reliance_after_zero": mean([c["zero"]["reliance"] for c in with_channels]),
        "reliance_after_mean": mean([c["mean"]["reliance"] for c in with_channels]),
        "random_reliance_zero": mean([c["random_reliance_zero"] for c in with_channels]),
        "random_reliance_mean": mean([c["random_reliance"] for c in with_channels]),
        # other classes showing the cue, correctly classified (the group a shortcut pulls into the class)
        "others_with_cue_before": mean([c["before"]["groups"]["others_with"] for c in cues]),
        "others_with_cue_after_zero": mean([c["zero"]["groups"]["others_with"] for c in with_channels]),
        "others_with_cue_after_mean": mean([c["mean"]["groups"]["others_with"] for c in with_channels]),
        "random_others_with_cue_zero": mean([c["random_others_with_zero"] for c in with_channels]),
        "channels_mean": mean([len(c["channels"]) for c in cues]),
        "control_suppression_drop": mean(
            [r["control_suppression_drop"] for r in results if r["kind"] == "control"]
        ),
        "tradeoff": {
            str(k): {
                "conflicting": mean(
                    [c["sizes"][str(k)]["conflicting"] for c in cues if str(k) in c["sizes"]]
                ),
                "accuracy": mean([c["sizes"][str(k)]["accuracy"] for c in cues if str(k) in c["sizes"]]),
                "worst_group": mean(
                    [c["sizes"][str(k)]["worst_group"] for c in cues if str(k) in c["sizes"]]
                ),
            }
            for k in SIZES
        },
    }
    for split in ("train", "probe"):
        out |= refit_summary(cues, split, mean)
    out["per_cue"] = [
        {
            "spec": c["spec"],
            "channels": len(c["channels"]),
            "conflicting": [
                round(c["before"]["conflicting"], 3),
                round(c["zero"]["conflicting"], 3) if "zero" in c else None,
                round(c["mean"]["conflicting"], 3) if "mean" in c else None,
            ],
            "worst_group": [
                round(c["before"]["worst_group"], 3),
                round(c.get("zero", c["before"])["worst_group"], 3),
            ],
            "dfr_conflicting": round(c["dfr"]["conflicting"], 3),
            "acted_on": c.get("acted_on"),
            "refit_conflicting": {
                k: None if v is None else round(v["refit"]["conflicting"], 3)
                for k, v in c.get("refit", {}).items()
            },
        }
        for c in cues
    ]
    return out


def refit_summary(cues: list[dict[str, Any]], split: str, mean) -> dict[str, Any]:
    """The refit's figures on one held-out split (``train``: biased, ``probe``: unbiased), beside its
    controls; a win is +0.3 or more on bias-conflicting test images, as for suppression."""
    asked = [c for c in cues if split in c.get("refit", {})]
    cues = [c for c in asked if c["refit"][split] is not None]
    if not cues:
        return {}
    key = f"refit_{split}"

    def figure(c: dict[str, Any], variant: str, what: str = "conflicting") -> float:
        v = c["refit"][split][variant]
        return float(np.mean([d[what] for d in v])) if isinstance(v, list) else v[what]

    # A cue whose audit flagged nothing for its class is not refitted: it counts as no gain.
    out: dict[str, Any] = {f"{key}_unflagged": len(asked) - len(cues)}
    for variant in ("refit", "no_erase", "zeroed", "truth", "erm", "random_phrase"):
        name = key if variant == "refit" else f"{key}_{variant}"
        values = [figure(c, variant) for c in cues]
        out[f"{name}_conflicting_acc"] = mean(values)
        wins = [v - c["before"]["conflicting"] >= 0.3 for v, c in zip(values, cues, strict=True)]
        out[f"{name}_win_rate"] = round(sum(wins) / len(asked), 4)
        out[f"{name}_worst_group"] = mean([figure(c, variant, "worst_group") for c in cues])
    out[f"{key}_clean_acc_drop"] = mean(
        [c["before"]["accuracy"] - c["refit"][split]["refit"]["accuracy"] for c in cues]
    )
    out[f"{key}_clip_groups_agree"] = mean([c["refit"][split]["clip_groups_agree"] for c in cues])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=3, help="the truth sweep's seed whose worlds to use")
    ap.add_argument("--max-worlds", type=int, default=12, help="sweep worlds with used cues to evaluate")
    ap.add_argument("--cache-dir", help="world cache (default: the sweep's)")
    ap.add_argument("--only", help="evaluate only these worlds (comma-separated names, e.g. demo,b00)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "intervene", help="per-world results")
    ap.add_argument(
        "--flags-from",
        type=Path,
        help="act on the flags of this truth sweep's audits (its --out folder), as a user would: each "
        "cue's class's first 'for' flag (test audit; the self audit's for the refit on the train split). "
        "Default: the planted cue's phrase",
    )
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore")
    draws = [
        ("demo", "biased", demo_world("demo", [DEMO_BIAS], 0)),
        ("demo-control", "control", demo_world("demo", [], 0)),
    ]
    sweep = [d for d in draw_worlds(args.seed, 21, 6) if d.kind in ("biased", "control")]
    draws += [(d.name, d.kind, d.config()) for d in sweep]
    args.out.mkdir(parents=True, exist_ok=True)
    results, n_biased = [], 0
    if args.only:
        draws = [d for d in draws if d[0] in args.only.split(",")]
    for name, kind, config in draws:
        if kind == "biased" and name != "demo" and n_biased >= args.max_worlds:
            continue
        tag = "-flags" if args.flags_from else ""
        cache = args.out / f"seed-{args.seed}-{name}-{config.world_key()}-{config.clip_key()}{tag}.json"
        acts_on = None
        if args.flags_from:  # the sweep names the demo world by its CLIP
            runs = args.flags_from / f"seed-{args.seed}" / "runs"
            acts_on = flags_reader(runs, "demo-clip0" if name == "demo" else name)
        if cache.is_file():
            r = json.loads(cache.read_text())
        else:
            r = evaluate_world(config, args.cache_dir, kind, name, acts_on)
            cache.write_text(json.dumps(r, default=float))
        if kind == "biased" and name != "demo":
            n_biased += any(c["used"] for c in r["cues"])
        results.append(r)
        brief = (
            "; ".join(
                f"{c['spec']} gap {c['gap']:+.2f} ch {len(c['channels'])} conflicting "
                f"{c['before']['conflicting']:.2f}->{c.get('zero', c['before'])['conflicting']:.2f}"
                f"/{c.get('mean', c['before'])['conflicting']:.2f} (dfr {c['dfr']['conflicting']:.2f}; refit "
                + "/".join(
                    "-" if v is None else f"{v['refit']['conflicting']:.2f}"
                    for v in c.get("refit", {}).values()
                )
                + ")"
                for c in r["cues"]
            )
            or f"control: {r.get('control')} drop {r.get('control_suppression_drop', 0):+.3f}"
        )
        print(f"{name} ({r['seconds']:.0f} s): {brief}", flush=True)
    print(json.dumps(summarise(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
