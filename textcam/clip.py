"""The CLIP side of TextCAM: image and text embeddings through open_clip.

Any architecture and pretrained tag open_clip knows works (``ViT-B-32`` + ``laion2b_s34b_b79k``
where a network exists), as does a local checkpoint file (``pretrained="/path/weights.safetensors"``)
or an open_clip ``local-dir:`` folder. The ground-truth world's tiny CLIP is an open_clip model
too, so it loads through exactly the same path. Embeddings are L2-normalised; text embeddings of a
vocabulary are cached on disk keyed by model identity and a hash of the phrases and templates.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from textcam.device import resolve_device
from textcam.io import atomic_path, cache_root, file_digest

#: Prompt templates averaged for every phrase (open_clip ``build_zero_shot_classifier`` style).
DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of {}.", "a photo showing {}.", "{}")

_CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class ClipEncoder:
    """An open_clip model with its preprocessing and tokenizer, in eval mode on ``device``.

    ``clip_id`` names the weights (architecture + tag, or + content hash of a local file); it keys
    caches and is recorded in channel banks so a bank is never used with another CLIP.
    """

    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[Sequence[str]], torch.Tensor]
    clip_id: str
    device: torch.device
    cacheable: bool = True  # False for random weights: their identity is not reproducible

    @property
    def embed_dim(self) -> int:
        with torch.no_grad():
            return int(self.encode_texts(["x"], templates=("{}",), cache_dir=False).shape[1])

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) preprocessed pixels → (B, D) unit-norm embeddings (float32)."""
        emb = self.model.encode_image(pixels.to(self.device))
        return F.normalize(emb.float(), dim=-1)

    @torch.no_grad()
    def encode_texts(
        self,
        texts: Sequence[str],
        *,
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        cache_dir: str | os.PathLike[str] | bool | None = None,
        batch_size: int = 256,
    ) -> torch.Tensor:
        """Phrases → (P, D) unit-norm embeddings, averaged over prompt templates.

        Cached on disk under ``cache_dir`` (default: :func:`textcam.io.cache_root`; ``False`` disables)
        keyed by ``clip_id`` and a hash of phrases and templates.
        """
        texts = list(texts)
        if not texts:
            raise ValueError("encode_texts needs at least one phrase")
        cache_file = None
        if cache_dir is not False and self.cacheable:
            key = hashlib.sha256(
                json.dumps([self.clip_id, list(templates), texts]).encode("utf-8")
            ).hexdigest()[:20]
            root = Path(cache_dir) if cache_dir not in (None, True) else cache_root()
            cache_file = root / "text-embeddings" / f"{key}.safetensors"
            if cache_file.exists():
                return load_file(cache_file)["embeddings"].to(self.device)
        prompts = [t.format(p) for p in texts for t in templates]
        tokens = self.tokenizer(prompts)
        # Batch prompts of similar length together, so each batch can be cut to its longest one.
        order = (tokens != 0).sum(dim=1).argsort(stable=True)
        emb = torch.empty(0)
        for start in range(0, len(prompts), batch_size):
            rows = order[start : start + batch_size]
            chunk = F.normalize(encode_tokens(self.model, tokens[rows].to(self.device)).float(), dim=-1)
            if not emb.numel():
                emb = chunk.new_empty(len(prompts), chunk.shape[1])
            emb[rows.to(chunk.device)] = chunk
        emb = emb.view(len(texts), len(templates), -1).mean(dim=1)
        emb = F.normalize(emb, dim=-1)
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(cache_file) as tmp:
                save_file({"embeddings": emb.cpu().contiguous()}, tmp, metadata={"clip_id": self.clip_id})
        return emb


def _causal_argmax_prefix(model: torch.nn.Module, tokens: torch.Tensor) -> int | None:
    """Length of the token prefix that decides the text embedding, or None if the whole row may.

    In open_clip's standard ``CLIP`` text tower (causal attention mask, pooled at the end-of-text
    token, which has the highest id) position i sees only positions ≤ i, so the padding after the
    last end-of-text token of a batch cannot change the result. Any other tower: None.
    """
    from open_clip.model import CLIP

    if type(model).encode_text is not CLIP.encode_text or getattr(model, "text_pool_type", None) != "argmax":
        return None
    mask = getattr(model, "attn_mask", None)
    if not isinstance(mask, torch.Tensor) or mask.shape != (tokens.shape[1], tokens.shape[1]):
        return None
    causal = bool(torch.isneginf(mask.triu(1)).sum() == mask.shape[0] * (mask.shape[0] - 1) // 2)
    if not causal or bool(mask.tril().any()):
        return None
    return int(tokens.argmax(dim=-1).max()) + 1


def encode_tokens(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(tokens)``, run on the deciding prefix only where that gives the same result.

    Phrases are a few tokens long but padded to the full context (77 for ViT-B-32); cutting the
    padding makes encoding a large vocabulary several times faster on CPU.
    """
    from open_clip.transformer import text_global_pool

    length = _causal_argmax_prefix(model, tokens)
    if length is None or length >= tokens.shape[1]:
        return model.encode_text(tokens)
    # open_clip's CLIP.encode_text with the positional embedding and the mask cut to the prefix.
    tokens = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
    x = text_global_pool(x, tokens, "argmax")
    proj = model.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj


def _ensure_config(name: str) -> None:
    """Make configs shipped in ``textcam/configs`` (e.g. the tiny CLIP) known to open_clip."""
    import open_clip

    if name in open_clip.list_models():
        return
    candidate = _CONFIG_DIR / f"{name}.json"
    if candidate.exists():
        open_clip.add_model_config(candidate)


def load_clip(
    name: str,
    pretrained: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device = "auto",
) -> ClipEncoder:
    """Load a CLIP model through open_clip.

    Args:
        name: an open_clip architecture (``ViT-B-32``), a config shipped in ``textcam/configs``,
            or ``local-dir:/path`` (an open_clip folder with ``open_clip_config.json`` + weights).
        pretrained: an open_clip pretrained tag (``laion2b_s34b_b79k``; needs a network the first
            time), a local ``.safetensors``/``.pt`` file, or ``None`` for random weights.
        device: ``auto|cpu|cuda[:N]``.

    Example:
        >>> clip = load_clip("ViT-B-32", "laion2b_s34b_b79k")  # doctest: +SKIP
        >>> clip.encode_texts(["a dog", "a cat"]).shape  # doctest: +SKIP
        torch.Size([2, 512])
    """
    import open_clip

    dev = resolve_device(device)
    cacheable = True
    if name.startswith("local-dir:"):
        folder = Path(name.split(":", 1)[1])
        if not folder.is_dir():
            raise FileNotFoundError(f"CLIP folder not found: {folder}")
        weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
        clip_id = f"{name}@{file_digest(weights[0])}" if weights else name
        pretrained = None
    else:
        _ensure_config(name)
        if name not in open_clip.list_models():
            raise ValueError(f"unknown CLIP architecture {name!r}; see open_clip.list_models()")
        if pretrained is None:
            clip_id, cacheable = f"{name}:random", False
        elif Path(pretrained).suffix in {".safetensors", ".pt", ".pth", ".bin"} or Path(pretrained).exists():
            if not Path(pretrained).is_file():
                raise FileNotFoundError(f"CLIP checkpoint not found: {pretrained}")
            clip_id = f"{name}@{file_digest(pretrained)}"
        else:
            tags = open_clip.list_pretrained_tags_by_model(name)
            if pretrained not in tags:
                raise ValueError(f"unknown pretrained tag {pretrained!r} for {name}; known: {tags}")
            clip_id = f"{name}:{pretrained}"
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=None if pretrained is None else str(pretrained), device=dev
        )
    except (OSError, RuntimeError) as exc:
        if pretrained is not None and not Path(str(pretrained)).exists():
            raise RuntimeError(
                f"could not fetch pretrained weights {name}:{pretrained} ({exc}). Without a network, "
                "pass a local checkpoint file as `pretrained`."
            ) from exc
        raise
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    return ClipEncoder(model, preprocess, tokenizer, clip_id, dev, cacheable)
