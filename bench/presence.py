"""Does CLIP's presence call agree with the generator? Per tiny CLIP and attribute, on unbiased probe images.

    .venv/bin/python bench/presence.py [--clip-seeds 0,1,2] [--n 1000]

The flags' model test and the shown phrases both rest on ``presence[i, p]`` (:mod:`textcam.visibility`):
CLIP sees phrase p in image i. Here every attribute value's phrase is checked against the scene records
of the demo world's probe split (no bias planted), per tiny CLIP: precision (images called present that
have the value) and recall (images with the value called present), per attribute, macro-averaged over
its values. ``argmax`` is the zero-shot reference: the value whose phrase is closest, among that
attribute's phrases (it knows which phrases compete; the presence rule does not).

``nearest``: for every attribute value, the direction in CLIP's image space from the probe images without
it to those with it, and the vocabulary phrases closest to it (centred text, as the explanations code
T_c(x) over). Where another phrase lies closer than the value's own, this CLIP has no way to tell the two
apart, and neither has anything built on it (docs/decisions.md, "Where CLIP 0 says 'night sky'").
Last line: JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from textcam.clip import load_clip  # noqa: E402
from textcam.select import center_vocabulary  # noqa: E402
from textcam.synthetic.config import WorldConfig  # noqa: E402
from textcam.synthetic.tiny_clip import to_clip_tensor  # noqa: E402
from textcam.synthetic.world import ensure_tiny_clip, split_batch, world_phrases  # noqa: E402
from textcam.visibility import (  # noqa: E402
    NEAR_RATIO,
    PhraseVisibility,
    centre_images,
    cosine,
    log_density,
    separation,
    upper_modes,
)
from textcam.vocab import load_vocabulary  # noqa: E402

ATTRIBUTES = ("shape", "color", "size", "texture", "background", "watermark", "border")


def clip_presence(clip_seed: int, n: int, cache_dir: str | None) -> dict[str, dict[str, float]]:
    base = WorldConfig.demo(bias=[], seed=0)
    config = dataclasses.replace(base, clip=dataclasses.replace(base.clip, seed=clip_seed))
    clip_dir, _ = ensure_tiny_clip(config, cache_dir, progress=False)
    clip = load_clip(f"local-dir:{clip_dir}", device="cpu")
    phrases = load_vocabulary(["clevr"])
    text = clip.encode_texts(phrases).cpu()
    batch = split_batch(dataclasses.replace(config, n_probe=n), "probe")
    with torch.inference_mode():
        images = torch.cat([clip.encode_images(x) for x in to_clip_tensor(batch.images).split(250)]).cpu()
    visibility = PhraseVisibility.fit(images, text)
    present = visibility.presence(images)
    cos = torch.nn.functional.normalize(images, dim=1) @ torch.nn.functional.normalize(text, dim=1).T
    names = world_phrases(config)
    out = {}
    for attribute in ATTRIBUTES:
        values = [v for v in names[attribute] if names[attribute][v] in phrases]  # "without a logo": not one
        truth = batch.records[attribute].to_numpy()
        cols = [phrases.index(names[attribute][v]) for v in values]
        called = present[:, cols]  # (N, V)
        has = truth[:, None] == np.array(values)[None, :]
        precision = [
            has[called[:, j], j].mean() if called[:, j].any() else np.nan for j in range(len(values))
        ]
        recall = [called[has[:, j], j].mean() for j in range(len(values))]
        argmax = np.array(values)[cos[:, cols].argmax(1).numpy()] if len(values) > 1 else None
        out[attribute] = {
            "precision": round(float(np.nanmean(precision)), 3),
            "recall": round(float(np.mean(recall)), 3),
            "argmax_accuracy": round(float((argmax == truth).mean()), 3) if argmax is not None else None,
        }
    out["bimodality"] = bimodality(visibility, phrases, names)
    out["nearest"] = nearest_text(images, text, phrases, names, batch.records)
    out["splits"] = splits(centre_images(cosine(images, text)), phrases, names, batch.records)
    return out


def splits(sim: np.ndarray, phrases: list[str], names: dict, records: Any) -> list[dict[str, Any]]:
    """Every phrase whose "present" images hold two modes: how far the lower mode lies from the absent
    images and from the top mode (pooled sds), whether the split is kept (``NEAR_RATIO``), and for the
    world's phrases the share of the lower mode's images that have the value."""
    (w, mu, sd), (w2, mu2, sd2), two_modes, ratio = upper_modes(sim)
    upper = log_density(sim, w, mu, sd).argmax(0) == 1
    lower = upper & (log_density(sim, w2, mu2, sd2).argmax(0) == 0)  # (N, P)
    truth = {text: (a, v) for a, values in names.items() for v, text in values.items()}
    rows = []
    for j in np.flatnonzero(two_modes):
        row: dict[str, Any] = {"phrase": phrases[j], "ratio": round(float(ratio[j]), 2)}
        row["kept"] = bool(ratio[j] <= NEAR_RATIO)
        if phrases[j] in truth and lower[:, j].any():
            a, v = truth[phrases[j]]
            row["lower_has_value"] = round(float((records[a].to_numpy()[lower[:, j]] == v).mean()), 2)
        rows.append(row)
    return rows


def nearest_text(
    images: torch.Tensor, text: torch.Tensor, phrases: list[str], names: dict, records: Any
) -> list[dict[str, Any]]:
    """Per attribute value with a phrase: the cosine of its image-side direction (mean embedding of the
    images with the value minus the others') with its own centred phrase, its rank among the vocabulary,
    and the closest phrase."""
    vocab = center_vocabulary(text.float())
    rows = []
    for attribute in ATTRIBUTES[1:]:  # the shape is the class: its direction is the task itself
        truth = records[attribute].to_numpy()
        for value, phrase in names[attribute].items():
            has = torch.from_numpy(truth == value)
            if phrase not in phrases or has.all() or not has.any():
                continue
            direction = torch.nn.functional.normalize(images[has].mean(0) - images[~has].mean(0), dim=0)
            cos = vocab @ direction
            own = phrases.index(phrase)
            best = int(cos.argmax())
            rows.append(
                {
                    "phrase": phrase,
                    "cos": round(float(cos[own]), 2),
                    "rank": int((cos > cos[own]).sum()) + 1,
                    "nearest": phrases[best],
                    "nearest_cos": round(float(cos[best]), 2),
                }
            )
    return rows


def bimodality(visibility: PhraseVisibility, phrases: list[str], names: dict) -> dict[str, list[float]]:
    """Ashman's D of each phrase's two-component presence mixture, (min, max) over the world's own phrases
    and over the distractor words the world never draws: would "well separated" (D > 2) tell them apart?"""
    mu, sd = visibility.means, visibility.sds
    # present (last) against the component below it (the near mode where split, else absent)
    d = separation(mu[-2], sd[-2], mu[-1], sd[-1])
    world = {text for values in names.values() for text in values.values()}
    groups = {"world": [d[j] for j, p in enumerate(phrases) if p in world]}
    groups["distractor"] = [d[j] for j, p in enumerate(phrases) if p not in world]
    return {k: [round(float(min(v)), 2), round(float(max(v)), 2)] for k, v in groups.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clip-seeds", default="0,1,2", help="tiny-CLIP training seeds (default 0,1,2)")
    parser.add_argument("--n", type=int, default=1000, help="probe images per CLIP (default 1000)")
    parser.add_argument("--cache-dir", help="world cache (default $TEXTCAM_CACHE/world)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    result: dict[str, object] = {}
    for seed in (int(s) for s in args.clip_seeds.split(",")):
        per = clip_presence(seed, args.n, args.cache_dir)
        spread = per.pop("bimodality")
        nearest = per.pop("nearest")
        for row in nearest:
            if row["rank"] > 1:
                print(
                    f"clip {seed} '{row['phrase']}': its images' direction is closer to "
                    f"'{row['nearest']}' ({row['nearest_cos']:.2f}) than to its own phrase "
                    f"({row['cos']:.2f}, rank {row['rank']})"
                )
        print(f"clip {seed} Ashman's D, world phrases {spread['world']}, distractors {spread['distractor']}")
        for row in per.pop("splits"):
            print(f"clip {seed} split {row}")
        for attribute, r in per.items():
            print(
                f"clip {seed} {attribute:10s} precision {r['precision']:.3f} recall {r['recall']:.3f} "
                f"(argmax {r['argmax_accuracy']})",
                flush=True,
            )
        result[f"clip{seed}"] = per
        result[f"clip{seed}_ashman_d"] = spread
        result[f"clip{seed}_not_nearest"] = [r["phrase"] for r in nearest if r["rank"] > 1]
        result[f"clip{seed}_own_cos_min"] = min(r["cos"] for r in nearest)
    flat = [r for k, per in result.items() if "_" not in k for r in per.values()]  # type: ignore[union-attr]
    result["presence_precision_min"] = min(r["precision"] for r in flat)
    result["presence_precision_mean"] = round(float(np.mean([r["precision"] for r in flat])), 3)
    result["presence_recall_mean"] = round(float(np.mean([r["recall"] for r in flat])), 3)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
