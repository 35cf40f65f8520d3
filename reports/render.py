"""The audit report: one self-contained HTML file per run (Jinja2, autoescaped, no network resources).

Everything is embedded: thumbnails and saliency / group overlays as base64 data URIs, plots as base64 SVG
(:mod:`reports.charts`), CSS inline. A Content-Security-Policy meta tag forbids scripts and any non-``data:``
resource, so even a string that escaped escaping could not run. Images are read only from inside the
dataset root: paths that resolve outside it (``..``, absolute paths elsewhere, symlinks pointing out) are
not embedded, and the card says so.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import duckdb
import jinja2
import markupsafe
import numpy as np
import pandas as pd
import yaml
from PIL import Image, UnidentifiedImageError

from reports import charts
from tasks.rundir import RunDir
from tasks.store import build_duckdb, connect
from textcam.io import write_text
from textcam.overlay import overlay

log = logging.getLogger(__name__)

_HERE = Path(__file__).parent
THUMB = 112  # px, longest side of embedded thumbnails (JPEG: a few kB each)
MAX_FLAGS = 40  # flag cards in the report (the strongest first); flags.parquet has them all
EVIDENCE_PER_FLAG = 3
CONCEPTS_PER_CLASS = 8
MAX_CLASSES = 40  # classes in tables and plots: flagged classes first, then the largest


@dataclass(frozen=True)
class _Picture:
    uri: str | None  # data URI, or None when not embedded
    note: str  # alt text / why it is missing


def render_report(
    run_dir: str | Path, *, dataset_root: str | Path | None = None, title: str | None = None
) -> Path:
    """Render ``RUN_DIR/report.html`` from the run's DuckDB (built if missing) and return its path.

    ``dataset_root`` bounds where images may be read from; default: ``summary.json``'s ``dataset_root``, else
    the config's ``dataset_root``, else its ``data`` (a folder, or a manifest file's folder). Without one, no
    image is embedded.

    >>> render_report("runs/r1", dataset_root="data/pets")  # doctest: +SKIP
    PosixPath('runs/r1/report.html')
    """
    run_dir = Path(run_dir).resolve()
    run = RunDir(run_dir)
    if not run.database.is_file():
        build_duckdb(run_dir)
    summary = _read_json(run.summary)
    config = _read_yaml(run.config)
    root = _dataset_root(dataset_root, summary, config)

    con = connect(run_dir)
    try:
        context = _gather(con, run_dir, root, summary, config)
    finally:
        con.close()
    context["title"] = title or f"TextCAM audit {context['run_id']}"

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(_HERE / "templates"),
        autoescape=True,  # every value is escaped unless explicitly marked safe (nothing is)
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = _num
    env.filters["pct"] = _pct
    script = (_HERE / "static" / "class_index.js").read_text()
    html = env.get_template("report.html.j2").render(
        css=(_HERE / "static" / "report.css").read_text(),
        script=markupsafe.Markup(script),  # our own file; the CSP admits exactly this text by its hash
        script_hash="sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode(),
        **context,
    )
    out = run.report
    write_text(out, html)
    return out


# -- inputs -----------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _dataset_root(explicit: str | Path | None, summary: dict, config: dict) -> Path | None:
    candidates: list[Any] = [explicit, summary.get("dataset_root"), config.get("dataset_root")]
    data = config.get("data")
    if isinstance(data, str) and data:
        p = Path(data).expanduser()
        candidates.append(p if p.is_dir() or not p.suffix else p.parent)
    for c in candidates:
        if c:
            p = Path(c).expanduser()
            if p.is_dir():
                return p.resolve()
            log.warning("dataset root %s is not a folder; images will not be embedded from it", p)
    return None


def _inside(root: Path | None, path: str) -> tuple[Path | None, str]:
    """The real file for ``path`` if it lies inside ``root`` (symlinks resolved), else (None, why)."""
    if root is None:
        return None, "no dataset root known: image not embedded"
    p = Path(path)
    candidate = p if p.is_absolute() else root / p
    try:
        real = candidate.resolve(strict=True)
    except (OSError, RuntimeError):
        return None, "image file not found"
    if not real.is_relative_to(root) or not real.is_file():
        return None, "outside the dataset root: not embedded"
    return real, ""


# -- pictures ---------------------------------------------------------------------------------------


def _png_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _jpeg_uri(img: Image.Image) -> str:
    """Thumbnails and overlays: photographs, so JPEG (a tenth of the PNG's size at this quality)."""
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=80, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _overlay(base: Image.Image, grid: np.ndarray, alpha: float = 0.55) -> Image.Image:
    """A low-resolution map over ``base``, scaled to its own range, in TextCAM's one colormap."""
    lo, hi = float(np.nanmin(grid)), float(np.nanmax(grid))
    norm = (grid - lo) / (hi - lo) if hi > lo else np.zeros_like(grid)
    return overlay(base, norm, alpha=alpha)


def _grid(values: Any, h: int, w: int) -> np.ndarray | None:
    arr = np.asarray(values if values is not None else [], dtype=np.float32)
    return arr.reshape(h, w) if h > 0 and w > 0 and arr.size == h * w else None


NEAR_MISS_ROWS = 400  # a 4,000-row table alone took 2 s to lay out in Chromium (1000 classes)


def _near_misses(con: duckdb.DuckDBPyConnection, per_class: int = 4) -> tuple[list[dict[str, Any]], int]:
    """Each class's strongest "for" candidates from ``flag_candidates`` (flagged ones included), for the
    report's table: classes with a flag first, then by their strongest candidate, at most
    :data:`NEAR_MISS_ROWS` rows; with the number of rows there are. An old run database without the table
    gives none."""
    try:
        frame = con.sql(
            f"""
            WITH top AS (
                SELECT *, max(flagged::INTEGER) OVER (PARTITION BY class_name) AS _has_flag,
                       max(z_lift) OVER (PARTITION BY class_name) AS _best
                FROM flag_candidates WHERE direction = 'for'
                QUALIFY row_number() OVER (
                    PARTITION BY class_name ORDER BY flagged DESC, z_lift DESC NULLS LAST) <= {int(per_class)}
            )
            SELECT * EXCLUDE (_has_flag, _best), count(*) OVER () AS _total FROM top
            ORDER BY _has_flag DESC, _best DESC NULLS LAST, class_name, flagged DESC, z_lift DESC NULLS LAST
            LIMIT {NEAR_MISS_ROWS}
            """
        ).df()
    except duckdb.CatalogException:
        return [], 0
    total = int(frame["_total"].iloc[0]) if len(frame) else 0
    return frame.drop(columns="_total").to_dict(orient="records"), total


def _interventions(con: duckdb.DuckDBPyConnection, run_dir: Path) -> list[dict[str, Any]]:
    """``textcam intervene``'s rows (none when the run has no table), with the edited model's link
    relative to the report when it lies in the run directory."""
    try:
        frame = con.sql("SELECT * FROM interventions ORDER BY class_name, phrase").df()
    except duckdb.CatalogException:
        return []
    rows = frame.to_dict(orient="records")
    for r in rows:
        path = Path(r["checkpoint"])
        r["href"] = quote(path.relative_to(run_dir).as_posix()) if path.is_relative_to(run_dir) else None
    return rows


def _evidence(row: pd.Series, phrase: str, root: Path | None) -> dict[str, Any]:
    """Thumbnail, saliency overlay and the phrase's channel-group overlay of one evidence image."""
    real, why = _inside(root, str(row["path"]))
    base = None
    if real is not None:
        try:
            with Image.open(real) as im:
                im.draft("RGB", (THUMB * 2, THUMB * 2))  # JPEG: decode at reduced size
                base = im.convert("RGB")
            base.thumbnail((THUMB, THUMB))
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
            log.warning("cannot read %s for the report: %s", real, exc)
            why = f"unreadable image ({type(exc).__name__})"
    h, w = int(row["map_h"]), int(row["map_w"])
    sal = _grid(row["saliency"], h, w)
    groups = list(row["groups"]) if row["groups"] is not None else []
    group = next((g for g in groups if g["text"] == phrase), groups[0] if groups else None)
    gmap = _grid(group["map"], h, w) if group is not None else None
    canvas = base if base is not None else Image.new("RGB", (THUMB, THUMB), (40, 40, 40))
    pictures = {
        "image": _Picture(_jpeg_uri(base), str(row["path"])) if base is not None else _Picture(None, why),
        "saliency": _Picture(_jpeg_uri(_overlay(canvas, sal)), "saliency")
        if sal is not None
        else _Picture(None, "no saliency map"),
        "group": _Picture(_jpeg_uri(_overlay(canvas, gmap)), f"group: {group['text']}")
        if gmap is not None
        else _Picture(None, "no group map"),
    }
    return {
        "image_id": row["image_id"],
        "path": row["path"],
        "label": row["label"],
        "pred": row["class_name"],
        "prob": row["prob"],
        "misclassified": bool(row["misclassified"]),
        "group_text": group["text"] if group is not None else None,
        **pictures,
    }


# -- plots ------------------------------------------------------------------------------------------


def _plots(
    tops: pd.DataFrame, heat: pd.DataFrame, flags: pd.DataFrame, classes: list[str]
) -> list[dict[str, str]]:
    """Concept frequency heatmap (classes × phrases, ``heat``) and per-class z_lift bars against the
    threshold (``tops``: each class's top phrases)."""
    plots: list[dict[str, str]] = []
    if tops.empty:
        return plots
    freq = heat.pivot_table(index="class_name", columns="phrase", values="frequency", fill_value=0.0)
    if not freq.empty:
        top = freq.var(axis=0).sort_values(ascending=False).index
        freq = freq.loc[[c for c in classes if c in freq.index], top]
        uri = charts.heatmap(
            freq.to_numpy(),
            [str(c) for c in freq.index],
            [str(t) for t in top],
            title="Concept frequency per predicted class (evidence for)",
            legend="share of the class's images",
        )
        plots.append(
            {
                "title": "Concept frequency per class",
                "uri": uri,
                "alt": "heatmap of phrase frequency per class",
            }
        )
    lift_classes = (flags["class_name"].drop_duplicates().tolist() if not flags.empty else classes)[:6]
    if lift_classes:
        panels = []
        for cname in lift_classes:
            rows = tops[(tops["class_name"] == cname) & tops["z_lift"].notna()]
            rows = rows.sort_values("z_lift", ascending=False).head(8)
            thr = flags.loc[flags["class_name"] == cname, "threshold"]
            panels.append(
                charts.BarPanel(
                    title=str(cname),
                    labels=[f"{p} ({d})" for p, d in zip(rows["phrase"], rows["direction"], strict=True)],
                    values=rows["z_lift"].astype(float).tolist(),
                    against=(rows["direction"] == "against").tolist(),
                    threshold=float(thr.iloc[0]) if len(thr) else None,
                )
            )
        plots.append(
            {
                "title": "Standardised lift of the top phrases",
                "uri": charts.bars(panels, "z_lift (dashed: null 99th pct.)"),
                "alt": "bar charts of z_lift per class",
            }
        )
    return plots


# -- assembling -------------------------------------------------------------------------------------


def _top_phrases(con: Any, per_class: int) -> pd.DataFrame:
    """Each class × direction's ``per_class`` phrases by z_lift, with whether they are flagged: the
    rows the report shows, selected in SQL (never the whole concept_stats table)."""
    return con.sql(
        f"""
        SELECT s.class_name, s.phrase, s.direction, s.n_class, s.frequency, s.frequency_other,
               s.mean_score, s.lift, s.z_lift, f.phrase IS NOT NULL AS flagged
        FROM concept_stats s
        LEFT JOIN (SELECT DISTINCT class_name, phrase, direction FROM flags) f
               USING (class_name, phrase, direction)
        QUALIFY row_number() OVER (
            PARTITION BY s.class_name, s.direction ORDER BY s.z_lift DESC NULLS LAST, s.phrase
        ) <= {int(per_class)}
        ORDER BY s.class_name, s.direction, s.z_lift DESC NULLS LAST, s.phrase
        """
    ).df()


def _heatmap_frequencies(con: Any, classes: list[str], n_phrases: int = 25) -> pd.DataFrame:
    """Class × phrase frequencies ("for") of ``classes`` for the ``n_phrases`` phrases whose frequency
    varies most across them (the heatmap)."""
    con.register("_classes", pd.DataFrame({"class_name": classes}))
    try:
        return con.sql(
            f"""
            WITH sub AS (
                SELECT class_name, phrase, frequency FROM concept_stats JOIN _classes USING (class_name)
                WHERE direction = 'for'
            ),
            top AS (
                SELECT phrase FROM sub GROUP BY phrase
                ORDER BY var_samp(frequency) DESC NULLS LAST, phrase LIMIT {int(n_phrases)}
            )
            SELECT class_name, phrase, frequency FROM sub JOIN top USING (phrase)
            """
        ).df()
    finally:
        con.unregister("_classes")


def _class_index(tops: pd.DataFrame, sizes: pd.DataFrame, flags: pd.DataFrame) -> markupsafe.Markup:
    """Every class for the report's searchable index, as JSON safe inside a <script> data block."""
    n_flags = flags.groupby("class_name").size().to_dict() if not flags.empty else {}
    columns = ["phrase", "direction", "frequency", "frequency_other", "lift", "z_lift", "flagged"]
    # One pass over the rows (a pandas selection per class took 6 s at 892 classes).
    values = tops[columns].astype(object).where(tops[columns].notna(), None).values.tolist()
    rows_of: dict[str, list[list[Any]]] = {}
    for name, row in zip(tops["class_name"], values, strict=True):
        rows_of.setdefault(name, []).append(row)
    first = tops.drop_duplicates(["class_name", "direction"]).set_index(["class_name", "direction"])["phrase"]
    first_of = first.to_dict()
    classes = [
        {
            "name": str(name),
            "n": int(n),
            "flags": int(n_flags.get(name, 0)),
            "top_for": first_of.get((name, "for")),
            "top_against": first_of.get((name, "against")),
            "tops": rows_of.get(name, []),
        }
        for name, n in zip(sizes["class_name"], sizes["n"], strict=True)  # presentation: one per class
    ]
    classes.sort(key=lambda c: (-c["flags"], -c["n"], c["name"]))  # flagged classes first
    payload = {"columns": {c: i for i, c in enumerate(columns)}, "classes": classes}
    text = json.dumps(payload, default=float, allow_nan=False)
    # JSON inside HTML: no "<", ">" or "&" can end the block or start markup.
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return markupsafe.Markup(text)


def _gather(con: Any, run_dir: Path, root: Path | None, summary: dict, config: dict) -> dict[str, Any]:
    tops = _top_phrases(con, CONCEPTS_PER_CLASS)
    flags = con.sql("SELECT * FROM flags ORDER BY z_lift - threshold DESC, class_name, phrase").df()
    run_id = (
        summary.get("run_id")
        or con.sql("SELECT coalesce(min(run_id), '') AS r FROM explanations").df()["r"][0]
    )
    errors = con.sql(
        "SELECT stage, reason, count(*) AS n FROM errors GROUP BY ALL ORDER BY n DESC, stage, reason LIMIT 25"
    ).df()
    class_sizes = con.sql(
        "SELECT class_name, count(*) AS n FROM predictions GROUP BY 1 ORDER BY n DESC, 1"
    ).df()
    flagged = flags["class_name"].drop_duplicates().tolist()
    classes = list(dict.fromkeys(flagged + class_sizes["class_name"].tolist()))[:MAX_CLASSES]
    near_misses, n_near_misses = _near_misses(con)
    quality = _quality(run_dir)
    return {
        "run_id": run_id,
        "summary_items": _flatten(summary),
        "config_items": _flatten(config),
        "probe_seen_in_training": bool((config.get("flags") or {}).get("probe_seen_in_training")),
        "counts": _counts(con),
        "dataset_root": str(root) if root else None,
        "flags": _flag_cards(con, flags.head(MAX_FLAGS), root),
        "near_misses": near_misses,
        "n_near_misses": n_near_misses,
        "interventions": _interventions(con, run_dir),
        "n_flags": len(flags),
        "plots": _plots(tops, _heatmap_frequencies(con, classes), flags, classes),
        "concept_tables": _concept_tables(tops, classes),
        "n_classes": len(class_sizes),
        "class_index": _class_index(tops, class_sizes, flags),
        "quality": [q for q in quality if not q["ok"]],
        "quality_passed": [q["shard"] for q in quality if q["ok"]],
        "quality_rows": sum(q["rows"] or 0 for q in quality if q["ok"]),
        "errors": errors.to_dict("records"),
        "links": _links(run_dir),
    }


def _counts(con: Any) -> dict[str, Any]:
    return (
        con.sql(
            """
        SELECT (SELECT count(*) FROM images) AS images,
               (SELECT count(*) FROM predictions) AS explained_images,
               (SELECT count(*) FROM explanations) AS explanation_rows,
               (SELECT count(*) FROM errors) AS errors,
               (SELECT count(*) FROM predictions WHERE misclassified) AS misclassified,
               (SELECT count(DISTINCT class_name) FROM predictions) AS classes
        """
        )
        .df()
        .iloc[0]
        .to_dict()
    )


def _flag_cards(con: Any, shown: pd.DataFrame, root: Path | None) -> list[dict[str, Any]]:
    """One card per shown flag, with its example images' evidence."""
    ids = sorted({i for v in shown["example_image_ids"] for i in list(v)[:EVIDENCE_PER_FLAG]})
    evidence_rows = pd.DataFrame()
    if ids:
        con.register("_ids", pd.DataFrame({"image_id": ids}))
        evidence_rows = (
            con.sql("SELECT p.* FROM predictions p JOIN _ids USING (image_id)")
            .df()
            .set_index("image_id", drop=False)
        )
        con.unregister("_ids")
    cards = []
    for _, f in shown.iterrows():  # at most MAX_FLAGS cards: presentation, not aggregation
        ev = [
            _evidence(evidence_rows.loc[i], f["phrase"], root)
            for i in list(f["example_image_ids"])[:EVIDENCE_PER_FLAG]
            if i in evidence_rows.index
        ]
        cards.append({**{k: f[k] for k in f.index if k != "example_image_ids"}, "evidence": ev})
    return cards


def _concept_tables(tops: pd.DataFrame, classes: list[str]) -> list[dict[str, Any]]:
    by_class = {c: g for c, g in tops.groupby("class_name", sort=False)}
    tables = []
    for cname in classes:
        rows = by_class.get(cname, tops.iloc[:0])
        tops_by_dir = {d: rows[rows["direction"] == d].to_dict("records") for d in ("for", "against")}
        n = int(rows["n_class"].iloc[0]) if len(rows) else 0
        tables.append({"class_name": cname, "n": n, "tops": tops_by_dir})
    return tables


def _flatten(d: dict, prefix: str = "", depth: int = 0) -> list[tuple[str, str]]:
    """Nested dict -> (dotted key, short value) pairs for a key/value table."""
    out: list[tuple[str, str]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and depth < 1:
            out += _flatten(v, f"{key}.", depth + 1)
        else:
            text = v if isinstance(v, str) else json.dumps(v, default=str)
            out.append((key, text if len(text) <= 160 else text[:157] + "..."))
    return out


def _quality(run_dir: Path) -> list[dict[str, Any]]:
    """One row per shard report in quality/ and quarantine/ (written by tasks.quality / the flow)."""
    rows = []
    for folder in ("quality", "quarantine"):
        for path in sorted(RunDir(run_dir).folder(folder).glob("*.json")):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                log.warning("unreadable quality report %s: %s", path, exc)
                rows.append(
                    {
                        "shard": path.name.split(".")[0],
                        "where": folder,
                        "ok": False,
                        "rows": None,
                        "failures": [f"unreadable report: {exc}"],
                    }
                )
                continue
            report = data.get("report", {}) if isinstance(data, dict) else {}
            rows.append(
                {
                    "shard": path.name.split(".")[0],
                    "where": folder,
                    "ok": bool(data.get("ok", False)),
                    "rows": report.get("rows"),
                    "failures": [str(x) for x in data.get("failures", [])][:12],
                }
            )
    # A quarantined shard may have a report in both places: keep the quarantine one.
    seen: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["shard"] not in seen or r["where"] == "quarantine":
            seen[r["shard"]] = r
    return [seen[k] for k in sorted(seen)]


def _links(run_dir: Path) -> list[dict[str, str]]:
    """Relative links to the run's data files (clickable next to report.html); shard folders as one
    line each (a million-image run has thousands of shards)."""
    run = RunDir(run_dir)
    files = [
        run.database,
        run.table("flags"),
        run.table("flag_candidates"),
        run.images,
        run.summary,
        run.config,
    ]
    links = [
        {
            "href": quote(p.relative_to(run_dir).as_posix()),
            "text": p.relative_to(run_dir).as_posix(),
            "size": _size(p.stat().st_size),
        }
        for p in files
        if p.is_file()
    ]
    for folder in ("explanations", "errors"):
        shards = run.shard_files(folder)
        if len(shards) == 1:
            links.append(
                {
                    "href": quote(shards[0].relative_to(run_dir).as_posix()),
                    "text": shards[0].relative_to(run_dir).as_posix(),
                    "size": _size(shards[0].stat().st_size),
                }
            )
        elif shards:
            links.append(
                {
                    "href": quote(folder) + "/",
                    "text": f"{folder}/ ({len(shards)} Parquet shards)",
                    "size": _size(sum(p.stat().st_size for p in shards)),
                }
            )
    return links


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _num(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, int | np.integer):
        return str(int(value))
    return f"{float(value):.{digits}f}"


def _pct(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * float(value):.0f}%"
