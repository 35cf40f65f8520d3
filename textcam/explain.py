"""Explanations: saliency, the class's text direction T_c(x), phrases and channel groups.

For image x and class c with CAM weights w_c^j and target-layer activations A_j(x):

    V_c(x) = ReLU(Σ_j w_c^j A_j(x))                     (saliency)
    κ_j    = w_c^j · GAP(A_j(x))                         (channel contribution to the class score)
    T_c⁺(x) = Σ_j ReLU(κ_j) t_j,  T_c⁻(x) = Σ_j ReLU(−κ_j) t_j   (evidence for / against, kept apart)

T_c⁺ and T_c⁻ are coded over the vocabulary's text embeddings (:mod:`textcam.select`), and the
channels are grouped by the chosen phrase they are most similar to (among the phrases at least
``group_min_ratio`` as strong as the first), each group with its own map.
Everything after the classifier pass is a handful of batched tensor products, so explanation runs
at close to the classifier's own speed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from textcam.bank import BankMismatchError, ChannelBank
from textcam.cams import CamOutput, build_cam
from textcam.device import model_device
from textcam.select import Selection, center_vocabulary, group_channels, nearest_phrases, select_phrases

if TYPE_CHECKING:
    from textcam.models import LoadedModel


@dataclass(frozen=True)
class Phrase:
    text: str
    score: float
    direction: str  # "for" | "against"
    shown: bool | None = None  # seen in the image by CLIP and strong enough to show; None: not checked
    seen: bool | None = None  # seen in the image by CLIP, whatever its weight; None: not checked


@dataclass(frozen=True)
class NearPhrase:
    """A phrase among those nearest T_c⁺(x), selected by the sparse code or not."""

    text: str
    cosine: float
    seen: bool | None = None  # seen in the image by CLIP; None: not checked


@dataclass(frozen=True)
class Group:
    text: str
    share: float  # share of the positive evidence carried by the group's channels
    n_channels: int
    map: np.ndarray  # (h, w) float32, scaled by the saliency map's maximum


@dataclass(frozen=True)
class Explanation:
    """One image × one explained class."""

    pred: int
    pred_name: str
    prob: float
    topk: list[dict[str, Any]]
    target_class: int
    target_name: str
    rank_of_target: int
    score: float  # the target's logit
    phrases: list[Phrase]
    nearest: list[NearPhrase]
    groups: list[Group]
    saliency: np.ndarray  # (h, w) float32 in [0, 1]
    method: str

    def phrases_for(self) -> list[Phrase]:
        return [p for p in self.phrases if p.direction == "for"]

    def to_record(self) -> dict[str, Any]:
        """A dict with the explanation columns of :data:`textcam.schema.EXPLANATIONS`."""
        h, w = self.saliency.shape
        return {
            "pred": self.pred,
            "pred_name": self.pred_name,
            "prob": self.prob,
            "topk": self.topk,
            "target_class": self.target_class,
            "target_name": self.target_name,
            "rank_of_target": self.rank_of_target,
            "phrases": [asdict(p) for p in self.phrases],
            "nearest": [asdict(p) for p in self.nearest],
            "groups": [
                {
                    "text": g.text,
                    "share": g.share,
                    "n_channels": g.n_channels,
                    "map": g.map.astype(np.float16).ravel().tolist(),
                }
                for g in self.groups
            ],
            "saliency": self.saliency.astype(np.float16).ravel().tolist(),
            "map_h": h,
            "map_w": w,
            "method": self.method,
        }


@dataclass
class ExplanationBatch:
    """The tensors behind a batch of explanations (B images × K classes)."""

    logits: torch.Tensor  # (B, num_classes)
    probs: torch.Tensor  # (B, num_classes)
    targets: torch.Tensor  # (B, K)
    saliency: torch.Tensor  # (B, K, h, w) in [0, 1]
    contributions: torch.Tensor  # (B, K, C)
    text_for: torch.Tensor  # (B, K, D) T_c⁺(x)
    text_against: torch.Tensor  # (B, K, D) T_c⁻(x)
    phrases_for: Selection  # (B*K, n_phrases)
    phrases_against: Selection  # (B*K, n_against)
    # (B*K, n_phrases) nearest T_c⁺(x) by cosine: the sparse code can leave out a phrase T_c⁺(x) points at
    # when an earlier pick (often the class name) explains it away; these keep it for the per-image view
    phrases_near: Selection
    group_of_channel: torch.Tensor  # (B, K, C) in [-1, G)
    group_maps: torch.Tensor  # (B, K, G, h, w)
    group_share: torch.Tensor  # (B, K, G)


@contextmanager
def _serial_on_cpu(device: torch.device) -> Iterator[None]:
    """Run the block with one intra-op thread on CPU; restore the thread count after.

    After the classifier pass come some hundred small tensor operations (≤ a few MB each): split
    over threads, each pays a hand-off that on a busy machine costs more than the work itself (the
    explanation measured 0.82× a bare forward with it, see bench/explain.py); in the calling thread
    alone they take a few percent of the forward.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class Explainer:
    """Explain a classifier's decisions with a calibrated channel bank and a phrase vocabulary.

    Example:
        >>> explainer = Explainer(model, bank, phrases, clip.encode_texts(phrases))  # doctest: +SKIP
        >>> explainer.explain_batch(images)[0].phrases  # doctest: +SKIP
    """

    def __init__(
        self,
        model: LoadedModel,
        bank: ChannelBank,
        phrases: Sequence[str],
        phrase_embeddings: torch.Tensor,
        *,
        method: str = "gradcam",
        top_k: int = 1,
        n_phrases: int = 5,
        n_against: int = 2,
        n_groups: int = 3,
        group_min_ratio: float = 0.5,
        redundancy: float = 0.5,
        device: str | torch.device = "auto",
    ) -> None:
        if len(phrases) != phrase_embeddings.shape[0]:
            raise ValueError(f"{len(phrases)} phrases but {phrase_embeddings.shape[0]} embeddings")
        if bank.model_id != model.model_id:
            raise BankMismatchError(
                f"channel bank was calibrated for {bank.model_id!r}, not {model.model_id!r}"
            )
        if phrase_embeddings.shape[1] != bank.directions.shape[1]:
            raise BankMismatchError(
                f"phrase embeddings have dimension {phrase_embeddings.shape[1]} but the bank's CLIP "
                f"space has {bank.directions.shape[1]}: use the CLIP model the bank was calibrated with"
            )
        for name, value in (("top_k", top_k), ("n_phrases", n_phrases), ("n_groups", n_groups)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if n_against < 0:
            raise ValueError(f"n_against must be >= 0, got {n_against}")
        if not 0.0 <= group_min_ratio <= 1.0:
            raise ValueError(f"group_min_ratio must lie in [0, 1], got {group_min_ratio}")
        self.device = model_device(model.module, device)
        self.model = model
        self.bank = bank
        self.phrases = list(phrases)
        self.method = method
        self.top_k, self.n_phrases, self.n_against = top_k, n_phrases, n_against
        self.n_groups = min(n_groups, n_phrases)
        self.group_min_ratio = group_min_ratio
        self.redundancy = redundancy
        self.vocab = center_vocabulary(phrase_embeddings.float()).to(self.device)
        self.directions = bank.directions.float().to(self.device)
        self.cam = build_cam(method, model.module, bank.layer, token_grid=model.token_grid)

    def _targets(self, logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
        if targets is None:
            return logits.topk(self.top_k, dim=1).indices
        return targets.view(-1, 1) if targets.dim() == 1 else targets

    def explain_tensors(self, images: torch.Tensor, targets: torch.Tensor | None = None) -> ExplanationBatch:
        """Batched explanation as tensors; ``targets`` is (B,) or (B, K) class indices or None (top-k)."""
        from textcam.targets import ClassTargets, TopK

        target_spec = TopK(self.top_k) if targets is None else ClassTargets(targets)
        out = self.cam(images.to(self.device), target_spec)
        if out.activations.shape[1] != self.directions.shape[0]:
            raise BankMismatchError(
                f"layer {self.bank.layer!r} has {out.activations.shape[1]} channels but the bank has "
                f"{self.directions.shape[0]} directions: it was calibrated for another model or layer"
            )
        with _serial_on_cpu(self.device):
            return self._describe(out)

    def _describe(self, out: CamOutput) -> ExplanationBatch:
        """Everything after the classifier pass: T_c(x), phrases, channel groups, scaled maps."""
        logits, acts, weights = out.logits, out.activations, out.weights
        b, k = out.targets.shape
        probs = torch.sigmoid(logits) if self.model.output == "sigmoid" else logits.softmax(dim=1)

        # Weighted activations per channel, w_j ⊙ A_j, for channel or element-wise weights.
        if weights.dim() == 3:
            contrib = weights * acts.mean(dim=(2, 3))[:, None, :]
        else:
            contrib = (weights * acts[:, None]).mean(dim=(3, 4))
        text_for = contrib.clamp_min(0) @ self.directions
        text_against = (-contrib).clamp_min(0) @ self.directions

        sel_for = select_phrases(
            text_for.flatten(0, 1), self.vocab, self.n_phrases, redundancy=self.redundancy
        )
        sel_against = select_phrases(
            text_against.flatten(0, 1), self.vocab, max(self.n_against, 1), redundancy=self.redundancy
        )

        g = self.n_groups
        gidx = sel_for.indices[:, :g]
        # A phrase becomes a concept group only when its coefficient is at least group_min_ratio of the
        # first phrase's: the small phrases sparse coding adds to fit the residual name no channel set
        # (ground-truth world: group phrase names its region 0.44 over all three slots, 0.81 with 0.5).
        strong = sel_for.scores[:, :g] >= self.group_min_ratio * sel_for.scores[:, :1]
        valid = (gidx >= 0) & strong
        emb = self.vocab[gidx.clamp_min(0)] * valid[..., None]
        assign = group_channels(contrib.flatten(0, 1), self.directions, emb, valid).view(b, k, -1)
        # a comparison, not one_hot(): no range check waiting for a GPU; channel -1 (no group) is all zero
        onehot = (assign[..., None] == torch.arange(g, device=assign.device)).float()
        if weights.dim() == 3:
            # Channel weights: fold them into the one-hot first, so the maps are one batched
            # (K·G × C) @ (C × h·w) product with no (B, K, C, h, w) intermediate.
            group_maps = torch.einsum("bkcg,bchw->bkghw", weights[..., None] * onehot, acts)
        else:
            group_maps = torch.einsum("bkchw,bchw,bkcg->bkghw", weights, acts, onehot)
        positive = contrib.clamp_min(0)
        total = positive.sum(-1, keepdim=True).clamp_min(1e-12)
        # A share is a fraction: the summation order differs between numerator and total, so a group
        # holding every positive channel can come out at 1 + 1 ulp; clamp it back into [0, 1].
        share = (torch.einsum("bkc,bkcg->bkg", positive, onehot) / total).clamp(0.0, 1.0)

        peak = out.maps.flatten(2).amax(dim=2).clamp_min(1e-12)[..., None, None]
        return ExplanationBatch(
            logits=logits,
            probs=probs,
            targets=out.targets,
            saliency=out.maps / peak,
            contributions=contrib,
            text_for=text_for,
            text_against=text_against,
            phrases_for=sel_for,
            phrases_against=sel_against,
            phrases_near=nearest_phrases(text_for.flatten(0, 1), self.vocab, self.n_phrases),
            group_of_channel=assign,
            group_maps=group_maps.clamp_min(0) / peak[:, :, None],
            group_share=share,
        )

    def explain_batch(self, images: torch.Tensor, targets: torch.Tensor | None = None) -> list[Explanation]:
        """One :class:`Explanation` per image × target, image-major."""
        eb = self.explain_tensors(images, targets)
        return self.to_explanations(eb)

    def _phrase_list(
        self, fi: list[int], fs: list[float], marks: list[Any], ai: list[int], as_: list[float]
    ) -> list[Phrase]:
        """One explanation's "for" phrases, with CLIP's marks (shown, seen; None: not checked), then its
        "against" phrases; -1 indices are empty slots."""
        out = [
            Phrase(self.phrases[p], s, "for", *(m if m is None else bool(m[n]) for m in marks))
            for n, (p, s) in enumerate(zip(fi, fs, strict=False))
            if p >= 0
        ]
        return out + [Phrase(self.phrases[p], s, "against") for p, s in zip(ai, as_, strict=False) if p >= 0]

    def _phrase_lists(
        self, eb: ExplanationBatch, shown: torch.Tensor | None, seen: torch.Tensor | None
    ) -> list[list[list[Phrase]]]:
        """Per image and target, the explanation's "for" phrases with CLIP's marks, then "against"."""
        b, k = eb.targets.shape
        fi, fs = eb.phrases_for.indices.view(b, k, -1).tolist(), eb.phrases_for.scores.view(b, k, -1).tolist()
        marks = [None if m is None else m.view(b, k, -1).tolist() for m in (shown, seen)]
        ai = eb.phrases_against.indices.view(b, k, -1)[..., : self.n_against].tolist()
        as_ = eb.phrases_against.scores.view(b, k, -1)[..., : self.n_against].tolist()
        return [
            [
                self._phrase_list(
                    fi[i][j], fs[i][j], [m if m is None else m[i][j] for m in marks], ai[i][j], as_[i][j]
                )
                for j in range(k)
            ]
            for i in range(b)
        ]

    def _nearest_lists(
        self, eb: ExplanationBatch, near_seen: torch.Tensor | None
    ) -> list[list[list[NearPhrase]]]:
        """Per image and target, the phrases nearest T_c⁺(x), with CLIP's call when checked."""
        b, k = eb.targets.shape
        ni = eb.phrases_near.indices.view(b, k, -1).tolist()
        ns = eb.phrases_near.scores.view(b, k, -1).tolist()
        marks = None if near_seen is None else near_seen.view(b, k, -1).tolist()
        return [
            [
                [
                    NearPhrase(self.phrases[p], c, None if marks is None else bool(marks[i][j][n]))
                    for n, (p, c) in enumerate(zip(ni[i][j], ns[i][j], strict=True))
                    if p >= 0
                ]
                for j in range(k)
            ]
            for i in range(b)
        ]

    def to_explanations(
        self,
        eb: ExplanationBatch,
        shown: torch.Tensor | None = None,
        seen: torch.Tensor | None = None,
        near_seen: torch.Tensor | None = None,
    ) -> list[Explanation]:
        """One :class:`Explanation` per image × target; ``shown`` (B·K, n_phrases) bool marks the "for"
        phrases to show (:meth:`textcam.visibility.PhraseVisibility.visible`), ``seen`` those CLIP sees
        in the image whatever their weight (:meth:`~textcam.visibility.PhraseVisibility.seen`), and
        ``near_seen`` the same for the nearest phrases (``eb.phrases_near``)."""
        names = self.model.class_names
        b, k = eb.targets.shape
        top_p, top_i = eb.probs.topk(min(5, eb.probs.shape[1]), dim=1)
        target_logit = eb.logits.gather(1, eb.targets)
        ranks = (eb.logits[:, None, :] > target_logit[..., None]).sum(-1)
        sal = eb.saliency.cpu().numpy().astype(np.float32)
        gmaps = eb.group_maps.cpu().numpy().astype(np.float32)
        share = eb.group_share.cpu().tolist()
        n_in_group = torch.stack(
            [(eb.group_of_channel == gi).sum(-1) for gi in range(self.n_groups)], dim=-1
        ).tolist()
        fi = eb.phrases_for.indices.view(b, k, -1).tolist()
        phrases, nearest = self._phrase_lists(eb, shown, seen), self._nearest_lists(eb, near_seen)
        targets, logits_t = eb.targets.tolist(), target_logit.tolist()
        ranks_l, top_p_l, top_i_l = ranks.tolist(), top_p.tolist(), top_i.tolist()
        out = []
        for i in range(b):
            topk = [
                {"class_index": c, "class_name": names[c], "prob": p}
                for c, p in zip(top_i_l[i], top_p_l[i], strict=False)
            ]
            for j in range(k):
                groups = [
                    Group(self.phrases[p], share[i][j][g], n_in_group[i][j][g], gmaps[i, j, g])
                    for g, p in enumerate(fi[i][j][: self.n_groups])
                    if p >= 0 and n_in_group[i][j][g] > 0
                ]
                t = targets[i][j]
                out.append(
                    Explanation(
                        pred=top_i_l[i][0],
                        pred_name=names[top_i_l[i][0]],
                        prob=top_p_l[i][0],
                        topk=topk,
                        target_class=t,
                        target_name=names[t],
                        rank_of_target=ranks_l[i][j],
                        score=logits_t[i][j],
                        phrases=phrases[i][j],
                        nearest=nearest[i][j],
                        groups=groups,
                        saliency=sal[i, j],
                        method=self.method,
                    )
                )
        return out
