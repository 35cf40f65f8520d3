"""The audit configuration: one typed dataclass, loaded from YAML or TOML plus CLI overrides.

``AuditConfig`` is the only input of the ``audit`` flow. It is saved next to the results as
``RUN_DIR/config.yaml`` so a run can be reproduced (or resumed) from its own directory.

Example::

    cfg = load_config("audit.yaml", overrides={"shard_size": 64, "runner": "dask"})
    cfg.save(RunDir(run_dir).config)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from textcam.io import write_text

RUNNERS = ("default", "dask")


class ConfigError(ValueError):
    """The configuration file or an override is invalid; the message names the key."""


@dataclass(frozen=True)
class AuditConfig:
    """Everything an audit run depends on.

    Fields that change the explanations (model, layer, CLIP, vocabulary, method, ...) make up
    :meth:`fingerprint`; execution fields (runner, workers, device, run_dir, ...) do not, so the same
    audit run with the default runner or on Dask produces the same ``run_id`` and the same tables.
    """

    data: str
    """Image folder (class-per-subfolder) or a CSV/Parquet manifest with a ``path`` column."""
    model: str = "resnet18"
    weights: str = "default"
    layer: str | None = None
    clip: str = "ViT-B-32"
    clip_pretrained: str | None = None
    vocab: tuple[str, ...] = ("general",)
    method: str = "gradcam"
    top_k: int = 1
    n_phrases: int = 5
    n_groups: int = 3
    check_phrases: bool = True
    """Mark each explanation's phrases that CLIP sees in the image (a CLIP pass per image)."""
    classes: str | tuple[str, ...] | None = None
    """Label check: ``None`` (off), ``"model"`` (the classifier's class names), or a list of names."""
    probe: str | None = None
    """Probe images for calibrating the channel bank (folder or manifest); default: the audit data."""
    probe_size: int = 500
    bank_m: int = 50
    shrinkage: float = 0.5
    shard_size: int = 256
    batch_size: int = 32
    loader_workers: int = 2
    """DataLoader worker processes per shard (image decoding overlaps the model passes)."""
    runner: str = "default"
    workers: int = 2
    """Dask worker processes (``runner: dask``) or concurrent shard tasks (default runner)."""
    scheduler: str | None = None
    """Address of an existing Dask scheduler (``tcp://host:8786``); implies ``runner: dask``."""
    torch_threads: int | None = None
    run_dir: str = "runs/{run_id}"
    """Where results go; ``{run_id}`` and ``{date}`` (UTC, YYYYMMDD) are filled in at run time."""
    cache_dir: str | None = None
    """Channel banks and phrase embeddings; default ``$TEXTCAM_CACHE`` or ``~/.cache/textcam``."""
    device: str = "auto"
    fail_on_quarantine: bool = False
    intervene: bool = False
    """After flagging: suppress each "for" flag's channels, measure it, save the edited model
    (``tasks.intervene``; the same as ``textcam intervene RUN_DIR``)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form settings passed to the analytics steps (flags, report); not interpreted here."""

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
            "loader_workers",
            "batch_size",
            "fail_on_quarantine",
        }
    )

    def __post_init__(self) -> None:
        _check_types(self)
        if self.runner not in RUNNERS:
            raise ConfigError(f"runner must be one of {RUNNERS}, got {self.runner!r}")
        positive = (
            "top_k",
            "n_phrases",
            "n_groups",
            "probe_size",
            "bank_m",
            "shard_size",
            "batch_size",
            "workers",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.loader_workers < 0:
            raise ConfigError(f"loader_workers must be >= 0, got {self.loader_workers}")
        if not 0.0 <= self.shrinkage <= 1.0:
            raise ConfigError(f"shrinkage must be in [0, 1], got {self.shrinkage}")
        if not self.vocab:
            raise ConfigError("vocab needs at least one source (a built-in name, a file or a phrase)")

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
        return Path(os.environ.get("TEXTCAM_CACHE", Path.home() / ".cache" / "textcam"))

    # -- (de)serialisation ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the config as YAML (atomically) and return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path

    def replace(self, **changes: Any) -> AuditConfig:
        return from_mapping({**self.to_dict(), **changes})


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(AuditConfig)


def _matches(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (types.UnionType, typing.Union):
        return any(_matches(value, arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is tuple:
        (item,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
        return isinstance(value, tuple) and all(_matches(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _check_types(cfg: AuditConfig) -> None:
    hints = _field_types()
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if not _matches(value, hints[f.name]):
            raise ConfigError(
                f"config key {f.name!r}: expected {hints[f.name]}, got {type(value).__name__} {value!r}"
            )


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Lists become tuples; strings from the CLI become ints/floats/bools/None where the type asks."""
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, str):
        args = set(typing.get_args(tp)) or {tp}
        if value.lower() in ("none", "null", "") and type(None) in args:
            return None
        if int in args and str not in args:
            try:
                return int(value)
            except ValueError:
                raise ConfigError(f"config key {name!r}: expected an integer, got {value!r}") from None
        if float in args and str not in args:
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"config key {name!r}: expected a number, got {value!r}") from None
        if bool in args and str not in args:
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
            raise ConfigError(f"config key {name!r}: expected true/false, got {value!r}")
        is_tuple = typing.get_origin(tp) is tuple or any(typing.get_origin(a) is tuple for a in args)
        if is_tuple and str not in args:
            return tuple(v.strip() for v in value.split(",") if v.strip())
    return value


def from_mapping(data: dict[str, Any]) -> AuditConfig:
    """Build a config from a plain mapping; unknown keys are an error (typos must not pass silently)."""
    if not isinstance(data, dict):
        raise ConfigError(f"config must be a mapping of keys to values, got {type(data).__name__}")
    hints = _field_types()
    known = {f.name for f in dataclasses.fields(AuditConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}; known keys: {sorted(known)}")
    if not data.get("data"):
        raise ConfigError("config needs `data`: an image folder or a CSV/Parquet manifest")
    values = {k: _coerce(k, v, hints[k]) for k, v in data.items()}
    if values.get("scheduler"):
        values["runner"] = "dask"
    try:
        return AuditConfig(**values)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None


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
        for key in ("data", "probe", "cache_dir"):
            value = data.get(key)
            if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
                data[key] = str(base / value)
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return from_mapping(data)
