"""Procedural CLEVR-like scenes with known attributes, masks and captions.

Every image holds one *main* object (its shape is the task label by default) and optionally a few
small distractor objects, drawn on one of several backgrounds, with optional artefacts (a watermark
glyph in the bottom-right corner, a dark border). Drawing is vectorised over a chunk of images with
numpy (polar coordinates make every shape one comparison), so one core renders thousands of 64×64
images per second.

Determinism: a split is rendered in fixed chunks of :data:`CHUNK` images, chunk ``i`` drawing from
``np.random.SeedSequence([seed, split_code, i])``; the same seed and split therefore give identical
bytes whatever the caller's batch size.

Example::

    cfg = SceneConfig()
    batch = generate(cfg, n=8, seed=0, split="train")
    batch.images.shape    # (8, 64, 64, 3) uint8
    batch.masks.shape     # (8, 1 + cfg.max_distractors, 64, 64) bool, visible pixels per object
    batch.records.loc[0, "caption"]   # 'a large red checkered circle on a water background ...'
"""

from __future__ import annotations

import copy
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from textcam.synthetic.bias import BiasSpec, apply_biases

CHUNK = 256
"""Images per deterministic rendering chunk (part of the seed derivation: do not change lightly)."""

COLOR_RGB: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.12),
    "green": (0.12, 0.78, 0.20),
    "blue": (0.15, 0.30, 0.92),
    "yellow": (0.96, 0.86, 0.12),
    "purple": (0.62, 0.18, 0.78),
    "white": (0.95, 0.95, 0.95),
}

# The attribute vocabulary of the world; ``SceneConfig`` may restrict each list.
ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle", "star"),
    "color": ("red", "green", "blue", "yellow", "purple"),
    "size": ("small", "large"),
    "texture": ("matte", "checkered", "metallic"),
    "background": ("plain", "grass", "water", "sand"),
    "watermark": ("no", "yes"),
    "border": ("no", "yes"),
}

# Words used in captions and phrases for each attribute value.
PHRASES: dict[str, dict[str, str]] = {
    "shape": {v: v for v in ("circle", "square", "triangle", "star")},
    "color": {v: v for v in COLOR_RGB},
    "size": {"small": "small object", "large": "large object"},
    "texture": {"matte": "matte", "checkered": "checkered", "metallic": "metallic"},
    "background": {v: f"{v} background" for v in ("plain", "grass", "water", "sand")},
    # Artefacts are worded as the captions word them: a tiny CLIP knows only its captions' grammar, and
    # the image difference "logo vs none" reads as "with a logo" (cosine 0.91) but not as a bare "logo"
    # (< 0.1, below "hexagon"). "logo", not "watermark": open_clip's BPE splits "watermark" into
    # "water"+"mark", colliding with "water background".
    "watermark": {"yes": "with a logo", "no": "without a logo"},
    "border": {"yes": "with a border", "no": "without a border"},
}

_SPLIT_CODES = {"train": 1, "probe": 2, "test": 3, "clip": 4, "clip-eval": 5}

# 9×5 glyph ("TC") stamped as the watermark: fixed, so it is a learnable artefact.
_GLYPH = np.array(
    [
        [1, 1, 1, 0, 0, 1, 1, 1, 0],
        [0, 1, 0, 0, 1, 0, 0, 0, 0],
        [0, 1, 0, 0, 1, 0, 0, 0, 0],
        [0, 1, 0, 0, 1, 0, 0, 0, 0],
        [0, 1, 0, 0, 0, 1, 1, 1, 0],
    ],
    dtype=bool,
)


@dataclass(frozen=True)
class SceneConfig:
    """How scenes look. Everything here changes the pixels, so it all enters the cache hash.

    Sizes are the object's nominal radius in pixels, drawn uniformly from the given range;
    ``contrast`` < 1 blends object colour towards the local background and ``noise`` adds Gaussian
    pixel noise (std, in [0, 1] units): both make the true shape signal harder, which is how a
    planted cue becomes the easier route for a classifier.
    """

    image_size: int = 64
    shapes: tuple[str, ...] = ATTRIBUTE_VALUES["shape"]
    colors: tuple[str, ...] = ATTRIBUTE_VALUES["color"]
    textures: tuple[str, ...] = ATTRIBUTE_VALUES["texture"]
    backgrounds: tuple[str, ...] = ATTRIBUTE_VALUES["background"]
    small_radius: tuple[float, float] = (5.0, 7.0)
    large_radius: tuple[float, float] = (10.0, 13.0)
    contrast: float = 1.0
    noise: float = 0.0
    rotate: bool = False
    outline: bool = True
    watermark_prob: float = 0.5
    border_prob: float = 0.3
    max_distractors: int = 0
    label_attribute: str = "shape"

    def __post_init__(self) -> None:
        for name, values in self.values().items():
            unknown = set(values) - set(ATTRIBUTE_VALUES[name])
            if unknown or len(values) < 2:
                raise ValueError(f"SceneConfig.{name}: need >= 2 of {ATTRIBUTE_VALUES[name]}, got {values}")
        if self.label_attribute not in ATTRIBUTE_VALUES:
            raise ValueError(f"label_attribute must be one of {sorted(ATTRIBUTE_VALUES)}")
        if self.image_size < 32:
            raise ValueError("image_size must be >= 32")

    def values(self) -> dict[str, tuple[str, ...]]:
        """Attribute name -> the values this world draws from (ordered; index = code)."""
        return {
            "shape": tuple(self.shapes),
            "color": tuple(self.colors),
            "size": ATTRIBUTE_VALUES["size"],
            "texture": tuple(self.textures),
            "background": tuple(self.backgrounds),
            "watermark": ATTRIBUTE_VALUES["watermark"],
            "border": ATTRIBUTE_VALUES["border"],
        }

    @property
    def class_names(self) -> tuple[str, ...]:
        """Label names, in label-index order."""
        return self.values()[self.label_attribute]

    def to_dict(self) -> dict:
        """JSON-ready dict (tuples become lists)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SceneConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``TypeError``."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass
class SceneBatch:
    """Rendered images, per-object visible masks and one attribute record per image."""

    images: np.ndarray  # (N, S, S, 3) uint8
    masks: np.ndarray  # (N, 1 + max_distractors, S, S) bool; slot 0 = main object
    records: pd.DataFrame = field(repr=False)


def split_code(split: str) -> int:
    """Stable integer used in the seed derivation of a split name."""
    return _SPLIT_CODES.get(split, zlib.crc32(split.encode()) % 1_000_000 + 100)


# ----------------------------------------------------------------------------------------------
# attribute sampling


def sample_codes(
    config: SceneConfig, n: int, rng: np.random.Generator, biases: Sequence[BiasSpec] = ()
) -> dict[str, np.ndarray]:
    """Draw attribute codes (indices into ``config.values()``) and geometry for ``n`` scenes.

    Attributes are independent and uniform except for planted ``biases``; watermark and border
    follow their configured probabilities.
    """
    vals = config.values()
    s = config.image_size
    codes: dict[str, np.ndarray] = {
        name: rng.integers(0, len(v), n) for name, v in vals.items() if name not in ("watermark", "border")
    }
    codes["watermark"] = (rng.random(n) < config.watermark_prob).astype(np.int64)
    codes["border"] = (rng.random(n) < config.border_prob).astype(np.int64)
    apply_biases(codes, vals, biases, config.label_attribute, rng)

    lo, hi = _radius_range(codes["size"], config)
    radius = lo + (hi - lo) * rng.random(n)
    margin = radius * 1.3 + 3.0  # star/triangle circumradius ≈ 1.3 r, plus the border width
    codes["radius"] = radius
    codes["cx"] = margin + (s - 2 * margin) * rng.random(n)
    codes["cy"] = margin + (s - 2 * margin) * rng.random(n)
    codes["rotation"] = rng.random(n) * 2 * np.pi if config.rotate else np.zeros(n)

    k = config.max_distractors
    codes["n_distractors"] = rng.integers(0, k + 1, n) if k else np.zeros(n, dtype=np.int64)
    if k:
        codes["d_shape"] = rng.integers(0, len(vals["shape"]), (n, k))
        codes["d_color"] = rng.integers(0, len(vals["color"]), (n, k))
        codes["d_texture"] = rng.integers(0, len(vals["texture"]), (n, k))
        codes["d_radius"] = config.small_radius[0] + np.diff(config.small_radius)[0] * rng.random((n, k))
        dm = codes["d_radius"] * 1.3 + 3.0
        codes["d_cx"] = dm + (s - 2 * dm) * rng.random((n, k))
        codes["d_cy"] = dm + (s - 2 * dm) * rng.random((n, k))
        codes["d_rotation"] = rng.random((n, k)) * 2 * np.pi if config.rotate else np.zeros((n, k))
    return codes


# ----------------------------------------------------------------------------------------------
# drawing


def _shape_mask(
    shape: np.ndarray,
    cx: np.ndarray,
    cy: np.ndarray,
    r: np.ndarray,
    rot: np.ndarray,
    names: tuple[str, ...],
    grid: tuple[np.ndarray, np.ndarray],
) -> np.ndarray:
    """Boolean (N, S, S) masks; each shape is a test on polar coordinates around the centre."""
    yy, xx = grid
    dx = xx[None] - cx[:, None, None]
    dy = yy[None] - cy[:, None, None]
    rho = np.hypot(dx, dy)
    theta = np.arctan2(dy, dx) - rot[:, None, None]
    rr = r[:, None, None]
    out = np.zeros(rho.shape, dtype=bool)
    for code, name in enumerate(names):
        idx = np.flatnonzero(shape == code)
        if idx.size == 0:
            continue
        p, t, R = rho[idx], theta[idx], rr[idx]
        if name == "circle":
            m = p <= R
        elif name in ("square", "triangle"):
            # regular n-gon with circumradius Rc: ρ·cos((θ mod 2π/n) − π/n) ≤ Rc·cos(π/n)
            sides, rc = (4, 1.18) if name == "square" else (3, 1.35)
            wedge = 2 * np.pi / sides
            m = p * np.cos(np.mod(t, wedge) - wedge / 2) <= rc * R * np.cos(wedge / 2)
        else:  # star: five points, radius zig-zags between inner and outer radius with the angle
            frac = np.mod(t * 5 / (2 * np.pi), 1.0)
            m = p <= R * (0.6 + 0.75 * np.abs(1.0 - 2.0 * frac))
        out[idx] = m
    return out


def _backgrounds(code: np.ndarray, names: tuple[str, ...], s: int, rng: np.random.Generator) -> np.ndarray:
    """(N, S, S, 3) float32 backgrounds; each type has a distinct colour and texture statistic."""
    n = code.shape[0]
    img = np.empty((n, s, s, 3), dtype=np.float32)
    yy = np.arange(s, dtype=np.float32)[None, :, None, None]
    for c, name in enumerate(names):
        idx = np.flatnonzero(code == c)
        m = idx.size
        if m == 0:
            continue
        if name == "plain":
            shade = 0.45 + 0.15 * rng.random((m, 1, 1, 1), dtype=np.float32)
            bg = np.broadcast_to(shade, (m, s, s, 3))
        elif name == "grass":  # green, mottled in 4-px blocks (low frequency, so shape edges stay salient)
            noise = rng.random((m, s // 4, s // 4, 1), dtype=np.float32).repeat(4, axis=1).repeat(4, axis=2)
            bg = np.array([0.22, 0.45, 0.16], np.float32) * (0.75 + 0.5 * noise)
        elif name == "water":  # blue with horizontal wave stripes
            phase = rng.random((m, 1, 1, 1), dtype=np.float32) * 2 * np.pi
            wave = 0.5 + 0.5 * np.sin(yy * (2 * np.pi / 8.0) + phase)
            bg = np.array([0.12, 0.38, 0.66], np.float32) + np.array([0.06, 0.09, 0.12], np.float32) * wave
        else:  # sand: beige with sparse dark dots
            dots = rng.random((m, s, s, 1), dtype=np.float32) < 0.05
            bg = np.where(dots, np.float32(0.8), np.float32(1.0)) * np.array([0.86, 0.76, 0.56], np.float32)
        img[idx] = bg
    return img


def _paint(
    img: np.ndarray,
    mask: np.ndarray,
    color: np.ndarray,
    texture: np.ndarray,
    cx: np.ndarray,
    cy: np.ndarray,
    r: np.ndarray,
    config: SceneConfig,
    grid: tuple[np.ndarray, np.ndarray],
) -> None:
    """Paint objects (colour × texture shading, blended by ``contrast``) into ``img`` in place."""
    yy, xx = grid
    palette = np.array([COLOR_RGB[c] for c in config.colors], np.float32)
    base = palette[color][:, None, None, :]  # (N,1,1,3)
    shade = np.ones(mask.shape, np.float32)
    for code, name in enumerate(config.textures):
        idx = np.flatnonzero(texture == code)
        if idx.size == 0 or name == "matte":
            continue
        if name == "checkered":  # 3-px checker anchored at the object's centre
            u = np.floor((xx[None] - cx[idx, None, None]) / 3.0)
            v = np.floor((yy[None] - cy[idx, None, None]) / 3.0)
            shade[idx] = np.where(np.mod(u + v, 2) == 0, 1.0, 0.45)
        else:  # metallic: dark rim, bright specular spot up-left of centre
            rr = r[idx, None, None]
            hx = xx[None] - (cx[idx, None, None] - 0.35 * rr)
            hy = yy[None] - (cy[idx, None, None] - 0.35 * rr)
            d = np.hypot(xx[None] - cx[idx, None, None], yy[None] - cy[idx, None, None]) / rr
            spec = np.exp(-(hx**2 + hy**2) / (2 * (0.3 * rr) ** 2))
            shade[idx] = 1.0 - 0.45 * np.clip(d, 0, 1.3) + 0.9 * spec
    obj = np.clip(base * shade[..., None], 0.0, 1.0)
    spec_white = np.clip(shade - 1.0, 0.0, None)[..., None]  # highlights saturate towards white
    obj = obj + (1.0 - obj) * np.clip(spec_white, 0.0, 1.0)
    if config.outline:  # a dark 1-px rim: a consistent shape contour whatever colour and background
        obj = np.where(_rim(mask)[..., None], obj * 0.25, obj)
    if config.contrast < 1.0:
        obj = config.contrast * obj + (1.0 - config.contrast) * img
    np.copyto(img, obj, where=mask[..., None])


def _rim(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` (N, S, S) with a 4-neighbour outside it."""
    inner = mask.copy()
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    inner[:, :, 1:] &= mask[:, :, :-1]
    inner[:, :, :-1] &= mask[:, :, 1:]
    return mask & ~inner


def render(
    codes: dict[str, np.ndarray], config: SceneConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Draw images (uint8, N×S×S×3) and visible per-object masks (bool, N×K×S×S) from codes."""
    s = config.image_size
    n = codes["shape"].shape[0]
    k = config.max_distractors
    grid = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
    grid = (grid[0], grid[1])
    img = _backgrounds(codes["background"], config.backgrounds, s, rng)
    masks = np.zeros((n, 1 + k, s, s), dtype=bool)
    for j in range(k):  # distractors first, the main object is drawn on top
        m = _shape_mask(
            codes["d_shape"][:, j],
            codes["d_cx"][:, j],
            codes["d_cy"][:, j],
            codes["d_radius"][:, j],
            codes["d_rotation"][:, j],
            config.shapes,
            grid,
        )
        m &= (j < codes["n_distractors"])[:, None, None]
        _paint(
            img,
            m,
            codes["d_color"][:, j],
            codes["d_texture"][:, j],
            codes["d_cx"][:, j],
            codes["d_cy"][:, j],
            codes["d_radius"][:, j],
            config,
            grid,
        )
        masks[:, : 1 + j] &= ~m[:, None]
        masks[:, 1 + j] = m
    main = _shape_mask(
        codes["shape"], codes["cx"], codes["cy"], codes["radius"], codes["rotation"], config.shapes, grid
    )
    _paint(
        img, main, codes["color"], codes["texture"], codes["cx"], codes["cy"], codes["radius"], config, grid
    )
    masks[:, 1:] &= ~main[:, None]
    masks[:, 0] = main
    if config.noise > 0:
        img += config.noise * rng.standard_normal(img.shape, dtype=np.float32)
    _artefacts(img, codes["watermark"].astype(bool), codes["border"].astype(bool))
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), masks


def _artefacts(img: np.ndarray, watermark: np.ndarray, border: np.ndarray) -> None:
    """Stamp the watermark glyph (bottom-right, white on a dark box) and a dark 2-px border."""
    s = img.shape[1]
    gh, gw = _GLYPH.shape
    y0, x0 = s - gh - 4, s - gw - 4
    idx = np.flatnonzero(watermark)
    if idx.size:
        box = img[idx, y0 - 1 : y0 + gh + 1, x0 - 1 : x0 + gw + 1]
        box *= 0.35  # darken behind the glyph so it reads on any background
        stamp = np.where(_GLYPH[None, :, :, None], np.float32(1.0), img[idx, y0 : y0 + gh, x0 : x0 + gw])
        box[:, 1:-1, 1:-1] = stamp
        img[idx, y0 - 1 : y0 + gh + 1, x0 - 1 : x0 + gw + 1] = box
    idx = np.flatnonzero(border)
    if idx.size:
        frame = np.zeros((s, s), dtype=bool)
        frame[:2], frame[-2:], frame[:, :2], frame[:, -2:] = True, True, True, True
        img[idx[:, None], *np.nonzero(frame)] = np.float32(0.08)


# ----------------------------------------------------------------------------------------------
# captions and records


def caption(
    row: dict | pd.Series, keep: dict[str, bool] | None = None, template: str = "a photo of {}"
) -> str:
    """Caption from an attribute record; ``keep[attr] = False`` drops that attribute.

    Full form: ``"a photo of a large red checkered circle on a water background with a logo
    without a border"`` (the watermark artefact is worded "logo", see :data:`PHRASES`). A dropped
    shape becomes ``"object"``, so single-attribute prompts such as ``"a photo of a red object"``
    are in the training distribution of the tiny CLIP.
    """
    keep = keep or {}
    words = [row[a] for a in ("size", "color", "texture") if keep.get(a, True)]
    noun = row["shape"] if keep.get("shape", True) else "object"
    head = " ".join([*words, noun])
    text = ("an " if head[0] in "aeiou" else "a ") + head
    if keep.get("background", True):
        text += f" on a {row['background']} background"
    for art, word in (("watermark", "logo"), ("border", "border")):
        if keep.get(art, True):
            text += f" with a {word}" if row[art] == "yes" else f" without a {word}"
    if "distractors" in row and keep.get("distractors", True) and row["distractors"]:
        text += " and " + " and ".join(f"a {d}" for d in row["distractors"].split(";"))  # all "small ..."
    return template.format(text)


def records_frame(codes: dict[str, np.ndarray], config: SceneConfig) -> pd.DataFrame:
    """Attribute codes → a DataFrame of readable values (+ geometry, label and full caption)."""
    vals = config.values()
    df = pd.DataFrame({name: np.asarray(v, dtype=object)[codes[name]] for name, v in vals.items()})
    df.insert(0, "label", codes[config.label_attribute].astype(np.int64))
    df.insert(1, "label_name", df[config.label_attribute])
    for col in ("cx", "cy", "radius", "rotation"):
        df[col] = codes[col].astype(np.float32)
    df["n_distractors"] = codes["n_distractors"].astype(np.int64)
    if config.max_distractors:
        shapes, colors, textures = (np.asarray(vals[a], dtype=object) for a in ("shape", "color", "texture"))
        parts = [
            [
                f"small {colors[codes['d_color'][i, j]]} {textures[codes['d_texture'][i, j]]} "
                f"{shapes[codes['d_shape'][i, j]]}"
                for j in range(codes["n_distractors"][i])
            ]
            for i in range(len(df))
        ]
        df["distractors"] = [";".join(p) for p in parts]
    df["caption"] = [caption(r, template="{}") for r in df.to_dict("records")]
    return df


def intervene(
    config: SceneConfig, n: int, seed: int, attribute: str, value: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same ``n`` unbiased scenes rendered twice: with ``attribute`` set to ``value`` and set to
    another value drawn at random; every other code, the geometry and the noise are shared.

    Returns ``(images_with, images_without, labels)``: what a model does under do(attribute = value)
    against do(attribute ≠ value), the truth a flag on that phrase can be checked against.
    """
    names = config.values()[attribute]
    if value not in names:
        raise ValueError(f"{attribute} has no value {value!r}; values: {list(names)}")
    v = names.index(value)
    rng = np.random.default_rng(np.random.SeedSequence([seed, split_code("test"), 7919]))
    codes = sample_codes(config, n, rng)
    others = np.delete(np.arange(len(names)), v)
    renders = []
    for col in (np.full(n, v), others[rng.integers(0, others.size, n)]):
        changed = {**codes, attribute: col}
        if attribute == "size":
            _resize(changed, codes, config)
        state = copy.deepcopy(rng)  # both renders draw the same background and noise
        renders.append(render(changed, config, state)[0])
    return renders[0], renders[1], codes[config.label_attribute].astype(np.int64)


def _radius_range(size: np.ndarray, config: SceneConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per scene, the radius range of its size code (1: large)."""
    large = size == 1
    return (
        np.where(large, config.large_radius[0], config.small_radius[0]),
        np.where(large, config.large_radius[1], config.small_radius[1]),
    )


def _resize(changed: dict[str, np.ndarray], codes: dict[str, np.ndarray], config: SceneConfig) -> None:
    """Radii for a changed size code at the same place in their range; centres kept inside the image."""
    old_lo, old_hi = _radius_range(codes["size"], config)
    lo, hi = _radius_range(changed["size"], config)
    radius = lo + (hi - lo) * (codes["radius"] - old_lo) / (old_hi - old_lo)
    margin = radius * 1.3 + 3.0
    s = config.image_size
    changed["radius"] = radius
    changed["cx"] = np.clip(codes["cx"], margin, s - margin)
    changed["cy"] = np.clip(codes["cy"], margin, s - margin)


def generate(
    config: SceneConfig, n: int, seed: int, split: str, biases: Sequence[BiasSpec] = (), start: int = 0
) -> SceneBatch:
    """Render images ``start .. start+n`` of ``split`` deterministically (chunk-seeded)."""
    if n <= 0:
        raise ValueError("n must be positive")
    first, last = start // CHUNK, (start + n - 1) // CHUNK
    imgs, masks, recs = [], [], []
    for chunk in range(first, last + 1):
        rng = np.random.default_rng(np.random.SeedSequence([seed, split_code(split), chunk]))
        codes = sample_codes(config, CHUNK, rng, biases)
        im, mk = render(codes, config, rng)
        imgs.append(im)
        masks.append(mk)
        recs.append(records_frame(codes, config))
    lo = start - first * CHUNK
    images = np.concatenate(imgs)[lo : lo + n]
    records = pd.concat(recs, ignore_index=True).iloc[lo : lo + n].reset_index(drop=True)
    records.insert(0, "index", np.arange(start, start + n))
    return SceneBatch(images=images, masks=np.concatenate(masks)[lo : lo + n], records=records)
