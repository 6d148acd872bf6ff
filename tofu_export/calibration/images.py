"""The calibration images: a folder read once into one ``[B, 3, H, W]`` tensor in the model's eval transform.

Labels are not needed. ``DATA`` may be an ImageFolder (``<root>/<class>/<image>``), a dataset root with ``train/``
(the train split is used: calibrate on train, evaluate on test), or a flat folder of images.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tofu_export.errors import Hint, UserError
from tofu_export.evaluation.data import decode_images, model_transform

MIN_IMAGES = 8  # fewer gives per-block damage too noisy to rank modes by
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class CalibrationDataError(UserError):
    """The calibration images cannot be read, are too few, or are not images."""


def image_files(root: str | Path) -> tuple[Path, list[Path]]:
    """The folder images are taken from (``root/train`` if present) and its image files, sorted (class folders
    first level, or flat)."""
    root = Path(root)
    if not root.is_dir():
        raise CalibrationDataError(f"calibration data {root} is not a folder",
                                   hint=Hint("data", None, "a folder of images, or an ImageFolder"))
    folder = root / "train" if (root / "train").is_dir() else root
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        others = sorted(p.name for p in folder.rglob("*") if p.is_file())[:3]
        found = f" (found only {others} ...)" if others else " (it is empty)"
        raise CalibrationDataError(
            f"{folder} holds no images{found}; calibration needs a folder of images ({', '.join(IMAGE_SUFFIXES)}), "
            "flat or in class folders"
        )
    return folder, files


def evenly_spaced(files: list[Path], count: int) -> list[Path]:
    """``count`` files spread evenly over the sorted list (so class folders stay balanced)."""
    if count >= len(files):
        return files
    return [files[i * len(files) // count] for i in range(count)]


def load_images(root: str | Path, model: nn.Module, count: int) -> tuple[torch.Tensor, dict]:
    """``([count, 3, H, W] images, source record)``: ``count`` images from ``root`` in ``model``'s eval transform.

    Fewer than ``MIN_IMAGES`` images (asked for or available), or a file that does not decode, is a
    ``CalibrationDataError``; if the folder has fewer than ``count``, all of them are used and the record says so.
    """
    if count < MIN_IMAGES:
        raise CalibrationDataError(f"calibration needs at least {MIN_IMAGES} images, asked for {count}",
                                   hint=Hint("images", "64"))
    folder, files = image_files(root)
    if len(files) < MIN_IMAGES:
        raise CalibrationDataError(f"{folder} holds {len(files)} images; calibration needs at least {MIN_IMAGES}",
                                   hint=Hint("images", str(MIN_IMAGES)))
    chosen = evenly_spaced(files, count)
    transform = model_transform(model)
    batch = decode_images(chosen, transform, CalibrationDataError)
    source = {"path": str(root), "folder": str(folder), "count": len(chosen), "asked": count,
              "available": len(files), "first": str(chosen[0]), "last": str(chosen[-1])}
    return batch, source
