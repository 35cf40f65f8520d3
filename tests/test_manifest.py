"""read_manifest, plan_shards and AuditConfig: parsing, bad input, determinism."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tasks.config import AuditConfig, ConfigError, load_config
from tasks.manifest import ManifestError, image_id_for, read_manifest
from tasks.shards import plan_shards
from textcam.schema import ERRORS, IMAGES


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (10, 20, 30)).save(path)
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    for cname in ("cat", "dog"):
        for i in range(3):
            _png(root / cname / f"{i}.png")
    (root / "notes.txt").write_text("not an image")
    return root


def test_folder_layout_labels_from_subfolders(folder: Path) -> None:
    m = read_manifest(folder)
    assert m.n_rows == m.n_images == 6 and m.errors.num_rows == 0
    assert m.images.schema.names[:4] == IMAGES.names
    rows = m.images.to_pylist()
    assert sorted({r["label"] for r in rows}) == ["cat", "dog"]
    assert all(r["path"].startswith(str(folder)) for r in rows)
    expected = {image_id_for(f"{c}/{i}.png") for c in ("cat", "dog") for i in range(3)}
    assert {r["image_id"] for r in rows} == expected


def test_folder_with_split_level(tmp_path: Path) -> None:
    _png(tmp_path / "train" / "cat" / "a.png")
    _png(tmp_path / "val" / "dog" / "b.png")
    rows = {r["label"]: r["split"] for r in read_manifest(tmp_path).images.to_pylist()}
    assert rows == {"cat": "train", "dog": "val"}


def test_image_id_is_stable_across_mounts_and_spellings(tmp_path: Path) -> None:
    for root in (tmp_path / "a", tmp_path / "b"):
        _png(root / "x" / "1.png")
    ids = {read_manifest(tmp_path / r).images.column("image_id")[0].as_py() for r in ("a", "b")}
    assert len(ids) == 1
    assert image_id_for("./x//y/../1.png") == image_id_for("x/1.png") == image_id_for("x\\1.png")


def test_csv_manifest_keeps_metadata_and_rejects_bad_rows(folder: Path) -> None:
    manifest = folder / "m.csv"
    pd.DataFrame(
        {
            "path": ["cat/0.png", "dog/1.png", "missing.png", "", "cat/0.png", "./dog/../dog/2.png"],
            "label": ["cat", "dog", "cat", "cat", "cat", "horse"],
            "photographer": ["ann", "bob", "cy", "di", "ed", "fi"],
            "year": [2001, 2002, 2003, 2004, 2005, 2006],
        }
    ).to_csv(manifest, index=False)
    m = read_manifest(manifest, classes=["cat", "dog"], run_id="r1")
    assert m.images.column("photographer").to_pylist() == ["ann", "bob"]
    assert m.images.column("year").type == pa.int64()
    assert m.n_images + m.errors.num_rows == m.n_rows == 6
    assert m.errors.schema.equals(ERRORS)
    reasons = m.errors.column("reason").to_pylist()
    assert any("file not found" in r for r in reasons)
    assert any("no path" in r for r in reasons)
    assert any("duplicate of row 0" in r for r in reasons)
    assert any("'horse' is not one of the 2 classes" in r for r in reasons)
    assert set(m.errors.column("stage").to_pylist()) == {"manifest"}
    assert set(m.errors.column("run_id").to_pylist()) == {"r1"}
    assert json.loads(m.errors.column("row")[0].as_py())["photographer"] == "cy"


def test_parquet_manifest_with_wrong_types(folder: Path) -> None:
    path = folder / "m.parquet"
    table = pa.table(
        {
            "path": ["cat/0.png", "cat/1.png", "dog/0.png"],
            "label": [1.5, None, 2.0],
            "split": ["train", "test", "val"],
        }
    )
    pq.write_table(table, path)
    m = read_manifest(path)
    assert m.n_images == 1 and m.images.column("label").to_pylist() == [None]
    assert all("label must be a string or an integer" in r for r in m.errors.column("reason").to_pylist())

    pq.write_table(pa.table({"path": [1, 2]}), path)
    m = read_manifest(path)
    assert m.n_images == 0 and m.errors.num_rows == 2
    assert "path must be a string" in m.errors.column("reason")[0].as_py()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "empty"),
        ("label,split\ncat,train\n", "no `path` column"),
        ("path,label\n", "no rows"),
        ("path,image_id\na.png,x\n", "computed by TextCAM"),
    ],
)
def test_whole_file_problems_raise_clear_errors(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "m.csv"
    path.write_text(content)
    with pytest.raises(ManifestError, match=message):
        read_manifest(path)


def test_missing_source_and_unsupported_type(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="dataset not found"):
        read_manifest(tmp_path / "nope")
    (tmp_path / "m.json").write_text("{}")
    with pytest.raises(ManifestError, match="unsupported manifest type"):
        read_manifest(tmp_path / "m.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="no images found"):
        read_manifest(tmp_path / "empty")


_cell = st.one_of(
    st.none(),
    st.text(alphabet=string.ascii_letters + "./\\ _-", max_size=12),
    st.integers(-5, 5),
    st.floats(allow_nan=True),
    st.booleans(),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(
        st.fixed_dictionaries({"path": _cell, "label": _cell, "split": _cell, "note": _cell}),
        min_size=1,
        max_size=12,
    ),
    classes=st.one_of(st.none(), st.just(["cat", "dog"])),
)
def test_property_every_row_accounted_for(
    tmp_path: Path, rows: list[dict], classes: list[str] | None
) -> None:
    """Any manifest: no crash, and every input row is an image or an error, exactly once."""
    root = tmp_path / "prop"
    if not root.exists():
        _png(root / "cat" / "a.png")
        _png(root / "dog" / "b.png")
    rows = [dict(r, path=("cat/a.png" if r["path"] == "a" else r["path"])) for r in rows]
    path = root / "m.parquet"
    # Mixed Python types per column as Parquet would store them: each column as text or as objects.
    frame = pd.DataFrame(rows).astype(object)
    pq.write_table(pa.Table.from_pandas(frame.map(lambda v: None if v is None else str(v))), path)
    for source in (path, _csv(root, frame)):
        m = read_manifest(source, classes=classes)
        assert m.n_rows == len(rows)
        assert m.n_images + m.errors.num_rows == len(rows)
        ids = m.images.column("image_id").to_pylist()
        assert len(ids) == len(set(ids))


def _csv(root: Path, frame: pd.DataFrame) -> Path:
    path = root / "m.csv"
    frame.to_csv(path, index=False)
    return path


def test_plan_shards_is_deterministic(folder: Path) -> None:
    images = read_manifest(folder).images
    a = plan_shards(images, 4, run_id="r")
    b = plan_shards(images.take(list(reversed(range(images.num_rows)))), 4, run_id="r")
    assert [s.shard_id for s in a] == ["shard-00000", "shard-00001"]
    assert a == b
    assert [len(s) for s in a] == [4, 2]
    assert sorted(i for s in a for i in s.image_ids) == sorted(images.column("image_id").to_pylist())
    other = plan_shards(images, 4, run_id="r2")
    assert [s.fingerprint for s in other] != [s.fingerprint for s in a]
    with pytest.raises(ValueError, match="shard_size"):
        plan_shards(images, 0, run_id="r")


def test_config_file_overrides_and_errors(tmp_path: Path) -> None:
    (tmp_path / "audit.yaml").write_text("data: images\nshard_size: 64\nvocab: [general, phrase:snow]\n")
    cfg = load_config(tmp_path / "audit.yaml", {"runner": "dask", "workers": "3", "layer": None})
    assert cfg.data == str(tmp_path / "images") and cfg.shard_size == 64 and cfg.workers == 3
    assert cfg.vocab == ("general", "phrase:snow") and cfg.runner == "dask"
    assert cfg.fingerprint() == cfg.replace(runner="default", workers=1, device="cpu").fingerprint()
    assert cfg.fingerprint() != cfg.replace(explanation={"method": "layercam"}).fingerprint()
    saved = cfg.save(tmp_path / "run" / "config.yaml")
    assert load_config(saved) == cfg

    (tmp_path / "audit.toml").write_text('[audit]\ndata = "/x"\nscheduler = "tcp://h:8786"\n')
    assert load_config(tmp_path / "audit.toml").runner == "dask"
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(None, {"data": "x", "shard_sise": 3})
    with pytest.raises(ConfigError, match="shard_size"):
        load_config(None, {"data": "x", "shard_size": "many"})
    with pytest.raises(ConfigError, match="needs `data`"):
        load_config(None, {})
    with pytest.raises(ConfigError, match="runner"):
        load_config(None, {"data": "x", "runner": "spark"})
    with pytest.raises(ValueError, match="runner"):  # built directly: pydantic's own error
        AuditConfig(data="x", runner="spark")
