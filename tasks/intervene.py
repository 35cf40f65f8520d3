"""What if the model could not see a flagged concept? Suppress its channels on an audit run's probe set.

For a flag (class, phrase, "for"): the phrase's channels at the bank's layer (:func:`textcam.intervene.
concept_channels`), replaced by their probe mean (``mean``, default) or zero; accuracy overall, per group
(class × concept present/absent, presence as CLIP sees it: the probe's visibility model) and worst group
on the run's labelled probe images, before and after, with as many random channels for comparison. The
edited model is saved as a checkpoint :func:`textcam.models.load_model` opens, so it can be re-audited.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

INTERVENTIONS = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("class_name", pa.string(), nullable=False),
        pa.field("phrase", pa.string(), nullable=False),
        pa.field("mode", pa.string(), nullable=False),  # "mean" | "zero"
        pa.field("n_channels", pa.int32(), nullable=False),
        pa.field("channels", pa.list_(pa.int32()), nullable=False),
        pa.field("null_threshold", pa.float64(), nullable=False),
        pa.field("expected_by_chance", pa.float64(), nullable=False),
        pa.field("n_images", pa.int64(), nullable=False),  # labelled probe images evaluated
        pa.field("accuracy_before", pa.float64(), nullable=True),
        pa.field("accuracy_after", pa.float64(), nullable=True),
        pa.field("conflicting_before", pa.float64(), nullable=True),  # the class, concept absent
        pa.field("conflicting_after", pa.float64(), nullable=True),
        pa.field("worst_group_before", pa.float64(), nullable=True),
        pa.field("worst_group_after", pa.float64(), nullable=True),
        pa.field("random_conflicting_after", pa.float64(), nullable=True),
        pa.field("checkpoint", pa.string(), nullable=False),
    ],
    metadata={"table": "interventions", "version": "1"},
)
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
    path = run_dir / "flags.parquet"
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
    out_dir: str | Path | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per flag (the :data:`INTERVENTIONS` columns); writes the edited checkpoints and
    ``RUN_DIR/interventions.parquet``. ``probe`` is the bank's :class:`textcam.bank.ProbeSet`."""
    from textcam.intervene import Suppression, concept_channels, group_accuracy, layer_features
    from textcam.models import save_edited_checkpoint
    from textcam.visibility import PhraseVisibility

    run_dir = Path(run_dir)
    if bank.layer != model.target_layer:
        raise ValueError(
            f"the bank was calibrated at layer {bank.layer!r}, the model explains {model.target_layer!r}: "
            "suppression needs the bank's layer"
        )
    out = Path(out_dir) if out_dir is not None else run_dir / "interventions"
    out.mkdir(parents=True, exist_ok=True)
    layer = bank.layer
    logits, feats = layer_features(model.module, layer, images.x)
    pred0 = logits.argmax(1).numpy()
    presence = PhraseVisibility.fit(probe.embeddings, text).presence(probe.embeddings)[images.presence_rows]
    labelled = images.labels >= 0
    means = feats.mean(0)
    rng = np.random.default_rng(seed)
    rows = []
    for f in flags.itertuples():
        cc = concept_channels(bank.directions, text, phrases, f.phrase)
        values = tuple(float(v) for v in means[list(cc.channels)]) if mode == "mean" else ()
        s = Suppression(layer, cc.channels, mode, values, note=f"{f.class_name}: {f.phrase}")  # type: ignore[arg-type]
        safe = "".join(ch if ch.isalnum() else "-" for ch in f"{f.class_name}-{f.phrase}")
        checkpoint = save_edited_checkpoint(model, out / f"{safe}.safetensors", s)
        row = {
            "run_id": run_dir.name,
            "class_name": f.class_name,
            "phrase": f.phrase,
            "mode": mode,
            "n_channels": len(cc.channels),
            "channels": list(cc.channels),
            "null_threshold": cc.threshold,
            "expected_by_chance": cc.expected_by_chance,
            "n_images": int(labelled.sum()),
            "checkpoint": str(checkpoint),
        }
        if labelled.any() and cc.channels:
            p = list(phrases).index(f.phrase)
            cls = int(f.class_index)
            lab, present = images.labels[labelled], presence[labelled, p]
            before = group_accuracy(pred0[labelled], lab, present, cls)
            after_logits, _ = layer_features(model.module, layer, images.x, suppression=s)
            after = group_accuracy(after_logits.argmax(1).numpy()[labelled], lab, present, cls)
            random = []
            for _ in range(RANDOM_DRAWS):
                pick = tuple(
                    int(c) for c in rng.choice(bank.directions.shape[0], len(cc.channels), replace=False)
                )
                r = Suppression(
                    layer, pick, mode, tuple(float(v) for v in means[list(pick)]) if mode == "mean" else ()
                )  # type: ignore[arg-type]
                r_logits, _ = layer_features(model.module, layer, images.x, suppression=r)
                random.append(
                    group_accuracy(r_logits.argmax(1).numpy()[labelled], lab, present, cls)["conflicting"]
                )
            row |= {
                "accuracy_before": before["accuracy"],
                "accuracy_after": after["accuracy"],
                "conflicting_before": before["conflicting"],
                "conflicting_after": after["conflicting"],
                "worst_group_before": before["worst_group"],
                "worst_group_after": after["worst_group"],
                "random_conflicting_after": float(np.nanmean(random)),
            }
        rows.append(row)
    table = pa.Table.from_pylist(rows, schema=INTERVENTIONS)
    tmp = run_dir / ".interventions.parquet.tmp"
    pq.write_table(table, tmp)
    tmp.replace(run_dir / "interventions.parquet")
    return table.to_pandas()
