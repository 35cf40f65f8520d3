"""Great Expectations gates built from the Arrow schemas: a clean shard passes, corrupted ones are caught."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from auditdata import make_run

from tasks.quality import prepare_validation, validate_errors, validate_shard, write_quality_report
from textcam.schema import EXPLANATIONS


@pytest.fixture(scope="module")
def shard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = make_run(tmp_path_factory.mktemp("quality"), n_per_class=6, n_shards=1, write_images=False)
    return run_dir / "explanations" / "shard-00000.parquet"


def _rewrite(shard: Path, out: Path, edit: Callable[[pa.Table], pa.Table]) -> Path:
    pq.write_table(edit(pq.read_table(shard)), out)
    return out


def _replace(table: pa.Table, name: str, values: list, type_: pa.DataType | None = None) -> pa.Table:
    field = table.schema.field(name)
    field = field if type_ is None else pa.field(name, type_, nullable=field.nullable)
    return table.set_column(table.schema.get_field_index(name), field, pa.array(values, field.type))


def test_a_clean_shard_passes(shard: Path) -> None:
    result = validate_shard(shard)
    assert result.ok, result.failures
    assert result.failures == []
    assert result.report["rows"] == 36
    json.dumps(result.report)  # strict JSON


def test_prob_out_of_range_is_caught(shard: Path, tmp_path: Path) -> None:
    def edit(t: pa.Table) -> pa.Table:
        prob = t["prob"].to_pylist()
        prob[4] = 1.5
        return _replace(t, "prob", prob)

    result = validate_shard(_rewrite(shard, tmp_path / "s.parquet", edit))
    assert not result.ok
    assert result.failures == ["prob: expect_column_values_to_be_between failed (1 of 36 rows), e.g. [1.5]"]


def test_wrong_type_is_caught(shard: Path, tmp_path: Path) -> None:
    result = validate_shard(
        _rewrite(
            shard,
            tmp_path / "s.parquet",
            lambda t: _replace(t, "pred", pc.cast(t["pred"], pa.string()).to_pylist(), pa.string()),
        )
    )
    assert not result.ok
    assert "pred: type string, declared int32" in result.failures
    assert any(f.startswith("pred: expect_column_values_to_be_of_type failed") for f in result.failures)


def test_missing_column_is_caught(shard: Path, tmp_path: Path) -> None:
    result = validate_shard(_rewrite(shard, tmp_path / "s.parquet", lambda t: t.drop_columns(["map_w"])))
    assert not result.ok
    assert result.failures[0] == "map_w: missing column (declared int32)"
    assert any(f.startswith("_n_saliency/_map_cells") for f in result.failures)


def test_nested_type_change_is_caught(shard: Path, tmp_path: Path) -> None:
    # saliency as float32 instead of float16: only the Arrow-level check can see it
    result = validate_shard(
        _rewrite(
            shard,
            tmp_path / "s.parquet",
            lambda t: _replace(
                t,
                "saliency",
                [list(map(float, v)) for v in t["saliency"].to_pylist()],
                pa.list_(pa.float32()),
            ),
        )
    )
    assert result.failures[0].startswith("saliency: type list<")
    assert result.failures[0].endswith("float>, declared list<item: halffloat>")


# One corruption per row (rows 1..6), each caught by its own expectation: one validation run for all.
CORRUPTIONS = [
    ("saliency", lambda v: v[:-1], "_n_saliency/_map_cells"),
    ("phrases", lambda v: [], "_n_phrases"),
    ("phrases", lambda v: [{**p, "score": float("nan")} for p in v], "_phrase_scores_finite"),
    ("phrases", lambda v: [{**p, "direction": "sideways"} for p in v], "_phrase_directions_ok"),
    ("groups", lambda v: [{**g, "share": 2.0} for g in v], "_groups_ok"),
    ("rank_of_target", lambda v: -1, "rank_of_target"),
]


def test_row_level_corruptions_are_caught(shard: Path, tmp_path: Path) -> None:
    def edit(t: pa.Table) -> pa.Table:
        for row, (column, mutate, _) in enumerate(CORRUPTIONS, start=1):
            values = t[column].to_pylist()
            values[row] = mutate(values[row])
            field = EXPLANATIONS.field(column)
            t = t.set_column(t.schema.get_field_index(column), field, pa.array(values, field.type))
        return t

    result = validate_shard(_rewrite(shard, tmp_path / "s.parquet", edit))
    assert not result.ok
    assert sorted(f.split(":")[0] for f in result.failures) == sorted(e for _, _, e in CORRUPTIONS)
    assert all("(1 of 36 rows)" in f for f in result.failures), result.failures


def test_too_many_phrases_per_row(shard: Path) -> None:
    result = validate_shard(shard, max_phrases=2)
    assert [f.split(":")[0] for f in result.failures] == ["_n_phrases"]


def test_unreadable_file_is_a_failure_not_a_crash(tmp_path: Path) -> None:
    bad = tmp_path / "shard-00000.parquet"
    bad.write_bytes(b"not parquet")
    result = validate_shard(bad)
    assert not result.ok and result.failures[0].startswith("file: cannot read Parquet")


def test_errors_table_and_quality_report(shard: Path, tmp_path: Path) -> None:
    run_dir = shard.parent.parent
    assert validate_errors(run_dir / "errors" / "errors-00000.parquet").ok
    out = write_quality_report(tmp_path, shard, validate_shard(shard))
    assert out == tmp_path / "quality" / "shard-00000.json"
    data = json.loads(out.read_text())
    assert data["ok"] is True and data["report"]["rows"] == 36


def test_prepare_validation_builds_the_suite_and_rejects_unknown_tables(shard: Path) -> None:
    prepare_validation("explanations")  # the suite the next validation uses, built ahead
    assert validate_shard(shard).ok
    with pytest.raises(ValueError, match="unknown table 'images'"):
        prepare_validation("images")
