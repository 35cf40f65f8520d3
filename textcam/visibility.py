"""Which phrases CLIP sees in an image: per-phrase cut-offs on image–text cosine, fitted on the probe set.

An explanation's phrases code T_c(x), the class's evidence in CLIP space. Most of that evidence is the
same for every image of a class, so the coding also names things the image does not have ("yellow" in
every square's explanation on a control world, whatever the square's colour). A phrase is *shown* only
when CLIP sees it in the image itself and it carries at least ``min_ratio`` of the first phrase's weight.

Each image's cosines are first centred on its mean over the vocabulary (some images are close to every
text); each phrase's centred cosines over the probe images are then modelled as two Gaussians (absent,
present; EM from Otsu's split), the present one split again where it holds two modes (the phrase's own
images and those of values CLIP holds close to it), and the phrase is seen where its top mode is the
more probable (:func:`presence_mixture`; precision and recall per attribute: ``bench/presence.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from textcam.io import atomic_path
from textcam.schema import SPECIFIC_Z

# Nats per image by which two Gaussians must beat one on a phrase's "present" images to split them:
# two equal modes about 4 sds apart (docs/decisions.md).
SPLIT_GAIN = 0.12
# A lower "present" mode more than this many times as far from the absent images as from the top mode
# (pooled sds) is the phrase itself, seen a little less, not a neighbouring value (docs/decisions.md).
NEAR_RATIO = 2.0


Gaussians = tuple[np.ndarray, np.ndarray, np.ndarray]  # weights, means, sds; each (K, P)


def cosine(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> np.ndarray:
    """(N, P) cosine similarity of every image to every phrase, float64."""
    img = torch.nn.functional.normalize(image_embeddings.double().cpu(), dim=1)
    txt = torch.nn.functional.normalize(text_embeddings.double().cpu(), dim=1)
    return (img @ txt.T).numpy()


def otsu_thresholds(sim: np.ndarray, bins: int = 128) -> np.ndarray:
    """Per column of ``sim`` (N, P): the cut maximising the between-group variance (Otsu), vectorised."""
    if sim.ndim != 2 or sim.shape[0] < 2:
        raise ValueError("need an (N, P) similarity matrix with N >= 2")
    lo, hi = sim.min(0), sim.max(0)
    width = np.where(hi > lo, hi - lo, 1.0)
    idx = np.clip(((sim - lo) / width * bins).astype(np.int64), 0, bins - 1)  # (N, P)
    hist = np.zeros((bins, sim.shape[1]))
    np.add.at(hist, (idx, np.arange(sim.shape[1])[None, :]), 1.0)
    centres = (np.arange(bins) + 0.5)[:, None]
    w0 = np.cumsum(hist, 0)
    s0 = np.cumsum(hist * centres, 0)
    n, s = w0[-1], s0[-1]
    w1 = n - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = w0 * w1 * (s0 / w0 - (s - s0) / w1) ** 2
    between = np.where((w0 > 0) & (w1 > 0), between, -1.0)
    # Empty bins between two groups leave the criterion flat: cut in the middle of the flat top.
    best = between.max(0, keepdims=True)
    flat = between >= best - 1e-9 * np.abs(best)
    first, last = flat.argmax(0), bins - 1 - flat[::-1].argmax(0)
    cut = (first + last) / 2 + 1  # images in bins above the cut are "present"
    return lo + cut / bins * width


def log_density(sim: np.ndarray, weights: np.ndarray, means: np.ndarray, sds: np.ndarray) -> np.ndarray:
    """(K, N, P) log of each component's weighted Gaussian density at ``sim`` (N, P), up to a constant;
    ``weights``, ``means``, ``sds`` are (K, P)."""
    return (
        np.log(weights)[:, None]
        - np.log(sds)[:, None]
        - 0.5 * ((sim[None] - means[:, None]) / sds[:, None]) ** 2
    )


def _em(sim: np.ndarray, resp: np.ndarray, members: np.ndarray, iters: int) -> tuple[np.ndarray, ...]:
    """Two-component 1-D Gaussian EM per column of ``sim`` (N, P) over the rows where ``members`` (N, P);
    ``resp`` starts the upper component's responsibilities. Returns weights, means, sds (each (2, P),
    upper second), the upper responsibilities (N, P) and the log-likelihood per member (P,)."""
    m = members.astype(np.float64)
    n = m.sum(0).clip(1.0)
    for _ in range(iters):
        r = np.stack([1.0 - resp, resp]) * m[None]  # (2, N, P)
        w = r.sum(1).clip(1e-9)
        mu = (r * sim[None]).sum(1) / w
        sd = np.sqrt((r * (sim[None] - mu[:, None]) ** 2).sum(1) / w).clip(1e-6)
        log_p = log_density(sim, w / n, mu, sd)
        top = log_p.max(0)
        p = np.exp(log_p - top[None])
        resp = p[1] / p.sum(0)
    loglik = ((np.log(p.sum(0)) + top) * m).sum(0) / n
    order = mu.argsort(0)  # keep the upper component second
    take = lambda a: np.take_along_axis(a, order, 0)  # noqa: E731
    upper = np.where(order[1] == 1, resp, 1.0 - resp)
    return take(w / n), take(mu), take(sd), upper, loglik


def two_gaussians(sim: np.ndarray, iters: int = 100) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A two-component 1-D Gaussian mixture per column of ``sim`` (N, P), fitted by EM from the Otsu split.

    Returns weights, means and standard deviations, each (2, P), component 1 the upper one.
    """
    resp = (sim > otsu_thresholds(sim)).astype(np.float64)
    w, mu, sd, _, _ = _em(sim, resp, np.ones_like(sim, dtype=bool), iters)
    return w, mu, sd


def _one_gaussian_loglik(sim: np.ndarray, members: np.ndarray) -> np.ndarray:
    m = members.astype(np.float64)
    n = m.sum(0).clip(1.0)
    mu = (sim * m).sum(0) / n
    sd = np.sqrt(((sim - mu) ** 2 * m).sum(0) / n).clip(1e-6)
    return (m * (-np.log(sd) - 0.5 * ((sim - mu) / sd) ** 2)).sum(0) / n


def presence_mixture(sim: np.ndarray, iters: int = 100) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per column of ``sim`` (N, P): absent, near and present components, each (3, P), present last.

    Two Gaussians first (:func:`two_gaussians`). Where the upper one is itself two modes (the images of
    the phrase's value and of the values CLIP holds close to it: "red" on purple images), it is split
    and only its top mode is "present"; the near mode keeps weight 0 elsewhere. "Itself two modes": two
    Gaussians fit the upper images better than one by more than ``SPLIT_GAIN`` nats per image
    (docs/decisions.md). A lower mode that sits far closer to the top one than to the absent images
    (``NEAR_RATIO``) is not another value but the phrase seen a little less ("with a logo" on images
    that also have a border), and stays "present".
    """
    (w, mu, sd), (w2, mu2, sd2), two_modes, ratio = upper_modes(sim, iters)
    split = two_modes & (ratio <= NEAR_RATIO)
    weights = np.stack([w[0], np.where(split, w[1] * w2[0], 0.0), np.where(split, w[1] * w2[1], w[1])])
    means = np.stack([mu[0], np.where(split, mu2[0], mu[0]), np.where(split, mu2[1], mu[1])])
    sds = np.stack([sd[0], np.where(split, sd2[0], sd[0]), np.where(split, sd2[1], sd[1])])
    return weights, means, sds


def upper_modes(sim: np.ndarray, iters: int = 100) -> tuple[Gaussians, Gaussians, np.ndarray, np.ndarray]:
    """Per column of ``sim`` (N, P): the absent/present Gaussians (weights, means, sds, each (2, P)), the
    present images' own two modes (the same, lower mode first), whether those are two modes
    (``SPLIT_GAIN``) and, (P,), how many times farther the lower mode lies from the absent images than
    from the top mode (``NEAR_RATIO``)."""
    w, mu, sd = two_gaussians(sim, iters)
    log_p = log_density(sim, w, mu, sd)
    upper = log_p[1] > log_p[0]
    centre = (sim * upper).sum(0) / upper.sum(0).clip(1)
    w2, mu2, sd2, _, loglik = _em(sim, (sim > centre).astype(np.float64), upper, iters)
    two_modes = (loglik - _one_gaussian_loglik(sim, upper) > SPLIT_GAIN) & (upper.sum(0) >= 4)
    below, above = separation(mu[0], sd[0], mu2[0], sd2[0]), separation(mu2[0], sd2[0], mu2[1], sd2[1])
    return (w, mu, sd), (w2, mu2, sd2), two_modes, below / np.maximum(above, 1e-12)


def separation(mu_a: np.ndarray, sd_a: np.ndarray, mu_b: np.ndarray, sd_b: np.ndarray) -> np.ndarray:
    """|μa − μb| in pooled standard deviations (Ashman's D)."""
    return np.abs(mu_b - mu_a) / np.sqrt((sd_a**2 + sd_b**2) / 2)


def centre_images(sim: np.ndarray) -> np.ndarray:
    """Subtract each image's mean similarity over the vocabulary: some images are close to every text."""
    return sim - sim.mean(1, keepdims=True)


@dataclass(frozen=True)
class PhraseVisibility:
    """Per-phrase Gaussian mixtures of image-centred cosines; ``visible`` says which phrases to show.

    CLIP sees phrase p in image x when the last ("present") component is the more probable one for
    x's image-centred cosine with p (posterior above ``1/2``, the Bayes decision).
    """

    text_embeddings: torch.Tensor  # (P, D) the vocabulary's CLIP text embeddings
    weights: np.ndarray  # (K, P), K components per phrase, "present" last (files from 0.1 have K = 2)
    means: np.ndarray  # (K, P)
    sds: np.ndarray  # (K, P)

    @classmethod
    def fit(cls, probe_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> PhraseVisibility:
        """Fit every phrase's mixture over the probe images' CLIP embeddings."""
        if probe_embeddings.shape[1] != text_embeddings.shape[1]:
            raise ValueError("image and text embeddings come from different CLIP models (dimensions differ)")
        sim = centre_images(cosine(probe_embeddings, text_embeddings))
        return cls(text_embeddings, *presence_mixture(sim))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``path`` (safetensors), atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {
            "text_embeddings": self.text_embeddings.detach().cpu().float().contiguous(),
            **{
                k: torch.from_numpy(np.ascontiguousarray(getattr(self, k)))
                for k in ("weights", "means", "sds")
            },
        }
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PhraseVisibility:
        from safetensors.torch import load_file

        t = load_file(str(path))
        return cls(t["text_embeddings"], *(t[k].numpy() for k in ("weights", "means", "sds")))

    def posterior(self, image_embeddings: torch.Tensor) -> np.ndarray:
        """(N, P) probability that CLIP sees each phrase in each image (the last component's share)."""
        return self._posterior(centre_images(cosine(image_embeddings, self.text_embeddings)))

    def _posterior(self, sim: np.ndarray) -> np.ndarray:
        log_p = log_density(sim, self.weights.clip(1e-12), self.means, self.sds)
        log_p -= log_p.max(0, keepdims=True)
        p = np.exp(log_p)
        return p[-1] / p.sum(0)

    def presence(self, image_embeddings: torch.Tensor) -> np.ndarray:
        """(N, P) bool: CLIP sees the phrase in the image. Above the present mode's mean it always does
        (a wider absent component would otherwise win back the far tail)."""
        sim = centre_images(cosine(image_embeddings, self.text_embeddings))
        return (self._posterior(sim) > 0.5) | (sim >= self.means[-1][None])

    def visible(
        self,
        image_embeddings: torch.Tensor,
        indices: torch.Tensor,
        scores: torch.Tensor,
        min_ratio: float = 0.5,
    ) -> torch.Tensor:
        """(N, k) bool over selected phrases ``indices`` (-1: none) with coefficients ``scores``: the
        phrase is seen in its image and weighs at least ``min_ratio`` of the row's first phrase."""
        return self.seen(image_embeddings, indices) & self.strong(scores, min_ratio)

    @staticmethod
    def strong(scores: torch.Tensor, min_ratio: float = 0.5) -> torch.Tensor:
        """(N, k) bool: the coefficient is at least ``min_ratio`` of the row's first (largest) one."""
        if not 0.0 <= min_ratio <= 1.0:
            raise ValueError(f"min_ratio must lie in [0, 1], got {min_ratio}")
        return scores.cpu() >= min_ratio * scores.cpu()[:, :1]

    def seen(self, image_embeddings: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """(N, k) bool over selected phrases ``indices`` (-1: none): CLIP sees the phrase in its image."""
        presence = torch.from_numpy(self.presence(image_embeddings))  # (N, P)
        idx = indices.cpu().long()
        return presence.gather(1, idx.clamp_min(0)) & (idx >= 0)


def specific_among_strong(
    seen: np.ndarray,
    scores: np.ndarray,
    strong: np.ndarray,
    classes: np.ndarray,
    base_rate: np.ndarray | None = None,
) -> np.ndarray:
    """(K, P) bool: the audit flow's form of :func:`image_specific`, from what each explanation stores.

    Over the explanations of class k that weigh phrase p at least half their first phrase (``strong``,
    (N, P) bool), CLIP sees p in all of them; or seeing it (``seen``) correlates with its weight
    (``scores``) beyond ``SPECIFIC_Z`` (r·√n); or CLIP sees it there more often than in a random probe
    image (``base_rate``, (P,): its "present" share, :attr:`PhraseVisibility.weights`), by a one-sided
    binomial z beyond ``SPECIFIC_Z``. A filler the explanations weigh in every image of the class is seen
    there at its base rate and fails all three. The same rule as ``tasks.store``'s ``phrase_specificity``
    table, in numpy (the truth sweep measures it with this).
    """
    k = int(classes.max(initial=-1)) + 1
    onehot = np.zeros((k, classes.shape[0]))
    onehot[classes, np.arange(classes.shape[0])] = 1.0
    w = strong.astype(np.float64)
    x, s = seen.astype(np.float64) * w, scores.astype(np.float64) * w
    n, sx, ss = onehot @ w, onehot @ x, onehot @ s
    sxs, sss = onehot @ (x * s), onehot @ (s * s)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (n * sxs - sx * ss) / np.sqrt((n * sx - sx * sx) * (n * sss - ss * ss))
        above = np.zeros_like(n, dtype=bool)
        if base_rate is not None:
            pi = np.clip(base_rate, 1e-6, 1 - 1e-6)[None, :]
            above = np.nan_to_num((sx - n * pi) / np.sqrt(n * pi * (1 - pi))) > SPECIFIC_Z
    return (n > 0) & ((sx == n) | (np.nan_to_num(r) * np.sqrt(n) > SPECIFIC_Z) | above)


def image_specific(presence: np.ndarray, scores: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """(K, P) bool: within the images of class k, the explanations weigh phrase p more where CLIP sees it.

    ``presence`` (N, P) bool, ``scores`` (N, P) the explanations' coefficients (0 where not selected),
    ``classes`` (N,) the explained class. A phrase the explanations give every image of a class alike
    ("wooden" for every circle, by a tiny CLIP's confusion) says nothing about the image and is not
    shown for that class: the point-biserial correlation of presence and coefficient must be positive
    beyond ``SPECIFIC_Z`` (r·√n, one-sided 0.001). A phrase CLIP sees in every image of the class needs no
    such test (nothing to correlate) and is kept; one it sees in none is dropped. Classes with fewer
    than 3 images are dropped. :func:`specific_among_strong` with every phrase counted as strong.
    """
    out = specific_among_strong(presence, scores, np.ones_like(presence, dtype=bool), classes)
    counts = np.bincount(classes, minlength=out.shape[0])
    return out & (counts >= 3)[:, None]
