"""Image folders and eval transforms: ``<root>/<class>/<image>`` in, batches ``[B, 3, H, W]`` + labels out.

Class indices: when every class folder name is all digits (``0243``, ``7``) the index is that integer
(the ImageNet / dataset class index, so a 1000-way head is scored against the right logit even when only
20 classes are present); otherwise it is the folder's position in sorted order (torchvision's rule). Labels are
matched by class NAME across splits: ``train/`` and ``test/`` (or ``val/``) must hold the same class folders.

Images that cannot be decoded are refused, not skipped: before a loader is made, every image it will read is
decoded once (JPEGs at reduced scale), and a folder with broken images is an error naming them. Finding, decoding
and size limits are ``tofu_export.images``'s (the same for calibration and the quick look): the class folders are
walked with its bounded walk, never torchvision's (which follows a symbolic link loop forever).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform, resolve_data_config
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets import ImageFolder

from tofu_export.errors import EvaluationError, Hint
from tofu_export.images import IMAGE_SUFFIXES, ImageError, decode_problem, load_rgb, walk_images

Transform = Callable[[Image.Image], torch.Tensor]
EVAL_SPLITS = ("test", "val")


class IndexedImageFolder(ImageFolder):
    """``ImageFolder`` whose class index is ``int(folder name)`` when all folder names are digits."""

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        classes, class_to_idx = super().find_classes(directory)
        if not all(name.isdigit() for name in classes):
            return classes, class_to_idx
        by_value = {name: int(name) for name in classes}
        if len(set(by_value.values())) != len(by_value):
            raise EvaluationError(
                f"{directory}: class folders {classes} name the same class index twice (e.g. '7' and '007'). "
                "Rename them so that each integer class index has exactly one folder."
            )
        return classes, by_value

    @staticmethod
    def make_dataset(directory: str | Path, class_to_idx: dict[str, int], extensions: tuple[str, ...] | None = None,
                     is_valid_file: Callable[[str], bool] | None = None, allow_empty: bool = False,
                     ) -> list[tuple[str, int]]:
        """``(path, class index)`` of every image in each class folder, by ``images.walk_images`` (bounded)."""
        samples = [(str(path), index) for name, index in sorted(class_to_idx.items())
                   for path in walk_images(Path(directory) / name, error=EvalImageError)]
        if not samples and not allow_empty:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in the class folders of {directory}")
        return samples


class EvalImageError(ImageError, EvaluationError):
    """An image of the evaluation folder that cannot be used."""


def _load(path: str) -> Image.Image:
    return load_rgb(path, error=EvalImageError)


def image_folder(root: str | Path, transform: Transform) -> IndexedImageFolder:
    """The dataset under ``root`` (``<root>/<class>/<image>``), each image passed through ``transform``."""
    root = Path(root)
    if not root.is_dir():
        raise EvaluationError(
            f"Dataset folder {root} does not exist. Prepare one with scripts/prepare_data.py "
            "(foolbox or fashion-mnist), or point to any folder laid out as <root>/<class>/<image>."
        )
    try:
        return IndexedImageFolder(str(root), transform=transform, loader=_load)
    except FileNotFoundError as error:
        raise EvaluationError(
            f"{root} holds no <class>/<image> files ({error}). Expected an ImageFolder layout, e.g. "
            f"{root}/0/a.png, {root}/1/b.png; for a folder with train/ and test/, pass the parent folder."
        ) from error


def split_folders(root: str | Path) -> tuple[Path | None, Path]:
    """``(train, eval)`` folders: ``train/`` or None, and ``test/`` or ``val/`` (else ``root`` itself).

    With both splits, their class folders must be the same (labels are matched by class name)."""
    root = Path(root)
    train = root / "train"
    eval_dir = next((root / name for name in EVAL_SPLITS if (root / name).is_dir()), root)
    if not (train.is_dir() and eval_dir != root):
        return None, eval_dir
    train_classes, eval_classes = class_names(train), class_names(eval_dir)
    if train_classes != eval_classes:
        only = [f"only in {folder.name}/: {', '.join(sorted(names)[:8])}" for folder, names in
                ((train, train_classes - eval_classes), (eval_dir, eval_classes - train_classes)) if names]
        raise EvaluationError(
            f"{train} and {eval_dir} hold different classes ({'; '.join(only)}). Labels are matched by class "
            "folder name, so both splits need the same class folders: add the missing ones or remove the extra."
        )
    return train, eval_dir


def class_names(folder: Path) -> set[str]:
    """The class folder names under ``folder`` (torchvision's rule: every sub-folder is a class)."""
    return {entry.name for entry in os.scandir(folder) if entry.is_dir()}


def check_images(dataset: Dataset) -> None:
    """Decode every image of ``dataset`` (an ``ImageFolder`` or a ``Subset`` of one) once; refuse broken ones."""
    base, indices = (dataset.dataset, dataset.indices) if isinstance(dataset, Subset) else (dataset, None)
    paths = [path for path, _ in base.samples] if indices is None else [base.samples[i][0] for i in indices]
    with ThreadPoolExecutor(max_workers=4) as pool:
        problems = [problem for problem in pool.map(decode_problem, paths) if problem]
    if problems:
        listed = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise EvaluationError(
            f"{len(problems)} of {len(paths)} images cannot be decoded: {listed}. Remove or replace them "
            "(broken images are refused, not skipped, so that every score counts the same images)."
        )


def model_data_config(model: torch.nn.Module) -> dict[str, Any]:
    """The eval data config (timm's keys: input_size, mean, std, interpolation, crop_pct) of ``model``.

    The model's family says it (for timm: ``resolve_data_config`` with the size the model was built for, not the
    pretrained resolution, 518 for DINOv2, it keeps); a model no family owns gets timm's defaults.
    """
    from tofu_export.models.family import UnsupportedModelError, family_of

    try:
        family = family_of(model)
    except UnsupportedModelError:
        return resolve_data_config({}, model=model)
    return family.data_config(model)


def model_transform(model: torch.nn.Module) -> Transform:
    """The eval transform (resize, center crop, normalize) of ``model``; images are loaded as RGB."""
    return create_transform(**model_data_config(model))


def artifact_transform(
    img_size: int,
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD,
    crop_pct: float = 1.0,
    interpolation: str = "bicubic",
) -> Transform:
    """Eval transform for an ONNX / TensorRT artifact that carries no data config: ``[3, S, S]`` output."""
    return create_transform(
        input_size=(3, img_size, img_size), mean=mean, std=std, crop_pct=crop_pct, interpolation=interpolation
    )


def subsample(dataset: Dataset, limit: int | None) -> Dataset:
    """At most ``limit`` items, evenly strided over the (class-sorted) dataset so classes stay balanced."""
    size = len(dataset)  # type: ignore[arg-type]
    if limit is not None and limit <= 0:
        raise EvaluationError(f"limit must be a positive number of images, got {limit}.", hint=Hint("limit", "100"))
    if limit is None or limit >= size:
        return dataset
    return Subset(dataset, [i * size // limit for i in range(limit)])


def make_loader(
    root: str | Path,
    transform: Transform,
    *,
    batch_size: int = 32,
    num_workers: int = 1,
    limit: int | None = None,
) -> DataLoader:
    """Ordered (unshuffled) batches ``([B, 3, H, W] float32, [B] int64)`` of the ImageFolder at ``root``."""
    dataset = subsample(image_folder(root, transform), limit)
    check_images(dataset)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
