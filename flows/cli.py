"""``textcam audit`` and ``textcam schedule``: registered through the ``textcam.commands`` entry points."""

from __future__ import annotations

import argparse
import json
from typing import Any

from textcam.cli import add_command

AUDIT_DOC = """\
explain a whole dataset and flag spurious correlations (Prefect flow)

Run the audit flow: manifest → channel bank → shards explained in parallel → validated Parquet →
DuckDB → flags → HTML report.
"""

SCHEDULE_DOC = """\
run the audit on a cron schedule (Prefect deployment)

Create a Prefect deployment of the audit flow with a cron schedule. Without --pool this process
serves it (and blocks); with --pool the deployment is registered on the Prefect server
(PREFECT_API_URL) for `prefect worker start --pool POOL`.
"""

AUDIT_EPILOG = """examples:
  textcam audit --data images/ --model resnet50 --clip ViT-B-32 --clip-pretrained clip.safetensors
  textcam audit --config audit.yaml --runner dask --workers 4
  textcam audit --config audit.yaml --scheduler tcp://10.0.0.5:8786 --run-dir /data/runs/{date}

The config file (YAML or TOML) holds any AuditConfig key (see tasks/config.py); flags on the
command line override it. Re-running the same audit resumes: finished shards are reused.
Results: RUN_DIR/report.html, summary.json, explanations/*.parquet, run.duckdb.
"""

SCHEDULE_EPILOG = """examples:
  textcam schedule --cron "0 3 * * *" --config audit.yaml                 # serve: runs here, blocks
  textcam schedule --cron "0 3 * * *" --config audit.yaml --pool textcam  # deploy for workers:
  prefect worker start --pool textcam
"""


#: One help line per AuditConfig field: the audit's flags are generated from the fields (a field without a
#: line here fails tests/test_audit_cli.py), so every setting has a flag.
HELP = {
    "data": "image folder (one subfolder per class) or CSV/Parquet manifest with a `path` column",
    "model": "registered model name or .safetensors checkpoint (default resnet18)",
    "weights": "'default' (pretrained), 'none' (random) or a local state dict",
    "layer": "target layer (default: the model's)",
    "clip": "open_clip architecture or local-dir:PATH (default ViT-B-32)",
    "clip_pretrained": "open_clip tag or local checkpoint file",
    "vocab": "built-in vocabulary names, phrase files or 'phrase:TEXT' (default: general)",
    "explanation.method": "CAM method for the channel weights (default gradcam)",
    "explanation.top_k": "explain the top-k predicted classes (default 1)",
    "explanation.n_phrases": "phrases per explanation (default 5)",
    "explanation.n_groups": "channel groups (concepts) per explanation (default 3)",
    "explanation.check_phrases": "mark the phrases CLIP sees in each image (a CLIP pass each; default on)",
    "classes": "label check: 'model' (the classifier's class names) or a list of names (default off)",
    "calibration.probe": "probe images for the channel bank, folder or manifest (default: the audit data)",
    "calibration.probe_size": "probe images used for calibration (default 500)",
    "calibration.bank_m": "top and bottom probe images per channel, M (default 50; needs 2*M probe images)",
    "calibration.shrinkage": "LDA shrinkage in (0, 1] (default 0.5)",
    "shard_size": "images per shard (default 256)",
    "batch_size": "images per model pass (default 32)",
    "loader_workers": "image-decoding processes per shard (default 2)",
    "runner": "task runner: default (threads here) or dask",
    "workers": "Dask worker processes / concurrent shards (default 2)",
    "scheduler": "existing Dask scheduler address (implies --runner dask)",
    "torch_threads": "torch threads per process (default: torch's)",
    "run_dir": "output folder; {run_id} and {date} are filled in (default runs/{run_id})",
    "cache_dir": "channel-bank and world cache (default $TEXTCAM_CACHE)",
    "device": "auto, cpu or cuda (default auto)",
    "fail_on_quarantine": "exit with an error when any shard is quarantined",
    "intervene": "after flagging, suppress each flag's channels, save the edited models (textcam intervene)",
    "intervene_refit": "with --intervene, a new last layer instead, each flag erased and balanced (--refit)",
    # the ``flags`` section (tasks.config.FlagRule), as --flag-<name>; the other sections' fields keep
    # their own names (--bank-m, --method)
    "flags.n_permutations": "label permutations of the explanations' and model test's nulls (default 200)",
    "flags.null_images": "images the explanations' null uses at most, a stratified sample (default 100000)",
    "flags.quantile": "null quantile a z_lift must pass without probe behaviour (default 0.99)",
    "flags.min_images": "explanations that must name a phrase for its row to count (default 3)",
    "flags.min_relative_score": "score relative to the class's main phrase, without behaviour (default 0.5)",
    "flags.n_examples": "example images kept per flag (default 6)",
    "flags.seed": "seed of the permutations (default 0)",
    "flags.alpha": "family-wise error of the model test (default 0.01)",
    "flags.min_effect": "smallest risk difference a flagged cue must make to predictions (default 0.3)",
    "flags.min_effect_in_training": "min_effect with --flag-probe-seen-in-training: in-sample effects "
    "shrink (default 0.2)",
    "flags.min_class_agreement": "phi between phrase and class name for the phrase to name it (default 0.5)",
    "flags.proxy_agreement": "|phi| with a flag's presence that makes a phrase its proxy, not flagged (0.5)",
    "flags.probe_seen_in_training": "the probe (the audited data unless --probe) is the model's training "
    "data: what the explanations name needs no min effect",
    "flags.training_data": "the model's training images (folder or manifest with labels): a flag also "
    "needs its phrase to go with its class there",
    "flags.training_size": "training images read for that check at most (default 2000)",
    "flags.min_correlation": "smallest difference in how often CLIP sees a flagged phrase in its class's "
    "training images and in the others' (default 0.1)",
}
CHOICES = {"runner": ("default", "dask"), "device": ("auto", "cpu", "cuda")}
METAVARS = {
    "clip_pretrained": "TAG|FILE",
    "scheduler": "ADDRESS",
    "data": "DIR|MANIFEST",
    "calibration.probe": "DIR|MANIFEST",
    "flags.training_data": "DIR|MANIFEST",
    "explanation.method": "NAME",
    "run_dir": "DIR",
    "cache_dir": "DIR",
}


def config_fields() -> dict[str, Any]:
    """Every setting with a command-line flag: AuditConfig's fields, and its sections' as
    ``<section>.<name>``; each with its type annotation."""
    from tasks.config import SECTIONS, AuditConfig

    fields = {name: f.annotation for name, f in AuditConfig.model_fields.items() if name not in SECTIONS}
    for section, model in SECTIONS.items():
        fields.update({f"{section}.{name}": f.annotation for name, f in model.model_fields.items()})
    return fields


def _option(name: str) -> str:
    """``flags.<name>`` is ``--flag-<name>``; the other sections' names are unique on their own."""
    section, _, field = name.rpartition(".")
    return "--" + ("flag-" if section == "flags" else "") + field.replace("_", "-")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    """``--config`` and one flag per setting, typed from the field's annotation."""
    import typing

    p.add_argument("--config", metavar="FILE", help="YAML or TOML audit config; the flags below override it")
    groups: dict[str, Any] = {}
    for name, hint in config_fields().items():
        section = name.rpartition(".")[0]
        if section and section not in groups:
            groups[section] = p.add_argument_group(f"{section} (config section `{section}:`)")
        target = groups.get(section, p)
        kwargs: dict[str, Any] = {"help": HELP[name], "dest": name}
        args = typing.get_args(hint)
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif hint is int or (int in args and str not in args):
            kwargs.update(type=int, metavar="N")
        elif hint is float:
            kwargs.update(type=float, metavar="X")
        elif any(typing.get_origin(a) is tuple for a in (hint, *args)):
            kwargs.update(nargs="+", metavar="VALUE")
        if name in CHOICES:
            kwargs["choices"] = CHOICES[name]
        elif name in METAVARS:
            kwargs["metavar"] = METAVARS[name]
        target.add_argument(_option(name), **kwargs)
    p.set_defaults(**dict.fromkeys(config_fields()))


def config_from_args(args: argparse.Namespace) -> Any:
    from tasks.config import load_config

    overrides: dict[str, Any] = {}
    for name in config_fields():
        section, _, field = name.rpartition(".")
        holder = overrides.setdefault(section, {}) if section else overrides
        holder[field] = getattr(args, name, None)
    if overrides.get("classes") == ["model"]:  # --classes model: the classifier's own names
        overrides["classes"] = "model"
    return load_config(args.config, overrides)


def quiet_task_runs() -> None:
    """Task-level lines (a "Finished in state Completed()" per shard task) stay in Prefect's API and UI;
    the terminal keeps the flow's stage lines, the progress bar and the summary."""
    import logging

    logging.getLogger("prefect.task_runs").setLevel(logging.WARNING)


def cmd_audit(args: argparse.Namespace) -> int:
    from flows.audit import run_audit

    if not getattr(args, "verbose", False):
        quiet_task_runs()
    cfg = config_from_args(args)
    summary = run_audit(cfg)
    print(summary["line"])
    print(f"report: {summary['report']}")
    return 0 if summary["reconciled"] else 1


def cmd_schedule(args: argparse.Namespace) -> int:
    from flows import deploy

    cfg = config_from_args(args)
    if args.pool:
        deployment_id = deploy.deploy_to_pool(
            cfg, name=args.name, cron=args.cron, pool=args.pool, timezone=args.timezone
        )
        print(
            json.dumps(
                {
                    "deployment": f"audit/{args.name}",
                    "id": deployment_id,
                    "cron": args.cron,
                    "pool": args.pool,
                }
            )
        )
        print(f"start a worker to run it: prefect worker start --pool {args.pool}")
    else:
        deploy.serve(cfg, name=args.name, cron=args.cron, timezone=args.timezone)
    return 0


def add_audit_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add ``audit`` and ``schedule`` to the ``textcam`` command line."""
    p = add_command(subparsers, "audit", AUDIT_DOC, AUDIT_EPILOG)
    _add_config_args(p)
    p.set_defaults(func=cmd_audit)

    p = add_command(subparsers, "schedule", SCHEDULE_DOC, SCHEDULE_EPILOG)
    p.add_argument("--cron", required=True, help='cron expression, e.g. "0 3 * * *" (daily at 03:00)')
    p.add_argument("--timezone", help="IANA timezone of the cron expression (default UTC)")
    p.add_argument("--name", default="nightly", help="deployment name (default nightly)")
    p.add_argument("--pool", help="work pool to deploy to (a process pool is created if missing)")
    _add_config_args(p)
    p.set_defaults(func=cmd_schedule)
