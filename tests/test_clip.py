"""Text encoding: cutting the padding after the end-of-text token changes nothing."""

from __future__ import annotations

import pytest
import torch

from textcam.clip import _causal_argmax_prefix, encode_tokens, load_clip


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    return load_clip("textcam-tiny-clevr", None, device="cpu")


def test_prefix_encoding_equals_full_context(tiny_clip) -> None:
    tokens = tiny_clip.tokenizer(["a red cube", "a photo of a small shiny metal sphere.", "x"])
    assert _causal_argmax_prefix(tiny_clip.model, tokens) < tokens.shape[1]  # the fast path is taken
    with torch.no_grad():
        fast = encode_tokens(tiny_clip.model, tokens)
        full = tiny_clip.model.encode_text(tokens)
    assert torch.allclose(fast, full, atol=1e-5)


def test_encode_texts_keeps_phrase_order(tiny_clip) -> None:
    phrases = ["a photo of a small shiny metal sphere", "cube", "a red cylinder next to a cube"]
    together = tiny_clip.encode_texts(phrases, cache_dir=False, batch_size=2)
    one_by_one = torch.cat([tiny_clip.encode_texts([p], cache_dir=False) for p in phrases])
    assert torch.allclose(together, one_by_one, atol=1e-5)


def test_non_causal_mask_falls_back_to_the_full_context(tiny_clip) -> None:
    tokens = tiny_clip.tokenizer(["a red cube"])
    original = tiny_clip.model.attn_mask
    try:
        tiny_clip.model.attn_mask = torch.zeros_like(original)  # every position sees the padding
        assert _causal_argmax_prefix(tiny_clip.model, tokens) is None
    finally:
        tiny_clip.model.attn_mask = original
