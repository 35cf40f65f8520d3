"""``textcam world ...``: argparse wiring for the synthetic world (the lead's cli.py calls
:func:`add_world_parser`). Handlers parse, call the library and print; nothing else lives here."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from textcam.cli import add_command

WORLD_DOC = """\
the synthetic ground-truth world: generate data, train its tiny CLIP and classifier

A procedurally generated CLEVR-like world with known attributes and planted biases, its own tiny
CLIP and a classifier to audit. Every stage is cached by config hash and resumes per epoch.
"""

EPILOG = """\
bias specs: CLASS=ATTRIBUTE:VALUE@STRENGTH, repeatable, e.g.
  --bias circle=background:water@0.99   circles on water, water nearly only behind circles
  --bias square=color:red@0.99          --bias triangle=watermark:yes@1
  --no-bias                             a control world (no planted correlation)
attributes: shape color size texture background watermark border
cache: --cache-dir, else $TEXTCAM_CACHE/world, else ~/.cache/textcam/world
"""


def add_world_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``world`` with ``generate``, ``train-clip``, ``train-classifier`` and ``build``."""
    world = add_command(subparsers, "world", WORLD_DOC, EPILOG)
    sub = world.add_subparsers(dest="world_command", required=True, metavar="COMMAND")
    specs = [
        ("generate", _cmd_generate, "render the train/probe/test splits (PNG + Parquet manifest + masks)"),
        (
            "train-clip",
            _cmd_train_clip,
            "train the tiny CLIP (shared by all bias configs) and print zero-shot accuracy",
        ),
        (
            "train-classifier",
            _cmd_train_classifier,
            "generate splits, train the CNN, print accuracy and bias gaps",
        ),
        (
            "build",
            _cmd_build,
            "generate + train-clip + train-classifier (each cached), then print the World summary as JSON",
        ),
    ]
    for name, handler, help_text in specs:
        p = add_command(sub, name, help_text, EPILOG)
        _common(p)
        p.set_defaults(func=handler)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        choices=("demo", "tiny"),
        default="demo",
        help="base configuration: demo (README size) or tiny (fast, for tests). Default: demo",
    )
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="JSON/YAML world file (keys of WorldConfig.to_dict; 'preset:' allowed); overrides --preset",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--bias",
        action="append",
        metavar="SPEC",
        help="planted correlation CLASS=ATTRIBUTE:VALUE@STRENGTH (repeatable); "
        "default: the preset's (circle=background:water@0.99)",
    )
    g.add_argument("--no-bias", action="store_true", help="control world without planted correlations")
    p.add_argument("--seed", type=int, help="generator seed (default 0)")
    p.add_argument("--n-train", type=int, help="train split size")
    p.add_argument("--n-test", type=int, help="test split size")
    p.add_argument(
        "--cache-dir", type=Path, help="cache root (default $TEXTCAM_CACHE/world or ~/.cache/textcam/world)"
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def config_from_args(args: argparse.Namespace):
    """Build the ``WorldConfig`` an invocation describes."""
    from dataclasses import replace

    from textcam.synthetic.config import WorldConfig

    if args.config is not None:
        cfg = WorldConfig.from_file(args.config)
    else:
        cfg = WorldConfig.demo() if args.preset == "demo" else WorldConfig.tiny()
    if args.no_bias:
        cfg = cfg.with_biases([])
    elif args.bias:
        cfg = cfg.with_biases(args.bias)
    overrides = {
        k: v
        for k, v in (("seed", args.seed), ("n_train", args.n_train), ("n_test", args.n_test))
        if v is not None
    }
    return replace(cfg, **overrides) if overrides else cfg


def _setup(args: argparse.Namespace):
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return config_from_args(args)


def _print(obj: object) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def _cmd_generate(args: argparse.Namespace) -> int:
    from textcam.synthetic.world import SPLITS, _ensure_split, world_dir_for

    cfg = _setup(args)
    root = world_dir_for(cfg, args.cache_dir)
    t0 = time.perf_counter()
    paths = {s: str(_ensure_split(cfg, s, root).manifest) for s in SPLITS}
    _print({"root": str(root), "manifests": paths, "seconds": round(time.perf_counter() - t0, 1)})
    return 0


def _cmd_train_clip(args: argparse.Namespace) -> int:
    from textcam.synthetic.world import ensure_tiny_clip

    cfg = _setup(args)
    d, metrics = ensure_tiny_clip(cfg, args.cache_dir, progress=not args.no_progress)
    _print(
        {
            "clip_dir": str(d),
            "open_clip_id": f"local-dir:{d}",
            "zero_shot": metrics["zero_shot"],
            "train_seconds": metrics["train_seconds"],
        }
    )
    return 0


def _cmd_train_classifier(args: argparse.Namespace) -> int:
    from textcam.synthetic.world import ensure_classifier

    cfg = _setup(args)
    ckpt, metrics = ensure_classifier(cfg, args.cache_dir, progress=not args.no_progress)
    _print({"checkpoint": str(ckpt), **metrics})
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    from textcam.synthetic.world import build_world

    cfg = _setup(args)
    world = build_world(cfg, args.cache_dir, progress=not args.no_progress)
    _print(world.to_dict())
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m textcam.synthetic.cli world build ...``) until the main CLI wires it."""
    parser = argparse.ArgumentParser(prog="textcam")
    add_world_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
