"""Is a phrase visible in the images a class is predicted for? CLIP zero-shot on the probe set.

A high ``z_lift`` says the explanations of class c lean on phrase p. That alone also picks out how a
model weighs a feature that is *not* tied to the class in the data. Measured on the demo's control world
(no planted cue): "large object" counts less for circle than for the other shapes (z_lift 3.9 over its
permutation threshold 3.7; the circle logit gains +1.9 from small to large, the other shapes +2.7 to
+3.4), a property of the model, while circles are no larger or smaller than other shapes in the images.
A spurious correlation is a cue that co-occurs with the class in the data and that the model uses. The
probe images already carry CLIP embeddings and predictions from calibration
(:class:`textcam.bank.ProbeSet`), so the co-occurrence costs one matrix product:

* ``s(x, p)``: cosine similarity of image x's CLIP embedding and phrase p's text embedding;
* ``data_lift = (mean_{x in c} s - mean_{x not in c} s) / sd_all(s)``, c the *predicted* class, as the
  explanations' lift in :mod:`tasks.store`;
* ``data_z = data_lift / se``, ``se = sqrt(N/(N-1) · (1/n_c + 1/(N-n_c)))`` the permutation standard error
  of a lift with no association;
* ``data_threshold``: one-sided, family-wise 1 % over the vocabulary (Bonferroni), Φ⁻¹(1 − 0.01/P).

Classes with fewer than ``min_class_images`` probe images predicted (or none among the others) get NaN:
too few to tell, and the flag rule then goes by the explanations alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import NormalDist

import numpy as np
import pandas as pd
import torch

from textcam.bank import ProbeSet

COLUMNS = ["class_index", "phrase", "n_probe_class", "data_lift", "data_z", "data_threshold"]


def cooccurrence(
    probe: ProbeSet,
    phrases: Sequence[str],
    phrase_embeddings: torch.Tensor,
    *,
    min_class_images: int = 10,
    alpha: float = 0.01,
) -> pd.DataFrame:
    """One row per predicted class of the probe × phrase with the :data:`COLUMNS` figures.

    >>> cooccurrence(bank.probe, phrases, text_embeddings).query("data_z > data_threshold")  # doctest: +SKIP
    """
    if len(phrases) != phrase_embeddings.shape[0]:
        raise ValueError(f"{len(phrases)} phrases but {phrase_embeddings.shape[0]} embeddings")
    if phrase_embeddings.shape[1] != probe.embeddings.shape[1]:
        raise ValueError(
            f"phrase embeddings have {phrase_embeddings.shape[1]} dimensions, the probe's CLIP "
            f"{probe.embeddings.shape[1]}: not the same CLIP model"
        )
    if not 0.0 < alpha < 1.0:
        raise ValueError("alpha must lie in (0, 1)")
    if min_class_images < 1:
        raise ValueError("min_class_images must be at least 1")
    img = torch.nn.functional.normalize(probe.embeddings.double(), dim=1)
    txt = torch.nn.functional.normalize(phrase_embeddings.double().cpu(), dim=1)
    s = (img @ txt.T).numpy()  # (N, P)
    classes, codes = np.unique(probe.predictions.numpy(), return_inverse=True)
    n = s.shape[0]
    n_class = np.bincount(codes, minlength=len(classes)).astype(np.float64)  # (K,)
    sums = np.zeros((len(classes), s.shape[1]))
    np.add.at(sums, codes, s)  # class sums of s, one pass over the images
    total = s.sum(0)
    sd_all = s.std(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_c = sums / n_class[:, None]
        mean_o = (total[None, :] - sums) / (n - n_class)[:, None]
        lift = np.where(sd_all > 1e-12, (mean_c - mean_o) / sd_all, np.nan)
        se = np.sqrt(n / (n - 1) * (1 / n_class + 1 / (n - n_class)))
        z = lift / se[:, None]
    usable = (n_class >= min_class_images) & (n - n_class >= 1)
    lift[~usable], z[~usable] = np.nan, np.nan
    threshold = NormalDist().inv_cdf(1.0 - alpha / max(len(phrases), 1))
    k, p = np.meshgrid(np.arange(len(classes)), np.arange(len(phrases)), indexing="ij")
    return pd.DataFrame(
        {
            "class_index": classes[k.ravel()].astype(np.int32),
            "phrase": np.asarray(list(phrases), dtype=object)[p.ravel()],
            "n_probe_class": n_class[k.ravel()].astype(np.int64),
            "data_lift": lift.ravel(),
            "data_z": z.ravel(),
            "data_threshold": threshold,
        },
        columns=COLUMNS,
    )
