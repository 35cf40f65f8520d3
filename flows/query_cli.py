"""``textcam sql`` and ``textcam compare``: query a run's DuckDB, compare two runs' flags.

Registered through the ``textcam.commands`` entry point group (see pyproject.toml).
"""

from __future__ import annotations

import argparse
import json
import sys

import duckdb

from textcam.cli import add_command

SQL_DOC = """\
run a read-only SQL query on an audit run

Answer one read-only SQL statement (SELECT, WITH, DESCRIBE, SHOW) on a run's DuckDB.
"""

COMPARE_DOC = """\
compare the flags of two audit runs

List the flags (class, phrase, direction) that appeared, vanished or changed from RUN_A (the baseline)
to RUN_B. Exit status 1 when any did (like diff), 0 otherwise.
"""

SQL_EPILOG = """\
examples:
  textcam sql runs/r1 "SELECT class_name, phrase, frequency FROM concept_stats ORDER BY 3 DESC LIMIT 9"
  textcam sql runs/r1 "SELECT * FROM flags" --format csv > flags.csv
  textcam sql runs/r1 "SHOW TABLES"

tables and views: explanations, errors, images, predictions (one row per image), image_phrases
(one row per image x selected phrase), concept_stats, flags, flag_candidates (each class's strongest
candidates and the rule that decided), interventions (textcam intervene).
Only one read-only statement is accepted; files outside the run directory cannot be read.
"""


def add_query_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add ``sql`` and ``compare`` to the ``textcam`` command line."""
    p = add_command(subparsers, "sql", SQL_DOC, SQL_EPILOG)
    p.add_argument("run_dir", metavar="RUN_DIR", help="the audit run directory")
    p.add_argument("sql", metavar="SQL", help="one read-only statement")
    p.add_argument(
        "--format",
        dest="fmt",
        choices=("table", "csv", "json"),
        default="table",
        help="output format (default table)",
    )
    p.set_defaults(func=cmd_sql)

    p = add_command(subparsers, "compare", COMPARE_DOC)
    p.add_argument("run_a", metavar="RUN_A", help="baseline run directory")
    p.add_argument("run_b", metavar="RUN_B", help="run directory to compare")
    p.add_argument(
        "--z-tolerance",
        type=float,
        default=0.5,
        help="|change of z_lift| that counts as changed (default 0.5)",
    )
    p.add_argument("--all", action="store_true", help="also list unchanged flags")
    p.add_argument("--format", dest="fmt", choices=("table", "csv", "json"), default="table")
    p.set_defaults(func=cmd_compare)


def cmd_sql(args: argparse.Namespace) -> int:
    """Print the query's answer; a refused or failing query is reported on stderr with exit status 2."""
    from tasks.store import UnsafeQueryError, run_sql

    try:
        result = run_sql(args.run_dir, args.sql, args.fmt)
    except UnsafeQueryError as exc:
        print(f"textcam sql: refused: {exc}", file=sys.stderr)
        return 2
    except duckdb.Error as exc:  # syntax errors, unknown tables, blocked file access: the user's to fix
        print(f"textcam sql: {exc}", file=sys.stderr)
        return 2
    print(result.text)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Print the flag changes between two runs (exit 0; 1 when anything changed, like diff)."""
    from tasks.compare import compare_runs

    frame = compare_runs(args.run_a, args.run_b, z_tolerance=args.z_tolerance)
    counts = frame["status"].value_counts().to_dict()
    shown = frame if args.all else frame[frame["status"] != "same"]
    if args.fmt == "csv":
        print(shown.to_csv(index=False), end="")
    elif args.fmt == "json":
        print(json.dumps(json.loads(shown.to_json(orient="records")), indent=2))
    else:
        print(", ".join(f"{counts.get(s, 0)} {s}" for s in ("appeared", "vanished", "changed", "same")))
        if len(shown):
            print(shown.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    return 1 if any(counts.get(s, 0) for s in ("appeared", "vanished", "changed")) else 0
