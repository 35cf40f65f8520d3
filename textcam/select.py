"""Choosing a short, diverse set of phrases for a CLIP-space direction, and grouping channels.

A top-k of phrase similarities returns near-duplicates ("striped", "stripes", "banded"). Instead
we code the target direction y as a sparse, non-negative combination of phrase embeddings,
chosen greedily (orthogonal matching pursuit) with a penalty on picking a phrase that is similar
to one already chosen:

    pick_t = argmax_p  ⟨r_t, e_p⟩ − ρ · max_{q ∈ S_t} ⟨e_q, e_p⟩₊ ,   r_t = y − E_Sᵀ β,   β ≥ 0.

Everything is batched over images: one (N × D) @ (D × P) product per step.
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
) -> Selection:
    """Greedy non-negative sparse coding of each row of ``targets`` (N, D) over ``vocab`` (P, D).

    Stops early for a row when no remaining phrase correlates positively with its residual, so a
    row with no evidence gets no phrases. ``redundancy`` (ρ) trades fit against diversity.
    """
    if targets.dim() != 2 or vocab.dim() != 2 or targets.shape[1] != vocab.shape[1]:
        raise ValueError(
            f"targets (N, D) and vocab (P, D) must share D; got {tuple(targets.shape)}, {tuple(vocab.shape)}"
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n, p = targets.shape[0], vocab.shape[0]
    k = min(k, p)
    y = F.normalize(targets.float(), dim=-1)
    e = vocab.float()
    rows = torch.arange(n, device=y.device)
    chosen = torch.zeros(n, p, dtype=torch.bool, device=y.device)
    max_sim = torch.zeros(n, p, device=y.device)
    idx = torch.full((n, k), -1, dtype=torch.long, device=y.device)
    beta = torch.zeros(n, k, device=y.device)
    atoms = torch.zeros(n, k, e.shape[1], device=y.device)
    residual = y
    alive = y.norm(dim=1) > 0
    for step in range(k):
        corr = residual @ e.T
        crit = (corr - redundancy * max_sim.clamp_min(0)).masked_fill(chosen, float("-inf"))
        pick = crit.argmax(dim=1)
        alive = alive & (corr[rows, pick] > 1e-6)
        if not alive.any():
            break
        idx[:, step] = torch.where(alive, pick, -1)
        chosen[rows[alive], pick[alive]] = True
        atoms[:, step] = torch.where(alive[:, None], e[pick], 0.0)
        max_sim = torch.maximum(max_sim, torch.where(alive[:, None], e[pick] @ e.T, max_sim))
        beta = _nonneg_refit(atoms[:, : step + 1], y, ridge)
        residual = y - torch.einsum("nk,nkd->nd", beta, atoms[:, : step + 1])
    beta = torch.cat([beta, beta.new_zeros(n, k - beta.shape[1])], dim=1) if beta.shape[1] < k else beta
    beta = beta.masked_fill(idx < 0, 0.0)
    order = beta.argsort(dim=1, descending=True, stable=True)
    return Selection(idx.gather(1, order), beta.gather(1, order))


def _nonneg_refit(atoms: torch.Tensor, y: torch.Tensor, ridge: float, iters: int = 2) -> torch.Tensor:
    """Least-squares coefficients of ``y`` on ``atoms`` (N, s, D), with negative ones dropped.

    An active-set approximation of NNLS: solve, zero the negative coefficients' atoms, solve again.
    Zero atoms (unused slots) get zero coefficients.
    """
    active = atoms.abs().sum(-1) > 0  # (N, s)
    s = atoms.shape[1]
    eye = torch.eye(s, device=atoms.device)
    for _ in range(iters):
        a = atoms * active[..., None]
        gram = a @ a.transpose(1, 2) + ridge * eye + torch.diag_embed((~active).float())
        beta = torch.linalg.solve(gram, (a @ y[:, :, None]))[..., 0]
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
