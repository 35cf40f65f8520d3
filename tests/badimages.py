"""Generate a corpus of awkward and broken image files (no committed binaries)."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width``×``height`` (a decompression bomb without the memory)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _png_blank(width: int, height: int) -> bytes:
    """A complete, valid 1-bit PNG of ``width``×``height`` white pixels: a real decompression bomb
    (20000×20000 decodes to 1.2 GB as RGB) that takes ~50 kB and a fraction of a second to make."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" + b"\xff" * ((width + 7) // 8)  # filter byte 0, then the packed pixels
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def make_bad_images(root: Path) -> dict[str, tuple[Path, bool]]:
    """Write the corpus under ``root``; returns name → (path, readable?)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8), "RGB")
    out: dict[str, tuple[Path, bool]] = {}

    def save(name: str, img: Image.Image, ok: bool = True, **kw) -> None:
        path = root / name
        img.save(path, **kw)
        out[name] = (path, ok)

    (root / "zero.jpg").write_bytes(b"")
    out["zero.jpg"] = (root / "zero.jpg", False)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG")
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    out["truncated.jpg"] = (root / "truncated.jpg", False)
    (root / "not_an_image.png").write_text("hello, I am text\n")
    out["not_an_image.png"] = (root / "not_an_image.png", False)
    save("alpha.png", rgb.convert("RGBA"))
    save("palette.png", rgb.convert("P"))
    save("gray16.png", Image.fromarray((rng.integers(0, 65535, (30, 30))).astype(np.uint16)))
    save("gray.png", rgb.convert("L"))
    save("cmyk.jpg", rgb.convert("CMYK"), format="JPEG")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise on display
    save("exif_rotated.jpg", rgb, exif=exif.tobytes())
    frames = [Image.new("RGB", (20, 20), c) for c in ("red", "green", "blue")]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:])
    out["animated.gif"] = (root / "animated.gif", True)
    frames[0].save(root / "animated.webp", save_all=True, append_images=frames[1:])
    out["animated.webp"] = (root / "animated.webp", True)
    save("one_pixel.png", Image.new("RGB", (1, 1), "white"))
    (root / "bomb.png").write_bytes(_png_header_only(20000, 20000))
    out["bomb.png"] = (root / "bomb.png", False)
    (root / "bomb_full.png").write_bytes(_png_blank(20000, 20000))
    out["bomb_full.png"] = (root / "bomb_full.png", False)
    (root / "dir.jpg").mkdir(exist_ok=True)
    out["dir.jpg"] = (root / "dir.jpg", False)
    link = root / "broken_link.jpg"
    if not link.is_symlink():
        os.symlink(root / "does-not-exist.jpg", link)
    out["broken_link.jpg"] = (link, False)
    weird = root / "caf\udce9-\u00e9t\u00e9.png"  # a non-UTF-8 byte in the name (surrogate-escaped)
    rgb.save(weird)
    out["non_utf8"] = (weird, True)
    long_name = root / ("x" * 240 + ".png")
    rgb.save(long_name)
    out["long_name"] = (long_name, True)
    out["missing.jpg"] = (root / "missing.jpg", False)
    return out
