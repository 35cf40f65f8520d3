"""The offline audit demo (``make demo``): find a planted shortcut in a classifier, in words.

    ground-truth world (planted bias) ─┐
                                       ├─ audit flow ─→ report.html + flags: the bias, ranked first
    same world, no bias (control) ─────┘                  control: nothing above threshold

Everything runs here without a network: the synthetic world generates its images, trains its own
tiny CLIP and the classifiers to audit (cached by config hash, so a second run takes seconds
to reach the audit), then the ``audit`` flow explains every test image and flags phrases that are
over-represented in one class's explanations. The demo checks its own outcome and exits non-zero
when the planted bias is not the biased class's first flag or the control raises a flag (``make demo``
then fails).

Run ``python -m flows.demo --help`` for options.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

from tasks.config import AuditConfig
from tasks.rundir import RunDir
from textcam.io import atomic_path
from textcam.synthetic import BiasSpec, World, WorldConfig, build_world
from textcam.synthetic.cache import write_json
from textcam.synthetic.config import DEMO_BIAS

#: Per-class concept frequencies: the query the README shows for ``textcam sql``.
CONCEPT_QUERY = (
    "SELECT class_name, phrase, round(frequency, 3) AS frequency, round(z_lift, 2) AS z_lift "
    "FROM concept_stats WHERE direction = 'for' ORDER BY class_name, frequency DESC"
)


def audit_manifest(world: World, split: str) -> Path:
    """The split's manifest as an audit manifest: ``label`` holds the class name, the generator's
    own id and label code are kept as metadata (``image_id`` is computed by the audit).

    It is written next to the split's own manifest, so the split folder is the dataset root and
    the report may embed its images.
    """
    import pandas as pd

    source = world.splits[split].manifest
    out = source.with_name("audit-manifest.parquet")
    if not out.is_file():
        frame = pd.read_parquet(source)
        frame = frame.rename(columns={"image_id": "scene_id", "label": "label_index", "label_name": "label"})
        with atomic_path(out) as tmp:
            frame.to_parquet(tmp, index=False)
    return out


def audit_config(world: World, run_dir: Path, cache_dir: Path | None, workers: int) -> AuditConfig:
    """Audit the world's (unbiased) test split with its classifier, tiny CLIP and CLEVR vocabulary; the
    flags are checked against the classifier's training split (``flags.training_data``)."""
    return AuditConfig(
        data=str(audit_manifest(world, "test")),
        model=str(world.classifier_checkpoint),
        layer=world.target_layer,
        clip=world.clip_open_clip_id,
        vocab=("clevr",),
        calibration={
            "probe": str(audit_manifest(world, "probe")),
            "probe_size": world.config.n_probe,
            "bank_m": 50,
        },
        flags={"training_data": str(audit_manifest(world, "train"))},
        shard_size=250,
        batch_size=64,
        workers=workers,
        run_dir=str(run_dir),
        cache_dir=str(cache_dir) if cache_dir else None,
        device="auto",
    )


def demo_world(preset: str, biases: list[str], clip_seed: int = 0) -> WorldConfig:
    """The demo's world: a preset with ``biases`` and a tiny CLIP trained with ``clip_seed``."""
    config = getattr(WorldConfig, preset)(bias=biases)
    return dataclasses.replace(config, clip=dataclasses.replace(config.clip, seed=clip_seed))


def set_aside_stale_run(cfg: AuditConfig) -> Path | None:
    """Move a demo run directory made with another configuration (an older world, a new CLIP) aside.

    The audit flow refuses to mix configurations in one run directory; the demo owns its directories,
    so instead of failing it renames the old one to ``<dir>.old-<n>`` (nothing is deleted) and says so.
    """
    from tasks.config import load_config

    run_dir = Path(cfg.run_dir)
    saved = RunDir(run_dir).config
    if not saved.is_file() or load_config(saved).fingerprint() == cfg.fingerprint():
        return None
    n = 1
    while run_dir.with_name(f"{run_dir.name}.old-{n}").exists():
        n += 1
    target = run_dir.with_name(f"{run_dir.name}.old-{n}")
    run_dir.rename(target)
    print(f"   {run_dir} held a run with another configuration: moved to {target}")
    return target


def first_flags(flags_path: Path) -> dict[str, dict[str, Any]]:
    """The top-ranked flag of each class (flags.parquet is ranked per class by the flagging step)."""
    import pandas as pd

    flags = pd.read_parquet(flags_path)
    if flags.empty:
        return {}
    ranked = flags.sort_values(["class_name", "rank"]) if "rank" in flags else flags
    return {str(c): g.iloc[0].to_dict() for c, g in ranked.groupby("class_name", sort=True)}


def describe_run(title: str, summary: dict[str, Any]) -> list[dict[str, Any]]:
    import pandas as pd

    run_dir = Path(summary["run_dir"])
    flags = pd.read_parquet(RunDir(run_dir).table("flags"))
    print(f"\n== {title}")
    print(f"   {summary['line']}")
    if flags.empty:
        print("   flags: none above threshold")
    else:
        cols = [c for c in ("class_name", "phrase", "direction", "z_model", "effect", "step") if c in flags]
        print("   flags (top 8):")
        print("   " + flags[cols].head(8).to_string(index=False).replace("\n", "\n   "))
    return flags.to_dict(orient="records")


def check(biased: dict[str, Any], control: dict[str, Any] | None, bias: BiasSpec, world: World) -> bool:
    """The demo's claims, checked: the planted cue is the biased class's first flag; the control has none.

    Also prints the class's strongest candidates from ``flag_candidates`` (flagged or not) with the rule
    that decided each, so a miss shows where the cue fell short.
    """
    from tasks.store import query

    phrase = world.phrases[bias.attribute][bias.value]
    tops = first_flags(RunDir(biased["run_dir"]).table("flags"))
    top = tops.get(bias.label, {}).get("phrase")
    ok_bias = top == phrase
    print(
        f"\n[{'PASS' if ok_bias else 'FAIL'}] planted bias {bias}: first flag for class {bias.label!r} "
        f"is {top!r} (expected {phrase!r})"
    )
    ranking = query(
        biased["run_dir"],
        "SELECT phrase, direction, reason, round(frequency, 3) AS frequency, "
        "round(frequency_other, 3) AS elsewhere, round(z_model, 1) AS z_model, "
        "round(model_threshold, 1) AS null_99, round(effect, 2) AS effect, "
        "round(data_correlation, 2) AS in_training FROM flag_candidates "
        f"WHERE class_name = '{bias.label}' AND direction = 'for' "
        "ORDER BY flagged DESC, z_first DESC LIMIT 5",
    )
    print(f"   strongest candidates of class {bias.label!r} and what decided them:")
    print("   " + ranking.to_string(index=False).replace("\n", "\n   "))
    ok = ok_bias
    if control is not None:
        n = control["counts"]["flags"]
        print(f"[{'PASS' if n == 0 else 'FAIL'}] control (no planted bias): {n} flag(s) above threshold")
        ok = ok and n == 0
    return ok


def print_world(world: World, title: str) -> None:
    clip = world.metrics["clip"]["zero_shot"]
    clf = world.metrics["classifier"]
    print(f"\n== {title}: {world.root}")
    print("   tiny CLIP zero-shot accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in clip.items()))
    print(f"   classifier clean accuracy {clf['test_accuracy']:.3f}")
    for spec, gap in clf.get("bias", {}).items():
        print(
            f"   bias {spec}: accuracy aligned {gap['acc_aligned']:.3f} vs "
            f"conflicting {gap['acc_conflicting']:.3f} (gap {gap['gap']:+.3f})"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flows.demo",
        description=__doc__.split("\n\n")[0] + " Builds the synthetic world, audits a biased and a "
        "control classifier, prints where the reports are and the top flags.",
    )
    parser.add_argument(
        "--bias",
        default=DEMO_BIAS,
        metavar="SPEC",
        help=f"planted correlation CLASS=ATTRIBUTE:VALUE@STRENGTH (default {DEMO_BIAS})",
    )
    parser.add_argument(
        "--preset",
        choices=("demo", "tiny"),
        default="demo",
        help="world size: demo (the README's) or tiny (a quick smoke run, looser guarantees)",
    )
    parser.add_argument("--no-control", action="store_true", help="skip the control (unbiased) audit")
    parser.add_argument(
        "--out", default="runs/demo", help="where the two run directories go (default runs/demo)"
    )
    parser.add_argument("--cache-dir", type=Path, help="world and bank cache (default ~/.cache/textcam)")
    parser.add_argument("--workers", type=int, default=1, help="concurrent shard tasks (default 1)")
    parser.add_argument(
        "--clip-seed",
        type=int,
        default=0,
        help="training seed of the world's tiny CLIP (default 0; the checks must pass for any seed)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    t0 = time.perf_counter()
    bias = BiasSpec.parse(args.bias)
    world_cache = args.cache_dir / "world" if args.cache_dir else None
    out = Path(args.out).resolve()
    worlds = {"biased": build_world(demo_world(args.preset, [args.bias], args.clip_seed), world_cache)}
    print_world(worlds["biased"], f"world with planted bias {bias}")
    if not args.no_control:
        worlds["control"] = build_world(demo_world(args.preset, [], args.clip_seed), world_cache)
        print_world(worlds["control"], "control world (no planted bias)")

    from flows.audit import audit
    from flows.cli import quiet_task_runs

    quiet_task_runs()
    configs = {name: audit_config(w, out / name, args.cache_dir, args.workers) for name, w in worlds.items()}
    for cfg in configs.values():
        set_aside_stale_run(cfg)
    summaries = {name: audit(cfg) for name, cfg in configs.items()}
    describe_run("audit of the biased classifier", summaries["biased"])
    if "control" in summaries:
        describe_run("audit of the control classifier", summaries["control"])
    ok = check(summaries["biased"], summaries.get("control"), bias, worlds["biased"])

    print("\nreports:")
    for name, s in summaries.items():
        print(f"   {name:8s} {s['report']}")
    print("\nSQL over the explanations, e.g. per-class concept frequencies:")
    print(f'   .venv/bin/textcam sql {summaries["biased"]["run_dir"]} "{CONCEPT_QUERY}"')
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s")
    write_json(out / "demo.json", {"ok": ok, "runs": {k: v["run_dir"] for k, v in summaries.items()}})
    if not ok:
        print("\nSOME CHECKS FAILED (see [FAIL] above); the audits themselves completed.")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
