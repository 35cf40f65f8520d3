"""Randomised truth sweep (issue 11): do the flags and the shown phrases hold on worlds nobody tuned on?

    .venv/bin/python bench/sweep.py [--seed S] [--quick] [--cache-dir DIR] [--out DIR]

Worlds are drawn at random from ``--seed``: ``--biased`` worlds (default 21) with one or two planted cues
(class; attribute in background, colour, size, texture, watermark, border; value; strength in
[0.9, 1.0]; two cues never share a class or an attribute) and ``--controls`` worlds (default 6) with
none, over three tiny CLIPs (``--clip-seeds``, default 0, 1, 2; demo preset, 1,500 steps) and a world
seed drawn per world. On top come the demo's own two worlds (its planted background cue and its
control) for each of the three CLIPs: ``demo_clip_seeds_pass`` counts the CLIPs on which both of the
demo's checks pass. Everything is cached by config hash (``textcam.synthetic``).

Two audits per world, each through the library functions the audit flow calls:

* ``test``: explanations of the unbiased test split, bank and probe behaviour from the probe split, the
  flags checked against the training split as the demo's ``flags.training_data``;
* ``self``: explanations of the biased training split, bank and probe behaviour from the same split
  ("my training set, my model"), flagged with ``flags.probe_seen_in_training`` (the probe is the
  training data of the data check).

A cue is *used* when the classifier's accuracy gap (aligned − conflicting, test split) is ≥ 0.3 and
*unused* below 0.1 (in between: reported, not scored). Control worlds measure three random cues each
(as ``eval_biases``), all unused by construction. Figures (last line, one JSON object):

* ``sweep_first_rate`` (+ Wilson 95 % lower bound): used cues that are the first flag of their class
  (direction "for"), test audits; ``sweep_first_rate_selfprobe``: the same, self audits;
* ``sweep_unused_flag_rate``: unused cues flagged for their class (``sweep_unused_flagged``: which,
  with the do-effect of each on the class's predictions); ``sweep_control_false_flags_mean``:
  flags per control world; ``sweep_extra_flags_mean``: flags per biased world naming no planted cue;
  ``sweep_mirror_flags_mean``: flags naming a planted cue for another class or against its own;
  ``sweep_extra_flags_read_as_cue_mean``: extra flags whose ``aliases`` (what else CLIP calls the
  concept) name a planted cue: the cue under another name, counted as extra all the same;
* ``phrase_image_precision``: shown phrases (the ``shown_phrases`` view) that are not class names and are
  true of the image (by the generator's records), test audits, predicted-class explanations; per
  attribute, the same without the view's model gate (``..._without_model_gate``), for every selected
  phrase (``selected_image_precision``), and for the view before seed 26, which showed a flagged phrase
  only where the sparse code selected it, not where it is among the phrases nearest T_c⁺(x)
  (``..._selected_only_view``);
* ``aligned_cue_named_rate``: test images of a used cue's class that show the cue, explained for that
  class, whose shown phrases name the cue (and ``..._selected_only_view``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.groundtruth import explain, write_run  # noqa: E402
from tasks.behaviour import ProbeBehaviour, probe_behaviour  # noqa: E402
from tasks.flags import ClassText, flag_spurious  # noqa: E402
from tasks.training_data import training_correlation  # noqa: E402
from textcam.bank import ChannelBank  # noqa: E402
from textcam.clip import load_clip  # noqa: E402
from textcam.explain import Explainer  # noqa: E402
from textcam.models import load_model  # noqa: E402
from textcam.schema import EXPLANATIONS  # noqa: E402, F401  (rows follow it, see write_run)
from textcam.synthetic.bias import BiasSpec  # noqa: E402
from textcam.synthetic.classifier import bias_metrics, to_classifier_tensor  # noqa: E402
from textcam.synthetic.config import DEMO_BIAS, WorldConfig  # noqa: E402
from textcam.synthetic.scenes import ATTRIBUTE_VALUES, intervene  # noqa: E402
from textcam.synthetic.tiny_clip import to_clip_tensor  # noqa: E402
from textcam.synthetic.world import World, build_world, clip_dir_for, split_batch  # noqa: E402
from textcam.visibility import PhraseVisibility, image_specific, specific_among_strong  # noqa: E402
from textcam.vocab import load_vocabulary  # noqa: E402

CUE_ATTRIBUTES = ("background", "color", "size", "texture", "watermark", "border")
USED, UNUSED = 0.3, 0.1
#: the shown-phrase views whose precision a world's result holds (``shown_precision``)
PRECISION_VIEWS = ("flow", "flow_selected", "flow_previous", "flow_ungated", "shown", "selected")
TARGETS = {
    "sweep_first_rate": (">=", 0.95),
    "sweep_first_rate_selfprobe": (">=", 0.9),
    "sweep_unused_flag_rate": ("<=", 0.05),
    "sweep_control_false_flags_mean": ("<=", 0.1),
    "sweep_extra_flags_mean": ("<=", 0.2),
    "phrase_image_precision": (">=", 0.9),
    "aligned_cue_named_rate": (">=", 0.9),
    "demo_clip_seeds_pass": (">=", 3),
}


@dataclass(frozen=True)
class WorldDraw:
    name: str
    kind: str  # "biased" | "control" | "demo" | "demo-control"
    clip_seed: int
    world_seed: int
    biases: tuple[str, ...]
    eval_biases: tuple[str, ...] = ()

    def config(self) -> WorldConfig:
        base = WorldConfig.demo(bias=list(self.biases), seed=self.world_seed, eval_biases=self.eval_biases)
        return dataclasses.replace(base, clip=dataclasses.replace(base.clip, seed=self.clip_seed))


def _cue(rng: np.random.Generator, cls: str, attribute: str, strength: float | None = None) -> str:
    values = ATTRIBUTE_VALUES[attribute]
    value = "yes" if attribute in ("watermark", "border") else str(rng.choice(values))
    s = strength if strength is not None else round(float(rng.uniform(0.9, 1.0)), 3)
    return f"{cls}={attribute}:{value}@{s:g}"


def draw_worlds(
    seed: int, n_biased: int, n_controls: int, clip_seeds: tuple[int, ...] = (0, 1, 2)
) -> list[WorldDraw]:
    """The sweep's worlds, a pure function of ``seed`` (and the CLIPs' training seeds)."""
    rng = np.random.default_rng(seed)
    classes = ATTRIBUTE_VALUES["shape"]
    worlds = []
    for i in range(n_biased):
        k = int(rng.integers(1, 3))
        cls = rng.choice(classes, size=k, replace=False)
        attrs = rng.choice(CUE_ATTRIBUTES, size=k, replace=False)
        biases = tuple(_cue(rng, str(c), str(a)) for c, a in zip(cls, attrs, strict=True))
        clip_seed = clip_seeds[i % len(clip_seeds)]
        worlds.append(WorldDraw(f"b{i:02d}", "biased", clip_seed, int(rng.integers(1, 10**6)), biases))
    for i in range(n_controls):
        attrs = rng.choice(CUE_ATTRIBUTES, size=3, replace=False)
        cls = rng.choice(classes, size=3, replace=False)
        evals = tuple(_cue(rng, str(c), str(a), 1.0) for c, a in zip(cls, attrs, strict=True))
        worlds.append(
            WorldDraw(
                f"c{i:02d}",
                "control",
                clip_seeds[i % len(clip_seeds)],
                int(rng.integers(1, 10**6)),
                (),
                evals,
            )
        )
    for s in clip_seeds:
        worlds.append(WorldDraw(f"demo-clip{s}", "demo", s, 0, (DEMO_BIAS,)))
        worlds.append(WorldDraw(f"demo-control-clip{s}", "demo-control", s, 0, (), (DEMO_BIAS,)))
    return worlds


def wilson_lower(k: int, n: int, z: float = 1.96) -> float:
    if n == 0:
        return float("nan")
    p = k / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n)


# ----------------------------------------------------------------------------------------------
# one world


@dataclass
class Models:
    world: World
    model: Any
    clip: Any
    phrases: list[str]
    text: torch.Tensor
    class_text: ClassText


def load_models(world: World) -> Models:
    model = load_model(world.classifier_checkpoint)
    clip = load_clip(world.clip_open_clip_id)
    phrases = load_vocabulary(["clevr"])
    text = clip.encode_texts(phrases).cpu()
    names = list(world.class_names)
    emb = clip.encode_texts(sorted({*phrases, *names})).cpu().numpy()
    class_text = ClassText(embeddings=dict(zip(sorted({*phrases, *names}), emb, strict=True)))
    return Models(world, model, clip, phrases, text, class_text)


def phrase_truth(records: pd.DataFrame, world: World, phrases: list[str]) -> tuple[np.ndarray, list[str]]:
    """(N, P) bool: phrase p is true of image n (generator records); and each phrase's attribute."""
    truth = np.zeros((len(records), len(phrases)), dtype=bool)
    kind = ["not in world"] * len(phrases)
    for attr, values in world.phrases.items():
        for value, text in values.items():
            if text in phrases:
                j = phrases.index(text)
                truth[:, j] = (records[attr] == value).to_numpy()
                kind[j] = attr
    return truth, kind


def audit_split(
    m: Models, audited: str, probe: str, run_dir: Path, labelled_probe: bool = True
) -> dict[str, Any]:
    """Calibrate on ``probe``, explain ``audited``, flag with the probe's behaviour; the raw material.
    A probe from the training split is flagged as one (``flags.probe_seen_in_training``), as its user
    would."""
    cfg = m.world.config
    bank, behaviour, correlation = probe_evidence(m, probe, labelled_probe)
    explainer = Explainer(m.model, bank, m.phrases, m.text, n_phrases=5, n_groups=3)
    batch = split_batch(cfg, audited)
    x = to_classifier_tensor(batch.images)
    eb, expl = explain(explainer, x, None)
    manifest = m.world.manifest(audited)
    rows = [
        e.to_record()
        | {
            "run_id": run_dir.name,
            "image_id": manifest.loc[i, "image_id"],
            "path": manifest.loc[i, "path"],
            "label": manifest.loc[i, "label_name"],
            "model_id": m.model.model_id,
            "layer": bank.layer,
            "bank_id": bank.bank_id,
            "clip_id": bank.clip_id,
        }
        for i, e in enumerate(expl)
    ]
    write_run(run_dir, rows)
    return {
        "bank": bank,
        "explainer": explainer,
        "batch": batch,
        "eb": eb,
        "flags": flag_run(m, run_dir, behaviour, probe, correlation),
        "candidates": pd.read_parquet(run_dir / "flag_candidates.parquet"),
    }


def probe_evidence(
    m: Models, probe: str, labelled_probe: bool = True
) -> tuple[ChannelBank, ProbeBehaviour, Any]:
    """The bank calibrated on ``probe``, the probe's behaviour, and the training data's phrase-class
    correlation the flags check (None where the probe is the training split)."""
    probe_manifest = m.world.manifest(probe)
    bank = ChannelBank.calibrate(
        m.model, m.clip, probe_manifest["path"].tolist(), m=50, batch_size=200, progress=False
    )
    assert bank.probe is not None
    labels = probe_manifest["label"].to_numpy() if labelled_probe else None
    behaviour = probe_behaviour(
        bank.probe.embeddings,
        bank.probe.predictions,
        m.phrases,
        m.text,
        labels,
        class_embeddings=m.clip.encode_texts(list(m.world.class_names)).cpu(),
    )
    # The data check reads the training split as a user's flags.training_data; a probe from it is that data.
    train = m.world.manifest("train")
    correlation = (
        None
        if probe == "train"
        else training_correlation(
            train["path"].tolist(),
            train["label"].to_numpy(),
            len(m.world.class_names),
            m.clip,
            m.text,
            visibility=PhraseVisibility.fit(bank.probe.embeddings, m.text),  # the probe's call, as the flow
        )
    )
    return bank, behaviour, correlation


def flag_run(
    m: Models, run_dir: Path, behaviour: ProbeBehaviour, probe: str, correlation: Any
) -> pd.DataFrame:
    """The flag stage on a run directory's explanations (writes its flags and candidates)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return flag_spurious(
            run_dir,
            m.class_text,
            None,
            behaviour=behaviour,
            probe_seen_in_training=probe == "train",
            correlation=correlation,
        )


def cue_rows(
    m: Models, a: dict[str, Any], specs: list[BiasSpec], gaps: dict[str, Any]
) -> list[dict[str, Any]]:
    """Per cue: its gap, whether it is its class's first flag, flagged at all, and the deciding rule."""
    out = []
    flags, cand = a["flags"], a["candidates"]
    for spec in specs:
        phrase = m.world.phrases[spec.attribute][spec.value]
        mine = flags[flags["class_name"] == spec.label].sort_values("rank")
        first = mine.iloc[0] if len(mine) else None
        flagged = bool(((mine["phrase"] == phrase) & (mine["direction"] == "for")).any())
        why = cand[
            (cand["class_name"] == spec.label) & (cand["phrase"] == phrase) & (cand["direction"] == "for")
        ]
        out.append(
            {
                "spec": str(spec),
                "phrase": phrase,
                "gap": gaps[str(spec)]["gap"],
                "first": bool(
                    first is not None and first["phrase"] == phrase and first["direction"] == "for"
                ),
                "first_flag": None if first is None else f"{first['phrase']} ({first['direction']})",
                "flagged": flagged,
                "reason": why["reason"].iloc[0] if len(why) else "not among the class's candidates",
                "z_model": float(why["z_first"].iloc[0]) if len(why) else None,
                "effect": float(why["effect_first"].iloc[0]) if len(why) else None,
            }
        )
    return out


def names_class(m: Models) -> np.ndarray:
    """(K, P) bool: phrase p is class k's name, case aside."""
    lower = np.char.lower
    classes = np.asarray(list(m.world.class_names), dtype=str)
    return lower(np.asarray(m.phrases, dtype=str))[None, :] == lower(classes)[:, None]


def flagged_for(m: Models, flags: pd.DataFrame) -> np.ndarray:
    """(K, P) bool: phrase p is flagged "for" class k (``shown_phrases``' model gate)."""
    classes = list(m.world.class_names)
    out = np.zeros((len(classes), len(m.phrases)), dtype=bool)
    mine = flags[flags["direction"] == "for"]
    out[[classes.index(c) for c in mine["class_name"]], [m.phrases.index(p) for p in mine["phrase"]]] = True
    return out


def shown_precision(m: Models, a: dict[str, Any]) -> dict[str, Any]:
    """Shown (CLIP-visible, ≥ half the first phrase) and all selected non-class phrases vs the records."""
    batch, eb = a["batch"], a["eb"]
    x_clip = to_clip_tensor(batch.images)
    emb = torch.cat([m.clip.encode_images(x_clip[i : i + 500]).cpu() for i in range(0, len(x_clip), 500)])
    vis = PhraseVisibility.fit(a["bank"].probe.embeddings, m.text)
    idx, sc = eb.phrases_for.indices, eb.phrases_for.scores
    pred = eb.logits.argmax(1).numpy()
    dense = np.zeros((len(idx), len(m.phrases)))
    np.put_along_axis(dense, idx.clamp_min(0).numpy(), np.where(idx.numpy() >= 0, sc.numpy(), 0.0), 1)
    presence = vis.presence(emb)
    specific = image_specific(presence, dense, pred)
    seen = vis.seen(emb, idx).numpy()
    visible = seen & vis.strong(sc).numpy()
    shown = visible & specific[pred[:, None], idx.clamp_min(0).numpy()]
    # The audit flow's rule (tasks.store.phrase_specificity): the same test over the strong phrases only,
    # from what each explanation stores.
    strong = (dense > 0) & (dense >= 0.5 * sc.numpy()[:, :1])
    flow_specific = specific_among_strong(presence & strong, dense, strong, pred, vis.weights[-1])
    flow_ungated = visible & flow_specific[pred[:, None], idx.clamp_min(0).numpy()]
    # ... then only what the model uses: the class's own name as before, any other phrase where it is
    # flagged "for" the class and CLIP sees it, whatever its weight (the view since seed 10); and the
    # previous view (a "for" flag on top of the weight and specificity tests) beside it.
    at = (pred[:, None], idx.clamp_min(0).numpy())
    own, flagged = names_class(m), flagged_for(m, a["flags"])
    previous_pairs = flow_specific & (own | flagged)
    flow_shown = (visible & (flow_specific & own)[at]) | (seen & flagged[at])
    flow_previous = visible & previous_pairs[at]
    # ... and since seed 26, a flagged phrase among the n nearest T_c⁺(x) too, where CLIP sees it (the view
    # before it: "flow_selected")
    near = eb.phrases_near.indices
    near = near.masked_fill((near[:, :, None] == idx[:, None, :]).any(2), -1).numpy()  # not selected already
    near_seen = np.take_along_axis(presence, near.clip(0), 1) & (near >= 0)
    near_extra = near_seen & flagged[pred[:, None], near.clip(0)]
    truth, kind = phrase_truth(batch.records, m.world, m.phrases)
    both = np.concatenate([idx.numpy(), near], 1)
    selected = both >= 0
    both = both.clip(0)
    class_phrase = np.isin(np.asarray(m.phrases)[both], list(m.world.class_names))
    true_of = np.take_along_axis(truth, both, 1)
    kinds = np.asarray(kind)[both]
    res: dict[str, Any] = {
        "embeddings": emb,
        "visibility": vis,
        "flagged": flagged,
        "previous_pairs": previous_pairs,
    }
    masks = {"flow_selected": flow_shown, "flow_previous": flow_previous, "flow_ungated": flow_ungated}
    masks |= {"shown": shown, "selected": np.ones_like(shown)}
    masks = {k: np.concatenate([v, np.zeros_like(near_extra)], 1) for k, v in masks.items()}
    masks["flow"] = np.concatenate([flow_shown, near_extra], 1)
    for name, mask in ((k, v & selected & ~class_phrase) for k, v in masks.items()):
        res[name] = {
            "n": int(mask.sum()),
            "true": int(true_of[mask].sum()),
            "per_attribute": {
                k: (int((mask & (kinds == k)).sum()), int((true_of & mask & (kinds == k)).sum()))
                for k in sorted(set(kinds[mask].tolist()))
            },
            "per_image": float(mask.sum(1).mean()),
        }
    return res


def aligned_named(
    m: Models, a: dict[str, Any], spec: BiasSpec, res: dict[str, Any]
) -> dict[str, tuple[int, int]]:
    """Aligned test images of ``spec``'s class, explained for that class: shown phrases name the cue
    (``flow``: the audit's view; ``selected``: the view before seed 26, selected phrases only;
    ``previous``: the view before seed 10)."""
    recs = a["batch"].records
    cls = list(m.world.class_names).index(spec.label)
    aligned = np.flatnonzero(((recs["label"] == cls) & (recs[spec.attribute] == spec.value)).to_numpy())
    if not len(aligned):
        return {"flow": (0, 0), "selected": (0, 0), "previous": (0, 0)}
    x = to_classifier_tensor(a["batch"].images[aligned])
    eb, _ = explain(a["explainer"], x, torch.full((len(aligned),), cls, dtype=torch.long))
    sel, near, k = eb.phrases_for, eb.phrases_near.indices, eb.phrases_for.indices.shape[1]
    both = res["visibility"].seen(res["embeddings"][aligned], torch.cat([sel.indices, near], 1))
    seen, near_seen = both[:, :k], both[:, k:]
    shown = seen & res["visibility"].strong(sel.scores)
    phrase = m.phrases.index(m.world.phrases[spec.attribute][spec.value])
    is_cue = sel.indices == phrase
    # the audit tables show the cue for this class only where it is flagged "for" it (previously: and
    # passed the weight and specificity tests)
    flagged = bool(res["flagged"][cls, phrase])
    named = (is_cue & seen).any(1) & flagged
    named_previous = (is_cue & shown).any(1) & bool(res["previous_pairs"][cls, phrase])
    named_near = named | ((near == phrase) & near_seen).any(1) & flagged
    return {
        "flow": (int(named_near.sum()), len(aligned)),
        "selected": (int(named.sum()), len(aligned)),
        "previous": (int(named_previous.sum()), len(aligned)),
    }


FLAG_LINE = re.compile(r"^(?P<cls>[^:]+): (?P<phrase>.+) \((?P<direction>for|against), z ")
#: do(attribute) effect a flag's class must show for the flag to name something the model does
DO_CONFIRMED = 0.1


def do_effect(m: Models, cls: str, attribute: str, value: str, direction: str, n: int = 1000) -> float:
    """How much more (``for``; less, ``against``) the classifier predicts ``cls`` on the same unbiased
    scenes rendered with ``attribute = value`` than with another value: the larger of the effects within
    the images of ``cls`` and within the others, as the flag's own effect is defined."""
    config = m.world.config
    with_, without, labels = intervene(config.scene, n, config.seed, attribute, value)
    c = list(m.world.class_names).index(cls)
    with torch.inference_mode():
        hit = [m.model.module(to_classifier_tensor(x)).argmax(1).numpy() == c for x in (with_, without)]
    own = labels == c
    effects = [hit[0][rows].mean() - hit[1][rows].mean() for rows in (own, ~own)]
    return float(max(effects) if direction == "for" else -min(effects))


def flag_truth(m: Models, flags: list[str]) -> list[dict[str, Any]]:
    """Each flag naming a world attribute value, with the do-effect the generator measures for it."""
    by_phrase = {text: (a, v) for a, values in m.world.phrases.items() for v, text in values.items()}
    out = []
    for line in flags:
        f = FLAG_LINE.match(line)
        if f is None or f["phrase"] not in by_phrase or f["cls"] not in m.world.class_names:
            continue
        attribute, value = by_phrase[f["phrase"]]
        if attribute == m.world.config.scene.label_attribute:
            continue
        effect = do_effect(m, f["cls"], attribute, value, f["direction"])
        out.append({"flag": line, "do_effect": round(effect, 3), "confirmed": effect >= DO_CONFIRMED})
    return out


def wait_for_clip(cfg: WorldConfig, cache_dir: str | None, poll_s: float = 15.0) -> None:
    """Another process training this CLIP (its directory has a training state, no metrics yet): wait."""
    d = clip_dir_for(cfg, cache_dir)
    while (d / "train_state.pt").is_file() and not (d / "metrics.json").is_file():
        if time.time() - (d / "train_state.pt").stat().st_mtime > 600:
            return  # an abandoned run: build_world resumes it
        time.sleep(poll_s)


def result_file(draw: WorldDraw, out: Path) -> Path:
    cfg = draw.config()
    return out / "worlds" / f"{draw.name}-{cfg.world_key()}-{cfg.clip_key()}.json"


def cached_result(draw: WorldDraw, out: Path) -> dict[str, Any] | None:
    path = result_file(draw, out)
    return renamed_views(json.loads(path.read_text())) if path.is_file() else None


def renamed_views(result: dict[str, Any]) -> dict[str, Any]:
    """Results cached before seed 26 hold the selected-only view under ``flow``: rename it, so that they
    add nothing to the present view's figures."""
    precision = result.get("precision", {})
    if "flow" in precision and "flow_selected" not in precision:
        precision["flow_selected"] = precision.pop("flow")
    for v in result.get("aligned_named", {}).values():
        if isinstance(v, dict) and "flow" in v and "selected" not in v:
            v["selected"] = v.pop("flow")
    return result


def flag_kinds(world: World, flags: Any) -> list[str]:
    """``cue`` (a planted cue for its class), ``mirror`` (a planted cue seen from another class or against
    its own, or the other value of a two-valued cue's attribute) or ``extra``, per (class, phrase,
    direction)."""
    planted = {world.phrases[b.attribute][b.value]: b for b in world.config.biases}
    complements = {
        text
        for b in world.config.biases
        if len(world.phrases[b.attribute]) == 2
        for v, text in world.phrases[b.attribute].items()
        if v != b.value
    }
    kinds = []
    for cls, phrase, direction in flags:
        b = planted.get(phrase)
        if b is None:
            kinds.append("mirror" if phrase in complements else "extra")
        else:
            kinds.append("cue" if b.label == cls and direction == "for" else "mirror")
    return kinds


def extras_read_as_cue(world: World, flags: pd.DataFrame, kinds: list[str]) -> int:
    """Extra flags whose aliases (the phrases CLIP's call of the flag's phrase follows) name a planted cue
    or its other value: the cue under another name, for this CLIP."""
    n = 0
    for (_, f), kind in zip(flags.iterrows(), kinds, strict=True):
        aliases = f["aliases"] if isinstance(f["aliases"], list | np.ndarray) else []  # null: before v7
        names = [a.removeprefix("not ") for a in aliases]
        triples = [(f["class_name"], q, f["direction"]) for q in names]
        n += kind == "extra" and any(k != "extra" for k in flag_kinds(world, triples))
    return n


def unused_flagged(cues: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The cues the sweep calls unused (gap < 0.1) that were flagged for their class all the same."""
    return [c for c in cues if c["gap"] < UNUSED and c["flagged"]]


def add_unused_truth(m: Models, cues: list[dict[str, Any]]) -> None:
    """Each unused-but-flagged cue's do-effect: does the model act on it where the gap does not look
    (other classes taken for the cue's class)?"""
    by_spec = {str(b): b for b in m.world.config.biases + m.world.config.eval_biases}
    for c in unused_flagged(cues):
        b = by_spec[c["spec"]]
        c["do_effect"] = round(do_effect(m, b.label, b.attribute, b.value, "for"), 3)


def backfill_truth(result: dict[str, Any], draw: WorldDraw, cache_dir: str | None, out: Path) -> None:
    """Add ``extra_truth`` (the do-effects of extra flags) and the unused-but-flagged cues' do-effects to
    a result cached before they existed."""
    audits = ("test", "self")
    if all("extra_truth" in result[a] for a in audits) and all(
        "do_effect" in c for a in audits for c in unused_flagged(result[a]["cues"])
    ):
        return
    m = load_models(build_world(draw.config(), cache_dir, progress=False))
    for audit in audits:
        add_unused_truth(m, result[audit]["cues"])
        parsed = [FLAG_LINE.match(line) for line in result[audit]["flags"]]
        rows = [(f["cls"], f["phrase"], f["direction"]) for f in parsed if f is not None]
        kinds = flag_kinds(m.world, rows)
        result[audit]["extra"] = [
            line for line, k in zip(result[audit]["flags"], kinds, strict=True) if k == "extra"
        ]
        result[audit]["extra_truth"] = flag_truth(m, result[audit]["extra"])
    result_file(draw, out).write_text(json.dumps(result, indent=1, default=str))


def evaluate_world(draw: WorldDraw, cache_dir: str | None, out: Path) -> dict[str, Any]:
    cfg = draw.config()
    cache_file = result_file(draw, out)
    cached = cached_result(draw, out)
    if cached is not None:
        backfill_truth(cached, draw, cache_dir, out)
        return cached
    t0 = time.perf_counter()
    wait_for_clip(cfg, cache_dir)
    world = build_world(cfg, cache_dir, progress=False)
    m = load_models(world)
    specs = list(cfg.biases) + list(cfg.eval_biases)
    gaps: dict[str, Any] = {}
    result: dict[str, Any] = {
        "name": draw.name,
        "kind": draw.kind,
        "clip_seed": draw.clip_seed,
        "world_seed": draw.world_seed,
        "biases": [str(b) for b in cfg.biases],
        "eval_biases": [str(b) for b in cfg.eval_biases],
        "clip_zero_shot": world.metrics["clip"]["zero_shot"],
        "test_accuracy": world.metrics["classifier"]["test_accuracy"],
    }
    for audit, (audited, probe) in {"test": ("test", "probe"), "self": ("train", "train")}.items():
        a = audit_split(m, audited, probe, out / "runs" / f"{draw.name}-{audit}")
        if (
            audit == "test"
        ):  # the cues' gaps on the unbiased test split (the cached metrics may lack eval cues)
            pred = a["eb"].logits.argmax(1).numpy()
            gaps = bias_metrics(pred, a["batch"].records, list(world.class_names), specs)
            result["gaps"] = {k: v["gap"] for k, v in gaps.items()}
        result[audit] = audit_result(m, a, specs, gaps)
        if audit == "test":
            res = shown_precision(m, a)
            result["precision"] = {k: res[k] for k in PRECISION_VIEWS}
            result["aligned_named"] = {
                str(b): aligned_named(m, a, b, res) for b in cfg.biases if gaps[str(b)]["gap"] >= USED
            }
    result["seconds"] = round(time.perf_counter() - t0, 1)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    cache_file.write_text(json.dumps(result, indent=1, default=str))
    return result


def audit_result(m: Models, a: dict[str, Any], specs: list[BiasSpec], gaps: dict[str, Any]) -> dict[str, Any]:
    """One audit's figures from its flags: the cues' rows, the flags as lines, extras and mirrors, and
    the do-test of what the generator can check."""
    flags = a["flags"]
    kinds = flag_kinds(m.world, zip(flags["class_name"], flags["phrase"], flags["direction"], strict=True))
    lines = [
        f"{f['class_name']}: {f['phrase']} ({f['direction']}, "
        f"z {f['z_model']:.1f}, effect {f['effect']:.2f}, step {f['step']})"
        for _, f in flags.iterrows()
    ]
    out = {
        "cues": cue_rows(m, a, specs, gaps),
        "flags": lines,
        "n_flags": len(flags),
        "n_extra": kinds.count("extra"),
        "n_mirror": kinds.count("mirror"),
        "extra": [line for line, kind in zip(lines, kinds, strict=True) if kind == "extra"],
        "n_extra_read_as_cue": extras_read_as_cue(m.world, flags, kinds),
    }
    out["extra_truth"] = flag_truth(m, out["extra"])
    add_unused_truth(m, out["cues"])
    return out


# ----------------------------------------------------------------------------------------------
# aggregate


def used_cues(result: dict[str, Any], audit: str) -> list[dict[str, Any]]:
    """One world's planted cues the classifier uses (test-split gap ≥ ``USED``), as ``audit`` saw them."""
    return [c for c in result[audit]["cues"][: len(result["biases"])] if c["gap"] >= USED]


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    scored = [r for r in results if r["kind"] in ("biased", "control")]
    out["sweep_worlds"] = len(scored)
    for audit, key in (("test", "sweep_first_rate"), ("self", "sweep_first_rate_selfprobe")):
        used = [c for r in scored if r["kind"] == "biased" for c in used_cues(r, audit)]
        k = sum(c["first"] for c in used)
        out[key] = k / len(used) if used else None
        out[f"{key}_lb"] = wilson_lower(k, len(used))
        out[f"{key}_n"] = len(used)
        out[f"{key}_missed"] = [
            {
                "spec": c["spec"],
                "gap": round(c["gap"], 3),
                "first_flag": c["first_flag"],
                "reason": c["reason"],
                "z": c["z_model"],
                "effect": c["effect"],
            }
            for c in used
            if not c["first"]
        ]
        if audit == "test":
            out["sweep_used_cues"] = len(used)
        unused = [c for r in scored for c in r[audit]["cues"] if c["gap"] < UNUSED]
        suffix = "" if audit == "test" else "_selfprobe"
        out[f"sweep_unused_cues{suffix}"] = len(unused)
        out[f"sweep_unused_flag_rate{suffix}"] = (
            sum(c["flagged"] for c in unused) / len(unused) if unused else None
        )
        out[f"sweep_unused_flagged{suffix}"] = [
            {"spec": c["spec"], "gap": round(c["gap"], 3), "do_effect": c.get("do_effect")}
            for c in unused_flagged(unused)
        ]
        controls = [r for r in scored if r["kind"] == "control"]
        biased = [r for r in scored if r["kind"] == "biased"]
        out[f"sweep_control_false_flags_mean{suffix}"] = float(
            np.mean([r[audit]["n_flags"] for r in controls])
        )
        out[f"sweep_extra_flags_mean{suffix}"] = float(np.mean([r[audit]["n_extra"] for r in biased]))
        out[f"sweep_mirror_flags_mean{suffix}"] = float(np.mean([r[audit]["n_mirror"] for r in biased]))
        read_as = [r[audit].get("n_extra_read_as_cue") for r in biased]  # None: cached before aliases
        out[f"sweep_extra_flags_read_as_cue_mean{suffix}"] = (
            float(np.mean(read_as)) if None not in read_as else None
        )
        # Extra flags the generator can check: does the model change its prediction when only that
        # attribute changes? Confirmed ones are model traits nobody planted; the rest are false alarms.
        truth = [[t["confirmed"] for t in r[audit].get("extra_truth", [])] for r in biased]
        out[f"sweep_extra_flags_do_confirmed_mean{suffix}"] = float(np.mean([sum(t) for t in truth]))
        out[f"sweep_extra_flags_do_unconfirmed_mean{suffix}"] = float(
            np.mean([len(t) - sum(t) for t in truth])
        )
        out[f"sweep_extra_flags_uncheckable_mean{suffix}"] = float(
            np.mean([r[audit]["n_extra"] - len(t) for r, t in zip(biased, truth, strict=True)])
        )
    out["between_cues"] = [
        {"spec": c["spec"], "gap": round(c["gap"], 3), "flagged": c["flagged"]}
        for r in scored
        for c in r["test"]["cues"]
        if UNUSED <= c["gap"] < USED
    ]
    for name in PRECISION_VIEWS:
        scored_with = [r for r in scored if name in r["precision"]]  # older cached results lack "flow"
        n = sum(r["precision"][name]["n"] for r in scored_with)
        t = sum(r["precision"][name]["true"] for r in scored_with)
        per: dict[str, list[int]] = {}
        for r in scored_with:
            for k, (kn, kt) in r["precision"][name]["per_attribute"].items():
                per.setdefault(k, [0, 0])
                per[k][0] += kn
                per[k][1] += kt
        # The headline is what the audit tables show (shown_phrases); "shown" is the sweep's own
        # image-specific test over every image of the class.
        key = {
            "flow": "phrase_image_precision",
            "flow_previous": "phrase_image_precision_previous_view",
            "flow_ungated": "phrase_image_precision_without_model_gate",
            "flow_selected": "phrase_image_precision_selected_only_view",
            "shown": "phrase_image_precision_all_images_test",
            "selected": "selected_image_precision",
        }[name]
        out[key] = t / n if n else None
        out[f"{key}_per_attribute"] = {k: round(v[1] / v[0], 3) for k, v in per.items() if v[0]}
        out[f"{name}_phrases_per_image"] = float(
            np.mean([r["precision"][name]["per_image"] for r in scored_with])
        )
    views = {
        "flow": "aligned_cue_named_rate",
        "previous": "aligned_cue_named_rate_previous_view",
        "selected": "aligned_cue_named_rate_selected_only_view",
    }
    for view, key in views.items():
        # results cached before seed 10 hold one (named, aligned) pair per cue: the previous view
        named = [
            v.get(view) if isinstance(v, dict) else (v if view == "previous" else None)
            for r in scored
            for v in r.get("aligned_named", {}).values()
        ]
        named = [v for v in named if v is not None]
        out[key] = sum(v[0] for v in named) / max(sum(v[1] for v in named), 1) if named else None
    demos = {}
    for r in results:
        if r["kind"] == "demo":
            demos.setdefault(r["clip_seed"], {})["biased"] = r["test"]["cues"][0]["first"]
        if r["kind"] == "demo-control":
            demos.setdefault(r["clip_seed"], {})["control"] = r["test"]["n_flags"] == 0
    out["demo_clip_seeds"] = {str(s): v for s, v in demos.items()}
    out["demo_clip_seeds_pass"] = sum(
        bool(v.get("biased")) and bool(v.get("control")) for v in demos.values()
    )
    out["gaps"] = {c["spec"]: round(c["gap"], 3) for r in scored for c in r["test"]["cues"]}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1, help="sweep seed: draws the worlds")
    parser.add_argument(
        "--clip-seeds",
        default="0,1,2",
        help="training seeds of the tiny CLIPs the worlds are spread over (default 0,1,2; 0 is make demo's)",
    )
    parser.add_argument("--biased", type=int, default=21, help="biased worlds (default 21)")
    parser.add_argument("--controls", type=int, default=6, help="control worlds (default 6)")
    parser.add_argument("--quick", action="store_true", help="6 biased + 2 control worlds")
    parser.add_argument("--no-demo", action="store_true", help="skip the demo worlds")
    parser.add_argument(
        "--cached-only", action="store_true", help="summarise the worlds already evaluated; compute nothing"
    )
    parser.add_argument(
        "--only-clip-seed",
        type=int,
        help="evaluate only the worlds of this CLIP (run one process per CLIP to use more cores)",
    )
    parser.add_argument(
        "--cache-dir", help="world cache (default $TEXTCAM_CACHE/world or ~/.cache/textcam/world)"
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "runs" / "sweep", help="run dirs and per-world results"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    n_biased, n_controls = (6, 2) if args.quick else (args.biased, args.controls)
    clip_seeds = tuple(int(v) for v in args.clip_seeds.split(","))
    if len(set(clip_seeds)) < 1:
        parser.error("--clip-seeds needs at least one seed")
    draws = draw_worlds(args.seed, n_biased, n_controls, clip_seeds)
    if args.no_demo:
        draws = [d for d in draws if not d.kind.startswith("demo")]
    draws.sort(key=lambda d: d.clip_seed)  # one CLIP at a time in memory and in training
    out = args.out / f"seed-{args.seed}"
    t0 = time.perf_counter()
    results = []
    n_drawn = len(draws)
    if args.cached_only:
        draws = [d for d in draws if cached_result(d, out) is not None]
    if args.only_clip_seed is not None:
        draws = [d for d in draws if d.clip_seed == args.only_clip_seed]
    for i, d in enumerate(draws, 1):
        clip_cached = (clip_dir_for(d.config(), args.cache_dir) / "metrics.json").is_file()
        if cached_result(d, out) is None and not clip_cached:
            print(f"[{i}/{len(draws)}] training tiny CLIP {d.clip_seed} first (10 minutes here)", flush=True)
        r = evaluate_world(d, args.cache_dir, out)
        results.append(r)
        cues = "; ".join(
            f"{c['spec']} gap {c['gap']:+.2f} first={c['first']}/{s['first']}"
            for c, s in zip(r["test"]["cues"], r["self"]["cues"], strict=True)
        )
        print(
            f"[{i}/{len(draws)}] {d.name} clip {d.clip_seed} ({r['seconds']:.0f} s): {cues} | "
            f"flags test {r['test']['n_flags']} self {r['self']['n_flags']}",
            flush=True,
        )
    summary = summarise(results)
    summary["seed"] = args.seed
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    summary["targets_missed"] = [
        k
        for k, (op, v) in TARGETS.items()
        if summary.get(k) is None or (summary[k] < v if op == ">=" else summary[k] > v)
    ]
    # partial: not every drawn world is in it (one CLIP's process, or a cache still filling)
    summary["partial"] = len(draws) < n_drawn
    name = "summary-partial.json" if summary["partial"] else "summary.json"
    (out / name).write_text(json.dumps(summary, indent=1, default=str))
    print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
