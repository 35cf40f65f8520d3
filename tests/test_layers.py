"""Target-layer lookup, candidate listing and ViT token → map reshaping."""

from __future__ import annotations

import pytest
import timm
import torch
from torchvision.models import VisionTransformer, resnet18

from textcam.layers import LayerInfo, TokenGrid, UnknownLayerError, get_layer, list_layers, resolve_layer_name


def tiny_tv_vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
    )


def tiny_timm_vit(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5, **kw
    )


def test_get_layer_dotted_and_negative_indices():
    vit = tiny_timm_vit()
    assert get_layer(vit, "blocks.-1.norm1") is vit.blocks[1].norm1
    assert resolve_layer_name(vit, "blocks.-1.norm1") == "blocks.1.norm1"
    tv = tiny_tv_vit()
    # torchvision names its encoder blocks "encoder_layer_i": positional indices still work.
    assert get_layer(tv, "encoder.layers.-1.ln_1") is tv.encoder.layers[-1].ln_1
    assert resolve_layer_name(tv, "encoder.layers.0") == "encoder.layers.encoder_layer_0"
    net = resnet18()
    assert get_layer(net, "layer4") is net.layer4
    assert get_layer(net, "layer4.-1.conv2") is net.layer4[1].conv2


def test_unknown_layer_lists_close_matches():
    with pytest.raises(UnknownLayerError) as info:
        get_layer(resnet18(), "layer5")
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "'layer5'" in message and "layer4" in message and "textcam layers" in message
    with pytest.raises(UnknownLayerError, match=r"blocks\.1\.norm1"):
        get_layer(tiny_timm_vit(), "blocks.1.norm")
    with pytest.raises(UnknownLayerError):
        get_layer(resnet18(), "layer4.7")  # index out of range


def test_token_grid_to_map_values_and_prefix():
    grid = TokenGrid(num_prefix_tokens=2, patch_size=8)
    assert grid.patch_size == (8, 8)
    b, c, h, w = 2, 3, 2, 3  # non-square input 16×24 → 2×3 grid
    expected = torch.arange(b * c * h * w, dtype=torch.float32).view(b, c, h, w)
    patches = expected.permute(0, 2, 3, 1).reshape(b, h * w, c)  # row-major patch tokens
    tokens = torch.cat([torch.full((b, 2, c), -1.0), patches], dim=1)
    out = grid.to_map(tokens, (16, 24))
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="do not fit"):
        grid.to_map(tokens, (16, 16))
    with pytest.raises(ValueError):
        TokenGrid(num_prefix_tokens=1, patch_size=0)


def test_token_grid_detection_timm_and_torchvision():
    assert TokenGrid.detect(tiny_tv_vit()) == TokenGrid(1, (8, 8))
    assert TokenGrid.detect(tiny_timm_vit()) == TokenGrid(1, (8, 8))
    assert TokenGrid.detect(tiny_timm_vit(reg_tokens=2)) == TokenGrid(3, (8, 8))
    assert TokenGrid.detect(resnet18()) is None


def test_token_grid_matches_patch_embedding():
    """Patch token (i, j) of a real ViT is the embedding of the image patch at row i, column j."""
    vit = tiny_timm_vit().eval()
    x = torch.randn(1, 3, 32, 32)
    tokens = torch.cat([torch.zeros(1, 1, 32), vit.patch_embed(x)], dim=1)
    fmap = TokenGrid.detect(vit).to_map(tokens, (32, 32))
    patch = vit.patch_embed.proj(x[:, :, 8:16, 16:24])  # row 1, column 2
    torch.testing.assert_close(fmap[:, :, 1, 2], patch[:, :, 0, 0])


def test_list_layers_cnn_and_vit():
    net = resnet18().eval()
    rows = list_layers(net, (64, 64), default="layer4")
    by_name = {r.name: r for r in rows}
    assert by_name["layer4"] == LayerInfo("layer4", "Sequential", (512, 2, 2), True)
    assert by_name["layer3.1.conv2"].out_shape == (256, 4, 4)
    assert sum(r.is_default for r in rows) == 1
    assert "fc" not in by_name and "avgpool" not in by_name  # 1×1 and flat outputs are no maps
    assert all(not m._forward_hooks for m in net.modules())

    vit = tiny_tv_vit().eval()
    rows = list_layers(vit, (32, 32), default="encoder.layers.-1.ln_1")
    by_name = {r.name: r for r in rows}
    assert by_name["encoder.layers.encoder_layer_1.ln_1"].out_shape == (32, 4, 4)
    assert by_name["encoder.layers.encoder_layer_1.ln_1"].is_default
    assert all(not m._forward_hooks for m in vit.modules())
