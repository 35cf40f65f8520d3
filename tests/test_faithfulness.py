"""Deletion/insertion curves and channel ablation against values computed by hand."""

from __future__ import annotations

import pytest
import torch
from handnets import ConvGapLinear

from textcam.faithfulness import (
    ablated_scores,
    auc,
    blur_baseline,
    curves_from_ranks,
    perturbation_curves,
    pixel_ranks,
    random_channel_masks,
    random_maps,
)

# A 2×2 image whose score is a fixed weighting of its pixels: removing a pixel removes its weight.
WEIGHTS = torch.tensor([[0.4, 0.3], [0.2, 0.1]])


def weighted_score(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (images[:, 0] * WEIGHTS).sum(dim=(1, 2)) * (1 + targets)  # target 0: the plain sum


def test_deletion_and_insertion_of_a_known_map():
    x = torch.ones(1, 1, 2, 2)
    good = WEIGHTS[None]  # ranks the pixels by their true importance
    bad = (1 - WEIGHTS)[None]  # the reverse order
    maps = torch.stack([good, bad])  # (M=2, B=1, 2, 2)
    t = torch.tensor([0])
    dele = perturbation_curves(weighted_score, x, torch.zeros_like(x), maps, t, steps=4, mode="deletion")
    ins = perturbation_curves(weighted_score, x, torch.zeros_like(x), maps, t, steps=4, mode="insertion")
    torch.testing.assert_close(dele[0, 0], torch.tensor([1.0, 0.6, 0.3, 0.1, 0.0]))
    torch.testing.assert_close(dele[1, 0], torch.tensor([1.0, 0.9, 0.7, 0.4, 0.0]))
    torch.testing.assert_close(ins[0, 0], torch.tensor([0.0, 0.4, 0.7, 0.9, 1.0]))
    # trapezoids with dx = 1/4: (0.8 + 0.45 + 0.2 + 0.05) / 4 and its mirror images
    torch.testing.assert_close(auc(dele)[:, 0], torch.tensor([0.375, 0.625]))
    torch.testing.assert_close(auc(ins)[:, 0], torch.tensor([0.625, 0.375]))


def test_curves_read_the_target_and_accept_low_resolution_maps():
    def mean_score(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return images[:, 0].mean(dim=(1, 2)) * (1 + targets)

    x = torch.ones(3, 1, 4, 4)
    maps = torch.rand(3, 2, 2)  # upsampled to 4×4 inside
    t = torch.tensor([0, 1, 0])
    c = perturbation_curves(mean_score, x, torch.zeros_like(x), maps, t, steps=2, batch_size=2)
    assert c.shape == (1, 3, 3)
    # intact image, half the pixels deleted, all deleted; each times (1 + target)
    torch.testing.assert_close(c[0], torch.tensor([[1.0, 0.5, 0.0], [2.0, 1.0, 0.0], [1.0, 0.5, 0.0]]))


def test_precomputed_ranks_give_the_same_curves():
    x = torch.rand(2, 1, 2, 2)
    maps = torch.rand(2, 2, 2)
    t = torch.tensor([0, 0])
    a = perturbation_curves(
        weighted_score, x, torch.zeros_like(x), maps, t, steps=4, generator=torch.Generator().manual_seed(3)
    )
    ranks = pixel_ranks(maps, torch.Generator().manual_seed(3))[None]
    b = curves_from_ranks(weighted_score, x, torch.zeros_like(x), ranks, t, steps=4)
    torch.testing.assert_close(a, b)


def test_ties_are_broken_randomly_not_by_position():
    flat = torch.zeros(200, 8, 8)
    ranks = pixel_ranks(flat, torch.Generator().manual_seed(0))
    assert (ranks.sort(dim=1).values == torch.arange(64)).all()  # a permutation per map
    # the pixel ranked first is spread over the image, not always the top-left one
    assert len(set(ranks.argmin(dim=1).tolist())) > 40
    ranked = pixel_ranks(torch.tensor([[[0.0, 2.0], [1.0, 0.0]]]))
    assert ranked[0, 1] == 0 and ranked[0, 2] == 1 and set(ranked[0, [0, 3]].tolist()) == {2, 3}


def test_auc_needs_two_points_and_bad_modes_raise():
    with pytest.raises(ValueError):
        auc(torch.ones(3, 1))
    x = torch.ones(1, 1, 2, 2)
    with pytest.raises(ValueError, match="mode"):
        perturbation_curves(weighted_score, x, x, WEIGHTS[None], torch.tensor([0]), mode="sideways")  # type: ignore[arg-type]


def test_blur_keeps_constants_and_smooths_edges():
    const = torch.full((1, 3, 9, 9), 0.3)
    torch.testing.assert_close(blur_baseline(const, 2.0), const)
    step = torch.zeros(1, 1, 9, 9)
    step[..., 5:] = 1.0
    out = blur_baseline(step, 1.0)
    assert 0 < out[0, 0, 4, 4] < 0.5 < out[0, 0, 4, 5] < 1
    torch.testing.assert_close(out.sum(), step.sum(), atol=1e-4, rtol=0)  # symmetric step: mass kept


def test_random_maps_are_seeded():
    a = random_maps(4, (7, 7), torch.Generator().manual_seed(1))
    b = random_maps(4, (7, 7), torch.Generator().manual_seed(1))
    assert a.shape == (4, 7, 7) and torch.equal(a, b) and a.min() >= 0 and a.max() < 1


def gap_linear() -> ConvGapLinear:
    """Identity 1×1 conv on 3 channels, then GAP and W = [[1, 2, -1], [0, 1, 1]]."""
    return ConvGapLinear(torch.eye(3), torch.tensor([[1.0, 2.0, -1.0], [0.0, 1.0, 1.0]]))


def test_ablation_removes_exactly_the_zeroed_channels_contribution():
    model = gap_linear().eval()
    x = torch.ones(2, 3, 4, 4) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    x[1] *= 2
    # image 0: logit_0 = 1 + 4 - 3 = 2; image 1: 4 + 8 - 6 ... doubled: 2*2 = 4
    zero = torch.tensor([[[False, False, False], [False, True, False], [False, False, True]]] * 2)
    s = ablated_scores(model, "conv", x, torch.tensor([0, 0]), zero)
    torch.testing.assert_close(s, torch.tensor([[2.0, -2.0, 5.0], [4.0, -4.0, 10.0]]))
    # one set per image as (B, C); the hook is gone afterwards
    s1 = ablated_scores(model, "conv", x, torch.tensor([1, 1]), torch.tensor([[True, False, False]] * 2))
    torch.testing.assert_close(s1[:, 0], torch.tensor([5.0, 10.0]))
    assert not model.conv._forward_hooks


def test_random_channel_masks_draw_the_requested_counts():
    masks = random_channel_masks(torch.tensor([0, 3, 10]), 10, 5, torch.Generator().manual_seed(0))
    assert masks.shape == (3, 5, 10)
    assert masks.sum(-1).tolist() == [[0] * 5, [3] * 5, [10] * 5]
    assert len({tuple(m.tolist()) for m in masks[1]}) > 1  # the draws differ
    with pytest.raises(ValueError):
        random_channel_masks(torch.tensor([11]), 10, 1)
