"""The same explanations and channel bank on a GPU as on the CPU.

Skipped where no CUDA device is present (CI); run on a GPU machine with ``pytest tests/test_cuda.py``.
TF32 is switched off for the comparison: with it, convolutions and products round to 10-bit mantissas,
which is a choice of speed the user makes, not a difference between the two code paths.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(autouse=True)
def full_precision() -> Iterator[None]:
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """48 image files: crops of the scikit-image photos at several offsets and scales."""
    from skimage import data

    folder = tmp_path_factory.mktemp("images")
    paths = []
    for name in ("chelsea", "astronaut", "coffee"):
        photo = Image.fromarray(getattr(data, name)())
        for i in range(16):
            w, h = photo.size
            side = int(min(w, h) * (0.5 + 0.03 * i))
            x0, y0 = (w - side) * (i % 4) // 3, (h - side) * (i // 4) // 3
            path = folder / f"{name}-{i:02d}.png"
            photo.crop((x0, y0, x0 + side, y0 + side)).save(path)
            paths.append(path)
    return paths


def _bank(model, n_dims: int = 64):
    from textcam.bank import BankMeta, ChannelBank

    g = torch.Generator().manual_seed(0)
    channels = 512
    directions = torch.nn.functional.normalize(torch.randn(channels, n_dims, generator=g), dim=1)
    meta = BankMeta(model.model_id, model.target_layer, "random", 10, 0.5, 0, "test", channels, n_dims)
    return ChannelBank(directions, meta)


@pytest.mark.parametrize("method", ["cam", "gradcam", "gradcampp", "layercam", "scorecam", "xgradcam"])
def test_explanations_on_cuda_equal_the_cpu_ones(method: str, images: list[Path]) -> None:
    from textcam.data import read_image
    from textcam.explain import Explainer
    from textcam.models import load_model

    torch.manual_seed(0)
    cpu_model = load_model("resnet18", weights="none")
    gpu_model = load_model("resnet18", weights="none", device="cuda")
    gpu_model.module.load_state_dict(cpu_model.module.state_dict())
    assert next(gpu_model.module.parameters()).is_cuda
    bank = _bank(cpu_model)
    phrases = [f"phrase {i}" for i in range(300)]
    text = torch.randn(300, 64, generator=torch.Generator().manual_seed(1))
    n = 4 if method == "scorecam" else 16  # Score-CAM: one masked forward per channel and image
    x = torch.stack([cpu_model.preprocess(read_image(p)) for p in images[:n]])
    got = {}
    for device, model in (("cpu", cpu_model), ("cuda", gpu_model)):
        explainer = Explainer(model, bank, phrases, text, method=method, top_k=2, device=device)
        got[device] = explainer.explain_tensors(x)
    cpu, gpu = got["cpu"], got["cuda"]
    assert gpu.saliency.is_cuda
    torch.testing.assert_close(gpu.targets.cpu(), cpu.targets)
    for name in ("logits", "saliency", "contributions", "text_for", "text_against"):
        torch.testing.assert_close(getattr(gpu, name).cpu(), getattr(cpu, name), rtol=1e-4, atol=1e-4)
    for name in ("phrases_for", "phrases_against"):
        torch.testing.assert_close(getattr(gpu, name).indices.cpu(), getattr(cpu, name).indices)
    torch.testing.assert_close(gpu.group_of_channel.cpu(), cpu.group_of_channel)


def test_a_bank_calibrated_on_cuda_equals_the_cpu_one(images: list[Path]) -> None:
    from textcam.bank import ChannelBank
    from textcam.clip import load_clip
    from textcam.models import load_model

    banks = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = load_model("resnet18", weights="none", device=device)
        clip = load_clip("ViT-B-32", None, device=device)
        banks[device] = ChannelBank.calibrate(model, clip, images, m=8, progress=False)  # where the model is
    cpu, gpu = banks["cpu"], banks["cuda"]
    assert cpu.probe is not None and gpu.probe is not None
    np.testing.assert_array_equal(cpu.probe.predictions.numpy(), gpu.probe.predictions.numpy())
    np.testing.assert_allclose(cpu.probe.embeddings.numpy(), gpu.probe.embeddings.numpy(), atol=1e-4)
    cosine = torch.nn.functional.cosine_similarity(cpu.directions, gpu.directions, dim=1)
    assert cosine.min() > 0.999


def test_a_model_on_the_cpu_asked_to_run_on_cuda_says_how_to_load_it(images: list[Path]) -> None:
    from textcam.bank import ChannelBank
    from textcam.clip import load_clip
    from textcam.models import load_model

    model = load_model("resnet18", weights="none")
    clip = load_clip("ViT-B-32", None, device="cuda")
    with pytest.raises(ValueError, match=r"model is on cpu.*load_model\(\.\.\., device='cuda'\)"):
        ChannelBank.calibrate(model, clip, images, m=8, device="cuda", progress=False)
