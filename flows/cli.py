"""``textcam audit`` and ``textcam schedule``: registered through the ``textcam.commands`` entry points."""

from __future__ import annotations

import argparse
import json
from typing import Any

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


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML or TOML audit config; the flags below override it")
    p.add_argument(
        "--data",
        metavar="DIR|MANIFEST",
        help="image folder (one subfolder per class) or CSV/Parquet manifest with a `path` column",
    )
    p.add_argument("--model", help="registered model name or .safetensors checkpoint (default resnet18)")
    p.add_argument("--weights", help="'default' (pretrained), 'none' (random) or a local state dict")
    p.add_argument("--layer", help="target layer (default: the model's)")
    p.add_argument("--clip", help="open_clip architecture or local-dir:PATH (default ViT-B-32)")
    p.add_argument("--clip-pretrained", metavar="TAG|FILE", help="open_clip tag or local checkpoint file")
    p.add_argument(
        "--vocab",
        nargs="+",
        metavar="SOURCE",
        help="built-in vocabulary names, phrase files or 'phrase:TEXT' (default: general)",
    )
    p.add_argument("--method", help="CAM method for the channel weights (default gradcam)")
    p.add_argument("--top-k", type=int, help="explain the top-k predicted classes (default 1)")
    p.add_argument("--shard-size", type=int, metavar="N", help="images per shard (default 256)")
    p.add_argument("--batch-size", type=int, metavar="N", help="images per model pass (default 32)")
    p.add_argument("--runner", choices=("default", "dask"), help="task runner (default: threads here)")
    p.add_argument("--workers", type=int, metavar="N", help="Dask worker processes / concurrent shards")
    p.add_argument("--scheduler", metavar="ADDRESS", help="existing Dask scheduler (implies --runner dask)")
    p.add_argument(
        "--run-dir",
        metavar="DIR",
        help="output folder; {run_id} and {date} are filled in (default runs/{run_id})",
    )
    p.add_argument("--cache-dir", metavar="DIR", help="channel-bank cache (default $TEXTCAM_CACHE)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default auto")


_OVERRIDES = (
    "data",
    "model",
    "weights",
    "layer",
    "clip",
    "clip_pretrained",
    "vocab",
    "method",
    "top_k",
    "shard_size",
    "batch_size",
    "runner",
    "workers",
    "scheduler",
    "run_dir",
    "cache_dir",
    "device",
)


def config_from_args(args: argparse.Namespace) -> Any:
    from tasks.config import load_config

    overrides = {k: getattr(args, k, None) for k in _OVERRIDES}
    return load_config(args.config, overrides)


def cmd_audit(args: argparse.Namespace) -> int:
    from flows.audit import run_audit

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
    p = subparsers.add_parser(
        "audit",
        help="explain a whole dataset and flag spurious correlations (Prefect flow)",
        description="Run the audit flow: manifest → channel bank → shards explained in parallel → "
        "validated Parquet → DuckDB → flags → HTML report.",
        epilog=AUDIT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_args(p)
    p.set_defaults(func=cmd_audit)

    p = subparsers.add_parser(
        "schedule",
        help="run the audit on a cron schedule (Prefect deployment)",
        description="Create a Prefect deployment of the audit flow with a cron schedule. Without --pool "
        "this process serves it (and blocks); with --pool the deployment is registered on "
        "the Prefect server (PREFECT_API_URL) for `prefect worker start --pool POOL`.",
        epilog=SCHEDULE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--cron", required=True, help='cron expression, e.g. "0 3 * * *" (daily at 03:00)')
    p.add_argument("--timezone", help="IANA timezone of the cron expression (default UTC)")
    p.add_argument("--name", default="nightly", help="deployment name (default nightly)")
    p.add_argument("--pool", help="work pool to deploy to (a process pool is created if missing)")
    _add_config_args(p)
    p.set_defaults(func=cmd_schedule)
