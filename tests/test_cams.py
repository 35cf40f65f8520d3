"""CAM methods: exact hand-computed maps, a slow reference, equivalences, hooks and side effects."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import VisionTransformer, resnet18

from textcam.cams import METHODS, CamMethod, build_cam, normalize_maps, upsample_maps
from textcam.layers import TokenGrid
from textcam.targets import ClassTargets, MultiLabel, TopK

# ---------------------------------------------------------------- a network computable by hand

A0 = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
A1 = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
W = torch.tensor([[1.0, -1.0], [0.5, 2.0]])


class HandNet(nn.Module):
    """features = ReLU(conv1x1) copying input channels 0, 1; then GAP and a linear head W."""

    def __init__(self) -> None:
        super().__init__()
        conv = nn.Conv2d(3, 2, 1, bias=False)
        fc = nn.Linear(2, 2)
        with torch.no_grad():
            conv.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).view(2, 3, 1, 1))
            fc.weight.copy_(W)
            fc.bias.copy_(torch.tensor([0.1, 0.0]))
        self.features = nn.Sequential(conv, nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def hand_input() -> torch.Tensor:
    return torch.stack([A0, A1, torch.zeros(2, 2)])[None]


@pytest.mark.parametrize(
    ("method", "cls", "expected"),
    [
        ("cam", 0, torch.relu(A0 - A1)),  # [[1, 1], [2, 4]]
        ("cam", 1, 0.5 * A0 + 2 * A1),
        ("gradcam", 0, torch.relu(0.25 * A0 - 0.25 * A1)),  # ∂y/∂A = W/(h·w) everywhere
        ("gradcam", 1, 0.125 * A0 + 0.5 * A1),
        ("xgradcam", 0, torch.relu(0.25 * A0 - 0.25 * A1)),  # Σ g·A / Σ A = g for constant g
        # g = 1/4 and Σ A_0 = 10: α = g²/(2g² + 10 g³); w_0 = 4·g·α = 2/9, w_1 = 0 (ReLU(g) = 0)
        ("gradcampp", 0, (2 / 9) * A0),
        ("layercam", 0, 0.25 * A0),
    ],
)
def test_hand_set_network_exact_maps(method, cls, expected):
    net = HandNet().eval()
    out = build_cam(method, net, "features")(hand_input(), ClassTargets([cls]))
    assert out.targets.tolist() == [[cls]]
    torch.testing.assert_close(out.activations[0], torch.stack([A0, A1]))
    torch.testing.assert_close(out.maps[0, 0], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logits, net(hand_input()))


def test_hand_set_network_scorecam():
    """Masks (A_j - min)/(max - min) of the 2×2 input itself; weights softmax over channels."""
    net = HandNet().eval()
    x = hand_input()
    masks = [(A0 - 1) / 3, A1]
    scores = torch.stack([net(x * m)[0, 0] for m in masks])
    w = scores.softmax(0)
    expected = torch.relu(w[0] * A0 + w[1] * A1)
    out = build_cam("scorecam", net, "features")(x, ClassTargets([0]))
    torch.testing.assert_close(out.weights[0, 0], w, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.maps[0, 0], expected, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- slow plain references


def reference_gradients(model, layer, x, classes):
    """Full backward per (sample, class); a tensor hook on the layer output records its gradient.

    A tensor hook registered before any in-place change of the output fires with the gradient of
    the value the layer produced, and the activations are cloned for the same reason.
    """
    store = {}

    def hook(module, args, output):
        store["a"] = output.detach().clone()
        if output.requires_grad:
            output.register_hook(lambda grad: store.__setitem__("g", grad))

    handle = layer.register_forward_hook(hook)
    grads, acts = [], []
    try:
        for b in range(x.shape[0]):
            row = []
            for c in classes[b]:
                model.zero_grad()
                logits = model(x[b : b + 1])
                logits[0, c].backward()
                row.append(store["g"][0].clone())
            acts.append(store["a"][0])
            grads.append(torch.stack(row))
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    return torch.stack(acts), torch.stack(grads)  # (B, C, h, w), (B, K, C, h, w)


def reference_maps(method, acts, grads):
    a = acts[:, None]
    sum_a = acts.sum((-2, -1))[:, None, :, None, None]
    if method == "gradcam":
        w = grads.mean((-2, -1))[..., None, None]
    elif method == "xgradcam":
        w = ((grads * a).sum((-2, -1)) / (acts.sum((-2, -1))[:, None] + 1e-7))[..., None, None]
    elif method == "gradcampp":
        alpha = grads**2 / (2 * grads**2 + sum_a * grads**3 + 1e-6)
        alpha = torch.where(grads != 0, alpha, torch.zeros_like(alpha))
        w = (alpha * torch.relu(grads)).sum((-2, -1))[..., None, None]
    else:  # layercam
        w = torch.relu(grads)
    return torch.relu((w * a).sum(2))


@pytest.fixture(scope="module")
def net18():
    torch.manual_seed(0)
    return resnet18(num_classes=10).eval()


@pytest.fixture(scope="module")
def x64():
    torch.manual_seed(1)
    return torch.randn(2, 3, 64, 64)


@pytest.mark.parametrize("layer", ["layer4", "layer3.1.bn2"])  # bn2's output is then changed in place
def test_matches_slow_reference(net18, x64, layer):
    targets = net18(x64).topk(2, dim=1).indices
    acts, grads = reference_gradients(net18, net18.get_submodule(layer), x64, targets.tolist())
    methods = ["gradcam", "gradcampp", "layercam"]
    if layer == "layer4":  # XGrad-CAM divides by Σ A, ill-conditioned on signed pre-ReLU maps like bn2's
        methods.append("xgradcam")
    for method in methods:
        out = build_cam(method, net18, layer)(x64, TopK(2))
        assert torch.equal(out.targets, targets)
        torch.testing.assert_close(out.activations, acts)
        torch.testing.assert_close(out.maps, reference_maps(method, acts, grads), rtol=1e-4, atol=1e-6)
        assert out.maps.amax() > 0, method


def test_gradcam_equals_cam_over_hw_for_gap_linear_head(net18, x64):
    out_g = build_cam("gradcam", net18, "layer4")(x64, TopK(3))
    out_c = build_cam("cam", net18, "layer4")(x64, TopK(3))
    hw = out_g.activations.shape[-1] * out_g.activations.shape[-2]
    torch.testing.assert_close(out_g.weights * hw, out_c.weights, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(out_g.maps * hw, out_c.maps, rtol=1e-4, atol=1e-6)
    # CAM sums to h·w·(y_k - b_k) before the ReLU.
    pre = torch.einsum("bkc,bchw->bk", out_c.weights, out_c.activations)
    y = out_c.logits.gather(1, out_c.targets) - net18.fc.bias[out_c.targets]
    torch.testing.assert_close(pre, hw * y.detach(), rtol=1e-4, atol=1e-5)


def test_per_sample_targets_equal_single_image_calls(net18, x64):
    cam = build_cam("gradcampp", net18, "layer4")
    out = cam(x64, [3, 7])
    assert out.targets.tolist() == [[3], [7]]
    for b, c in enumerate([3, 7]):
        single = cam(x64[b : b + 1], ClassTargets(c))
        torch.testing.assert_close(out.maps[b], single.maps[0], rtol=1e-4, atol=1e-6)


def test_topk_columns_equal_explicit_targets(net18, x64):
    cam = build_cam("gradcam", net18, "layer4")
    out = cam(x64, TopK(3))
    assert torch.equal(out.targets, out.logits.topk(3, dim=1).indices)
    assert out.maps.shape == (2, 3, 2, 2) and out.weights.shape == (2, 3, 512)
    second = cam(x64, ClassTargets(out.targets[:, 1]))
    torch.testing.assert_close(out.maps[:, 1], second.maps[:, 0])
    assert out.valid.all()


def test_multilabel_targets_and_valid_mask():
    logits = torch.tensor([[3.0, -1.0, 2.0, 0.5], [-2.0, 1.0, -3.0, -1.0]])
    target = MultiLabel(threshold=0.5)
    scores, idx = target(logits)
    assert idx.tolist() == [[0, 2, 3], [1, 3, 0]]  # K = 3 positives in row 0; row 1 padded
    assert target.valid(logits, idx).tolist() == [[True, True, True], [True, False, False]]
    torch.testing.assert_close(scores, logits.gather(1, idx))  # the score is the logit
    assert MultiLabel(0.5, max_k=2).select(logits).shape == (2, 2)

    class Sigmoid(nn.Module):  # a multi-label model: the hand net with a 2-output sigmoid head
        def __init__(self):
            super().__init__()
            self.net = HandNet()

        def forward(self, x):
            return self.net(x)

    out = build_cam("gradcam", Sigmoid().eval(), "net.features")(hand_input(), MultiLabel(0.5))
    assert out.targets.tolist() == [[1, 0]] and out.valid.tolist() == [[True, True]]
    torch.testing.assert_close(out.maps[0, 1], torch.relu(0.25 * A0 - 0.25 * A1))


@pytest.mark.parametrize("wrap", ["attr", "dict"])
def test_models_returning_logits_objects(net18, x64, wrap):
    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = net18

        def forward(self, x):
            y = self.inner(x)
            return SimpleNamespace(logits=y, hidden=None) if wrap == "attr" else {"logits": y}

    plain = build_cam("gradcam", net18, "layer4")(x64)
    out = build_cam("gradcam", Wrapped().eval(), "inner.layer4")(x64)
    torch.testing.assert_close(out.maps, plain.maps)
    torch.testing.assert_close(out.logits, plain.logits)


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    ).eval()


def test_hooks_removed_and_flags_restored_even_when_the_model_raises(x64):
    net = small_net()
    net[0].weight.requires_grad_(False)  # a mixed state the call must restore
    for name in sorted(METHODS):
        build_cam(name, net, "3")(x64)
        assert not any(m._forward_hooks for m in net.modules()), name
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    assert flags == {n: n != "0.weight" for n in flags}
    assert all(p.grad is None for p in net.parameters())  # nothing accumulated in .grad

    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = HandNet().features
            self.head = nn.Linear(2, 2)

        def forward(self, x):
            self.body(x)
            raise RuntimeError("boom")

    boom = Boom()
    for name in ("gradcam", "cam"):
        with pytest.raises(RuntimeError, match="boom"):
            build_cam(name, boom, "body")(hand_input())
        assert not boom.body._forward_hooks
        assert all(p.requires_grad for p in boom.parameters())


def test_outputs_hold_no_graph_and_lower_layers_record_no_autograd(net18, x64):
    seen = []
    probe = net18.layer2.register_forward_hook(lambda m, a, out: seen.append(out.requires_grad))
    try:
        out = build_cam("gradcam", net18, "layer4")(x64)
    finally:
        probe.remove()
    assert seen == [False]  # below the target layer nothing is recorded
    for value in (out.logits, out.activations, out.weights, out.maps):
        assert value.grad_fn is None and not value.requires_grad


def test_vit_tokens_reshaped_and_match_reference():
    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)
    vit.eval()
    x = torch.randn(2, 3, 32, 32)
    layer = "encoder.layers.-1.ln_1"
    out = build_cam("gradcam", vit, layer)(x, TopK(2))
    assert out.activations.shape == (2, 32, 4, 4)
    acts, grads = reference_gradients(vit, vit.encoder.layers[-1].ln_1, x, out.targets.tolist())
    grid = TokenGrid(1, 8)
    acts = grid.to_map(acts, (32, 32))
    grads = grid.to_map(grads.flatten(0, 1), (32, 32)).unflatten(0, (2, 2))
    torch.testing.assert_close(out.maps, reference_maps("gradcam", acts, grads), rtol=1e-4, atol=1e-6)


def test_clear_errors():
    net = HandNet()
    with pytest.raises(ValueError, match=r"unknown CAM method 'gradcam2'.*gradcampp"):
        build_cam("gradcam2", net, "features")
    with pytest.raises(ValueError, match=r"not a \(B, C, h, w\) map"):
        build_cam("gradcam", net, "fc")(hand_input())  # (B, 2) output

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.ReLU()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(self.act(self.act(x)).mean((2, 3)))

    with pytest.raises(ValueError, match="more than once"):
        build_cam("gradcam", Shared(), "act")(hand_input())
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        build_cam("gradcam", net, "features")(torch.zeros(3, 2, 2))
    with pytest.raises(ValueError, match="class indices"):
        build_cam("gradcam", net, "features")(hand_input(), ClassTargets([5]))


def test_registry_and_helpers():
    assert sorted(METHODS) == ["cam", "gradcam", "gradcampp", "layercam", "scorecam", "xgradcam"]
    assert all(issubclass(cls, CamMethod) and cls.name == name for name, cls in METHODS.items())
    maps = torch.tensor([[[[0.0, 2.0], [4.0, 6.0]]]])
    torch.testing.assert_close(normalize_maps(maps), maps / 6, atol=1e-6, rtol=0)
    up = upsample_maps(maps, (4, 4))
    torch.testing.assert_close(up, F.interpolate(maps, size=(4, 4), mode="bilinear", align_corners=False))


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_gradient_methods_work_inside_no_grad_contexts(mode):
    net = HandNet().eval()
    with mode():
        out = build_cam("gradcam", net, "features")(hand_input(), ClassTargets([0]))
    torch.testing.assert_close(out.maps[0, 0], torch.relu(0.25 * A0 - 0.25 * A1))


def test_deterministic(net18, x64):
    cam = build_cam("gradcampp", net18, "layer4")
    assert torch.equal(cam(x64).maps, cam(x64).maps)
