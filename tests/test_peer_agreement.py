"""Our maps agree with pytorch-grad-cam's on the same model, layer, inputs and targets.

pytorch-grad-cam returns, per image, ``scale(ReLU(Σ_j w_j A_j))`` resized to the input with
``cv2.resize`` (bilinear, half-pixel centres) and min-max scaled. We bring our layer-resolution maps
to the input size with ``upsample_maps`` (bilinear, ``align_corners=False``) and compare with the
Pearson correlation, which ignores the min-max scaling: every map must reach r ≥ 0.99.

Models: (a) EfficientNet-Lite0 with its ImageNet weights, (b) torchvision ResNet-50 and (c) timm
ViT-S/16 at 96 px (a 6×6 token grid), both random with a fixed seed, in eval mode. Targets are the
predicted class: for a GAP + linear head the pre-ReLU Grad-CAM map sums to h·w·(y_k - b_k), which
is positive for the top class, so random-init maps are not all zero. The random ViTs get random
affine parameters on the target LayerNorm (at init its output sums to exactly 0 over channels, so a
near-uniform weighting would leave float noise) and a wider random head; ``compare`` rejects maps
that are a near-cancellation of much larger terms. Score-CAM costs one forward
per channel, so it runs on one or two small images at layers with few channels: EfficientNet-Lite0
``_blocks.10`` (112 channels, 4×4 at 64 px), ResNet-50 ``layer1`` (256 channels, 12×12 at 48 px),
ViT-Ti/16 ``blocks.-1.norm1`` at 64 px (192 channels, 4×4 tokens).
"""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torchvision
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, ScoreCAM, XGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget
from torchvision.models import VisionTransformer

from textcam.cams import build_cam, upsample_maps
from textcam.layers import TokenGrid, get_layer

PEERS = {"gradcam": GradCAM, "gradcampp": GradCAMPlusPlus, "xgradcam": XGradCAM, "scorecam": ScoreCAM}


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def batch(photos, lite_preprocess, size: int) -> torch.Tensor:
    """The three photos through the model's own preprocessing, resized to ``size``."""
    x = torch.stack([lite_preprocess(photos[n]) for n in ("chelsea", "astronaut", "coffee")])
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)


def compare(model, layer, x, method, *, grid=None, peer_target=ClassifierOutputTarget, **kwargs):
    """Pearson correlation of our map with pytorch-grad-cam's, for each image (predicted class)."""
    model.eval()
    ours = build_cam(method, model, layer, token_grid=grid, **kwargs)(x)
    # Not degenerate: the map is not a near-cancellation of much larger terms (float noise).
    scale = torch.einsum("bkc,bchw->bkhw", ours.weights.abs(), ours.activations.abs()).amax()
    assert ours.maps.amax() > 1e-3 * scale, "degenerate map"
    classes = ours.targets[:, 0].tolist()
    reshape = None
    if grid is not None:

        def reshape(t):
            return grid.to_map(t, tuple(x.shape[-2:]))

    peer_cls = PEERS[method]
    with peer_cls(model=model, target_layers=[get_layer(model, layer)], reshape_transform=reshape) as peer:
        if method == "scorecam":
            peer.batch_size = 256
        theirs = peer(input_tensor=x, targets=[peer_target(c) for c in classes])
    mine = upsample_maps(ours.maps[:, :1], x.shape[-2:])[:, 0].numpy()
    assert all(m.std() > 0 for m in mine), "degenerate (constant) map"
    r = [pearson(m, t) for m, t in zip(mine, theirs, strict=True)]
    print(
        f"[peer agreement] {method} at {layer}: min Pearson r {min(r):.6f} over {len(r)} maps"
    )  # -s shows it
    return r


@pytest.fixture(scope="module")
def resnet50():
    torch.manual_seed(0)
    return torchvision.models.resnet50().eval()


def random_vit(name: str, img_size: int) -> torch.nn.Module:
    """A random timm ViT whose target norm has random affine parameters.

    At init a LayerNorm has weight 1 and bias 0, so the channel sum of its output is exactly 0 for
    every token: near-uniform weights (Score-CAM on a random head) would give a pure-noise map.
    """
    torch.manual_seed(0)
    vit = timm.create_model(name, pretrained=False, img_size=img_size).eval()
    with torch.no_grad():
        vit.blocks[-1].norm1.weight.normal_(1.0, 0.5)
        vit.blocks[-1].norm1.bias.normal_(0.0, 0.5)
        vit.head.weight.normal_(0.0, 0.1)
    return vit


@pytest.fixture(scope="module")
def vit_small():
    return random_vit("vit_small_patch16_224", 96)


@pytest.mark.parametrize("method", ["gradcam", "gradcampp", "xgradcam"])
def test_gradient_methods_efficientnet_lite0(lite0, photos, method):
    x = batch(photos, lite0.preprocess, 224)
    assert min(compare(lite0.module, lite0.target_layer, x, method)) >= 0.99


@pytest.mark.parametrize("method", ["gradcam", "gradcampp", "xgradcam"])
def test_gradient_methods_resnet50(resnet50, lite0, photos, method):
    x = batch(photos, lite0.preprocess, 224)[:2] * 2  # lite0's [-1, 1] scaling; any fixed input will do
    assert min(compare(resnet50, "layer4", x, method)) >= 0.99


@pytest.mark.parametrize("method", ["gradcam", "gradcampp", "xgradcam"])
def test_gradient_methods_vit(vit_small, lite0, photos, method):
    x = batch(photos, lite0.preprocess, 96)
    grid = TokenGrid.detect(vit_small)
    assert min(compare(vit_small, "blocks.-1.norm1", x, method, grid=grid)) >= 0.99


def test_scorecam_efficientnet_lite0(lite0, photos):
    # _blocks.10 (112 channels, 4×4 at 64 px): the head map has 1280 channels and is 2×2 at 64 px.
    x = batch(photos, lite0.preprocess, 64)[:2]
    assert min(compare(lite0.module, "_blocks.10", x, "scorecam", batch_size=256)) >= 0.99


def test_scorecam_resnet50(resnet50, lite0, photos):
    # layer1 (256 channels, 12×12 at 48 px): layer4's 2048 forwards per image are too slow for CI.
    x = batch(photos, lite0.preprocess, 48)[:1] * 2
    assert min(compare(resnet50, "layer1", x, "scorecam", batch_size=256)) >= 0.99


def test_scorecam_vit(photos, lite0):
    vit = random_vit("vit_tiny_patch16_224", 64)  # 192 channels, 4×4 grid
    x = batch(photos, lite0.preprocess, 64)[:2]
    r = compare(vit, "blocks.-1.norm1", x, "scorecam", grid=TokenGrid.detect(vit), batch_size=192)
    assert min(r) >= 0.99


def test_scorecam_probability_score_tiny_torchvision_vit(lite0, photos):
    torch.manual_seed(0)
    vit = VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    )
    with torch.no_grad():  # torchvision zero-initialises the head; see random_vit for the norm
        vit.heads.head.weight.normal_(0.0, 1.0)
        vit.encoder.layers[-1].ln_1.weight.normal_(1.0, 0.5)
        vit.encoder.layers[-1].ln_1.bias.normal_(0.0, 0.5)
    x = batch(photos, lite0.preprocess, 32)
    r = compare(
        vit,
        "encoder.layers.-1.ln_1",
        x,
        "scorecam",
        grid=TokenGrid(1, 8),
        score="prob",
        peer_target=ClassifierOutputSoftmaxTarget,
    )
    assert min(r) >= 0.99
