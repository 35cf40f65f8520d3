"""Robust image reading: every awkward file is read as RGB or refused with a one-line reason."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from tests.badimages import make_bad_images
from textcam.data import ImageReadError, iter_batch_groups, iter_batches, read_image


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_bad_images(tmp_path_factory.mktemp("bad"))


def test_each_file_read_or_refused_with_reason(corpus) -> None:
    for name, (path, ok) in corpus.items():
        if ok:
            img = read_image(path)
            assert img.mode == "RGB" and min(img.size) >= 1, name
        else:
            with pytest.raises(ImageReadError) as err:
                read_image(path)
            assert "\n" not in str(err.value) and len(str(err.value)) < 400, name


def test_specific_reasons(corpus) -> None:
    reasons = {}
    for name in (
        "zero.jpg",
        "truncated.jpg",
        "not_an_image.png",
        "bomb.png",
        "dir.jpg",
        "broken_link.jpg",
        "missing.jpg",
    ):
        with pytest.raises(ImageReadError) as err:
            read_image(corpus[name][0])
        reasons[name] = str(err.value)
    assert "empty file" in reasons["zero.jpg"]
    assert "truncated" in reasons["truncated.jpg"]
    assert "not an image" in reasons["not_an_image.png"]
    assert "too large" in reasons["bomb.png"]
    assert "directory" in reasons["dir.jpg"]
    assert "broken symlink" in reasons["broken_link.jpg"]
    assert "not found" in reasons["missing.jpg"]


def test_modes_converted_faithfully(corpus) -> None:
    alpha = read_image(corpus["alpha.png"][0])
    assert alpha.size == (60, 40)
    rotated = read_image(corpus["exif_rotated.jpg"][0])
    assert rotated.size == (40, 60)  # EXIF orientation 6 swaps width and height
    gif = np.asarray(read_image(corpus["animated.gif"][0]))
    assert gif[..., 0].mean() > 200 and gif[..., 1].mean() < 60  # first frame (red)
    g16 = np.asarray(Image.open(corpus["gray16.png"][0]), dtype=np.float64)
    ours = np.asarray(read_image(corpus["gray16.png"][0]))[..., 0].astype(np.float64)
    assert np.corrcoef(g16.ravel(), ours.ravel())[0, 1] > 0.999  # scaled, not clipped at 255


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read files without read permission")
def test_unreadable_permissions(tmp_path) -> None:
    p = tmp_path / "locked.png"
    Image.new("RGB", (4, 4)).save(p)
    p.chmod(0)
    with pytest.raises(ImageReadError, match="permission"):
        read_image(p)


def test_batches_account_for_every_path(corpus) -> None:
    paths = [p for p, _ in corpus.values()]

    def to_tensor(img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(img.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1)

    seen_ok, seen_bad = [], []
    for batch in iter_batches(paths, [to_tensor], batch_size=4, num_workers=2):
        seen_ok += batch.indices.tolist()
        seen_bad += [i for i, _ in batch.failed]
        if batch.indices.numel():
            assert batch.tensors[0].shape[1:] == (3, 8, 8)
    assert sorted(seen_ok + seen_bad) == list(range(len(paths)))
    expected_ok = [i for i, (_, ok) in enumerate(corpus.values()) if ok]
    assert sorted(seen_ok) == expected_ok


def _small(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1)


@pytest.mark.parametrize("workers", [0, 2])
def test_batch_groups_read_each_group_as_if_alone(corpus, workers: int) -> None:
    paths = [p for p, _ in corpus.values()]
    groups = [paths[:5], paths[5:6], paths[6:]]  # uneven, one of a single image
    got: dict[int, list] = {0: [], 1: [], 2: []}
    for group, batch in iter_batch_groups(groups, [_small], batch_size=4, num_workers=workers):
        got[group].append(batch)
    assert [len(v) for v in got.values()] == [2, 1, -(-len(groups[2]) // 4)]  # no batch mixes groups
    for g, paths_g in enumerate(groups):
        alone = list(iter_batches(paths_g, [_small], batch_size=4))
        assert len(alone) == len(got[g])
        for a, b in zip(alone, got[g], strict=True):
            assert a.indices.tolist() == b.indices.tolist() and a.failed == b.failed
            assert all(torch.equal(x, y) for x, y in zip(a.tensors, b.tensors, strict=True))


def test_batch_groups_reject_a_bad_batch_size(corpus) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        next(iter_batch_groups([[p for p, _ in corpus.values()]], [_small], batch_size=0))
