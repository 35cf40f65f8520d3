"""Channel bank: batched shrinkage LDA equals scikit-learn; save/load guards identity and integrity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

from textcam.bank import (
    BankCorruptError,
    BankMeta,
    BankMismatchError,
    ChannelBank,
    lda_directions,
    top_bottom,
)


def _problem(seed: int = 0, n: int = 500, c: int = 48, d: int = 96):
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(n, d, generator=g) + 0.7, dim=1)
    gap = torch.randn(n, c, generator=g) + 4 * emb[:, :c]
    return emb, gap


@pytest.mark.parametrize("shrinkage", [0.05, 0.3, 0.7, 1.0])
def test_lda_matches_sklearn(shrinkage: float) -> None:
    emb, gap = _problem()
    m = 30
    pos, neg = top_bottom(gap, m)
    ours = lda_directions(emb, pos, neg, shrinkage)
    y = np.r_[np.ones(m), np.zeros(m)]
    for j in range(0, ours.shape[0], 5):  # sampled channels
        x = torch.cat([emb[pos[j]], emb[neg[j]]]).double().numpy()
        ref = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=shrinkage).fit(x, y).coef_[0]
        cos = float(ref @ ours[j].double().numpy() / np.linalg.norm(ref))
        assert cos >= 0.99, (j, cos)  # same sign too: positives score higher


def test_top_bottom_picks_extremes() -> None:
    gap = torch.tensor([[0.0, 5.0], [1.0, 4.0], [2.0, 3.0], [3.0, 2.0], [4.0, 1.0]])
    top, bottom = top_bottom(gap, 2)
    assert sorted(top[0].tolist()) == [3, 4] and sorted(bottom[0].tolist()) == [0, 1]
    assert sorted(top[1].tolist()) == [0, 1] and sorted(bottom[1].tolist()) == [3, 4]
    with pytest.raises(ValueError, match="at least 2\\*M"):
        top_bottom(gap, 3)


def test_dead_channel_gets_zero_direction() -> None:
    emb, _ = _problem(c=4)
    idx = torch.arange(20).view(1, 20)
    d = lda_directions(emb, idx, idx, 0.5)  # identical sets: no difference of means
    assert torch.count_nonzero(d) == 0


def test_bad_shrinkage_rejected() -> None:
    emb, gap = _problem()
    pos, neg = top_bottom(gap, 10)
    with pytest.raises(ValueError, match="shrinkage"):
        lda_directions(emb, pos, neg, 0.0)


def _bank() -> ChannelBank:
    meta = BankMeta(
        model_id="m1",
        layer="layer4",
        clip_id="clipA",
        m=10,
        shrinkage=0.5,
        n_probe=100,
        probe_hash="abc",
        n_channels=3,
        embed_dim=4,
    )
    return ChannelBank(torch.nn.functional.normalize(torch.randn(3, 4), dim=1), meta)


def test_save_load_roundtrip_and_mismatch(tmp_path) -> None:
    bank = _bank()
    path = bank.save(tmp_path / "bank.safetensors")
    loaded = ChannelBank.load(path, model_id="m1", layer="layer4", clip_id="clipA")
    assert torch.equal(loaded.directions, bank.directions)
    assert loaded.bank_id == bank.bank_id
    with pytest.raises(BankMismatchError, match="classifier 'm1'"):
        ChannelBank.load(path, model_id="other")
    with pytest.raises(BankMismatchError, match="layer"):
        ChannelBank.load(path, layer="layer3")
    with pytest.raises(BankMismatchError, match="CLIP"):
        ChannelBank.load(path, clip_id="clipB")


def test_corrupt_bank_detected(tmp_path) -> None:
    path = _bank().save(tmp_path / "bank.safetensors")
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # flip bits inside the tensor data
    path.write_bytes(bytes(raw))
    with pytest.raises(BankCorruptError, match="checksum"):
        ChannelBank.load(path)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(BankCorruptError, match="unreadable"):
        ChannelBank.load(path)
    with pytest.raises(FileNotFoundError):
        ChannelBank.load(tmp_path / "missing.safetensors")


def test_gram_and_gathered_paths_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    import textcam.bank

    emb, gap = _problem(c=40)
    pos, neg = top_bottom(gap, 25)
    via_gram = lda_directions(emb, pos, neg, 0.4, chunk_size=16)
    monkeypatch.setattr(textcam.bank, "GRAM_MAX_ROWS", 0)  # as for a probe set too large for a Gram matrix
    gathered = lda_directions(emb, pos, neg, 0.4, chunk_size=16)
    assert torch.allclose(via_gram, gathered, atol=1e-5)
