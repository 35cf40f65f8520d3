"""``textcam sql`` and ``textcam compare`` (argparse, via the textcam.commands entry point)."""

from __future__ import annotations

import argparse
import json
from importlib.metadata import entry_points
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from auditdata import class_text_embeddings, make_run

from flows.query_cli import add_query_parsers
from tasks.compare import compare_runs
from tasks.flags import ClassText, flag_spurious
from tasks.store import build_duckdb
from textcam.schema import FLAGS


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="textcam")
    add_query_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    ct = ClassText(class_text_embeddings())
    a = make_run(tmp_path_factory.mktemp("a"), write_images=False)
    b = make_run(tmp_path_factory.mktemp("b"), write_images=False, seed=0)
    for r in (a, b):
        build_duckdb(r)
    flag_spurious(a, ct)
    # Run b (same data): "stripes" vanished, "snow" 1.0 weaker, "sky" appeared for bird.
    flags_b = flag_spurious(b, ct).to_dict("records")
    flags_b = [{**f, "z_lift": f["z_lift"] - 1.0} for f in flags_b if f["phrase"] == "snow"]
    flags_b.append({**flags_b[0], "class_name": "bird", "phrase": "sky", "z_lift": 4.0})
    pq.write_table(pa.Table.from_pylist(flags_b, schema=FLAGS), b / "flags.parquet")
    return a, b


def test_entry_point_is_registered() -> None:
    eps = {ep.name: ep.value for ep in entry_points(group="textcam.commands")}
    assert eps.get("query") == "flows.query_cli:add_query_parsers"


def test_sql_prints_csv_answers(runs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    sql = (
        "SELECT class_name, round(frequency, 3) AS f FROM concept_stats "
        "WHERE phrase = 'snow' AND direction = 'for' ORDER BY class_name"
    )
    assert cli(["sql", str(runs[0]), sql, "--format", "csv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "class_name,f"
    assert lines[3] == "dog,0.85"


def test_sql_prints_json_and_tables(runs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        cli(["sql", str(runs[0]), "SELECT phrase, rank FROM flags ORDER BY phrase", "--format", "json"]) == 0
    )
    assert json.loads(capsys.readouterr().out) == [
        {"phrase": "snow", "rank": 1},
        {"phrase": "stripes", "rank": 1},
    ]
    assert cli(["sql", str(runs[0]), "SELECT count(*) AS n FROM predictions"]) == 0
    assert capsys.readouterr().out.split() == ["n", "120"]


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("INSERT INTO flags SELECT * FROM flags", "refused: only read-only queries"),
        (
            "ATTACH 'x.duckdb'",
            "refused: only read-only queries are allowed (SELECT, WITH, DESCRIBE, SHOW); got ATTACH",
        ),
        ("COPY flags TO 'out.csv'", "got COPY"),
        ("SELECT * FROM read_csv('/etc/passwd')", "Permission Error"),
    ],
)
def test_sql_refusals_exit_2_with_a_clear_message(
    runs: tuple[Path, Path], capsys: pytest.CaptureFixture[str], sql: str, message: str
) -> None:
    assert cli(["sql", str(runs[0]), sql]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err


def test_compare_runs_classifies_flag_changes(runs: tuple[Path, Path]) -> None:
    frame = compare_runs(*runs)
    got = {(r.status, r.class_name, r.phrase, r.direction) for r in frame.itertuples()}
    assert got == {
        ("appeared", "bird", "sky", "for"),
        ("vanished", "cat", "stripes", "against"),
        ("changed", "dog", "snow", "for"),
    }
    snow = frame[frame["phrase"] == "snow"].iloc[0]
    assert snow["delta_z"] == pytest.approx(-1.0)
    assert compare_runs(runs[0], runs[0])["status"].tolist() == ["same", "same"]
    assert compare_runs(*runs, z_tolerance=2.0).set_index("phrase").loc["snow", "status"] == "same"


def test_compare_cli(runs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["compare", str(runs[0]), str(runs[1])]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "1 appeared, 1 vanished, 1 changed, 0 same"
    assert cli(["compare", str(runs[0]), str(runs[0]), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_compare_needs_flags(tmp_path: Path, runs: tuple[Path, Path]) -> None:
    with pytest.raises(FileNotFoundError, match=r"flags\.parquet"):
        compare_runs(runs[0], tmp_path)
