"""What if the model could not see a flagged concept? Suppress its channels on an audit run's probe set.

For a flag (class, phrase, "for"): the phrase's channels at the bank's layer (:func:`textcam.intervene.
concept_channels`), replaced by their probe mean (``mean``, default) or zero; accuracy overall, per group
(class × concept present/absent, presence as CLIP sees it: the probe's visibility model) and worst group
on the run's labelled probe images, before and after, with as many random channels for comparison. The
edited model is saved as a checkpoint :func:`textcam.models.load_model` opens, so it can be re-audited.

With ``refit`` no channel is suppressed: a new last layer is fitted on the concept-erased, concept-balanced
features (:func:`textcam.intervene.concept_balanced_head`), beside the same refit by random phrases.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from tasks.rundir import RunDir
from tasks.store import open_writable, store_table
from textcam.schema import INTERVENTIONS

RANDOM_DRAWS = 5


@dataclass(frozen=True)
class ProbeImages:
    """The labelled images an intervention is measured on: preprocessed tensors and class indices."""

    x: torch.Tensor  # (N, 3, H, W), the model's preprocessing
    labels: np.ndarray  # (N,) class index, -1 unknown
    presence_rows: np.ndarray  # (N,) row of each image in the probe set's CLIP embeddings


def parse_flag(text: str) -> tuple[str, str]:
    """``"CLASS:PHRASE"`` -> (class, phrase); the phrase may itself contain colons."""
    cls, sep, phrase = text.partition(":")
    if not sep or not cls or not phrase:
        raise ValueError(f"--flag must be CLASS:PHRASE, got {text!r}")
    return cls, phrase


def chosen_flags(run_dir: Path, flag: str | None) -> pd.DataFrame:
    """The run's "for" flags, or the one named ``CLASS:PHRASE`` (an error lists the run's flags)."""
    path = RunDir(run_dir).table("flags")
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the audit first")
    flags = pq.read_table(path).to_pandas()
    flags = flags[flags["direction"] == "for"]
    if flag is None:
        if flags.empty:
            raise ValueError(f"{run_dir} has no flags to act on")
        return flags
    cls, phrase = parse_flag(flag)
    hit = flags[(flags["class_name"] == cls) & (flags["phrase"] == phrase)]
    if hit.empty:
        known = ", ".join(f"{c}:{p}" for c, p in zip(flags["class_name"], flags["phrase"], strict=True))
        raise ValueError(f"no flag {cls}:{phrase} in {run_dir}; its flags: {known or 'none'}")
    return hit


def intervene(
    run_dir: str | Path,
    model,
    bank,
    phrases: Sequence[str],
    text: torch.Tensor,
    probe,
    images: ProbeImages,
    flags: pd.DataFrame,
    *,
    mode: str = "mean",
    refit: bool = False,
    out_dir: str | Path | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per flag (the :data:`INTERVENTIONS` columns); writes the edited checkpoints and
    ``RUN_DIR/interventions.parquet``. ``probe`` is the bank's :class:`textcam.bank.ProbeSet`."""
    from textcam.intervene import layer_features
    from textcam.visibility import PhraseVisibility

    run_dir = Path(run_dir)
    if bank.layer != model.target_layer:
        raise ValueError(
            f"the bank was calibrated at layer {bank.layer!r}, the model explains {model.target_layer!r}: "
            "suppression needs the bank's layer"
        )
    out = Path(out_dir) if out_dir is not None else RunDir(run_dir).interventions
    out.mkdir(parents=True, exist_ok=True)
    layer = bank.layer
    logits, feats = layer_features(model.module, layer, images.x)
    pred0 = logits.argmax(1).numpy()
    presence = PhraseVisibility.fit(probe.embeddings, text).presence(probe.embeddings)[images.presence_rows]
    labelled = images.labels >= 0
    if refit and not labelled.any():
        raise ValueError("a refit needs labelled probe images; this run's probe has no labels")
    means = feats.mean(0)
    rng = np.random.default_rng(seed)
    unedited = (logits.numpy()[labelled], feats.numpy()[labelled])
    base = _Baseline(images, pred0, unedited, presence, labelled, means, layer, mode, refit)
    rows = [
        _flag_row(f, model, bank, phrases, text, base, out, rng) | {"run_id": run_dir.name}
        for f in flags.itertuples()
    ]
    table = pa.Table.from_pylist(rows, schema=INTERVENTIONS)
    con = open_writable(run_dir)
    try:
        store_table(con, run_dir, "interventions", table)
        con.execute("CHECKPOINT")
    finally:
        con.close()
    return table.to_pandas()


@dataclass(frozen=True)
class _Baseline:
    """The unedited model on the labelled probe images, and how suppression is done."""

    images: ProbeImages
    pred: np.ndarray
    outputs: tuple[np.ndarray, np.ndarray]  # logits and pooled features of the labelled images
    presence: np.ndarray
    labelled: np.ndarray
    means: torch.Tensor
    layer: str
    mode: str
    refit: bool

    def labelled_outputs(self, model: Any, suppression: Any) -> tuple[np.ndarray, np.ndarray]:
        """Logits and pooled target-layer features of the labelled images with ``suppression``."""
        from textcam.intervene import layer_features

        logits, feats = layer_features(model.module, self.layer, self.images.x, suppression=suppression)
        return logits.numpy()[self.labelled], feats.numpy()[self.labelled]

    def predict(self, outputs: tuple[np.ndarray, np.ndarray], present: np.ndarray) -> np.ndarray:
        """The labelled images' classes: the model's own last layer, or with ``refit`` a concept-balanced
        one (cross-fitted; ``present``: the concept over those images)."""
        from textcam.intervene import crossfit_predictions

        logits, feats = outputs
        if not self.refit:
            return logits.argmax(1)
        return crossfit_predictions(feats, self.images.labels[self.labelled], present, logits.shape[1])


def _flag_row(
    f: Any,
    model: Any,
    bank: Any,
    phrases: Sequence[str],
    text: torch.Tensor,
    base: _Baseline,
    out: Path,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """One flag: its channels, the edited checkpoint, and the group accuracies before and after (beside
    as many random channels)."""
    from textcam.intervene import concept_channels, group_accuracy
    from textcam.models import save_edited_checkpoint

    cc = concept_channels(bank.directions, text, phrases, f.phrase)
    # A refit suppresses no channel: the concept is erased from its head's features instead, which keeps
    # the class evidence those channels also carry (measured: docs/decisions.md, "Erase the concept").
    suppressed = () if base.refit else cc.channels
    s = _suppression(base.layer, suppressed, base.mode, base.means, note=f"{f.class_name}: {f.phrase}")
    lab = base.labelled
    phrase_index = list(phrases).index(f.phrase)
    present = base.presence[lab, phrase_index]
    groups = (base.images.labels[lab], present, int(f.class_index))
    outputs = base.outputs if base.refit else base.labelled_outputs(model, s)  # a refit edits no channel
    head = _refit_head(base, outputs, present) if base.refit else None
    safe = "".join(ch if ch.isalnum() else "-" for ch in f"{f.class_name}-{f.phrase}{'-refit' * base.refit}")
    row = {
        "class_name": f.class_name,
        "phrase": f.phrase,
        "mode": "erase" if base.refit else base.mode,
        "refit": base.refit,
        "n_channels": len(suppressed),
        "channels": list(suppressed),
        "null_threshold": cc.threshold,
        "expected_by_chance": cc.expected_by_chance,
        "n_images": int(lab.sum()),
        "n_conflicting": int(((groups[0] == groups[2]) & ~present).sum()) if lab.any() else None,
        "checkpoint": str(save_edited_checkpoint(model, out / f"{safe}.safetensors", s, head)),
    }
    if not (lab.any() and (cc.channels or base.refit)):
        return row
    after = group_accuracy(base.predict(outputs, present), *groups)
    if base.refit:  # beside it: the same refit, erased and balanced by a random non-class phrase
        classes = set(model.class_names)
        others = [i for i, p in enumerate(phrases) if p not in classes and i != phrase_index]
        picks = rng.choice(others, min(RANDOM_DRAWS, len(others)), replace=False)
        random = [group_accuracy(base.predict(outputs, base.presence[lab, q]), *groups) for q in picks]
        return row | _figures(group_accuracy(base.pred[lab], *groups), after, random)
    n_all, k = bank.directions.shape[0], len(cc.channels)

    def random_channels() -> Any:
        pick = tuple(int(c) for c in rng.choice(n_all, k, replace=False))
        return _suppression(base.layer, pick, base.mode, base.means)

    random = [
        group_accuracy(base.predict(base.labelled_outputs(model, random_channels()), present), *groups)
        for _ in range(RANDOM_DRAWS)
    ]
    return row | _figures(group_accuracy(base.pred[lab], *groups), after, random)


def _refit_head(
    base: _Baseline, outputs: tuple[np.ndarray, np.ndarray], present: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """The concept-balanced last layer on every labelled probe image, the concept erased (it is saved)."""
    from textcam.intervene import concept_balanced_head

    logits, feats = outputs
    labels = base.images.labels[base.labelled]
    weight, bias = concept_balanced_head(feats, labels, present, logits.shape[1])
    return torch.from_numpy(weight).float(), torch.from_numpy(bias).float()


def _suppression(
    layer: str, channels: tuple[int, ...], mode: str, means: torch.Tensor, note: str = ""
) -> Any:
    """Zero the channels, or hold them at their probe mean."""
    from textcam.intervene import Suppression

    values = tuple(float(v) for v in means[list(channels)]) if mode == "mean" else ()
    return Suppression(layer, channels, mode, values, note=note)  # type: ignore[arg-type]


def _figures(before: dict, after: dict, random: list[dict]) -> dict[str, float]:
    """The INTERVENTIONS columns of one flag: before and after suppression, and the random channels."""
    return {
        "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"],
        "conflicting_before": before["conflicting"],
        "conflicting_after": after["conflicting"],
        "worst_group_before": before["worst_group"],
        "worst_group_after": after["worst_group"],
        "random_conflicting_after": float(np.nanmean([r["conflicting"] for r in random])),
        "reliance_before": before["reliance"],
        "reliance_after": after["reliance"],
        "random_reliance_after": float(np.nanmean([r["reliance"] for r in random])),
    }


def intervene_run(
    run_dir: str | Path,
    flag: str | None = None,
    *,
    mode: str = "mean",
    refit: bool = False,
    out_dir: str | Path | None = None,
) -> pd.DataFrame:
    """:func:`intervene` on an audit run directory: its config, bank, probe set and flags."""
    from tasks.calibrate import probe_images
    from tasks.config import load_config
    from tasks.explain_shard import load_phrases
    from tasks.manifest import read_manifest
    from textcam.bank import ChannelBank, ProbeSet
    from textcam.data import iter_batches
    from textcam.models import load_model

    run_dir = Path(run_dir).resolve()
    run = RunDir(run_dir)
    if not run.config.is_file():
        raise FileNotFoundError(f"{run_dir} is not an audit run directory (no config.yaml)")
    if mode not in ("mean", "zero"):
        raise ValueError(f"mode must be 'mean' or 'zero', got {mode!r}")
    flags = chosen_flags(run_dir, flag)
    cfg = load_config(run.config)
    model = load_model(cfg.model, weights=cfg.weights, device="cpu")
    bank = ChannelBank.load(run.bank_file, model_id=model.model_id)
    phrases, text = load_phrases(run.phrases_file)
    probe_file = run.probe_file
    if not probe_file.is_file():
        raise FileNotFoundError(f"{probe_file} not found: re-run the audit to keep the probe set")
    probe = ProbeSet.load(probe_file)
    table = probe_images(cfg, read_manifest(cfg.data))
    keep = probe.indices.numpy()
    all_paths = table.column("path").to_pylist()
    paths = [all_paths[i] for i in keep]
    index = {n: i for i, n in enumerate(model.class_names)}
    labels = np.array(
        [index.get(str(v), -1) if v is not None else -1 for v in table.column("label").to_pylist()]
    )
    batches = [
        b.tensors[0] for b in iter_batches(paths, [model.preprocess], batch_size=64) if b.indices.numel()
    ]
    x = torch.cat(batches) if batches else torch.empty(0)
    if x.shape[0] != len(paths):
        raise ValueError(f"{len(paths) - x.shape[0]} probe images could no longer be read; re-run the audit")
    images = ProbeImages(x, labels[keep], np.arange(len(keep)))
    return intervene(
        run_dir, model, bank, phrases, text, probe, images, flags, mode=mode, refit=refit, out_dir=out_dir
    )
