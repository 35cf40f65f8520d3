"""Model registry, loading, preprocessing and local checkpoints (all offline)."""

from __future__ import annotations

import csv
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
from PIL import Image

from textcam.layers import list_layers
from textcam.models import (
    MODELS,
    ModelConfig,
    PreprocessSpec,
    UnknownModelError,
    WeightsUnavailableError,
    imagenet_class_names,
    list_models,
    load_model,
    preprocess_spec,
    read_checkpoint_metadata,
    save_checkpoint,
)

SAMPLES = Path(__file__).resolve().parents[2] / "shared"
CAT_FAMILY = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def test_registry_names():
    expected = {
        "efficientnet-lite0",
        "resnet18",
        "resnet50",
        "convnext_tiny",
        "vit_b_16",
        "vit_base_patch16_224",
        "vit_small_patch16_224",
        "clevr-cnn",
    }
    assert expected <= set(list_models()) and list_models() == sorted(MODELS)
    assert all(isinstance(cfg, ModelConfig) for cfg in MODELS.values())
    names = imagenet_class_names()
    assert len(names) == 1000 and names[281] == "tabby" and names[0] == "tench"


def test_lite0_predicts_the_cat(lite0, photos):
    assert lite0.model_id == "efficientnet-lite0:efficientnet-lite0-57934424"
    assert lite0.target_layer == "_head_act" and lite0.input_size == (224, 224)
    assert lite0.class_names[281] == "tabby" and lite0.output == "softmax"
    x = lite0.preprocess(photos["chelsea"])[None]
    assert x.shape == (1, 3, 224, 224) and float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    with torch.no_grad():
        probs = lite0.module(x).softmax(1)[0]
    assert int(probs.argmax()) in CAT_FAMILY
    assert float(probs[sorted(CAT_FAMILY)].sum()) > 0.5


def test_lite0_on_imagenet_samples(lite0):
    tsv = SAMPLES / "imagenet-samples.tsv"
    if not tsv.is_file():
        pytest.skip("shared ImageNet samples not present")
    rows = list(csv.DictReader(tsv.open(), delimiter="\t"))[::100]  # 10 classes across the range
    x = torch.stack([lite0.preprocess(Image.open(SAMPLES / "imagenet-samples" / r["file"])) for r in rows])
    with torch.no_grad():
        pred = lite0.module(x).argmax(1)
    labels = torch.tensor([int(r["class_index"]) for r in rows])
    assert int((pred == labels).sum()) >= 8


def test_lite0_default_layer_is_the_pooled_map(lite0):
    rows = {r.name: r for r in list_layers(lite0.module, (224, 224), default=lite0.target_layer)}
    assert rows["_head_act"].out_shape == (1280, 7, 7) and rows["_head_act"].is_default
    # the upstream shared stem/head activation is called twice; ours is its own module
    assert lite0.module._head_act is not lite0.module._swish


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("resnet18", (512, 7, 7)),
        ("resnet50", (2048, 7, 7)),
        ("convnext_tiny", (768, 7, 7)),
        ("vit_b_16", (768, 14, 14)),
        ("vit_small_patch16_224", (384, 14, 14)),
    ],
)
def test_random_init_default_layers(name, shape):
    lm = load_model(name, weights="none")
    assert lm.model_id == f"{name}:random" and len(lm.class_names) == 1000
    assert not lm.module.training
    rows = {r.name: r for r in list_layers(lm.module, lm.input_size, lm.token_grid, lm.target_layer)}
    assert rows[lm.target_layer].out_shape == shape and rows[lm.target_layer].is_default
    if name.startswith("vit"):
        assert lm.token_grid is not None and lm.token_grid.patch_size == (16, 16)


def test_timm_vit_config_without_network():
    cfg = MODELS["vit_base_patch16_224"]
    assert cfg.target_layer == "blocks.11.norm1" and cfg.token_grid.num_prefix_tokens == 1
    spec = preprocess_spec(cfg)
    assert (spec.resize, spec.crop, spec.interpolation) == (248, 224, "bicubic")
    assert spec.mean == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "convnext_tiny", "vit_b_16"])
def test_torchvision_preprocessing_is_the_weights_own(name, photos):
    """The same tensor as ``weights.transforms()`` (torchvision's published preprocessing)."""
    from torchvision.models import get_model_weights

    cfg = MODELS[name]
    theirs = get_model_weights(name)[cfg.weights].transforms()
    image = photos["chelsea"]
    ours = preprocess_spec(cfg).build()(image)
    torch.testing.assert_close(ours, theirs(image), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["vit_base_patch16_224", "vit_small_patch16_224"])
def test_timm_preprocessing_is_the_weights_own(name, photos):
    """The same tensor as timm's ``create_transform(**resolve_data_config(...))``."""
    import timm
    from timm.data import create_transform, resolve_data_config

    cfg = MODELS[name]
    pretrained = timm.models.get_pretrained_cfg(f"{name}.{cfg.weights}")
    theirs = create_transform(**resolve_data_config(pretrained_cfg=pretrained.to_dict()))
    image = photos["chelsea"]
    torch.testing.assert_close(preprocess_spec(cfg).build()(image), theirs(image), atol=1e-6, rtol=0)


def test_missing_network_is_a_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise URLError("Name or service not known")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    with pytest.raises(WeightsUnavailableError, match="weights='none'") as info:
        load_model("resnet18")
    assert isinstance(info.value.__cause__, URLError)
    with pytest.raises(WeightsUnavailableError, match="no published weights"):
        load_model("clevr-cnn", num_classes=3)


def test_unknown_names_and_bare_state_dicts(tmp_path):
    with pytest.raises(UnknownModelError, match="resnet50"):
        load_model("resnet5")
    path = tmp_path / "model.pt"
    torch.save({}, path)
    with pytest.raises(ValueError, match="name its architecture"):
        load_model(str(path))
    with pytest.raises(ValueError, match="1000 classes"):
        load_model("efficientnet-lite0", num_classes=10)


def _logits(lm, x):
    with torch.no_grad():
        return lm.module(x)


def test_safetensors_round_trip(tmp_path):
    torch.manual_seed(0)
    src = load_model("resnet18", weights="none", num_classes=3)
    path = save_checkpoint(
        src.module,
        tmp_path / "net.safetensors",
        arch="resnet18",
        class_names=["cube", "sphere", "cylinder"],
        target_layer="layer4.-1",
        preprocess={"resize": 64, "crop": 64, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
        trained_steps=10,
    )
    arch, config = read_checkpoint_metadata(path)
    assert arch == "resnet18" and config["num_classes"] == 3 and config["trained_steps"] == 10
    loaded = load_model(str(path))
    assert loaded.class_names == ["cube", "sphere", "cylinder"]
    assert loaded.target_layer == "layer4.1" and loaded.input_size == (64, 64)
    assert loaded.model_id.startswith("resnet18:net@") and len(loaded.model_id.split("@")[1]) == 12
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(_logits(loaded, x), _logits(src, x))
    image = Image.new("L", (80, 100), color=128)  # grayscale, non-square
    assert loaded.preprocess(image).shape == (3, 64, 64)
    torch.testing.assert_close(loaded.preprocess(image), torch.full((3, 64, 64), 128 / 255 * 2 - 1))


def test_state_dict_round_trip_with_explicit_arch(tmp_path):
    torch.manual_seed(0)
    src = load_model("resnet18", weights="none", num_classes=4)
    path = tmp_path / "net.pth"
    torch.save({"state_dict": src.module.state_dict()}, path)
    loaded = load_model("resnet18", weights=str(path), num_classes=4, target_layer="layer3")
    assert loaded.target_layer == "layer3" and loaded.class_names == [f"class_{i}" for i in range(4)]
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(_logits(loaded, x), _logits(src, x))


def test_callable_family_and_checkpoint_metadata(tmp_path, monkeypatch):
    """A factory called as ``factory(num_classes=n, **model_kwargs)``, layer from the checkpoint."""
    cfg = ModelConfig(
        name="tiny-callable",
        factory="torchvision.models:resnet18",
        family="callable",
        target_layer=None,
        num_classes=None,
        class_names=None,
        preprocess=PreprocessSpec(resize=32, crop=32),
    )
    monkeypatch.setitem(MODELS, cfg.name, cfg)
    with pytest.raises(ValueError, match="num_classes"):
        load_model("tiny-callable", weights="none")
    torch.manual_seed(0)
    net = load_model("tiny-callable", weights="none", num_classes=2, target_layer="layer2").module
    path = save_checkpoint(
        net,
        tmp_path / "t.safetensors",
        arch="tiny-callable",
        num_classes=2,
        target_layer="layer3",
        output="sigmoid",
        model_kwargs={"zero_init_residual": True},
    )
    loaded = load_model(path)
    assert loaded.target_layer == "layer3" and loaded.output == "sigmoid" and len(loaded.class_names) == 2
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(_logits(loaded, x), net(x).detach())
