"""Concept suppression: the hook's arithmetic, the edited checkpoint, and the tiny world's planted cue."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from benches import load_bench
from handnets import ConvGapLinear

from textcam.intervene import (
    Suppression,
    attach_head,
    channel_phrase_z,
    concept_balanced_head,
    concept_channels,
    concept_eraser,
    crossfit_predictions,
    dfr_predictions,
    group_accuracy,
    layer_features,
    logistic_head,
    probe_means,
    suppressed,
)


def tiny() -> ConvGapLinear:
    """conv channels (x0 + x1 weighted 0/1, 2/3, 4/5), then GAP and W = [[1, 0, 1], [0, 1, 0]]."""
    return ConvGapLinear(torch.arange(6.0).view(3, 2), torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))


def test_suppression_replaces_exactly_the_named_channels() -> None:
    model, x = tiny(), torch.ones(1, 2, 2, 2)
    # conv channels on an all-ones input: 0+1, 2+3, 4+5 = (1, 5, 9); logits (1+9, 5) = (10, 5)
    assert model(x).tolist() == [[10.0, 5.0]]
    with suppressed(model, Suppression("conv", (2,), "zero")):
        assert model(x).tolist() == [[1.0, 5.0]]
    with suppressed(model, Suppression("conv", (0, 1), "mean", (7.0, -1.0))):
        assert model(x).tolist() == [[16.0, -1.0]]
    assert model(x).tolist() == [[10.0, 5.0]]  # the hook is gone
    logits, feats = layer_features(model, "conv", x, suppression=Suppression("conv", (1,)))
    assert feats.tolist() == [[1.0, 0.0, 9.0]] and logits.tolist() == [[10.0, 0.0]]
    assert probe_means(model, "conv", torch.cat([x, 2 * x]), (0, 2)) == (1.5, 13.5)


def test_bad_suppressions_are_rejected() -> None:
    with pytest.raises(ValueError, match="mode"):
        Suppression("conv", (0,), "drop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one value per channel"):
        Suppression("conv", (0, 1), "mean", (1.0,))
    with pytest.raises(ValueError, match="distinct"):
        Suppression("conv", (1, 1))
    with pytest.raises(ValueError, match="lacks"):
        Suppression.from_config({"channels": [1]})
    model = tiny()
    with pytest.raises(ValueError, match="has 3 channels"), suppressed(model, Suppression("conv", (5,))):
        model(torch.ones(1, 2, 2, 2))
    with pytest.raises(KeyError, match="not in the vocabulary"):
        concept_channels(torch.randn(4, 8), torch.randn(3, 8), ["a", "b", "c"], "d")


def test_concept_channels_beat_the_random_phrase_null() -> None:
    """Channels built along a phrase's embedding are found; a random vocabulary phrase gets about
    alpha × C channels."""
    rng = torch.Generator().manual_seed(0)
    text = torch.randn(200, 32, generator=rng)
    directions = torch.randn(64, 32, generator=rng)
    directions[:5] = text[7] + 0.3 * torch.randn(5, 32, generator=rng)
    phrases = [f"p{i}" for i in range(200)]
    found = concept_channels(directions, text, phrases, "p7")
    assert set(found.channels) == set(range(5)) and found.z == tuple(sorted(found.z, reverse=True))
    z = channel_phrase_z(directions, text)
    np.testing.assert_allclose(z.mean(1), 0, atol=1e-9)
    chance = np.mean(
        [len(concept_channels(directions, text, phrases, f"p{i}").channels) for i in range(100, 140)]
    )
    assert chance < 3 and found.expected_by_chance == pytest.approx(0.64)


def test_group_accuracy_and_dfr_by_hand() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1])
    present = np.array([True, True, False, True, False, False])
    pred = np.array([0, 0, 1, 0, 1, 1])
    acc = group_accuracy(pred, labels, present, 0)
    assert acc["groups"] == {
        "class_with": 1.0,
        "class_without": 0.0,
        "others_with": 0.0,
        "others_without": 1.0,
    }
    assert acc["conflicting"] == 0.0 and acc["worst_group"] == 0.0 and acc["accuracy"] == pytest.approx(4 / 6)
    assert acc["reliance"] == 1.0  # with the concept 3 of 3 are called class 0, without it 0 of 3
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    feats = np.c_[y + 0.1 * rng.standard_normal(400), rng.standard_normal(400)]
    assert (dfr_predictions(feats, y, y, feats) == y).mean() > 0.95
    with pytest.raises(ValueError, match="two held-out images"):
        dfr_predictions(feats[:3], y[:3], np.array([0, 1, 2]), feats)


def test_a_new_head_replaces_the_output_by_hand() -> None:
    """pooled conv = (1, 5, 9) on an all-ones input; head rows pick channels 0 and 2, biases 0.5 and -1."""
    from textcam.cams import build_cam

    model, x = tiny(), torch.ones(1, 2, 2, 2)
    weight, bias = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]), torch.tensor([0.5, -1.0])
    with suppressed(model, Suppression("conv", (2,), "mean", (3.0,))):
        attach_head(model, "conv", weight, bias)
        assert model(x).tolist() == [[1.5, 2.0]]  # the head sees the suppressed channel: 3 - 1
    assert model(x).tolist() == [[1.5, 8.0]]
    # CAM reads the new head (the last linear layer), and a gradient CAM reaches the layer through it
    # (Grad-CAM: the spatial mean of d logit / d A = W / (h·w) over a 2×2 map)
    cam_w = build_cam("cam", model, "conv")(x, targets=[1]).weights
    grad_w = build_cam("gradcam", model, "conv")(x, targets=[1]).weights
    assert cam_w.flatten().tolist() == [0.0, 0.0, 1.0] and grad_w.flatten().tolist() == [0.0, 0.0, 0.25]


def test_the_concept_balanced_head_learns_the_class_not_the_cue() -> None:
    """Biased data: the cue (feature 1) is on 95% of class 1 and 5% of class 0; the class signal
    (feature 0) is noisier. Unbalanced, the head calls everything with the cue class 1; balanced by
    class × cue it calls class-1 images without the cue class 1."""
    rng = np.random.default_rng(0)
    n = 4000
    y = rng.integers(0, 2, n)
    cue = np.where(y == 1, rng.random(n) < 0.95, rng.random(n) < 0.05)
    feats = np.c_[y + 0.6 * rng.standard_normal(n), 3.0 * cue + 0.1 * rng.standard_normal(n)]
    y_test = np.repeat([0, 1], 500)
    cue_test = np.tile([True, False], 500)  # the cue independent of the class
    test = np.c_[y_test + 0.6 * rng.standard_normal(1000), 3.0 * cue_test + 0.1 * rng.standard_normal(1000)]

    def conflicting(weight: np.ndarray, bias: np.ndarray) -> float:
        return group_accuracy((test @ weight.T + bias).argmax(1), y_test, cue_test, 1)["conflicting"]

    plain = conflicting(*logistic_head(feats, y, np.ones(n), 2))
    balanced = conflicting(*concept_balanced_head(feats, y, cue, 2, erase=False))
    assert plain < 0.3 and balanced > 0.7
    # the balance is a reweighting: each of the 4 groups weighs n/4 in total
    group = y * 2 + cue
    by_hand = np.array([n / 4 / (group == g).sum() for g in group])
    np.testing.assert_allclose(
        concept_balanced_head(feats, y, cue, 2, erase=False)[0], logistic_head(feats, y, by_hand, 2)[0]
    )
    pred = crossfit_predictions(feats, y, cue, 2)
    assert pred.shape == (n,) and (pred == y).mean() > 0.75
    with pytest.raises(ValueError, match=r"1 have none \(1\)"):
        logistic_head(feats[y == 0], y[y == 0], np.ones(int((y == 0).sum())), 2)


def test_the_concept_eraser_leaves_no_linear_trace_of_the_concept_within_classes() -> None:
    rng = np.random.default_rng(1)
    n = 3000
    y = rng.integers(0, 3, n)
    cue = rng.random(n) < np.array([0.9, 0.3, 0.5])[y]
    mix = rng.standard_normal((3, 5))  # the class, the cue and noise spread over five features
    feats = np.c_[y, cue, rng.standard_normal(n)] @ mix + 0.3 * rng.standard_normal((n, 5))
    project, offset = concept_eraser(feats, y, cue)
    erased = feats @ project.T + offset
    centred = erased - np.array([erased[y == k].mean(0) for k in range(3)])[y]
    z = cue - np.array([cue[y == k].mean() for k in range(3)])[y]
    np.testing.assert_allclose(centred.T @ z / n, 0.0, atol=1e-10)  # no covariance with the concept left
    assert np.linalg.matrix_rank(np.eye(5) - project) == 1  # one direction erased, the rest kept
    assert np.abs(feats @ project.T + offset - feats).max() > 0.5  # it did move the features
    # by hand: the cue alone in feature 1, independent of the class signal in feature 0 -> feature 1
    # becomes its mean, feature 0 is kept
    two = np.c_[y + 0.1 * rng.standard_normal(n), 3.0 * cue + 0.1 * rng.standard_normal(n)]
    project, offset = concept_eraser(two, y, cue)
    np.testing.assert_allclose(project, [[1.0, 0.0], [0.0, 0.0]], atol=0.05)
    np.testing.assert_allclose(offset, [0.0, two[:, 1].mean()], atol=0.05)
    # a concept that never varies within a class leaves nothing to erase
    project, offset = concept_eraser(two, y, y == 1)
    assert (project == np.eye(2)).all() and (offset == 0).all()
    # two concepts at once (an attribute's values): rank two, no trace of either left; the first alone
    # is the one-concept eraser
    other = rng.random(n) < 0.4
    four = np.c_[feats[:, :3], 2.0 * other + 0.1 * rng.standard_normal(n)]
    both = np.c_[cue, other]
    project, offset = concept_eraser(four, y, both)
    erased = four @ project.T + offset
    centred = erased - np.array([erased[y == k].mean(0) for k in range(3)])[y]
    zs = both - np.array([both[y == k].mean(0) for k in range(3)])[y]
    np.testing.assert_allclose(centred.T @ zs / n, 0.0, atol=1e-10)
    assert np.linalg.matrix_rank(np.eye(4) - project, tol=1e-8) == 2
    np.testing.assert_allclose(concept_eraser(four, y, both[:, :1])[0], concept_eraser(four, y, cue)[0])


def test_erasing_the_concept_lets_the_head_learn_a_class_never_seen_without_the_cue() -> None:
    """Class 1 shows the cue on every training image, so no balance can reweigh a group that is not
    there; the cue varies within class 0, which is where the eraser finds its direction."""
    rng = np.random.default_rng(2)
    n = 4000
    y = rng.integers(0, 2, n)
    cue = np.where(y == 1, True, rng.random(n) < 0.5)

    def features(label: np.ndarray, shown: np.ndarray) -> np.ndarray:
        return np.c_[
            label + 0.4 * rng.standard_normal(label.size), 3.0 * shown + 0.1 * rng.standard_normal(label.size)
        ]

    feats = features(y, cue)
    y_test = np.repeat([0, 1], 500)
    cue_test = np.tile([True, False], 500)
    test = features(y_test, cue_test)

    def conflicting(erase: bool) -> float:
        weight, bias = concept_balanced_head(feats, y, cue, 2, erase=erase)
        return group_accuracy((test @ weight.T + bias).argmax(1), y_test, cue_test, 1)["conflicting"]

    assert conflicting(erase=False) < 0.4 and conflicting(erase=True) > 0.7


def test_edited_model_reloads_exactly_and_beats_random_suppression(tiny_world_cache, tmp_path: Path) -> None:
    from textcam.bank import ChannelBank
    from textcam.clip import load_clip
    from textcam.models import load_model, save_edited_checkpoint
    from textcam.synthetic.classifier import to_classifier_tensor
    from textcam.synthetic.world import split_batch
    from textcam.vocab import load_vocabulary

    _, world, _ = tiny_world_cache
    model = load_model(world.classifier_checkpoint)
    clip = load_clip(world.clip_open_clip_id)
    phrases = load_vocabulary(["clevr"])
    text = clip.encode_texts(phrases).cpu()
    bank = ChannelBank.calibrate(model, clip, world.manifest("probe")["path"].tolist(), m=30, progress=False)
    spec = world.config.biases[0]
    cc = concept_channels(bank.directions, text, phrases, world.phrases[spec.attribute][spec.value])
    assert cc.channels
    layer = model.target_layer
    test = split_batch(world.config, "test")
    x = to_classifier_tensor(test.images)
    labels, present = (
        test.records["label"].to_numpy(),
        (test.records[spec.attribute] == spec.value).to_numpy(),
    )
    cls = list(world.class_names).index(spec.label)
    # Zero: the tiny world's model never learned the circle's shape, so no suppression helps circles
    # without water; what it can do is stop calling everything on water a circle.
    s = Suppression(layer, cc.channels, "zero", note=str(spec))
    logits, _ = layer_features(model.module, layer, x, suppression=s)

    path = save_edited_checkpoint(model, tmp_path / "edited.safetensors", s)
    edited = load_model(path)
    assert edited.metadata["suppress"]["channels"] == list(cc.channels)
    with torch.no_grad():
        assert torch.equal(edited.module(x), logits)
        assert not torch.equal(model.module(x), logits)  # the original is untouched

    before = group_accuracy(layer_features(model.module, layer, x)[0].argmax(1).numpy(), labels, present, cls)
    after = group_accuracy(logits.argmax(1).numpy(), labels, present, cls)
    rng = np.random.default_rng(0)
    random = []
    for _ in range(5):
        pick = tuple(int(c) for c in rng.choice(bank.directions.shape[0], len(cc.channels), replace=False))
        r_logits, _ = layer_features(model.module, layer, x, suppression=Suppression(layer, pick))
        random.append(group_accuracy(r_logits.argmax(1).numpy(), labels, present, cls))
    random_reliance = float(np.mean([r["reliance"] for r in random]))
    print(
        f"reliance on the cue {before['reliance']:.3f} -> {after['reliance']:.3f} ({len(cc.channels)} "
        f"channels; random {random_reliance:.3f}); other classes on the cue "
        f"{before['groups']['others_with']:.3f} -> {after['groups']['others_with']:.3f}"
    )
    assert before["reliance"] > 0.5  # the planted shortcut
    assert after["reliance"] < random_reliance - 0.3
    assert after["groups"]["others_with"] > max(r["groups"]["others_with"] for r in random) + 0.3


def test_the_bench_acts_on_each_audits_first_flag_and_counts_an_unflagged_cue_as_no_gain(
    tmp_path: Path,
) -> None:
    import pandas as pd

    bench = load_bench("intervene")
    runs = tmp_path / "runs"
    for audit, rows in {
        "test": [("circle", "night sky", "for", 2), ("circle", "water background", "for", 1)],
        "self": [("circle", "water background", "against", 1), ("square", "blue", "for", 1)],
    }.items():
        (runs / f"b00-{audit}").mkdir(parents=True)
        pd.DataFrame(rows, columns=["class_name", "phrase", "direction", "rank"]).to_parquet(
            runs / f"b00-{audit}" / "flags.parquet"
        )
    acts_on = bench.flags_reader(runs, "b00")
    assert acts_on("test", "circle") == "water background"  # rank 1 of the "for" flags
    assert acts_on("self", "circle") is None  # only evidence against it: nothing to act on
    with pytest.raises(FileNotFoundError, match="truth sweep"):
        bench.flags_reader(runs, "b01")("test", "circle")

    def cue(refit: float | None) -> dict:
        before = {"conflicting": 0.1}
        fit = None if refit is None else {"conflicting": refit, "worst_group": refit, "accuracy": 0.8}
        variants = None if fit is None else {v: fit for v in ("refit", "no_erase", "zeroed", "truth", "erm")}
        if variants is not None:
            variants |= {"random_phrase": [fit], "clip_groups_agree": 1.0}
        return {"before": {**before, "accuracy": 0.8}, "refit": {"train": variants}}

    out = bench.refit_summary([cue(0.6), cue(None)], "train", lambda v: float(np.mean(v)))
    assert out["refit_train_unflagged"] == 1
    assert out["refit_train_win_rate"] == 0.5  # the unflagged cue is a miss, not left out
    assert out["refit_train_conflicting_acc"] == pytest.approx(0.6)


def test_intervene_says_when_the_probe_has_no_image_of_the_class_without_the_phrase() -> None:
    import pandas as pd

    from flows.intervene_cli import describe

    nan = float("nan")
    figures = dict.fromkeys(
        [
            "accuracy_before",
            "accuracy_after",
            "worst_group_before",
            "worst_group_after",
            "random_conflicting_after",
            "reliance_before",
            "reliance_after",
            "random_reliance_after",
        ],
        0.5,
    )
    common = {"class_name": "star", "phrase": "plain background", "refit": True, "mode": "erase"}
    common |= {"n_channels": 0, "n_images": 400, "checkpoint": "star.safetensors"} | figures
    rows = pd.DataFrame(
        [
            common | {"n_conflicting": 0, "conflicting_before": nan, "conflicting_after": nan},
            common | {"n_conflicting": 12, "conflicting_before": 0.0, "conflicting_after": 0.75},
        ]
    )
    starved, measured = (describe(r) for r in rows.itertuples())
    assert len(starved) == 3 and "no labelled probe image is star without 'plain background'" in starved[1]
    assert "--probe" in starved[1] and "without it 0.00" not in starved[0]
    assert len(measured) == 2 and "star without it 0.00 -> 0.75" in measured[0]
    assert measured[0].endswith("on 400 labelled probe images, 12 of them star without it")
