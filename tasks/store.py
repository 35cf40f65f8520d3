"""One DuckDB file per run: views over the run's Parquet files and the per-class concept statistics.

Layout read here (the contract with the flow)::

    RUN_DIR/images.parquet            IMAGES schema (+ metadata columns)
    RUN_DIR/explanations/*.parquet    EXPLANATIONS schema, validated shards only
    RUN_DIR/errors/*.parquet          ERRORS schema
    RUN_DIR/flags.parquet             FLAGS schema (written by tasks.flags)
    RUN_DIR/run.duckdb                built here

The views store paths *relative to the run directory* so a run directory can be moved or copied; connections
opened through :func:`connect` point DuckDB's file search path (or temporary views) at the run directory.

Statistics (table ``concept_stats``, one row per class c × phrase p × direction d, all computed in SQL):

* the class of an image is its predicted class (the explanation row with ``rank_of_target = 0``);
* ``s(x, p, d)`` = |score| of phrase p with direction d in the explanation of x's predicted class, 0 when p
  was not selected;
* ``lift = (mean_{x in c} s - mean_{x not in c} s) / sd_all(s)`` — a difference of means in standard units
  of the phrase's score over all images (population sd);
* ``z_lift = (lift - median_p' lift) / max(1.4826 · MAD_p' lift, se_c)``: the lifts standardised *within
  class c and direction d across phrases* p' (at least 3 phrases with a lift, else NULL), where
  ``se_c = sqrt(N/(N-1) · (1/n_c + 1/(N - n_c)))`` is the exact permutation standard error of a lift with no
  association. Raw lifts carry a per-class offset (some classes simply have larger explanation scores): the
  median removes it. The median/MAD yardstick is not inflated by the class's own phrases ("whiskers" for
  cat), which always have the largest lifts and would shrink every other z under a mean/sd yardstick; the
  se floor keeps a small vocabulary's noisy MAD from blowing z up. Evidence *for* and *against* are kept
  apart;
* ``relative_score = mean_{x in c} s(x, p, d) / max_p' mean_{x in c} s(x, p', d)``: the phrase's evidence
  relative to the class's main phrase (1 = the main phrase). A large z_lift alone also picks out the small
  filler phrases that the sparse coding adds to every explanation of a class; this tells those from a cue.

Per-image phrases (table ``phrase_specificity``, view ``shown_phrases``): a shown phrase is kept where,
over the class's explanations that weigh it at least half their first phrase, CLIP sees it in all of
them, or seeing it goes with a larger weight, or CLIP sees it there more often than in a random probe
image (``phrase_base_rate``); :func:`textcam.visibility.specific_among_strong` is the same rule in numpy.
The view then keeps what the model uses: phrases flagged "for" the class (``flags``), and the class's
own name. A phrase true of the image that the model does not act on ("blue" for a blue square under a
model that reads shapes) is not an explanation of the prediction. A flagged phrase is shown wherever CLIP
sees it in the image (``seen``) and the explanation selects it, whatever its weight, or has it among the
phrases nearest T_c⁺(x) (``nearest``): the model test has already shown that the class's predictions follow
it, which the weight and specificity tests stand in for elsewhere.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.rundir import RunDir
from textcam.io import temp_path, write_parquet
from textcam.schema import (
    CONCEPT_STATS,
    ERRORS,
    EXPLANATIONS,
    FLAG_CANDIDATES,
    FLAGS,
    IMAGES,
    INTERVENTIONS,
    PHRASE_BASE_RATE,
    PHRASE_SPECIFICITY,
    SPECIFIC_Z,
)

# Arrow -> DuckDB for the types our schemas use; float16 has no DuckDB type and Parquet reads it as FLOAT.
_SCALARS: dict[pa.DataType, str] = {
    pa.string(): "VARCHAR",
    pa.large_string(): "VARCHAR",
    pa.bool_(): "BOOLEAN",
    pa.int8(): "TINYINT",
    pa.int16(): "SMALLINT",
    pa.int32(): "INTEGER",
    pa.int64(): "BIGINT",
    pa.float16(): "FLOAT",
    pa.float32(): "FLOAT",
    pa.float64(): "DOUBLE",
}


class UnsafeQueryError(ValueError):
    """A statement given to :func:`run_sql` is not a plain read-only query."""


def duckdb_type(t: pa.DataType) -> str:
    """The DuckDB SQL type for an Arrow type of the declared schemas (lists, structs, scalars)."""
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"{duckdb_type(t.value_type)}[]"
    if pa.types.is_struct(t):
        inner = ", ".join(f"{_ident(f.name)} {duckdb_type(f.type)}" for f in t)
        return f"STRUCT({inner})"
    if t in _SCALARS:
        return _SCALARS[t]
    raise TypeError(f"no DuckDB type declared for Arrow type {t}")


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def create_table_sql(name: str, schema: pa.Schema) -> str:
    """``CREATE OR REPLACE TABLE`` from an Arrow schema; non-nullable fields become NOT NULL."""
    cols = ", ".join(
        f"{_ident(f.name)} {duckdb_type(f.type)}{'' if f.nullable else ' NOT NULL'}" for f in schema
    )
    return f"CREATE OR REPLACE TABLE {_ident(name)} ({cols})"


def _source_sql(
    name: str, files: list[Path], schema: pa.Schema, run_dir: Path, absolute: bool, extra: bool
) -> str:
    """A SELECT over the Parquet files of a table, columns in declared order (plus extras when asked); a
    column that no file has yet (written before it was declared) reads as null."""
    paths = [str(p if absolute else p.relative_to(run_dir)) for p in files]
    listing = "[" + ", ".join(_literal(p) for p in paths) + "]"
    present = _columns_present(files, set(schema.names))
    source = {f.name: _ident(f.name) if f.name in present else "NULL" for f in schema}
    declared = ", ".join(
        f"CAST({source[f.name]} AS {duckdb_type(f.type)}) AS {_ident(f.name)}" for f in schema
    )
    if extra:
        names = ", ".join(_ident(f.name) for f in schema)
        declared += f", * EXCLUDE ({names})"
    return f"SELECT {declared} FROM read_parquet({listing}, union_by_name = true)"


def _columns_present(files: list[Path], wanted: set[str]) -> set[str]:
    """The ``wanted`` columns some file holds; reads footers only until every one is found (the first file,
    unless the run has files from before a column was declared)."""
    present: set[str] = set()
    for path in files:
        present |= wanted & set(pq.read_schema(path).names)
        if present == wanted:
            break
    return present


def _table_files(run_dir: Path) -> dict[str, tuple[list[Path], pa.Schema, bool]]:
    """Parquet files behind each view, their declared schema, and whether extra columns are kept."""
    run = RunDir(run_dir)
    tables: dict[str, tuple[list[Path], pa.Schema, bool]] = {
        "explanations": (run.shard_files("explanations"), EXPLANATIONS, False),
        "errors": (run.shard_files("errors"), ERRORS, False),
        "images": ([run.images] if run.images.is_file() else [], IMAGES, True),
    }
    return tables


def _create_views(
    con: duckdb.DuckDBPyConnection, run_dir: Path, *, temporary: bool, materialize: bool = False
) -> None:
    """Views over the Parquet files; an absent table becomes an empty view typed by its declared schema.
    ``materialize``: ``image_phrases`` as a table (the build)."""
    kind = "TEMPORARY VIEW" if temporary else "VIEW"
    for name, (files, schema, extra) in _table_files(run_dir).items():
        if files:
            body = _source_sql(name, files, schema, run_dir, absolute=temporary, extra=extra)
        else:
            cols = ", ".join(f"CAST(NULL AS {duckdb_type(f.type)}) AS {_ident(f.name)}" for f in schema)
            body = f"SELECT {cols} WHERE false"
        con.execute(f"CREATE OR REPLACE {kind} {_ident(name)} AS {body}")

    # One row per image: its predicted-class explanation; duplicates (a shard written twice) count once.
    con.execute(
        f"""
        CREATE OR REPLACE {kind} predictions AS
        SELECT image_id, path, label, pred_name AS class_name, pred AS class_index, prob,
               label IS NOT NULL AS labelled,
               coalesce(label <> pred_name, false) AS misclassified,
               phrases, nearest, groups, saliency, map_h, map_w
        FROM explanations
        WHERE rank_of_target = 0
        QUALIFY row_number() OVER (PARTITION BY image_id ORDER BY run_id, path) = 1
        """
    )
    # s(x, p, d) for the selected phrases; a phrase selected twice in one explanation is summed. The
    # build stores it as a table: every aggregate reads it, and as a view each read would deduplicate
    # and unnest every explanation again (at a million images, half a GB of DuckDB memory per query).
    if temporary and _has_table(con, "image_phrases"):
        return
    con.execute(
        f"""
        CREATE OR REPLACE {"TABLE" if materialize else kind} image_phrases AS
        SELECT p.image_id, p.class_name, p.class_index, p.labelled, p.misclassified,
               u.ph.text AS phrase, u.ph.direction AS direction, sum(abs(u.ph.score))::DOUBLE AS score,
               bool_or(u.ph.shown) AS shown, bool_or(u.ph.seen) AS seen
        FROM predictions AS p, unnest(p.phrases) AS u(ph)
        GROUP BY ALL
        """
    )


_SPECIFICITY_SQL = f"""
WITH strong AS (  -- "for" phrases weighing at least half the explanation's first (largest) phrase
    SELECT class_name, phrase, score, shown
    FROM (SELECT *, max(score) OVER (PARTITION BY image_id) AS first
          FROM image_phrases WHERE direction = 'for' AND shown IS NOT NULL)
    WHERE score >= 0.5 * first
),
agg AS (
    SELECT class_name, phrase, count(*) AS n_strong, count(*) FILTER (WHERE shown) AS n_seen,
           corr(shown::DOUBLE, score) AS r_any
    FROM strong GROUP BY class_name, phrase
),
defined AS (  -- no correlation where seeing it or its weight is constant (DuckDB gives NaN there)
    SELECT agg.class_name, agg.phrase, n_strong, n_seen, CASE WHEN isfinite(r_any) THEN r_any END AS r,
           b.rate AS base_rate
    FROM agg LEFT JOIN phrase_base_rate AS b USING (phrase)
)
SELECT class_name, phrase, n_strong, n_seen, r, base_rate,
       n_seen = n_strong
       OR coalesce(r, 0) * sqrt(n_strong) > {SPECIFIC_Z}
       OR coalesce((n_seen - n_strong * base_rate)
                   / sqrt(n_strong * greatest(base_rate, 1e-6) * greatest(1 - base_rate, 1e-6)), 0)
          > {SPECIFIC_Z} AS specific
FROM defined
"""

# Shown phrases: the class's own name where CLIP sees it, it weighs at least half the first phrase and it is
# about the images (phrase_specificity); any other phrase only where the model's predictions of the class
# depend on it (a "for" flag) and CLIP sees it in the image, whether the sparse code selected it
# (``selected``) or it is among the phrases nearest T_c⁺(x) (``nearest``; score 0). Files without ``seen``:
# the first rule's tests.
_SHOWN_PHRASES_SQL = """
CREATE OR REPLACE VIEW shown_phrases AS
WITH flagged AS (SELECT DISTINCT class_name, phrase FROM flags WHERE direction = 'for'),
selected AS (
    SELECT i.image_id, i.class_name, i.phrase, i.score, true AS selected
    FROM image_phrases AS i LEFT JOIN phrase_specificity AS s USING (class_name, phrase)
    WHERE i.direction = 'for'
      AND ((lower(i.phrase) = lower(i.class_name) AND i.shown AND s.specific)
           OR (coalesce(i.seen, i.shown AND s.specific)
               AND (i.class_name, i.phrase) IN (SELECT (class_name, phrase) FROM flagged)))
),
near AS (
    SELECT DISTINCT p.image_id, p.class_name, u.nb.text AS phrase, 0.0::DOUBLE AS score, false AS selected
    FROM predictions AS p, unnest(p.nearest) AS u(nb)
    WHERE u.nb.seen AND (p.class_name, u.nb.text) IN (SELECT (class_name, phrase) FROM flagged)
)
SELECT * FROM selected
UNION ALL
SELECT * FROM near
WHERE (image_id, class_name, phrase) NOT IN (
    SELECT (image_id, class_name, phrase) FROM image_phrases WHERE direction = 'for')
"""


def _store_base_rates(con: duckdb.DuckDBPyConnection, run_dir: Path) -> None:
    """``phrase_base_rate``: how often CLIP sees each phrase in a probe image (the "present" share of its
    visibility model, ``bank/visibility.safetensors``); empty without one."""
    run = RunDir(run_dir)
    phrases: list[str] = []
    rates: list[float] = []
    if run.visibility_file.is_file() and run.phrases_file.is_file():
        from safetensors.numpy import load_file

        from textcam.io import read_phrase_list

        phrases = read_phrase_list(run.phrases_file)  # the header only: no torch in the analytics
        rates = load_file(str(run.visibility_file))["weights"][-1].astype(float).tolist()
        if len(rates) != len(phrases):
            raise ValueError(f"{run.visibility_file} and {run.phrases_file} disagree on the phrases")
    con.execute(create_table_sql("phrase_base_rate", PHRASE_BASE_RATE))
    con.register("_rates", pa.table({"phrase": phrases, "rate": rates}, schema=PHRASE_BASE_RATE))
    try:
        con.execute("INSERT INTO phrase_base_rate SELECT phrase, max(rate) FROM _rates GROUP BY phrase")
    finally:
        con.unregister("_rates")


def _has_table(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    query = (
        "SELECT count(*) FROM information_schema.tables WHERE table_name = ? AND table_type = 'BASE TABLE'"
    )
    return con.execute(query, [name]).fetchall()[0][0] > 0


_CONCEPT_STATS_SQL = """
WITH
cls AS (
    SELECT class_name, min(class_index) AS class_index, count(*) AS n_class,
           count(*) FILTER (WHERE misclassified) AS n_misclassified,
           count(*) FILTER (WHERE labelled AND NOT misclassified) AS n_correct
    FROM predictions GROUP BY class_name
),
tot AS (SELECT count(*) AS n_total FROM predictions),
phr AS (  -- per phrase × direction over all images
    SELECT phrase, direction, count(*) AS n_any, sum(score) AS s1, sum(score * score) AS s2
    FROM image_phrases GROUP BY phrase, direction
),
cp AS (   -- per class × phrase × direction over the images that selected it
    SELECT class_name, phrase, direction, count(*) AS n_images, sum(score) AS s1c,
           count(*) FILTER (WHERE misclassified) AS k_mis,
           count(*) FILTER (WHERE labelled AND NOT misclassified) AS k_cor
    FROM image_phrases GROUP BY class_name, phrase, direction
),
grid AS (
    SELECT cls.*, phr.*, tot.n_total,
           coalesce(cp.n_images, 0) AS n_images, coalesce(cp.s1c, 0.0) AS s1c,
           coalesce(cp.k_mis, 0) AS k_mis, coalesce(cp.k_cor, 0) AS k_cor
    FROM cls CROSS JOIN phr CROSS JOIN tot
    LEFT JOIN cp ON cp.class_name = cls.class_name AND cp.phrase = phr.phrase AND cp.direction = phr.direction
),
eff AS (
    SELECT *,
           s1c / n_class AS mean_c,
           (s1 - s1c) / nullif(n_total - n_class, 0) AS mean_o,
           sqrt(greatest(s2 / n_total - (s1 / n_total) ^ 2, 0.0)) AS sd_all
    FROM grid
),
lifted AS (
    SELECT *, CASE WHEN sd_all > 1e-12 THEN (mean_c - mean_o) / sd_all END AS lift FROM eff
),
robust AS (  -- location and spread of the lifts within class × direction
    SELECT class_name, direction, count(lift) AS m, median(lift) AS med, 1.4826 * mad(lift) AS spread
    FROM lifted GROUP BY class_name, direction
),
z AS (
    SELECT lifted.*, robust.m, robust.med,
           -- floor: the permutation standard error of a lift, sqrt(N/(N-1) (1/n_c + 1/(N-n_c)))
           greatest(robust.spread,
                    sqrt(n_total / nullif(n_total - 1, 0) * (1 / n_class + 1 / nullif(n_total - n_class, 0))))
               AS scale
    FROM lifted JOIN robust USING (class_name, direction)
)
SELECT class_name, class_index::INTEGER AS class_index, phrase, direction,
       n_class, n_images,
       n_images / n_class AS frequency,
       (n_any - n_images) / nullif(n_total - n_class, 0) AS frequency_other,
       mean_c AS mean_score,
       s1c / nullif(n_images, 0) AS mean_score_selected,
       mean_o AS mean_score_other,
       mean_c / nullif(max(mean_c) OVER (PARTITION BY class_name, direction), 0) AS relative_score,
       lift,
       CASE WHEN m >= 3 AND scale > 1e-12 THEN (lift - med) / scale END AS z_lift,
       n_misclassified, n_correct,
       k_mis / nullif(n_misclassified, 0) AS frequency_misclassified,
       k_cor / nullif(n_correct, 0) AS frequency_correct
FROM z
ORDER BY class_name, direction, z_lift DESC NULLS LAST, phrase
"""


def _open(path: Path, *, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """Every connection to a run database: without DuckDB's progress bar, which would draw on the
    user's terminal from inside the flags and report steps."""
    con = duckdb.connect(str(path), read_only=read_only)
    con.execute("SET enable_progress_bar = false")
    return con


def limit_memory(con: duckdb.DuckDBPyConnection) -> None:
    """Bound DuckDB's memory (``TEXTCAM_DUCKDB_MEMORY``, default 2GB), spilling to the system's temporary
    directory: a million-image run must not take the machine's memory (DuckDB's default is 80 % of it)."""
    limit = os.environ.get("TEXTCAM_DUCKDB_MEMORY", "2GB")
    con.execute(f"SET memory_limit = {_literal(limit)}")
    spill = Path(tempfile.gettempdir()) / f"textcam-duckdb-{os.getpid()}"
    con.execute(f"SET temp_directory = {_literal(str(spill))}")
    con.execute("SET preserve_insertion_order = false")


def store_table(con: duckdb.DuckDBPyConnection, run_dir: Path, name: str, table: pa.Table) -> None:
    """Write an analytics table twice, from one declared schema: ``RUN_DIR/<name>.parquet`` (temp name,
    then rename) and the DuckDB table ``name`` (replaced), so a rebuild of the database reloads it."""
    write_parquet(RunDir(run_dir).table(name), table)
    con.execute(create_table_sql(name, table.schema))
    con.register("_rows", table)
    try:
        con.execute(f"INSERT INTO {_ident(name)} BY NAME SELECT * FROM _rows")
    finally:
        con.unregister("_rows")


def build_duckdb(run_dir: str | Path) -> Path:
    """Build ``RUN_DIR/run.duckdb``: views ``explanations``, ``errors``, ``images``, ``predictions``,
    ``image_phrases``, ``shown_phrases`` and tables ``concept_stats`` (see module docstring),
    ``phrase_specificity`` and ``flags``.

    Rebuilt from scratch each call (tmp file + rename), so a re-run after new shards arrive is consistent.
    ``flags`` is loaded from ``flags.parquet`` when it exists, otherwise created empty; :func:`tasks.flags.
    flag_spurious` fills it afterwards.

    >>> build_duckdb("runs/2024-01-01")  # doctest: +SKIP
    PosixPath('runs/2024-01-01/run.duckdb')
    """

    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    target = RunDir(run_dir).database
    tmp = temp_path(target)
    tmp.unlink(missing_ok=True)
    con = _open(tmp)
    try:
        con.execute(f"SET file_search_path = {_literal(str(run_dir))}")
        limit_memory(con)
        # One thread: parallel aggregation sums floats in a varying order, and the same explanations
        # must give bit-identical statistics and flags (measured: z_lift differing in the last ulp).
        threads = con.execute("SELECT current_setting('threads')").fetchone()[0]
        con.execute("SET threads = 1")
        _create_views(con, run_dir, temporary=False, materialize=True)
        con.execute(create_table_sql("concept_stats", CONCEPT_STATS))
        con.execute(f"INSERT INTO concept_stats BY NAME {_CONCEPT_STATS_SQL}")
        _store_base_rates(con, run_dir)
        con.execute(create_table_sql("phrase_specificity", PHRASE_SPECIFICITY))
        con.execute(f"INSERT INTO phrase_specificity BY NAME {_SPECIFICITY_SQL}")
        con.execute(f"SET threads = {int(threads)}")
        for name, schema in (
            ("flags", FLAGS),
            ("flag_candidates", FLAG_CANDIDATES),
            ("interventions", INTERVENTIONS),
        ):
            con.execute(create_table_sql(name, schema))
            if RunDir(run_dir).table(name).is_file():
                con.execute(f"INSERT INTO {name} BY NAME SELECT * FROM read_parquet('{name}.parquet')")
        con.execute(_SHOWN_PHRASES_SQL)
        con.execute("CHECKPOINT")
    finally:
        con.close()
    tmp.replace(target)
    return target


def open_writable(run_dir: str | Path) -> duckdb.DuckDBPyConnection:
    """The run's database for a step that adds tables (flags, interventions): built first if absent,
    relative paths resolved in the run directory, memory capped."""
    run_dir = Path(run_dir).resolve()
    if not RunDir(run_dir).database.is_file():
        build_duckdb(run_dir)
    con = _open(RunDir(run_dir).database)
    try:
        con.execute(f"SET file_search_path = {_literal(str(run_dir))}")
        limit_memory(con)
    except Exception:
        con.close()
        raise
    return con


def connect(
    run_dir: str | Path, *, read_only: bool = True, sandbox: bool = True
) -> duckdb.DuckDBPyConnection:
    """Open a run's DuckDB file with views pointing at this run directory.

    ``sandbox=True`` (requires ``read_only``) then forbids DuckDB file access outside the run directory and
    locks the configuration, so queries cannot read ``/etc/passwd`` or re-enable access.
    """
    run_dir = Path(run_dir).resolve()
    db = RunDir(run_dir).database
    if not db.is_file():
        raise FileNotFoundError(f"{db} not found; build it first (tasks.store.build_duckdb)")
    if sandbox and not read_only:
        raise ValueError("sandbox=True needs read_only=True")
    con = _open(db, read_only=read_only)
    try:
        con.execute(f"SET file_search_path = {_literal(str(run_dir))}")
        if sandbox:
            # Temporary views with absolute paths shadow the stored relative ones: the allow-list is checked
            # before the search path is applied.
            _create_views(con, run_dir, temporary=True)
            con.execute(f"SET allowed_directories = [{_literal(str(run_dir) + '/')}]")
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")
    except Exception:
        con.close()
        raise
    return con


# PRAGMAs that only describe the catalog.
_READ_PRAGMAS = {
    "table_info",
    "show_tables",
    "show_tables_expanded",
    "database_size",
    "show",
    "version",
    "storage_info",
    "functions",
    "database_list",
}
_READ_TYPES = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}


def check_read_only_sql(sql: str) -> str:
    """Return the single statement in ``sql`` if it only reads, else raise :class:`UnsafeQueryError`.

    Accepted: SELECT / WITH / FROM-first / DESCRIBE / SHOW / SUMMARIZE / EXPLAIN, and catalog PRAGMAs such as
    ``PRAGMA table_info('flags')``. Everything else (INSERT, CREATE, ATTACH, COPY, EXPORT, INSTALL, LOAD, SET,
    CALL, several statements at once) is refused. File-reading table functions are stopped by the sandbox
    of :func:`connect`, not here.
    """
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise UnsafeQueryError(f"could not parse the query: {exc}") from exc
    if len(statements) != 1:
        raise UnsafeQueryError(f"expected exactly one statement, got {len(statements)}")
    st = statements[0]
    if st.type in _READ_TYPES:
        return st.query
    if st.type == duckdb.StatementType.PRAGMA:
        m = re.match(r"\s*pragma\s+([a-z_]+)", st.query, flags=re.IGNORECASE)
        if m and m.group(1).lower() in _READ_PRAGMAS and "=" not in st.query:
            return st.query
    kind = str(st.type).rsplit(".", 1)[-1]
    raise UnsafeQueryError(f"only read-only queries are allowed (SELECT, WITH, DESCRIBE, SHOW); got {kind}")


def query(run_dir: str | Path, sql: str) -> pd.DataFrame:
    """Run one read-only statement against a run in the sandbox of :func:`connect`, as a DataFrame."""
    statement = check_read_only_sql(sql)
    con = connect(run_dir)
    try:
        return con.sql(statement).df()
    finally:
        con.close()


@dataclass(frozen=True)
class QueryResult:
    """A query's answer, formatted."""

    frame: pd.DataFrame
    text: str


def run_sql(run_dir: str | Path, sql: str, fmt: Literal["table", "csv", "json"] = "table") -> QueryResult:
    """Answer ``sql`` (one read-only statement) on a run, formatted as a text table, CSV or JSON records.

    >>> res = run_sql(run, "SELECT class_name, phrase FROM concept_stats LIMIT 2")  # doctest: +SKIP
    """
    if fmt not in ("table", "csv", "json"):
        raise ValueError(f"unknown format {fmt!r}; use table, csv or json")
    frame = query(run_dir, sql)
    if fmt == "csv":
        text = frame.to_csv(index=False)
    elif fmt == "json":
        text = json.dumps(json.loads(frame.to_json(orient="records", date_format="iso")), indent=2)
    else:
        text = frame.to_string(index=False, max_colwidth=80) if len(frame.columns) else "(no columns)"
    return QueryResult(frame=frame, text=text)
