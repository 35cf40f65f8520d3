"""The HTML report: self-contained, escaped, images only from inside the dataset root; in a real browser."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from auditdata import class_text_embeddings, make_run

import reports
from reports import render_report
from tasks.flags import ClassText, flag_spurious
from tasks.quality import validate_shard, write_quality_report
from tasks.store import build_duckdb, query

CHROMIUM = Path("/usr/bin/chromium")
HOSTILE = "<script>alert(1)</script>"
HOSTILE_PHRASE = '"><img src=x onerror=alert(2)>'


class Tags(HTMLParser):
    """Every start tag with its attributes, and the text of each element id'd section."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def parse(html: str) -> list[tuple[str, dict[str, str | None]]]:
    p = Tags()
    p.feed(html)
    return p.tags


def audited(root: Path, *, quality: bool = False, **kwargs) -> Path:
    run_dir = make_run(root, **kwargs)
    build_duckdb(run_dir)
    names = {**(kwargs.get("label_text") or {})}
    emb = {names.get(k, k): v for k, v in class_text_embeddings().items()}
    flag_spurious(run_dir, ClassText(emb))
    if quality:  # GX costs seconds: only where the data-quality section is checked
        for shard in sorted((run_dir / "explanations").glob("*.parquet")):
            write_quality_report(run_dir, shard, validate_shard(shard))
    return run_dir


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report")
    run_dir = audited(root, quality=True)
    # the data check known for dog's flag (visible in its probe images), unknown for cat's
    stats = query(run_dir, "SELECT DISTINCT class_name, class_index, phrase FROM concept_stats")
    dog_snow = (stats["class_name"] == "dog") & (stats["phrase"] == "snow")
    seen = stats.drop(columns="class_name").assign(
        n_probe_class=50, data_lift=1.5, data_z=np.where(dog_snow, 9.0, np.nan), data_threshold=3.0
    )
    seen.loc[stats["class_name"] == "cat", "n_probe_class"] = 4
    flag_spurious(run_dir, ClassText(class_text_embeddings()), seen)
    # the flow's layout for a failed shard: quality/<shard>.json and quarantine/<shard>.validation.json
    failed = json.dumps(
        {"ok": False, "failures": ["prob: expect_column_values_to_be_between failed"], "report": {}}
    )
    (run_dir / "quarantine").mkdir()
    (run_dir / "quarantine" / "shard-00007.validation.json").write_text(failed)
    (run_dir / "quality" / "shard-00007.json").write_text(failed)
    return render_report(run_dir)


def test_report_has_every_section_and_the_flags(report: Path) -> None:
    html = report.read_text()
    tags = parse(html)
    ids = {a.get("id") for _, a in tags}
    assert {"summary", "flags", "plots", "concepts", "all-classes", "quality", "errors", "files"} <= ids
    cards = [a for t, a in tags if t == "article"]
    assert [c["data-class"] for c in cards] == ["cat", "dog"]  # stripes (z 8.8) before snow (z 5.2)
    assert "“snow”" in html and "“stripes”" in html
    # 3 evidence thumbnails per card (alt = the image path), all embedded
    flag_imgs = [a for t, a in tags if t == "img" and a.get("alt", "").endswith(".png")]
    assert len(flag_imgs) == 6
    # data quality: the passing shards summarised (collapsed), the failing one in the table, once
    quality = html[html.index('id="quality"') : html.index('id="errors"')]
    assert quality.count("shard-00007") == 1 and quality.count(">quarantined<") == 1
    assert "2 shards passed (240 rows)" in " ".join(quality.split())
    assert "shard-00000, shard-00001" in quality
    assert "cannot identify image file" in html  # errors table
    cards_html = html[html.index('id="flags"') : html.index('id="plots"')]
    assert "in the probe images: data z 9.00" in " ".join(cards_html.split())
    assert "(threshold 3.00, 50 images predicted as the class)" in " ".join(cards_html.split())
    assert "in the probe images: not checked" in " ".join(cards_html.split())  # cat: 4 probe images


def _scripts(html: str) -> list[str]:
    return re.findall(r"<script>(.*?)</script>", html, flags=re.S)


def test_report_is_self_contained(report: Path) -> None:
    html = report.read_text()
    tags = parse(html)
    srcs = [a["src"] for _, a in tags if "src" in a]
    assert srcs and all(
        s.startswith(("data:image/png;base64,", "data:image/jpeg;base64,", "data:image/svg+xml;base64,"))
        for s in srcs
    )
    hrefs = [a["href"] for t, a in tags if t == "a"]
    assert all(h.startswith("#") or ("://" not in h and not h.startswith("/")) for h in hrefs)
    assert "explanations/" in hrefs and "run.duckdb" in hrefs  # two shards: one line for the folder
    assert not [t for t, _ in tags if t in ("link", "iframe", "object", "embed")]
    csp = [a for t, a in tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert csp and "default-src 'none'" in csp[0]["content"]
    # One executable script, the report's own, admitted by its hash; the other is a JSON data block.
    scripts = [a for t, a in tags if t == "script"]
    assert len(scripts) == 2 and scripts[0] == {"type": "application/json", "id": "class-data"}
    (code,) = _scripts(html)
    assert code == (Path(reports.__file__).parent / "static" / "class_index.js").read_text()
    digest = base64.b64encode(hashlib.sha256(code.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in csp[0]["content"]


def test_hostile_labels_phrases_and_paths_are_escaped(tmp_path: Path) -> None:
    run_dir = audited(
        tmp_path, label_text={"cat": HOSTILE}, phrase_text={"snow": HOSTILE_PHRASE}, name_suffix=HOSTILE
    )
    html = render_report(run_dir).read_text()
    tags = parse(html)
    assert len([t for t, _ in tags if t == "script"]) == 2  # the class data and the report's own code
    assert _scripts(html) == [(Path(reports.__file__).parent / "static" / "class_index.js").read_text()]
    data = json.loads(re.search(r'id="class-data">(.*?)</script>', html, flags=re.S).group(1))
    assert HOSTILE in {c["name"] for c in data["classes"]}  # intact as data, escaped as text
    assert not [(t, k) for t, a in tags for k in a if k.startswith("on")]  # no event-handler attributes
    assert all(a["src"].startswith("data:") for t, a in tags if t == "img")
    assert HOSTILE not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert HOSTILE_PHRASE not in html and "&#34;&gt;&lt;img src=x onerror=alert(2)&gt;" in html
    cards = [a["data-class"] for t, a in tags if t == "article"]
    assert HOSTILE in cards  # the parser un-escapes the attribute: the label survived intact, as text
    # the hostile file names were still resolved inside the root and embedded
    assert sum(1 for t, a in tags if t == "img" and HOSTILE in a.get("alt", "")) >= 3


def test_images_outside_the_dataset_root_are_not_embedded(tmp_path: Path) -> None:
    run_dir = audited(tmp_path)
    data = tmp_path / "data"
    secret = tmp_path / "secret.png"
    shutil.copy(next(data.glob("cat/*.png")), secret)
    top = query(run_dir, "SELECT example_image_ids AS ids FROM flags WHERE phrase = 'snow'")["ids"][0]
    # 1: a symlink inside the root pointing out of it; 2: a ../ path; 3: an absolute path elsewhere
    link = data / "dog" / f"{top[0]}.png"
    link.unlink()
    link.symlink_to(secret)
    paths = {top[1]: "../secret.png", top[2]: str(secret)}
    for shard in (run_dir / "explanations").glob("*.parquet"):
        t = pq.read_table(shard)
        new = [paths.get(i, p) for i, p in zip(t["image_id"].to_pylist(), t["path"].to_pylist(), strict=True)]
        t = t.set_column(t.schema.get_field_index("path"), t.schema.field("path"), pa.array(new, pa.string()))
        pq.write_table(t, shard)
    build_duckdb(run_dir)
    assert pc.sum(pc.equal(pq.read_table(run_dir / "explanations")["path"], "../secret.png")).as_py() == 2
    html = render_report(run_dir).read_text()
    assert html.count("outside the dataset root: not embedded") == 3
    tags = parse(html)
    assert not [a for t, a in tags if t == "img" and "secret" in a.get("alt", "")]


def test_no_dataset_root_means_no_images(tmp_path: Path) -> None:
    run_dir = audited(tmp_path)
    (run_dir / "summary.json").write_text("{}")
    (run_dir / "config.yaml").write_text("model: toy\n")
    html = render_report(run_dir).read_text()
    assert "no dataset root known: image not embedded" in html
    assert 'id="seen-in-training"' not in html
    (run_dir / "config.yaml").write_text("model: toy\nflags:\n  probe_seen_in_training: true\n")
    assert 'id="seen-in-training"' in render_report(run_dir).read_text()  # says why an effect is small


@pytest.mark.browser
def test_report_renders_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    if not CHROMIUM.is_file():
        pytest.skip("/usr/bin/chromium is missing (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    problems: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM),
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on(
                "console",
                lambda m: problems.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None,
            )
            page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
            page.on(
                "request",
                lambda r: (
                    problems.append(f"request: {r.url}")
                    if not r.url.startswith(("file://", "data:"))
                    else None
                ),
            )
            page.goto(report.as_uri(), wait_until="load")
            assert page.locator("#flags article.card").count() == 2
            widths = page.eval_on_selector_all(
                "#flags img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : -1)"
            )
            assert len(widths) == 18 and min(widths) > 0
            plots = page.eval_on_selector_all("#plots img", "imgs => imgs.map(i => i.naturalWidth)")
            assert len(plots) == 2 and min(plots) > 100
            # the class index: every class listed, search filters, a click shows the class's phrases
            assert page.locator("#class-index-body tr").count() == 3
            page.fill("#class-search", "do")
            assert page.locator("#class-index-body tr").count() == 1
            page.click("#class-index-body button")
            assert "dog" in page.inner_text("#class-detail h3")
            assert page.locator("#class-detail tr").count() > 3
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    if os.environ.get("TEXTCAM_SCREENSHOT_DIR"):
        out = Path(os.environ["TEXTCAM_SCREENSHOT_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, out / "report.png")
    assert problems == []


def test_model_evidence_and_near_misses_are_shown(tmp_path: Path) -> None:
    from tasks.behaviour import ProbeBehaviour

    run_dir = make_run(tmp_path, write_images=False)
    build_duckdb(run_dir)
    phrases = query(run_dir, "SELECT DISTINCT phrase FROM concept_stats ORDER BY 1")["phrase"].tolist()
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 900)
    presence = rng.random((900, len(phrases))) < 0.5
    pred = np.where(rng.random(900) < 0.9, labels, rng.integers(0, 3, 900))
    pred[presence[:, phrases.index("snow")]] = 2  # the model takes anything with snow for a dog
    behaviour = ProbeBehaviour(presence, phrases, pred, labels, np.zeros(len(phrases)))
    flags = flag_spurious(run_dir, ClassText(class_text_embeddings()), behaviour=behaviour)
    assert flags.iloc[0]["phrase"] == "snow"
    text = " ".join(render_report(run_dir).read_text().split())
    assert "model z <b>" in text and "effect <b>" in text
    near = text[text.index('id="near-misses"') :]
    assert "names a class of the task" in near  # "floppy ears" for dog: its own vocabulary
    assert ">flagged<" in near and "model evidence under the permutation null" in near
