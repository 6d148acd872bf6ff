"""Tiny random transformers two-tower models (``CLIPModel``, ``SiglipModel``: what ``openai/clip-vit-*`` and
``google/siglip-*`` hold), saved as ``save_pretrained`` folders, for the tests that read, tune and score them."""

from __future__ import annotations

from pathlib import Path

import torch

VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
              patch_size=4)  # 64 patches and CLIP's class token
TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=99,
            max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def tiny_two_towers(name: str, folder: Path) -> torch.nn.Module:
    """A tiny random ``name`` (``CLIPModel``: its projection 16 wide; ``SiglipModel``), seed 0, eval mode, saved to
    ``folder``; the model."""
    import transformers

    extra = {"projection_dim": 16} if name == "CLIPModel" else {}
    torch.manual_seed(0)
    config = getattr(transformers, name.replace("Model", "Config"))(vision_config=VISION, text_config=TEXT, **extra)
    model = getattr(transformers, name)(config).eval()
    model.save_pretrained(folder)
    return model
