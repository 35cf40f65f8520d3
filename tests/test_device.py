"""Where the library computes: the model's own device unless told otherwise, and a clear error on a clash."""

from __future__ import annotations

import pytest
import torch

from textcam.device import model_device, resolve_device


def test_auto_runs_where_the_model_is() -> None:
    assert model_device(torch.nn.Linear(2, 2)) == torch.device("cpu")
    assert model_device(torch.nn.Linear(2, 2, device="meta"), "auto") == torch.device("meta")
    assert model_device(torch.nn.ReLU(), "auto") == torch.device("cpu")  # no parameters: the CPU


def test_a_device_the_model_is_not_on_is_an_error_that_says_how_to_load_it() -> None:
    with pytest.raises(
        ValueError, match=r"model is on meta but device='cpu'.*load_model\(\.\.\., device='cpu'\)"
    ):
        model_device(torch.nn.Linear(2, 2, device="meta"), "cpu")
    assert model_device(torch.nn.Linear(2, 2), "cpu") == torch.device("cpu")


def test_unknown_or_absent_devices_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
