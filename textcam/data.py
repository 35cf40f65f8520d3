"""Reading images robustly and streaming them in batches.

Real datasets are messy: every failure to read an image becomes an :class:`ImageReadError` with a
one-line reason, never a crash of the whole batch, so callers can account for every input row.
"""

from __future__ import annotations

import itertools
import os
import stat
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

#: Images with more pixels than this are refused (decompression-bomb guard), e.g. 20000×20000.
DEFAULT_MAX_PIXELS = 64_000_000

Transform = Callable[[Image.Image], torch.Tensor]


class ImageReadError(Exception):
    """An image could not be read; ``str(err)`` is a one-line reason."""


def _check_file(path: Path) -> None:
    try:
        st = path.stat()  # follows symlinks: a broken link raises FileNotFoundError
    except FileNotFoundError:
        kind = "broken symlink" if path.is_symlink() else "file not found"
        raise ImageReadError(f"{kind}: {path}") from None
    except OSError as exc:
        raise ImageReadError(f"cannot stat {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageReadError(f"is a directory, not an image: {path}")
    if not stat.S_ISREG(st.st_mode):
        raise ImageReadError(f"not a regular file: {path}")
    if st.st_size == 0:
        raise ImageReadError(f"empty file (0 bytes): {path}")
    if not os.access(path, os.R_OK):
        raise ImageReadError(f"permission denied: {path}")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency is composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to the full 8-bit range instead of clipping at 255.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def read_image(path: str | os.PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read an image file as 8-bit RGB.

    Handles EXIF orientation, palette/alpha/16-bit/greyscale/CMYK modes and animated files (first
    frame). Raises :class:`ImageReadError` for missing, empty, truncated, non-image, oversized
    (more than ``max_pixels``) or unreadable files.
    """
    path = Path(path)
    _check_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise ImageReadError(
                        f"image too large ({w}x{h} = {w * h} pixels > limit {max_pixels}): {path}"
                    )
                if w < 1 or h < 1:
                    raise ImageReadError(f"image has no pixels ({w}x{h}): {path}")
                img.seek(0)  # first frame of animated GIF/WebP/APNG
                ImageFile.LOAD_TRUNCATED_IMAGES = False
                img.load()
                img = ImageOps.exif_transpose(img)
                return _to_rgb(img).copy()
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageReadError(f"image too large, refused as a decompression bomb: {path} ({exc})") from None
    except UnidentifiedImageError:
        raise ImageReadError(f"not an image (unrecognised format): {path}") from None
    except PermissionError:
        raise ImageReadError(f"permission denied: {path}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        # PIL reports truncated/corrupt data as OSError ("image file is truncated") or SyntaxError.
        raise ImageReadError(f"corrupt or truncated image: {path} ({exc})") from None


@dataclass
class Batch:
    """A batch of successfully read images plus the indices that failed, with reasons."""

    indices: torch.Tensor  # (B,) positions in the input sequence
    tensors: list[torch.Tensor]  # one (B, 3, H, W) tensor per transform
    failed: list[tuple[int, str]] = field(default_factory=list)


class ImageDataset(Dataset):
    """Images at ``paths``, each passed through every transform in ``transforms``.

    Items are ``(index, tensors | None, reason | None)`` so that one bad file never breaks a batch.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        transforms: Sequence[Transform],
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        if not transforms:
            raise ValueError("ImageDataset needs at least one transform")
        self.paths = [Path(p) for p in paths]
        self.transforms = list(transforms)
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, list[torch.Tensor] | None, str | None]:
        try:
            img = read_image(self.paths[index], max_pixels=self.max_pixels)
            return index, [t(img) for t in self.transforms], None
        except ImageReadError as exc:
            return index, None, str(exc)


def collate_images(items: list[tuple[int, list[torch.Tensor] | None, str | None]]) -> Batch:
    ok = [(i, t) for i, t, _ in items if t is not None]
    failed = [(i, reason) for i, t, reason in items if t is None and reason is not None]
    if not ok:
        return Batch(torch.empty(0, dtype=torch.long), [], failed)
    indices = torch.tensor([i for i, _ in ok], dtype=torch.long)
    tensors = [torch.stack([t[k] for _, t in ok]) for k in range(len(ok[0][1]))]
    return Batch(indices, tensors, failed)


def iter_batches(
    paths: Sequence[str | os.PathLike[str]],
    transforms: Sequence[Transform],
    *,
    batch_size: int = 32,
    num_workers: int = 0,
    pin_memory: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[Batch]:
    """Stream ``paths`` in order as :class:`Batch` objects; decoding overlaps compute with workers."""
    for _, batch in iter_batch_groups(
        [paths],
        transforms,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=pin_memory,
        max_pixels=max_pixels,
    ):
        yield batch


def iter_batch_groups(
    groups: Sequence[Sequence[str | os.PathLike[str]]],
    transforms: Sequence[Transform],
    *,
    batch_size: int = 32,
    num_workers: int = 0,
    pin_memory: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[tuple[int, Batch]]:
    """Stream several path lists, in order, through one set of loader workers: ``(group, batch)``.

    A batch never mixes groups and its ``indices`` (and ``failed``) count from the start of its group,
    so each group reads as if streamed alone by :func:`iter_batches`, without starting (forking) and
    refilling the workers once per group.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    starts = np.cumsum([0, *(len(g) for g in groups)]).tolist()
    plan = [  # (group, dataset indices) per batch, in order
        (k, list(range(a + i, min(a + i + batch_size, b))))
        for k, (a, b) in enumerate(itertools.pairwise(starts))
        for i in range(0, b - a, batch_size)
    ]
    sampler = [indices for _, indices in plan]
    loader = DataLoader(
        ImageDataset([p for g in groups for p in g], transforms, max_pixels=max_pixels),
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_images,
        pin_memory=pin_memory,
        persistent_workers=False,
        worker_init_fn=_forget_parent_atexit if num_workers else None,
    )
    for (group, _), batch in zip(plan, loader, strict=True):
        offset = starts[group]
        yield (
            group,
            Batch(batch.indices - offset, batch.tensors, [(i - offset, why) for i, why in batch.failed]),
        )


def _forget_parent_atexit(_worker_id: int) -> None:
    """Drop thread-shutdown hooks a forked worker inherited from its parent.

    Prefect's background services register such hooks; run in a forked DataLoader worker they fail
    (their threads did not survive the fork), the worker exits with code 1 and the DataLoader
    aborts. The worker owns none of those services, so it has nothing to drain.
    """
    threading._threading_atexits.clear()  # type: ignore[attr-defined]


def list_images(root: str | os.PathLike[str]) -> list[Path]:
    """All files with an image extension below ``root``, sorted (deterministic order)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)


IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
