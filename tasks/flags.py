"""Spurious-correlation candidates: phrases that explain one class far more than the others.

With a probe set (``behaviour``) a flag is decided by what the model does (:mod:`tasks.behaviour`; the
reasoning is in docs/decisions.md) and, with the classifier's training data, by whether the phrase goes
with the class there (:mod:`tasks.training_data`); the rule below is the fallback without a probe, and its
statistics are reported either way.

The statistic (``z_lift``) is defined and computed in SQL by :mod:`tasks.store` (table ``concept_stats``):
the per-image phrase score, as a difference of class means in standard units, standardised within class ×
direction across phrases (median; max of scaled MAD and the permutation standard error). Here we only
decide which z_lifts are surprising:

* **null**: the class assignment is permuted across images ``n_permutations`` times (class sizes kept);
  for each permutation the same z_lift is recomputed (vectorised over the sparse image × phrase scores) and
  its maximum over all phrases and both directions of each class is kept. The class's threshold is the
  ``quantile`` (0.99) of those maxima, so a class gets a false flag with probability about 1 % however many
  phrases it has; ``p_value`` = (1 + #{permutations whose class maximum ≥ z}) / (1 + n_permutations), a
  family-wise adjusted p-value.
* **flag**: ``z_lift > threshold``, ``lift > 0``, at least ``min_images`` images of the class selected the
  phrase, its mean score is at least ``min_relative_score`` (0.5) of the class's main phrase in its
  direction (``concept_stats.relative_score``), and the phrase does not describe a class of the task: its
  CLIP text similarity to every class name and class vocabulary stays below the similarity between the two
  most alike *different* class names (texts compared centred, see :class:`ClassText`), or, where the probe
  says where CLIP sees each class name, the text-close class is not also seen where the phrase is (phi
  below ``min_class_agreement``; :func:`_describes`). Its own class,
  because "whiskers" for cat is the model working as intended; the other classes, because "triangle" as
  evidence against "square" is the classes competing, a confusion the concept tables show, not a cue
  outside the label space. Finally the phrase must be *visible*: among the probe images, those predicted
  as the class show it more ("for"; less, "against") than the others do, beyond the vocabulary-wide
  threshold of :mod:`tasks.cooccurrence` — a spurious correlation lives in the data as well as in the
  model; classes with too few probe images skip this check.

  Why a relative score: every class's explanations hold small filler phrases that the sparse coding
  adds to fit the class's direction; a label permutation cannot tell them from a cue, their size can
  (``docs/decisions.md``, "Why a relative score").
* misclassified-vs-correct frequencies of the phrase within the class are reported as supporting evidence.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from tasks.behaviour import DIRECTIONS, Evidence, ProbeBehaviour, Support, evidence_grid, over_threshold
from tasks.config import FlagRule
from tasks.store import open_writable, store_table
from tasks.training_data import label_correlation
from textcam.schema import FLAG_CANDIDATES, FLAGS

log = logging.getLogger(__name__)


N_CANDIDATES = 5  # near misses kept per class and direction


@dataclass(frozen=True)
class ClassText:
    """CLIP text embeddings the "does this phrase describe the class?" test needs.

    ``embeddings`` maps text -> embedding (any scale; normalised here) and must cover every class name and
    every phrase of ``own_vocabulary``; phrases seen in the run but missing from it cannot be excluded by
    similarity (a warning is logged; exact text matches are still excluded).
    ``own_vocabulary`` maps class name -> phrases describing the class itself (e.g. "stripes" for "zebra").

    ``centre``: compare texts after subtracting the mean embedding of all of them. CLIP text embeddings
    share a large component, whatever they say (the demo's tiny CLIP: cosine 0.60 between "circle" and
    "square", 0.61 between "with a logo" and "triangle"), so raw cosines tell "as alike as two class
    names" from "unrelated" by a hair (0.609 against 0.601); centred, 0.15 against 0.03.
    """

    embeddings: Mapping[str, np.ndarray]
    own_vocabulary: Mapping[str, Sequence[str]] = field(default_factory=dict)
    centre: bool = True

    @functools.cached_property
    def _mean(self) -> np.ndarray:
        if not self.centre or len(self.embeddings) < 2:
            return np.zeros(1)
        m = np.stack([np.asarray(v, dtype=np.float64) for v in self.embeddings.values()])
        return (m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)).mean(0)

    @classmethod
    def from_encoder(
        cls,
        encode: Callable[[list[str]], np.ndarray],
        class_names: Sequence[str],
        phrases: Sequence[str],
        own_vocabulary: Mapping[str, Sequence[str]] | None = None,
    ) -> ClassText:
        """Embed class names, phrases and own vocabularies with ``encode`` (texts -> (n, D) array)."""
        own = dict(own_vocabulary or {})
        texts = sorted({*class_names, *phrases, *(p for v in own.values() for p in v)})
        emb = np.asarray(encode(texts), dtype=np.float64)
        if emb.shape[0] != len(texts):
            raise ValueError(f"encoder returned {emb.shape[0]} embeddings for {len(texts)} texts")
        return cls(embeddings=dict(zip(texts, emb, strict=True)), own_vocabulary=own)

    def _unit(self, texts: Sequence[str]) -> np.ndarray:
        m = np.stack([np.asarray(self.embeddings[t], dtype=np.float64) for t in texts])
        m = m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12) - self._mean
        return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)

    def similarity_threshold(self, class_names: Sequence[str]) -> float:
        """The largest cosine similarity between two different class names (1.0 with fewer than two)."""
        names = [c for c in dict.fromkeys(class_names) if c in self.embeddings]
        if len(names) < 2:
            return 1.0
        u = self._unit(names)
        sim = u @ u.T
        np.fill_diagonal(sim, -np.inf)
        return float(sim.max())

    def class_similarity(self, class_name: str, phrases: Sequence[str]) -> np.ndarray:
        """max cosine similarity of each phrase to the class name and its own vocabulary (NaN: unknown)."""
        return self.class_similarities([class_name], phrases)[0]

    def class_similarities(self, class_names: Sequence[str], phrases: Sequence[str]) -> np.ndarray:
        """(K, P) :meth:`class_similarity` for every class, the phrases normalised once."""
        out = np.full((len(class_names), len(phrases)), np.nan)
        known = [i for i, p in enumerate(phrases) if p in self.embeddings]
        refs = [
            (k, t)
            for k, c in enumerate(class_names)
            for t in dict.fromkeys([c, *self.own_vocabulary.get(c, ())])
            if t in self.embeddings
        ]
        if not refs or not known:
            return out
        sims = self._unit([phrases[i] for i in known]) @ self._unit([t for _, t in refs]).T  # (P', R)
        owner = np.array([k for k, _ in refs])
        starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])  # refs come grouped by class
        out[np.ix_(owner[starts], known)] = np.maximum.reduceat(sims, starts, axis=1).T
        return out


#: Images a class keeps in the null's sample: the null maximum of z_lift depends on the class size while
#: classes are small (sparse phrases, skewed sums), and stops depending on it once they are large
#: (bench/scale.py's null check; docs/decisions.md).
NULL_FLOOR = 1000


def _load_scores(
    con: duckdb.DuckDBPyConnection, max_images: int | None = None
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Images (with class codes), phrase × direction columns, and the sparse score triplets.

    ``max_images``: above it, the images of a class-stratified sample of about that size (each class keeps
    about its share, and about ``min(its size, NULL_FLOOR)`` at least; chosen by a hash of the image id, so
    the same on every run), which keeps the null's memory flat in the number of images."""
    n = con.execute("SELECT count(*) FROM predictions").fetchall()[0][0]
    share = 1.0 if max_images is None or n <= max_images else max_images / n
    # A class keeps an image with probability max(share, floor / its size), decided by a hash of the
    # image id: a streaming filter, no sort over the run's images.
    images = con.sql(
        f"""
        WITH classes AS (
            SELECT class_name, (row_number() OVER (ORDER BY class_name) - 1)::INTEGER AS k,
                   greatest({share!r}, least(1.0, {NULL_FLOOR} / count(*))) AS keep
            FROM predictions GROUP BY class_name
        )
        SELECT p.image_id, p.class_name, c.k, (row_number() OVER (ORDER BY p.image_id) - 1)::INTEGER AS i
        FROM predictions p JOIN classes c USING (class_name)
        WHERE c.keep >= 1.0 OR hash(p.image_id) % 1000003 < c.keep * 1000003
        ORDER BY i
        """
    ).df()
    cols = con.sql(
        """
        SELECT phrase, direction, (row_number() OVER (ORDER BY direction, phrase) - 1)::INTEGER AS q
        FROM (SELECT DISTINCT phrase, direction FROM image_phrases) ORDER BY q
        """
    ).df()
    con.register("_images", images)
    con.register("_cols", cols)
    try:
        triplets = con.sql(
            """
            SELECT im.i, c.q, ip.score
            FROM image_phrases ip
            JOIN _images im USING (image_id)
            JOIN _cols c USING (phrase, direction)
            ORDER BY im.i, c.q  -- sums over the triplets must not depend on the join's output order
            """
        ).df()
    finally:
        con.unregister("_images")
        con.unregister("_cols")
    return images, cols, triplets


def z_lift_matrix(
    sums: np.ndarray, n_class: np.ndarray, total: np.ndarray, sd_all: np.ndarray, direction_groups: np.ndarray
) -> np.ndarray:
    """The SQL z_lift in numpy, batched: ``sums`` (B, K, Q) class sums of scores -> (B, K, Q) z (NaN: none).

    ``n_class`` (K,) class sizes, ``total`` (Q,) score sums, ``sd_all`` (Q,) population sd over all images,
    ``direction_groups`` (Q,) int labels: z is standardised within class × group by the median and
    max(scaled MAD, permutation standard error), exactly as ``concept_stats.z_lift``. Computed in the
    dtype of ``sums``.
    """
    order, bounds = _column_blocks(sd_all, direction_groups)
    z = np.full(sums.shape, np.nan, dtype=sums.dtype)
    z[..., order] = _z_blocks(sums[..., order], n_class, total[order], sd_all[order], bounds)
    return z


def _column_blocks(sd_all: np.ndarray, direction_groups: np.ndarray) -> tuple[np.ndarray, list[slice]]:
    """The columns that get a z, grouped so each direction group is one contiguous block: a lift is NaN
    only where its phrase has no spread at all (the same column in every class and permutation), and a
    group needs three columns for a median and MAD."""
    blocks = [np.flatnonzero((direction_groups == g) & (sd_all > 1e-12)) for g in np.unique(direction_groups)]
    blocks = [b for b in blocks if b.size >= 3]
    order = np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.int64)
    ends = np.cumsum([b.size for b in blocks])
    return order, [slice(e - b.size, e) for e, b in zip(ends, blocks, strict=True)]


def _z_blocks(
    sums: np.ndarray, n_class: np.ndarray, total: np.ndarray, sd_all: np.ndarray, bounds: list[slice]
) -> np.ndarray:
    """z for columns already ordered in :func:`_column_blocks`' blocks, in place over one array."""
    dtype = sums.dtype
    n = n_class.sum()
    n_c = n_class[None, :, None].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):  # a single class (no "other" images): NaN
        in_class = (1 / n_c + 1 / (n - n_c)).astype(dtype)
        elsewhere = (1 / (n - n_c)).astype(dtype)
        se = np.sqrt(n / (n - 1) * (1 / n_c + 1 / (n - n_c))).astype(dtype)  # a lift's permutation SE
        # lift = (mean in class - mean elsewhere) / sd
        z = sums * in_class
        z -= total.astype(dtype) * elsewhere
        z *= (1 / sd_all).astype(dtype)
        for block in bounds:
            x = z[..., block]  # a view: standardised in place
            med = _median(x)
            scale = np.maximum(1.4826 * _median(np.abs(x - med)), se)
            x -= med
            x /= np.where(scale > 1e-12, scale, np.nan)
    return z


def _median(x: np.ndarray) -> np.ndarray:
    """Median over the last axis (kept as length 1), bit-identical to ``np.median`` without its NaN scan:
    the callers drop the columns that can be NaN."""
    m = x.shape[-1]
    hi = m // 2
    part = np.partition(x, hi, axis=-1)
    upper = part[..., hi : hi + 1]
    # the lower middle of an even count is the largest value left of the upper one
    lower = upper if m % 2 else part[..., :hi].max(axis=-1, keepdims=True)
    return (lower + upper) * 0.5


def permutation_null(
    class_codes: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    scores: np.ndarray,
    n_cols: int,
    direction_groups: np.ndarray,
    *,
    n_permutations: int = 200,
    seed: int = 0,
    max_cells: int = 1 << 22,
) -> np.ndarray:
    """Per-class maxima of z_lift over phrases under permuted class labels: (n_permutations, K).

    The scores are sparse triplets (image ``rows``, phrase ``cols``, ``scores``); each permutation's class
    sums are one ``bincount`` over the triplets, a chunk of permutations at a time. A chunk holds at most
    ``max_cells`` class × phrase cells and ``max_cells`` triplet copies (at least one permutation), so
    memory stays a few times ``max_cells`` numbers at 10 classes or 1000, 10k images or 1M.
    """
    cells = (int(class_codes.max()) + 1 if class_codes.size else 1) * n_cols
    # Each permutation in a chunk costs K×Q sums and a copy of the triplets' indices: bound both.
    chunk = max(1, min(max_cells // max(1, cells), max_cells // max(1, rows.shape[0])))
    n_images = class_codes.shape[0]
    k = int(class_codes.max()) + 1 if n_images else 0
    n_class = np.bincount(class_codes, minlength=k)
    total = np.bincount(cols, weights=scores, minlength=n_cols)
    total2 = np.bincount(cols, weights=scores * scores, minlength=n_cols)
    sd_all = np.sqrt(np.maximum(total2 / n_images - (total / n_images) ** 2, 0.0))
    rng = np.random.default_rng(seed)
    out = np.full((n_permutations, k), np.nan)
    # Sums only for the columns that get a z, laid out in their direction blocks.
    order, bounds = _column_blocks(sd_all, direction_groups)
    if order.size == 0:
        return out
    position = np.full(n_cols, -1)
    position[order] = np.arange(order.size)
    kept = position[cols] >= 0
    rows, q, n_q = rows[kept], position[cols[kept]], order.size
    # float32 sums and z: the null's maxima need no more, and it halves the memory traffic.
    weights = torch.from_numpy(scores[kept].astype(np.float32))
    total_q, sd_q = total[order], sd_all[order]
    for start in range(0, n_permutations, chunk):  # loop over permutation chunks, not rows
        b = min(chunk, n_permutations - start)
        perm = np.stack([rng.permutation(class_codes) for _ in range(b)])  # (b, N)
        flat = ((np.arange(b)[:, None] * k + perm[:, rows]) * n_q + q[None, :]).ravel()
        sums = torch.zeros(b * k * n_q, dtype=torch.float32)
        sums.index_add_(0, torch.from_numpy(flat), weights.repeat(b))
        z = _z_blocks(sums.numpy().reshape(b, k, n_q), n_class, total_q, sd_q, bounds)
        out[start : start + b] = np.fmax.reduce(z, axis=-1)  # NaN only where the whole row is
    return out


def flag_spurious(
    run_dir: str | Path,
    class_text: ClassText | None = None,
    cooccurrence: pd.DataFrame | None = None,
    *,
    behaviour: ProbeBehaviour | None = None,
    rule: FlagRule | None = None,
    correlation: np.ndarray | None = None,
    **settings: Any,
) -> pd.DataFrame:
    """Flag spurious-correlation candidates of a run; write ``flags.parquet`` and the DuckDB table ``flags``.

    ``rule`` (or its fields as keywords: ``n_permutations``, ``alpha``, ...) is :class:`FlagRule`. With
    ``behaviour`` (:func:`tasks.behaviour.probe_behaviour` of the run's probe set) a flag needs what
    the model does (:func:`tasks.behaviour.model_evidence`, ``alpha`` and ``rule.effect_bound``) instead of
    the explanation-only z_lift threshold; ``flag_candidates.parquet`` and the table ``flag_candidates``
    say, for every class's strongest candidates, which rule decided and the value it saw.

    Needs ``RUN_DIR/run.duckdb`` (built by :func:`tasks.store.build_duckdb` if absent). Returns the flags as a
    DataFrame with the :data:`FLAGS` columns, ordered by class then rank. See the module docstring for the
    statistic. ``class_text=None`` disables the describe-the-class exclusion (a warning is logged).
    ``cooccurrence`` (:func:`tasks.cooccurrence.cooccurrence` of the run's probe set) adds the data check;
    ``None`` leaves it out (a warning is logged). ``correlation`` (K, P): how each of ``behaviour``'s
    phrases goes with each class in the classifier's training data
    (:func:`tasks.training_data.training_correlation`); a flag then needs ``rule.min_correlation`` of it.
    With ``rule.probe_seen_in_training`` the labelled probe gives it when it is not passed.

    >>> text = ClassText.from_encoder(clip.encode_text, names, phrases, vocab)  # doctest: +SKIP
    >>> flag_spurious("runs/r1", text)  # doctest: +SKIP
    """
    rule = FlagRule.model_validate({**(rule.model_dump() if rule else {}), **settings})
    run_dir = Path(run_dir).resolve()
    con = open_writable(run_dir)
    try:
        flags, candidates = _compute_flags(con, class_text, cooccurrence, behaviour, rule, correlation)
        for name, frame, schema in (
            ("flags", flags, FLAGS),
            ("flag_candidates", candidates, FLAG_CANDIDATES),
        ):
            store_table(con, run_dir, name, pa.Table.from_pandas(frame, schema=schema, preserve_index=False))
        con.execute("CHECKPOINT")
    finally:
        con.close()
    return flags


@dataclass(frozen=True)
class ExplanationNull:
    """Per class, the maxima of z_lift over phrases under permuted class labels (the explanations' null)."""

    classes: list[str]  # column order of ``maxima``
    maxima: np.ndarray  # (n_permutations, K); NaN where a class has no z at all

    def thresholds(self, quantile: float) -> dict[str, float]:
        with np.errstate(invalid="ignore"):
            q = np.nanquantile(np.where(np.isnan(self.maxima), -np.inf, self.maxima), quantile, axis=0)
        return dict(zip(self.classes, q, strict=True))

    def p_values(self, class_names: pd.Series, z: np.ndarray) -> np.ndarray:
        """(1 + #maxima >= z) / (1 + n): a binary search in each class's sorted maxima (NaN maxima count as
        never exceeding), no (permutations × rows) array."""
        n = self.maxima.shape[0]
        k_of = class_names.map({c: i for i, c in enumerate(self.classes)}).to_numpy()
        ranked = np.sort(np.where(np.isnan(self.maxima), -np.inf, self.maxima), axis=0)
        below = np.empty(len(z), dtype=np.int64)
        for k in np.unique(k_of):  # one binary search per class
            rows = np.flatnonzero(k_of == k)
            below[rows] = np.searchsorted(ranked[:, k], z[rows], side="left")
        return (1 + np.where(np.isnan(z), n, n - below)) / (1 + n)


def explanation_null(con: duckdb.DuckDBPyConnection, rule: FlagRule) -> tuple[ExplanationNull, pd.DataFrame]:
    """The explanations' permutation null of a run (on its stratified sample above ``rule.null_images``),
    with the phrase × direction columns it was computed over."""
    images, cols, trip = _load_scores(con, rule.null_images)
    maxima = permutation_null(
        images["k"].to_numpy(np.int64),
        trip["i"].to_numpy(np.int64),
        trip["q"].to_numpy(np.int64),
        trip["score"].to_numpy(np.float64),
        len(cols),
        (cols["direction"] == "against").to_numpy().astype(np.int64),
        n_permutations=rule.n_permutations,
        seed=rule.seed,
    )
    classes = images.drop_duplicates("class_name").sort_values("k")["class_name"].tolist()
    return ExplanationNull(classes, maxima), cols


def _compute_flags(
    con: duckdb.DuckDBPyConnection,
    class_text: ClassText | None,
    cooccurrence: pd.DataFrame | None,
    behaviour: ProbeBehaviour | None,
    rule: FlagRule,
    correlation: np.ndarray | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    classes = con.sql("SELECT DISTINCT class_name, class_index FROM concept_stats ORDER BY class_name").df()
    if classes.empty:
        return _empty(FLAGS), _empty(FLAG_CANDIDATES)
    null, cols = explanation_null(con, rule)
    threshold_of = null.thresholds(rule.quantile)
    # The model test reaches the whole probe vocabulary, so every phrase it may test is checked too.
    text = _describes(
        sorted(set(cols["phrase"]) | set(behaviour.phrases if behaviour is not None else ())),
        dict(zip(classes["class_name"], classes["class_index"], strict=True)),
        class_text,
        behaviour,
        rule.min_class_agreement,
    )
    evidence = None if behaviour is None else _evidence(con, classes, text, behaviour, rule)
    stats = _rows(con, rule, threshold_of, evidence)
    stats["threshold"] = stats["class_name"].map(threshold_of)
    stats["p_value"] = null.p_values(stats["class_name"], stats["z_lift"].to_numpy(np.float64))
    stats = _with_cooccurrence(stats, cooccurrence, warn=behaviour is None)
    stats = stats.join(text, on="phrase")
    stats["in_explanations"] = (stats["lift"] > 0) & (stats["n_images"] >= rule.min_images)
    if behaviour is None:
        keep = _explanation_rule(stats, rule)
        for col in (
            "z_model",
            "effect",
            "model_threshold",
            "data_correlation",
            "z_first",
            "effect_first",
            "given",
        ):
            stats[col] = np.nan if col != "given" else None
        stats["step"] = pd.array([pd.NA] * len(stats), dtype="Int32")
        stats["aliases"] = [[] for _ in range(len(stats))]
        stats["reason"] = _explanation_reasons(stats, keep)
    else:
        stats, keep = _model_rule(stats, evidence, rule, _training_correlation(behaviour, correlation, rule))
    candidates = _candidates(stats, keep, rule)
    if not keep.any():
        return _empty(FLAGS), candidates
    return _ranked_flags(con, stats[keep].copy(), rule, by_behaviour=behaviour is not None), candidates


def _empty(schema: pa.Schema) -> pd.DataFrame:
    return pa.Table.from_pylist([], schema=schema).to_pandas()


def _ranked_flags(
    con: duckdb.DuckDBPyConnection, flags: pd.DataFrame, rule: FlagRule, by_behaviour: bool
) -> pd.DataFrame:
    """The flags in the FLAGS columns, ranked within each class, with example images."""
    if by_behaviour:
        # Per class: cues *for* it first (a cue for another class counting against this one is the same
        # finding seen from the other side), strong evidence before weak (a named pair accepted with
        # its phrase's mirror comes after the class's own cue), then in the order they were accepted,
        # strongest first.
        flags["_against"] = flags["direction"] == "against"
        flags["_weak"] = flags["effect"] < rule.effect_bound
        flags = flags.sort_values(
            ["class_name", "_against", "_weak", "step", "z_model"], ascending=[True, True, True, True, False]
        ).drop(columns=["_against", "_weak"])
    else:
        flags = flags.sort_values(["class_name", "z_lift"], ascending=[True, False])
    flags["rank"] = flags.groupby("class_name").cumcount() + 1
    n_mis, n_cor = flags["n_misclassified"], flags["n_correct"]
    k_mis = flags["frequency_misclassified"] * n_mis
    k_cor = (flags["frequency_correct"] * n_cor).fillna(0.0)
    flags["misclassified_enrichment"] = ((k_mis + 0.5) / (n_mis + 1) / ((k_cor + 0.5) / (n_cor + 1))).where(
        n_mis > 0
    )
    flags["n_permutations"] = rule.n_permutations
    flags["run_id"] = con.execute("SELECT coalesce(min(run_id), '') FROM explanations").fetchall()[0][0]
    flags = flags.merge(
        _examples(con, flags, rule.n_examples), on=["class_name", "phrase", "direction"], how="left"
    )
    # A flag the explanations never name has no example images (the merge leaves NaN).
    flags["example_image_ids"] = flags["example_image_ids"].apply(
        lambda v: list(v) if isinstance(v, list | np.ndarray) else []
    )
    flags["step"] = flags["step"].astype("Int32")
    return flags[FLAGS.names].reset_index(drop=True)


def _evidence(
    con: duckdb.DuckDBPyConnection,
    classes: pd.DataFrame,
    text: pd.DataFrame,
    behaviour: ProbeBehaviour,
    rule: FlagRule,
) -> Evidence:
    """The stepwise model test over every class of the run × phrase of the probe's vocabulary that does
    not name a class of the task × direction.

    Not gated on the explanations: a cue the model acts on is a finding even where the channel bank never
    names it (the flag card then shows how rarely its explanations do). Gating on the phrases the run's
    explanations selected lost cues the model fully used (docs/decisions.md, "The model test covers the
    whole vocabulary")."""
    n_classes = (
        int(
            max(
                classes["class_index"].max(),
                behaviour.predictions.max(initial=0),
                -1 if behaviour.labels is None else behaviour.labels.max(initial=0),
            )
        )
        + 1
    )
    describes = text["describes"].reindex(behaviour.phrases).fillna(False).to_numpy(bool)
    eligible = np.zeros((n_classes, len(behaviour.phrases), 2), dtype=bool)
    eligible[classes["class_index"].to_numpy(np.int64)] = ~describes[:, None]
    test = rule.model_dump(include={"alpha", "n_permutations", "seed", "proxy_agreement"})
    support = _explanation_support(con, behaviour.phrases, rule.min_relative_score)
    # In-sample, the model is right on nearly every probe image and effects shrink (docs/decisions.md,
    # "Training-split audits"): what the explanations name needs only to lean the right way.
    named_min_effect = 0.0 if rule.probe_seen_in_training else None
    return evidence_grid(
        behaviour,
        n_classes,
        eligible,
        support=support,
        min_effect=rule.effect_bound,
        named_min_effect=named_min_effect,
        **test,
    )


def _explanation_support(
    con: duckdb.DuckDBPyConnection, phrases: list[str], min_relative_score: float
) -> Support:
    """Which asked class × phrase × direction pairs the run's explanations name: lifted (``lift`` > 0) and
    at least ``min_relative_score`` of the class's main phrase in that direction (the explanation rule's
    relative-score test, without its ``min_images``). Read from ``concept_stats`` for the asked pairs
    only."""

    def support(asked: np.ndarray) -> np.ndarray:
        ci, pi, di = np.nonzero(asked)
        out = np.zeros_like(asked, dtype=bool)
        pairs = pd.DataFrame(
            {
                "class_index": ci.astype(np.int32),
                "phrase": np.asarray(phrases, dtype=object)[pi],
                "direction": np.asarray(DIRECTIONS, dtype=object)[di],
                "_row": np.arange(ci.shape[0]),
            }
        )
        con.register("_asked", pairs)
        try:
            rows = con.sql(
                "SELECT _row FROM _asked JOIN concept_stats USING (class_index, phrase, direction) "
                "WHERE lift > 0 AND relative_score >= ?",
                params=[float(min_relative_score)],
            ).fetchnumpy()["_row"]
        finally:
            con.unregister("_asked")
        out[ci[rows], pi[rows], di[rows]] = True
        return out

    return support


# Wanted pairs whose phrase no explanation of the run selected (in that direction) have no concept_stats
# row: they get one that says so (selected by no image; no lift, z_lift or relative score).
_UNNAMED_SQL = """
SELECT k.class_name, w.class_index, w.phrase, w.direction, k.n_class, 0::BIGINT AS n_images,
       0.0::DOUBLE AS frequency, 0.0::DOUBLE AS frequency_other, 0.0::DOUBLE AS mean_score,
       k.n_misclassified, k.n_correct
FROM _wanted AS w
JOIN (SELECT class_index, any_value(class_name) AS class_name, any_value(n_class) AS n_class,
             any_value(n_misclassified) AS n_misclassified, any_value(n_correct) AS n_correct
      FROM concept_stats GROUP BY class_index) AS k USING (class_index)
WHERE NOT EXISTS (SELECT 1 FROM concept_stats AS c
                  WHERE c.class_index = w.class_index AND c.phrase = w.phrase AND c.direction = w.direction)
"""


def _rows(
    con: duckdb.DuckDBPyConnection,
    rule: FlagRule,
    threshold_of: Mapping[str, float],
    evidence: Evidence | None,
) -> pd.DataFrame:
    """The ``concept_stats`` rows the rule and the candidates table need, selected in SQL: each class ×
    direction's top phrases by z_lift, the rows that can pass the explanation rule (without behaviour)
    or the model rule's accepted pairs and top first-step pairs (with it), also where no explanation
    selected the phrase. At 1000 classes × 5,505 phrases that is a few rows per class instead of 11 M."""
    thr = pd.DataFrame({"class_name": list(threshold_of), "_threshold": list(threshold_of.values())})
    if evidence is None:
        wanted = pd.DataFrame({"class_index": [], "phrase": [], "direction": []}).astype(
            {"class_index": "int32", "phrase": "object", "direction": "object"}
        )
        passing = (
            f"(s.z_lift > t._threshold AND s.lift > 0 AND s.n_images >= {int(rule.min_images)} "
            f"AND s.relative_score >= {float(rule.min_relative_score)!r})"
        )
    else:
        wanted = evidence.frame(evidence.top(N_CANDIDATES))[["class_index", "phrase", "direction"]]
        passing = "false"
    con.register("_thresholds", thr)
    con.register("_wanted", wanted.assign(_wanted=True))
    try:
        return con.sql(
            f"""
            SELECT s.* EXCLUDE (_rank) FROM (
                SELECT c.*, row_number() OVER (
                    PARTITION BY c.class_name, c.direction ORDER BY c.z_lift DESC NULLS LAST, c.phrase
                ) AS _rank
                FROM concept_stats c
            ) AS s
            JOIN _thresholds AS t USING (class_name)
            LEFT JOIN _wanted AS w USING (class_index, phrase, direction)
            WHERE s._rank <= {N_CANDIDATES} OR w._wanted OR {passing}
            UNION ALL BY NAME
            {_UNNAMED_SQL}
            ORDER BY class_name, direction, z_lift DESC NULLS LAST, phrase
            """
        ).df()
    finally:
        con.unregister("_thresholds")
        con.unregister("_wanted")


def _explanation_rule(stats: pd.DataFrame, rule: FlagRule) -> pd.Series:
    """Without probe behaviour: the explanations' z_lift over its permutation threshold, the class's
    main evidence, and visible in the probe images (when the co-occurrence is known)."""
    return (
        stats["z_lift"].notna()
        & (stats["z_lift"] > stats["threshold"])
        & stats["in_explanations"]
        & (stats["relative_score"] >= rule.min_relative_score)
        & ~stats["describes"]
        & _visible(stats)
    )


def _visible(stats: pd.DataFrame) -> pd.Series:
    """The probe images predicted as the class show the phrase more (for) or less (against) than the
    others do; unknown (too few probe images) does not veto a flag."""
    signed = np.where(stats["direction"] == "against", -stats["data_z"], stats["data_z"])
    return stats["data_z"].isna() | (signed > stats["data_threshold"])


def _explanation_reasons(stats: pd.DataFrame, keep: pd.Series) -> np.ndarray:
    return np.select(
        [
            keep.to_numpy(),
            stats["describes"].to_numpy(),
            ~stats["in_explanations"].to_numpy(),
            ~(stats["z_lift"] > stats["threshold"]).to_numpy(),
            ~_visible(stats).to_numpy(),
        ],
        [
            "flagged",
            "names a class of the task",
            "not in the class's explanations",
            "z_lift under its permutation threshold",
            "not visible in the probe images",
        ],
        "under half the class's main phrase",
    )


def _training_correlation(
    behaviour: ProbeBehaviour, correlation: np.ndarray | None, rule: FlagRule
) -> np.ndarray | None:
    """(K, P) how each phrase goes with each class in the training data: as given, or from a labelled
    probe that is that data; None: unknown."""
    if correlation is None and rule.probe_seen_in_training and behaviour.labels is not None:
        n_classes = int(max(behaviour.labels.max(initial=0), behaviour.predictions.max(initial=0))) + 1
        return label_correlation(behaviour.presence, behaviour.labels, n_classes)
    if correlation is not None and (correlation.ndim != 2 or correlation.shape[1] != len(behaviour.phrases)):
        raise ValueError(
            f"the training correlation is {correlation.shape}; "
            f"expected (classes, {len(behaviour.phrases)} phrases)"
        )
    return correlation


def _signed_correlation(
    out: pd.DataFrame, correlation: np.ndarray | None, index: dict[str, int]
) -> np.ndarray:
    """Each row's training correlation in its direction (NaN: unknown class or phrase, or none given)."""
    value = np.full(len(out), np.nan)
    if correlation is None:
        return value
    ci = out["class_index"].to_numpy(np.int64)
    pi = out["phrase"].map(index).fillna(-1).to_numpy(np.int64)
    ok = (ci >= 0) & (ci < correlation.shape[0]) & (pi >= 0)
    value[ok] = correlation[ci[ok], pi[ok]]
    return np.where(out["direction"] == "against", -value, value)


def _model_rule(
    stats: pd.DataFrame, evidence: Evidence, rule: FlagRule, correlation: np.ndarray | None = None
) -> tuple[pd.DataFrame, pd.Series]:
    """Flags from what the model does on the probe set (:func:`tasks.behaviour.evidence_grid`); with the
    training ``correlation``, only the accepted pairs whose phrase goes with the class there."""
    index = {p: i for i, p in enumerate(evidence.phrases)}
    known = stats["phrase"].isin(index).to_numpy()
    rows = np.zeros_like(evidence.eligible)
    ci = stats["class_index"].to_numpy(np.int64)[known]
    pi = stats["phrase"][known].map(index).to_numpy(np.int64)
    di = (stats["direction"][known] == "against").to_numpy(np.int64)
    rows[ci, pi, di] = True
    figures = evidence.frame(rows).drop(columns=["eligible"])
    out = stats.merge(
        figures.rename(columns={"threshold": "model_threshold"}),
        on=["class_index", "phrase", "direction"],
        how="left",
    )
    out["accepted"] = out["accepted"].fillna(False).astype(bool)
    out["step"] = out["step"].astype("Int32")
    out["data_correlation"] = _signed_correlation(out, correlation, index)
    out["aliases"] = [
        evidence.alias_names(p) if a else [] for p, a in zip(out["phrase"], out["accepted"], strict=True)
    ]
    # An accepted phrase stays a stratum of the test (the model does act on it); unknown does not veto.
    uncorrelated = (out["data_correlation"] < rule.min_correlation).to_numpy()
    keep = out["accepted"] & ~uncorrelated
    passes_first = (
        over_threshold(out["z_first"], out["model_threshold"])
        & (out["effect_first"] >= rule.effect_bound).to_numpy()
    )
    out["reason"] = np.select(
        [
            keep.to_numpy(),
            out["accepted"].to_numpy(),
            out["describes"].to_numpy(),
            ~out["phrase"].isin(index).to_numpy(),
            out["proxy_of"].notna().to_numpy(),
            passes_first & out["given"].fillna("").ne("").to_numpy(),
            out["z_model"].isna().to_numpy(),
            ~over_threshold(out["z_model"], out["model_threshold"]),
        ],
        [
            "flagged",
            "the model acts on it, but it does not go with the class in the training data (presence "
            + out["data_correlation"].map(lambda v: f"{v:+.2f}")
            + f" against the other classes, under {rule.min_correlation:g})",
            "names a class of the task",
            "not in the probe's vocabulary",
            "a proxy of an earlier flag: " + _proxy_reason(out, evidence),
            "explained by an earlier flag (" + out["given"].fillna("") + ")",
            "no contrast in the probe (presence or predictions constant within labels)",
            "model evidence under the permutation null",
        ],
        _effect_reason(out, rule),
    )
    return out, keep


def _proxy_reason(out: pd.DataFrame, evidence: Evidence) -> pd.Series:
    """How each row's phrase goes with the flag it was a proxy of, as CLIP calls them ("" where none)."""
    index = {p: i for i, p in enumerate(evidence.phrases)}
    reason = pd.Series("", index=out.index, dtype=object)
    rows = out.index[out["proxy_of"].notna()]
    proxied = zip(rows, out.loc[rows, "phrase"], out.loc[rows, "proxy_of"].astype(int), strict=True)
    for row, phrase, of in proxied:
        other = evidence.phrases[of]
        opposite = evidence.agreement(index[phrase], of) < 0
        reason[row] = (
            f"CLIP sees it where it does not see {other}"
            if opposite
            else f"where CLIP sees it follows where it sees {other}"
        )
    return reason


def _effect_reason(out: pd.DataFrame, rule: FlagRule) -> np.ndarray:
    """Why a pair over the null was not flagged: its effect, and with a probe seen in training, that a
    pair *for* the class was not named by its explanations either (the only way it had left)."""
    reason = f"effect under {rule.effect_bound:g}"
    if not rule.probe_seen_in_training:
        return np.full(len(out), reason, dtype=object)
    named_way = (out["direction"] == "for").to_numpy()
    return np.where(named_way, reason + " and not named by the class's explanations", reason).astype(object)


def _candidates(stats: pd.DataFrame, keep: pd.Series, rule: FlagRule) -> pd.DataFrame:
    """Each class × direction's strongest candidates: its flags, its top phrases in the explanations
    (z_lift: what the report's heatmap shows) and its top phrases by the model's z, with the reason."""
    frame = stats.assign(flagged=keep.to_numpy(), min_effect=rule.effect_bound)
    keys = ["class_name", "direction"]
    picked = [frame[frame["flagged"]]]
    for col in ("z_lift", "z_first"):
        ranked = frame.sort_values([*keys, col], ascending=[True, True, False], na_position="last")
        picked.append(ranked[ranked[col].notna()].groupby(keys, sort=False).head(N_CANDIDATES))
    top = pd.concat(picked).drop_duplicates(["class_name", "phrase", "direction"])
    top = top.sort_values([*keys, "flagged", "z_lift"], ascending=[True, True, False, False])
    return top[FLAG_CANDIDATES.names].reset_index(drop=True)


def _with_cooccurrence(
    stats: pd.DataFrame, cooccurrence: pd.DataFrame | None, warn: bool = True
) -> pd.DataFrame:
    """``stats`` with the data figures of its class × phrase (NaN where unknown)."""
    from tasks.cooccurrence import COLUMNS

    if cooccurrence is None and warn:
        log.warning("no probe co-occurrence given: flags are not checked against the images")
    if cooccurrence is None:
        cooccurrence = pd.DataFrame({c: pd.Series(dtype="float64") for c in COLUMNS})
    missing = set(COLUMNS) - set(cooccurrence.columns)
    if missing:
        raise ValueError(f"cooccurrence lacks columns {sorted(missing)}")
    data = cooccurrence[COLUMNS].astype({"class_index": "int32", "phrase": "object"})
    out = stats.merge(data, on=["class_index", "phrase"], how="left", validate="many_to_one")
    out["n_probe_class"] = out["n_probe_class"].astype("Int64")
    return out


def _describes(
    phrases: list[str],
    class_index: Mapping[str, int],
    class_text: ClassText | None,
    behaviour: ProbeBehaviour | None,
    min_agreement: float,
) -> pd.DataFrame:
    """Per phrase (the index): ``describes``, it names a class of the task, with the figures that decided.

    By text: it is a class name or in a class's own vocabulary, or at least as close to one of them in
    CLIP text space as two different class names are (``class_similarity`` vs ``similarity_threshold``).
    A text-only closeness must also be seen in the images when the probe has class presence: CLIP sees
    the phrase where it sees that class name (``class_agreement``, phi over the probe images, at least
    ``min_agreement``). A weak text encoder puts "blue" as close to "square" as "circle" is; in images
    the two come apart unless the data never separates them.
    """
    class_names = list(class_index)
    out = pd.DataFrame(
        {"class_similarity": np.nan, "similarity_threshold": np.nan, "class_agreement": np.nan},
        index=pd.Index(phrases, name="phrase", dtype=object),
    )
    own = {c.casefold() for c in class_names} | {
        p.casefold()
        for c, v in (class_text.own_vocabulary if class_text else {}).items()
        if c in class_index
        for p in v
    }
    exact = np.array([p.casefold() in own for p in phrases], dtype=bool)
    if class_text is None:
        log.warning("no class text embeddings given: phrases describing their own class are not excluded")
        out["describes"] = exact
        return out
    threshold = class_text.similarity_threshold(class_names)
    missing = sorted(set(class_names) - set(class_text.embeddings))
    unknown = sorted(set(phrases) - set(class_text.embeddings))
    if missing or unknown:
        log.warning(
            "no text embedding for classes %s and phrases %s: their similarity is unknown",
            missing[:5],
            unknown[:5],
        )
    text = class_text.class_similarities(class_names, phrases)  # (K, P)
    close = np.nan_to_num(text, nan=-np.inf) >= threshold
    agreement = np.full(text.shape, np.nan)
    phi = behaviour.class_agreement() if behaviour is not None else None
    if phi is not None:
        index = {p: i for i, p in enumerate(behaviour.phrases)}
        rows = np.array([class_index[c] for c in class_names], dtype=np.int64)
        cols = np.array([index.get(p, -1) for p in phrases], dtype=np.int64)
        known = cols >= 0
        if rows.size and rows.max() < phi.shape[0]:
            agreement[:, known] = phi[np.ix_(rows, cols[known])]
    seen = np.isnan(agreement) | (agreement >= min_agreement)  # unknown: the text decides alone
    with warnings.catch_warnings():  # a phrase without any known similarity stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        out["class_similarity"] = np.nanmax(text, axis=0)
        out["class_agreement"] = np.nanmax(np.where(close, agreement, np.nan), axis=0)
    out["similarity_threshold"] = threshold
    out["describes"] = exact | (close & seen).any(0)
    return out


def _examples(con: duckdb.DuckDBPyConnection, flags: pd.DataFrame, n: int) -> pd.DataFrame:
    """Top-scoring image ids of each flagged class × phrase × direction."""
    con.register("_wanted", flags[["class_name", "phrase", "direction"]])
    try:
        return con.sql(
            f"""
            SELECT class_name, phrase, direction,
                   list(image_id ORDER BY score DESC, image_id)[1:{int(n)}] AS example_image_ids
            FROM image_phrases JOIN _wanted USING (class_name, phrase, direction)
            GROUP BY ALL
            """
        ).df()
    finally:
        con.unregister("_wanted")
