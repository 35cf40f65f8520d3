"""``textcam intervene``: suppress a flagged concept's channels, measure whom it helps, keep the model.

Registered through the ``textcam.commands`` entry point group (see pyproject.toml).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pandas as pd

from textcam.cli import add_command

DOC = """\
suppress a flagged concept's channels (or --refit the last layer without it): accuracy per group, edited model

For each flag of RUN_DIR (or one, --flag CLASS:PHRASE): find the phrase's channels at the bank's
layer, replace them by their probe mean (or zero), report accuracy overall, per group and worst
group before and after (and for as many random channels), and save the edited model.

--refit instead fits a new last layer on the labelled probe images, every group (class x concept
present/absent, as CLIP sees it) weighing the same: Deep Feature Reweighting with the groups read off the
flag instead of annotated. No channel is suppressed: before the fit, the concept's linear trace within
classes is erased from the features (LEACE), and the eraser is folded into the head. Beside it, the same
refit by random phrases. It needs labelled probe images; its figures are cross-fitted (two folds), so
none is measured on an image its head was fitted on.
"""

EPILOG = """\
examples:
  textcam intervene runs/r1                                  every "for" flag of the run
  textcam intervene runs/r1 --flag "circle:water background" --mode zero
  textcam intervene runs/r1 --refit                          a concept-erased, concept-balanced last layer
  textcam audit --model runs/r1/interventions/circle-water-background.safetensors ...   re-audit it

Accuracy is measured on the run's labelled probe images (the images the bank was calibrated on), with
concept presence as CLIP sees it. Without labels the channels and the edited model are still written.
"""


def add_intervene_parser(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(subparsers, "intervene", DOC, EPILOG)
    p.add_argument("run_dir", metavar="RUN_DIR", help="an audit run directory with flags")
    p.add_argument("--flag", metavar="CLASS:PHRASE", help="one flag to act on (default: every 'for' flag)")
    p.add_argument("--mode", choices=("mean", "zero"), default="mean", help="replacement (default mean)")
    p.add_argument("--refit", action="store_true", help="a new last layer, concept erased and balanced")
    p.add_argument("--out", help="folder for the edited checkpoints (default RUN_DIR/interventions)")
    p.set_defaults(func=cmd_intervene)


def cmd_intervene(args: argparse.Namespace) -> int:
    from tasks.intervene import intervene_run

    run_dir = Path(args.run_dir).resolve()
    result = intervene_run(run_dir, args.flag, mode=args.mode, refit=args.refit, out_dir=args.out)
    if not (result["n_images"] > 0).any():
        print("the probe images have no labels: channels and edited models written, accuracy not measured")
    for r in result.itertuples():
        print("\n".join(describe(r)))
    print(f"table: {run_dir / 'interventions.parquet'}")
    return 0


def describe(r: Any) -> list[str]:
    """The lines ``textcam intervene`` prints for one row of the interventions table."""
    edit = "a new last layer, the phrase erased" if r.refit else f"{r.n_channels} channels ({r.mode})"
    random = "random phrases" if r.refit else "random channels"
    line = f"{r.class_name}: {r.phrase!r} - {edit}"
    if pd.notna(r.conflicting_before):
        line += (
            f"; reliance {r.reliance_before:.2f} -> {r.reliance_after:.2f} "
            f"({random} {r.random_reliance_after:.2f})"
            f"; {r.class_name} without it {r.conflicting_before:.2f} -> {r.conflicting_after:.2f} "
            f"({random} {r.random_conflicting_after:.2f}); "
            f"worst group {r.worst_group_before:.2f} -> {r.worst_group_after:.2f}; "
            f"accuracy {r.accuracy_before:.3f} -> {r.accuracy_after:.3f} "
            f"on {r.n_images} labelled probe images, {r.n_conflicting} of them {r.class_name} without it"
        )
    lines = [line]
    if r.n_conflicting == 0:
        # Then a refit has no evidence of the class without the cue (docs/decisions.md, "Three more refits").
        lines.append(
            f"  no labelled probe image is {r.class_name} without {r.phrase!r} (as CLIP sees it): its "
            f"accuracy without the cue cannot be measured here, and a refit has nothing to learn "
            f"{r.class_name} without it from; audit with a --probe that holds such images"
        )
    lines.append(f"  edited model: {r.checkpoint}")
    return lines
