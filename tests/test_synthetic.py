"""The synthetic world: generator semantics, planted biases, caching/resume, and a tiny trained world."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from textcam.synthetic import scenes
from textcam.synthetic.bias import BiasSpec, BiasSpecError, parse_biases
from textcam.synthetic.classifier import ARCH, load_classifier, train_classifier
from textcam.synthetic.cli import add_world_parser, config_from_args
from textcam.synthetic.config import WorldConfig
from textcam.synthetic.scenes import COLOR_RGB, SceneConfig, generate
from textcam.synthetic.tiny_clip import ClipTrainConfig, load_tiny_clip, train_tiny_clip

VOCAB = Path(__file__).resolve().parents[1] / "textcam" / "vocab" / "clevr.txt"


@pytest.fixture(autouse=True)
def _one_thread():
    # The suite shares small machines; one thread is also what makes CPU timings comparable.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------
# generator


def test_same_seed_same_bytes_and_chunk_independent():
    cfg = SceneConfig(max_distractors=2)
    a = generate(cfg, 300, seed=3, split="train")
    b = generate(cfg, 300, seed=3, split="train")
    assert a.images.tobytes() == b.images.tobytes()
    assert a.masks.tobytes() == b.masks.tobytes()
    assert a.records.equals(b.records)
    # a window starting mid-chunk is the same pixels as the corresponding slice
    c = generate(cfg, 50, seed=3, split="train", start=240)
    assert c.images.tobytes() == a.images[240:290].tobytes()
    assert generate(cfg, 300, seed=4, split="train").images.tobytes() != a.images.tobytes()
    assert generate(cfg, 300, seed=3, split="test").images.tobytes() != a.images.tobytes()


def test_interventions_change_only_the_attribute():
    """do(attribute = value) vs do(attribute != value): the same scenes, the attribute's pixels only."""
    cfg = SceneConfig(noise=0.0, watermark_prob=0.0, border_prob=0.0, max_distractors=0)
    with_, without, labels = scenes.intervene(cfg, 40, seed=5, attribute="watermark", value="yes")
    changed = np.abs(with_.astype(int) - without.astype(int)).sum(-1) > 0  # (N, S, S)
    assert changed.any(axis=(1, 2)).all()  # every image got its watermark
    s = cfg.image_size
    assert not changed[:, : s // 2].any() and not changed[:, :, : s // 2].any()  # bottom-right corner only
    with_, without, again = scenes.intervene(cfg, 40, seed=5, attribute="color", value="red")
    assert (again == labels).all()  # the same scenes
    differs = np.abs(with_.astype(int) - without.astype(int)).sum(-1) > 0
    for i in range(10):  # where they differ, the first render is the red object (shaded by its texture)
        r, g, b = np.median(with_[i][differs[i]], axis=0)
        assert r > 2 * g and r > 2 * b
    big, small, _ = scenes.intervene(cfg, 40, seed=5, attribute="size", value="large")
    assert ((big != small).any(-1).sum(axis=(1, 2)) > 0).all()
    with pytest.raises(ValueError, match="no value 'huge'"):
        scenes.intervene(cfg, 4, seed=5, attribute="size", value="huge")


def test_masks_carry_the_object_colour_and_shape_area():
    cfg = SceneConfig(textures=("matte", "checkered"), noise=0.0, border_prob=0.0, watermark_prob=0.0)
    batch = generate(cfg, 400, seed=0, split="probe")
    rec = batch.records
    matte = np.flatnonzero((rec["texture"] == "matte").to_numpy())
    for i in matte[:100]:
        pix = batch.images[i][batch.masks[i, 0]]
        expected = np.round(np.array(COLOR_RGB[rec.loc[i, "color"]]) * 255)
        np.testing.assert_allclose(np.median(pix, axis=0), expected, atol=1)
    circles = np.flatnonzero((rec["shape"] == "circle").to_numpy())
    area = batch.masks[circles, 0].sum(axis=(1, 2))
    np.testing.assert_allclose(area, np.pi * rec.loc[circles, "radius"].to_numpy() ** 2, rtol=0.15)
    # the mask's centroid is the recorded centre
    yy, xx = np.nonzero(batch.masks[circles[0], 0])
    assert (
        abs(xx.mean() + 0.5 - rec.loc[circles[0], "cx"]) < 1
        and abs(yy.mean() + 0.5 - rec.loc[circles[0], "cy"]) < 1
    )


def test_caption_names_every_attribute():
    batch = generate(SceneConfig(), 20, seed=1, split="train")
    for r in batch.records.to_dict("records"):
        cap = r["caption"]
        for attr in ("shape", "color", "size", "texture"):
            assert r[attr] in cap.split()
        assert f"{r['background']} background" in cap
        assert ("with a logo" in cap) == (r["watermark"] == "yes")
        assert ("with a border" in cap) == (r["border"] == "yes")
    assert (
        scenes.caption(
            r,
            {
                "color": False,
                "shape": False,
                "size": False,
                "texture": False,
                "background": False,
                "watermark": False,
                "border": False,
            }
            | {"color": True},
        )
        == f"a photo of a {r['color']} object"
    )


def test_distractor_masks_are_visible_parts_only():
    batch = generate(SceneConfig(max_distractors=3), 256, seed=0, split="train")
    m = batch.masks
    assert m.shape == (256, 4, 64, 64)
    assert not (m[:, :, None] & m[:, None, :]).sum(axis=(-1, -2))[:, ~np.eye(4, dtype=bool)].any()
    n_visible = m.any(axis=(-1, -2))[:, 1:].sum(1)
    assert (n_visible <= batch.records["n_distractors"].to_numpy()).all()


def test_bias_fraction_matches_config():
    cfg = SceneConfig()
    biases = parse_biases(["circle=background:water@0.9", "square=color:red@0.95"], cfg.values(), "shape")
    rec = generate(cfg, 8192, seed=0, split="train", biases=biases).records
    circles, squares = rec["shape"] == "circle", rec["shape"] == "square"
    assert abs((rec.loc[circles, "background"] == "water").mean() - 0.9) < 0.03
    assert abs((rec.loc[squares, "color"] == "red").mean() - 0.95) < 0.03
    # the cue is rare elsewhere: only the 1 - strength of the base rate stays
    assert (rec.loc[~circles, "background"] == "water").mean() < 0.25 * 0.1 + 0.02
    assert (rec.loc[~squares, "color"] == "red").mean() < 0.2 * 0.05 + 0.02
    # unbiased splits keep the base rates
    test = generate(cfg, 8192, seed=0, split="test").records
    assert abs((test.loc[test["shape"] == "circle", "background"] == "water").mean() - 0.25) < 0.04


@pytest.mark.parametrize(
    "spec, match",
    [
        ("circle-background:water", "expected CLASS=ATTRIBUTE:VALUE@STRENGTH"),
        ("circle=background:water@1.5", "must be in"),
        ("hexagon=background:water@0.9", "unknown class"),
        ("circle=background:lava@0.9", "unknown value"),
        ("circle=mood:happy@0.9", "attribute must be one of"),
        ("circle=shape:square@0.9", "attribute must be one of"),
    ],
)
def test_bad_bias_spec_is_a_clear_error(spec, match):
    with pytest.raises(BiasSpecError, match=match):
        WorldConfig.tiny(bias=spec)


def test_conflicting_biases_are_rejected():
    with pytest.raises(BiasSpecError, match="same cue"):
        WorldConfig.tiny(bias=["circle=color:red@0.9", "square=color:red@0.9"])
    with pytest.raises(BiasSpecError, match="every value"):
        WorldConfig.tiny(bias=["circle=watermark:yes@0.9", "square=watermark:no@0.9"])


def test_generator_throughput_is_reported(capsys):
    cfg = SceneConfig()
    generate(cfg, 256, seed=0, split="train")  # warm-up
    t0 = time.perf_counter()
    generate(cfg, 2048, seed=1, split="train")
    rate = 2048 / (time.perf_counter() - t0)
    with capsys.disabled():
        print(f"\n[synthetic] generator: {rate:.0f} images/s (64x64, one core, incl. records + captions)")


# ----------------------------------------------------------------------------------------------
# config, CLI, vocabulary


def test_config_roundtrip_and_cache_keys(tmp_path):
    cfg = WorldConfig.demo()
    assert WorldConfig.from_dict(cfg.to_dict()) == cfg
    other = cfg.with_biases(["square=color:red@0.99"])
    assert other.clip_key() == cfg.clip_key()  # one CLIP for every bias config
    assert other.world_key() != cfg.world_key()
    p = tmp_path / "w.yaml"
    p.write_text("preset: tiny\nbiases: ['triangle=watermark:yes@1']\nclassifier: {epochs: 2}\n")
    loaded = WorldConfig.from_file(p)
    assert loaded.classifier.epochs == 2 and loaded.classifier.width == WorldConfig.tiny().classifier.width
    assert [str(b) for b in loaded.biases] == ["triangle=watermark:yes@1"]
    # attribute weights survive JSON (lists) and enter the CLIP key
    d = json.loads(json.dumps(cfg.to_dict()))
    assert WorldConfig.from_dict(d) == cfg
    heavier = WorldConfig.from_dict(d | {"clip": d["clip"] | {"attribute_weights": [1, 1, 1, 1, 1, 1, 1]}})
    assert heavier.clip_key() != cfg.clip_key()


@pytest.mark.parametrize("weights", [(1.0, 2.0), (1, 1, 1, 1, 1, 1, -1), (0,) * 7])
def test_bad_attribute_weights_are_a_clear_error(weights):
    with pytest.raises(ValueError, match="attribute_weights"):
        ClipTrainConfig(attribute_weights=weights)


def test_minimal_pairs_follow_the_attribute_weights():
    from textcam.synthetic.tiny_clip import ZERO_SHOT_ATTRIBUTES, minimal_pair_codes

    probs = ClipTrainConfig().attribute_probs()
    codes = minimal_pair_codes(SceneConfig(), 8000, np.random.default_rng(0), probs)
    freq = np.bincount(codes["changed"][:4000], minlength=len(ZERO_SHOT_ATTRIBUTES)) / 4000
    np.testing.assert_allclose(freq, probs, atol=0.03)
    changed = {a: codes[a][:4000] != codes[a][4000:] for a in ZERO_SHOT_ATTRIBUTES}
    for i, a in enumerate(ZERO_SHOT_ATTRIBUTES):  # each pair differs in exactly its changed attribute
        sel = codes["changed"][:4000] == i
        assert changed[a][sel].all()
        assert not any(changed[b][sel].any() for b in ZERO_SHOT_ATTRIBUTES if b != a)


def test_cli_parser_builds_configs(tmp_path):
    parser = argparse.ArgumentParser(prog="textcam")
    add_world_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "world",
            "build",
            "--preset",
            "tiny",
            "--bias",
            "square=color:red@0.9",
            "--bias",
            "triangle=watermark:yes@1",
            "--cache-dir",
            str(tmp_path),
        ]
    )
    cfg = config_from_args(args)
    assert [str(b) for b in cfg.biases] == ["square=color:red@0.9", "triangle=watermark:yes@1"]
    assert config_from_args(parser.parse_args(["world", "generate", "--no-bias"])).biases == ()
    with pytest.raises(BiasSpecError):
        config_from_args(parser.parse_args(["world", "build", "--bias", "circle=background@0.9"]))


def test_vocabulary_covers_every_attribute_value():
    from textcam.synthetic.world import world_phrases

    vocab = {ln.strip() for ln in VOCAB.read_text().splitlines() if ln.strip() and not ln.startswith("#")}
    phrases = {
        p for d in world_phrases(WorldConfig.demo()).values() for v, p in d.items() if v != "no"
    }  # an absent artefact ("without a logo") is not a phrase to explain with
    assert phrases <= vocab


# ----------------------------------------------------------------------------------------------
# resume


def _interrupt_after(monkeypatch, module, name: str, calls: int) -> None:
    original = getattr(module, name)
    count = {"n": 0}

    def wrapped(*args, **kwargs):
        count["n"] += 1
        if count["n"] > calls:
            raise KeyboardInterrupt("simulated interruption")
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


def test_classifier_resume_matches_uninterrupted(tmp_path, monkeypatch):
    batch = generate(SceneConfig(), 256, seed=0, split="train")
    x, y = batch.images, batch.records["label"].to_numpy()
    kw = dict(width=4, epochs=2, batch_size=64, progress=False)
    ref, _ = train_classifier(x, y, 4, tmp_path / "ref", **kw)
    import textcam.synthetic.classifier as clf

    with monkeypatch.context() as m:
        _interrupt_after(m, clf.F, "cross_entropy", 6)  # dies in epoch 2 (4 steps per epoch)
        with pytest.raises(KeyboardInterrupt):
            train_classifier(x, y, 4, tmp_path / "run", **kw)
    assert (tmp_path / "run" / "train_state.pt").is_file()
    resumed, _ = train_classifier(x, y, 4, tmp_path / "run", **kw)
    for (k, a), b in zip(ref.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=k)


def test_tiny_clip_resume_matches_uninterrupted(tmp_path, monkeypatch):
    import textcam.synthetic.tiny_clip as tc

    cfg = ClipTrainConfig(epochs=2, steps_per_epoch=2, batch_size=32, warmup_steps=1, eval_images=32)
    ref = train_tiny_clip(SceneConfig(), cfg, tmp_path / "ref", progress=False)
    with monkeypatch.context() as m:
        _interrupt_after(m, tc, "soft_clip_loss", 3)
        with pytest.raises(KeyboardInterrupt):
            train_tiny_clip(SceneConfig(), cfg, tmp_path / "run", progress=False)
    res = train_tiny_clip(SceneConfig(), cfg, tmp_path / "run", progress=False)
    assert res["zero_shot"] == ref["zero_shot"]
    a, _, _ = load_tiny_clip(tmp_path / "ref")
    b, _, _ = load_tiny_clip(tmp_path / "run")
    for (k, u), v in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(u, v, msg=k)


# ----------------------------------------------------------------------------------------------
# a tiny trained world (one CLIP shared by a biased world and its control)


@pytest.fixture(scope="module")
def worlds(tiny_world_cache):
    return tiny_world_cache


@pytest.mark.slow
@pytest.mark.parametrize(
    "attribute",
    [
        "shape",
        "color",
        "size",
        "texture",
        "background",
        "watermark",
        "border",
    ],
)
def test_tiny_clip_zero_shot_per_attribute(worlds, attribute, capsys):
    _, biased, control = worlds
    zs = biased.metrics["clip"]["zero_shot"]
    if attribute == "shape":
        with capsys.disabled():
            print(f"\n[synthetic] tiny CLIP zero-shot: {zs}")
    assert control.clip_dir == biased.clip_dir  # shared, trained once
    assert zs[attribute] >= 0.8, zs


@pytest.mark.slow
def test_tiny_classifier_uses_the_planted_cue(worlds, capsys):
    _, biased, control = worlds
    spec = str(biased.biases[0])
    b = biased.metrics["classifier"]
    c = control.metrics["classifier"]
    with capsys.disabled():
        print(
            f"\n[synthetic] biased: acc {b['test_accuracy']:.3f} gap {b['bias'][spec]['gap']:.3f}; "
            f"control: acc {c['test_accuracy']:.3f} gap {c['bias'][spec]['gap']:.3f}"
        )
    # the control's clean accuracy is reported, not asserted: the tiny budget is too short for
    # shape to be learned reliably (the demo preset reaches 0.99)
    assert b["bias"][spec]["gap"] > 0.2
    assert b["bias"][spec]["gap"] > c["bias"][spec]["gap"] + 0.1


@pytest.mark.slow
def test_world_files_and_open_clip_loading(worlds):
    import open_clip

    _, world, _ = worlds
    test = world.manifest("test")
    assert len(test) == world.config.n_test and Path(test.loc[0, "path"]).is_file()
    assert {
        "image_id",
        "path",
        "label",
        "split",
        "shape",
        "color",
        "background",
        "watermark",
        "caption",
    } <= set(test)
    masks = world.masks("test")
    assert masks.shape == (world.config.n_test, 1, 64, 64)
    regen = generate(world.config.scene, 5, world.config.seed, "test")
    np.testing.assert_array_equal(masks[:5], regen.masks)
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(test.loc[3, "path"])), regen.images[3])

    model, _, preprocess = open_clip.create_model_and_transforms(world.clip_open_clip_id)
    tok = open_clip.get_tokenizer(world.clip_open_clip_id)
    ref, _, _ = load_tiny_clip(world.clip_checkpoint)
    model.eval()
    x = preprocess(Image.open(test.loc[0, "path"])).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x), ref.encode_image(x))
        assert model.encode_text(tok(["a photo of a circle"])).shape == (1, 128)

    _, meta = load_classifier(world.classifier_checkpoint)
    assert meta["target_layer"] == "layer4" and meta["class_names"] == list(world.class_names)
    from safetensors import safe_open

    with safe_open(str(world.classifier_checkpoint), framework="pt") as f:
        assert f.metadata()["textcam_arch"] == ARCH


@pytest.mark.slow
def test_cache_hit_skips_training(worlds, monkeypatch):
    import textcam.synthetic.world as w

    cache, biased, _ = worlds

    def boom(*args, **kwargs):
        raise AssertionError("training ran on a cache hit")

    monkeypatch.setattr(w, "train_tiny_clip", boom)
    monkeypatch.setattr(w, "train_classifier", boom)
    again = w.build_world(biased.config, cache_dir=cache, progress=False)
    assert again.metrics["classifier"] == biased.metrics["classifier"]
    # a new bias config reuses the CLIP but needs a classifier
    with pytest.raises(AssertionError, match="cache hit"):
        w.build_world(
            replace(biased.config, biases=(BiasSpec.parse("star=color:blue@0.99"),)),
            cache_dir=cache,
            progress=False,
        )


@pytest.mark.slow
def test_classifier_checkpoint_loads_through_the_model_registry(worlds):
    from textcam.models import load_model

    _, world, _ = worlds
    loaded = load_model(world.classifier_checkpoint)
    ours, _ = load_classifier(world.classifier_checkpoint)
    assert loaded.target_layer == "layer4" and list(loaded.class_names) == list(world.class_names)
    assert tuple(loaded.input_size) == (64, 64)
    from PIL import Image

    path = world.manifest("test").loc[0, "path"]
    x = loaded.preprocess(Image.open(path).convert("RGB")).unsqueeze(0)
    from textcam.synthetic.classifier import to_classifier_tensor

    torch.testing.assert_close(x, to_classifier_tensor(np.asarray(Image.open(path))[None]))
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), ours(x))
