"""Images, one way everywhere (evaluation, calibration, the quick look): which files are images, how a folder is
walked, how files are sampled, and how one is decoded to RGB. Every failure is an :class:`ImageError` (callers pass
their own subclass) that names the file.

- Suffixes: torchvision's ``IMG_EXTENSIONS`` (so a ``.pgm`` folder works everywhere or nowhere).
- Walks are bounded: a folder reached twice (a symbolic link loop, or two links to one folder) is refused by name,
  as is a folder deeper than ``MAX_DEPTH`` and an image-named entry that is not a regular file (a FIFO named
  ``pipe.png`` would block a reader forever; a broken link has no data).
- Decoding checks the pixel count from the header before any pixel is decoded (``MAX_IMAGE_PIXELS``), and converts
  16-bit and 32-bit integer images with their real range (``[0, 65535]`` -> ``[0, 255]``) instead of clipping them;
  a float or out-of-range image is refused.
"""

from __future__ import annotations

import fnmatch
import itertools
import os
import stat
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from PIL import Image

from tofu_export.errors import Hint, UserError

if TYPE_CHECKING:
    import torch

IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
MAX_IMAGE_PIXELS = 64_000_000  # 8000 x 8000: 192 MB as RGB; far above any ViT input, far below a machine's memory
MAX_DEPTH = 32  # folder levels below the root a walk descends
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_DATA = Hint("data", None, "a folder of images, flat or in class folders")
T = TypeVar("T")


class ImageError(UserError):
    """An image folder or file that cannot be used: missing, empty, looping, special, too large or undecodable."""


def _special(mode: int) -> str | None:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return None


def walk_images(root: Path, *, error: type[ImageError] = ImageError, any_file: bool = False) -> Iterator[Path]:
    """Image files (``any_file``: all regular files) under ``root`` (any depth, folder links followed once), in
    sorted order per folder."""
    yield from _walk(Path(root), set(), 0, error, any_file)


def _walk(folder: Path, seen: set[tuple[int, int]], depth: int, error: type[ImageError],
          any_file: bool) -> Iterator[Path]:
    info = os.stat(folder)
    if (info.st_dev, info.st_ino) in seen:
        raise error(f"{folder} leads to a folder already read (a symbolic link loop, or a second link to the same "
                    "folder); remove that link", hint=_DATA)
    if depth > MAX_DEPTH:
        raise error(f"{folder} is more than {MAX_DEPTH} folders deep below the image folder; pass a flatter folder",
                    hint=_DATA)
    seen.add((info.st_dev, info.st_ino))
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        path = Path(entry.path)
        if entry.is_dir():  # follows links: a loop is caught by ``seen``
            yield from _walk(path, seen, depth + 1, error, any_file)
        elif any_file and entry.is_file():
            yield path
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            try:
                mode = os.stat(path).st_mode
            except OSError:
                raise error(f"{path} is a broken symbolic link, not an image; remove it", hint=_DATA) from None
            kind = _special(mode)
            if kind is not None:
                raise error(f"{path} is {kind}, not an image file (reading it could block forever); remove it",
                            hint=_DATA)
            if stat.S_ISREG(mode):
                yield path


def find_images(root: str | Path, pattern: str = "*", *, error: type[ImageError] = ImageError) -> list[Path]:
    """Sorted image files under ``root`` whose name matches ``pattern``; an error if there are none."""
    root = Path(root)
    if not root.is_dir():
        raise error(f"image folder {root} does not exist or is not a folder", hint=_DATA)
    files = sorted(path for path in walk_images(root, error=error) if fnmatch.fnmatch(path.name, pattern))
    if not files:
        others = [path.name for path in itertools.islice(walk_images(root, error=error, any_file=True), 3)]
        found = f" (found only {others} ...)" if others else " (it is empty)"
        named = "" if pattern == "*" else f" named {pattern!r}"
        raise error(f"{root} holds no images{found}{named}; expected image files ({', '.join(IMAGE_SUFFIXES)}), "
                    "flat or in class folders", hint=_DATA)
    return files


def evenly_spaced(items: Sequence[T], count: int | None) -> list[T]:
    """At most ``count`` items spread evenly over the sorted list (so class folders stay balanced)."""
    if count is None or count >= len(items):
        return list(items)
    return [items[i * len(items) // count] for i in range(count)]


def check_pixels(image: Image.Image, path: str | Path, error: type[ImageError] = ImageError) -> None:
    """Refuse an image with more than ``MAX_IMAGE_PIXELS`` pixels (read from its header, before decoding)."""
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise error(f"{path} is {width}x{height} pixels ({width * height / 1e6:.0f} M), more than the "
                    f"{MAX_IMAGE_PIXELS / 1e6:.0f} M pixels tofu-export decodes; downscale it", hint=_DATA)


def to_rgb(image: Image.Image, path: str | Path, error: type[ImageError] = ImageError) -> Image.Image:
    """``image`` as 8-bit RGB with its real range: 16-bit (and 32-bit integer) grey scaled from [0, 65535];
    float or out-of-range images refused (their range is unknown)."""
    if image.mode in _SIXTEEN_BIT:
        values = np.asarray(image)  # [H, W] uint16 or int32
        if values.size and (int(values.min()) < 0 or int(values.max()) > 65535):
            raise error(f"{path} is a {image.mode} image with values outside [0, 65535]; save it as 8 or 16 bit",
                        hint=_DATA)
        scaled = np.rint(values.astype(np.float32) * (255.0 / 65535.0)).astype(np.uint8)
        return Image.fromarray(scaled).convert("RGB")
    if image.mode == "F":
        raise error(f"{path} is a 32-bit float image, whose range is unknown; save it as 8 or 16 bit", hint=_DATA)
    return image.convert("RGB")


def _decode_failure(path: str | Path, cause: Exception, error: type[ImageError], hint: Hint | None) -> ImageError:
    return error(f"{path} is not a readable image ({type(cause).__name__}: {str(cause)[:160]})", hint=hint)


@contextmanager
def _opened(path: str | Path) -> Iterator[Image.Image]:
    """``Image.open`` without Pillow's ``DecompressionBombWarning``: every image Pillow warns about is over
    ``MAX_IMAGE_PIXELS`` too, and ``check_pixels`` refuses it by name, so the warning would only repeat the error."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(path)
    with image:
        yield image


def load_rgb(path: str | Path, *, error: type[ImageError] = ImageError, hint: Hint | None = _DATA) -> Image.Image:
    """The image at ``path`` as RGB, checked for size before decoding; ``error`` naming the file otherwise."""
    try:
        with _opened(path) as image:
            check_pixels(image, path, error)
            return to_rgb(image, path, error)
    except ImageError:
        raise
    except Exception as cause:  # PIL: UnidentifiedImageError, truncated data, DecompressionBombError, bad headers
        raise _decode_failure(path, cause, error, hint) from cause


def decode_problem(path: str | Path) -> str | None:
    """Why the image at ``path`` cannot be used, or None (a JPEG is decoded at reduced scale: still complete)."""
    try:
        with _opened(path) as image:
            check_pixels(image, path)
            image.draft("RGB", (64, 64))
            image.load()
            to_rgb(image, path)
    except ImageError as error:
        return str(error)
    except Exception as error:  # as in ``load_rgb``
        return f"{path} ({type(error).__name__}: {str(error)[:120]})"
    return None


def decode_images(files: Sequence[Path], transform: Callable[[Image.Image], Any],
                  error: type[ImageError] = ImageError, hint: Hint | None = _DATA) -> torch.Tensor:
    """``[N, 3, H, W]``: each file decoded as RGB (``load_rgb``) and passed through ``transform``."""
    import torch  # here, not at import: finding and counting images needs no torch

    return torch.stack([transform(load_rgb(path, error=error, hint=hint)) for path in files])
