"""Choosing a short, diverse set of phrases for a CLIP-space direction, and grouping channels.

A top-k of phrase similarities returns near-duplicates ("striped", "stripes", "banded"). Instead
we code the target direction y as a sparse, non-negative combination of phrase embeddings,
chosen greedily (orthogonal matching pursuit) with a penalty on picking a phrase that is similar
to one already chosen:

    pick_t = argmax_p  ⟨r_t, e_p⟩ − ρ · max_{q ∈ S_t} ⟨e_q, e_p⟩₊ ,   r_t = y − E_Sᵀ β,   β ≥ 0.

Everything is batched over images: one (N × D) @ (D × P) product scores the whole vocabulary, and the
greedy steps run on each row's best-scoring candidates (see :func:`select_phrases`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Selection:
    """Chosen phrases per row, best first. ``indices`` is -1 (and ``scores`` 0) past the last pick."""

    indices: torch.Tensor  # (N, k) long
    scores: torch.Tensor  # (N, k) float: non-negative coding coefficient of each phrase


def center_vocabulary(embeddings: torch.Tensor) -> torch.Tensor:
    """Remove the vocabulary's mean embedding and re-normalise.

    CLIP text embeddings share a large common component (all of them are "text"); channel
    directions are differences of image embeddings and carry none of it. Centring makes the
    phrase scores compare what distinguishes phrases.
    """
    if embeddings.shape[0] < 2:
        return F.normalize(embeddings, dim=-1)
    return F.normalize(embeddings - embeddings.mean(dim=0, keepdim=True), dim=-1)


def select_phrases(
    targets: torch.Tensor,
    vocab: torch.Tensor,
    k: int,
    *,
    redundancy: float = 0.5,
    ridge: float = 1e-4,
    candidates: int | None = None,
) -> Selection:
    """Greedy non-negative sparse coding of each row of ``targets`` (N, D) over ``vocab`` (P, D).

    Stops early for a row when no remaining phrase correlates positively with its residual, so a
    row with no evidence gets no phrases. ``redundancy`` (ρ) trades fit against diversity.

    The greedy runs in score space, never on D-dimensional residuals: with unit-norm phrases
    ⟨r_t, e_p⟩ = ⟨y, e_p⟩ − Σ_q β_q ⟨e_q, e_p⟩, so one (N × D) @ (D × P) product scores the
    vocabulary and each step adds only the new phrase's similarities to the others (one product)
    plus a refit on an (N × s × s) Gram matrix. ``candidates`` restricts the steps to each row's
    best-scoring phrases (faster for very large vocabularies, but a phrase that only becomes relevant
    for the residual is missed); ``None`` (default) searches all P phrases."""
    _check(targets, vocab, k, candidates)
    n, p = targets.shape[0], vocab.shape[0]
    k = min(k, p)
    t = p if candidates is None else min(p, max(candidates, k))
    y = F.normalize(targets.float(), dim=-1)
    e = vocab.float()
    score = y @ e.T  # (N, P): the only product of the targets with the vocabulary
    cand: torch.Tensor | None = None
    ec: torch.Tensor | None = None
    if t < p:
        score, cand = score.topk(t, dim=1)
        ec = e[cand]  # (N, T, D) candidate embeddings per row
    rows = torch.arange(n, device=y.device)
    sims = score.new_zeros(n, k, t)  # ⟨e_pick_s, e_c⟩ of each step's pick with every column
    picks = torch.zeros(n, k, dtype=torch.long, device=y.device)  # column of each step's pick
    # ρ·max_q ⟨e_q, e_c⟩₊ over the chosen q, and +inf on the chosen columns themselves. A row that
    # has stopped may keep updating it: its later picks are discarded.
    penalty = score.new_zeros(n, t)
    beta = score.new_zeros(n, 0)
    corr = score  # ⟨r_t, e_c⟩; the residual starts as y itself
    alive = y.norm(dim=1) > 0
    steps = 0
    for step in range(k):
        pick = (corr - penalty).argmax(dim=1)
        alive = alive & (corr[rows, pick] > 1e-6)
        if not alive.any():
            break
        steps = step + 1
        picks[:, step] = pick
        atom = e[pick] if cand is None else e[cand[rows, pick]]  # (N, D)
        sim = atom @ e.T if ec is None else torch.bmm(ec, atom[:, :, None])[..., 0]  # (N, T)
        # A stopped row gets a zero row: it drops out of the refit as an unused slot.
        sims[:, step] = sim * alive[:, None]
        penalty = torch.maximum(penalty, redundancy * sim.clamp_min(0))
        penalty[rows, pick] = float("inf")
        s = sims[:, :steps]  # (N, s, T)
        gram = s.gather(2, picks[:, None, :steps].expand(-1, steps, -1))  # (N, s, s)
        beta = _nonneg_refit(gram, score.gather(1, picks[:, :steps]), ridge)
        corr = score - torch.bmm(beta[:, None, :], s)[:, 0]
    return _selection(sims[:, :steps], picks[:, :steps], beta, cand, k)


def nearest_phrases(targets: torch.Tensor, vocab: torch.Tensor, k: int) -> Selection:
    """The ``k`` phrases of ``vocab`` (P, D) most similar to each row of ``targets`` (N, D), by cosine; a
    slot whose cosine is not positive is empty (-1). The plain top-k reading of a direction, beside the
    sparse code: a phrase the code leaves out because an earlier pick explains it away is still here."""
    _check(targets, vocab, k, None)
    score = F.normalize(targets.float(), dim=-1) @ vocab.float().T
    top = score.topk(min(k, vocab.shape[0]), dim=1)
    keep = top.values > 0
    return Selection(torch.where(keep, top.indices, -1), top.values * keep)


def _selection(
    sims: torch.Tensor, picks: torch.Tensor, beta: torch.Tensor, cand: torch.Tensor | None, k: int
) -> Selection:
    """The picks of the steps taken as vocabulary indices (−1: an unused slot), strongest first."""
    n, steps = picks.shape
    idx = torch.full((n, k), -1, dtype=torch.long, device=picks.device)
    coef = beta.new_zeros(n, k)
    if steps:
        used = sims.abs().sum(-1) > 0  # (N, s): slots that hold a phrase
        column = picks if cand is None else cand.gather(1, picks)
        idx[:, :steps] = torch.where(used, column, -1)
        coef[:, :steps] = beta.masked_fill(~used, 0.0)
    order = coef.argsort(dim=1, descending=True, stable=True)
    return Selection(idx.gather(1, order), coef.gather(1, order))


def _check(targets: torch.Tensor, vocab: torch.Tensor, k: int, candidates: int | None) -> None:
    if targets.dim() != 2 or vocab.dim() != 2 or targets.shape[1] != vocab.shape[1]:
        raise ValueError(
            f"targets (N, D) and vocab (P, D) must share D; got {tuple(targets.shape)}, {tuple(vocab.shape)}"
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if candidates is not None and candidates < 1:
        raise ValueError(f"candidates must be >= 1 or None, got {candidates}")


def _nonneg_refit(gram: torch.Tensor, rhs: torch.Tensor, ridge: float, iters: int = 2) -> torch.Tensor:
    """Least-squares coefficients from the atoms' Gram matrix (N, s, s) and ⟨atom, y⟩ (N, s), ≥ 0.

    An active-set approximation of NNLS: solve, zero the negative coefficients' atoms, solve again.
    Unused slots (zero diagonal) get zero coefficients.
    """
    active = gram.diagonal(dim1=1, dim2=2) > 0  # (N, s)
    eye = torch.eye(gram.shape[1], device=gram.device)
    beta = rhs.new_zeros(rhs.shape)
    for _ in range(iters):
        mask = (active[:, :, None] & active[:, None, :]).float()
        g = gram * mask + ridge * eye + torch.diag_embed((~active).float())
        # solve_ex: g is positive definite (ridge), and the error check of solve() waits for a GPU
        beta = torch.linalg.solve_ex(g, (rhs * active)[..., None], check_errors=False).result[..., 0]
        active = active & (beta > 0)
    return (beta * active).clamp_min(0)


def group_channels(
    contributions: torch.Tensor,
    directions: torch.Tensor,
    group_embeddings: torch.Tensor,
    group_valid: torch.Tensor,
) -> torch.Tensor:
    """Assign each channel with positive contribution to the most similar group phrase.

    Args:
        contributions: (N, C) channel contributions w_j·ā_j to the class score.
        directions: (C, D) channel bank.
        group_embeddings: (N, G) phrases' (P-centred) text embeddings, (N, G, D).
        group_valid: (N, G) which group slots hold a phrase.

    Returns:
        (N, C) long: group index per channel, -1 for channels with no positive contribution or no
        direction (dead during calibration).
    """
    sim = torch.einsum("cd,ngd->ncg", directions.float(), group_embeddings.float())
    sim = sim.masked_fill(~group_valid[:, None, :], float("-inf"))
    assign = sim.argmax(dim=2)
    has_dir = directions.norm(dim=1) > 0
    usable = (contributions > 0) & has_dir[None, :] & group_valid.any(dim=1, keepdim=True)
    return torch.where(usable, assign, -1)
