"""``WorldConfig``: everything that defines a synthetic world, its presets and its cache keys."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from textcam.synthetic.bias import BiasSpec, parse_biases
from textcam.synthetic.cache import config_hash
from textcam.synthetic.scenes import SceneConfig
from textcam.synthetic.tiny_clip import ClipTrainConfig

DEMO_BIAS = "circle=background:water@0.99"
# One spec per cue type, used to measure the (absent) gap of a control world.
REFERENCE_BIASES = ("circle=background:water@1", "square=color:red@1", "triangle=watermark:yes@1")


@dataclass(frozen=True)
class ClassifierTrainConfig:
    """Settings of the small CNN trained on the labelled task (enters the world's cache key)."""

    width: int = 32
    epochs: int = 6
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class WorldConfig:
    """A world: scene settings, planted biases, split sizes, and how its two models are trained.

    ``biases`` accepts spec strings (``"circle=background:water@0.99"``) or :class:`BiasSpec`s and
    is validated against the scene's attribute values at construction. Biases apply to the train
    split only; probe and test splits are unbiased. ``eval_biases`` are extra (class, cue) pairs
    whose accuracy gap is measured without being planted (the control's reference).

    Example::

        cfg = WorldConfig.demo()                                   # one planted background bias
        cfg = WorldConfig.demo(bias=["square=color:red@0.99"])
        cfg = WorldConfig.tiny(bias=[])                            # fast control world for tests
    """

    scene: SceneConfig = field(default_factory=SceneConfig)
    biases: tuple[BiasSpec, ...] = ()
    n_train: int = 6000
    n_probe: int = 1000
    n_test: int = 2000
    seed: int = 0
    clip: ClipTrainConfig = field(default_factory=ClipTrainConfig)
    classifier: ClassifierTrainConfig = field(default_factory=ClassifierTrainConfig)
    eval_biases: tuple[BiasSpec, ...] = ()

    def __post_init__(self) -> None:
        vals, label = self.scene.values(), self.scene.label_attribute
        object.__setattr__(self, "biases", parse_biases(self.biases, vals, label))
        evals = tuple(b if isinstance(b, BiasSpec) else BiasSpec.parse(b) for b in self.eval_biases)
        for b in evals:
            b.validate(vals, label)
        object.__setattr__(self, "eval_biases", evals)
        for name in ("n_train", "n_probe", "n_test"):
            if getattr(self, name) < 1:
                raise ValueError(f"WorldConfig.{name} must be >= 1")

    # -- presets -------------------------------------------------------------------------------

    @classmethod
    def demo(cls, bias: str | Sequence[str] | None = DEMO_BIAS, **overrides: Any) -> WorldConfig:
        """The README demo: 6k/1k/2k images, one planted background bias (``bias=[]`` for a control)."""
        return cls(biases=_as_specs(bias), **overrides)

    @classmethod
    def tiny(cls, bias: str | Sequence[str] | None = DEMO_BIAS, **overrides: Any) -> WorldConfig:
        """A small, fast world for tests (looser guarantees, about a minute or two on 2 CPU cores)."""
        base: dict[str, Any] = dict(
            n_train=2000,
            n_probe=300,
            n_test=800,
            clip=ClipTrainConfig(epochs=8, steps_per_epoch=100, eval_images=512),  # shape 0.86
            classifier=ClassifierTrainConfig(width=16, epochs=8, batch_size=64),
        )
        return cls(biases=_as_specs(bias), **(base | overrides))

    def with_biases(self, bias: str | Sequence[str] | None) -> WorldConfig:
        """The same world with other planted biases (the tiny CLIP cache is shared)."""
        return replace(self, biases=_as_specs(bias))

    # -- (de)serialisation and cache keys ---------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; biases as spec strings."""
        return {
            "scene": self.scene.to_dict(),
            "biases": [str(b) for b in self.biases],
            "n_train": self.n_train,
            "n_probe": self.n_probe,
            "n_test": self.n_test,
            "seed": self.seed,
            "clip": self.clip.to_dict(),
            "classifier": self.classifier.to_dict(),
            "eval_biases": [str(b) for b in self.eval_biases],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorldConfig:
        """Inverse of :meth:`to_dict`; missing sections take their defaults."""
        d = dict(d)
        kwargs: dict[str, Any] = {}
        if "scene" in d:
            kwargs["scene"] = SceneConfig.from_dict(d.pop("scene"))
        if "clip" in d:
            kwargs["clip"] = ClipTrainConfig.from_dict(d.pop("clip"))
        if "classifier" in d:
            kwargs["classifier"] = ClassifierTrainConfig(**d.pop("classifier"))
        for key in ("biases", "eval_biases"):
            if key in d:
                kwargs[key] = tuple(_as_specs(d.pop(key)))
        return cls(**kwargs, **d)

    @classmethod
    def from_file(cls, path: str | Path) -> WorldConfig:
        """Read a JSON or YAML world file (same keys as :meth:`to_dict`; ``preset: demo|tiny`` allowed)."""
        p = Path(path)
        text = p.read_text()
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"{p}: a world file must hold a mapping")
        preset = data.pop("preset", None)
        if preset is None:
            return cls.from_dict(data)
        if preset not in ("demo", "tiny"):
            raise ValueError(f"{p}: unknown preset {preset!r} (demo or tiny)")
        base = (cls.demo if preset == "demo" else cls.tiny)(bias=[]).to_dict()
        for key, value in data.items():
            base[key] = base[key] | value if isinstance(base.get(key), dict) else value
        return cls.from_dict(base)

    def clip_key(self) -> str:
        """Cache key of the tiny CLIP: scene and CLIP training only (no biases, no split sizes)."""
        return config_hash({"scene": self.scene.to_dict(), "clip": self.clip.to_dict(), "v": 1})

    def world_key(self) -> str:
        """Cache key of the data splits and the classifier (everything but the CLIP settings)."""
        d = self.to_dict()
        d.pop("clip")
        d.pop("eval_biases")
        return config_hash(d | {"v": 1})


def _as_specs(bias: str | Sequence[str | BiasSpec] | None) -> tuple[str | BiasSpec, ...]:
    if bias is None:
        return ()
    if isinstance(bias, str):
        return (bias,)
    return tuple(bias)
