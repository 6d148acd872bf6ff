"""The calibration images: a folder read once into one ``[B, 3, H, W]`` tensor in the model's eval transform.

Labels are not needed. ``DATA`` may be an ImageFolder (``<root>/<class>/<image>``), a dataset root with ``train/``
(the train split is used: calibrate on train, evaluate on test), or a flat folder of images. Finding, sampling and
decoding are ``tofu_export.images``'s, the same as evaluation's and the quick look's.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tofu_export.errors import Hint
from tofu_export.images import ImageError, decode_images, evenly_spaced, find_images

if TYPE_CHECKING:
    import torch
    from torch import nn

MIN_IMAGES = 8  # fewer gives per-block damage too noisy to rank modes by
DAMAGE_IMAGES = 32  # of the search images, the damage per block is measured on (an even spread): the damage only
# predicts, and every candidate a search runs is run on all of them. On DINOv2-S/14, 32 of 48 chose the same or a
# policy predicted within 0.3% as fast and meeting its budget on the search and confirm images, at 2/3 of the stage's
# time, in six searches (bench/results/damage_images*/); on 1,000 test images the floors' picks read +0.00073,
# -0.00012 and -0.00004 against the 48-image ones (standard errors 0.00020, 0.00015, 0.00004)


class CalibrationDataError(ImageError):
    """The calibration images cannot be read, are too few, or are not images."""


def image_files(root: str | Path, error: type[ImageError] = CalibrationDataError,
                what: str = "calibration data") -> tuple[Path, list[Path]]:
    """The folder images are taken from (``root/train`` if present) and its image files, sorted (class folders
    first level, or flat); ``error`` (naming the images ``what``) where there are none to take. Calibration's and
    fine-tuning's DATA alike."""
    root = Path(root)
    if not root.is_dir():
        raise error(f"{what} {root} is not a folder", hint=Hint("data", None, "a folder of images, or an ImageFolder"))
    folder = root / "train" if (root / "train").is_dir() else root
    return folder, find_images(folder, error=error)


def check_image_count(count: int) -> None:
    """Refuse fewer than ``MIN_IMAGES`` calibration images (before any model or image is loaded)."""
    if count < MIN_IMAGES:
        raise CalibrationDataError(f"calibration needs at least {MIN_IMAGES} images, asked for {count}",
                                   hint=Hint("images", "64"))


def check_damage_images(count: int | None) -> None:
    """Refuse fewer than one damage image (``None``: all the search images)."""
    if count is not None and count < 1:
        raise CalibrationDataError(f"the damage per block needs at least one image, asked for {count}",
                                   hint=Hint("damage_images", str(DAMAGE_IMAGES)))


def load_images(root: str | Path, model: nn.Module, count: int) -> tuple[torch.Tensor, dict]:
    """``([count, 3, H, W] images, source record)``: ``count`` images from ``root`` in ``model``'s eval transform.

    Fewer than ``MIN_IMAGES`` images (asked for or available), or a file that does not decode, is a
    ``CalibrationDataError``; if the folder has fewer than ``count``, all of them are used and the record says so.
    """
    from tofu_export.evaluation.data import model_transform

    check_image_count(count)
    folder, files = image_files(root)
    if len(files) < MIN_IMAGES:
        raise CalibrationDataError(f"{folder} holds {len(files)} images; calibration needs at least {MIN_IMAGES}",
                                   hint=Hint("images", str(MIN_IMAGES)))
    chosen = evenly_spaced(files, count)
    batch = decode_images(chosen, model_transform(model), CalibrationDataError)
    source = {"path": str(root), "folder": str(folder), "count": len(chosen), "asked": count,
              "available": len(files), "first": str(chosen[0]), "last": str(chosen[-1])}
    return batch, source


def split_confirm(images: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``images [B, 3, H, W]`` -> (``count`` of them evenly spread, for the measurement and the held-out check; the
    rest, the confirm images the search's best candidates are run again on). Fewer than ``count``: all are
    measured, none confirm."""
    import torch

    chosen = torch.zeros(len(images), dtype=torch.bool)
    chosen[evenly_spaced(range(len(images)), count)] = True
    return images[chosen], images[~chosen]
