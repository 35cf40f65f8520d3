"""The Explainer on a tiny real classifier (seeded ResNet-18 checkpoint) with a hand-made bank."""

from __future__ import annotations

import pytest
import torch
from audit_world import make_classifier

from textcam.bank import BankMeta, BankMismatchError, ChannelBank
from textcam.explain import Explainer
from textcam.models import load_model

D = 16


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    return load_model(make_classifier(tmp_path_factory.mktemp("clf") / "clf.safetensors"))


def _bank(model, directions: torch.Tensor) -> ChannelBank:
    meta = BankMeta(
        model_id=model.model_id,
        layer=model.target_layer,
        clip_id="test",
        m=2,
        shrinkage=0.5,
        n_probe=4,
        probe_hash="0",
        n_channels=directions.shape[0],
        embed_dim=D,
    )
    return ChannelBank(directions=directions, meta=meta)


def _phrases(n: int = 6) -> tuple[list[str], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(n, D, generator=g), dim=1)
    return [f"phrase {i}" for i in range(n)], emb


def _images(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_one_concept_bank_gives_one_group_with_the_whole_share(model) -> None:
    """Every channel points at phrase 0: the top phrase is phrase 0 and one group holds all positive
    evidence, with a share of exactly 1 (a fraction: never 1 + rounding, which validation rejects)."""
    phrases, emb = _phrases()
    n_channels = 512  # resnet18 layer4
    explainer = Explainer(model, _bank(model, emb[:1].repeat(n_channels, 1)), phrases, emb, device="cpu")
    eb = explainer.explain_tensors(_images(32))  # 32 images: several hit 1 + 1 ulp without the clamp
    assert (eb.phrases_for.indices[:, 0] == 0).all()
    share = eb.group_share
    assert share.min() >= 0.0 and share.max() <= 1.0
    top = share.max(dim=-1).values
    torch.testing.assert_close(top, torch.ones_like(top))


def test_batch_invariants_and_determinism(model) -> None:
    phrases, emb = _phrases()
    g = torch.Generator().manual_seed(2)
    directions = torch.nn.functional.normalize(torch.randn(512, D, generator=g), dim=1)
    explainer = Explainer(model, _bank(model, directions), phrases, emb, n_phrases=3, device="cpu")
    images = _images()
    a, b = explainer.explain_tensors(images), explainer.explain_tensors(images)
    torch.testing.assert_close(a.saliency, b.saliency, rtol=0, atol=0)
    assert torch.equal(a.phrases_for.indices, b.phrases_for.indices)
    assert a.saliency.min() >= 0 and a.saliency.max() <= 1
    assert a.group_share.sum(-1).max() <= 1 + 1e-6 and a.group_share.min() >= 0
    assert a.phrases_for.indices.shape[1] == 3
    explanations = explainer.to_explanations(a)
    assert len(explanations) == images.shape[0]
    assert all(len([p for p in e.phrases if p.direction == "for"]) <= 3 for e in explanations)
    # the nearest phrases: a plain reference, image by image, over the centred vocabulary
    for n, e in enumerate(explanations):
        cos = torch.nn.functional.normalize(a.text_for[n, 0], dim=0) @ explainer.vocab.T
        best = [int(i) for i in cos.argsort(descending=True)[:3] if cos[i] > 0]
        assert [p.text for p in e.nearest] == [phrases[i] for i in best]
        assert [p.cosine for p in e.nearest] == pytest.approx([float(cos[i]) for i in best], abs=1e-6)
        assert all(p.seen is None for p in e.nearest)  # no CLIP call was made
    seen = torch.tensor([[True, False, True]]).repeat(images.shape[0], 1)
    marked = explainer.to_explanations(a, near_seen=seen)
    assert [p.seen for p in marked[0].nearest] == [True, False, True][: len(marked[0].nearest)]


def test_weak_phrases_do_not_become_groups(model) -> None:
    """Channels point at phrase 0 (3 in 4) or phrase 1 (1 in 4): both are selected, phrase 1 with a
    smaller coefficient. A group needs a coefficient of at least ``group_min_ratio`` × the first."""
    phrases, emb = _phrases()
    n_channels = 512
    dirs = torch.where((torch.arange(n_channels) % 4 == 0)[:, None], emb[1], emb[0])
    bank = _bank(model, dirs)
    every = Explainer(model, bank, phrases, emb, group_min_ratio=0.0, device="cpu")
    eb = every.explain_tensors(_images(8))
    scores = eb.phrases_for.scores
    ratio = scores[:, 1] / scores[:, 0]
    assert ((ratio > 0.05) & (ratio < 0.9)).all(), ratio
    cut = float(ratio.median())  # some images keep the second group, some lose it
    strict = Explainer(model, bank, phrases, emb, group_min_ratio=cut, device="cpu")
    eb_strict = strict.explain_tensors(_images(8))
    torch.testing.assert_close(eb_strict.phrases_for.scores, scores)  # phrases are unchanged
    n_groups = torch.tensor([len(e.groups) for e in strict.to_explanations(eb_strict)])
    weak = ratio < cut
    assert (n_groups[weak] == 1).all() and (n_groups[~weak] >= 2).all()
    # a lone group takes every positive channel and the whole share
    torch.testing.assert_close(eb_strict.group_share[weak, 0, 0], torch.ones(int(weak.sum())))
    with pytest.raises(ValueError, match="group_min_ratio"):
        Explainer(model, bank, phrases, emb, group_min_ratio=1.5, device="cpu")


def test_bank_with_other_channel_count_is_a_clear_error(model) -> None:
    phrases, emb = _phrases()
    explainer = Explainer(model, _bank(model, emb[:1].repeat(100, 1)), phrases, emb, device="cpu")
    with pytest.raises(BankMismatchError, match="512 channels but the bank has 100"):
        explainer.explain_tensors(_images(1))


def test_bank_of_another_model_is_refused(model) -> None:
    phrases, emb = _phrases()
    bank = _bank(model, emb[:1].repeat(512, 1))
    other = ChannelBank(bank.directions, BankMeta(**{**bank.meta.__dict__, "model_id": "resnet50"}))
    with pytest.raises(BankMismatchError, match="calibrated for 'resnet50'"):
        Explainer(model, other, phrases, emb, device="cpu")


def test_serial_blocks_on_threads_restore_the_thread_count() -> None:
    """Serial blocks on several threads at once leave the thread count as it was (the count is
    per thread with OpenMP, so the blocks do not interfere)."""
    import threading

    from textcam.explain import _serial_on_cpu

    before = torch.get_num_threads()
    inside: list[int] = []
    start = threading.Barrier(4)

    def work() -> None:
        start.wait()
        for _ in range(50):
            with _serial_on_cpu(torch.device("cpu")):
                inside.append(torch.get_num_threads())

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.get_num_threads() == before
    assert len(inside) == 200
