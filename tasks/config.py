"""The audit configuration: one typed pydantic model, loaded from YAML or TOML plus CLI overrides.

``AuditConfig`` is the only input of the ``audit`` flow, validated before any model loads. It is saved
next to the results as ``RUN_DIR/config.yaml`` so a run can be reproduced (or resumed) from its own
directory. Settings of one step are typed sections: ``calibration`` (:class:`CalibrationSettings`),
``explanation`` (:class:`ExplanationSettings`) and ``flags`` (:class:`FlagRule`).

Example::

    cfg = load_config("audit.yaml", overrides={"shard_size": 64, "calibration": {"bank_m": 20}})
    cfg.save(RunDir(run_dir).config)
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
import typing
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from textcam.io import cache_root, write_text

RUNNERS = ("default", "dask")


class ConfigError(ValueError):
    """The configuration file or an override is invalid; the message names the key."""


class _Settings(BaseModel):
    """Frozen, unknown keys forbidden, and the CLI's and files' spellings of empty and list values."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, data: Any) -> Any:
        """ "none" for an optional value, "a,b" for a list."""
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, value in data.items():
            info = cls.model_fields.get(name)
            if info is None or not isinstance(value, str):
                continue
            args = typing.get_args(info.annotation)
            if value.lower() in ("none", "null", "") and type(None) in args:
                out[name] = None
            elif typing.get_origin(info.annotation) is tuple:
                out[name] = tuple(v.strip() for v in value.split(",") if v.strip())
        return out


class CalibrationSettings(_Settings):
    """How the channel bank is calibrated (:meth:`textcam.bank.ChannelBank.calibrate`)."""

    probe: str | None = None
    """Probe images for calibrating the channel bank (folder or manifest); default: the audit data."""
    probe_size: int = Field(500, ge=1)
    bank_m: int = Field(50, ge=1)
    shrinkage: float = Field(0.5, ge=0.0, le=1.0)


class ExplanationSettings(_Settings):
    """What each image's explanation holds (:class:`textcam.explain.Explainer`)."""

    method: str = "gradcam"
    top_k: int = Field(1, ge=1)
    n_phrases: int = Field(5, ge=1)
    n_groups: int = Field(3, ge=1)
    check_phrases: bool = True
    """Mark each explanation's phrases that CLIP sees in the image (a CLIP pass per image)."""

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        from textcam.cams import METHODS

        if value not in METHODS:
            raise ValueError(f"unknown CAM method; choose one of {sorted(METHODS)}")
        return value


#: smallest effect (risk difference) a flagged cue must make to predictions on held-out images: the truth
#: sweep's own bound of a cue the model uses (accuracy gap ≥ 0.3); docs/decisions.md, "Flags claim use"
MIN_EFFECT = 0.3
#: the same on the classifier's training images, where effects shrink (every audit's bound until 6c40d8b)
MIN_EFFECT_IN_TRAINING = 0.2
#: smallest risk difference of a flagged phrase's presence between its class's training images and the
#: others: the truth sweep's bound of "no difference" (a cue with a gap under 0.1 is unused); decisions,
#: "Flags need the data too"
MIN_CORRELATION = 0.1


class FlagRule(_Settings):
    """The flag rule's settings (:func:`tasks.flags.flag_spurious`; the config's ``flags`` section)."""

    n_permutations: int = Field(200, ge=1)
    #: images the explanations' permutation null uses at most (a class-stratified sample above it)
    null_images: int | None = Field(100_000, ge=100)
    quantile: float = Field(0.99, gt=0.0, lt=1.0)
    min_images: int = Field(3, ge=1)
    min_relative_score: float = Field(0.5, ge=0.0, le=1.0)
    n_examples: int = Field(6, ge=0)
    seed: int = 0
    alpha: float = Field(0.01, gt=0.0, lt=1.0)
    min_effect: float = Field(MIN_EFFECT, ge=0.0, le=1.0)
    #: ``min_effect`` when ``probe_seen_in_training``: in-sample the model is right on nearly every image
    min_effect_in_training: float = Field(MIN_EFFECT_IN_TRAINING, ge=0.0, le=1.0)
    #: image-side witness of "names a class": phi between where CLIP sees the phrase and the class name
    min_class_agreement: float = Field(0.5, ge=-1.0, le=1.0)
    #: |phi| at which a phrase's presence makes it a proxy of an accepted flag's (the same halfway bound)
    proxy_agreement: float = Field(0.5, gt=0.0, le=1.0)
    #: the probe images (the audited data unless ``calibration.probe`` is given) were in the classifier's
    #: training data: once no pair passes, a pair *for* a class that its explanations name needs no
    #: ``min_effect``, only an effect in its direction
    probe_seen_in_training: bool = False
    #: the classifier's training images (a folder or manifest with labels): a flag then also needs its
    #: phrase to go with its class there (``tasks.training_data``); with ``probe_seen_in_training`` the
    #: probe is that data
    training_data: str | None = None
    #: training images read for that check at most (the first by image_id, as the probe)
    training_size: int = Field(2000, ge=10)
    min_correlation: float = Field(MIN_CORRELATION, ge=0.0, le=1.0)

    @property
    def effect_bound(self) -> float:
        """The smallest effect a flag needs: ``min_effect``, or on training images its in-sample bound."""
        return self.min_effect_in_training if self.probe_seen_in_training else self.min_effect


class AuditConfig(_Settings):
    """Everything an audit run depends on.

    Fields that change the explanations (model, layer, CLIP, vocabulary, method, ...) make up
    :meth:`fingerprint`; execution fields (runner, workers, device, run_dir, ...) do not, so the same
    audit run with the default runner or on Dask produces the same ``run_id`` and the same tables.
    """

    data: str = Field(min_length=1)
    """Image folder (class-per-subfolder) or a CSV/Parquet manifest with a ``path`` column."""
    model: str = "resnet18"
    weights: str = "default"
    layer: str | None = None
    clip: str = "ViT-B-32"
    clip_pretrained: str | None = None
    vocab: tuple[str, ...] = Field(("general",), min_length=1)
    classes: str | tuple[str, ...] | None = None
    """Label check: ``None`` (off), ``"model"`` (the classifier's class names), or a list of names."""
    shard_size: int = Field(256, ge=1)
    batch_size: int = Field(32, ge=1)
    loader_workers: int = Field(2, ge=0)
    """DataLoader worker processes per shard (image decoding overlaps the model passes)."""
    runner: Literal["default", "dask"] = "default"
    workers: int = Field(2, ge=1)
    """Dask worker processes (``runner: dask``) or concurrent shard tasks (default runner)."""
    scheduler: str | None = None
    """Address of an existing Dask scheduler (``tcp://host:8786``); implies ``runner: dask``."""
    torch_threads: int | None = Field(None, ge=1)
    run_dir: str = "runs/{run_id}"
    """Where results go; ``{run_id}`` and ``{date}`` (UTC, YYYYMMDD) are filled in at run time."""
    cache_dir: str | None = None
    """Channel banks and phrase embeddings; default ``$TEXTCAM_CACHE`` or ``~/.cache/textcam``."""
    device: str = "auto"
    fail_on_quarantine: bool = False
    intervene: bool = False
    """After flagging: suppress each "for" flag's channels, measure it, save the edited model
    (``tasks.intervene``; the same as ``textcam intervene RUN_DIR``)."""
    intervene_refit: bool = False
    """With ``intervene``: a new last layer instead, the concept erased and balanced (``--refit``)."""
    calibration: CalibrationSettings = CalibrationSettings()
    explanation: ExplanationSettings = ExplanationSettings()
    flags: FlagRule = FlagRule()

    #: Fields that do not change any row of any table.
    EXECUTION_FIELDS: typing.ClassVar[frozenset[str]] = frozenset(
        {
            "runner",
            "workers",
            "scheduler",
            "torch_threads",
            "run_dir",
            "cache_dir",
            "device",
            "intervene",
            "intervene_refit",
            "loader_workers",
            "batch_size",
            "fail_on_quarantine",
        }
    )

    @model_validator(mode="before")
    @classmethod
    def _scheduler_implies_dask(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("scheduler"):
            return {**data, "runner": "dask"}
        return data

    # -- identity ---------------------------------------------------------------------------------

    def content(self) -> dict[str, Any]:
        """The fields that determine the results (everything but execution settings)."""
        return {k: v for k, v in self.to_dict().items() if k not in self.EXECUTION_FIELDS}

    def fingerprint(self) -> str:
        """Stable 16-hex digest of :meth:`content`."""
        blob = json.dumps(self.content(), sort_keys=True, default=str).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def trained_clip(self) -> bool:
        """CLIP weights from a file, a pretrained tag or a local dir; random weights see nothing."""
        return self.clip_pretrained is not None or self.clip.startswith("local-dir:")

    def resolved_cache_dir(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        return cache_root()

    # -- (de)serialisation ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the config as YAML (atomically) and return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path

    def replace(self, **changes: Any) -> AuditConfig:
        """A copy with fields replaced; a section given as a mapping keeps its other keys."""
        data = self.to_dict()
        for key, value in changes.items():
            data[key] = {**data[key], **value} if key in SECTIONS and isinstance(value, dict) else value
        return from_mapping(data)


#: The config's typed sections, by key.
SECTIONS: dict[str, type[_Settings]] = {
    "calibration": CalibrationSettings,
    "explanation": ExplanationSettings,
    "flags": FlagRule,
}


def from_mapping(data: dict[str, Any]) -> AuditConfig:
    """Build a config from a plain mapping; unknown keys are an error (typos must not pass silently)."""
    if not isinstance(data, dict):
        raise ConfigError(f"config must be a mapping of keys to values, got {type(data).__name__}")
    if not data.get("data"):
        raise ConfigError("config needs `data`: an image folder or a CSV/Parquet manifest")
    try:
        return AuditConfig.model_validate(data)
    except pydantic.ValidationError as exc:
        raise ConfigError(_explain(exc)) from None


def _explain(exc: pydantic.ValidationError) -> str:
    """One line per invalid key, each naming it; unknown keys listed with the known ones."""
    unknown = [".".join(map(str, e["loc"])) for e in exc.errors() if e["type"] == "extra_forbidden"]
    lines = []
    if unknown:
        moved = {k: f"{section}.{k}" for section, model in SECTIONS.items() for k in model.model_fields}
        hints = [f"{key!r} belongs in its section: {moved[key]}" for key in unknown if key in moved]
        known = sorted(set(AuditConfig.model_fields) - set(SECTIONS) | set(moved.values()))
        lines.append(f"unknown config key(s) {unknown}; " + "; ".join([*hints, f"known keys: {known}"]))
    for e in exc.errors():
        if e["type"] != "extra_forbidden":
            key = ".".join(map(str, e["loc"])) or "config"
            lines.append(f"config key {key!r}: {e['msg']}, got {e['input']!r}")
    return "; ".join(lines)


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or TOML (``.toml``) file into a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot parse config file {path}: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    # A TOML file may keep its keys under an [audit] table.
    if set(data) == {"audit"} and isinstance(data["audit"], dict):
        data = data["audit"]
    return data


def load_config(
    path: str | os.PathLike[str] | None = None, overrides: dict[str, Any] | None = None
) -> AuditConfig:
    """Config file (optional) with ``overrides`` on top (``None`` values in overrides are ignored).

    Relative ``data``/``probe``/``cache_dir`` paths in a file are resolved against the file's folder.
    """
    data: dict[str, Any] = {}
    if path is not None:
        data = read_config_file(path)
        base = Path(path).resolve().parent
        calibration = data.get("calibration")
        for holder, key in ((data, "data"), (data, "cache_dir"), (calibration, "probe")):
            value = holder.get(key) if isinstance(holder, dict) else None
            if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
                holder[key] = str(base / value)
    for key, value in (overrides or {}).items():
        if isinstance(value, dict):  # a section: override its keys, keep the file's others
            base = data.get(key) if isinstance(data.get(key), dict) else {}
            value = {**base, **{k: v for k, v in value.items() if v is not None}}
            if not value:
                continue
        if value is not None:
            data[key] = value
    return from_mapping(data)
