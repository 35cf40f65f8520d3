"""Reliability: one audit over a generated corpus of bad inputs + 210 good images loses no row.

Every manifest row must end up either explained or in the errors table with its stage and a reason,
and the flow's counts must reconcile. Bad inputs are generated here (tests/badimages.py), never
committed. Faults: disk full while writing a shard, a corrupt or foreign channel bank.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from audit_world import CLASSES, make_world
from badimages import make_bad_images
from PIL import Image
from test_report import parse

from tasks.config import from_mapping
from tasks.manifest import ManifestError

HOSTILE_NAME = "x\"'><script>alert(1)<script>"  # no "/": it is a file name

#: Bad corpus files → (stage that must record them, a word the reason must contain).
EXPECTED_ERRORS = {
    "zero.jpg": ("explain", "empty file"),
    "truncated.jpg": ("explain", "truncated"),
    "not_an_image.png": ("explain", "not an image"),
    "bomb.png": ("explain", "too large"),
    "bomb_full.png": ("explain", "too large"),
    "dir.jpg": ("manifest", "not a regular file"),
    "broken_link.jpg": ("manifest", "broken symlink"),
    "missing.jpg": ("manifest", "file not found"),
    "non_utf8": ("manifest", "UTF-8"),
    "hostile_bad": ("explain", "not an image"),
    "locked": ("explain", "permission denied"),  # only when the tests do not run as root
}


def _unreadable_by_us(path: Path) -> bool:
    """chmod 000 denies reads to everyone but root (who runs the tests in CI containers)."""
    return not os.access(path, os.R_OK)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The world (210 good PNGs, tiny models), the bad files and a CSV manifest listing all of it."""
    root = tmp_path_factory.mktemp("reliability")
    cfg = make_world(root, n_per_class=70)
    data = Path(cfg["data"])
    bad = make_bad_images(data / "bad")
    locked = data / "bad" / "locked.png"
    Image.new("RGB", (8, 8), "gray").save(locked)
    locked.chmod(0)
    hostile_good = data / "apple" / f"{HOSTILE_NAME}.png"
    shutil.copy(data / "apple" / "apple-000.png", hostile_good)
    hostile_bad = data / "bad" / f"{HOSTILE_NAME}.jpg"
    hostile_bad.write_text("<script>alert(2)</script> is not a JPEG")
    (data / "extra").mkdir()
    shutil.copy(data / "boat" / "boat-000.png", data / "extra" / "boat-x.png")
    outside = root.parent / f"{root.name}-outside" / "secret.png"  # the dataset root is the manifest's folder
    outside.parent.mkdir()
    shutil.copy(data / "boat" / "boat-000.png", outside)

    rows: list[tuple[str, str, str]] = []  # (path, label, what the row is)
    good = sorted(p for c in CLASSES for p in (data / c).glob("*.png"))
    rows += [(p.relative_to(root).as_posix(), p.parent.name, "good") for p in good]
    for name, (path, ok) in bad.items():
        kind = name if name in EXPECTED_ERRORS else "good" if ok else name
        rows.append((os.fsdecode(path.relative_to(root)), "", kind))
    expect_locked = "locked" if _unreadable_by_us(locked) else "good"
    rows += [
        (locked.relative_to(root).as_posix(), "", expect_locked),
        (hostile_bad.relative_to(root).as_posix(), "", "hostile_bad"),
        (str(outside), "boat", "good"),  # outside the dataset root
        ("data/apple/apple-001.png", "apple", "duplicate"),  # the same file again, twice
        ("./data/apple//apple-001.png", "apple", "duplicate"),
        ("", "apple", "no_path"),
        ("data/extra/boat-x.png", "zebra", "bad_label"),
    ]
    manifest = root / "manifest.csv"
    # surrogateescape: the non-UTF-8 file name goes into the file as its raw bytes, as `ls > x.csv` would.
    with manifest.open("w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "note"])
        for i, (path, label, _) in enumerate(rows):
            w.writerow([path, label, f"row-{i}"])
    cfg.update(
        data=str(manifest),
        classes=list(CLASSES),
        shard_size=64,
        batch_size=16,
        calibration={**cfg["calibration"], "probe_size": 30},
        loader_workers=2,
        flags={"n_permutations": 10, "min_images": 2},
    )
    return {"cfg": cfg, "root": root, "rows": rows, "outside": outside}


@pytest.fixture(scope="module")
def audited(corpus: dict[str, Any], prefect_api: str) -> dict[str, Any]:
    from flows.audit import audit

    return audit(from_mapping({**corpus["cfg"], "run_dir": str(corpus["root"] / "run")}))


def _errors(run_dir: str | Path) -> list[dict[str, Any]]:
    return pq.read_table(Path(run_dir) / "errors").to_pylist()


def test_every_row_is_explained_or_recorded(corpus: dict[str, Any], audited: dict[str, Any]) -> None:
    rows = corpus["rows"]
    counts = audited["counts"]
    n_good = sum(kind == "good" for *_, kind in rows)
    assert n_good >= 200
    assert counts["rows_in"] == len(rows)
    assert counts["explained_images"] == n_good
    assert counts["rows_in"] == counts["explained_images"] + counts["errors"] and audited["reconciled"]

    run_dir = Path(audited["run_dir"])
    explained = set(pq.read_table(run_dir / "explanations", columns=["image_id"]).column(0).to_pylist())
    images = pq.read_table(run_dir / "images.parquet", columns=["image_id", "note"]).to_pylist()
    notes = {r["note"] for r in images if r["image_id"] in explained}
    good_notes = {f"row-{i}" for i, (*_, kind) in enumerate(rows) if kind == "good"}
    assert len(explained) == n_good
    assert notes == good_notes  # every good row explained (found by its own metadata column), nothing else

    errors = _errors(run_dir)
    assert len(errors) == counts["errors"] == len(rows) - n_good
    assert all(e["stage"] in ("manifest", "explain") and e["reason"].strip() for e in errors)
    assert all("\n" not in e["reason"] for e in errors)
    by_note = {json.loads(e["row"]).get("note"): e for e in errors if json.loads(e["row"]).get("note")}
    by_path = {Path(e["path"]).name: e for e in errors}
    matched = []
    for i, (path, _, kind) in enumerate(rows):
        if kind == "good":
            continue
        # explain-stage rows carry image_id/path/label only (no metadata): found by file name
        error = by_note.get(f"row-{i}") or by_path[Path(path).name]
        matched.append(errors.index(error))
        stage, word = EXPECTED_ERRORS.get(kind, (None, None))
        if stage is not None:
            assert error["stage"] == stage and word in error["reason"], (kind, error)
    assert sorted(matched) == list(range(len(errors)))  # one error row per bad row, none left over
    reasons = {kind: by_note.get(f"row-{i}") for i, (_, _, kind) in enumerate(rows)}
    assert "duplicate" in reasons["duplicate"]["reason"]
    assert "no path" in reasons["no_path"]["reason"]
    assert "'zebra' is not one of the 3 classes" in reasons["bad_label"]["reason"]


def _read_as_nobody(path: Path) -> str:
    """``read_image(path)`` in a forked child that gave up root's rights; its error message, or ""."""
    from textcam.data import ImageReadError, read_image

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest: any failure shows as its exit code
        code = 1
        try:
            os.close(r)
            os.setgid(65534)
            os.setuid(65534)
            try:
                read_image(path)
                message = ""
            except ImageReadError as exc:
                message = str(exc)
            os.write(w, message.encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        message = f.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the unprivileged reader crashed"
    return message


def test_unreadable_file_is_refused_for_a_user_without_rights() -> None:
    """The chmod 000 case where it can be observed: as ``nobody`` when the tests run as root (root
    reads any file, so in the corpus above that file is expected to be explained)."""
    if os.geteuid() != 0:
        pytest.skip("not root: the corpus test above already expects the chmod 000 file as an error")
    folder = Path(tempfile.mkdtemp(prefix="textcam-perm-"))  # under /tmp: reachable by nobody
    try:
        folder.chmod(0o755)
        locked = folder / "locked.png"
        Image.new("RGB", (4, 4)).save(locked)
        locked.chmod(0)
        assert _read_as_nobody(locked).startswith("permission denied:")
        locked.chmod(0o644)
        assert _read_as_nobody(locked) == ""  # the same file with rights is read: the check is real
    finally:
        shutil.rmtree(folder)


def test_hostile_names_are_escaped_and_outside_paths_not_embedded(
    corpus: dict[str, Any], audited: dict[str, Any]
) -> None:
    html = Path(audited["report"]).read_text()
    tags = parse(html)
    # Only the report's own two script elements: the class data (JSON) and the hashed index code.
    scripts = [a for t, a in tags if t == "script"]
    assert scripts == [{"type": "application/json", "id": "class-data"}, {}]
    assert not [(t, k) for t, a in tags for k in a if k.startswith("on")]
    assert "<script>alert" not in html
    assert "&lt;script&gt;alert(1)&lt;script&gt;" in html  # the hostile file name, in the errors table
    assert all(a["src"].startswith("data:") for t, a in tags if t == "img")
    assert not [a for t, a in tags if t == "img" and "secret" in (a.get("alt") or "")]


def test_error_counts_in_report(audited: dict[str, Any]) -> None:
    html = Path(audited["report"]).read_text()
    assert 'id="errors"' in html
    section = html[html.index('id="errors"') :]
    assert "manifest" in section and "explain" in section


# -- bad manifests as a whole ------------------------------------------------------------------------


def _audit_manifest(corpus: dict[str, Any], manifest: Path, run_dir: Path) -> dict[str, Any]:
    """The corpus' audit of another manifest, with M = 2 (a handful of probe images)."""
    calibration = {**corpus["cfg"]["calibration"], "bank_m": 2}
    return _audit(corpus["cfg"], run_dir, data=str(manifest), calibration=calibration)


def _audit(cfg: dict[str, Any], run_dir: Path, **changes: Any) -> dict[str, Any]:
    from flows.audit import audit

    return audit(from_mapping({**cfg, "run_dir": str(run_dir), **changes}))


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "empty"), (b"file,label\na.png,apple\n", "no `path` column"), (b"path,label\n", "no rows")],
)
def test_unusable_manifest_fails_with_a_clear_error(
    corpus: dict[str, Any], prefect_api: str, tmp_path: Path, content: bytes, message: str
) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(content)
    with pytest.raises(ManifestError, match=message):
        _audit(corpus["cfg"], tmp_path / "run", data=str(manifest))
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_wrong_types_in_a_parquet_manifest(corpus: dict[str, Any], prefect_api: str, tmp_path: Path) -> None:
    data = Path(corpus["cfg"]["data"]).parent / "data"
    good = [str(p) for p in sorted((data / "cloud").glob("*.png"))[:6]]
    table = pa.table(
        {
            "path": [*good, None],
            "label": [None, 1.5, None, None, None, None, 2.0],  # floats: not a label
            "split": ["val", "val", "val", "val", "test", "test", "test"],
        }
    )
    manifest = tmp_path / "m.parquet"
    pq.write_table(table, manifest)
    summary = _audit_manifest(corpus, manifest, tmp_path / "run")
    c = summary["counts"]
    assert (c["rows_in"], c["explained_images"], c["errors"]) == (7, 5, 2) and summary["reconciled"]
    reasons = sorted(e["reason"] for e in _errors(summary["run_dir"]))
    assert "label must be a string or an integer, got float 1.5" in reasons[0]
    assert "no path" in reasons[1]


def test_a_manifest_with_no_usable_row_still_accounts_for_every_row(
    corpus: dict[str, Any], prefect_api: str, tmp_path: Path
) -> None:
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"path": [1, 2, 3], "label": ["apple"] * 3}), manifest)
    summary = _audit_manifest(corpus, manifest, tmp_path / "run")
    c = summary["counts"]
    assert (c["rows_in"], c["explained_images"], c["errors"]) == (3, 0, 3) and summary["reconciled"]
    assert all("path must be a string" in e["reason"] for e in _errors(summary["run_dir"]))


# -- faults --------------------------------------------------------------------------------------------


@pytest.fixture
def small(corpus: dict[str, Any]) -> dict[str, Any]:
    """A 3-shard audit of 30 good images (fast), sharing the corpus' models and cache."""
    data = Path(corpus["cfg"]["data"]).parent / "data"
    paths = [p for c in CLASSES for p in sorted((data / c).glob(f"{c}-0*.png"))[:10]]
    manifest = data.parent / "small.csv"
    pd.DataFrame({"path": [str(p) for p in paths], "label": [p.parent.name for p in paths]}).to_csv(
        manifest, index=False
    )
    return {
        **corpus["cfg"],
        "data": str(manifest),
        "shard_size": 10,
        "calibration": {**corpus["cfg"]["calibration"], "probe_size": 30},
        "loader_workers": 0,
    }


@pytest.fixture
def disk_full_once(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The second shard's Parquet writes fail with ENOSPC, once (the disk is freed before the re-run)."""
    import tasks.explain_shard as shard_module

    failed: list[str] = []
    real = shard_module.AtomicParquetWriter.write

    def write(self: Any, rows: list[dict[str, Any]]) -> None:
        if self.path.name == "shard-00001.parquet" and self.path.parent.name == "staging" and not failed:
            failed.append(str(self.tmp))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.tmp))
        real(self, rows)

    monkeypatch.setattr(shard_module.AtomicParquetWriter, "write", write)
    yield failed


def test_disk_full_leaves_no_partial_shard_and_rerun_recovers(
    small: dict[str, Any], prefect_api: str, tmp_path: Path, disk_full_once: list[str]
) -> None:
    import flows.audit as audit_module

    run_dir = tmp_path / "run"
    # No retry inside the run (ENOSPC counts as transient): the disk stays full until someone frees it.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            audit_module, "explain_shard_task", audit_module.explain_shard_task.with_options(retries=0)
        )
        with pytest.raises(Exception) as failure:
            _audit(small, run_dir)
    assert "No space left on device" in str(failure.value) or failure.type is OSError
    assert disk_full_once and not Path(disk_full_once[0]).exists()  # its temp file was removed
    committed = sorted(p.name for p in (run_dir / "explanations").glob("*.parquet"))
    assert "shard-00001.parquet" not in committed
    assert not list((run_dir / "staging").glob("shard-00001*"))
    assert not list(run_dir.glob("**/.*.tmp*"))

    summary = _audit(small, run_dir)
    assert summary["reconciled"] and summary["counts"]["explained_images"] == 30
    assert "shard-00001" in summary["shards"]["computed"]
    assert set(summary["shards"]["reused"]) == {n.removesuffix(".parquet") for n in committed}
    ids = pq.read_table(run_dir / "explanations", columns=["image_id"]).column(0).to_pylist()
    assert len(ids) == len(set(ids)) == 30  # top_k = 1: one row per image, no duplicates


def test_corrupt_bank_gives_a_clear_error_in_the_flow(
    small: dict[str, Any], prefect_api: str, tmp_path: Path
) -> None:
    from textcam.bank import BankCorruptError

    run_dir = tmp_path / "run"
    _audit(small, run_dir)
    bank = run_dir / "bank" / "bank.safetensors"
    blob = bytearray(bank.read_bytes())
    blob[-7] ^= 0xFF  # one byte of the directions tensor
    bank.write_bytes(bytes(blob))
    with pytest.raises(BankCorruptError, match="fails its checksum"):
        _audit(small, run_dir)


def test_bank_of_another_model_gives_a_clear_error_in_the_flow(
    small: dict[str, Any], prefect_api: str, tmp_path: Path
) -> None:
    from audit_world import make_classifier

    from textcam.bank import BankMismatchError

    run_dir = tmp_path / "run"
    _audit(small, run_dir)
    other = make_classifier(tmp_path / "other.safetensors", seed=1)
    # The bank files of that run in a fresh run directory audited with another classifier (the old
    # run directory itself would refuse the changed config before the bank is even opened).
    run2 = tmp_path / "run2"
    shutil.copytree(run_dir / "bank", run2 / "bank")
    with pytest.raises(BankMismatchError, match="calibrated for classifier"):
        _audit(small, run2, model=str(other))
