"""Data-quality gates for shards, built from the declared Arrow schemas (Great Expectations).

Two layers, both derived from :mod:`textcam.schema`:

1. **schema** (Arrow): every declared column present with its declared type, nested fields included (GX's
   pandas type check cannot express ``list<struct<...>>``), and no undeclared columns;
2. **values** (a GX suite per schema): non-nullable columns have no nulls; scalar columns have their pandas
   dtype; and for EXPLANATIONS ``prob`` in [0, 1], ranks and class indices ≥ 0, ``map_h * map_w ==
   len(saliency)`` (and each group map), 1 ≤ phrases per row ≤ ``max_phrases``, phrase and saliency values
   finite, directions in {"for", "against"}, group shares in [0, 1]. Per-row checks on nested values are
   computed vectorised with pyarrow into helper columns (``_n_phrases`` ...) that the suite tests.

The GX context and suites are built once per process (GX import and setup cost seconds; a validation a few
tens of milliseconds).

>>> result = validate_shard("runs/r1/explanations/shard-00000.parquet")  # doctest: +SKIP
>>> result.ok, result.failures[:1]  # doctest: +SKIP
(False, ['prob: expect_column_values_to_be_between failed (1 of 120 rows), e.g. [1.5]'])
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.rundir import RunDir
from textcam.io import write_text
from textcam.schema import ERRORS, EXPLANATIONS

DIRECTIONS = ("for", "against")
DEFAULT_MAX_PHRASES = 64
_SCHEMAS = {"explanations": EXPLANATIONS, "errors": ERRORS}

# Arrow scalar type -> the pandas dtype name it converts to (what GX's type check observes).
_PANDAS_DTYPE = {
    pa.int32(): "int32",
    pa.int64(): "int64",
    pa.float32(): "float32",
    pa.float64(): "float64",
    pa.bool_(): "bool",
}


@dataclass(frozen=True)
class ValidationResult:
    """Outcome of validating one shard: ``ok``, one line per failure, and the full GX report (JSON-able)."""

    ok: bool
    failures: list[str]
    report: dict[str, Any] = field(repr=False)

    def to_json(self) -> str:
        """The result as JSON (what :func:`write_quality_report` writes)."""
        return json.dumps(
            {"ok": self.ok, "failures": self.failures, "report": self.report}, indent=2, default=str
        )


@functools.cache
def _context() -> Any:
    """One ephemeral GX context per process, analytics and progress bars off."""
    import great_expectations as gx  # slow import: only when validating
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
        store_backend_defaults=InMemoryStoreBackendDefaults(),
    )
    return gx.get_context(mode="ephemeral", project_config=config)


@functools.cache
def _validation(table: str, max_phrases: int) -> Any:
    """The GX validation definition for a declared table, built from its Arrow schema (cached)."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    schema = _SCHEMAS[table]
    ctx = _context()
    name = f"{table}-{max_phrases}"
    source = ctx.data_sources.add_pandas(f"shards-{name}")
    batch = source.add_dataframe_asset(f"shard-{name}").add_batch_definition_whole_dataframe("whole")
    suite = gx.ExpectationSuite(name=name)
    for f in schema:
        if not f.nullable:
            suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column=f.name))
        if f.type in _PANDAS_DTYPE:
            suite.add_expectation(
                gxe.ExpectColumnValuesToBeOfType(column=f.name, type_=_PANDAS_DTYPE[f.type])
            )
    if table == "errors":
        suite.add_expectation(gxe.ExpectColumnValueLengthsToBeBetween(column="reason", min_value=1))
    if table == "explanations":
        for col in ("pred", "target_class", "rank_of_target"):
            suite.add_expectation(gxe.ExpectColumnValuesToBeBetween(column=col, min_value=0))
        suite.add_expectation(gxe.ExpectColumnValuesToBeBetween(column="prob", min_value=0.0, max_value=1.0))
        suite.add_expectation(gxe.ExpectColumnValuesToBeBetween(column="map_h", min_value=1))
        suite.add_expectation(gxe.ExpectColumnValuesToBeBetween(column="map_w", min_value=1))
        suite.add_expectation(
            gxe.ExpectColumnValuesToBeBetween(column="_n_phrases", min_value=1, max_value=max_phrases)
        )
        suite.add_expectation(
            gxe.ExpectColumnPairValuesToBeEqual(column_A="_n_saliency", column_B="_map_cells")
        )
        for col in ("_phrase_scores_finite", "_phrase_directions_ok", "_saliency_finite", "_groups_ok"):
            suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column=col, value_set=[True]))
    suite = ctx.suites.add(suite)
    return ctx.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))


def _row_all(values: pa.Array, parents: np.ndarray, ok: np.ndarray, n_rows: int) -> np.ndarray:
    """Per row: every flattened element is ok (rows without elements: True)."""
    bad = np.zeros(n_rows, dtype=bool)
    bad[parents[~ok]] = True
    return ~bad


def _flat(col: pa.ChunkedArray) -> tuple[pa.Array, np.ndarray]:
    arr = col.combine_chunks()
    return pc.list_flatten(arr), pc.list_parent_indices(arr).to_numpy(zero_copy_only=False)


def _finite(values: pa.Array) -> np.ndarray:
    return np.isfinite(values.to_numpy(zero_copy_only=False).astype(np.float64))


def _derived(table: pa.Table) -> dict[str, np.ndarray]:
    """Per-row checks on nested EXPLANATIONS values, vectorised; only for columns with the declared type."""
    n = table.num_rows
    have = {
        f.name
        for f in table.schema
        if f.name in EXPLANATIONS.names and f.type == EXPLANATIONS.field(f.name).type
    }
    out: dict[str, np.ndarray] = {}
    if {"map_h", "map_w"} <= have:
        out["_map_cells"] = table["map_h"].to_numpy().astype(np.int64) * table["map_w"].to_numpy().astype(
            np.int64
        )
    if "phrases" in have:
        out["_n_phrases"] = pc.list_value_length(table["phrases"]).to_numpy(zero_copy_only=False)
        flat, parents = _flat(table["phrases"])
        out["_phrase_scores_finite"] = _row_all(flat, parents, _finite(pc.struct_field(flat, "score")), n)
        directions = pc.is_in(pc.struct_field(flat, "direction"), value_set=pa.array(DIRECTIONS))
        out["_phrase_directions_ok"] = _row_all(flat, parents, directions.to_numpy(zero_copy_only=False), n)
    if "saliency" in have:
        out["_n_saliency"] = pc.list_value_length(table["saliency"]).to_numpy(zero_copy_only=False)
        flat, parents = _flat(table["saliency"])
        out["_saliency_finite"] = _row_all(flat, parents, _finite(flat), n)
    if "groups" in have and "_map_cells" in out:
        flat, parents = _flat(table["groups"])
        share = pc.struct_field(flat, "share").to_numpy(zero_copy_only=False).astype(np.float64)
        map_len = pc.list_value_length(pc.struct_field(flat, "map")).to_numpy(zero_copy_only=False)
        ok = (share >= 0) & (share <= 1) & (map_len == out["_map_cells"][parents])
        out["_groups_ok"] = _row_all(flat, parents, ok, n)
    return out


def _schema_failures(actual: pa.Schema, declared: pa.Schema) -> list[str]:
    """Arrow-level: missing, mistyped and undeclared columns (nested types compared in full)."""
    failures = []
    for f in declared:
        if f.name not in actual.names:
            failures.append(f"{f.name}: missing column (declared {f.type})")
        elif not actual.field(f.name).type.equals(f.type):
            failures.append(f"{f.name}: type {actual.field(f.name).type}, declared {f.type}")
    failures += [
        f"{name}: column not declared in the schema" for name in actual.names if name not in declared.names
    ]
    return failures


def _describe(r: Any) -> str:
    cfg = r.expectation_config
    kw = cfg.kwargs
    where = kw.get("column") or "/".join(str(kw[k]) for k in ("column_A", "column_B") if k in kw) or "table"
    if r.exception_info and r.exception_info.get("raised_exception"):
        msg = str(r.exception_info.get("exception_message") or "").splitlines()[:1]
        return f"{where}: {cfg.type} could not run ({msg[0] if msg else 'error'})"
    res = r.result or {}
    detail = ""
    if "unexpected_count" in res:
        detail = f" ({res['unexpected_count']} of {res.get('element_count', '?')} rows)"
        sample = res.get("partial_unexpected_list") or []
        if sample:
            detail += f", e.g. {sample[:3]}"
    elif "observed_value" in res:
        detail = f" (observed {res['observed_value']})"
    return f"{where}: {cfg.type} failed{detail}"


def validate_table(
    path: str | Path, table: str = "explanations", *, max_phrases: int = DEFAULT_MAX_PHRASES
) -> ValidationResult:
    """Validate one Parquet file against the declared schema ``table`` ("explanations" or "errors")."""
    if table not in _SCHEMAS:
        raise ValueError(f"unknown table {table!r}; one of {sorted(_SCHEMAS)}")
    path = Path(path)
    declared = _SCHEMAS[table]
    try:
        arrow = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:  # unreadable shard: a failure to report, not a crash
        failure = f"file: cannot read Parquet ({exc})"
        return ValidationResult(ok=False, failures=[failure], report={"path": str(path), "error": str(exc)})
    schema_failures = _schema_failures(arrow.schema, declared)
    frame = arrow.to_pandas()
    if table == "explanations":
        frame = frame.assign(**_derived(arrow))
    # BASIC: the counts and sample rows a failure line names; SUMMARY's extra tallies cost a third more.
    result = _validation(table, max_phrases).run(batch_parameters={"dataframe": frame}, result_format="BASIC")
    failures = schema_failures + [_describe(r) for r in result.results if not r.success]
    report = {
        "path": str(path),
        "table": table,
        "rows": arrow.num_rows,
        "schema_failures": schema_failures,
        "gx": _jsonable(result.to_json_dict()),
    }
    return ValidationResult(ok=not failures, failures=failures, report=report)


def prepare_validation(table: str = "explanations", *, max_phrases: int = DEFAULT_MAX_PHRASES) -> None:
    """Import Great Expectations and build the suite for ``table`` now (seconds) rather than at the first
    validation; not beside model passes on a busy CPU, where the import stalls them (docs/decisions.md)."""
    if table not in _SCHEMAS:
        raise ValueError(f"unknown table {table!r}; one of {sorted(_SCHEMAS)}")
    _validation(table, max_phrases)


def validate_shard(path: str | Path, *, max_phrases: int = DEFAULT_MAX_PHRASES) -> ValidationResult:
    """Validate an explanations shard (see module docstring); never raises for bad data, only reports it."""
    return validate_table(path, "explanations", max_phrases=max_phrases)


def validate_errors(path: str | Path) -> ValidationResult:
    """Validate an errors Parquet file against ERRORS."""
    return validate_table(path, "errors")


def write_quality_report(run_dir: str | Path, shard_path: str | Path, result: ValidationResult) -> Path:
    """Write ``RUN_DIR/quality/<shard>.json`` (read by the report's data-quality section); return its path.

    Quarantined shards keep their report next to them in ``RUN_DIR/quarantine/`` (the flow's job); writing it
    here as well keeps one place listing every shard's outcome.
    """
    out = RunDir(run_dir).folder("quality") / (Path(shard_path).stem + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, result.to_json())
    return out


def _jsonable(obj: Any) -> Any:
    """GX reports may hold NaN/inf and numpy scalars: make them strict JSON."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, str | int | float | bool) or obj is None:
        return obj
    if isinstance(obj, pd.Timestamp):
        return obj.isoformat()
    return str(obj)
