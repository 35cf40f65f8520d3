"""Compare the flags of two runs: which appeared, vanished, or changed.

A flag is identified by (class_name, phrase, direction). ``changed`` means present in both runs with
|Δ z_lift| ≥ ``z_tolerance`` or a different rank within its class; ``same`` otherwise.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa

from tasks.rundir import RunDir
from textcam.schema import COMPARISON, FLAGS

_STATUS_ORDER = "CASE status WHEN 'appeared' THEN 0 WHEN 'vanished' THEN 1 WHEN 'changed' THEN 2 ELSE 3 END"


def _flags_table(run_dir: str | Path) -> pa.Table:
    path = RunDir(run_dir).table("flags")
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the audit (or tasks.flags.flag_spurious) first")
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    missing = [
        n
        for n in ("class_name", "phrase", "direction", "z_lift", "rank", "p_value", "frequency")
        if n not in table.column_names
    ]
    if missing:
        raise ValueError(f"{path} lacks columns {missing}; expected the FLAGS schema ({FLAGS.names})")
    return table


def compare_runs(run_a: str | Path, run_b: str | Path, *, z_tolerance: float = 0.5) -> pd.DataFrame:
    """Flags of ``run_b`` against ``run_a`` (the baseline), in the :data:`COMPARISON` columns.

    Ordered appeared, vanished, changed, same; then by class and |Δ z_lift|.

    >>> compare_runs("runs/monday", "runs/tuesday").query("status != 'same'")  # doctest: +SKIP
    """
    if z_tolerance < 0:
        raise ValueError("z_tolerance must be >= 0")
    con = duckdb.connect()
    con.execute("SET enable_progress_bar = false")
    try:
        con.register("a", _flags_table(run_a))
        con.register("b", _flags_table(run_b))
        frame = con.execute(
            f"""
            WITH j AS (
                SELECT coalesce(a.class_name, b.class_name) AS class_name,
                       coalesce(a.phrase, b.phrase) AS phrase,
                       coalesce(a.direction, b.direction) AS direction,
                       a.z_lift AS z_lift_a, b.z_lift AS z_lift_b, b.z_lift - a.z_lift AS delta_z,
                       a.rank::INTEGER AS rank_a, b.rank::INTEGER AS rank_b,
                       a.p_value AS p_value_a, b.p_value AS p_value_b,
                       a.frequency AS frequency_a, b.frequency AS frequency_b,
                       CASE WHEN a.phrase IS NULL THEN 'appeared'
                            WHEN b.phrase IS NULL THEN 'vanished'
                            WHEN abs(b.z_lift - a.z_lift) >= ? OR a.rank <> b.rank THEN 'changed'
                            ELSE 'same' END AS status
                FROM a FULL OUTER JOIN b USING (class_name, phrase, direction)
            )
            SELECT * FROM j
            ORDER BY {_STATUS_ORDER}, class_name, abs(delta_z) DESC NULLS LAST, phrase, direction
            """,
            [z_tolerance],
        ).df()
    finally:
        con.close()
    table = pa.Table.from_pandas(frame[COMPARISON.names], schema=COMPARISON, preserve_index=False)
    return table.to_pandas()
