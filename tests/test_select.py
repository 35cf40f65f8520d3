"""Phrase selection: sparse, non-negative, decorrelated; channel grouping."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from textcam.select import center_vocabulary, group_channels, nearest_phrases, select_phrases


def _orthonormal(p: int, d: int, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, p, generator=torch.Generator().manual_seed(seed)))
    return q.T.contiguous()  # (p, d) orthonormal rows


def test_recovers_sparse_code() -> None:
    e = _orthonormal(10, 16)
    y = (0.8 * e[3] + 0.5 * e[7])[None]
    sel = select_phrases(y, e, 4)
    assert sel.indices[0, :2].tolist() == [3, 7]
    assert sel.indices[0, 2:].tolist() == [-1, -1]  # nothing else correlates positively
    norm = (0.8**2 + 0.5**2) ** 0.5
    assert torch.allclose(sel.scores[0, :2], torch.tensor([0.8, 0.5]) / norm, atol=1e-4)


def test_near_duplicates_are_not_both_chosen() -> None:
    e = _orthonormal(6, 16)
    dup = torch.nn.functional.normalize(e[0] + 0.05 * e[5], dim=0)  # a near-copy of phrase 0
    vocab = torch.cat([e, dup[None]])
    y = (1.0 * e[0] + 0.6 * e[2])[None]
    plain_topk = (y @ vocab.T).topk(2).indices[0].tolist()
    assert sorted(plain_topk) == [0, 6]  # a top-k returns the duplicate pair
    sel = select_phrases(y, vocab, 2)
    assert sorted(sel.indices[0].tolist()) == [0, 2]


def test_nearest_phrases_keep_what_the_code_explains_away() -> None:
    """y = 0.8·e0 + 0.5·e1 and a third phrase halfway between them: the sparse code needs only e0 and e1,
    but the third is the nearest phrase of all (cosine 0.92), and an opposite phrase fills no slot."""
    e = _orthonormal(4, 8)
    mid = torch.nn.functional.normalize(e[0] + e[1], dim=0)
    vocab = torch.cat([e[:2], mid[None], -e[:1]])  # 0, 1, between them, opposite of 0
    y = (0.8 * e[0] + 0.5 * e[1])[None]
    norm = (0.8**2 + 0.5**2) ** 0.5
    near = nearest_phrases(y, vocab, 4)
    assert near.indices[0].tolist() == [2, 0, 1, -1]
    expected = torch.tensor([(0.8 + 0.5) / (2**0.5 * norm), 0.8 / norm, 0.5 / norm, 0.0])
    assert torch.allclose(near.scores[0], expected, atol=1e-6)
    with pytest.raises(ValueError, match="k must be >= 1"):
        nearest_phrases(y, vocab, 0)


def test_no_evidence_no_phrases() -> None:
    e = _orthonormal(5, 8)
    sel = select_phrases(torch.zeros(2, 8), e, 3)
    assert (sel.indices == -1).all() and (sel.scores == 0).all()


def test_center_vocabulary_removes_common_component() -> None:
    e = _orthonormal(4, 8)
    shifted = torch.nn.functional.normalize(e + 3.0 * torch.ones(8) / 8**0.5, dim=1)
    c = center_vocabulary(shifted)
    assert (c @ c.T).fill_diagonal_(0).abs().max() < (shifted @ shifted.T).fill_diagonal_(0).abs().max()


def test_group_channels_assigns_by_similarity() -> None:
    e = _orthonormal(3, 6)
    directions = torch.stack([e[0], e[1], e[0], torch.zeros(6)])  # channel 3 is dead
    contributions = torch.tensor([[1.0, 2.0, -1.0, 5.0]])
    groups = torch.stack([e[1], e[0]])[None]  # group 0 ~ e1, group 1 ~ e0
    assign = group_channels(contributions, directions, groups, torch.tensor([[True, True]]))
    assert assign.tolist() == [[1, 0, -1, -1]]


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 4),
    p=st.integers(1, 12),
    d=st.integers(2, 10),
    k=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    redundancy=st.floats(0, 2),
)
def test_selection_never_crashes(n: int, p: int, d: int, k: int, seed: int, redundancy: float) -> None:
    g = torch.Generator().manual_seed(seed)
    vocab = torch.nn.functional.normalize(torch.randn(p, d, generator=g), dim=1)
    targets = torch.randn(n, d, generator=g)
    sel = select_phrases(targets, vocab, k, redundancy=redundancy)
    assert sel.indices.shape == sel.scores.shape == (n, min(k, p))
    assert (sel.scores >= 0).all() and torch.isfinite(sel.scores).all()
    for row in sel.indices.tolist():
        picked = [i for i in row if i >= 0]
        assert len(set(picked)) == len(picked)


def _reference_selection(y: torch.Tensor, e: torch.Tensor, k: int, redundancy: float) -> list[list[int]]:
    """The greedy written directly on D-dimensional residuals, one row at a time (slow, plain)."""
    out = []
    for row in torch.nn.functional.normalize(y, dim=-1):
        picked: list[int] = []
        residual = row.clone()
        for _ in range(k):
            corr = e @ residual
            penalty = (e[picked] @ e.T).clamp_min(0).amax(0) if picked else torch.zeros(len(e))
            crit = corr - redundancy * penalty
            crit[picked] = float("-inf")
            pick = int(crit.argmax())
            if corr[pick] <= 1e-6:
                break
            picked.append(pick)
            atoms = e[picked]
            active = torch.ones(len(picked), dtype=torch.bool)
            for _ in range(2):  # the same two-pass non-negative refit
                a = atoms * active[:, None]
                g = a @ a.T + 1e-4 * torch.eye(len(picked)) + torch.diag((~active).float())
                beta = torch.linalg.solve(g, a @ row)
                active &= beta > 0
            residual = row - (beta * active).clamp_min(0) @ atoms
        out.append(sorted(picked))
    return out


def test_score_space_greedy_matches_residual_greedy_on_a_large_vocabulary() -> None:
    g = torch.Generator().manual_seed(3)
    # Correlated phrases (a shared low-rank part), as CLIP text embeddings are.
    vocab = center_vocabulary(
        torch.randn(3000, 48, generator=g)
        + torch.randn(3000, 4, generator=g) @ torch.randn(4, 48, generator=g)
    )
    idx = torch.randint(0, 3000, (6, 3), generator=g)
    y = (vocab[idx] * torch.rand(6, 3, 1, generator=g)).sum(1) + 0.05 * torch.randn(6, 48, generator=g)
    sel = select_phrases(y, vocab, 5, redundancy=0.5)
    ours = [sorted(i for i in row if i >= 0) for row in sel.indices.tolist()]
    assert ours == _reference_selection(y, vocab, 5, 0.5)


def test_candidates_limit_the_search_to_the_best_scoring_phrases() -> None:
    g = torch.Generator().manual_seed(4)
    vocab = torch.nn.functional.normalize(torch.randn(500, 32, generator=g), dim=1)
    y = torch.randn(3, 32, generator=g)
    top = (torch.nn.functional.normalize(y, dim=1) @ vocab.T).topk(20, dim=1).indices
    sel = select_phrases(y, vocab, 4, candidates=20)
    for row, allowed in zip(sel.indices.tolist(), top.tolist(), strict=True):
        assert {i for i in row if i >= 0} <= set(allowed)
    # With room for the whole vocabulary the restriction changes nothing.
    full, wide = select_phrases(y, vocab, 4), select_phrases(y, vocab, 4, candidates=500)
    assert torch.equal(full.indices, wide.indices)
