"""Tiny random transformers two-tower models (``CLIPModel``, ``SiglipModel``: what ``openai/clip-vit-*`` and
``google/siglip-*`` hold), saved as ``save_pretrained`` folders, for the tests that read, tune and score them; and the
tiny open_clip visual tower and preprocessing that ``test_open_clip_load`` and ``test_zero_shot`` share (one
definition, so that the two export the same graph and the session's trace cache makes it once)."""

from __future__ import annotations

from pathlib import Path

import torch

VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
              patch_size=4)  # 64 patches and CLIP's class token
TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=99,
            max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)

OPEN_CLIP_IMG = 64
OPEN_CLIP_VISION = {"image_size": OPEN_CLIP_IMG, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32}
OPEN_CLIP_PREPROCESS = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}


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
