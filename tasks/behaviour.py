"""Does the classifier act on a concept? Its predictions where CLIP sees the concept and where it does not.

A phrase that fills every explanation of a class ("yellow" for squares on a control model) and a cue the
model leans on ("water background" for circles) can look alike in the explanations. They differ in what
the model *does*: images that show the cue are predicted as the class more often than images of the same
true label that do not (B2T's idea, Kim et al. 2024). On the probe set, which calibration already passed
through the classifier and CLIP (:class:`textcam.bank.ProbeSet`):

* ``presence[i, p]``: CLIP sees phrase p in image i (:mod:`textcam.visibility`: a two-Gaussian model of
  each phrase's image-centred cosines over the probe images; "present" is the more probable component);
* for class c and phrase p, within each stratum (true label, where labels exist, × presence of the
  concepts accepted so far) a 2×2 table presence × predicted-as-c; the Cochran–Mantel–Haenszel statistic
  ``z_model`` sums (observed − expected) over strata and divides by the permutation standard deviation;
* ``effect``: the Mantel–Haenszel risk difference P(pred c | p) − P(pred c | not p), within the images
  labelled c (the class's accuracy gap between images with and without the concept, as CLIP sees it)
  and within the images labelled otherwise (how much more often they are taken for c); the larger in
  the flag's direction counts. Without labels, over all images;
* the threshold on ``z_model`` is the ``1 − alpha`` quantile of the largest |z| over all eligible
  class × phrase pairs when presence is permuted within strata (family-wise, whatever the vocabulary);
* stepwise: the phrase with the largest |z| among the pairs that pass (|z| over the threshold and
  |effect| ≥ ``min_effect``) is accepted with every class it passes for, then becomes a stratum, and the
  test runs again. A phrase that only rides on an accepted one (every image left for the other classes
  shows "sand background" once the water images go to circle) has no effect within its strata. Where the
  run's explanations name some of the passing pairs (``support``), the largest |z| is taken among those:
  a word whose presence call happens to follow the cue more closely than the cue's own phrase would
  otherwise be accepted first and explain the cue away;
* with ``named_min_effect`` (``flags.probe_seen_in_training``: the probe is the classifier's training
  data, which it fits better than held-out data, so within a label a cue changes less), once no pair
  passes, the pairs *for* a class that the explanations name need only that effect: weak evidence after
  all the strong, so it cannot step ahead of a cue and take it into its strata. When a phrase is accepted
  on strong evidence (a mirror: the cue against another class), its named weak pairs are accepted with it,
  and so are its proxies' (below): the cue under another name, named by its own class's explanations.
  Where none of those is *for* a class, the phrase's strongest pair over the null goes with it if it is
  *for* a class, named or not: the owner's cue, which the mirror would otherwise close unflagged;
* an accepted phrase brings its proxies into the strata: the phrases whose presence agrees with its own
  (|phi| within labels ≥ ``proxy_agreement``, 0.5, halfway between independence and identity, the bound
  of "names a class"). They are not tested again. Where CLIP's call of the accepted phrase misses some
  of its images, a word that follows the concept on those images would pass on exactly them;
* an accepted phrase's *owner* is the class with its strongest pair; the other classes' pairs are its
  mirrors. Where the owner's pair is *against* the phrase and a proxy CLIP calls where it does not call
  the phrase passes *for* the owner at least as strongly as any mirror, the owner's flag is that proxy:
  star=large reads "large object" for star rather than "small object" against it, whichever of the two
  words the explanations name.

``min_effect`` (:data:`tasks.config.MIN_EFFECT`, 0.3) is the truth sweep's own bound of a cue the model
uses (accuracy gap ≥ 0.3): a flag claims use. It is part of the rule's definition, not fitted to a world.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from numpy.typing import ArrayLike

from tasks.config import MIN_EFFECT
from textcam.visibility import PhraseVisibility

DIRECTIONS = ("for", "against")
#: the (K, P, 2) figures :func:`evidence_grid` records for every class × phrase × direction
FIGURES = ("z_first", "effect_first", "z_model", "effect", "threshold", "step", "proxy_of")


@dataclass(frozen=True)
class ProbeBehaviour:
    """Per probe image: which phrases CLIP sees, the predicted class and (optionally) the true class."""

    presence: np.ndarray  # (N, P) bool
    phrases: list[str]
    predictions: np.ndarray  # (N,) int class index
    labels: np.ndarray | None  # (N,) int class index, -1 where unknown; None: no labels at all
    thresholds: np.ndarray  # (P,) mean centred cosine of the "present" component (for the record)
    # (N, K) bool: CLIP sees class name k (model class order) in image i; None: class names not embedded
    class_presence: np.ndarray | None = None

    def __post_init__(self) -> None:
        n, p = self.presence.shape
        if p != len(self.phrases) or self.predictions.shape != (n,) or self.thresholds.shape != (p,):
            raise ValueError("presence, phrases, predictions and thresholds do not describe the same probe")
        if self.labels is not None and self.labels.shape != (n,):
            raise ValueError(f"{self.labels.shape[0]} labels for {n} probe images")
        if self.class_presence is not None and self.class_presence.shape[0] != n:
            raise ValueError(f"class presence for {self.class_presence.shape[0]} images, probe has {n}")

    def label_accuracy(self) -> float | None:
        """Share of the labelled probe images predicted as their label; None without labels."""
        if self.labels is None or not (self.labels >= 0).any():
            return None
        known = self.labels >= 0
        return float((self.predictions[known] == self.labels[known]).mean())

    def class_agreement(self) -> np.ndarray | None:
        """(K, P) phi coefficient between "CLIP sees class name k" and "CLIP sees phrase p" over the probe
        images, within true labels where they are known (0 where either is constant); None without class
        presence.

        Within labels, because on biased data (a training split audited on itself) a cue is seen where
        its class is, so the plain phi calls the cue a name of the class; a name and its synonym still
        agree within a label, on the images where CLIP errs about the class.
        """
        if self.class_presence is None:
            return None
        return phi(self.class_presence, self.presence, self.labels)


def probe_behaviour(
    image_embeddings: torch.Tensor,
    predictions: torch.Tensor | np.ndarray,
    phrases: Sequence[str],
    phrase_embeddings: torch.Tensor,
    labels: np.ndarray | None = None,
    class_embeddings: torch.Tensor | None = None,
) -> ProbeBehaviour:
    """Presence of every phrase in every probe image, with the probe's predictions and labels.

    ``class_embeddings`` (K, D): CLIP text embeddings of the model's class names, in class order; with
    them the behaviour also holds where CLIP sees each class name (the flag rule's image-side test of
    "this phrase names a class of the task").
    """
    if len(phrases) != phrase_embeddings.shape[0]:
        raise ValueError(f"{len(phrases)} phrases but {phrase_embeddings.shape[0]} embeddings")
    for emb in (phrase_embeddings, class_embeddings):
        if emb is not None and emb.shape[1] != image_embeddings.shape[1]:
            raise ValueError("text and image embeddings come from different CLIP models (dimensions differ)")
    visibility = PhraseVisibility.fit(image_embeddings, phrase_embeddings)
    lab = None if labels is None else np.asarray(labels, dtype=np.int64)
    presence = visibility.presence(image_embeddings)
    class_presence = None
    if class_embeddings is not None:
        class_presence = PhraseVisibility.fit(image_embeddings, class_embeddings).presence(image_embeddings)
    return ProbeBehaviour(
        presence,
        list(phrases),
        np.asarray(predictions, dtype=np.int64),
        lab,
        visibility.means[-1],
        class_presence,
    )


def phi(a: np.ndarray, b: np.ndarray, strata: np.ndarray | None = None) -> np.ndarray:
    """(A, B) phi coefficients (Pearson correlation of booleans) between the columns of a (N, A) and b
    (N, B); 0 where a column is constant. With ``strata`` (N,): pooled within strata (each column
    centred on its stratum's mean), so what the strata explain does not count."""
    a = _centred(np.asarray(a, dtype=np.float64), strata)
    b = _centred(np.asarray(b, dtype=np.float64), strata)
    na, nb = np.sqrt((a * a).sum(0)), np.sqrt((b * b).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a.T @ b) / np.outer(na, nb)
    return np.nan_to_num(r, nan=0.0, posinf=0.0, neginf=0.0)


def _centred(x: np.ndarray, strata: np.ndarray | None) -> np.ndarray:
    """``x`` minus the mean of its column over the image's stratum (over all images without strata)."""
    if strata is None:
        return x - x.mean(0)
    _, inverse, counts = np.unique(strata, return_inverse=True, return_counts=True)
    index = torch.from_numpy(inverse.astype(np.int64))
    sums = torch.zeros(counts.shape[0], x.shape[1], dtype=torch.float64).index_add_(
        0, index, torch.from_numpy(x)
    )
    return x - (sums.numpy() / counts[:, None])[inverse]


def _strata(
    labels: np.ndarray | None, presence: np.ndarray, given: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Stratum code per image and the true label of each stratum (-1: unknown / no labels)."""
    n = presence.shape[0]
    lab = np.full(n, -1, dtype=np.int64) if labels is None else labels
    # Rows, not an integer code: a code of label and presence bits overflows past about 50 phrases.
    key = np.column_stack([lab, presence[:, given].astype(np.int64)])
    codes, inverse = np.unique(key, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    stratum_label = np.full(codes.shape[0], -1, dtype=np.int64)
    stratum_label[inverse] = lab
    return inverse, stratum_label


@dataclass(frozen=True)
class _Tables:
    """The 2×2 tables presence × predicted-as-c of every stratum, kept as sums the statistics need.

    Never the (strata × classes × phrases) cube: every statistic below is a sum over strata of a
    per-stratum product, which is one (K, S) @ (S, P) product, and the joint counts only enter summed
    over strata, which is a sum over images.
    """

    n: np.ndarray  # (S,) images per stratum
    n1: np.ndarray  # (S, P) images showing the phrase
    m: np.ndarray  # (S, K) images predicted as the class
    a: np.ndarray  # (K, P) images predicted as the class and showing the phrase, all strata
    a_own: np.ndarray  # (K, P) the same, images labelled as the class only
    a_labelled: np.ndarray  # (K, P) the same, images with a known label only
    stratum_label: np.ndarray  # (S,) true label of each stratum, -1 unknown


def _joint(pred: torch.Tensor, x: torch.Tensor, n_classes: int) -> np.ndarray:
    """(K, P) sums of presence rows per predicted class."""
    return torch.zeros(n_classes, x.shape[1], dtype=x.dtype).index_add_(0, pred, x).numpy()


def _tables(
    stratum: np.ndarray, stratum_label: np.ndarray, pred: np.ndarray, n_classes: int, x: np.ndarray
) -> _Tables:
    n_strata = stratum_label.shape[0]
    n = np.bincount(stratum, minlength=n_strata).astype(np.float64)
    xf = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))
    n1 = torch.zeros(n_strata, x.shape[1], dtype=torch.float64).index_add_(0, torch.from_numpy(stratum), xf)
    code = stratum * n_classes + pred
    m = np.bincount(code, minlength=n_strata * n_classes).reshape(n_strata, n_classes).astype(np.float64)
    label = stratum_label[stratum]
    own, labelled = label == pred, label >= 0
    return _Tables(
        n,
        n1.numpy(),
        m,
        _joint(torch.from_numpy(pred), xf, n_classes),
        _joint(torch.from_numpy(pred[own]), xf[torch.from_numpy(own)], n_classes),
        _joint(torch.from_numpy(pred[labelled]), xf[torch.from_numpy(labelled)], n_classes),
        stratum_label,
    )


def _null_moments(t: _Tables) -> tuple[np.ndarray, np.ndarray]:
    """(K, P) expected joint count and its variance summed over strata, presence and predictions fixed
    in each stratum's margins (the hypergeometric moments of the CMH test)."""
    n = np.maximum(t.n, 1)[:, None]
    expected = (t.m / n).T @ t.n1
    var = (t.m * (t.n[:, None] - t.m) / np.maximum(t.n * t.n * (t.n - 1), 1)[:, None]).T @ (
        t.n1 * (t.n[:, None] - t.n1)
    )
    return expected, var


def _cmh_z(t: _Tables) -> np.ndarray:
    """(K, P) CMH z of presence vs predicted-as-c, summed over strata (NaN: no variation anywhere)."""
    expected, var = _null_moments(t)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(var > 1e-12, (t.a - expected) / np.sqrt(var), np.nan)


def _risk_difference(t: _Tables, weights: np.ndarray, a_weighted: np.ndarray) -> np.ndarray:
    """(K, P) Mantel–Haenszel risk difference of predicted-as-c, present minus absent, over the strata
    with weight 1 in ``weights`` (S, K); ``a_weighted`` is the joint count summed over those strata.

    Per stratum the MH numerator a·n0 − (m − a)·n1, over n, is a − m·n1/n."""
    n = np.maximum(t.n, 1)[:, None]
    num = a_weighted - (weights * t.m / n).T @ t.n1
    den = weights.T @ (t.n1 * (t.n[:, None] - t.n1) / n)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 1e-12, num / den, np.nan)


def _effects(t: _Tables, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(K, P) risk differences within the images labelled c (the class's accuracy gap) and within the
    images labelled otherwise (how much more often they are taken for c); with no labels, both are
    the risk difference over all images."""
    if not (t.stratum_label >= 0).any():
        pooled = _risk_difference(t, np.ones((t.n.shape[0], n_classes)), t.a)
        return pooled, pooled
    own = (t.stratum_label[:, None] == np.arange(n_classes)[None, :]).astype(np.float64)  # (S, K)
    other = ((t.stratum_label[:, None] >= 0) & (own == 0)).astype(np.float64)
    return (
        _risk_difference(t, own, t.a_own),
        _risk_difference(t, other, t.a_labelled - t.a_own),
    )


def _permuted_max(
    stratum: np.ndarray,
    t: _Tables,
    pred: np.ndarray,
    x: np.ndarray,
    eligible: np.ndarray,
    n_permutations: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Largest |z| over eligible pairs for each permutation of presence rows within strata.

    Such a permutation keeps every stratum's margins, so only the joint counts change: one index-add of
    the permuted presence rows per permutation, (K, P) in memory whatever the number of strata.
    """
    expected, var = _null_moments(t)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_sd = np.where(eligible & (var > 1e-12), 1.0 / np.sqrt(var), 0.0)
    if not inv_sd.any():
        return np.full(n_permutations, -np.inf)
    # float32 throughout: the joint counts are integers (exact below 2**24) and a maximum needs no more.
    x32 = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    expected32 = torch.from_numpy(expected.astype(np.float32))
    inv_sd32 = torch.from_numpy(inv_sd.astype(np.float32))
    joint = torch.empty(t.m.shape[1], x.shape[1], dtype=torch.float32)
    order = np.argsort(stratum, kind="stable")
    bounds = np.flatnonzero(np.diff(stratum[order])) + 1
    groups = [g for g in np.split(order, bounds) if g.size > 1]
    out = np.empty(n_permutations)
    for b in range(n_permutations):
        perm = np.arange(stratum.shape[0])
        for g in groups:
            perm[g] = rng.permutation(g)
        # Image i's presence row moved to position perm[i]: permute the predictions the other way
        # instead of copying the presence rows (the same counts, no (images × phrases) copy).
        moved = np.empty_like(perm)
        moved[perm] = np.arange(perm.shape[0])
        joint.zero_().index_add_(0, torch.from_numpy(pred[moved]), x32)
        cell = int((joint - expected32).abs_().mul_(inv_sd32).argmax())
        # The largest cell again in float64: a permutation that reproduces the observed table must give
        # the observed z exactly, or a tie with the threshold would be decided by float32 rounding.
        out[b] = abs(float(joint.view(-1)[cell]) - expected.flat[cell]) * inv_sd.flat[cell]
    return out


def _settled(z: ArrayLike) -> np.ndarray:
    """``z`` rounded to 9 decimals: one statistic reached along two paths (a phrase and its exact
    complement; the observed table and a permutation that reproduces it) ties only up to float error."""
    return np.round(np.asarray(z, dtype=float), 9)


def over_threshold(z: ArrayLike, threshold: ArrayLike) -> np.ndarray:
    """``z`` strictly over the null's quantile; a tie with it (up to float error) is not over it."""
    return _settled(z) > _settled(threshold)


#: which of the asked (K, P, 2) class × phrase × direction pairs the explanations name (same shape, bool)
Support = Callable[[np.ndarray], np.ndarray]


def _step(
    behaviour: ProbeBehaviour, n_classes: int, given: list[int]
) -> tuple[np.ndarray, _Tables, np.ndarray, np.ndarray]:
    """One step's strata, tables, (K, P, 2) z and effect in each direction, given the accepted phrases."""
    stratum, stratum_label = _strata(behaviour.labels, behaviour.presence, given)
    tables = _tables(stratum, stratum_label, behaviour.predictions, n_classes, behaviour.presence)
    z = _cmh_z(tables)
    own, other = _effects(tables, n_classes)
    with warnings.catch_warnings():  # a pair with neither effect defined stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        ed = np.stack([np.fmax(own, other), -np.fmin(own, other)], -1)
    return stratum, tables, np.stack([z, -z], -1), ed  # z large when the direction holds


@dataclass(frozen=True)
class Evidence:
    """The stepwise test's figures for every class × phrase × direction, as (K, P, 2) arrays."""

    phrases: list[str]
    eligible: np.ndarray  # (K, P, 2) bool
    accepted: np.ndarray  # (K, P, 2) bool
    # z_first, effect_first, z_model, effect, threshold, step, proxy_of (NaN: none): (K, P, 2)
    figures: dict[str, np.ndarray]
    given: list[int]  # accepted phrases, in order
    # accepted phrase → the proxies it brought into the strata, with their phi: where CLIP sees the
    # accepted phrase it also sees these (phi > 0) or does not (phi < 0)
    aliases: dict[int, list[tuple[int, float]]] = field(default_factory=dict)

    def alias_names(self, phrase: str) -> list[str]:
        """The proxies an accepted ``phrase`` brought into the strata, most alike first, "not …" where
        CLIP's call of them disagrees with its own; for a proxy, the phrase it came with; else empty."""
        i = self.phrases.index(phrase) if phrase in self.phrases else -1
        ordered = sorted(self._partners(i), key=lambda pair: -abs(pair[1]))
        return [("" if a > 0 else "not ") + self.phrases[j] for j, a in ordered]

    def agreement(self, a: int, b: int) -> float:
        """phi of CLIP's calls of phrases ``a`` and ``b`` where one was the other's proxy; else NaN."""
        return next((f for j, f in self._partners(a) if j == b), float("nan"))

    def _partners(self, i: int) -> list[tuple[int, float]]:
        """An accepted phrase's proxies, or for a proxy the phrase it came with; each with its phi."""
        return self.aliases.get(i, [(b, a) for b, pairs in self.aliases.items() for j, a in pairs if j == i])

    def top(self, n: int) -> np.ndarray:
        """(K, P, 2) bool: the accepted pairs and each class × direction's ``n`` eligible pairs with the
        largest first-step z (the near misses worth showing)."""
        z = np.where(self.eligible, np.nan_to_num(self.figures["z_first"], nan=-np.inf), -np.inf)
        keep = self.accepted.copy()
        n = min(n, z.shape[1])
        if n > 0:
            idx = np.argpartition(-z, n - 1, axis=1)[:, :n, :]  # (K, n, 2)
            k, _, d = np.meshgrid(np.arange(z.shape[0]), np.arange(n), np.arange(2), indexing="ij")
            keep[k, idx, d] |= np.isfinite(z[k, idx, d])
        return keep & self.eligible

    def frame(self, rows: np.ndarray | None = None) -> pd.DataFrame:
        """One row per pair of ``rows`` ((K, P, 2) bool; default: the eligible pairs)."""
        ci, pi, di = np.nonzero(self.eligible if rows is None else rows)
        step = self.figures["step"][ci, pi, di]
        given = [", ".join(self.phrases[g] for g in self.given[:i]) for i in range(len(self.given) + 1)]
        out = pd.DataFrame(
            {
                "class_index": ci.astype(np.int32),
                "phrase": np.asarray(self.phrases, dtype=object)[pi],
                "direction": np.asarray(DIRECTIONS, dtype=object)[di],
                "eligible": self.eligible[ci, pi, di],
                "accepted": self.accepted[ci, pi, di],
                **{name: v[ci, pi, di] for name, v in self.figures.items()},
                # The phrases accepted before the step that decided the pair.
                "given": [given[int(s) - 1] if np.isfinite(s) else "" for s in step],
            }
        )
        out["step"] = out["step"].astype("Int64")
        return out


def model_evidence(
    behaviour: ProbeBehaviour, n_classes: int, eligible: np.ndarray, **options: Any
) -> pd.DataFrame:
    """The stepwise test of the module docstring, one row per eligible class × phrase × direction.

    ``eligible`` (K, P, 2) bool: which class × phrase × direction ("for", "against") may be flagged
    (the flag rule's conditions on the explanations and the class names). Each row has its first-step
    figures (``z_first``, ``effect_first``), the figures of the step that decided it (``z_model``,
    ``effect``, ``threshold``, ``step``), ``accepted`` and ``given`` (the accepted phrases it was
    conditioned on). ``options`` are :func:`evidence_grid`'s, which gives the same as arrays.
    """
    return evidence_grid(behaviour, n_classes, eligible, **options).frame()


def _check_grid(alpha: float, n_permutations: int, eligible: np.ndarray, shape: tuple[int, int, int]) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError("alpha must lie in (0, 1)")
    if n_permutations < 1:
        raise ValueError("n_permutations must be at least 1")
    if eligible.shape != shape:
        raise ValueError(f"eligible must be {shape}, got {eligible.shape}")


def _proxies(
    behaviour: ProbeBehaviour, best: int, conditioned: list[int], agreement: float
) -> tuple[np.ndarray, np.ndarray]:
    """The phrases, not yet conditioned on, whose presence agrees with ``best``'s (|phi| within true
    labels at least ``agreement``), and their phi."""
    x = behaviour.presence
    signed = phi(x[:, [best]], x, behaviour.labels)[0]
    agree = np.abs(signed) >= agreement
    agree[[*conditioned, best]] = False
    found = np.flatnonzero(agree)
    return found, signed[found]


def _absorb_proxies(
    best: int,
    proxies: np.ndarray,
    signed: np.ndarray,
    conditioned: list[int],
    eligible: np.ndarray,
    decided: np.ndarray,
    record: dict[str, np.ndarray],
) -> list[tuple[int, float]]:
    """Bring the accepted ``best`` and its ``proxies`` into the strata (``conditioned``, in place); the
    proxies' open pairs are decided as ``proxy_of`` ``best``. Returns the proxies with their phi."""
    absorbed = eligible[:, proxies, :] & ~decided[:, proxies, :]
    record["proxy_of"][:, proxies, :] = np.where(absorbed, best, np.nan)
    decided[:, proxies, :] = True
    conditioned += [best, *proxies.tolist()]
    return list(zip(proxies.tolist(), signed.tolist(), strict=True))


def _best_phrase(passing: np.ndarray, zd: np.ndarray, support: Support | None) -> int:
    """The phrase a step accepts among the (K, P, 2) ``passing`` pairs: the largest z, evidence *for* a
    class first (a cue and its complement, "large" for circle and "small" against it, have the same |z|,
    and the finding is the cue), among the pairs the explanations name where they name some (the model
    test alone can prefer a word whose presence call follows the cue more closely than the cue's own:
    docs/decisions.md, "Named first")."""
    side = 0 if passing[..., 0].any() else 1
    named = passing & support(passing) if support is not None else passing
    pool = named if named[..., side].any() else passing
    # Settled: of a phrase and its exact complement, the first in order wins.
    return int(_settled(np.where(pool[..., side], zd[..., side], -np.inf).max(axis=0)).argmax())


def _passing(
    over_null: np.ndarray,
    ed: np.ndarray,
    min_effect: float,
    named_min_effect: float | None,
    support: Support | None,
) -> np.ndarray:
    """The pairs over the null with ``min_effect``; where there are none, the named weak pairs
    (:func:`_named_weak`): weaker evidence goes after all the strong evidence, so it cannot step ahead of
    a cue and take it into its strata."""
    passing = over_null & (ed >= min_effect)
    return passing if passing.any() else _named_weak(over_null, ed, named_min_effect, support)


def _named_weak(
    over_null: np.ndarray, ed: np.ndarray, named_min_effect: float | None, support: Support | None
) -> np.ndarray:
    """The pairs *for* a class over the null that the explanations name, with ``named_min_effect`` (none
    without it)."""
    if named_min_effect is None or support is None:
        return np.zeros_like(over_null)
    weak = over_null & (ed >= named_min_effect)
    weak[..., 1] = False
    return weak & support(weak) if weak.any() else weak


def _accepted_pairs(
    best: int,
    proxies: np.ndarray,
    passing: np.ndarray,
    over_null: np.ndarray,
    zd: np.ndarray,
    ed: np.ndarray,
    named_min_effect: float | None,
    support: Support | None,
) -> np.ndarray:
    """(K, P, 2): the pairs flagged when ``best`` is accepted. The phrase and its ``proxies`` (the same
    concept, to CLIP) are decided for every class at once, so the named weak pairs of both go with the
    phrase's passing pairs: otherwise a mirror's strong effect (the cue against another class, or the cue
    under another name for another class) would close the cue's own in-sample pair (decisions, "A mirror
    must not close the cue's own pair", "… nor its other names")."""
    concept = [best, *proxies.tolist()]
    asked = np.zeros_like(over_null)
    asked[:, concept, :] = over_null[:, concept, :]
    out = _named_weak(asked, ed, named_min_effect, support)
    out[:, best, :] |= passing[:, best, :]
    if named_min_effect is not None and not out[:, concept, 0].any():  # accepted on its mirrors alone
        weak = over_null[:, best, :] & (ed[:, best, :] >= named_min_effect)
        out[:, best, :] |= _strongest_for(weak, zd[:, best, :])
    return out


def _strongest_for(weak: np.ndarray, z: np.ndarray) -> np.ndarray:
    """(K, 2): of one phrase's ``weak`` pairs (over the null, with the weak effect), the one with the
    largest z where it is *for* a class ("for" first on a tie), else none. A phrase accepted on its
    mirrors' strong evidence alone would otherwise close its owner's pair unflagged wherever the
    explanations do not name it: star=metallic, z 20 for star with effect 0.17, closed by "metallic
    (against)" circle at z 15 (decisions, "What a training split can show")."""
    out = np.zeros_like(weak)
    if not weak.any():
        return out
    zs = _settled(np.where(weak, z, -np.inf))
    k = int(zs[:, 0].argmax())
    out[k, 0] = zs[k, 0] >= zs[:, 1].max()
    return out


def _owner_reads_complement(
    pairs: np.ndarray,
    best: int,
    complements: np.ndarray,
    passing: np.ndarray,
    zd: np.ndarray,
    record: dict[str, np.ndarray],
) -> np.ndarray:
    """``pairs`` with the finding's owner reading it as held. The owner is the class whose accepted pair
    on ``best`` has the largest z (a pair *for* a class where they tie); the other classes' pairs are its
    mirrors. Where the owner's pair is *against* ``best`` and one of ``best``'s ``complements`` (its
    proxies that CLIP calls where it does not call ``best``) passes *for* the owner, with a z no smaller
    than any mirror's (the class stays the finding's owner), the strongest such is the owner's flag:
    star relies on "large object", rather than on "small object" being absent (the flag's aliases say
    "not small object"); the pair against ``best`` is recorded as its proxy."""
    mine = pairs[:, best, :]
    if not len(complements) or not mine.any():
        return pairs
    # Settled, "for" first: with two classes a cue for one and against the other tie.
    z_best = _settled(np.where(mine, zd[:, best, :], -np.inf))
    owner = int(z_best[:, 1].argmax())
    z = _settled(np.where(passing[owner, complements, 0], zd[owner, complements, 0], -np.inf))
    mirrors = np.delete(z_best, owner, axis=0).max(initial=-np.inf)
    # The complement must carry the finding as strongly as any mirror does: "not checkered" is more than
    # "metallic" where a third texture exists, and the weaker word would make the mirror the finding.
    if z_best[:, 0].max() >= z_best[owner, 1] or not z.max() >= mirrors or not np.isfinite(z.max()):
        return pairs
    read = complements[z.argmax()]
    out = pairs.copy()
    out[owner, best, 1] = False
    out[owner, read, 0] = True
    record["proxy_of"][owner, best, 1] = read
    return out


def evidence_grid(
    behaviour: ProbeBehaviour,
    n_classes: int,
    eligible: np.ndarray,
    *,
    alpha: float = 0.01,
    min_effect: float = MIN_EFFECT,
    n_permutations: int = 200,
    max_steps: int = 8,
    seed: int = 0,
    support: Support | None = None,
    proxy_agreement: float = 0.5,
    named_min_effect: float | None = None,
) -> Evidence:
    """:func:`model_evidence` as (K, P, 2) arrays: memory in classes × phrases, no rows.

    ``support``: which pairs the explanations name (:data:`Support`); each step accepts the phrase with
    the largest z among the passing pairs they name, where they name some.

    ``proxy_agreement``: a phrase whose presence agrees with an accepted one's (|phi| within labels ≥ this)
    is its *proxy*: not tested again, a stratum of later steps (``proxy_of``; docs/decisions.md, "Proxies").

    ``named_min_effect``: once no pair passes, a named pair *for* a class passes with this effect (None:
    never); for a probe the model was trained on (decisions, "Training-split audits")."""
    k, p = n_classes, len(behaviour.phrases)
    _check_grid(alpha, n_permutations, eligible, (k, p, 2))
    x, pred = behaviour.presence, behaviour.predictions
    rng = np.random.default_rng(seed)
    given: list[int] = []
    decided = np.zeros((k, p, 2), dtype=bool)
    record = {name: np.full((k, p, 2), np.nan) for name in FIGURES}
    accepted = np.zeros((k, p, 2), dtype=bool)
    conditioned: list[int] = []  # the accepted phrases and their proxies: the strata
    aliases: dict[int, list[tuple[int, float]]] = {}
    for step in range(1, max_steps + 1):
        stratum, tables, zd, ed = _step(behaviour, k, conditioned)
        open_ = eligible & ~decided
        any_open = open_.any(axis=2)
        null = _permuted_max(stratum, tables, pred, x, any_open, n_permutations, rng)
        thr = float(np.quantile(null, 1.0 - alpha)) if np.isfinite(null).any() else np.inf
        if step == 1:
            record["z_first"][:], record["effect_first"][:] = zd, ed
        for name, value in (("z_model", zd), ("effect", ed), ("threshold", thr), ("step", step)):
            np.copyto(record[name], value, where=open_)
        over_null = open_ & over_threshold(zd, thr)
        passing = _passing(over_null, ed, min_effect, named_min_effect, support)
        if not passing.any():
            break
        best = _best_phrase(passing, zd, support)
        proxies, signed = _proxies(behaviour, best, conditioned, proxy_agreement)
        pairs = _accepted_pairs(best, proxies, passing, over_null, zd, ed, named_min_effect, support)
        strong = over_null & (ed >= min_effect)
        accepted |= _owner_reads_complement(pairs, best, proxies[signed < 0], strong, zd, record)
        decided |= accepted
        decided[:, best, :] = True
        given.append(best)
        aliases[best] = _absorb_proxies(best, proxies, signed, conditioned, eligible, decided, record)
    return Evidence(list(behaviour.phrases), eligible, accepted, record, given, aliases)
