"""Does a phrase go with a class in the classifier's training data? CLIP's presence calls per label.

A shortcut has two halves: the model acts on the cue (:mod:`tasks.behaviour`), and the cue goes with the
class in the data it learned from. The first half alone also picks out how well the model handles a trait
that goes with no class: in the truth sweep, a biased classifier recognises triangles better when they are
large, with an effect as large as a planted cue's, while triangles are no larger than other shapes in its
training data (docs/decisions.md, "Flags need the data too"). With the training images, a flag also needs

* ``correlation[c, p]`` = P(CLIP sees p | labelled c) − P(CLIP sees p | labelled otherwise), the same risk
  difference as a flag's effect, of its presence instead of the prediction, in the flag's direction at
  least ``flags.min_correlation``.

Presence is the probe's two-Gaussian call of :mod:`textcam.visibility`, the call the flag's effect was
measured with, so the phrase means the same thing in both halves. Fitted on biased training images
instead, the call can follow another trait: on one truth-sweep world (seed 11, b14) "small object" fitted
there went with no class (-0.03) while circles were small in 90 % of them (docs/decisions.md, "Flags need
the data too"). Where the probe is the training data (``flags.probe_seen_in_training``) the probe's own
presence and labels give it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from textcam.clip import ClipEncoder
    from textcam.visibility import PhraseVisibility

log = logging.getLogger(__name__)


def label_correlation(presence: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """(K, P) P(present | label c) − P(present | label ≠ c) over the images with a label (≥ 0); NaN for a
    class with no labelled images, or no others."""
    presence = np.asarray(presence, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (presence.shape[0],):
        raise ValueError(f"{labels.shape[0]} labels for {presence.shape[0]} images")
    known = (labels >= 0) & (labels < n_classes)
    onehot = np.zeros((int(known.sum()), n_classes))
    onehot[np.arange(onehot.shape[0]), labels[known]] = 1.0
    x = presence[known]
    n_class = onehot.sum(0)[:, None]  # (K, 1)
    in_class = onehot.T @ x  # (K, P) images of class c showing p
    with np.errstate(divide="ignore", invalid="ignore"):
        rd = in_class / n_class - (x.sum(0)[None, :] - in_class) / (x.shape[0] - n_class)
    rd[((n_class == 0) | (n_class == x.shape[0]))[:, 0]] = np.nan
    return rd


def training_correlation(
    paths: Sequence[str],
    labels: np.ndarray,
    n_classes: int,
    clip: ClipEncoder,
    phrase_embeddings: torch.Tensor,
    *,
    visibility: PhraseVisibility | None = None,
    batch_size: int = 64,
    progress: bool = False,
) -> np.ndarray:
    """:func:`label_correlation` of the phrases over training images read from ``paths``: one CLIP pass.
    ``visibility``: the probe's presence model of the phrases (None: fitted on these images). Unreadable
    images are left out (logged)."""
    from tqdm.auto import tqdm

    from textcam.data import iter_batches

    embeddings, kept, failed = [], [], 0
    bar = tqdm(total=len(paths), desc="training data", unit="img", disable=not progress)
    with torch.inference_mode():
        for batch in iter_batches(paths, [clip.preprocess], batch_size=batch_size):
            failed += len(batch.failed)
            if batch.indices.numel():
                embeddings.append(clip.encode_images(batch.tensors[0]).cpu())
                kept.append(batch.indices.cpu())
            bar.update(batch.indices.numel() + len(batch.failed))
    bar.close()
    if not embeddings:
        raise ValueError(f"no training image could be read ({failed} failures)")
    if failed:
        log.warning(
            "%d of %d training images could not be read: left out of the data check", failed, len(paths)
        )
    emb = torch.cat(embeddings)
    text = phrase_embeddings.to(emb.dtype).cpu()
    if visibility is None:
        from textcam.visibility import PhraseVisibility

        visibility = PhraseVisibility.fit(emb, text)
    presence = visibility.presence(emb)
    return label_correlation(presence, np.asarray(labels)[torch.cat(kept).numpy()], n_classes)
