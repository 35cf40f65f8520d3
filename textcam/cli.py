"""``textcam`` command line: a thin front end over the library.

Core commands live here (``layers``, ``calibrate``, ``explain``); the ground-truth world and the
audit workflow plug in their own subcommands through the ``textcam.commands`` entry-point group,
so the library never imports the orchestration layer.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

EPILOG = """examples:
  textcam layers efficientnet-lite0
  textcam calibrate --model efficientnet-lite0 --clip ViT-B-32 --clip-pretrained clip.safetensors \\
      --probe ../shared/imagenet-samples --out bank.safetensors
  textcam explain cat.jpg --model efficientnet-lite0 --bank bank.safetensors \\
      --clip ViT-B-32 --clip-pretrained clip.safetensors --out explanations/
"""


class CliError(Exception):
    """An error to print as one line, without a traceback."""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="registered model name (see `textcam models`) or a local .safetensors checkpoint",
    )
    p.add_argument(
        "--weights",
        default="default",
        help="'default' (the registry's pretrained weights), 'none' (random), or a local file",
    )
    p.add_argument("--layer", default=None, help="target layer by module name (default: the model's)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")


def _add_clip_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clip", required=True, help="open_clip architecture (e.g. ViT-B-32) or local-dir:PATH")
    p.add_argument(
        "--clip-pretrained",
        default=None,
        help="open_clip pretrained tag or local checkpoint file (omit for random weights)",
    )


def _load_model(args: argparse.Namespace):
    from textcam.models import load_model

    return load_model(args.model, weights=args.weights, device=args.device)


def cmd_models(args: argparse.Namespace) -> int:
    from textcam.models import list_models

    for name in list_models():
        print(name)
    return 0


def cmd_layers(args: argparse.Namespace) -> int:
    from textcam.layers import list_layers

    model = _load_model(args)
    rows = list_layers(
        model.module, model.input_size, token_grid=model.token_grid, default=model.target_layer
    )
    width = max(len(r.name) for r in rows)
    for r in rows:
        mark = "*" if r.is_default else " "
        print(f"{mark} {r.name:<{width}}  {r.type:<20} {'x'.join(map(str, r.out_shape))}")
    print("\n* default target layer")
    return 0


def _probe_paths(source: str) -> list[Path]:
    from textcam.data import list_images

    src = Path(source)
    if src.is_dir():
        paths = list_images(src)
    elif src.suffix.lower() in {".csv", ".parquet"}:
        import pandas as pd

        df = pd.read_csv(src) if src.suffix.lower() == ".csv" else pd.read_parquet(src)
        if "path" not in df.columns:
            raise CliError(f"manifest {src} has no 'path' column")
        paths = [(src.parent / p) if not Path(p).is_absolute() else Path(p) for p in df["path"].astype(str)]
    else:
        raise CliError(f"probe set must be an image folder or a .csv/.parquet manifest: {src}")
    if not paths:
        raise CliError(f"no images found in {src}")
    return paths


def cmd_calibrate(args: argparse.Namespace) -> int:
    from textcam.bank import ChannelBank
    from textcam.clip import load_clip

    model = _load_model(args)
    clip = load_clip(args.clip, args.clip_pretrained, device=args.device)
    paths = _probe_paths(args.probe)
    bank = ChannelBank.calibrate(
        model,
        clip,
        paths,
        layer=args.layer,
        m=args.m,
        shrinkage=args.shrinkage,
        batch_size=args.batch_size,
        num_workers=args.workers,
        device=args.device,
        progress=True,
    )
    out = bank.save(args.out)
    print(
        f"channel bank: {out} ({bank.meta.n_channels} channels × {bank.meta.embed_dim} dims, "
        f"{bank.meta.n_probe} probe images, bank_id {bank.bank_id})"
    )
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from textcam.bank import ChannelBank
    from textcam.clip import load_clip
    from textcam.data import ImageReadError, read_image
    from textcam.explain import Explainer
    from textcam.overlay import overlay
    from textcam.vocab import load_vocabulary

    images = [Path(p) for p in args.images]
    for p in images:
        if not p.exists():
            raise CliError(f"file not found: {p}")
    model = _load_model(args)
    clip = load_clip(args.clip, args.clip_pretrained, device=args.device)
    bank = ChannelBank.load(args.bank, model_id=model.model_id, layer=args.layer, clip_id=clip.clip_id)
    extra = [f"phrase:{p}" for p in (list(model.class_names) if args.class_names else []) + args.phrase]
    phrases = load_vocabulary(args.vocab + extra)
    explainer = Explainer(
        model,
        bank,
        phrases,
        clip.encode_texts(phrases),
        method=args.method,
        top_k=args.top_k,
        n_phrases=args.n_phrases,
        n_groups=args.n_groups,
        device=args.device,
    )
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for path in tqdm(images, desc="explain", unit="img", disable=len(images) < 2):
        try:
            img = read_image(path)
        except ImageReadError as exc:
            raise CliError(str(exc)) from None
        exps = explainer.explain_batch(model.preprocess(img)[None])
        for e in exps:
            print(f"{path.name}: {e.target_name} (p={e.prob:.3f}, rank {e.rank_of_target})")
            for ph in e.phrases:
                print(f"    {ph.direction:>7}  {ph.score:6.3f}  {ph.text}")
            stem = f"{path.stem}.class{e.target_class}"
            overlay(img, e.saliency).save(out_dir / f"{stem}.png")
            for gi, g in enumerate(e.groups):
                overlay(img, g.map).save(out_dir / f"{stem}.group{gi}.png")
                print(f"    group {gi}: {g.text!r} share {g.share:.2f} ({g.n_channels} channels)")
            rec = e.to_record() | {"path": str(path)}
            rec.pop("saliency")
            for g in rec["groups"]:
                g.pop("map")
            records.append(rec)
    from textcam.io import write_text

    write_text(out_dir / "explanations.json", json.dumps(records, indent=2))
    print(f"overlays and explanations.json written to {out_dir}")
    return 0


def add_command(
    subparsers: argparse._SubParsersAction, name: str, doc: str, epilog: str | None = None
) -> argparse.ArgumentParser:
    """A ``textcam`` subcommand described by ``doc``: its first line is the one-line help in the command
    list, the paragraph after a blank line (else the first line again) the ``--help`` description."""
    summary, _, description = doc.partition("\n\n")
    return subparsers.add_parser(
        name,
        help=summary,
        description=description or summary,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="textcam",
        description="TextCAM: explain in words what a vision classifier relies on, and audit datasets.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug information")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("models", help="list registered model names")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("layers", help="list candidate target layers of a model with output shapes")
    p.add_argument("model", help="registered model name or local checkpoint")
    p.add_argument("--weights", default="none", help="weights to load (default: none; shapes only)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("calibrate", help="build a channel bank from a probe set (once per model + layer)")
    _add_model_args(p)
    _add_clip_args(p)
    p.add_argument("--probe", required=True, help="image folder or CSV/Parquet manifest with a 'path' column")
    p.add_argument("-m", type=int, default=50, help="positives and negatives per channel (default 50)")
    p.add_argument("--shrinkage", type=float, default=0.5, help="LDA shrinkage in (0, 1] (default 0.5)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="image decoding processes (default 2)")
    p.add_argument("--out", required=True, help="output bank file (.safetensors)")
    p.set_defaults(func=cmd_calibrate)

    _add_explain_parser(sub)
    for ep in entry_points(group="textcam.commands"):
        try:
            register = ep.load()
        except ImportError as exc:  # an optional layer (e.g. the audit extra) is not installed
            logging.getLogger(__name__).debug("subcommand %s unavailable: %s", ep.name, exc)
            continue
        register(sub)
    return parser


def _add_explain_parser(sub: Any) -> None:
    from textcam.cams import METHODS

    p = sub.add_parser("explain", help="explain images in words; writes overlays per image and group")
    p.add_argument("images", nargs="+", help="image files")
    _add_model_args(p)
    _add_clip_args(p)
    p.add_argument("--bank", required=True, help="channel bank from `textcam calibrate`")
    p.add_argument(
        "--vocab",
        nargs="+",
        default=["general"],
        help="built-in vocabulary names or phrase files (default: general)",
    )
    p.add_argument("--phrase", action="append", default=[], help="extra phrase (repeatable)")
    p.add_argument("--class-names", action="store_true", help="add the model's class names as phrases")
    p.add_argument(
        "--method", default="gradcam", choices=sorted(METHODS), help="CAM weights (default gradcam)"
    )
    p.add_argument("--top-k", type=int, default=1, help="explain the top-k predicted classes (default 1)")
    p.add_argument("--n-phrases", type=int, default=5)
    p.add_argument("--n-groups", type=int, default=3)
    p.add_argument("--out", default="textcam-out", help="output folder for overlays (default textcam-out)")
    p.set_defaults(func=cmd_explain)


_OWN_LOGGERS = ("textcam", "tasks", "flows", "reports")


def _terminal_filter(record: logging.LogRecord) -> bool:
    """Our own progress at INFO; libraries (Great Expectations' registry notes, httpx's request lines)
    only when they warn. Everything still reaches the run's log file (``RUN_DIR/logs/audit.log``)."""
    return record.levelno >= logging.WARNING or record.name.split(".")[0] in _OWN_LOGGERS


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")
    if not verbose:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_terminal_filter)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        print(f"textcam: error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, KeyError) as exc:
        # Library errors carry a one-line message meant for users (missing file, unknown layer,
        # bank/model mismatch); show it without a traceback unless --verbose.
        if args.verbose:
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"textcam: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
