"""DuckDB store: views over the Parquet files, concept_stats against a pandas reference, the SQL sandbox."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from auditdata import make_run

from tasks.store import UnsafeQueryError, build_duckdb, connect, open_writable, query, run_sql, store_table
from textcam.schema import CONCEPT_STATS, FLAGS


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = make_run(tmp_path_factory.mktemp("store"), n_per_class=30, seed=3)
    build_duckdb(run_dir)
    return run_dir


def reference_stats(run_dir: Path) -> pd.DataFrame:
    """concept_stats recomputed the slow, plain way: a dense image × (phrase, direction) score matrix."""
    rows = pq.read_table(run_dir / "explanations").to_pylist()
    rows = [r for r in rows if r["rank_of_target"] == 0]
    images = pd.DataFrame(
        {
            "image_id": [r["image_id"] for r in rows],
            "cls": [r["pred_name"] for r in rows],
            "label": [r["label"] for r in rows],
        }
    )
    images["mis"] = images["label"].notna() & (images["label"] != images["cls"])
    images["cor"] = images["label"].notna() & ~images["mis"]
    scores: dict[tuple[str, str], np.ndarray] = {}
    for i, r in enumerate(rows):
        for p in r["phrases"]:
            col = scores.setdefault((p["text"], p["direction"]), np.zeros(len(rows)))
            col[i] += abs(p["score"])
    n = len(rows)
    out = []
    for c in sorted(images["cls"].unique()):
        in_c = (images["cls"] == c).to_numpy()
        for (phrase, direction), s in scores.items():
            sd = s.std()  # population sd over all images
            sel = s > 0
            mis, cor = in_c & images["mis"].to_numpy(), in_c & images["cor"].to_numpy()
            out.append(
                {
                    "class_name": c,
                    "phrase": phrase,
                    "direction": direction,
                    "n_class": int(in_c.sum()),
                    "n_images": int((sel & in_c).sum()),
                    "frequency": (sel & in_c).sum() / in_c.sum(),
                    "frequency_other": (sel & ~in_c).sum() / (~in_c).sum(),
                    "mean_score": s[in_c].mean(),
                    "mean_score_other": s[~in_c].mean(),
                    "lift": (s[in_c].mean() - s[~in_c].mean()) / sd if sd > 1e-12 else np.nan,
                    "frequency_misclassified": (sel & mis).sum() / mis.sum() if mis.sum() else np.nan,
                    "frequency_correct": (sel & cor).sum() / cor.sum() if cor.sum() else np.nan,
                }
            )
    ref = pd.DataFrame(out)
    se = {
        c: np.sqrt(n / (n - 1) * (1 / k + 1 / (n - k)))
        for c, k in ref.groupby("class_name")["n_class"].first().items()
    }
    z = []
    for (c, _), g in ref.groupby(["class_name", "direction"]):
        x = g["lift"].to_numpy()
        med = np.nanmedian(x)
        scale = max(1.4826 * np.nanmedian(np.abs(x - med)), se[c])
        z.append(pd.Series((x - med) / scale, index=g.index))
    ref["z_lift"] = pd.concat(z)
    return ref


def test_concept_stats_equal_a_plain_reference(run: Path) -> None:
    got = query(run, "SELECT * FROM concept_stats")
    ref = reference_stats(run)
    assert len(got) == len(ref) == 3 * ref[["phrase", "direction"]].drop_duplicates().shape[0]
    merged = ref.merge(got, on=["class_name", "phrase", "direction"], suffixes=("_ref", ""))
    assert len(merged) == len(ref)
    for col in (
        "n_class",
        "n_images",
        "frequency",
        "frequency_other",
        "mean_score",
        "mean_score_other",
        "lift",
        "z_lift",
        "frequency_misclassified",
        "frequency_correct",
    ):
        np.testing.assert_allclose(
            merged[col].astype(float), merged[f"{col}_ref"].astype(float), rtol=1e-5, atol=1e-6, err_msg=col
        )


def test_concept_stats_table_has_the_declared_schema(run: Path) -> None:
    desc = query(run, "DESCRIBE concept_stats")
    assert desc["column_name"].tolist() == CONCEPT_STATS.names
    nulls = dict(zip(desc["column_name"], desc["null"], strict=True))
    assert nulls["class_name"] == "NO" and nulls["z_lift"] == "YES"


def test_only_the_predicted_class_explanation_counts(run: Path) -> None:
    # Each image also has a rank-1 explanation with "snow" at score 5.0: it must not leak into the stats.
    # (planted snow scores are at most 1.2, times 3 in bird images)
    top = query(run, "SELECT max(score) AS m FROM image_phrases WHERE phrase = 'snow'")
    assert top["m"][0] <= 3.6 + 1e-6
    counts = query(run, "SELECT count(*) AS n FROM predictions")
    assert counts["n"][0] == 90


def test_duplicate_shard_rows_count_once(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, n_per_class=10, seed=1, write_images=False)
    build_duckdb(run_dir)
    before = query(run_dir, "SELECT * FROM concept_stats ORDER BY ALL")
    shutil.copy(
        run_dir / "explanations" / "shard-00000.parquet", run_dir / "explanations" / "shard-00009.parquet"
    )
    build_duckdb(run_dir)
    after = query(run_dir, "SELECT * FROM concept_stats ORDER BY ALL")
    pd.testing.assert_frame_equal(before, after)


def test_missing_tables_are_empty_typed_views(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, n_per_class=5, write_images=False)
    shutil.rmtree(run_dir / "errors")
    build_duckdb(run_dir)
    desc = query(run_dir, "DESCRIBE errors")
    assert desc["column_name"].tolist() == ["run_id", "image_id", "path", "stage", "reason", "row"]
    assert query(run_dir, "SELECT count(*) AS n FROM errors")["n"][0] == 0


def test_run_directory_can_be_moved(run: Path, tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    got = query(moved, "SELECT count(*) AS n FROM explanations")
    assert got["n"][0] == 180


def test_run_sql_answers_a_per_class_frequency_query(run: Path) -> None:
    sql = (
        "SELECT class_name, count(*) FILTER (WHERE phrase = 'snow') / any_value(n) AS freq "
        "FROM image_phrases "
        "JOIN (SELECT class_name, count(*) AS n FROM predictions GROUP BY 1) USING (class_name) "
        "WHERE direction = 'for' GROUP BY class_name ORDER BY class_name"
    )
    res = run_sql(run, sql, "csv")
    ref = reference_stats(run).query("phrase == 'snow' and direction == 'for'").sort_values("class_name")
    assert res.frame["class_name"].tolist() == ["bird", "cat", "dog"]
    np.testing.assert_allclose(res.frame["freq"], ref["frequency"])
    assert res.text.splitlines()[0] == "class_name,freq"
    assert run_sql(run, "SHOW TABLES", "json").text.count("concept_stats") == 1
    table = run_sql(run, "SELECT 1 AS one").text
    assert table.split() == ["one", "1"]


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("INSERT INTO flags SELECT * FROM flags", "got INSERT"),
        ("ATTACH '/tmp/other.duckdb' AS o", "got ATTACH"),
        ("COPY concept_stats TO '/tmp/x.csv'", "got COPY"),
        ("INSTALL httpfs", "got LOAD"),
        ("SET enable_external_access = true", "got SET"),
        ("SELECT 1; DROP TABLE flags", "exactly one statement"),
        ("CREATE TABLE t AS SELECT 1", "got CREATE"),
        ("PRAGMA enable_profiling", "got PRAGMA"),
    ],
)
def test_run_sql_refuses_statements_that_write_or_escape(run: Path, sql: str, message: str) -> None:
    with pytest.raises(UnsafeQueryError, match=message):
        run_sql(run, sql)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_text('/etc/hostname')",
        "SELECT * FROM read_parquet('../../../etc/passwd')",
    ],
)
def test_run_sql_cannot_read_files_outside_the_run(run: Path, sql: str) -> None:
    with pytest.raises(duckdb.Error, match=r"disabled by configuration|Permission"):
        run_sql(run, sql)


def test_sandboxed_connection_is_read_only_and_locked(run: Path) -> None:
    con = connect(run)
    try:
        with pytest.raises(duckdb.Error):
            con.execute("CREATE TABLE main.t AS SELECT 1")
        with pytest.raises(duckdb.Error, match="locked"):
            con.execute("SET enable_external_access = true")
    finally:
        con.close()


def test_pragma_table_info_is_allowed(run: Path) -> None:
    info = run_sql(run, "PRAGMA table_info('flags')").frame
    assert "z_lift" in info["name"].tolist()


def _one_flag(run_id: str, class_name: str, phrase: str) -> pa.Table:
    """A ``flags`` table with one "for" flag; the figures are placeholders of the declared types."""
    fill = {pa.string(): "", pa.int32(): 0, pa.int64(): 0, pa.float64(): 0.0, pa.bool_(): False}
    row = {f.name: fill.get(f.type, []) for f in FLAGS}
    row |= {"run_id": run_id, "class_name": class_name, "phrase": phrase, "direction": "for", "rank": 1}
    return pa.Table.from_pylist([row], schema=FLAGS)


@contextmanager
def _snow_flagged_for_dog(run_dir: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """The built run's database, writable, with one "for" flag stored: dog, snow."""
    con = open_writable(run_dir)
    try:
        store_table(con, run_dir, "flags", _one_flag(run_dir.name, "dog", "snow"))
        yield con
    finally:
        con.close()


def test_phrase_specificity_follows_the_numpy_rule(tmp_path: Path) -> None:
    """``phrase_specificity`` and ``shown_phrases`` against :func:`specific_among_strong` on dense arrays.

    CLIP "sees" snow where its weight is large (image-specific) and every other phrase at random (a
    class-wide filler CLIP sees in half the images): only snow may pass where both are strong."""
    from tasks.explain_shard import save_phrases
    from tasks.rundir import RunDir
    from textcam.schema import EXPLANATIONS
    from textcam.visibility import PhraseVisibility, specific_among_strong

    run_dir = make_run(tmp_path, n_per_class=60, seed=5)
    rng = np.random.default_rng(0)
    for path in sorted((run_dir / "explanations").glob("*.parquet")):
        rows = pq.read_table(path).to_pylist()
        for r in rows:
            first = max((p["score"] for p in r["phrases"] if p["direction"] == "for"), default=0.0)
            for p in r["phrases"]:
                if p["direction"] == "for":
                    present = p["score"] > 1.0 if p["text"] == "snow" else rng.random() < 0.5
                    p["shown"] = bool(present and p["score"] >= 0.5 * first)
        pq.write_table(pa.Table.from_pylist(rows, schema=EXPLANATIONS), path)
    build_duckdb(run_dir)
    con = connect(run_dir)
    table = con.sql("SELECT * FROM phrase_specificity").df().set_index(["class_name", "phrase"])
    shown = con.execute("SELECT count(*) FROM shown_phrases").fetchall()[0][0]
    ips = con.sql("SELECT * FROM image_phrases WHERE direction = 'for'").df()
    con.close()

    classes = sorted(ips["class_name"].unique())
    phrases = sorted(ips["phrase"].unique())
    images = sorted(ips["image_id"].unique())
    row = {i: n for n, i in enumerate(images)}
    scores, seen = np.zeros((len(images), len(phrases))), np.zeros((len(images), len(phrases)), bool)
    cls = np.zeros(len(images), dtype=np.int64)
    for t in ips.itertuples():
        scores[row[t.image_id], phrases.index(t.phrase)] = t.score
        seen[row[t.image_id], phrases.index(t.phrase)] = t.shown
        cls[row[t.image_id]] = classes.index(t.class_name)
    strong = (scores > 0) & (scores >= 0.5 * scores.max(1, keepdims=True))
    expected = specific_among_strong(seen, scores, strong, cls)
    for (c, p), t in table.iterrows():
        assert bool(t["specific"]) == bool(expected[classes.index(c), phrases.index(p)]), (c, p, dict(t))
        assert t["n_strong"] == strong[cls == classes.index(c), phrases.index(p)].sum()
    assert table.loc[("dog", "snow"), "specific"] and table.loc[("dog", "snow"), "r"] > 0.5
    fillers = table.drop(index="snow", level="phrase")
    assert not fillers[fillers["n_seen"] < fillers["n_strong"]]["specific"].any()

    def kept(pairs: set[tuple[str, str]]) -> int:
        return sum(
            int(table.loc[(c, p), "specific"]) * int(seen[cls == classes.index(c), phrases.index(p)].sum())
            for c, p in table.index
            if (c, p) in pairs
        )

    # No flag yet: only a class's own name may be shown; a "for" flag adds its phrase, in this build and
    # in a rebuild that reloads flags.parquet.
    assert shown == kept({(c, c) for c in classes})
    assert kept({("dog", "snow")}) > 0
    with_flag = shown + kept({("dog", "snow")})
    with _snow_flagged_for_dog(run_dir) as con:
        assert con.execute("SELECT count(*) FROM shown_phrases").fetchall()[0][0] == with_flag
    build_duckdb(run_dir)
    with connect(run_dir) as con:
        assert con.execute("SELECT count(*) FROM shown_phrases").fetchall()[0][0] == with_flag

    # With the run's visibility model: a phrase CLIP sees in a probe image at 5 % but in half of the
    # class's strong explanations is about the image (base-rate witness); the others stay as they were.
    rate = np.where(np.asarray(phrases) == "leaves", 0.05, 0.5)
    text = torch.zeros(len(phrases), 4)
    save_phrases(RunDir(run_dir).phrases_file, phrases, text, clip_id="test")
    weights = np.stack([1 - rate, rate])
    PhraseVisibility(text, weights, np.zeros((2, len(phrases))), np.ones((2, len(phrases)))).save(
        RunDir(run_dir).visibility_file
    )
    build_duckdb(run_dir)
    con = connect(run_dir)
    table = con.sql("SELECT * FROM phrase_specificity").df().set_index(["class_name", "phrase"])
    con.close()
    expected = specific_among_strong(seen, scores, strong, cls, rate)
    for (c, p), t in table.iterrows():
        assert bool(t["specific"]) == bool(expected[classes.index(c), phrases.index(p)]), (c, p, dict(t))
    leaves = table.xs("leaves", level="phrase")
    assert leaves[leaves["n_strong"] >= 20]["specific"].all() and (leaves["base_rate"] == 0.05).all()


def test_a_flagged_phrase_is_shown_wherever_clip_sees_it(tmp_path: Path) -> None:
    """Once flagged "for" a class, a phrase is shown in every explanation of that class that selected it
    where CLIP sees it (``seen``), however small its weight; unflagged phrases that CLIP sees are not, and
    a phrase CLIP does not see in the image is not either."""
    from textcam.schema import EXPLANATIONS

    run_dir = make_run(tmp_path, n_per_class=40, seed=2)
    expected = 0
    for path in sorted((run_dir / "explanations").glob("*.parquet")):
        rows = pq.read_table(path).to_pylist()
        for r in rows:
            first = max((p["score"] for p in r["phrases"] if p["direction"] == "for"), default=0.0)
            for n, p in enumerate(r["phrases"]):
                if p["direction"] == "for":
                    p["seen"] = (n + len(r["image_id"])) % 2 == 0  # half of them, whatever the weight
                    p["shown"] = p["seen"] and p["score"] >= 0.5 * first
                    counted = r["rank_of_target"] == 0 and r["pred_name"] == "dog" and p["text"] == "snow"
                    expected += int(counted and p["seen"])
        pq.write_table(pa.Table.from_pylist(rows, schema=EXPLANATIONS), path)
    build_duckdb(run_dir)
    with _snow_flagged_for_dog(run_dir) as con:
        rows = con.sql("SELECT class_name, phrase FROM shown_phrases").df()
        weak = con.execute(
            "SELECT count(*) FROM image_phrases AS i JOIN shown_phrases USING (image_id, class_name, phrase) "
            "WHERE NOT i.shown"
        ).fetchall()[0][0]
    flagged = rows[(rows["class_name"] == "dog") & (rows["phrase"] == "snow")]
    assert expected > 0 and len(flagged) == expected
    assert weak > 0  # some of them weigh under half the first phrase
    assert (rows["phrase"].str.lower() == rows["class_name"].str.lower()).sum() == len(rows) - expected


def test_a_flagged_phrase_among_the_nearest_is_shown_where_clip_sees_it(tmp_path: Path) -> None:
    """A phrase flagged "for" a class is shown where it is among the explanation's nearest phrases and CLIP
    sees it, though the sparse code left it out (score 0, ``selected`` false); never twice where the code
    selected it too, and never where CLIP does not see it or it is not flagged. A shard written before the
    ``nearest`` column reads it as null and shows nothing from it."""
    import pyarrow.compute as pc

    from textcam.schema import EXPLANATIONS

    run_dir = make_run(tmp_path, n_per_class=40, seed=3)
    shards = sorted((run_dir / "explanations").glob("*.parquet"))
    expected = 0
    for path in shards[1:]:
        rows = pq.read_table(path).to_pylist()
        for n, r in enumerate(rows):
            selected = {p["text"] for p in r["phrases"] if p["direction"] == "for"}
            seen = n % 3 != 0
            r["nearest"] = [
                {"text": "snow", "cosine": 0.5, "seen": seen},
                {"text": "leaves", "cosine": 0.4, "seen": True},  # never flagged
            ]
            counted = r["rank_of_target"] == 0 and r["pred_name"] == "dog" and "snow" not in selected
            expected += int(counted and seen)
        pq.write_table(pa.Table.from_pylist(rows, schema=EXPLANATIONS), path)
    old = pq.read_table(shards[0])
    pq.write_table(old.drop_columns(["nearest"]), shards[0])  # as written before version 4
    build_duckdb(run_dir)
    with connect(run_dir) as con:
        before = con.execute("SELECT count(*) FROM shown_phrases WHERE NOT selected").fetchall()[0][0]
    with _snow_flagged_for_dog(run_dir) as con:
        near = con.sql("SELECT * FROM shown_phrases WHERE NOT selected").df()
        twice = con.execute(
            "SELECT count(*) FROM "
            "(SELECT image_id, phrase FROM shown_phrases GROUP BY ALL HAVING count(*) > 1)"
        ).fetchall()[0][0]
        unread = con.execute(
            "SELECT count(*) FROM predictions WHERE nearest IS NULL AND image_id IN "
            f"(SELECT image_id FROM read_parquet('{shards[0]}'))"
        ).fetchall()[0][0]
    assert before == 0  # nothing is flagged yet
    assert expected > 0 and len(near) == expected
    assert (
        set(near["phrase"]) == {"snow"} and set(near["class_name"]) == {"dog"} and (near["score"] == 0).all()
    )
    assert twice == 0
    assert unread == old.filter(pc.field("rank_of_target") == 0).num_rows > 0
