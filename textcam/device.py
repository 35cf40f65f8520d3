"""Device selection shared by the library and the CLI."""

from __future__ import annotations

import torch


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """Turn ``auto|cpu|cuda|cuda:N`` into a :class:`torch.device`.

    ``auto`` picks the first CUDA device when one is present, else the CPU.
    """
    if isinstance(spec, torch.device):
        return spec
    if spec is None or spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} requested but CUDA is not available on this machine")
    return device


def model_device(module: torch.nn.Module, spec: str | torch.device | None = "auto") -> torch.device:
    """The device to run ``module`` on: its own with ``auto``; else ``spec``, which must be where it is.

    A model is never moved behind the caller's back (it may be shared); a mismatch is an error that says
    how to load it where it should run.
    """
    param = next(module.parameters(), None)
    here = param.device if param is not None else torch.device("cpu")
    if spec is None or spec == "auto":
        return here
    wanted = resolve_device(spec)
    if _same(wanted, here):
        return wanted
    raise ValueError(
        f"the model is on {here} but device={str(spec)!r} was asked for: load it there "
        f"(load_model(..., device={str(spec)!r})) or pass device='auto' to run where it is"
    )


def _same(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and _index(a) == _index(b)


def _index(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()
