"""Concept suppression: what the classifier does when it cannot see a concept.

A concept's channels at the target layer are those whose bank direction (:class:`textcam.bank.
ChannelBank`) is unusually close to the concept's phrase in CLIP space: per channel, the cosine to every
vocabulary phrase is standardised over the vocabulary (``z``), and a channel belongs to the phrase when
its ``z`` exceeds the ``1 - alpha`` quantile of the ``z`` of every channel to every *other* phrase, the
null of a phrase drawn at random from the vocabulary (which would select about ``alpha`` × C channels).

A :class:`Suppression` replaces those channels' activations, by zero or by their mean over the probe
set, with a forward hook on the target layer; it travels in a checkpoint's config (``suppress``) so that
:func:`textcam.models.load_model` rebuilds the edited model from the original weights.

A concept can also be balanced out of the last layer: :func:`concept_balanced_head` refits it on the
target layer's pooled features of labelled images, every group (class × concept present/absent, presence
as CLIP sees it) weighing the same: Deep Feature Reweighting's group balance with the groups read off a
flagged phrase instead of annotated; before the fit, :func:`concept_eraser` removes the concept's linear
trace within classes. :func:`attach_head` puts such a head on a network.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from textcam.layers import forward_hook, get_layer

MODES = ("zero", "mean")


@dataclass(frozen=True)
class Suppression:
    """Channels of ``layer`` whose activations are replaced: by 0 (``zero``) or by ``values`` (``mean``)."""

    layer: str
    channels: tuple[int, ...]
    mode: Literal["zero", "mean"] = "zero"
    values: tuple[float, ...] = ()
    note: str = ""  # what was suppressed, for people ("circle: water background")

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"suppression mode must be one of {MODES}, got {self.mode!r}")
        if len(set(self.channels)) != len(self.channels) or any(c < 0 for c in self.channels):
            raise ValueError("suppressed channels must be distinct non-negative indices")
        if self.mode == "mean" and len(self.values) != len(self.channels):
            raise ValueError(f"mode 'mean' needs one value per channel ({len(self.channels)})")

    def to_config(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "channels": list(self.channels),
            "mode": self.mode,
            "values": list(self.values),
            "note": self.note,
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Suppression:
        missing = {"layer", "channels"} - set(config)
        if missing:
            raise ValueError(f"suppression config lacks {sorted(missing)}")
        return cls(
            layer=str(config["layer"]),
            channels=tuple(int(c) for c in config["channels"]),
            mode=config.get("mode", "zero"),
            values=tuple(float(v) for v in config.get("values", ())),
            note=str(config.get("note", "")),
        )

    def attach(self, module: nn.Module) -> RemovableHandle:
        """Register the replacement as a forward hook on ``layer``; the handle removes it."""
        layer = get_layer(module, self.layer)
        index = torch.tensor(self.channels, dtype=torch.long)
        values = torch.tensor(self.values if self.mode == "mean" else [0.0] * len(self.channels))

        def hook(_mod: nn.Module, _inp: object, output: torch.Tensor) -> torch.Tensor:
            # Channels are dim 1 of a feature map (B, C, h, w) and the last dim of tokens (B, N, C).
            dim = 1 if output.dim() == 4 else output.dim() - 1
            if index.numel() and int(index.max()) >= output.shape[dim]:
                raise ValueError(
                    f"layer {self.layer!r} has {output.shape[dim]} channels; suppression names more"
                )
            shape = [1] * output.dim()
            shape[dim] = -1
            keep = torch.ones(output.shape[dim], dtype=output.dtype, device=output.device)
            keep[index.to(output.device)] = 0
            fill = torch.zeros(output.shape[dim], dtype=output.dtype, device=output.device)
            fill[index.to(output.device)] = values.to(output.device, output.dtype)
            return output * keep.view(shape) + fill.view(shape)

        return layer.register_forward_hook(hook)


@contextmanager
def suppressed(module: nn.Module, suppression: Suppression | None) -> Iterator[None]:
    """Run ``module`` with ``suppression`` attached (None: unchanged)."""
    handle = suppression.attach(module) if suppression is not None else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


def channel_phrase_z(directions: torch.Tensor, text: torch.Tensor) -> np.ndarray:
    """(C, P): each channel's cosine to each phrase, standardised over the phrases (per channel)."""
    d = torch.nn.functional.normalize(directions.double(), dim=1)
    t = torch.nn.functional.normalize(text.double(), dim=1)
    cos = (d @ t.T).numpy()
    sd = cos.std(axis=1, keepdims=True)
    return (cos - cos.mean(axis=1, keepdims=True)) / np.where(sd > 1e-12, sd, 1.0)


@dataclass(frozen=True)
class ConceptChannels:
    """The channels of one phrase, strongest first, and the null they beat."""

    phrase: str
    channels: tuple[int, ...]
    z: tuple[float, ...]  # the selected channels' z, same order
    threshold: float  # the null quantile z had to exceed
    expected_by_chance: float  # channels a random phrase would get (alpha × C)
    ranking: tuple[int, ...] = field(repr=False, default=())  # every channel, by z (for fixed-size picks)


def concept_channels(
    directions: torch.Tensor, text: torch.Tensor, phrases: Sequence[str], phrase: str, *, alpha: float = 0.01
) -> ConceptChannels:
    """The rule of the module docstring for ``phrase`` (one of ``phrases``, embedded as ``text``)."""
    if phrase not in phrases:
        raise KeyError(f"{phrase!r} is not in the vocabulary the bank was described with")
    if not 0.0 < alpha < 1.0:
        raise ValueError("alpha must lie in (0, 1)")
    if len(phrases) < 3:
        raise ValueError("concept channels need a vocabulary of at least 3 phrases (the null)")
    z = channel_phrase_z(directions, text)
    p = list(phrases).index(phrase)
    others = np.delete(z, p, axis=1)
    threshold = float(np.quantile(others, 1.0 - alpha))
    order = np.argsort(-z[:, p], kind="stable")
    chosen = order[z[order, p] > threshold]
    return ConceptChannels(
        phrase,
        tuple(int(c) for c in chosen),
        tuple(float(v) for v in z[chosen, p]),
        threshold,
        alpha * z.shape[0],
        tuple(int(c) for c in order),
    )


def pooled(output: torch.Tensor) -> torch.Tensor:
    """A layer's output averaged over space (B, C, h, w) or over tokens (B, N, C): (B, C)."""
    return output.mean(dim=(2, 3)) if output.dim() == 4 else output.mean(dim=1)


@torch.no_grad()
def layer_features(
    module: nn.Module,
    layer: str,
    x: torch.Tensor,
    *,
    suppression: Suppression | None = None,
    batch_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, K) and the target layer's global-average-pooled output (N, C), after ``suppression``."""
    feats: list[torch.Tensor] = []

    def grab(_mod: nn.Module, _inp: object, output: torch.Tensor) -> None:
        feats.append(pooled(output).float())

    logits = []
    # grab after the suppression's hook
    with suppressed(module, suppression), forward_hook(get_layer(module, layer), grab):
        for start in range(0, x.shape[0], batch_size):
            logits.append(module(x[start : start + batch_size]).float())
    return torch.cat(logits), torch.cat(feats)


def group_accuracy(pred: np.ndarray, labels: np.ndarray, present: np.ndarray, cls: int) -> dict[str, Any]:
    """Accuracy overall and per group (the class × concept present/absent, the other classes × the
    same); ``conflicting`` is the class without the concept, ``worst_group`` the lowest group, and
    ``reliance`` P(predicted as the class | concept) − P(predicted as the class | no concept)."""
    ok = pred == labels
    groups = {
        "class_with": (labels == cls) & present,
        "class_without": (labels == cls) & ~present,
        "others_with": (labels != cls) & present,
        "others_without": (labels != cls) & ~present,
    }
    acc = {k: float(ok[m].mean()) if m.any() else float("nan") for k, m in groups.items()}
    sizes = {k: int(m.sum()) for k, m in groups.items()}
    valid = [v for v in acc.values() if v == v]
    as_class = pred == cls
    with_, without = as_class[present], as_class[~present]
    reliance = float(with_.mean() - without.mean()) if with_.size and without.size else float("nan")
    return {
        "accuracy": float(ok.mean()),
        # how much more often an image is called the class when it shows the concept: the shortcut itself
        "reliance": reliance,
        "groups": acc,
        "group_sizes": sizes,
        "conflicting": acc["class_without"],
        "worst_group": min(valid) if valid else float("nan"),
    }


def probe_means(module: nn.Module, layer: str, x: torch.Tensor, channels: Sequence[int]) -> tuple[float, ...]:
    """Each channel's mean activation over the probe images (the ``mean`` mode's replacement)."""
    _, feats = layer_features(module, layer, x)
    return tuple(float(v) for v in feats[:, list(channels)].mean(0))


def dfr_predictions(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    train_groups: np.ndarray,
    test_features: np.ndarray,
    *,
    seed: int = 0,
) -> np.ndarray:
    """Deep Feature Reweighting (Kirichenko et al. 2023): a new last layer, logistic regression on the
    target layer's pooled features of a group-balanced held-out set (every group cut to the smallest)."""
    rng = np.random.default_rng(seed)
    groups = np.unique(train_groups)
    n = min(int((train_groups == g).sum()) for g in groups)
    if n < 2:
        raise ValueError("DFR needs at least two held-out images in every group")
    pick = np.concatenate([rng.choice(np.flatnonzero(train_groups == g), n, replace=False) for g in groups])
    n_classes = int(train_labels.max()) + 1
    weight, bias = logistic_head(train_features[pick], train_labels[pick], np.ones(pick.size), n_classes)
    return (test_features @ weight.T + bias).argmax(1)


def logistic_head(
    features: np.ndarray, labels: np.ndarray, sample_weight: np.ndarray, n_classes: int, *, c: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Weight (K, C) and bias (K,) of an L2 logistic regression on standardised features, the
    standardisation folded in so that ``features @ weight.T + bias`` are the logits."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    missing = sorted(set(range(n_classes)) - set(np.unique(labels).tolist()))
    if missing:
        shown = ", ".join(str(k) for k in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise ValueError(
            f"a new last layer needs labelled images of every class; {len(missing)} have none ({shown})"
        )
    scaler = StandardScaler().fit(features, sample_weight=sample_weight)
    clf = LogisticRegression(C=c, max_iter=5000).fit(
        scaler.transform(features), labels, sample_weight=sample_weight
    )
    coef, intercept = clf.coef_, clf.intercept_
    if n_classes == 2:  # sklearn gives one logit for two classes: logits (0, z) decide the same way
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.r_[0.0, intercept]
    weight = coef / scaler.scale_
    return weight, intercept - weight @ scaler.mean_


def class_concept_groups(labels: np.ndarray, present: np.ndarray) -> np.ndarray:
    """One group id per image: its class × whether the concept is present (``2 * class + present``)."""
    return labels.astype(np.int64) * 2 + present.astype(np.int64)


def concept_eraser(
    features: np.ndarray, labels: np.ndarray, present: np.ndarray, *, rtol: float = 1e-6
) -> tuple[np.ndarray, np.ndarray]:
    """The affine map ``x @ project.T + offset`` that leaves no linear trace of the concept within
    classes: LEACE (Belrose et al. 2023) on class-centred features and presence. Within classes the
    concept is what varies independently of the label (it is on other classes' images too), so the
    erased direction is the cue's, not the biased class's own evidence. ``present``: (N,) for one
    concept, or (N, k) to erase k at once (rank up to k)."""
    x = features - _class_means(features, labels)
    z = present.astype(np.float64).reshape(len(features), -1)
    z = z - _class_means(z, labels)
    eigval, eigvec = np.linalg.eigh(x.T @ x / len(x))
    keep = eigval > rtol * max(float(eigval.max()), 1e-300)
    v, root = eigvec[:, keep], np.sqrt(eigval[keep])
    whiten, unwhiten = (v / root) @ v.T, (v * root) @ v.T
    basis, sizes, _ = np.linalg.svd(whiten @ (x.T @ z / len(x)), full_matrices=False)
    eye = np.eye(features.shape[1])
    if not sizes.max() > 1e-12:  # the concept does not vary within any class: nothing to erase
        return eye, np.zeros(features.shape[1])
    basis = basis[:, sizes > rtol * sizes.max()]
    erase = unwhiten @ basis @ basis.T @ whiten
    return eye - erase, features.mean(0) @ erase.T


def _class_means(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each row's class mean of ``values`` (rows, columns)."""
    classes, inverse = np.unique(labels, return_inverse=True)
    sums = np.zeros((classes.size, values.shape[1]))
    np.add.at(sums, inverse, values)
    return (sums / np.bincount(inverse)[:, None])[inverse]


def concept_balanced_head(
    features: np.ndarray,
    labels: np.ndarray,
    present: np.ndarray,
    n_classes: int,
    *,
    erase: bool = True,
    erased: np.ndarray | None = None,
    balance: float = 1.0,
    c: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`logistic_head` where every group (class × concept present/absent) weighs the same in
    total: DFR's balance by reweighting instead of subsampling, since a biased set may hold a handful of
    images in a group. With ``erase``, it is fitted on :func:`concept_eraser`'s features and the eraser
    is folded into the returned weight and bias, so they still apply to the raw features (why, measured:
    ``docs/decisions.md``, "Balance the last layer by the concept" and "Erase the concept").
    ``erased``: what to erase if not ``present`` (e.g. every value of its attribute); ``balance``: group
    weights ∝ size^-balance (1: equal totals, 0: none); ``c``: the inverse L2 strength. The defaults
    measured best on held-out worlds (``docs/decisions.md``, "Three more refits")."""
    _, inverse, counts = np.unique(
        class_concept_groups(labels, present), return_inverse=True, return_counts=True
    )
    weight = counts[inverse].astype(np.float64) ** -balance
    dim = features.shape[1]
    concept = present if erased is None else erased
    project, offset = concept_eraser(features, labels, concept) if erase else (np.eye(dim), np.zeros(dim))
    sample_weight = weight * labels.size / weight.sum()
    w, b = logistic_head(features @ project.T + offset, labels, sample_weight, n_classes, c=c)
    return w @ project, b + w @ offset


def crossfit_predictions(
    features: np.ndarray,
    labels: np.ndarray,
    present: np.ndarray,
    n_classes: int,
    *,
    folds: int = 2,
    seed: int = 0,
) -> np.ndarray:
    """Each image's class by a :func:`concept_balanced_head` fitted on the other folds (folds drawn
    within each group), so that a refit is never scored on the images it was fitted on."""
    rng = np.random.default_rng(seed)
    group = class_concept_groups(labels, present)
    fold = np.empty(labels.size, dtype=np.int64)
    for g in np.unique(group):
        members = rng.permutation(np.flatnonzero(group == g))
        fold[members] = np.arange(members.size) % folds
    pred = np.empty(labels.size, dtype=np.int64)
    for f in range(folds):
        fit = fold != f
        weight, bias = concept_balanced_head(features[fit], labels[fit], present[fit], n_classes)
        pred[~fit] = (features[~fit] @ weight.T + bias).argmax(1)
    return pred


HEAD_MODULE = "textcam_head"


def attach_head(module: nn.Module, layer: str, weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    """Make ``module``'s output a new linear layer on ``layer``'s pooled output. The head is registered
    as the submodule ``textcam_head``, so a checkpoint holds its weights and CAM finds it as the last
    linear layer; gradients flow through it to ``layer`` like through the original head."""
    head = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    module.add_module(HEAD_MODULE, head)
    seen: dict[str, torch.Tensor] = {}

    def grab(_mod: nn.Module, _inp: object, output: torch.Tensor) -> None:
        seen["pooled"] = pooled(output)

    def replace(_mod: nn.Module, _inp: object, _output: torch.Tensor) -> torch.Tensor:
        return head(seen.pop("pooled").to(head.weight.dtype))

    target, grabbing = get_layer(module, layer), []

    def grab_last(_mod: nn.Module, _inp: object) -> None:
        # Re-registered at every forward so that it runs after every other hook on the layer: a CAM's
        # gradient leaf or a suppression replaces the output the head must read.
        while grabbing:
            grabbing.pop().remove()
        grabbing.append(target.register_forward_hook(grab))

    module.register_forward_pre_hook(grab_last)
    module.register_forward_hook(replace)
    return head
