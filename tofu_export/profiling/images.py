"""The images a profile times on instead of seeded noise: a few of a folder (or one image file), in the preprocessing
the artifact's manifest records, or the model's own eval transform for a checkpoint profiled in PyTorch.

A graph's time can depend on its input's values (``engines.base.TimedBatches``): these give the figure a deployment
sees. Without a manifest, a graph's images are resized to its input size and normalised with ImageNet's mean and
std, and the description says so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tofu_export.errors import Hint
from tofu_export.images import IMAGE_SUFFIXES, ImageError, decode_images, evenly_spaced, find_images

if TYPE_CHECKING:
    import torch

_HINT = Hint("data", None, "an image file, or a folder of images (flat or in class folders)")


class ProfileImageError(ImageError):
    """The images to time on cannot be found or read."""


@dataclass(frozen=True)
class TimingImages:
    """``images`` ``[N, C, H, W]`` to time on, and how a report names them."""

    images: torch.Tensor
    description: str


def image_paths(path: str | Path, count: int) -> list[Path]:
    """``path`` itself (an image file), or at most ``count`` of the images under it, spread evenly over the sorted
    files so that class folders stay balanced."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise ProfileImageError(f"{path} is not an image file ({', '.join(IMAGE_SUFFIXES)})", hint=_HINT)
        return [path]
    return evenly_spaced(find_images(path, error=ProfileImageError), count)


def graph_preprocessing(graph: str | Path, chw: Sequence[int]) -> tuple[dict[str, Any], str]:
    """timm's data config for the graph's input ``chw`` (the size always the graph's own) and where it came from:
    the manifest beside the graph, or ImageNet's mean and std where there is none."""
    from tofu_export.manifest import Manifest

    manifest = Manifest.read_if_any(Path(graph).parent)
    recorded = None if manifest is None else manifest.preprocessing
    size = {"input_size": tuple(int(d) for d in chw)}
    if recorded:
        return {**recorded, **size}, "the preprocessing its manifest records"
    return {**size, "crop_pct": 1.0, "interpolation": "bicubic"}, "resized, ImageNet mean and std (no manifest)"


def load_timing_images(path: str | Path, count: int, transform: Callable[[Any], torch.Tensor],
                       how: str) -> TimingImages:
    """Up to ``count`` images from ``path`` through ``transform``; ``how`` names the preprocessing."""
    files = image_paths(path, count)
    images = decode_images(files, transform, ProfileImageError, _HINT)
    plural = "s" if len(files) != 1 else ""
    return TimingImages(images, f"{len(files)} image{plural} from {path} ({how})")


def graph_timing_images(path: str | Path, count: int, graph: str | Path, chw: Sequence[int]) -> TimingImages:
    """Images for an exported graph whose input is ``[B, *chw]``."""
    from timm.data import create_transform

    config, how = graph_preprocessing(graph, chw)
    return load_timing_images(path, count, create_transform(**config), how)


def model_timing_images(path: str | Path, count: int, model: Any) -> TimingImages:
    """Images for a PyTorch model, in its eval transform."""
    from tofu_export.evaluation.data import model_transform

    return load_timing_images(path, count, model_transform(model), "the model's eval transform")
