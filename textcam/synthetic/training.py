"""The one resumable training loop of the project's own models (the tiny CLIP and the classifiers).

After every epoch the model, optimizer (and scheduler) state is saved atomically; a killed run resumes
at the next epoch and, the batches being a function of (epoch, step), ends with the same weights.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from textcam.io import atomic_path

log = logging.getLogger(__name__)


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Atomic ``torch.save`` of a training state (tensors, dicts, numbers only)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: Path) -> dict[str, Any] | None:
    """Load a training state saved by :func:`save_state`, or ``None`` when there is none."""
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def train_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_at: Callable[[int, int], torch.Tensor],
    *,
    epochs: int,
    steps_per_epoch: int,
    state_path: Path,
    name: str,
    scheduler: Any = None,
    progress: bool = True,
) -> float:
    """Train ``model`` for the epochs not yet in ``state_path``; ``loss_at(epoch, step)`` is a batch's loss.

    Returns the seconds spent training, summed over resumes."""
    from tqdm.auto import tqdm

    start, elapsed = 0, 0.0
    state = load_state(state_path)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        start, elapsed = int(state["epoch"]), float(state["elapsed_s"])
        log.info("resuming %s from epoch %d", name, start)
    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        model.train()
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"{name} epoch {epoch + 1}/{epochs}",
            disable=not progress,
            leave=False,
        )
        for i in bar:
            loss = loss_at(epoch, i)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        elapsed += time.perf_counter() - t0
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
        if scheduler is not None:
            state["scheduler"] = scheduler.state_dict()
        save_state(state_path, {**state, "epoch": epoch + 1, "elapsed_s": elapsed})
    return elapsed
