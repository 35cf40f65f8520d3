"""The data check of the flags: is a phrase visible in the probe images predicted as a class?"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
import pytest
import torch

from tasks.cooccurrence import COLUMNS, cooccurrence
from textcam.bank import BankCorruptError, ProbeSet


def _reference(emb: np.ndarray, pred: np.ndarray, txt: np.ndarray, k: int, p: int) -> tuple[float, float]:
    """data_lift and data_z of class k × phrase p, one image at a time."""
    s = []
    for e in emb:
        s.append(float(e @ txt[p] / (np.linalg.norm(e) * np.linalg.norm(txt[p]))))
    s = np.array(s)
    inside, outside = s[pred == k], s[pred != k]
    lift = (inside.mean() - outside.mean()) / s.std()
    n, n_c = len(s), len(inside)
    return lift, lift / np.sqrt(n / (n - 1) * (1 / n_c + 1 / (n - n_c)))


def _probe(seed: int = 0, n: int = 120, d: int = 16) -> tuple[ProbeSet, torch.Tensor]:
    """Three predicted classes; class 1's images carry the direction of phrase 0."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, d, generator=g)
    pred = torch.arange(n) % 3
    txt = torch.randn(4, d, generator=g)
    emb[pred == 1] += 1.5 * torch.nn.functional.normalize(txt[0], dim=0)
    return ProbeSet(emb, pred, "hash", "clip"), txt


def test_matches_a_plain_reference() -> None:
    probe, txt = _probe()
    got = cooccurrence(probe, ["a", "b", "c", "d"], txt).set_index(["class_index", "phrase"])
    assert list(got.reset_index().columns) == COLUMNS and len(got) == 12
    for k in range(3):
        for p, name in enumerate("abcd"):
            e, t = probe.embeddings.double().numpy(), txt.double().numpy()
            lift, z = _reference(e, probe.predictions.numpy(), t, k, p)
            assert got.loc[(k, name), "data_lift"] == pytest.approx(lift, rel=1e-9)
            assert got.loc[(k, name), "data_z"] == pytest.approx(z, rel=1e-9)
    assert (got["n_probe_class"] == 40).all()
    assert got["data_threshold"].iloc[0] == pytest.approx(NormalDist().inv_cdf(1 - 0.01 / 4))


def test_the_planted_phrase_is_visible_only_in_its_class() -> None:
    probe, txt = _probe()
    got = cooccurrence(probe, ["a", "b", "c", "d"], txt).set_index(["class_index", "phrase"])
    threshold = got["data_threshold"].iloc[0]
    assert got.loc[(1, "a"), "data_z"] > 2 * threshold
    assert got.loc[(0, "a"), "data_z"] < 0 and got.loc[(2, "a"), "data_z"] < 0  # the others show it less
    assert (got.drop(index=[(0, "a"), (1, "a"), (2, "a")])["data_z"].abs() < threshold).all()


def test_classes_with_too_few_probe_images_are_unknown() -> None:
    probe, txt = _probe()
    pred = probe.predictions.clone()
    pred[:4] = 7  # four images of a class 7
    got = cooccurrence(ProbeSet(probe.embeddings, pred, "h", "c"), list("abcd"), txt, min_class_images=5)
    rare = got[got["class_index"] == 7]
    assert (rare["n_probe_class"] == 4).all()
    assert rare["data_z"].isna().all() and rare["data_lift"].isna().all()
    assert got.loc[got["class_index"] != 7, "data_z"].notna().all()


def test_bad_input_is_rejected(tmp_path) -> None:
    probe, txt = _probe()
    with pytest.raises(ValueError, match="3 phrases but 4"):
        cooccurrence(probe, ["a", "b", "c"], txt)
    with pytest.raises(ValueError, match="not the same CLIP"):
        cooccurrence(probe, list("abcd"), txt[:, :8])
    with pytest.raises(ValueError, match="alpha"):
        cooccurrence(probe, list("abcd"), txt, alpha=0.0)
    with pytest.raises(ValueError, match="same images"):
        ProbeSet(probe.embeddings, probe.predictions[:-1], "h", "c")
    bad = tmp_path / "probe.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(BankCorruptError, match="unreadable"):
        ProbeSet.load(bad)


def test_probe_set_round_trips(tmp_path) -> None:
    probe, _ = _probe()
    back = ProbeSet.load(probe.save(tmp_path / "p.safetensors"))
    assert torch.equal(back.embeddings, probe.embeddings) and torch.equal(back.predictions, probe.predictions)
    assert (back.probe_hash, back.clip_id) == ("hash", "clip")
